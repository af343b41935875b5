"""Session-wide fixtures: the prepared model and real `vllm serve` servers.

* ``model_dir`` (session): the converted SmolLM2-135M-Instruct directory
  (``prepare_model()``, cached under ``$MIKV_VLLM_CACHE`` or ``~/.cache/mikv-vllm``).
* ``vllm_server`` (module): a healthy ``vllm serve`` of ``model_dir`` started with the
  module-level list ``VLLM_SERVER_ARGS`` (default: none = stock vLLM); see
  ``tests/helpers.py`` for the defaults it adds and for starting servers by hand.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # `from helpers import ...` in any test module
    sys.path.insert(0, str(TESTS_DIR))

from helpers import ServerError, vllm_server as _vllm_server  # noqa: E402

# No test may reach a model hub, nor report usage.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

# Switches that pick the op set and the Triton mode of every engine a test starts: a test module
# that sets one while it is imported would change them for the whole session (checked below).
_SESSION_SWITCHES = ("MIKV_VLLM_OPS", "TRITON_INTERPRET", "MIKV_CPU_ISA", "MIKV_CPU_MALLOC")
_switches_before = {k: os.environ.get(k) for k in _SESSION_SWITCHES}


def pytest_collection_finish(session):
    changed = {k: (v, os.environ.get(k)) for k, v in _switches_before.items() if os.environ.get(k) != v}
    if changed:
        raise pytest.UsageError(f"importing the test modules changed {changed} (before, after): set them "
                                "per test (monkeypatch) or in a subprocess, not at import")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The prepared embedded model (converted once, then cached across runs)."""
    from mikv_vllm.model import MiKVModelError, prepare_model

    try:
        return prepare_model(progress=False)
    except MiKVModelError as e:
        pytest.fail(f"prepare_model failed: {e}", pytrace=False)


@pytest.fixture(scope="module")
def vllm_server(request, model_dir, tmp_path_factory):
    """A `vllm serve` of ``model_dir`` with the test module's ``VLLM_SERVER_ARGS``."""
    extra = list(getattr(request.module, "VLLM_SERVER_ARGS", []))
    log_dir = tmp_path_factory.mktemp("vllm-" + request.module.__name__.rsplit(".", 1)[-1])
    try:
        with _vllm_server(model_dir, *extra, log_dir=log_dir) as server:
            yield server
    except ServerError as e:
        pytest.fail(str(e), pytrace=False)
