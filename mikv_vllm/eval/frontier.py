"""The frontier suite from a screen run: near-frontier candidates, baselines, the shipped presets.
Re-exported by :mod:`.configs`. Framework-free (no vllm import)."""

from __future__ import annotations

from typing import Sequence

from ..config import MiKVConfig, preset, rotation_supported
from .configs import (FRONTIER_H2O_RATIOS, EvalConfig, _r_label, bytes_of, dedupe, h2o_config, mikv_config,
                      rtn_config)

SCREEN_NOISE = (0.8, 0.003)   # a PPL excess (ratio - 1) beaten only below 0.8 x it - 0.003: the screen's noise
SCREEN_MAX_BYTES = 96          # screened candidates up to the bytes of the previous default (INT3 r 0.1)
SCREEN_MAX_PPL = 1.2           # screened rows above this PPL ratio (the bar is 1.03) cannot decide anything
# the frontier's baselines: uniform INT3 / INT4 rotated with each group (vLLM's int4_per_token_head is
# rotated INT4), plus plain INT4 in groups of 32 (the earlier reports' "uniform INT4"); H2O with fp8
# slots (the screen measured the same quality as fp16 slots at half the bytes)
FRONTIER_RTN = ((3, 64, True), (3, 32, True), (4, 64, True), (4, 32, True), (4, 32, False))
# uniform keys and values at their own widths (issue 26): (k_bits, v_bits, group, rotation)
FRONTIER_RTN_SPLIT = ((4, 3, 64, True), (4, 2, 64, True))


def _beats(s: dict, r: dict, noise: tuple[float, float] = SCREEN_NOISE) -> bool:
    """Screen row ``s`` has no more bytes, at least ``r``'s passkeys, and a PPL excess (ratio - 1)
    clearly below ``r``'s (``< factor * excess - slack``), or the same PPL at fewer bytes."""
    if s["bytes_per_token_per_head"] > r["bytes_per_token_per_head"] or s["passkey_correct"] < r["passkey_correct"]:
        return False
    ps, pr = s.get("ppl_ratio"), r.get("ppl_ratio")
    if ps is None or pr is None:
        return False
    factor, slack = noise
    if ps - 1 < factor * (pr - 1) - slack:
        return True
    return ps <= pr and s["bytes_per_token_per_head"] < r["bytes_per_token_per_head"]


def frontier_candidates(rows: Sequence[dict], max_bytes: float = SCREEN_MAX_BYTES,
                        max_ppl: float = SCREEN_MAX_PPL) -> list[dict]:
    """Rows of a screen summary (``summary.json``'s ``summary.rows``) near their policy's frontier: at most
    ``max_bytes``, a PPL ratio of at most ``max_ppl`` and no row of the same policy beats them
    (:func:`_beats`). Stock and ablations are left out."""
    rows = [r for r in rows if r["policy"] in ("mikv", "rtn", "h2o") and not r.get("ablation")
            and r["bytes_per_token_per_head"] <= max_bytes]
    near = [r for r in rows if not any(s is not r and s["policy"] == r["policy"] and _beats(s, r) for s in rows)]
    return [r for r in near if r.get("ppl_ratio") is not None and r["ppl_ratio"] <= max_ppl]


def frontier_configs_from_screen(rows: Sequence[dict], head_dim: int, block_size: int,
                                 headline: Sequence[dict] = ()) -> list[EvalConfig]:
    """The frontier suite: the screen's near-frontier configs (:func:`frontier_candidates`), the screen
    rows in ``headline`` (the best of each family at the headline budgets, whatever their PPL: the
    paper's 80 %-compression point is reported even where it collapses), the baselines
    (:data:`FRONTIER_RTN`, H2O r 0.2 / 0.3 / 0.4 with fp8 slots), the points of the paper grid cut from the last full run (INT3 / INT4 r 0.2), the shipped ``mikv`` preset and
    ``mikv-paper``; cheapest real bytes first."""
    picked = [EvalConfig.from_mikv(MiKVConfig(**r["config"]), label=r["label"], family=r["family"],
                                   groups=("frontier", "screened"))
              for r in [*frontier_candidates(rows), *headline]]
    base = [EvalConfig.from_mikv(rtn_config(b, name=f"rtn-int{b}-g{g}{'-rot' if rot else ''}", group_size=g,
                                            rotation=rot), family="rtn", groups=("frontier", "baseline"))
            for b, g, rot in FRONTIER_RTN if head_dim % g == 0]
    base += [EvalConfig.from_mikv(rtn_config(kb, v_bits=vb, name=f"rtn-k{kb}v{vb}-g{g}{'-rot' if rot else ''}",
                                             group_size=g, rotation=rot), family="rtn", groups=("frontier", "baseline"))
             for kb, vb, g, rot in FRONTIER_RTN_SPLIT if head_dim % g == 0 and (rotation_supported(head_dim) or not rot)]
    base += [EvalConfig.from_mikv(h2o_config(r, name=f"h2o-r{_r_label(r)}-fp8", hi_dtype="float8_e4m3fn"),
                                  groups=("frontier", "baseline"))
             for r in FRONTIER_H2O_RATIOS]
    base += [EvalConfig.from_mikv(mikv_config(b, 0.2), groups=("frontier", "grid")) for b in (3, 4)]
    base += [EvalConfig.from_mikv(preset("mikv").replace(name="mikv (shipped)"), groups=("frontier", "preset")),
             EvalConfig.from_mikv(preset("mikv-paper"), groups=("frontier", "preset"))]
    out = dedupe([*picked, *base])
    out.sort(key=lambda e: bytes_of(e.config(), head_dim, block_size))
    return out
