"""configs/*.yaml through vLLM's real `vllm serve` argument parser.

Each file is loaded exactly as ``vllm serve MODEL --config configs/<name>.yaml``
loads it: vLLM's top-level ``FlexibleArgumentParser`` with the ``serve``
subcommand (``ServeSubcommand.subparser_init`` -> ``make_arg_parser``), then
``AsyncEngineArgs.from_cli_args``. The MiKV flags exist only once the plugin is
registered, so ``mikv_vllm.plugin.register()`` runs first. No engine is started.

Also checks the bytes/token numbers written in each file's comments against the
real page layout, and that bad values fail naming the offending field.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# An existing directory stands in for the model: with HF_HUB_OFFLINE=1 (set by
# tests/conftest.py) EngineArgs resolves a hub id through the local HF cache.
MODEL = str(CONFIGS)

# file stem -> (kv_cache_policy, base preset, fields the file pins on top of it)
EXPECTED = {
    "mikv": ("mikv", "mikv", {}),
    "mikv-paper": ("mikv", "mikv-paper", {"lo_bits": 2, "hi_ratio": 0.2, "hi_dtype": "float16", "balancer": True}),
    "mikv-int3-r05": ("mikv", "mikv-int3-r05", {}),
    "mikv-int4": ("mikv", "mikv-int4", {}),
    "rtn-int4": ("rtn", "rtn-int4", {}),
    "h2o-r20": ("h2o", "h2o", {"hi_ratio": 0.2}),
}
# What each file name promises, independent of how the presets evolve.
PROMISED = {
    "mikv-paper": {"lo_bits": 2, "hi_ratio": 0.2, "hi_dtype": "float16", "balancer": True},
    "mikv-int3-r05": {"lo_bits": 3, "hi_ratio": 0.05},
    "mikv-int4": {"lo_bits": 4, "hi_ratio": 0.2},
    "rtn-int4": {"lo_bits": 4, "hi_ratio": 0.0},
    "h2o-r20": {"lo_bits": 0, "hi_ratio": 0.2},
}


# --------------------------------------------------------------- vLLM parser
@functools.lru_cache(maxsize=1)
def _serve_parser():
    import mikv_vllm.plugin

    mikv_vllm.plugin.register()  # adds --kv-cache-policy / --mikv-* to EngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    # As vllm.entrypoints.cli.main.main() builds it (serve subcommand only).
    parser = FlexibleArgumentParser(description="vLLM CLI")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    cmd = ServeSubcommand()
    cmd.subparser_init(subparsers).set_defaults(dispatch_function=cmd.cmd)
    return parser, cmd


def serve_engine_args(argv: list[str]):
    """EngineArgs for ``vllm <argv>`` (argv starts with 'serve'), as `vllm serve` makes them."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    parser, cmd = _serve_parser()
    args = parser.parse_args(list(argv))
    cmd.validate(args)
    if getattr(args, "model_tag", None) is not None:  # ServeSubcommand.cmd does this
        args.model = args.model_tag
    return AsyncEngineArgs.from_cli_args(args)


def expected_config(stem: str):
    from mikv_vllm.config import preset

    policy, base, pins = EXPECTED[stem]
    return policy, preset(base).replace(**pins)


def _fields(config) -> dict:
    d = config.to_dict()
    d.pop("name")
    return d


# --------------------------------------------------------------------- tests
def test_every_config_file_is_covered():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_config_through_vllm_serve_parser(stem):
    from mikv_vllm.config import MiKVConfig

    path = CONFIGS / f"{stem}.yaml"
    engine_args = serve_engine_args(["serve", MODEL, "--config", str(path)])
    assert engine_args.model == MODEL
    policy, config = expected_config(stem)
    additional = engine_args.additional_config
    assert additional["kv_cache_policy"] == policy
    assert additional["mikv"]["policy"] == policy
    got = {k: v for k, v in additional["mikv"].items() if k != "name"}
    assert got == _fields(config)
    parsed = MiKVConfig.from_additional_config(additional)
    assert parsed is not None and _fields(parsed) == _fields(config)
    for field_name, value in PROMISED.get(stem, {}).items():
        assert getattr(parsed, field_name) == value, (stem, field_name)


def test_cli_flags_after_config_override_it():
    # Documented precedence: CLI > --config file > defaults.
    path = CONFIGS / "mikv.yaml"
    engine_args = serve_engine_args(["serve", MODEL, "--config", str(path), "--mikv-hi-ratio", "0.1"])
    assert engine_args.additional_config["mikv"]["hi_ratio"] == 0.1


def test_page_format_flags_and_yaml_keys(tmp_path):
    """--mikv-rotation / --mikv-hi-dtype float8_e4m3fn / --mikv-group-size, and the same keys in a
    --config file, reach additional_config (issue 14's page formats)."""
    from mikv_vllm.config import MiKVConfig

    engine_args = serve_engine_args(["serve", MODEL, "--kv-cache-policy", "mikv", "--mikv-config", "mikv-int3-r05",
                                     "--mikv-rotation", "--mikv-hi-dtype", "float8_e4m3fn", "--mikv-group-size", "64"])
    got = MiKVConfig.from_additional_config(engine_args.additional_config)
    assert (got.rotation, got.hi_dtype, got.group_size, got.lo_bits, got.hi_ratio) == \
        (True, "float8_e4m3fn", 64, 3, 0.05)
    path = tmp_path / "fmt.yaml"
    path.write_text("kv-cache-policy: rtn\nmikv-config: {preset: rtn-int4, group_size: 64, rotation: true}\n")
    got = MiKVConfig.from_additional_config(serve_engine_args(["serve", MODEL, "--config", str(path)]).additional_config)
    assert (got.rotation, got.group_size, got.lo_bits) == (True, 64, 4)
    off = serve_engine_args(["serve", MODEL, "--config", str(path), "--no-mikv-rotation"]).additional_config
    assert off["mikv"]["rotation"] is False


def test_split_widths_flags_and_yaml_keys(tmp_path):
    """--mikv-k-bits / --mikv-v-bits and k_bits / v_bits in a --config file reach additional_config;
    --mikv-lo-bits after a split config sets both widths (issue 26)."""
    from mikv_vllm.config import MiKVConfig

    engine_args = serve_engine_args(["serve", MODEL, "--kv-cache-policy", "mikv", "--mikv-config", "mikv",
                                     "--mikv-v-bits", "3"])
    got = MiKVConfig.from_additional_config(engine_args.additional_config)
    assert (got.k_bits, got.v_bits, got.hi_ratio) == (4, 3, 0.03)
    assert "lo_bits" not in engine_args.additional_config["mikv"]
    path = tmp_path / "k4v2.yaml"
    path.write_text("kv-cache-policy: mikv\nmikv-config: {preset: mikv, k_bits: 4, v_bits: 2}\n")
    got = MiKVConfig.from_additional_config(serve_engine_args(["serve", MODEL, "--config", str(path)]).additional_config)
    assert (got.k_bits, got.v_bits) == (4, 2)
    both = serve_engine_args(["serve", MODEL, "--config", str(path), "--mikv-lo-bits", "3"]).additional_config
    assert (both["mikv"]["k_bits"], both["mikv"]["v_bits"]) == (3, 3)


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_no_false_booleans(stem):
    # Under `vllm serve`, vLLM's --config loader turns `key: false` into
    # `--no-key` only when the *top-level* parser knows that flag, which it never
    # does for serve options: false is silently dropped (vllm-project/vllm#51401).
    data = yaml.safe_load((CONFIGS / f"{stem}.yaml").read_text())
    assert not [k for k, v in data.items() if v is False], "write false booleans inside mikv-config instead"


_ROW = re.compile(
    r"^#\s+head_dim\s+(\d+), block\s+(\d+): (\d+) B = ([\d.]+)% of fp16 \((\d+) B\)$", re.M)
_CMD = re.compile(r"^#\s+python -c \".*preset\('([\w-]+)'\).*\"$", re.M)
_RESULT = re.compile(r"^#\s+-> \[([\d, ]+)\]$", re.M)


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_bytes_per_token_comments_match_layout(stem):
    from mikv_vllm.config import preset
    from mikv_vllm.core.layout import RegionLayout

    text = (CONFIGS / f"{stem}.yaml").read_text()
    _, config = expected_config(stem)
    rows = _ROW.findall(text)
    assert [(int(d), int(n)) for d, n, *_ in rows] == [(64, 16), (64, 128), (128, 16), (128, 128)]
    for d, n, nbytes, pct, dense in rows:
        d, n = int(d), int(n)
        real = RegionLayout.build(config, n, d).content_bytes
        assert int(nbytes) == real, f"{stem}: head_dim {d} block {n} is {real} B, comment says {nbytes}"
        assert int(dense) == 2 * d * 2
        assert pct == f"{100 * real / (4 * d):.1f}"
    # the quoted command reproduces the quoted output, for the same config
    (cmd_preset,) = _CMD.findall(text)
    (result,) = _RESULT.findall(text)
    measured = [RegionLayout.build(preset(cmd_preset), n, d).content_bytes for d in (64, 128) for n in (16, 128)]
    assert [int(x) for x in result.split(",")] == measured
    assert measured == [int(r[2]) for r in rows]


BAD = [
    # (YAML text, field the error must name)
    ("kv-cache-policy: mikv\nmikv-config: {lo_bitz: 3}\n", "lo_bitz"),
    ("kv-cache-policy: mikv\nmikv-config: {preset: mikv, hi_ratio: 2}\n", "hi_ratio"),
    ("kv-cache-policy: mikv\nmikv-config: {lo_bits: 5}\n", "lo_bits"),
    ("kv-cache-policy: mikv\nmikv-hi-ratio: 2\n", "hi_ratio"),
    ("kv-cache-policy: mikv\nmikv-lo-bits: 5\n", "lo_bits"),
    ("kv-cache-policy: mikv\nmikv-k-bits: 5\n", "k_bits"),
    ("kv-cache-policy: mikv\nmikv-v-bits: 0\n", "v_bits"),
    ("kv-cache-policy: mikv\nmikv-config: {lo_bits: 4, v_bits: 3}\n", "lo_bits"),
    ("kv-cache-policy: rtn\nmikv-config: rtn-int4\nmikv-hi-ratio: 0.2\n", "hi_ratio"),
    ("kv-cache-policy: mikv\nmikv-lo-bitz: 3\n", "--mikv-lo-bitz"),
    ("kv-cache-polcy: mikv\n", "--kv-cache-polcy"),
    ("kv-cache-policy: mikv\nmikv-config: {rotation: 1}\n", "rotation"),
    ("kv-cache-policy: mikv\nmikv-hi-dtype: float8\n", "hi_dtype"),
]


@pytest.mark.parametrize("text,field_name", BAD, ids=[f for _, f in BAD])
def test_bad_config_fails_naming_the_field(tmp_path, capsys, text, field_name):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as excinfo:
        serve_engine_args(["serve", MODEL, "--config", str(path)])
    message = f"{excinfo.value.code}\n{capsys.readouterr().err}"
    if field_name.startswith("--"):
        assert f"unrecognized arguments: {field_name}" in message, message
    else:
        assert f"mikv config field '{field_name}'" in message, message


_DOC_ROW = re.compile(
    r"^\| `configs/([\w-]+)\.yaml` \| (\w+) \| ([\w/]+) \| ([\d.]+) \| (.+?) \| (.+?) \| (.+?) \| (.+?) \|", re.M)


def test_docs_presets_table_matches_layout():
    from mikv_vllm.core.layout import RegionLayout

    rows = {m[0]: m[1:] for m in _DOC_ROW.findall((ROOT / "docs" / "deploy.md").read_text())}
    assert set(rows) == set(EXPECTED)
    for stem, (policy, bits, ratio, *cells) in rows.items():
        _, config = expected_config(stem)
        lo = str(config.k_bits) if config.k_bits == config.v_bits else f"K{config.k_bits}/V{config.v_bits}"
        assert (policy, bits, float(ratio)) == (config.policy, lo, config.hi_ratio), stem
        want = []
        for d in (64, 128):
            for n in (16, 128):
                real = RegionLayout.build(config, n, d).content_bytes
                want.append(f"{real} ({100 * real / (4 * d):.1f}%)")
        assert cells == want, f"docs/deploy.md row {stem}: {cells} != {want}"
