"""The Hadamard rotation (``core.rotation``) inside the decode step's kernels.

A rotated config's decode step takes the model's q / k / v: the store kernel rotates them
(``x -> (x R)`` in fp32, rounded to the input dtype as ``Rotation.rotate``'s ``.to(x.dtype)``),
uses them and leaves them in the step's buffers for the later kernels; the merge kernel writes
the output rotated back (``y -> y R^T``, fp32, as ``Rotation.unrotate``). ``R`` is the
``[D, D]`` fp32 matrix of ``core.rotation.rotation_for``, read from a device buffer in chunks of
``RC`` rows. fp32 sums in another order than torch's matmul: equal to it where the sums are
exact (tests/kernels/test_rotation_step.py), within fp32 rounding elsewhere.
"""

from __future__ import annotations

from ._common import tl, triton
from .upkeep import _bf16_rtne


@triton.jit
def round_to_input(x, RND: tl.constexpr):
    """fp32 ``x`` rounded to the input dtype (RND 0: fp32, 1: fp16, 2: bf16, nearest even), as fp32."""
    if RND == 1:
        x = x.to(tl.float16).to(tl.float32)
    elif RND == 2:
        x = _bf16_rtne(x).to(tl.float32)
    return x


@triton.jit
def rotate_rows(x_ptr, row_off, rmask, rot_ptr, D: tl.constexpr, M: tl.constexpr, RC: tl.constexpr,
                RND: tl.constexpr):
    """fp32 ``[M, D]``: row m (``x_ptr + row_off[m] + [0, D)``, 0 where ``rmask`` is False) times
    ``R``, rounded to the input dtype. M >= 16 (``tl.dot``)."""
    d = tl.arange(0, D)
    acc = tl.zeros((M, D), tl.float32)
    for c0 in tl.static_range(0, D, RC):
        c = c0 + tl.arange(0, RC)
        xc = tl.load(x_ptr + row_off[:, None] + c[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        acc += tl.dot(xc, tl.load(rot_ptr + c[:, None] * D + d[None, :]), input_precision="ieee")
    return round_to_input(acc, RND)


@triton.jit
def rotate_vector(x_ptr, rot_ptr, D: tl.constexpr, RC: tl.constexpr, RND: tl.constexpr):
    """fp32 ``[D]``: the vector at ``x_ptr`` times ``R``, rounded to the input dtype."""
    r = tl.arange(0, 16)
    xr = rotate_rows(x_ptr, r * 0, r < 1, rot_ptr, D, 16, RC, RND)
    return tl.sum(tl.where(r[:, None] == 0, xr, 0.0), axis=0)


@triton.jit
def store_unrotated(out_ptr, o, rot_ptr, D: tl.constexpr, RC: tl.constexpr):
    """Store ``o R^T`` (fp32 ``[D]``; element j = sum_i o_i R[j, i]) at ``out_ptr``."""
    d = tl.arange(0, D)
    for j0 in tl.static_range(0, D, RC):
        j = j0 + tl.arange(0, RC)
        tl.store(out_ptr + j, tl.sum(tl.load(rot_ptr + j[:, None] * D + d[None, :]) * o[None, :], axis=1))
