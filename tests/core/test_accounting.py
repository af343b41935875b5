"""Bytes-per-token accounting and the benchmarks/bytes_table.py script."""

import runpy
import sys
from pathlib import Path

import pytest

from mikv_vllm.config import PRESETS, MiKVConfig, preset
from mikv_vllm.core.accounting import bytes_row, bytes_table, paper_fraction_with_lo_copy, to_markdown
from mikv_vllm.core.layout import paper_cache_fraction

ROOT = Path(__file__).resolve().parents[2]


def test_paper_headline_is_exactly_32_5_percent():
    cfg = MiKVConfig(policy="mikv", lo_bits=2, hi_ratio=0.2, hi_dtype="float16")
    assert 100 * paper_cache_fraction(cfg, 128) == 32.5
    assert bytes_row(preset("mikv-paper"), 128, 16)["paper_fraction"] == 0.325


@pytest.mark.parametrize("hi,bits,r,expected", [
    ("float16", 2, 0.0, 15.625), ("float16", 3, 0.1, 29.6875), ("float16", 4, 0.5, 64.0625)])
def test_paper_grid_values(hi, bits, r, expected):
    policy = "rtn" if r == 0 else "mikv"
    cfg = MiKVConfig(policy=policy, lo_bits=bits, hi_ratio=r, hi_dtype=hi)
    assert 100 * paper_cache_fraction(cfg, 128) == pytest.approx(expected, abs=1e-9)


def test_lo_copy_accounting():
    cfg = preset("mikv-paper")
    assert paper_fraction_with_lo_copy(cfg, 64) == pytest.approx(0.3875)   # mikv-paper.md §11: 38.75 %
    assert paper_fraction_with_lo_copy(preset("h2o"), 128) == paper_cache_fraction(preset("h2o"), 128)


def test_table_rows_are_consistent():
    rows = bytes_table()
    assert len(rows) == len(PRESETS) * 2 * 2
    for r in rows:
        assert r["bytes_per_token"] == r["lo_kv"] + r["hi_kv"] + r["bookkeeping"]
        assert r["bytes_per_token"] % 4 == 0 and r["bookkeeping"] >= 0
        assert r["dense_fp16"] == 4 * r["head_dim"]
        assert r["in_page_fraction"] == r["bytes_per_token"] / r["dense_fp16"]
        assert r["in_page_fraction"] >= r["paper_fraction"] - 1e-12
    rtn = bytes_row(preset("rtn"), 128, 16)
    assert rtn["bytes_per_token"] == 80 and rtn["hi_kv"] == 0 and rtn["bookkeeping"] == 0


def test_markdown_and_script(capsys, monkeypatch):
    md = to_markdown(bytes_table(["mikv-paper"], [128], [16]))
    lines = md.splitlines()
    assert len(lines) == 3 and lines[0].startswith("| preset") and "32.50" in lines[2]
    monkeypatch.setattr(sys, "argv", ["bytes_table.py"])
    runpy.run_path(str(ROOT / "benchmarks" / "bytes_table.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert out.count("\n| ") == len(PRESETS) * 4 + 1
    for name in PRESETS:
        assert f"| {name} |" in out
