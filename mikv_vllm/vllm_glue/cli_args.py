"""``--kv-cache-policy`` and ``--mikv-*`` flags for ``vllm serve`` / ``EngineArgs``.

The flags only write ``additional_config`` (the single source of truth that
travels to engine-core and worker processes)::

    {"kv_cache_policy": "mikv", "mikv": {...MiKVConfig fields...}}
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ..config import (HI_DTYPES, LO_BITS, POLICIES, PRESETS, SCORE_DTYPES, SCORERS, MiKVConfig, MiKVConfigError,
                      merge_settings)

logger = logging.getLogger("vllm.mikv")  # child of vLLM's configured logger

# (MiKVConfig field, argparse kwargs) for the individual --mikv-* flags.
FIELD_FLAGS: dict[str, dict[str, Any]] = {
    "lo_bits": dict(type=int, help=f"Bits of every token's low-precision copy, keys and values alike, one of {LO_BITS} "
                    "(0 = evict)."),
    "k_bits": dict(type=int, help=f"Bits of every token's low-precision key copy, one of {LO_BITS} (instead of lo_bits)."),
    "v_bits": dict(type=int, help=f"Bits of every token's low-precision value copy, one of {LO_BITS} (instead of lo_bits)."),
    "hi_ratio": dict(type=float, help="Share r of a request's tokens also kept at high precision, in [0, 1]."),
    "hi_dtype": dict(type=str, help=f"High-precision tier dtype, one of {HI_DTYPES}."),
    "group_size": dict(type=int, help="At most this many channels per quantization group: the largest divisor of head_dim "
                  "not above it (default head_dim/2)."),
    "recent_window": dict(type=int, help="Newest tokens pinned at high precision (default half the budget)."),
    "sink_tokens": dict(type=int, help="First tokens pinned at high precision (attention sinks)."),
    "scorer": dict(type=str, help=f"Importance scorer, one of {SCORERS}."),
    "obs_window": dict(type=int, help="Observation-window rows for scorer 'window'."),
    "balancer": dict(action=argparse.BooleanOptionalAction, help="Per-channel key outlier balancer."),
    "score_dtype": dict(type=str, help=f"Accumulated score dtype, one of {SCORE_DTYPES}."),
    "rotation": dict(action=argparse.BooleanOptionalAction,
                     help="Randomised Hadamard rotation of q/k/v per KV head (power-of-two head_dim)."),
}

_installed = False


def _mikv_config_type(text: str) -> str:
    """argparse type for --mikv-config: validate early, keep the raw text."""
    try:
        MiKVConfig.parse(text)
    except MiKVConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_mikv_args(parser: argparse.ArgumentParser) -> None:
    """Add the MiKV argument group (no-op when already present)."""
    if any("--kv-cache-policy" in a.option_strings for a in parser._actions):
        return
    group = parser.add_argument_group(
        title="MiKV",
        description="Mixed-precision KV cache (mikv-vllm). Absent --kv-cache-policy = stock vLLM.",
    )
    group.add_argument(
        "--kv-cache-policy", choices=list(POLICIES), default=None,
        help="KV cache policy: mikv (mixed precision), rtn (uniform low-bit), h2o (eviction).",
    )
    group.add_argument(
        "--mikv-config", type=_mikv_config_type, default=None,
        help="MiKV settings: inline JSON, a YAML/JSON file, or a preset name "
             "(mikv, mikv-paper, mikv-int3-r05, mikv-int4, rtn, rtn-int4, h2o).",
    )
    for name, kwargs in FIELD_FLAGS.items():
        group.add_argument("--mikv-" + name.replace("_", "-"), dest="mikv_" + name, default=None, **kwargs)


def additional_config_from_args(args: argparse.Namespace, additional: dict | None) -> dict | None:
    """Merge the MiKV flags of ``args`` into ``additional`` (validated) or return it unchanged."""
    policy = getattr(args, "kv_cache_policy", None)
    raw = getattr(args, "mikv_config", None)
    section: dict[str, Any] = {}
    if raw is not None:
        parsed = MiKVConfig.parse(raw)
        section = {k: v for k, v in parsed.to_dict().items() if k != "name"}
        if parsed.name in PRESETS:  # keep the preset's name unless flags change it
            section["preset"] = parsed.name
        policy = policy or parsed.policy
    flags = {name: getattr(args, "mikv_" + name) for name in FIELD_FLAGS
             if getattr(args, "mikv_" + name, None) is not None}
    section = merge_settings(section, flags)
    if policy is None:
        if section:
            raise MiKVConfigError("kv_cache_policy", "--mikv-* options need --kv-cache-policy")
        return additional
    merged = dict(additional or {})
    if merged.get("kv_cache_policy") not in (None, policy):
        logger.warning("--kv-cache-policy %s overrides additional_config %r", policy, merged["kv_cache_policy"])
    if isinstance(merged.get("mikv"), dict):
        section = merge_settings(merged["mikv"], section)
    merged["kv_cache_policy"] = policy
    config = MiKVConfig.from_dict(section, policy=policy)
    merged["mikv"] = config.to_dict()
    return merged


def install() -> None:
    """Wrap ``EngineArgs.add_cli_args`` and ``EngineArgs.from_cli_args`` once."""
    global _installed
    if _installed:
        return
    _installed = True
    from vllm.engine.arg_utils import EngineArgs

    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__

    def add_cli_args(parser, *args, **kwargs):
        parser = original_add(parser, *args, **kwargs)
        add_mikv_args(parser)
        return parser

    def from_cli_args(cls, args):
        engine_args = original_from(cls, args)
        try:
            merged = additional_config_from_args(args, engine_args.additional_config)
        except MiKVConfigError as exc:
            raise SystemExit(f"error: {exc}") from None
        if merged is not None:
            engine_args.additional_config = merged
        return engine_args

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
