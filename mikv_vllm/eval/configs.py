"""What the quality benchmark evaluates: engine configurations and their bytes.

An :class:`EvalConfig` is one engine: ``stock`` (vLLM's own full cache) or a
MiKV policy with a complete :class:`~mikv_vllm.config.MiKVConfig`. Its cache
cost is the *actual* page layout (``RegionLayout.content_bytes``, bookkeeping
and padding included) at the engine's block size, reported as bytes per token
per KV head and as a fraction of a 16-bit dense cache (``4 * head_dim`` B).

Grids (all deduplicated by the effective config, so a config shared by the
sweep, the frontier and the ablations runs once):

* :func:`sweep_configs` - each policy at ~20/25/33/50 % of a 16-bit cache,
  solved on the real layout (hi ratio in steps of one hi slot per block for
  ``mikv``/``h2o``, lo bits for ``rtn``); cells a policy cannot reach are skipped.
* :func:`frontier_configs` - lo bits x r grid plus H2O ratios.
* :func:`ablation_configs` - one-knob changes of ``mikv-paper``.
* :func:`screen_configs` - page formats (issue 14): lo bits x r x quant group x hi dtype x
  rotation, RTN with the same group / rotation options, keys and values at their own widths
  (issue 26: K4/V3, K4/V2 as uniform RTN and lean mikv rows), H2O ratios (a screening grid, run
  with a reduced workload).

Framework-free (no vllm import).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ..config import MiKVConfig, merge_settings, preset, rotation_supported
from ..core.layout import RegionLayout, dense_bytes_per_token, paper_cache_fraction

STOCK = "stock"
DEFAULT_TARGETS = (0.20, 0.25, 0.33, 0.50)
FRONTIER_LO_BITS = (2, 3, 4)
FRONTIER_RATIOS = (0.0, 0.05, 0.1, 0.2)
FRONTIER_H2O_RATIOS = (0.2, 0.3, 0.4)
SCREEN_LO_BITS = (2, 3, 4)
SCREEN_RATIOS = (0.0, 0.05, 0.1)          # r = 0: the paper's RTN (no balancer, no hi tier)
SCREEN_GROUPS = (32, 64)
SCREEN_HI_DTYPES = ("float16", "float8_e4m3fn")
SCREEN_ROTATION = (False, True)
# Rotated mikv rows also run without the balancer: in the engine's PPL probe, INT3 r 0.05 group 64
# fp8 + rotation measured 1.070 with the balancer and 1.048 without (its 16-token estimate on
# rotated channels hurts); unrotated rows keep it (the paper's setting).
SCREEN_ROTATED_BALANCER = (True, False)
SCREEN_H2O_RATIOS = (0.2, 0.3, 0.4)
# Lean rows: a hi tier of 4 slots per 128-token block (r = 0.03) on the leanest lo format (one group
# per head vector, fp8 hi copies), each lo bits and rotation setting: the small-r end that a
# per-slot score makes cheap (a few bytes on top of the uniform page).
SCREEN_LEAN = ((0.03, 64, "float8_e4m3fn"),)
# Keys and values at their own widths (issue 26): (k_bits, v_bits) pairs screened as uniform rtn in
# groups of 64 (rotated and not) and on the lean mikv rows (r 0.03, g64, fp8; each rotation and
# balancer setting). A fake-quant simulation put values at 3 bits almost free, at 2 bits not.
SCREEN_SPLIT = ((4, 3), (4, 2))
# group metadata of the split lean mikv rows: two fp16 (4 B a group) and the fp8 scale + int8 zero (3 B)
SCREEN_SPLIT_META = ("fp16", "fp8-scale")
SCREEN_SPLIT_RTN_GROUP = 64
# A sweep cell is dropped when the closest reachable size is further than this
# (relative) from the target: e.g. mikv cannot go below its rtn floor.
TARGET_TOLERANCE = 0.15


@dataclass(frozen=True)
class EvalConfig:
    """One engine configuration of the benchmark."""

    label: str
    policy: str                       # "stock" | "mikv" | "rtn" | "h2o"
    mikv: dict[str, Any] | None = None  # full MiKVConfig fields (None for stock)
    family: str = ""                  # plot line, e.g. "mikv INT2", "rtn", "h2o"
    groups: tuple[str, ...] = ()      # "sweep", "frontier", "ablation", "smoke", ...
    target: float | None = None       # sweep target fraction of a 16-bit cache
    ablation: str | None = None       # ablation knob description

    # ----------------------------------------------------------------- build
    @classmethod
    def stock(cls, groups: Sequence[str] = ()) -> "EvalConfig":
        return cls(label=STOCK, policy=STOCK, mikv=None, family=STOCK, groups=tuple(groups))

    @classmethod
    def from_mikv(cls, config: MiKVConfig, label: str | None = None, family: str | None = None,
                  groups: Sequence[str] = (), target: float | None = None,
                  ablation: str | None = None) -> "EvalConfig":
        values = config.to_dict()
        return cls(label=label or config.name, policy=config.policy, mikv=values,
                   family=family or default_family(config), groups=tuple(groups), target=target,
                   ablation=ablation)

    @classmethod
    def parse(cls, text: str, groups: Sequence[str] = ("custom",)) -> "EvalConfig":
        """``stock``, a preset name, inline JSON or a YAML path (as ``--mikv-config``)."""
        if text.strip() == STOCK:
            return cls.stock(groups)
        config = MiKVConfig.parse(text)
        return cls.from_mikv(config, groups=groups)

    # --------------------------------------------------------------- derived
    @property
    def is_stock(self) -> bool:
        return self.policy == STOCK

    def config(self) -> MiKVConfig | None:
        return None if self.mikv is None else MiKVConfig(**self.mikv)

    def additional_config(self) -> dict[str, Any] | None:
        """vLLM ``additional_config`` for this engine (None = stock vLLM)."""
        if self.is_stock:
            return None
        return {"kv_cache_policy": self.policy, "mikv": dict(self.mikv)}

    def key(self) -> str:
        """Identity of the engine (label and bookkeeping fields excluded). Fields a stored result
        predates take their defaults (a cached run without ``rotation`` is a rotation-off run)."""
        return STOCK if self.is_stock else engine_key(self.mikv)

    def slug(self) -> str:
        """File-name-safe label."""
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in self.label)

    def merged(self, other: "EvalConfig") -> "EvalConfig":
        """Same engine, groups united (first label wins; target/ablation kept if set)."""
        groups = tuple(dict.fromkeys(self.groups + other.groups))
        return dataclasses.replace(self, groups=groups, target=self.target if self.target is not None
                                   else other.target, ablation=self.ablation or other.ablation)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["groups"] = list(self.groups)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalConfig":
        d = dict(d)
        d["groups"] = tuple(d.get("groups", ()))
        return cls(**d)


def engine_key(mikv: dict[str, Any]) -> str:
    """:meth:`EvalConfig.key` of a MiKV config's fields (a report row's ``config``)."""
    values = {k: v for k, v in MiKVConfig(**mikv).to_dict().items() if k != "name"}
    return json.dumps(values, sort_keys=True)


def default_family(config: MiKVConfig) -> str:
    if config.policy == "rtn":
        return "rtn"
    if config.policy == "h2o":
        return "h2o"
    return f"mikv {family_bits(config)}"


def family_bits(config: MiKVConfig) -> str:
    """``INT4`` when keys and values share a width, else ``K4/V3``."""
    k, v = config.k_bits, config.v_bits
    return f"INT{k}" if k == v else f"K{k}/V{v}"


# --------------------------------------------------------------------- bytes
@dataclass(frozen=True)
class CacheCost:
    """Bytes per token per KV head of one config at (head_dim, block_size)."""

    bytes_per_token: float     # RegionLayout.content_bytes (stock: dense in the model dtype)
    fraction_of_fp16: float    # bytes_per_token / (4 * head_dim)
    paper_fraction: float | None  # mikv-paper.md section 7 accounting (no lo copy, no bookkeeping)
    breakdown: dict[str, float] = field(default_factory=dict)


def cache_cost(cfg: EvalConfig, head_dim: int, block_size: int, model_dtype_size: int = 2) -> CacheCost:
    dense16 = dense_bytes_per_token(head_dim, 2)
    if cfg.is_stock:
        b = float(dense_bytes_per_token(head_dim, model_dtype_size))
        return CacheCost(b, b / dense16, None, {"dense": b, "total": b})
    config = cfg.config()
    layout = RegionLayout.build(config, block_size, head_dim)
    return CacheCost(float(layout.content_bytes), layout.content_bytes / dense16,
                     paper_cache_fraction(config, head_dim), layout.breakdown())


def bytes_of(config: MiKVConfig, head_dim: int, block_size: int) -> int:
    return RegionLayout.build(config, block_size, head_dim).content_bytes


# ------------------------------------------------------------------- solvers
def _ratio_steps(block_size: int) -> list[float]:
    """Hi ratios that are exactly k hi slots per block (k = 1..N)."""
    return [round(k / block_size, 6) for k in range(1, block_size + 1)]


def closest_config(base: MiKVConfig, target_fraction: float, head_dim: int, block_size: int,
                   knob: str) -> tuple[MiKVConfig, float] | None:
    """The variant of ``base`` (``knob`` = "hi_ratio" or "lo_bits") whose real bytes
    are closest to ``target_fraction`` of a 16-bit cache; None if none is valid.
    Returns (config, achieved fraction)."""
    target = target_fraction * dense_bytes_per_token(head_dim, 2)
    values: Iterable[Any] = _ratio_steps(block_size) if knob == "hi_ratio" else (2, 3, 4, 8)
    best = None
    for v in values:
        try:
            c = base.replace(**{knob: v})
            c.validate(head_dim)
            b = bytes_of(c, head_dim, block_size)
        except (ValueError, TypeError):
            continue
        err = abs(b - target)
        if best is None or err < best[0] - 1e-9:
            best = (err, c, b)
    if best is None:
        return None
    return best[1], best[2] / dense_bytes_per_token(head_dim, 2)


def _r_label(r: float) -> str:
    return f"{r:.3f}".rstrip("0").rstrip(".")


def mikv_config(lo_bits: int, hi_ratio: float, name: str | None = None, v_bits: int | None = None,
                **extra: Any) -> MiKVConfig:
    """A mikv-policy config on the ``mikv-paper`` base (r = 0 gives the rtn policy with the same
    lo bits and balancer, i.e. 'uniform low-bit + balancer'; use :func:`rtn_config` for the
    paper's RTN). ``v_bits`` stores values at their own width (keys at ``lo_bits``); named
    ``mikv-k4v3-r...`` then."""
    bits = {"k_bits": lo_bits, "v_bits": lo_bits if v_bits is None else v_bits}
    base = merge_settings(preset("mikv-paper").to_dict(), {**extra, **bits, "hi_ratio": hi_ratio})
    base["name"] = name or f"mikv-{bits_name(**bits)}-r{_r_label(hi_ratio)}"
    return MiKVConfig(**base)


def rtn_config(lo_bits: int, name: str | None = None, v_bits: int | None = None, **extra: Any) -> MiKVConfig:
    """The paper's RTN (uniform low-bit, no hi tier, no balancer); ``v_bits`` as in :func:`mikv_config`."""
    bits = {"k_bits": lo_bits, "v_bits": lo_bits if v_bits is None else v_bits}
    default = "rtn" if bits["k_bits"] == bits["v_bits"] == 2 else f"rtn-{bits_name(**bits)}"
    return MiKVConfig(**merge_settings(preset("rtn").to_dict(), {**extra, **bits, "name": name or default}))


def bits_name(k_bits: int, v_bits: int) -> str:
    return f"int{k_bits}" if k_bits == v_bits else f"k{k_bits}v{v_bits}"


def h2o_config(hi_ratio: float, name: str | None = None, **extra: Any) -> MiKVConfig:
    base = preset("h2o").to_dict()
    base.update(extra)
    base.update(hi_ratio=hi_ratio, name=name or f"h2o-r{_r_label(hi_ratio)}")
    return MiKVConfig(**base)


SNAP_TOLERANCE = 0.10


def sweep_configs(head_dim: int, block_size: int, targets: Sequence[float] = DEFAULT_TARGETS,
                  policies: Sequence[str] = ("mikv", "rtn", "h2o"), mikv_lo_bits: int = 2,
                  prefer: Sequence[EvalConfig] = ()) -> list[EvalConfig]:
    """Each policy at each target fraction of a 16-bit cache (closest real layout).

    A config of ``prefer`` (e.g. the frontier grid) of the same policy (and lo bits) within
    ``SNAP_TOLERANCE`` of a target is used for that cell instead, so the two grids share engines."""
    out: list[EvalConfig] = []
    dense16 = dense_bytes_per_token(head_dim, 2)
    bases = {
        "mikv": (preset("mikv-paper").replace(lo_bits=mikv_lo_bits), "hi_ratio"),
        "rtn": (preset("rtn"), "lo_bits"),
        "h2o": (preset("h2o"), "hi_ratio"),
    }
    for pol in policies:
        base, knob = bases[pol]
        for t in targets:
            snaps = []
            for p in prefer:
                pc = p.config()
                if pc is None or pc.policy != pol or (pol == "mikv" and pc.lo_bits != mikv_lo_bits):
                    continue
                f = bytes_of(pc, head_dim, block_size) / dense16
                if abs(f - t) <= SNAP_TOLERANCE * t:
                    snaps.append((abs(f - t), p))
            if snaps:
                best = min(snaps, key=lambda x: x[0])[1]
                out.append(dataclasses.replace(best, groups=("sweep",), target=t))
                continue
            found = closest_config(base, t, head_dim, block_size, knob)
            if found is None:
                continue
            c, achieved = found
            if abs(achieved - t) > TARGET_TOLERANCE * t:
                continue  # unreachable (e.g. mikv below its rtn floor)
            if pol == "rtn":
                c = rtn_config(c.lo_bits)
            elif pol == "h2o":
                c = h2o_config(c.hi_ratio)
            else:
                c = mikv_config(c.lo_bits, c.hi_ratio)
            out.append(EvalConfig.from_mikv(c, groups=("sweep",), target=t))
    return out


def frontier_configs(lo_bits: Sequence[int] = FRONTIER_LO_BITS, ratios: Sequence[float] = FRONTIER_RATIOS,
                     h2o_ratios: Sequence[float] = FRONTIER_H2O_RATIOS) -> list[EvalConfig]:
    """lo bits x r (r = 0 is the paper's RTN: uniform low-bit, no balancer) + H2O ratios.

    Ordered by nominal bits per element (lo bits + 16 r), cheapest first: a partial run covers
    the low-byte end of the frontier, where the families differ most, for every family."""
    cfgs = [rtn_config(b) if r == 0 else mikv_config(b, r) for b in lo_bits for r in ratios]
    cfgs += [h2o_config(r) for r in h2o_ratios]
    cfgs.sort(key=lambda c: (c.k_bits + c.v_bits) / 2 + 16 * c.hi_ratio)     # stable: ties keep grid order
    return [EvalConfig.from_mikv(c, groups=("frontier",)) for c in cfgs]


def format_label(config: MiKVConfig, head_dim: int) -> str:
    """``g<group>``, ``fp8`` (hi copies, when a hi tier exists), ``rot`` and ``nobal`` (mikv without
    the balancer) parts of a screening label."""
    parts = [f"g{config.group_for(head_dim)}"] if config.has_lo else []
    if config.hi_ratio and config.hi_dtype != "float16":
        parts.append({"float8_e4m3fn": "fp8"}.get(config.hi_dtype, config.hi_dtype))
    if config.has_lo and config.group_meta != "fp16":
        parts.append(config.group_meta.replace("-", ""))
    if config.rotation:
        parts.append("rot")
    if config.policy == "mikv" and not config.balancer:
        parts.append("nobal")
    return "-".join(parts)


def screen_configs(head_dim: int, block_size: int, lo_bits: Sequence[int] = SCREEN_LO_BITS,
                   ratios: Sequence[float] = SCREEN_RATIOS, groups: Sequence[int] = SCREEN_GROUPS,
                   hi_dtypes: Sequence[str] = SCREEN_HI_DTYPES, rotation: Sequence[bool] = SCREEN_ROTATION,
                   h2o_ratios: Sequence[float] = SCREEN_H2O_RATIOS,
                   rotated_balancer: Sequence[bool] = SCREEN_ROTATED_BALANCER,
                   lean: Sequence[tuple[float, int, str]] = SCREEN_LEAN,
                   split: Sequence[tuple[int, int]] = SCREEN_SPLIT,
                   split_meta: Sequence[str] = SCREEN_SPLIT_META) -> list[EvalConfig]:
    """Page-format screening grid: mikv lo bits x r x group x hi dtype x rotation (rotated rows
    with each of ``rotated_balancer``), plus each ``lean`` (r, group, hi dtype) with every lo bits and
    rotation setting; r = 0 rows are
    the paper's RTN with each group / rotation (hi dtype moot); H2O with each hi dtype. Groups
    that do not divide ``head_dim`` and rotation at a non-power-of-two ``head_dim`` are skipped.
    Ordered by real bytes per token (cheapest first); the family is the format (plot line)."""
    cfgs: list[tuple[MiKVConfig, str]] = []
    for b in lo_bits:
        for r in ratios:
            for g in groups:
                for rot in rotation:
                    for dt in (hi_dtypes if r else hi_dtypes[:1]):
                        extra = dict(group_size=g, rotation=rot)
                        if r == 0:
                            cfgs.append((rtn_config(b, name=f"rtn-int{b}", **extra), "rtn"))
                            continue
                        for bal in (rotated_balancer if rot else (True,)):
                            cfgs.append((mikv_config(b, r, hi_dtype=dt, balancer=bal, **extra), f"mikv INT{b}"))
        for r, g, dt in lean:
            for rot in rotation:
                for bal in (rotated_balancer if rot else (True,)):
                    cfgs.append((mikv_config(b, r, hi_dtype=dt, balancer=bal, group_size=g, rotation=rot),
                                 f"mikv INT{b}"))
    for kb, vb in split:
        for rot in rotation:
            cfgs.append((rtn_config(kb, v_bits=vb, group_size=SCREEN_SPLIT_RTN_GROUP, rotation=rot), "rtn"))
            for r, g, dt in lean:
                for bal in (rotated_balancer if rot else (True,)):
                    for meta in split_meta:
                        c = mikv_config(kb, r, v_bits=vb, hi_dtype=dt, balancer=bal, group_size=g, rotation=rot,
                                        group_meta=meta)
                        cfgs.append((c, f"mikv {family_bits(c)}"))
    cfgs += [(h2o_config(r, hi_dtype=dt), "h2o") for r in h2o_ratios for dt in hi_dtypes]
    out = []
    for c, fam in cfgs:
        if c.has_lo and c.group_size is not None and head_dim % c.group_size:
            continue     # the grid's groups are exact (a smaller divisor would be another row's format)
        if c.rotation and not rotation_supported(head_dim):
            continue     # would run unrotated: another row's engine
        try:
            c.validate(head_dim)
        except ValueError:
            continue
        fmt = format_label(c, head_dim)
        c = c.replace(name=f"{c.name}-{fmt}" if fmt else c.name)
        out.append(EvalConfig.from_mikv(c, family=f"{fam} {fmt}".strip(), groups=("screen",)))
    out.sort(key=lambda e: bytes_of(e.config(), head_dim, block_size))
    return dedupe(out)


def ablation_configs(base_name: str = "mikv-paper") -> list[EvalConfig]:
    """One-knob changes of ``base_name`` (the base itself included, as the reference row)."""
    base = preset(base_name)
    b = base.to_dict()
    rows = [
        ("base", {}),
        ("balancer off", {"balancer": False}),
        ("scorer window (obs 32)", {"scorer": "window"}),
        ("recent window 0", {"recent_window": 0}),
        ("recent window 64", {"recent_window": 64}),
        ("hi dtype bfloat16", {"hi_dtype": "bfloat16"}),
        ("hi dtype float32", {"hi_dtype": "float32"}),
        ("rtn INT2 + balancer (r = 0)", {"policy": "rtn", "hi_ratio": 0.0, "sink_tokens": 0, "recent_window": 0}),
    ]
    out = []
    for what, change in rows:
        values = {**b, **change}
        if what == "base":
            values["name"] = base_name
        else:
            slug = what.split(" (")[0].replace(" ", "-").replace("+", "").replace("--", "-")
            values["name"] = f"{base_name}/{slug}"
        c = MiKVConfig(**values)
        out.append(EvalConfig.from_mikv(c, family="ablation" if what != "base" else None,
                                        groups=("ablation",), ablation=what))
    return out


def equal_bytes_h2o(config: MiKVConfig, head_dim: int, block_size: int) -> MiKVConfig:
    """The H2O config whose real bytes are closest to (ties: above) ``config``'s."""
    frac = bytes_of(config, head_dim, block_size) / dense_bytes_per_token(head_dim, 2)
    found = closest_config(preset("h2o"), frac, head_dim, block_size, "hi_ratio")
    assert found is not None
    return h2o_config(found[0].hi_ratio)


def dedupe(configs: Iterable[EvalConfig]) -> list[EvalConfig]:
    """Unite configs that are the same engine (keeps first occurrence's label and order)."""
    seen: dict[str, EvalConfig] = {}
    for c in configs:
        k = c.key()
        seen[k] = seen[k].merged(c) if k in seen else c
    return list(seen.values())
