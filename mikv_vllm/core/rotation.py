"""Fixed randomised Hadamard rotation of head vectors (``MiKVConfig.rotation``).

``R = diag(s) H / sqrt(D)``: ``H`` the Sylvester Hadamard matrix (D a power of two), ``s`` random
signs from a fixed seed, so ``R`` is orthogonal (``R R^T = I``) and the same in every process.
Rotating queries and keys alike keeps every logit (``(qR)(kR)^T = q k^T``); rotating values
rotates the attention output, which :meth:`Rotation.unrotate` undoes. The rotation spreads an
outlier channel over all channels, so per-token groups quantize it with a smaller step. One
matrix serves every layer and KV head. Maths in fp32; outputs keep the input dtype.
Framework-free (pure torch).
"""

from __future__ import annotations

import math

import torch

SEED = 0x4D694B56  # "MiKV"


def hadamard(d: int) -> torch.Tensor:
    """The ``d x d`` Sylvester Hadamard matrix (entries +-1, fp32); ``d`` a power of two."""
    if d <= 0 or d & (d - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two dimension, got {d}")
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rotation_matrix(d: int, seed: int = SEED) -> torch.Tensor:
    """``diag(s) H / sqrt(d)`` (fp32, orthogonal) with signs ``s`` drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (d,), generator=gen).float() * 2 - 1
    return signs[:, None] * hadamard(d) / math.sqrt(d)


class Rotation:
    """``x -> x R`` over the last dim (:meth:`rotate`) and its inverse ``y -> y R^T``."""

    def __init__(self, head_dim: int, seed: int = SEED):
        self.head_dim = head_dim
        self.matrix = rotation_matrix(head_dim, seed)
        self._on: dict[torch.device, torch.Tensor] = {}

    def _m(self, device: torch.device) -> torch.Tensor:
        if device not in self._on:
            self._on[device] = self.matrix.to(device)
        return self._on[device]

    def _apply(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"rotation of head_dim {self.head_dim} applied to last dim {x.shape[-1]}")
        m = self._m(x.device)
        return (x.float() @ (m.T if transpose else m)).to(x.dtype)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` (q, k or v ``[..., D]``), in ``x``'s dtype."""
        return self._apply(x, False)

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """``y R^T``: the inverse of :meth:`rotate` (attention outputs back to model space)."""
        return self._apply(y, True)


_CACHE: dict[tuple[int, int], Rotation] = {}


def rotation_for(head_dim: int, seed: int = SEED) -> Rotation:
    """The shared :class:`Rotation` of ``head_dim`` (built once per process)."""
    key = (head_dim, seed)
    if key not in _CACHE:
        _CACHE[key] = Rotation(head_dim, seed)
    return _CACHE[key]
