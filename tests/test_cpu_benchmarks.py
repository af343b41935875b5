"""The CPU speed benchmarks run end to end on tiny shapes (no timing claims: the numbers are noise
here). ``cpu_layer.py`` times stock vLLM's CPU attention ops against the C++ op, round-robin over
``--layers`` caches; ``serve_compare.py`` parses its scenarios."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW = re.compile(r"^\| (\d+) \| (\d+) \| .*\| ([\d.]+)x \|", re.M)


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", args[0]), *args[1:]],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_cpu_layer_decode_rows_with_layer_caches():
    pytest.importorskip("vllm")
    out = _run("cpu_layer.py", "--context", "130", "--batch", "1", "2", "--steps", "3", "--layers", "2",
               "--no-ref", "--threads", "1")
    assert "decode: 2 layer cache(s) per side" in out
    rows = [m.groups()[:2] for m in ROW.finditer(out)]
    assert rows == [("130", "1"), ("130", "2")], out


def test_cpu_layer_prefill_rows():
    pytest.importorskip("vllm")
    out = _run("cpu_layer.py", "--prefill", "0:64", "70:32", "--batch", "1", "--steps", "2", "--no-ref",
               "--threads", "1")
    assert [m.groups()[:2] for m in ROW.finditer(out)] == [("0", "64"), ("70", "32")], out


def test_serve_compare_lists_its_scenarios():
    out = _run("serve_compare.py", "--help")
    for name in ("mem", "nomem", "prefill", "long"):
        assert name in out
