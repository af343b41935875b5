"""benchmarks/gpu_decode.py --dry-run works on CPU (interpreter, no timing)."""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def test_gpu_decode_dry_run(tmp_path):
    out = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_decode.py"), "--dry-run",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "FAILED" not in text, text
    assert "| store: differing page bytes (expect 0) | 0 |" in text
    assert text.count("| int2-r0.2 | 40 | 2 |") == 1 and text.count("| int3-r0.05 | 40 | 2 |") == 1
    assert "pages equal (excl. scores) / hi scores max rel err | " in text and "/ False" not in text
