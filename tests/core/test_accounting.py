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


def test_table_rows_against_hand_computed_numbers():
    rows = bytes_table()
    assert len(rows) == len(PRESETS) * 2 * 2
    assert {(r["preset"], r["head_dim"], r["block_size"]) for r in rows} == \
        {(p, d, n) for p in PRESETS for d in (64, 128) for n in (16, 128)}
    # INT3, r = 0.1, fp16 hi at D = 64, N = 128 (tests/core/test_layout.py works the bytes out):
    # lo 64, hi 26 (13 slots x 256 B / 128), bookkeeping 0.40625 (slot scores) + 0.40625 (tags)
    # + 1 (balancer) + 0.1875 (alignment) = 2; 92 / 256 of fp16; paper: (0.1 * 16 + 0.9 * (3 + 1)) / 16
    row = bytes_row(MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=0.1, hi_dtype="float16"), 64, 128)
    assert (row["bytes_per_token"], row["lo_kv"], row["hi_kv"], row["bookkeeping"]) == (92, 64, 26, 2)
    assert row["dense_fp16"] == 256 and row["in_page_fraction"] == 92 / 256
    assert row["paper_fraction"] == pytest.approx(0.325) and row["hi_slots"] == 13
    assert row["paper_with_lo_copy"] == pytest.approx((0.1 * 16 + 4) / 16)
    # mikv-int4-r03 (INT4, one group of 64, r = 0.03, fp8 hi) at D = 64, N = 128: lo 2 x (32 B codes
    # + 4 B s/z) = 72, hi 4 (4 slots x 128 B / 128), bookkeeping 0.125 (slot scores) + 0.125 (tags)
    # + 1 (balancer) + 0.75 (alignment) = 2; 78 B
    int4 = bytes_row(preset("mikv-int4-r03"), 64, 128)
    assert (int4["bytes_per_token"], int4["lo_kv"], int4["hi_kv"], int4["bookkeeping"]) == (78, 72, 4, 2)
    assert int4["hi_slots"] == 4
    # the default mikv (keys INT4, values INT3, fp8 scale + fp16 zero = 3 B a group): lo 32 + 3 + 24 + 3
    # = 62, hi and bookkeeping as above: 68 B (3.76x a bf16 cache)
    default = bytes_row(preset("mikv"), 64, 128)
    assert (default["bytes_per_token"], default["lo_kv"], default["hi_kv"], default["bookkeeping"]) == (68, 62, 4, 2)
    # rtn (INT2) at D = 128, N = 16: 32 B codes + 8 B (s, z) per K and per V, nothing else
    rtn = bytes_row(preset("rtn"), 128, 16)
    assert (rtn["bytes_per_token"], rtn["hi_kv"], rtn["bookkeeping"], rtn["in_page_fraction"]) == (80, 0, 0, 80 / 512)


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


def test_page_format_rows_hand_computed():
    """One group per head vector and fp8 hi copies at D = 64, N = 128 (issue 14's candidate)."""
    cand = MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=0.05, group_size=64, hi_dtype="float8_e4m3fn",
                      rotation=True)
    row = bytes_row(cand, 64, 128)
    # lo: 2 x (24 B codes + 1 group x 4 B s/z) = 56; hi: 7 slots x 2 x 64 B (fp8) / 128 = 7;
    # tags and slot scores 7 x 4 B each (16-aligned: 32 + 32) / 128 + balancer 128 / 128 = 1.5;
    # 64.5 rounded up to a whole byte: 65
    assert (row["bytes_per_token"], row["lo_kv"], row["hi_kv"], row["hi_slots"]) == (65, 56, 7, 7)
    assert row["bookkeeping"] == pytest.approx(65 - 63)
    fp16 = bytes_row(cand.replace(hi_dtype="float16"), 64, 128)
    assert fp16["hi_kv"] == 2 * row["hi_kv"] and fp16["bytes_per_token"] == 72
    assert row["paper_fraction"] == pytest.approx((0.05 * 8 + 0.95 * (3 + 0.5)) / 16)
    assert row["paper_with_lo_copy"] == pytest.approx((0.05 * 8 + 3.5) / 16)
    g64 = bytes_row(preset("rtn-int4").replace(group_size=64), 64, 128)
    assert (g64["bytes_per_token"], g64["lo_kv"]) == (72, 72)              # rtn-int4 g32: 80


def test_split_width_rows_and_cli(capsys):
    """K4/V3 and K4/V2 of the default (issue 26's candidates) at D = 64, N = 128: lo K 32 + 4 B s/z,
    lo V 24 (INT3) or 16 (INT2) + 4 B s/z, hi and bookkeeping as the default -> 70 and 62 B."""
    from mikv_vllm.cli import main

    k4v3 = bytes_row(preset("mikv-int4-r03").replace(v_bits=3), 64, 128)
    assert (k4v3["bytes_per_token"], k4v3["lo_kv"], k4v3["hi_kv"], k4v3["k_bits"], k4v3["v_bits"]) == (70, 64, 4, 4, 3)
    assert bytes_row(preset("mikv-int4-r03").replace(v_bits=2), 64, 128)["bytes_per_token"] == 62
    # paper accounting averages the two widths: bpe(lo) = 3.5 + 32/64
    assert k4v3["paper_fraction"] == pytest.approx((0.03 * 8 + 0.97 * 4.0) / 16)
    assert main(["bytes", "--head-dims", "64", "--block-sizes", "128",
                 "--configs", "mikv-int4-r03", '{"preset": "mikv-int4-r03", "v_bits": 3}', "mikv"]) == 0
    out = capsys.readouterr().out
    assert "| mikv-int4-r03 | 4 | 64 | 128 | 4 | 78 |" in out and "| mikv-int4-r03+custom | K4/V3 | 64 | 128 | 4 | 70 |" in out
    assert "| mikv | K4/V3 | 64 | 128 | 4 | 68 |" in out                    # the default: 3-byte group metadata
