"""The one MiKV configuration: dataclass, presets and validation.

CLI flags, YAML presets and vLLM ``additional_config`` all funnel into
:class:`MiKVConfig` through :func:`MiKVConfig.from_dict`, which is the single
place where values are validated. Framework-free (no vllm import).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

LO_BITS = (0, 2, 3, 4, 8)
HI_DTYPES = ("float16", "bfloat16", "float32", "float8_e4m3fn")
SCORERS = ("accumulated", "window")
# fp16 scores were dropped: an fp16 running sum stops growing once a score is large (its ulp
# exceeds the per-step attention mass), which silently freezes the ranking of old tokens.
SCORE_DTYPES = ("float32",)
POLICIES = ("mikv", "rtn", "h2o")
# per-group lo metadata: "fp16" = fp16 scale + fp16 zero (4 B per group); "fp8-scale" = the scale
# rounded up to fp8 e5m2 + fp16 zero (3 B per group)
GROUP_METAS = ("fp16", "fp8-scale")


class MiKVConfigError(ValueError):
    """Invalid MiKV configuration; the message names the offending field."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"mikv config field '{field_name}': {message}")


@dataclass(frozen=True)
class MiKVConfig:
    """Mixed-precision KV cache settings (one per engine, all layers alike).

    k_bits         bits of the low-precision copy of every token's key (0 = no copy:
                   tokens outside the hi set are evicted, i.e. H2O).
    v_bits         the same for values; both 0 (eviction) or both > 0.
    lo_bits        input alias that sets k_bits and v_bits alike; after construction it holds
                   their common width, or None when they differ (never serialised by to_dict).
    group_size     at most this many channels per quantization group along head_dim: the largest
                   divisor of head_dim not above it (64 at head_dim 64 or 128, 48 at 96, 40 at
                   80); None = head_dim / 2.
    hi_dtype       storage dtype of the high-precision tier; ``float8_e4m3fn`` halves a hi
                   slot (values clamped to +-448, round to nearest even, no scale).
    hi_ratio       r: share of a request's tokens also kept at high precision.
    recent_window  newest tokens kept in the hi tier; None = half the budget.
    sink_tokens    first tokens kept in the hi tier from the first step (attention sinks);
                   they are granted even when r * L is smaller (core.importance.hi_budget).
    scorer         "accumulated" (H2O: softmax mass from every query row) or
                   "window" (SnapKV: only the last ``obs_window`` rows of a
                   prefill chunk vote; decode rows always vote).
    balancer       per-channel key balancer b = sqrt(max|q| / max|k|).
    score_dtype    dtype of the per-token accumulated score (float32 only).
    group_meta     per-group (scale, zero) storage: "fp16" (4 B per group) or "fp8-scale" (scale rounded
                   up to fp8 e5m2, zero fp16: 3 B per group; torch op set only for now).
    rotation       rotate q, k, v of every KV head by a fixed randomised Hadamard matrix before
                   the cache (outputs rotated back; core.rotation) where the head_dim is a power of
                   two; on any other head_dim the unrotated variant runs (:meth:`for_head_dim`).
    """

    name: str = "custom"
    policy: str = "mikv"
    k_bits: int | None = None
    v_bits: int | None = None
    lo_bits: int | None = None
    group_size: int | None = None
    hi_dtype: str = "float16"
    hi_ratio: float = 0.2
    recent_window: int | None = None
    sink_tokens: int = 4
    scorer: str = "accumulated"
    obs_window: int = 32
    balancer: bool = True
    score_dtype: str = "float32"
    rotation: bool = False
    group_meta: str = "fp16"

    def __post_init__(self) -> None:
        _resolve_bits(self)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self, head_dim: int | None = None) -> "MiKVConfig":
        """Raise :class:`MiKVConfigError` on the first invalid field."""
        _check_type("name", self.name, str)
        if self.policy not in POLICIES:
            raise MiKVConfigError("policy", f"must be one of {POLICIES}, got {self.policy!r}")
        for name in ("k_bits", "v_bits"):
            _check_type(name, getattr(self, name), int)
            if getattr(self, name) not in LO_BITS:
                raise MiKVConfigError(name, f"must be one of {LO_BITS}, got {getattr(self, name)}")
        if (self.k_bits == 0) != (self.v_bits == 0):
            raise MiKVConfigError("v_bits", f"keys and values are both evicted (0 bits) or both kept; got "
                                  f"k_bits {self.k_bits}, v_bits {self.v_bits}")
        if self.group_size is not None:
            _check_type("group_size", self.group_size, int)
            if self.group_size <= 0:
                raise MiKVConfigError("group_size", f"must be positive, got {self.group_size}")
        if self.hi_dtype not in HI_DTYPES:
            raise MiKVConfigError("hi_dtype", f"must be one of {HI_DTYPES}, got {self.hi_dtype!r}")
        _check_type("hi_ratio", self.hi_ratio, (int, float))
        if not 0.0 <= float(self.hi_ratio) <= 1.0:
            raise MiKVConfigError("hi_ratio", f"must be in [0, 1], got {self.hi_ratio}")
        if self.recent_window is not None:
            _check_type("recent_window", self.recent_window, int)
            if self.recent_window < 0:
                raise MiKVConfigError("recent_window", f"must be >= 0, got {self.recent_window}")
        _check_type("sink_tokens", self.sink_tokens, int)
        if self.sink_tokens < 0:
            raise MiKVConfigError("sink_tokens", f"must be >= 0, got {self.sink_tokens}")
        if self.scorer not in SCORERS:
            raise MiKVConfigError("scorer", f"must be one of {SCORERS}, got {self.scorer!r}")
        _check_type("obs_window", self.obs_window, int)
        if self.obs_window <= 0:
            raise MiKVConfigError("obs_window", f"must be positive, got {self.obs_window}")
        _check_type("balancer", self.balancer, bool)
        _check_type("rotation", self.rotation, bool)
        if self.group_meta not in GROUP_METAS:
            raise MiKVConfigError("group_meta", f"must be one of {GROUP_METAS}, got {self.group_meta!r}")
        if self.score_dtype == "float16":
            raise MiKVConfigError("score_dtype", "float16 is no longer supported (an fp16 running sum stops "
                                  "accumulating once scores are large); use float32")
        if self.score_dtype not in SCORE_DTYPES:
            raise MiKVConfigError("score_dtype", f"must be one of {SCORE_DTYPES}, got {self.score_dtype!r}")
        if self.k_bits == 0 and self.hi_ratio == 0:
            raise MiKVConfigError("hi_ratio", "lo_bits 0 (eviction) with hi_ratio 0 would keep no token")
        if self.policy == "rtn" and self.hi_ratio != 0:
            raise MiKVConfigError("hi_ratio", f"policy 'rtn' (uniform low-bit) needs hi_ratio 0, got {self.hi_ratio}")
        if self.policy == "h2o" and self.k_bits != 0:
            raise MiKVConfigError("lo_bits", f"policy 'h2o' (eviction) needs lo_bits 0, got k_bits {self.k_bits}")
        if self.policy == "mikv" and (self.k_bits == 0 or self.hi_ratio == 0):
            raise MiKVConfigError("policy", "'mikv' needs lo_bits > 0 and hi_ratio > 0 (use 'h2o' or 'rtn')")
        if head_dim is not None:
            g = self.group_for(head_dim)
            if head_dim % g:
                raise MiKVConfigError("group_size", f"{g} does not divide head_dim {head_dim}")
        return self

    def for_head_dim(self, head_dim: int) -> tuple["MiKVConfig", str | None]:
        """The config a model of ``head_dim`` runs, and why it differs (None when it does not): a
        rotation the head_dim cannot take (:func:`rotation_supported`) falls back to the unrotated
        variant, not an error, so a rotated preset serves every model. Other fields are validated."""
        self.validate(head_dim)
        if self.rotation and not rotation_supported(head_dim):
            return self.replace(rotation=False), (
                f"MiKV config {self.name!r} asks for the Hadamard rotation, which needs a power-of-two "
                f"head_dim; head_dim is {head_dim}: serving the unrotated variant")
        return self, None

    # ----------------------------------------------------------------- derived
    @property
    def has_lo(self) -> bool:
        """Every token keeps a low-precision copy (False: eviction, h2o)."""
        return self.k_bits > 0

    @property
    def bits_label(self) -> str:
        """``int4`` when keys and values share a width, else ``k4v3``."""
        return f"int{self.k_bits}" if self.k_bits == self.v_bits else f"k{self.k_bits}v{self.v_bits}"

    def group_for(self, head_dim: int) -> int:
        """Quantization group size for ``head_dim``: the largest divisor of ``head_dim`` not above
        ``group_size`` (default head_dim / 2)."""
        if self.group_size is None:
            return max(1, head_dim // 2)
        return next(g for g in range(min(self.group_size, head_dim), 0, -1) if head_dim % g == 0)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, policy: str | None = None) -> "MiKVConfig":
        """Build from a mapping; other keys override a base preset.

        The base is ``data["preset"]`` if given, else the default preset of
        ``policy`` (or of ``data["policy"]``, else ``mikv``). Unknown keys are
        rejected with an error naming them.
        """
        if data is not None and not isinstance(data, Mapping):
            raise MiKVConfigError("mikv", f"must be a mapping, got {type(data).__name__}")
        data = dict(data or {})
        if policy is not None and policy not in POLICIES:
            raise MiKVConfigError("kv_cache_policy", f"must be one of {POLICIES}, got {policy!r}")
        if policy is not None and data.get("policy", policy) != policy:
            raise MiKVConfigError("policy", f"config says {data['policy']!r} but kv_cache_policy is {policy!r}")
        base_name = data.pop("preset", None)
        if base_name is None:
            pol = policy or data.get("policy", "mikv")
            if pol not in POLICIES:
                raise MiKVConfigError("policy", f"must be one of {POLICIES}, got {pol!r}")
            base_name = POLICY_DEFAULT_PRESET[pol]
        base = preset(base_name)
        if policy is not None and base.policy != policy:
            raise MiKVConfigError("preset", f"preset {base_name!r} is a {base.policy!r} preset, not {policy!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise MiKVConfigError(key, f"unknown key; valid keys: {sorted(known | {'preset'})}")
        values = base.to_dict()
        overrides = {k: v for k, v in data.items() if getattr(base, k) != v or k == "name"}
        values = merge_settings(values, data)
        if "name" not in data:
            values["name"] = base_name if not overrides else f"{base_name}+custom"
        return cls(**values)

    @classmethod
    def from_additional_config(cls, additional: Mapping[str, Any] | None) -> "MiKVConfig | None":
        """The config selected by vLLM ``additional_config`` or None (stock vLLM).

        Keys: ``kv_cache_policy`` (mikv | rtn | h2o) and optional ``mikv``
        (a mapping of :class:`MiKVConfig` fields, or a preset name).
        """
        if not additional or not isinstance(additional, Mapping):
            return None
        policy = additional.get("kv_cache_policy")
        section = additional.get("mikv")
        if policy in (None, "none"):
            if section is not None:
                raise MiKVConfigError("kv_cache_policy", "'mikv' settings given but no kv_cache_policy set")
            return None
        if isinstance(section, str):
            section = {"preset": section}
        return cls.from_dict(section, policy=policy)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "MiKVConfig":
        """Load a YAML file holding either the config mapping or ``{mikv: {...}}``."""
        import yaml

        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise MiKVConfigError("<file>", f"{path} must hold a mapping, got {type(data).__name__}")
        if "mikv" in data and isinstance(data["mikv"], dict):
            data = data["mikv"]
        return cls.from_dict(data)

    @classmethod
    def parse(cls, text: str) -> "MiKVConfig":
        """Parse a CLI value: inline JSON, a YAML/JSON file path, or a preset name."""
        text = text.strip()
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise MiKVConfigError("<json>", f"invalid JSON: {exc}") from None
            if not isinstance(data, dict):
                raise MiKVConfigError("<json>", "must be a JSON object")
            return cls.from_dict(data)
        if text in PRESETS:
            return preset(text)
        if os.path.exists(text):
            return cls.from_yaml(text)
        raise MiKVConfigError("<value>", f"{text!r} is neither JSON, an existing file nor a preset {sorted(PRESETS)}")

    def to_dict(self) -> dict[str, Any]:
        """All fields but the ``lo_bits`` alias (``k_bits``/``v_bits`` carry it)."""
        d = dataclasses.asdict(self)
        d.pop("lo_bits")
        return d

    def replace(self, **changes: Any) -> "MiKVConfig":
        """A copy with ``changes``; ``lo_bits`` sets both widths unless k_bits/v_bits are also given."""
        return type(self)(**merge_settings(self.to_dict(), changes))


def merge_settings(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override`` (both mappings of config fields), with the ``lo_bits``
    alias resolved: a ``lo_bits`` in ``override`` replaces base's k_bits/v_bits, a ``k_bits`` or
    ``v_bits`` in ``override`` replaces base's ``lo_bits`` (its other width stays). A ``lo_bits``
    that contradicts an explicit k_bits/v_bits of ``override`` stays for the constructor to refuse."""
    out = dict(base)
    lo = out.pop("lo_bits", None)
    if lo is not None:
        out.setdefault("k_bits", lo)
        out.setdefault("v_bits", lo)
    if "lo_bits" in override:
        out.pop("k_bits", None)
        out.pop("v_bits", None)
    out.update(override)
    return out


def _resolve_bits(config: MiKVConfig) -> None:
    """Fill k_bits/v_bits from the ``lo_bits`` alias (default 2) and set ``lo_bits`` to their common
    width (None when they differ). A ``lo_bits`` that contradicts k_bits/v_bits is an error."""
    lo = config.lo_bits
    if lo is not None:
        _check_type("lo_bits", lo, int)
        if lo not in LO_BITS:
            raise MiKVConfigError("lo_bits", f"must be one of {LO_BITS}, got {lo}")
        for name in ("k_bits", "v_bits"):
            given = getattr(config, name)
            if given is not None and given != lo:
                raise MiKVConfigError("lo_bits", f"lo_bits {lo} sets keys and values alike but {name} is "
                                      f"{given}; give either lo_bits or k_bits/v_bits")
    default = 2 if lo is None else lo
    k = config.k_bits if config.k_bits is not None else default
    v = config.v_bits if config.v_bits is not None else default
    object.__setattr__(config, "k_bits", k)
    object.__setattr__(config, "v_bits", v)
    object.__setattr__(config, "lo_bits", k if k == v else None)


def rotation_supported(head_dim: int) -> bool:
    """The Hadamard rotation (core.rotation) takes a power-of-two head_dim only."""
    return head_dim > 0 and not head_dim & (head_dim - 1)


def _check_type(name: str, value: Any, types: type | tuple[type, ...]) -> None:
    # bool is an int subclass: refuse it where a number is expected.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise MiKVConfigError(name, f"must be {_type_names(types)}, got bool")
    if not isinstance(value, types):
        raise MiKVConfigError(name, f"must be {_type_names(types)}, got {type(value).__name__} {value!r}")


def _type_names(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


# ------------------------------------------------------------------- presets
# `mikv-paper` is the paper's headline and never changes. `mikv` is the product
# default, picked by the quality benchmark's rule (docs/quality.md, "Default rule"):
# on the embedded model that is keys in INT4 and values in INT3, one group of 64 channels
# with an fp8 scale (3 B of group metadata), r = 0.03, fp8 hi copies, balancer.
# `mikv-int4-r03` is the same with values in INT4 and fp16 scale + zero (the best perplexity
# at 78 B); `mikv-int3-r05` an INT3 point with rotation and no balancer.
PRESETS: dict[str, dict[str, Any]] = {
    "mikv-paper": dict(policy="mikv", lo_bits=2, hi_ratio=0.2, balancer=True, hi_dtype="float16"),
    "mikv": dict(policy="mikv", k_bits=4, v_bits=3, group_size=64, hi_ratio=0.03, hi_dtype="float8_e4m3fn",
                 balancer=True, group_meta="fp8-scale"),
    "mikv-int4-r03": dict(policy="mikv", lo_bits=4, group_size=64, hi_ratio=0.03, hi_dtype="float8_e4m3fn",
                          balancer=True),
    "mikv-int3-r05": dict(policy="mikv", lo_bits=3, group_size=64, hi_ratio=0.05, hi_dtype="float8_e4m3fn",
                          balancer=False, rotation=True),
    "mikv-int4": dict(policy="mikv", lo_bits=4, hi_ratio=0.2, balancer=True),
    "rtn": dict(policy="rtn", lo_bits=2, hi_ratio=0.0, sink_tokens=0, recent_window=0, balancer=False),
    "rtn-int4": dict(policy="rtn", lo_bits=4, hi_ratio=0.0, sink_tokens=0, recent_window=0, balancer=False),
    "h2o": dict(policy="h2o", lo_bits=0, hi_ratio=0.2, balancer=False),
}

# What `--kv-cache-policy NAME` selects when no explicit config is given.
POLICY_DEFAULT_PRESET = {"mikv": "mikv", "rtn": "rtn", "h2o": "h2o"}


def preset(name: str) -> MiKVConfig:
    """Return the named preset (see :data:`PRESETS`)."""
    if name not in PRESETS:
        raise MiKVConfigError("preset", f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return MiKVConfig(name=name, **PRESETS[name])
