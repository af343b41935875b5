"""benchmarks/gpu_first_contact.py: the dry run on CPU (numerics under the interpreter, every other
step's plan), and the server part (benchmarks/gpu_serve_compare.py) against a fake server."""

import importlib.util
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_first_contact.py")
SERVE = os.path.join(ROOT, "benchmarks", "gpu_serve_compare.py")

FAKE_SERVER = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
port = int(sys.argv[sys.argv.index("--port") + 1])
print("INFO MiKV layout: block 16, 100 B/token/head (x), ops TritonOps", flush=True)
print("INFO torch.compile takes 12.5 s in total", flush=True)
print("INFO Graph capturing finished in 7 secs, took 0.2 GiB", flush=True)
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["temperature"] == 0
        out = json.dumps({"choices": [{"text": " Paris.", "token_ids": [1, 2, body["max_tokens"]]}]}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json"); self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass
HTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def _module():
    spec = importlib.util.spec_from_file_location("gpu_serve_compare", SERVE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_first_contact_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "report.md").read_text()
    assert "FAILED" not in text, text
    for part in ("## Environment", "## Kernels", "decode q bfloat16", "## Decode step vs vLLM paged decode",
                 "plan (dry run): MiKV decode step vs vLLM unified_attention", "## Stock vs MiKV servers",
                 "TPOT stock vs mikv: contexts [1024, 4096, 8000] x batches [1, 32]",
                 "lossless vs stock: greedy", "- failed: none"):
        assert part in text, part
    assert text.count("--kv-cache-policy mikv") == 2 and "--mikv-hi-ratio 1 --mikv-hi-dtype float16" in text


def test_server_against_a_fake_server(tmp_path, monkeypatch):
    mod = _module()
    fake = tmp_path / "fake_server.py"
    fake.write_text(FAKE_SERVER)
    real = mod.server_command
    monkeypatch.setattr(mod, "server_command",
                        lambda model, port, kind, mml: [sys.executable, str(fake), *real(model, port, kind, mml)[4:]])
    srv = mod.Server("MODEL", "mikv", 4096, str(tmp_path), timeout=60)
    try:
        assert srv.ready_s is not None
        assert srv.log_times() == "torch.compile 12.5 s, graph capture 7 s"
        assert srv.complete("The capital of France is", 32) == [1, 2, 32]
        assert srv.batch_seconds(8, 2, 1) > 0
    finally:
        srv.stop()

    def dead(model, port, kind, mml):   # a server that dies at start: not ready, no hang
        return [sys.executable, "-c", "print('boom: no GPU'); raise SystemExit(3)"]

    monkeypatch.setattr(mod, "server_command", dead)
    srv = mod.Server("MODEL", "stock", 4096, str(tmp_path), timeout=20)
    srv.stop()
    assert srv.ready_s is None and "boom: no GPU" in open(srv.log_path).read()
