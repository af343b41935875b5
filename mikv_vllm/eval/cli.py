"""``mikv-vllm eval`` and ``mikv-vllm tune`` (argument parsers import only argparse).

eval: run a suite of engine configs over the quality workload, write
``summary.json``, ``results.md`` and ``quality.png`` into ``--out``.
tune: a reduced sweep on the user's model that prints (and writes) the best
preset YAML for a byte budget.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from ..errors import CLIError

SUITES = ("sweep", "frontier", "ablations", "full", "smoke", "screen")
DEFAULT_OUT = "results/quality"
# the committed screen whose near-frontier configs make the frontier suite (docs/quality.md)
DEFAULT_SCREEN = Path(__file__).resolve().parents[2] / "docs" / "results" / "screen" / "summary.json"

# --quick: small and fast (minutes), for checking a setup, not for conclusions.
QUICK_WORKLOAD = dict(passkey_lengths=(512,), passkey_trials=8, needle_length=512, needle_depths=(0.25, 0.75),
                      needle_trials=2, ppl_windows=1, ppl_length=512, ppl_chunk=128, agree_prompts=2,
                      agree_prompt_len=128, agree_tokens=32, decode_windows=1)
# --suite screen (page-format screening grid, 100 engines): the PPL probe and short passkeys only.
SCREEN_WORKLOAD = dict(passkey_lengths=(1024,), passkey_trials=8, needle_depths=(), needle_trials=0,
                       ppl_windows=2, ppl_length=1024, ppl_chunk=16, agree_prompts=0, decode_windows=2)
SCREEN_QUICK_WORKLOAD = dict(passkey_lengths=(512,), passkey_trials=4, needle_depths=(), needle_trials=0,
                             ppl_windows=1, ppl_length=512, ppl_chunk=16, agree_prompts=0, decode_windows=1)
TUNE_WORKLOAD = dict(passkey_lengths=(512, 1024), passkey_trials=8, needle_length=1024, needle_depths=(),
                     needle_trials=0, ppl_windows=1, ppl_length=1024, ppl_chunk=16, agree_prompts=0, decode_windows=1)
TUNE_QUICK_WORKLOAD = dict(passkey_lengths=(512,), passkey_trials=6, needle_depths=(), needle_trials=0,
                           ppl_windows=1, ppl_length=512, ppl_chunk=128, agree_prompts=0, decode_windows=1)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.replace(",", " ").split())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.replace(",", " ").split())


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2-135M-Instruct, "
                   "prepared on first use)")
    p.add_argument("--out", default=None, help="results directory (default: %s-<suite>)" % DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="small workload (minutes): setup check, not conclusions")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30,
                   help="KV memory of every engine, so capacities compare (default: 1 GiB)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--jobs", type=int, default=1, help="engines run in parallel (default 1; each uses 1 core)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per engine (default: vLLM's choice)")
    p.add_argument("--fresh", action="store_true", help="rerun configs already measured with the same workload")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("workload overrides")
    g.add_argument("--lengths", type=_ints, default=None, help="passkey prompt lengths, e.g. 512,1024,2048")
    g.add_argument("--trials", type=int, default=None, help="passkey trials per length")
    g.add_argument("--needle-length", type=int, default=None)
    g.add_argument("--needle-depths", type=_floats, default=None, help="e.g. 0.1,0.5,0.9 (empty string: none)")
    g.add_argument("--needle-trials", type=int, default=None, help="needle trials per depth")
    g.add_argument("--ppl-windows", type=int, default=None)
    g.add_argument("--ppl-length", type=int, default=None)
    g.add_argument("--ppl-chunk", type=int, default=None, help="prefill chunk of the PPL probe (default 16; --quick: 128)")
    g.add_argument("--decode-windows", type=int, default=None,
                   help="decode perplexity: windows (of --ppl-length) whose prefix is prefilled whole and the rest "
                        "forced through decode steps (default 2; 0: off)")
    g.add_argument("--decode-prefix", type=float, default=None, help="share of a decode window prefilled (default 0.75)")
    g.add_argument("--agree-prompts", type=int, default=None)
    g.add_argument("--agree-prompt-len", type=int, default=None)
    g.add_argument("--agree-tokens", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", choices=SUITES, default=None,
                   help="sweep: policies x ~20/25/33/50%% cache (default); frontier: the near-frontier configs of a screen + baselines; "
                        "ablations: knobs of mikv-paper; full: all three; smoke: mikv-paper vs equal-bytes h2o "
                        "vs rtn (default with --quick); screen: page formats (lo bits x r x group x hi dtype x "
                        "rotation, rtn, h2o) on a reduced workload (PPL probe + 1024-token passkeys; --quick: "
                        "smaller), the workload flags override it")
    p.add_argument("--configs", default=None,
                   help="instead of a suite: comma-separated presets (or 'stock'); stock is always added")
    p.add_argument("--targets", type=_floats, default=None, help="sweep targets (fractions of a 16-bit cache)")
    p.add_argument("--screen", default=None, help="frontier: the screen summary.json to pick configs from "
                   "(default: docs/results/screen/summary.json)")
    p.add_argument("--reuse", default=None, help="comma-separated summary.json files of earlier runs: configs they "
                   "measured with the same workload, model and KV memory are carried into this report instead of "
                   "run again (stock always runs; the carried ratios are taken against it)")
    _common_args(p)


def add_tune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", type=float, required=True,
                   help="KV bytes budget as a fraction of a 16-bit cache (e.g. 0.30)")
    p.add_argument("--write", default=None, help="also write the preset YAML here (default: OUT/tuned.yaml)")
    _common_args(p)


# ------------------------------------------------------------------ helpers
def _workload(args, base: dict | None = None):
    from .workload import Workload

    w = Workload(**(base or {}))
    if args.quick and base is None:
        w = Workload(**QUICK_WORKLOAD)
    over = {"passkey_lengths": args.lengths, "passkey_trials": args.trials, "needle_length": args.needle_length,
            "needle_depths": args.needle_depths, "needle_trials": args.needle_trials,
            "ppl_windows": args.ppl_windows, "ppl_length": args.ppl_length, "ppl_chunk": args.ppl_chunk,
            "agree_prompts": args.agree_prompts, "agree_prompt_len": args.agree_prompt_len,
            "agree_tokens": args.agree_tokens, "seed": args.seed, "decode_windows": args.decode_windows,
            "decode_prefix": args.decode_prefix}
    try:
        return w.replace(**{k: v for k, v in over.items() if v is not None})
    except ValueError as exc:
        raise CLIError(f"workload: {exc}") from None


def _model(args) -> str:
    if args.model:
        path = Path(args.model).expanduser()
        if not (path / "config.json").exists():
            raise CLIError(f"--model {args.model}: no config.json there (a Hugging Face model directory is needed)")
        return str(path.resolve())
    from ..model import prepare_model

    return str(prepare_model(progress=not args.no_progress))


def _settings(args, model: str):
    from .runner import EngineSettings

    return EngineSettings(model=model, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                          max_model_len=args.max_model_len, threads=args.threads)


def _model_shape(model: str) -> tuple[int, int]:
    """(head_dim, block_size) of ``model`` on this platform, without starting an engine."""
    import json

    with open(Path(model) / "config.json", encoding="utf-8") as fh:
        cfg = json.load(fh)
    cfg = cfg.get("text_config", cfg)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return int(head_dim), _block_size()


def _block_size() -> int:
    try:
        import torch

        return 16 if torch.cuda.is_available() else 128  # vLLM defaults (CPU: 128)
    except ImportError:
        return 128


def screen_rows(path: str | os.PathLike | None = None) -> list[dict]:
    """Rows of a screen run's ``summary.json`` (default: the committed one, :data:`DEFAULT_SCREEN`)."""
    path = Path(path or DEFAULT_SCREEN)
    try:
        doc = json.loads(path.read_text())
        return doc["summary"]["rows"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CLIError(f"--suite frontier picks its configs from a screen's summary.json: cannot read {path} "
                       f"({exc}); run `mikv-vllm eval --suite screen` and pass --screen OUT/summary.json") from None


def suite_configs(suite: str, head_dim: int, block_size: int, targets=None, screen=None):
    from . import configs as C
    from . import frontier as F

    stock = C.EvalConfig.stock(("reference",))
    if suite == "smoke":
        return C.dedupe([stock, *smoke_configs(head_dim, block_size)])
    if suite == "screen":
        return C.dedupe([stock, *C.screen_configs(head_dim, block_size)])
    sweep = C.sweep_configs(head_dim, block_size, targets or C.DEFAULT_TARGETS, prefer=C.frontier_configs())
    if suite == "sweep":
        return C.dedupe([stock, *sweep])
    if suite == "frontier":
        from .report import headline_rows

        rows = screen_rows(screen)
        return C.dedupe([stock, *F.frontier_configs_from_screen(rows, head_dim, block_size,
                                                                headline=headline_rows(rows, head_dim))])
    if suite == "ablations":
        return C.dedupe([stock, *C.ablation_configs()])
    # full, in the order that makes a partial run most useful (results are cached per config and the
    # report is rewritten after each one): the cheap half of the frontier (it decides the default),
    # mikv-paper and its two main ablations, the rest of the frontier, the other ablations, then the
    # sweep's remaining cells. Configs shared between parts run once (dedupe unites their groups).
    frontier = sorted(C.frontier_configs(), key=lambda c: C.cache_cost(c, head_dim, block_size).bytes_per_token)
    cheap = [c for c in frontier if C.cache_cost(c, head_dim, block_size).fraction_of_fp16 <= 0.33]
    rest = [c for c in frontier if c not in cheap]
    abl = C.ablation_configs()
    return C.dedupe([stock, *cheap, *abl[:3], *rest, *abl[3:], *sweep])


def smoke_configs(head_dim: int, block_size: int):
    from . import configs as C
    from ..config import preset

    paper = preset("mikv-paper")
    h2o = C.equal_bytes_h2o(paper, head_dim, block_size)
    return [C.EvalConfig.from_mikv(paper, groups=("smoke",)),
            C.EvalConfig.from_mikv(h2o, label=f"{h2o.name} (equal bytes)", groups=("smoke",)),
            C.EvalConfig.from_mikv(preset("rtn"), groups=("smoke",))]


def _meta(args, model: str, workload, t0: float) -> dict:
    from .data import prose_corpus

    return {"model": model, "workload": workload.to_dict(), "corpus": prose_corpus().to_dict(),
            "runtime_s": time.time() - t0, "command": "mikv-vllm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
            if os.path.basename(sys.argv[0]).startswith("mikv") else " ".join(shlex.quote(a) for a in sys.argv),
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "jobs": args.jobs}


# ------------------------------------------------------------------ eval
def run_eval(args: argparse.Namespace) -> int:
    from . import configs as C
    from .report import write_report
    from .runner import run_configs

    t0 = time.time()
    suite = args.suite or ("smoke" if args.quick else "sweep")
    model = _model(args)
    head_dim, block_size = _model_shape(model)
    if args.configs:
        cfgs = C.dedupe([C.EvalConfig.stock(("reference",))]
                        + [C.EvalConfig.parse(x.strip()) for x in args.configs.split(",") if x.strip()])
        suite = "custom"
    else:
        cfgs = suite_configs(suite, head_dim, block_size, args.targets, args.screen)
    workload = _workload(args, (SCREEN_QUICK_WORKLOAD if args.quick else SCREEN_WORKLOAD)
                         if suite == "screen" else None)
    out = Path(args.out or f"{DEFAULT_OUT}-{suite}{'-quick' if args.quick else ''}")
    settings = _settings(args, model)
    carried: list[dict] = []
    if args.reuse:
        from .reuse import reuse_rows

        cfgs, carried = reuse_rows([p.strip() for p in args.reuse.split(",") if p.strip()], cfgs,
                                   workload.to_dict(), model, settings.kv_cache_memory_bytes)
        print(f"[eval] {len(carried)} configs reused from {args.reuse}", file=sys.stderr)
    print(f"[eval] {len(cfgs)} engines ({suite}), {workload.num_requests()} requests each -> {out}", file=sys.stderr)
    done: list[dict] = []

    def partial(res: dict) -> None:  # keep the report current while a long sweep runs
        done.append(res)
        try:
            write_report(done, out, _meta(args, model, workload, t0) | {"partial": True}, carried=carried)
        except Exception as e:  # noqa: BLE001 - the final report below is what counts
            print(f"[eval] partial report failed: {e!r}", file=sys.stderr)

    results = run_configs(cfgs, workload, settings, out, jobs=args.jobs, fresh=args.fresh,
                          progress=not args.no_progress, desc=f"eval {suite}", on_result=partial)
    summary = write_report(results, out, _meta(args, model, workload, t0), carried=carried)
    print(summary["markdown"])
    print(f"\n[eval] wrote {out / 'summary.json'}, {out / 'results.md'}"
          + (f", {summary['plot']}" if summary.get("plot") else "") + f" in {(time.time() - t0) / 60:.1f} min",
          file=sys.stderr)
    return 0 if len(results) == len(cfgs) else 1


# ------------------------------------------------------------------ tune
# tune: per family, the page formats that led the measured frontier (docs/quality.md); each gets the
# most bytes the budget allows (mikv: the largest hi ratio in whole slots per block)
# keyed by (k_bits, v_bits): keys and values at their own widths are searched too; K4/V3 in the default's
# format (fp8 scales), K4/V2 rotated with fp8 scales (the frontier's best at <= 64 B)
TUNE_MIKV_FORMATS = {(4, 4): dict(group_size=64, hi_dtype="float8_e4m3fn"),
                     (4, 3): dict(group_size=64, hi_dtype="float8_e4m3fn", group_meta="fp8-scale"),
                     (4, 2): dict(group_size=64, hi_dtype="float8_e4m3fn", group_meta="fp8-scale", rotation=True),
                     (3, 3): dict(group_size=64, hi_dtype="float8_e4m3fn", rotation=True, balancer=False),
                     (2, 2): dict(group_size=64, hi_dtype="float8_e4m3fn", rotation=True)}
TUNE_RTN_FORMATS = (dict(group_size=32, rotation=True), dict(group_size=64, rotation=True))
# uniform widths searched for rtn: (k_bits, v_bits), keys never below values
TUNE_RTN_BITS = ((2, 2), (3, 2), (3, 3), (4, 2), (4, 3), (4, 4), (8, 4), (8, 8))


def tune_candidates(budget: float, head_dim: int, block_size: int):
    """Per family the largest config of its page format that fits ``budget`` (fraction of a 16-bit
    cache): mikv INT2 / 3 / 4 and K4/V3, K4/V2 (:data:`TUNE_MIKV_FORMATS`), uniform rtn
    (:data:`TUNE_RTN_FORMATS`, the most bytes of :data:`TUNE_RTN_BITS` that fit), h2o with fp8 copies."""
    from . import configs as C
    from ..config import rotation_supported
    from ..core.layout import dense_bytes_per_token

    limit = budget * dense_bytes_per_token(head_dim, 2)
    out = []

    def best(cands):
        fit = []
        for c in cands:
            if c.rotation and not rotation_supported(head_dim):
                continue            # would run unrotated: the unrotated candidate is another row
            try:
                fit.append((C.bytes_of(c, head_dim, block_size), c))
            except ValueError:      # a format this head_dim cannot take (group, rotation)
                continue
        fit = [fc for fc in fit if fc[0] <= limit + 1e-9]
        return max(fit, key=lambda fc: fc[0])[1] if fit else None

    def add(c, family):
        if c is not None:
            fmt = C.format_label(c, head_dim)
            c = c.replace(name=f"{c.name}-{fmt}" if fmt else c.name)
            out.append(C.EvalConfig.from_mikv(c, family=family, groups=("tune",)))

    def usable(fmt: dict) -> dict:
        """``fmt`` where ``head_dim`` allows it, else without the group size and rotation it cannot take
        (default group head_dim / 2; the balancer back on)."""
        try:
            C.rtn_config(4, **{k: v for k, v in fmt.items() if k in ("group_size", "rotation")}).validate(head_dim)
            if fmt.get("rotation") and not rotation_supported(head_dim):
                raise ValueError("rotation needs a power-of-two head_dim")
            return fmt
        except ValueError:
            return {**{k: v for k, v in fmt.items() if k not in ("group_size", "rotation")}, "balancer": True}

    steps = [round(k / block_size, 6) for k in range(1, block_size + 1)]
    for (kb, vb), fmt in TUNE_MIKV_FORMATS.items():
        c = best([C.mikv_config(kb, r, v_bits=vb, **usable(fmt)) for r in steps])
        add(c, f"mikv {C.family_bits(c)}" if c is not None else "")
    for fmt in TUNE_RTN_FORMATS:
        rtn = {k: v for k, v in usable(fmt).items() if k != "balancer"}
        add(best([C.rtn_config(kb, v_bits=vb, name=f"rtn-{C.bits_name(kb, vb)}", **rtn) for kb, vb in TUNE_RTN_BITS]), "rtn")
    add(best([C.h2o_config(r, hi_dtype="float8_e4m3fn") for r in steps]), "h2o")
    return C.dedupe(out)


def run_tune(args: argparse.Namespace) -> int:
    from . import configs as C
    from .report import best_under_budget, markdown_table, to_yaml, write_report
    from .runner import run_configs
    from .workload import Workload

    if not 0 < args.budget < 2:
        raise CLIError(f"--budget {args.budget}: give a fraction of a 16-bit cache, e.g. 0.30")
    t0 = time.time()
    model = _model(args)
    head_dim, block_size = _model_shape(model)
    base = TUNE_QUICK_WORKLOAD if args.quick else TUNE_WORKLOAD
    workload = _workload(args, base=dict(base))
    cands = tune_candidates(args.budget, head_dim, block_size)
    if not cands:
        raise CLIError(f"no MiKV/RTN/H2O layout fits {args.budget:.0%} of a 16-bit cache at head_dim {head_dim}")
    cfgs = C.dedupe([C.EvalConfig.stock(("reference",)), *cands])
    out = Path(args.out or f"results/tune-{Path(model).name}-{int(round(args.budget * 100))}")
    print(f"[tune] budget {args.budget:.0%} of fp16 = {args.budget * 4 * head_dim:.0f} B/token/head; "
          f"{len(cands)} candidates + full cache -> {out}", file=sys.stderr)
    results = run_configs(cfgs, workload, _settings(args, model), out, jobs=args.jobs, fresh=args.fresh,
                          progress=not args.no_progress, desc=f"tune {args.budget:.0%}")
    summary = write_report(results, out, _meta(args, model, workload, t0), with_pick=False)
    pick = best_under_budget(summary, args.budget)
    stock = [r for r in summary["rows"] if r["policy"] == "stock"]
    print(markdown_table(summary, stock + pick["ranked"]))
    best = pick["ranked"][0] if pick["ranked"] else None
    if best is None:
        raise CLIError("no candidate finished")
    name = f"tuned-{int(round(args.budget * 100))}"
    yaml_text = (f"# mikv-vllm tune --budget {args.budget}: {best['label']}, {best['bytes_per_token_per_head']:.0f} "
                 f"B/token/head ({100 * best['fraction_of_fp16']:.1f} % of fp16)\n# passkey {best['passkey_correct']}/"
                 f"{best['passkey_trials']} (full cache {stock[0]['passkey_correct'] if stock else '?'}/"
                 f"{stock[0]['passkey_trials'] if stock else '?'}), PPL ratio "
                 f"{best['ppl_ratio'] if best['ppl_ratio'] is None else round(best['ppl_ratio'], 4)}; "
                 f"{'meets' if best['passes'] else 'does NOT meet'} the default rule\n"
                 + to_yaml(best["config"], name=name))
    target = Path(args.write) if args.write else out / "tuned.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml_text)
    print("\n" + yaml_text)
    print(f"[tune] wrote {target} ({(time.time() - t0) / 60:.1f} min); use: --mikv-config {target}", file=sys.stderr)
    return 0
