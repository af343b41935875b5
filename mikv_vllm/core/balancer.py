"""Outlier-aware key channel balancer (MiKV §3.2, mikv-paper.md §6).

``b[h, c] = sqrt(max_t,i |q[t, i, c]| / max_t |k[t, h, c]|)`` where i runs over
the query heads of KV head h (query head i belongs to KV head
``i // (Hq // Hkv)``, vLLM's GQA convention). Keys are multiplied by b before
low-bit quantization and the dequantized keys divided by b again (queries are
left untouched), so ``q . k`` is unchanged while key outlier channels shrink.

Storage: the page keeps b as fp16 (``balancer`` view of the request's first
block). :func:`to_storage` rounds and clamps to ``[2^-14, 2^14]`` so that b and
1/b are finite normal fp16 numbers; both the multiply and the divide must use
the stored value (:func:`from_storage`) for the round trip to be exact.
"""

from __future__ import annotations

import torch

B_MIN, B_MAX = 2.0 ** -14, 2.0 ** 14


def compute_balancer(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Balancer ``b[..., Hkv, D]`` (fp32) from queries ``[..., T, Hq, D]`` and keys ``[..., T, Hkv, D]``.

    The max runs over the T tokens (leading dims are independent requests, e.g. ``[B, 1, Hq, D]``
    for B one-token rows). Channels where max|q| or max|k| is 0 or non-finite get b = 1.
    """
    *lead, t, hq, d = q.shape
    hkv = k.shape[-2]
    if hq % hkv or tuple(k.shape[:-2]) != (*lead, t) or k.shape[-1] != d:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)}")
    qmax = q.float().abs().reshape(*lead, t, hkv, hq // hkv, d).amax(dim=(-4, -2))   # [..., Hkv, D]
    kmax = k.float().abs().amax(dim=-3)                                            # [..., Hkv, D]
    ok = (qmax > 0) & (kmax > 0) & torch.isfinite(qmax) & torch.isfinite(kmax)
    ratio = torch.where(ok, qmax / torch.where(ok, kmax, torch.ones_like(kmax)), torch.ones_like(qmax))
    b = torch.sqrt(ratio)
    return torch.where(torch.isfinite(b) & (b > 0), b, torch.ones_like(b))


def to_storage(b: torch.Tensor) -> torch.Tensor:
    """fp16 value stored in the page: clamped to ``[2^-14, 2^14]``."""
    return b.float().clamp(B_MIN, B_MAX).half()


def from_storage(b16: torch.Tensor) -> torch.Tensor:
    """fp32 balancer as used by store (``k * b``) and read (``k_hat / b``)."""
    return b16.float()


def balance_keys(k: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``k * b`` in fp32 before quantization (shapes broadcast, e.g. ``[T, H, D] * [H, D]``).

    The one implementation of the store side: ``core.reference`` calls it; the Triton store
    kernel computes the same product.
    """
    return k.float() * b


def unbalance_keys(k_hat: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``k_hat * (1 / b)`` in fp32 after dequantization (shapes broadcast).

    Multiplies by the reciprocal of the stored balancer, exactly as the Triton decode kernel
    does, so the torch and kernel paths round the same way.
    """
    return k_hat.float() * (1.0 / b.float())
