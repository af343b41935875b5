"""benchmarks/gpu_first_contact.py: the dry run on CPU, and its serve step against a fake server."""

import importlib.util
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_first_contact.py")

FAKE_SERVER = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
port = int(sys.argv[sys.argv.index("--port") + 1])
print("INFO MiKV layout: block 16, 100 B/token/head (x), ops TritonOps", flush=True)
print("INFO Capturing CUDA graphs (mixed prefill-decode, PIECEWISE)", flush=True)
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["temperature"] == 0 and body["max_tokens"] == 16
        out = json.dumps({"choices": [{"text": " Paris."}]}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json"); self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass
HTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def _module():
    spec = importlib.util.spec_from_file_location("gpu_first_contact", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_first_contact_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "report.md").read_text()
    assert "FAILED" not in text, text
    for part in ("## Environment", "## Kernels", "decode q bfloat16", "## Workspace bound",
                 "| within workspace, outputs finite | True |", "## Decode attention", "- failed: none"):
        assert part in text, part
    assert text.count("--kv-cache-policy mikv") == 2 and text.count("--enforce-eager") == 1


def test_serve_step_against_a_fake_server(tmp_path, monkeypatch):
    mod = _module()
    fake = tmp_path / "fake_server.py"
    fake.write_text(FAKE_SERVER)
    real = mod.serve_command
    monkeypatch.setattr(mod, "serve_command",
                        lambda model, port, graphs: [sys.executable, str(fake), *real(model, port, graphs)[4:]])
    rep = mod.Report(str(tmp_path / "report.md"))
    mod.serve(rep, "MODEL", graphs=True, timeout=60, out_dir=str(tmp_path))
    text = "\n".join(rep.lines)
    assert rep.failed == [], text
    assert "CUDA graphs: ok" in text and "' Paris.'" in text and "ops: TritonOps" in text
    assert "Capturing CUDA graphs" in text

    def dead(model, port, graphs):   # a server that dies at start: reported with its log
        return [sys.executable, "-c", "print('boom: no GPU'); raise SystemExit(3)"]

    monkeypatch.setattr(mod, "serve_command", dead)
    rep = mod.Report(None)
    mod.serve(rep, "MODEL", graphs=False, timeout=20, out_dir=str(tmp_path))
    assert rep.failed == ["serve (--enforce-eager)"] and "boom: no GPU" in "\n".join(rep.lines)
