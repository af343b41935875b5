"""Randomised Hadamard rotation: orthogonal, exactly invertible, logits preserved, smaller
quantization error for keys with outlier channels, and the same attention through the page."""

import math

import pytest
import torch

from mikv_vllm.config import MiKVConfig, MiKVConfigError
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.core.quant import fake_quantize
from mikv_vllm.core.rotation import Rotation, hadamard, rotation_for, rotation_matrix

from ._helpers import dense_attention, make_regions, run_request, structured_qkv


@pytest.mark.parametrize("d", [1, 2, 16, 64, 128, 256])
def test_orthogonal_and_deterministic(d):
    r = rotation_matrix(d)
    torch.testing.assert_close(r @ r.T, torch.eye(d), rtol=0, atol=1e-6)
    assert torch.equal(r, rotation_matrix(d))                                     # fixed seed
    assert torch.equal(r.abs(), torch.full((d, d), 1 / math.sqrt(d)))           # a scaled +-1 matrix
    h = hadamard(d)
    assert torch.equal(h @ h.T, d * torch.eye(d))
    if d >= 16:
        assert not torch.equal(r, hadamard(d) / math.sqrt(d))                   # signs are randomised
        assert not torch.equal(r, rotation_matrix(d, seed=1))


@pytest.mark.parametrize("d", [0, 3, 48, 96])
def test_non_power_of_two_raises(d):
    with pytest.raises(ValueError, match="power-of-two"):
        rotation_matrix(d)


def test_inverse_and_dot_products():
    rot = Rotation(64)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 3, 64, generator=gen) * 4, torch.randn(7, 3, 64, generator=gen) * 4
    torch.testing.assert_close(rot.unrotate(rot.rotate(q)), q, rtol=0, atol=1e-5)
    torch.testing.assert_close(rot.rotate(rot.unrotate(k)), k, rtol=0, atol=1e-5)
    want = torch.einsum("thd,shd->hts", q, k)
    got = torch.einsum("thd,shd->hts", rot.rotate(q), rot.rotate(k))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(rot.rotate(q), q)
    x = q.half()
    assert rot.rotate(x).dtype == torch.float16                                  # keeps the input dtype
    assert rotation_for(64) is rotation_for(64)
    with pytest.raises(ValueError, match="head_dim 64"):
        rot.rotate(torch.zeros(2, 32))


@pytest.mark.parametrize("bits,group", [(3, 32), (3, 64), (4, 64), (2, 64)])
def test_rotation_cuts_the_quantization_error_of_outlier_keys(bits, group):
    _, k, _ = structured_qkv(256, 4, 4, 64, seed=3)                               # outlier channels (x8)
    rot = Rotation(64)
    plain = (fake_quantize(k, bits, group) - k).pow(2).sum()
    rotated = (rot.unrotate(fake_quantize(rot.rotate(k), bits, group)) - k).pow(2).sum()
    assert rotated < 0.6 * plain, (float(rotated), float(plain))


def test_rotated_page_attention_equals_plain_attention_when_lossless():
    """All tokens hi in fp32: rotate q/k/v in, unrotate the output = dense attention."""
    cfg = MiKVConfig(policy="mikv", lo_bits=4, hi_ratio=1.0, hi_dtype="float32", rotation=True)
    lay = RegionLayout.build(cfg, 16, 64)
    q, k, v = structured_qkv(40, 4, 2, 64, seed=1)
    rot = rotation_for(64)
    regions = make_regions(lay, 4, 2, garbage=True)
    out = run_request(regions, lay, cfg, torch.tensor([3, 0, 2]), rot.rotate(q), rot.rotate(k), rot.rotate(v),
                      [30, 1, 9], 0.125)
    torch.testing.assert_close(rot.unrotate(out), dense_attention(q, k, v, 0.125), rtol=1e-4, atol=1e-4)


def test_config_key_and_validation():
    cfg = MiKVConfig.from_dict({"preset": "rtn-int4", "rotation": True, "group_size": 32})
    assert cfg.rotation and cfg.validate(64) is cfg
    assert cfg.validate(96) is cfg                          # not an error: the engine runs it unrotated
    assert cfg.for_head_dim(64) == (cfg, None)
    unrotated, why = cfg.for_head_dim(96)
    assert unrotated == cfg.replace(rotation=False) and "power-of-two" in why and "96" in why
    with pytest.raises(MiKVConfigError, match="rotation"):
        MiKVConfig(rotation="yes")
    assert MiKVConfig(group_size=48).validate(96)                                # no rotation: any head_dim
