"""Byte layout of one (block, KV head) region of the two-tier MiKV page.

vLLM hands an attention backend a per-layer cache ``[num_blocks, H, N, C]``
(LBHNC: each (block, head) region is ``N*C`` contiguous bytes). MiKV stores in
that region, for all N token positions of the block::

    [K_lo N*Pk][V_lo N*Pv][K s/z N*G*2 fp16][V s/z N*G*2 fp16][tag R i32][score R f32]
    [K_hi R*D][V_hi R*D][balancer D fp16][pad]

* ``K_lo``/``V_lo``: per-token packed codes, ``k_bits`` / ``v_bits`` each (``Pk = D*k_bits/8``,
  ``Pv = D*v_bits/8``; one shared group size), little-endian bit
  stream (element j occupies stream bits ``[j*b, (j+1)*b)``; stream bit
  ``8*m + k`` is bit k of byte m). Keys are multiplied by the balancer first.
* ``s/z``: fp16 (scale, zero) per group of ``G = D / group`` groups per token.
* ``tag``: hi slot s holds token position ``tag - 1``; 0 = empty. A request's hi
  slots are the union of the slots of all its blocks, so a hi token may live in
  any block of its request. Hi K is stored raw (not balanced).
* ``score``: accumulated attention mass of the token in hi slot s (``score_dtype``), meaningful
  while its tag is set. Only hi tokens need one: the candidates of a selection are the hi tokens
  and the tokens just written (whose mass the step has at hand), and a token that is not hi can
  never be hi again, so a score per position would be dead bytes for every other token.
* ``balancer``: per-channel key balancer; only the request's first block's copy
  is meaningful.

Every sub-array is 16-byte aligned; ``C`` is whole bytes (vLLM allocates the page as uint8,
``MiKVAttentionBackend.customize_spec``), so the only padding is the alignment. Framework-free
(pure torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import MiKVConfig

ALIGN = 16
HI_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                   "float8_e4m3fn": torch.float8_e4m3fn}
HI_BITS = {name: torch.finfo(dt).bits for name, dt in HI_TORCH_DTYPES.items()}
SCORE_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def hi_slots_per_block(config: MiKVConfig, block_size: int) -> int:
    """R = ceil(r * N) hi slots per (block, head) region."""
    return math.ceil(config.hi_ratio * block_size - 1e-9)


@dataclass(frozen=True)
class RegionLayout:
    """Offsets (bytes) of every sub-array inside one (block, head) region."""

    block_size: int
    head_dim: int
    k_bits: int
    v_bits: int
    group: int
    hi_slots: int
    hi_dtype: torch.dtype
    score_dtype: torch.dtype
    has_balancer: bool
    # offsets / sizes
    k_lo: int
    v_lo: int
    k_sz: int
    v_sz: int
    score: int
    tag: int
    k_hi: int
    v_hi: int
    balancer: int
    region_bytes: int

    # ---------------------------------------------------------------- build
    @classmethod
    def build(cls, config: MiKVConfig, block_size: int, head_dim: int) -> "RegionLayout":
        config.validate(head_dim)
        n, d, kb, vb = block_size, head_dim, config.k_bits, config.v_bits
        g = config.group_for(head_dim)
        r = hi_slots_per_block(config, block_size)
        hi_dt = HI_TORCH_DTYPES[config.hi_dtype]
        sc_dt = SCORE_TORCH_DTYPES[config.score_dtype]
        hi_es = torch.empty((), dtype=hi_dt).element_size()
        sc_es = torch.empty((), dtype=sc_dt).element_size()
        for name, b in (("k_bits", kb), ("v_bits", vb)):
            if (d * b) % 8:
                raise ValueError(f"head_dim {d} * {name} {b} is not a whole number of bytes")
        groups = d // g if kb else 0
        off = 0
        k_lo = off; off = _align(off + n * (d * kb // 8))
        v_lo = off; off = _align(off + n * (d * vb // 8))
        k_sz = off; off = _align(off + n * groups * 4)
        v_sz = off; off = _align(off + n * groups * 4)
        tag = off; off = _align(off + r * 4)
        score = off; off = _align(off + r * sc_es)
        k_hi = off; off = _align(off + r * d * hi_es)
        v_hi = off; off = _align(off + r * d * hi_es)
        has_bal = config.balancer and kb > 0
        balancer = off; off = _align(off + (d * 2 if has_bal else 0))
        per_token = math.ceil(off / n)  # C in whole bytes
        return cls(n, d, kb, vb, g, r, hi_dt, sc_dt, has_bal, k_lo, v_lo, k_sz, v_sz, score, tag, k_hi,
                   v_hi, balancer, per_token * n)

    # ------------------------------------------------------------- accounting
    @property
    def bits(self) -> int:
        """Transitional: the common lo width of keys and values; ValueError when they differ
        (read ``k_bits`` / ``v_bits``)."""
        if self.k_bits != self.v_bits:
            raise ValueError(f"layout has k_bits {self.k_bits} != v_bits {self.v_bits}: read k_bits / v_bits")
        return self.k_bits

    @property
    def has_lo(self) -> bool:
        """Every token has lo copies (False: eviction)."""
        return self.k_bits > 0

    @property
    def k_packed_bytes(self) -> int:
        """Bytes of one token's packed K codes."""
        return self.head_dim * self.k_bits // 8

    @property
    def v_packed_bytes(self) -> int:
        """Bytes of one token's packed V codes."""
        return self.head_dim * self.v_bits // 8

    @property
    def packed_bytes(self) -> int:
        """Transitional: bytes of one token's packed K (= V) codes; ValueError when widths differ."""
        return self.head_dim * self.bits // 8

    @property
    def groups(self) -> int:
        return self.head_dim // self.group if self.k_bits else 0

    @property
    def content_bytes(self) -> int:
        """C: bytes per token per KV head that vLLM allocates."""
        return self.region_bytes // self.block_size

    def breakdown(self) -> dict[str, float]:
        """Bytes per token per KV head, by purpose (sums to ``content_bytes``)."""
        n = self.block_size
        hi_es = torch.empty((), dtype=self.hi_dtype).element_size()
        sc_es = torch.empty((), dtype=self.score_dtype).element_size()
        lo_kv = self.k_packed_bytes + self.v_packed_bytes + 2 * self.groups * 4
        hi_kv = self.hi_slots * 2 * self.head_dim * hi_es / n
        score = self.hi_slots * sc_es / n
        tags = self.hi_slots * 4 / n
        bal = self.head_dim * 2 / n if self.has_balancer else 0
        used = lo_kv + hi_kv + score + tags + bal
        return {
            "lo_kv": float(lo_kv),
            "hi_kv": hi_kv,
            "score": float(score),
            "tag": tags,
            "balancer": bal,
            "padding": self.content_bytes - used,
            "total": float(self.content_bytes),
        }

    # ------------------------------------------------------------------ views
    def _slice(self, regions: torch.Tensor, off: int, nbytes: int) -> torch.Tensor:
        return regions[..., off:off + nbytes]

    def views(self, regions: torch.Tensor) -> "RegionViews":
        """Typed views into ``regions`` (uint8 ``[..., region_bytes]``)."""
        if regions.dtype != torch.uint8 or regions.shape[-1] != self.region_bytes:
            raise ValueError(f"expected uint8 [..., {self.region_bytes}], got {regions.dtype} {tuple(regions.shape)}")
        lead = regions.shape[:-1]
        n, d, r, g = self.block_size, self.head_dim, self.hi_slots, self.groups
        pk, pv = self.k_packed_bytes, self.v_packed_bytes
        hi_es = torch.empty((), dtype=self.hi_dtype).element_size()
        sc_es = torch.empty((), dtype=self.score_dtype).element_size()

        def typed(off, nbytes, dtype, shape):
            return self._slice(regions, off, nbytes).view(dtype).view(*lead, *shape)

        return RegionViews(
            k_lo=typed(self.k_lo, n * pk, torch.uint8, (n, pk)),
            v_lo=typed(self.v_lo, n * pv, torch.uint8, (n, pv)),
            k_sz=typed(self.k_sz, n * g * 4, torch.float16, (n, g, 2)),
            v_sz=typed(self.v_sz, n * g * 4, torch.float16, (n, g, 2)),
            score=typed(self.score, r * sc_es, self.score_dtype, (r,)),
            tag=typed(self.tag, r * 4, torch.int32, (r,)),
            k_hi=typed(self.k_hi, r * d * hi_es, self.hi_dtype, (r, d)),
            v_hi=typed(self.v_hi, r * d * hi_es, self.hi_dtype, (r, d)),
            balancer=typed(self.balancer, d * 2 if self.has_balancer else 0, torch.float16,
                           (d if self.has_balancer else 0,)),
        )


@dataclass
class RegionViews:
    """Typed views of the sub-arrays; leading dims are those of the regions."""

    k_lo: torch.Tensor      # [..., N, Pk] uint8
    v_lo: torch.Tensor      # [..., N, Pv] uint8
    k_sz: torch.Tensor      # [..., N, G, 2] fp16 (scale, zero)
    v_sz: torch.Tensor      # [..., N, G, 2] fp16
    tag: torch.Tensor       # [..., R] int32, position + 1, 0 = empty
    score: torch.Tensor     # [..., R] score dtype: accumulated mass of the slot's token
    k_hi: torch.Tensor      # [..., R, D] hi dtype (raw, unbalanced)
    v_hi: torch.Tensor      # [..., R, D]
    balancer: torch.Tensor  # [..., D] fp16 (size 0 when off)


def as_regions(kv_cache: torch.Tensor, layout: RegionLayout) -> torch.Tensor:
    """View vLLM's per-layer cache ``[B, H, N, C/es]`` as uint8 ``[B, H, N*C]``."""
    b, h = kv_cache.shape[:2]
    raw = kv_cache.view(torch.uint8) if kv_cache.dtype != torch.uint8 else kv_cache
    try:  # a view, never a copy: writes must reach the cache
        raw = raw.view(b, h, -1)
    except RuntimeError as exc:
        raise ValueError(f"cache of shape {tuple(kv_cache.shape)} / strides {kv_cache.stride()} has no "
                         "contiguous (block, head) regions (LBHNC layout expected)") from exc
    if raw.shape[-1] != layout.region_bytes:
        raise ValueError(f"cache region has {raw.shape[-1]} bytes, layout expects {layout.region_bytes}")
    return raw


def paper_cache_fraction(config: MiKVConfig, head_dim: int) -> float:
    """Cache size relative to fp16 with the paper's accounting (mikv-paper.md §7).

    ``(r*bpe(hi) + (1-r)*bpe(lo)) / 16`` with ``bpe(b) = b + 32/g`` (fp16 scale
    and zero per group) and ``b`` the mean of k_bits and v_bits; no lo copy of hi tokens, no
    bookkeeping.
    """
    r = config.hi_ratio
    return (r * HI_BITS[config.hi_dtype] + (1 - r) * lo_bits_per_element(config, head_dim)) / 16


def lo_bits_per_element(config: MiKVConfig, head_dim: int) -> float:
    """Bits per element of the lo copy, K and V averaged: ``(k_bits + v_bits)/2 + 32/g``
    (fp16 scale and zero per group of g); 0 for eviction."""
    if not config.has_lo:
        return 0.0
    return (config.k_bits + config.v_bits) / 2 + 32 / config.group_for(head_dim)


def dense_bytes_per_token(head_dim: int, dtype_size: int = 2) -> int:
    """Bytes per token per KV head of an uncompressed K+V cache."""
    return 2 * head_dim * dtype_size
