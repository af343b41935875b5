"""MiKVConfig: keys and values at their own widths (k_bits / v_bits) and the lo_bits alias (issue 26)."""

import pytest

from mikv_vllm.config import MiKVConfig, MiKVConfigError, merge_settings, preset


def test_lo_bits_sets_both_and_stays_readable():
    cfg = MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=0.1)
    assert (cfg.k_bits, cfg.v_bits, cfg.lo_bits) == (3, 3, 3)
    assert "lo_bits" not in cfg.to_dict() and cfg.to_dict()["k_bits"] == 3
    split = MiKVConfig(policy="mikv", k_bits=4, v_bits=3, hi_ratio=0.1)
    assert (split.k_bits, split.v_bits, split.lo_bits, split.bits_label) == (4, 3, None, "k4v3")
    assert MiKVConfig(policy="mikv", k_bits=4, v_bits=4, hi_ratio=0.1) == MiKVConfig(policy="mikv", lo_bits=4, hi_ratio=0.1)
    assert MiKVConfig().k_bits == MiKVConfig().v_bits == 2          # the old lo_bits default


@pytest.mark.parametrize("kwargs,field_name", [
    (dict(lo_bits=4, v_bits=3), "lo_bits"),              # lo_bits against a different v_bits
    (dict(lo_bits=4, k_bits=2), "lo_bits"),
    (dict(k_bits=5, v_bits=4), "k_bits"),
    (dict(k_bits=4, v_bits=1), "v_bits"),
    (dict(k_bits=4, v_bits=0), "v_bits"),                # one evicted, one kept
    (dict(k_bits=0, v_bits=4), "v_bits"),
    (dict(k_bits=4.0, v_bits=4), "k_bits"),
    (dict(k_bits=True, v_bits=4), "k_bits"),
    (dict(lo_bits="4"), "lo_bits"),
])
def test_bad_widths_name_the_field(kwargs, field_name):
    with pytest.raises(MiKVConfigError) as excinfo:
        MiKVConfig(policy="mikv", hi_ratio=0.1, **kwargs)
    assert excinfo.value.field == field_name


def test_lo_bits_with_equal_split_widths_is_fine():
    assert MiKVConfig(policy="mikv", hi_ratio=0.1, lo_bits=4, k_bits=4, v_bits=4).lo_bits == 4


def test_eviction_needs_both_zero():
    assert preset("h2o").k_bits == preset("h2o").v_bits == 0 and not preset("h2o").has_lo
    with pytest.raises(MiKVConfigError, match="both evicted"):
        MiKVConfig(policy="h2o", k_bits=0, v_bits=2, hi_ratio=0.2)


def test_replace_and_from_dict_resolve_the_alias():
    base = preset("mikv-int4-r03")                                   # lo_bits 4
    assert base.replace(v_bits=3).k_bits == 4 and base.replace(v_bits=3).v_bits == 3
    assert base.replace(v_bits=3).replace(lo_bits=2).to_dict()["v_bits"] == 2    # lo_bits overrides both
    assert base.replace(lo_bits=3) == base.replace(k_bits=3, v_bits=3)
    cfg = MiKVConfig.from_dict({"preset": "mikv-int4-r03", "v_bits": 3})
    assert (cfg.k_bits, cfg.v_bits, cfg.name) == (4, 3, "mikv-int4-r03+custom")
    assert MiKVConfig.from_dict({"preset": "mikv", "lo_bits": 3}).v_bits == 3
    assert MiKVConfig.from_dict({"preset": "mikv", "v_bits": 3}).name == "mikv"   # no change: the preset's name
    with pytest.raises(MiKVConfigError, match="lo_bits"):
        MiKVConfig.from_dict({"preset": "mikv", "lo_bits": 3, "k_bits": 4})
    assert MiKVConfig.from_dict(cfg.to_dict()) == cfg.replace(name=cfg.to_dict()["name"])
    assert MiKVConfig.parse('{"policy": "rtn", "k_bits": 4, "v_bits": 2, "hi_ratio": 0}').bits_label == "k4v2"


def test_merge_settings():
    assert merge_settings({"lo_bits": 4}, {"v_bits": 3}) == {"k_bits": 4, "v_bits": 3}
    assert merge_settings({"k_bits": 4, "v_bits": 3}, {"lo_bits": 2}) == {"lo_bits": 2}
    assert merge_settings({"k_bits": 4, "v_bits": 3, "hi_ratio": 0.1}, {"hi_ratio": 0.2}) == \
        {"k_bits": 4, "v_bits": 3, "hi_ratio": 0.2}


def test_yaml_file_with_split_widths(tmp_path):
    path = tmp_path / "k4v3.yaml"
    path.write_text("mikv:\n  preset: mikv\n  k_bits: 4\n  v_bits: 3\n")
    cfg = MiKVConfig.from_yaml(path)
    assert (cfg.k_bits, cfg.v_bits, cfg.hi_ratio) == (4, 3, 0.03)
    path.write_text("mikv:\n  preset: mikv\n  lo_bits: 4\n  v_bits: 3\n")
    with pytest.raises(MiKVConfigError, match="lo_bits"):
        MiKVConfig.from_yaml(path)


def test_additional_config_round_trip():
    cfg = MiKVConfig.from_additional_config({"kv_cache_policy": "mikv", "mikv": {"preset": "mikv", "v_bits": 2}})
    assert (cfg.k_bits, cfg.v_bits) == (4, 2)
    again = MiKVConfig.from_additional_config({"kv_cache_policy": "mikv", "mikv": cfg.to_dict()})
    assert again == cfg
