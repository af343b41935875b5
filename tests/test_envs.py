"""Environment switches: each read in mikv_vllm/envs.py only, each listed in docs/usage.md's table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mikv_vllm import envs

ROOT = Path(__file__).resolve().parents[1]
# reads of variables that are not mikv-vllm switches (set by others, read for their sake)
FOREIGN = ("PROMETHEUS_MULTIPROC_DIR", "LD_PRELOAD")
READ = re.compile(r"os\.environ\.get\(|os\.getenv\(|os\.environ\[[^\]]+\](?!\s*=[^=])|\bin os\.environ\b")


def test_switches_are_read_in_envs_only():
    offenders = []
    for path in sorted((ROOT / "mikv_vllm").rglob("*.py")):
        if path.name == "envs.py" and path.parent.name == "mikv_vllm":
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if READ.search(line) and not any(name in line for name in FOREIGN):
                offenders.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()}")
    assert not offenders, "read environment switches through mikv_vllm.envs:\n" + "\n".join(offenders)


def test_usage_doc_lists_every_switch():
    text = (ROOT / "docs" / "usage.md").read_text()
    section = text[text.index("## Environment switches"):]
    section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| `([^`]*)` \|", section, flags=re.M)
    assert sorted(name for name, _ in rows) == sorted(envs.SWITCHES), rows
    for name, default in rows:
        assert default == envs.SWITCHES[name][0], (name, default)


def test_bad_values_name_the_switch(monkeypatch):
    for name, reader, bad in ((envs.OPS, envs.ops, "gpu"), (envs.CPU_ISA, envs.cpu_isa, "sse9"),
                              (envs.STATS_LAYERS, envs.stats_layers, "some"), (envs.WORKSPACE_MB, envs.workspace_mb, "-1"),
                              (envs.WORKSPACE_MB, envs.workspace_mb, "lots"), (envs.STATS_INTERVAL, envs.stats_interval, "x"),
                              (envs.CPU_MALLOC, envs.cpu_malloc, "jemalloc")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=f"{name}="):
            reader()


def test_defaults(monkeypatch, tmp_path):
    for name in envs.SWITCHES:
        monkeypatch.delenv(name, raising=False)
    assert (envs.ops(), envs.cpu_isa(), envs.stats_layers(), envs.workspace_mb()) == ("auto", "auto", "first", 512)
    assert envs.stats_interval() is None and envs.cxx() == "c++" and envs.cpu_build_verbose() is False
    assert envs.cpu_build_dir() == Path.home() / ".cache" / "mikv-vllm" / "torch_extensions"
    monkeypatch.setenv(envs.CPU_ISA, " AVX2 ")
    monkeypatch.setenv(envs.CACHE, str(tmp_path))
    assert envs.cpu_isa() == "avx2" and envs.cache_dir() == tmp_path
