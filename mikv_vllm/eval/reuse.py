"""Rows of earlier reports carried into a new one instead of running their engines again (``--reuse``).

A row is reused only when its report measured the same workload, model and KV memory, its config is the
same engine (:meth:`EvalConfig.key`) and its page still has the bytes the layout gives today. Stock is
never reused: it runs again and is the reference that the carried rows' ratios are recomputed against
(:func:`.report.summary.summarize`). Framework-free (no vllm import).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..errors import CLIError
from .configs import EvalConfig, bytes_of, engine_key


def _load(path: str) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
        doc["summary"]["rows"], doc["meta"]["workload"]
        return doc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CLIError(f"--reuse {path}: not an eval summary.json ({exc})") from None


def _same(a: object, b: object) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def reuse_rows(paths: Sequence[str], cfgs: Sequence[EvalConfig], workload: dict, model: str,
               kv_cache_memory_bytes: int) -> tuple[list[EvalConfig], list[dict]]:
    """(configs still to run, rows carried from ``paths``): each non-stock config measured by one of
    the reports (the first that has it) is replaced by that report's row, relabelled as this run
    names it. A report measured under another workload, model or KV memory is refused."""
    wanted = {c.key(): c for c in cfgs if not c.is_stock}
    carried: dict[str, dict] = {}
    for path in paths:
        doc = _load(path)
        meta = doc["meta"]
        for what, theirs, ours in (("workload", meta["workload"], workload), ("model", meta.get("model"), model),
                                   ("KV memory", meta.get("kv_cache_memory_bytes"), kv_cache_memory_bytes)):
            if not _same(theirs, ours):
                raise CLIError(f"--reuse {path}: measured with another {what} ({theirs!r}, this run: {ours!r}); "
                               f"its rows cannot join this report")
        for row in doc["summary"]["rows"]:
            if row["policy"] == "stock" or not row.get("config"):
                continue
            cfg = wanted.get(engine_key(row["config"]))
            if cfg is None or cfg.key() in carried:
                continue
            if row.get("engine_bytes_per_token_per_head") != bytes_of(cfg.config(), int(meta["head_dim"]),
                                                                      int(meta["block_size"])):
                continue   # measured on another page layout: run it again
            carried[cfg.key()] = {**row, "label": cfg.label, "family": cfg.family, "groups": list(cfg.groups),
                                  "target": cfg.target, "ablation": cfg.ablation, "config": cfg.mikv,
                                  "cached": True, "reused_from": str(path)}
    return [c for c in cfgs if c.key() not in carried], list(carried.values())
