#!/usr/bin/env python3
"""Named mutations of MiKV's semantics: each must be killed by the fast tests.

Every mutation injects one bug into *every* path that implements the behaviour (torch
reference, batched decode, Triton kernels), so that tests comparing two implementations
cannot hide it. Each runs in a scratch copy of the repository (the work tree is never
touched) with ``pytest -x`` over the fast suites (``tests/core``, ``tests/kernels`` under
``TRITON_INTERPRET=1``); a mutation survives when that run passes.

    python scripts/mutation.py                 # all; exit 1 if any survives
    python scripts/mutation.py --list
    python scripts/mutation.py --only sinks-not-pinned score-reset-removed
    python scripts/mutation.py --root OTHER_CHECKOUT   # e.g. an older commit, for a before/after
    python scripts/mutation.py --paths mikv_vllm/cpu/mikv_prefill.cpp --tests tests/cpu/test_cpu_prefill.py
                                               # one path's edits only, against its own tests

Not part of CI (about 1-3 min per mutation on 2 cores). ``scripts/mutation.sh`` wraps it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# semantics tests first (pytest -x stops at the first failure; later paths are deduplicated)
TESTS = ["tests/core/test_importance.py", "tests/core/test_selection.py", "tests/core/test_reference.py",
         "tests/core/test_decode_batch.py", "tests/core/test_quant.py", "tests/cpu", "tests/kernels", "tests/core"]

REF = "mikv_vllm/core/reference.py"
IMP = "mikv_vllm/core/importance.py"
QNT = "mikv_vllm/core/quant.py"
BAL = "mikv_vllm/core/balancer.py"
KST = "mikv_vllm/kernels/store.py"
KDE = "mikv_vllm/kernels/decode.py"
CPP = "mikv_vllm/cpu/mikv_decode.cpp"
CPH = "mikv_vllm/cpu/mikv_common.h"
PRE = "mikv_vllm/cpu/mikv_prefill.cpp"


@dataclass(frozen=True)
class Mutation:
    name: str
    why: str
    edits: tuple[tuple[str, str, str], ...]   # (file, exact old text, new text); every occurrence


MUTATIONS = [
    Mutation("score-reset-removed", "a reused block keeps the previous request's scores",
             ((REF, "        views.score[blk, :, off] = 0\n", ""),
              (KST, "        tl.store(score_ptr + blk * sc_sb + h * sc_sh + off, tl.zeros((), score_ptr.dtype.element_ty))\n",
               "        pass\n"),
              (CPP, "      if (L.score_dtype == 0) reinterpret_cast<float*>(reg + L.score)[off] = 0.f;\n"
                    "      else reinterpret_cast<uint16_t*>(reg + L.score)[off] = 0;\n", ""),
              (PRE, "      if (L.score_dtype == 0) reinterpret_cast<float*>(reg + L.score)[off] = 0.f;\n"
                    "      else reinterpret_cast<uint16_t*>(reg + L.score)[off] = 0;\n", ""))),
    Mutation("tag-reset-removed", "a reused block keeps the previous request's hi tags",
             ((REF, "        views.tag[blk[off == 0]] = 0\n", ""),
              (KST, "mask=(ri < R) & (ri + off == ri))", "mask=(ri < R) & (ri + off == ri) & (ri < 0))"),
              (CPP, "      if (off == 0) std::memset(reg + L.tag, 0, R * sizeof(int32_t));\n", ""),
              (PRE, "      if (off == 0) std::memset(reg + L.tag, 0, R * sizeof(int32_t));\n", ""))),
    Mutation("score-off-by-one", "hi maintenance reads each candidate's score one position off",
             ((REF, "scores = all_scores.gather(1, positions.clamp(min=0))",
               "scores = all_scores.gather(1, (positions + 1).clamp(min=0, max=all_scores.shape[1] - 1))"),
              (REF, "scores = all_scores.gather(2, positions.clamp(min=0))",
               "scores = all_scores.gather(2, (positions + 1).clamp(min=0, max=all_scores.shape[2] - 1))"),
              (PRE, ": score_at(pos);", ": score_at(std::min(pos + 1, nb * N - 1));"))),
    Mutation("sinks-not-pinned", "no sink floor: short prompts get no sink at high precision",
             ((IMP, "budget = torch.maximum(by_ratio, sinks) if config.hi_ratio > 0 else by_ratio",
               "budget = by_ratio"),
              (PRE, "  if (s.hi_ratio > 0) b = std::max(b, std::min(length, s.sink_tokens));\n", ""))),
    Mutation("sinks-lose-priority", "sinks rank below the recent window",
             ((IMP, "SINK, RECENT, HEAVY, NOT_A_CANDIDATE = 2, 1, 0, -1",
               "SINK, RECENT, HEAVY, NOT_A_CANDIDATE = 0, 2, 1, -1"),
              (PRE, "constexpr int kSink = 2, kRecent = 1, kHeavy = 0;", "constexpr int kSink = 0, kRecent = 2, kHeavy = 1;"))),
    Mutation("recent-window-off", "the default recent window is empty",
             ((IMP, "    return budget // 2\n", "    return budget * 0\n"),
              (PRE, "sel.recent_window : budget / 2;", "sel.recent_window : budget * 0;"))),
    Mutation("heavy-hitters-inverted", "heavy hitters ranked by lowest accumulated score",
             ((IMP, "torch.where(tier == RECENT, pos.double(), score))",
               "torch.where(tier == RECENT, pos.double(), -score))"),
              (PRE, ": score_at(pos);", ": -score_at(pos);"))),
    Mutation("scores-not-accumulated", "attention mass never reaches the page scores",
             ((REF, "    cur[:, :length] += mass.float()\n", ""),
              (REF, "    cur[:, :, :s] += torch.where(live, mass[:, :, :s].float(), 0.0)\n", ""),
              (KDE, "tl.store(ptr, tl.minimum(cur + mass, top)", "tl.store(ptr, tl.minimum(cur + 0.0 * mass, top)"),
              (CPP, "      if (R) add_score(reg, o, mass);", "      if (R) add_score(reg, o, 0.f);"),
              (PRE, "        for (int64_t j = 0; j < n; ++j) mass[j] += lr[j];", "        for (int64_t j = 0; j < n; ++j) mass[j] += 0.f;"))),
    Mutation("demotion-skipped", "tokens that lose the selection keep their hi tag",
             ((REF, "new_tags = torch.where(keep[:, :num_slots], tags, torch.zeros_like(tags))", "new_tags = tags.clone()"),
              (REF, "new_tags = torch.where(keep[..., :num_slots], tags, torch.zeros_like(tags))", "new_tags = tags.clone()"),
              (PRE, "    if (!keep[s]) tags[s] = 0;\n", "    (void)keep[s];\n"))),
    Mutation("hi-copy-ignored", "attention reads the lo copy of hi tokens",
             ((REF, "hh, slot = torch.nonzero((tags > 0) & (tags <= ctx_len), as_tuple=True)",
               "hh, slot = torch.nonzero((tags < 0), as_tuple=True)"),
              (REF, "bb, hh, ss = torch.nonzero(slot_own & (tags > 0) & (tags <= pos[:, None, None]), as_tuple=True)",
               "bb, hh, ss = torch.nonzero(slot_own & (tags < 0), as_tuple=True)"),
              (KDE, "            is_hi = slot >= 0\n            lo_m = pm & (slot < 0)",
               "            is_hi = slot < -1\n            lo_m = pm"),
              (CPP, "        if (t > 0 && t <= pos) hmap[t - 1] = static_cast<int32_t>(j * R + r);", "        (void)t;"),
              (PRE, "        if (tg > 0 && tg <= ctx) sc.hmap[tg - 1] = static_cast<int32_t>(j * R + r);", "        (void)tg;"))),
    Mutation("hi-cast-unclamped", "hi copies cast to the hi dtype without clamping (inf in fp16)",
             ((QNT, "    return x.float().clamp(-top, top).to(dtype)", "    return x.to(dtype)"),
              (PRE, "std::isnan(x[d]) ? x[d] : std::min(std::max(x[d], -top), top);", "x[d];"))),
    Mutation("balancer-not-undone", "dequantized keys are not divided by the balancer",
             ((BAL, "    return k_hat.float() * (1.0 / b.float())", "    return k_hat.float()"),
              (KDE, "                kx = kx * binv[None, :]\n", "                kx = kx\n"),
              (CPP, "      ql[g * D + d] = qs[g * D + d] / bal[d];", "      ql[g * D + d] = qs[g * D + d];"),
              (PRE, "          for (int64_t d = 0; d < D; ++d) xk[d] *= binv[d];\n", ""))),
    Mutation("balancer-wrong-gqa-group", "query heads grouped to the wrong KV head",
             ((BAL, "q.float().abs().reshape(*lead, t, hkv, hq // hkv, d).amax(dim=(-4, -2))",
               "q.float().abs().reshape(*lead, t, hq // hkv, hkv, d).amax(dim=(-4, -3))"),
              (PRE, "std::fabs(q[t * q_stride + g * D + d]);", "std::fabs(q[t * q_stride + (g * H + h - h * G) * D + d]);"))),
    Mutation("quant-truncates", "codes truncated instead of rounded to nearest",
             ((QNT, "codes = torch.floor(t + 0.5).clamp_(0, qmax)", "codes = torch.floor(t).clamp_(0, qmax)"),
              (KST, "tl.floor(t + 0.5)", "tl.floor(t)"),
              (CPH, "      float c = std::floor(t + 0.5f);", "      float c = std::floor(t);"))),
    Mutation("window-scorer-votes-all", "the window scorer counts every query row",
             ((REF, "        return max(0, num_rows - config.obs_window)\n", "        return 0\n"),
              (PRE, "? std::max<int64_t>(0, T - sel.obs_window) : 0;", "? 0 : 0;"))),
    Mutation("evicted-tokens-attended", "h2o: tokens outside the hi set still get attention weight",
             ((REF, "        logits = torch.einsum(\"hgtd,hsd->hgts\", qh[:, :, i0:i1], keys[:, :e])\n",
               "        logits = torch.einsum(\"hgtd,hsd->hgts\", qh[:, :, i0:i1], keys[:, :e])\n        key_ok = torch.ones_like(key_ok)\n"),
              (REF, "        if not all_valid:   # evicted tokens", "        if False:   # evicted tokens"),
              (KDE, "            ok = is_hi\n", "            ok = pm\n"),
              (CPP, "        for (int64_t g = 0; g < G; ++g) lg[g * S + t] = NEG_INF;", "        for (int64_t g = 0; g < G; ++g) lg[g * S + t] = 0.f;"),
              (PRE, "          ok[kk] = 0;   // evicted: weight exactly 0", "          ok[kk] = 1;"))),
]


def apply(mutation: Mutation, root: Path, paths: list[str] | None = None) -> list[str]:
    """Apply every edit of ``mutation`` (on ``paths`` only, if given) under ``root``; return the edits
    that found no match."""
    missing = []
    for rel, old, new in mutation.edits:
        if paths and rel not in paths:
            continue
        path = root / rel
        text = path.read_text() if path.exists() else ""
        if old not in text:
            missing.append(f"{rel}: {old.strip()[:60]!r}")
            continue
        path.write_text(text.replace(old, new))
    return missing


def run_tests(root: Path, timeout: int, tests: list[str] | None = None) -> tuple[bool, str, float]:
    env = dict(os.environ, PYTHONPATH=str(root), TRITON_INTERPRET="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    tests = [t for t in (tests or TESTS) if (root / t).exists()]   # an older checkout may lack some files
    cmd = [sys.executable, "-m", "pytest", *tests, "-x", "-q", "-p", "no:cacheprovider", "-m", "not engine",
           "--timeout", str(timeout)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    failed = re.findall(r"^FAILED (\S+)", out, flags=re.M) or re.findall(r"^ERROR (\S+)", out, flags=re.M)
    return proc.returncode == 0, (failed[0] if failed else out.strip().splitlines()[-1] if out.strip() else ""), \
        time.monotonic() - t0


def scratch_copy(src: Path) -> Path:
    dst = Path(tempfile.mkdtemp(prefix="mikv-mutation-"))
    for name in ("mikv_vllm", "tests", "benchmarks"):
        shutil.copytree(src / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(src / "pyproject.toml", dst / "pyproject.toml")
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="mutation names to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout to mutate (default: this one)")
    ap.add_argument("--timeout", type=int, default=900, help="pytest-timeout per test (s)")
    ap.add_argument("--paths", nargs="*", help="apply only the edits on these files (e.g. one implementation)")
    ap.add_argument("--tests", nargs="*", help="test paths to run instead of the fast suites")
    ap.add_argument("--skip-baseline", action="store_true",
                    help="skip the unmutated run (only when those tests were just seen passing on this tree)")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if (not args.only or m.name in args.only)
              and (not args.paths or any(rel in args.paths for rel, _, _ in m.edits))]
    if args.only and not args.paths and len(chosen) != len(set(args.only)):
        unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
        ap.error(f"unknown mutation(s): {unknown}")
    if args.list:
        for m in chosen:
            print(f"{m.name:28s} {m.why}")
        return 0
    root = args.root.resolve()
    base = scratch_copy(root)
    try:
        ok, detail, secs = (True, "", 0.0) if args.skip_baseline else run_tests(base, args.timeout, args.tests)
        print(f"baseline (no mutation): {'skipped' if args.skip_baseline else 'pass' if ok else 'FAIL'} in {secs:.0f} s",
              flush=True)
        if not ok:
            print(f"error: the unmutated tests fail ({detail}); fix them first", file=sys.stderr)
            return 2
        results = []
        for m in chosen:
            work = scratch_copy(root)
            try:
                missing = apply(m, work, args.paths)
                if len(missing) == sum(not args.paths or rel in args.paths for rel, _, _ in m.edits):
                    status, detail, secs = "n/a", "code to mutate not found: " + "; ".join(missing), 0.0
                else:
                    survived, detail, secs = run_tests(work, args.timeout, args.tests)
                    status = "SURVIVED" if survived else "killed"
                    if missing:
                        detail += f"  (partial: {len(missing)} edit(s) found nothing)"
            finally:
                shutil.rmtree(work, ignore_errors=True)
            results.append((m, status))
            print(f"{status:9s} {m.name:28s} {secs:5.0f} s  {detail}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    applicable = [r for r in results if r[1] != "n/a"]
    killed = sum(r[1] == "killed" for r in applicable)
    print(f"\nkilled {killed} of {len(applicable)} applicable mutations"
          + (f" ({len(results) - len(applicable)} not applicable)" if len(applicable) < len(results) else ""))
    survivors = [m.name for m, s in results if s == "SURVIVED"]
    if survivors:
        print("survived: " + ", ".join(survivors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
