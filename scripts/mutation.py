#!/usr/bin/env python3
"""Named mutations of MiKV's semantics: each must be killed by the fast tests.

Every mutation injects one bug into *every* path that implements the behaviour (torch
reference, batched decode, Triton kernels), so that tests comparing two implementations
cannot hide it. Each runs in a scratch copy of the repository (the work tree is never
touched) with ``pytest -x`` over the fast suites (``tests/core``, ``tests/kernels`` under
``TRITON_INTERPRET=1``); a mutation survives when that run passes.

    python scripts/mutation.py                 # all; exit 1 if any survives
    python scripts/mutation.py --list
    python scripts/mutation.py --only sinks-not-pinned promoted-score-stale
    python scripts/mutation.py --root OTHER_CHECKOUT   # e.g. an older commit, for a before/after
    python scripts/mutation.py --files mikv_vllm/cpu/mikv_decode.cpp   # one implementation's edits alone

Not part of CI (about 1-3 min per mutation on 2 cores). ``scripts/mutation.sh`` wraps it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# semantics tests first (pytest -x stops at the first failure; later paths are deduplicated), the
# tests that compile C++ op variants (test_build, test_isa_variants: minutes each) last
TESTS = ["tests/kernels/test_ops_contract.py", "tests/core/test_importance.py", "tests/core/test_selection.py",
         "tests/core/test_reference.py", "tests/core/test_decode_batch.py", "tests/core/test_shared_prefix.py",
         "tests/core/test_quant.py", "tests/cpu/test_cpu_ops.py", "tests/cpu/test_cpu_prefill.py",
         "tests/cpu/test_cpu_qdot.py", "tests/cpu/test_cpu_nonfinite.py", "tests/cpu/test_cpu_fuzz.py",
         "tests/cpu/test_cpu_layout.py", "tests/kernels", "tests/core", "tests/test_ops_at_start.py",
         "tests/test_ops_select_bits.py", "tests/cpu/test_isa_variants.py", "tests/cpu/test_build.py", "tests/cpu"]

REF = "mikv_vllm/core/reference.py"
# The torch code of REF's edits since the op sets split off (core/page.py: the per-request page steps;
# ops/torch_decode.py: the batched decode; ops/torch_chunks.py: the bounded chunk attention): an edit on
# REF applies to every one of these files that holds its text (an older checkout: reference.py alone).
PAGE = "mikv_vllm/core/page.py"
TDEC = "mikv_vllm/ops/torch_decode.py"
TCH = "mikv_vllm/ops/torch_chunks.py"
TORCH = (REF, PAGE, TDEC, TCH)
CPO = "mikv_vllm/cpu/ops.py"
KOP = "mikv_vllm/kernels/ops.py"
TOP = "mikv_vllm/ops/torch_ops.py"
IMP = "mikv_vllm/core/importance.py"
QNT = "mikv_vllm/core/quant.py"
BAL = "mikv_vllm/core/balancer.py"
KST = "mikv_vllm/kernels/store.py"
KDE = "mikv_vllm/kernels/decode.py"
KUP = "mikv_vllm/kernels/upkeep.py"
KSP = "mikv_vllm/kernels/step.py"
KUT = "mikv_vllm/kernels/upkeep_tiled.py"
KRT = "mikv_vllm/kernels/rotate.py"
CPP = "mikv_vllm/cpu/mikv_decode.cpp"
CLY = "mikv_vllm/cpu/mikv_layout.h"
CFP = "mikv_vllm/cpu/mikv_fp.h"
CCD = "mikv_vllm/cpu/mikv_codes.h"
CSL = "mikv_vllm/cpu/mikv_select.h"
CST = "mikv_vllm/cpu/mikv_steps.h"   # the steps decode and prefill share
ROT = "mikv_vllm/core/rotation.py"
PRE = "mikv_vllm/cpu/mikv_prefill.cpp"
BLD = "mikv_vllm/cpu/build.py"
BKD = "mikv_vllm/vllm_glue/backend.py"
LAY = "mikv_vllm/core/layout.py"
QDT = "mikv_vllm/cpu/mikv_qdot.h"
T512 = "mikv_vllm/cpu/mikv_tiles512.h"   # the exact mode's AVX-512 decode loops


@dataclass(frozen=True)
class Mutation:
    name: str
    why: str
    edits: tuple[tuple[str, str, str], ...]   # (file, exact old text, new text); every occurrence


MUTATIONS = [
    Mutation("promoted-score-stale", "a token promoted into a hi slot inherits the slot's previous score",
             ((REF, "        slot_scores[hh, slot] = new_scores[hh, jj].to(layout.score_dtype)\n", ""),
              (REF, "        views.score[blk, hh, rr] = new_score[bb, hh, 0].to(layout.score_dtype)\n", ""),
              (KUP, "    tl.store(score_ptr + fblk * sc_sb + h * sc_sh + fslot % R, new_sc.to(score_ptr.dtype.element_ty), mask=new_kept)\n", ""),
              (CSL, "  slot_scores(L, reg)[r] = score;\n", "  (void)score;\n"))),
    Mutation("new-token-score-lost", "a new token competes with score 0 instead of its attention mass",
             ((REF, "    new_scores = mass[:, ctx_len:seq_len].to(dev).float()", "    new_scores = 0 * mass[:, ctx_len:seq_len].to(dev).float()"),
              (REF, "    new_score = mass.to(regions.device).float()", "    new_score = 0 * mass.to(regions.device).float()"),
              (KUP, "    new_sc = tl.load(nm_ptr + b * snmb + h * snmh).to(tl.float32)\n", "    new_sc = tl.load(nm_ptr + b * snmb + h * snmh).to(tl.float32) * 0.0\n"),
              (CSL, "inline float new_token_score(float mass) { return std::min(mass,", "inline float new_token_score(float mass) { return 0.f * std::min(mass,"))),
    Mutation("tag-reset-removed", "a reused block keeps the previous request's hi tags",
             ((REF, "        views.tag[blk[off == 0]] = 0\n", "        pass\n"),
              (KST, "mask=(ri < R) & (ri + off == ri))", "mask=(ri < R) & (ri + off == ri) & (ri < 0))"),
              (CST, "      if (off == 0) std::memset(reg + L.tag, 0, R * sizeof(int32_t));\n", ""))),
    Mutation("score-off-by-one", "each hi token's score gets the next position's attention mass",
             ((REF, "    add = mass.float().gather(1, torch.where(live, tags - 1, 0))", "    add = mass.float().gather(1, torch.where(live, tags, 0))"),
              (REF, "    add = mass.float().gather(2, torch.where(live, tags - 1, 0))", "    add = mass.float().gather(2, torch.where(live, tags, 0))"),
              (KDE, "    p = tl.where(live, tags - 1, 0).to(tl.int64)", "    p = tl.where(live, tags, 0).to(tl.int64)"),
              (CSL, "sc[r] = std::min(sc[r] + mass[t - 1], top);", "sc[r] = std::min(sc[r] + mass[t], top);"))),
    Mutation("sinks-not-pinned", "no sink floor: short prompts get no sink at high precision",
             ((IMP, "budget = torch.maximum(by_ratio, sinks) if config.hi_ratio > 0 else by_ratio",
               "budget = by_ratio"),
              (CSL, "const int64_t budget = sel.ratio > 0 ? std::max(by_ratio, sinks) : by_ratio;",
               "const int64_t budget = by_ratio;"))),
    Mutation("sinks-lose-priority", "sinks rank below the recent window",
             ((IMP, "SINK, RECENT, HEAVY, NOT_A_CANDIDATE = 2, 1, 0, -1",
               "SINK, RECENT, HEAVY, NOT_A_CANDIDATE = 0, 2, 1, -1"),
              (CSL, "constexpr int32_t kSink = 2, kRecent = 1, kHeavy = 0;",
               "constexpr int32_t kSink = 0, kRecent = 2, kHeavy = 1;"))),
    Mutation("recent-window-off", "the default recent window is empty",
             ((IMP, "    return budget // 2\n", "    return budget * 0\n"),
              (CSL, "sel.window >= 0 ? sel.window : budget / 2;", "sel.window >= 0 ? sel.window : budget * 0;"))),
    Mutation("heavy-hitters-inverted", "heavy hitters ranked by lowest accumulated score",
             ((IMP, "torch.where(tier == RECENT, pos.double(), score))",
               "torch.where(tier == RECENT, pos.double(), -score))"),
              (CSL, "tier == kRecent ? static_cast<double>(p) : key;", "tier == kRecent ? static_cast<double>(p) : -key;"))),
    Mutation("scores-not-accumulated", "attention mass never reaches the page scores",
             ((REF, "    new = torch.where(live, (cur + add).clamp(max=top), cur)", "    new = torch.where(live, cur, cur)"),
              (KDE, "tl.store(ptr, tl.minimum(cur + mass, top)", "tl.store(ptr, tl.minimum(cur + 0.0 * mass, top)"),
              (CSL, "sc[r] = std::min(sc[r] + mass[t - 1], top);", "sc[r] = std::min(sc[r] + 0.f * mass[t - 1], top);"))),
    Mutation("demotion-skipped", "tokens that lose the selection keep their hi tag",
             ((REF, "new_tags = torch.where(keep[:, :num_slots], tags, torch.zeros_like(tags))", "new_tags = tags.clone()"),
              (REF, "new_tags = torch.where(keep[..., :num_slots], tags, torch.zeros_like(tags))", "new_tags = tags.clone()"),
              (CST, "    if (!keep[s]) tags[s] = 0;\n", "    (void)keep[s];\n"))),
    Mutation("hi-copy-ignored", "attention reads the lo copy of hi tokens",
             ((REF, "hh, slot = torch.nonzero((tags > 0) & (tags <= limit), as_tuple=True)",
               "hh, slot = torch.nonzero((tags < 0), as_tuple=True)"),
              (REF, "bb, hh, ss = torch.nonzero(slot_own & (tags > 0) & (tags <= limit), as_tuple=True)",
               "bb, hh, ss = torch.nonzero(slot_own & (tags < 0), as_tuple=True)"),
              (KDE, "            is_hi = slot >= 0\n            lo_m = pm & (slot < 0)",
               "            is_hi = slot < -1\n            lo_m = pm"),
              (CST, "      if (t > 0 && t <= lim) hmap[t - 1] = static_cast<int32_t>(j * R + r);", "      (void)t;"))),
    Mutation("shared-hi-unstable", "a reader uses every hi copy of shared blocks, also ones the writer changes later",
             ((REF, "        limit[: int(own_from) * layout.hi_slots] = min(int(shared_hi), ctx_len)    # shared blocks\n", ""),
              (REF, "            limit = torch.where(shared, torch.minimum(limit, shared_hi.to(pos.device)[:, None]), limit)\n",
               "            limit = torch.where(shared, limit, limit)\n"),
              (CST, "const int64_t lim = j < own_from ? std::min(shared_hi, ctx) : ctx;", "const int64_t lim = ctx;"))),
    Mutation("shared-scores-written", "a reader adds its attention mass to the scores of shared blocks",
             ((REF, "    blocks = block_row.to(regions.device).long()[int(own_from):_num_blocks(length, n)]",
               "    blocks = block_row.to(regions.device).long()[:_num_blocks(length, n)]"),
              (REF, "    own = _owned(own, own_from)\n    tags = _per_head(views.tag[blocks]).long()", "    tags = _per_head(views.tag[blocks]).long()"),
              (CSL, "  for (int64_t j = own_from; j < nb; ++j) {\n    const int32_t* tags = slot_tags(L, region(j));",
               "  for (int64_t j = 0; j < nb; ++j) {\n    const int32_t* tags = slot_tags(L, region(j));"))),
    Mutation("hi-cast-unclamped", "hi copies cast to the hi dtype without clamping (inf in fp16)",
             ((QNT, "    return torch.nan_to_num(x.float(), nan=0.0).clamp(-top, top).to(dtype)",
               "    return torch.nan_to_num(x.float(), nan=0.0).to(dtype)"),
              (CFP, "auto clamp = [top](float v) { return std::isnan(v) ? 0.f : std::min(std::max(v, -top), top); };",
               "auto clamp = [top](float v) { (void)top; return std::isnan(v) ? 0.f : v; };"))),
    Mutation("balancer-not-undone", "dequantized keys are not divided by the balancer",
             ((BAL, "    return k_hat.float() * (1.0 / b.float())", "    return k_hat.float()"),
              (KDE, "                kx = kx * binv[None, :]\n", "                kx = kx\n"),
              (QDT, "      ql[d] = qs[g * D + d] / bal[d];", "      ql[d] = qs[g * D + d];"))),
    Mutation("balancer-wrong-gqa-group", "query heads grouped to the wrong KV head",
             ((BAL, "q.float().abs().reshape(*lead, t, hkv, hq // hkv, d).amax(dim=(-4, -2))",
               "q.float().abs().reshape(*lead, t, hq // hkv, hkv, d).amax(dim=(-4, -3))"),)),
    Mutation("quant-truncates", "codes truncated instead of rounded to nearest",
             ((QNT, "codes = torch.floor(t + 0.5).clamp_(0, qmax)", "codes = torch.floor(t).clamp_(0, qmax)"),
              (KST, "tl.floor(t + 0.5)", "tl.floor(t)"),
              (CCD, "      float c = std::floor(t + 0.5f);", "      float c = std::floor(t);"))),
    Mutation("window-scorer-votes-all", "the window scorer counts every query row",
             ((REF, "        return max(0, num_rows - config.obs_window)\n", "        return 0\n"),)),
    Mutation("evicted-tokens-attended", "h2o: tokens outside the hi set still get attention weight",
             ((REF, "        logits = torch.einsum(\"hgtd,hsd->hgts\", qh[:, :, i0:i1], keys[:, :e])\n",
               "        logits = torch.einsum(\"hgtd,hsd->hgts\", qh[:, :, i0:i1], keys[:, :e])\n        key_ok = torch.ones_like(key_ok)\n"),
              (REF, "        if not all_valid:   # evicted tokens", "        if False:   # evicted tokens"),
              (KDE, "            ok = is_hi\n", "            ok = pm\n"),
              (CPP, "      for (int64_t t = 0; t < pos; ++t) lg[g * S + t] = NEG_INF;", "      for (int64_t t = 0; t < pos; ++t) lg[g * S + t] = 0.f;"))),
    Mutation("fp8-hi-misread", "the C++ op reads fp8 hi copies with the lowest mantissa bit dropped",
             ((CFP, "out[d] = tab.t[base[d]];", "out[d] = tab.t[base[d] & 0xfe];"),)),
    Mutation("qdot-zero-point-dropped", "the C++ decode's logits on the codes lose the zero-point term z * sum(q)",
             ((QDT, "      Q.qsum[g * NG + d / group] += ql[d];", "      Q.qsum[g * NG + d / group] += 0.f * ql[d];"),)),
    Mutation("tiles512-transpose-wrong", "the AVX-512 QK tile reads channels 8-11 of each 64 as channels 0-3",
             ((T512, "    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);", "    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);"),)),
    Mutation("tiles512-pv-group-weight", "the AVX-512 P.V tile weights every channel with its first group's scale",
             ((T512, "kv[jv] = static_cast<int>(16 * jv / group);", "kv[jv] = 0 * static_cast<int>(16 * jv / group);"),)),
    Mutation("decode-split-segment-dropped", "the C++ decode split over the context (small batches) skips each task's last segment",
             ((CPP, "      for (int64_t s = 0; s < states[i].nseg; ++s) work.emplace_back(i, s);",
               "      for (int64_t s = 0; s < states[i].nseg - 1; ++s) work.emplace_back(i, s);"),)),
    Mutation("qdot-int8-scale-wrong", "the int8 query is dequantized with amax / 128 instead of amax / 127",
             ((QDT, "    Q.qa[g] = amax / 127.f;", "    Q.qa[g] = amax / 128.f;"),)),
    # issue 28: non-finite inputs and page validation (killed by tests/core/test_nonfinite.py,
    # tests/cpu/test_cpu_nonfinite.py, tests/cpu/test_cpu_fuzz.py, tests/kernels/test_nonfinite.py)
    Mutation("nan-guard-removed", "NaN reaches the quantizer and the hi store (undefined code cast, inf zero point)",
             ((QNT, "    xg = _grouped(finite_for_lo(x), group)", "    xg = _grouped(x.float().clamp(-FP16_MAX, FP16_MAX), group)"),
              (QNT, "    return torch.nan_to_num(x.float(), nan=0.0).clamp(-top, top).to(dtype)",
               "    return x.float().clamp(-top, top).to(dtype)"),
              (CFP, "inline float finite_for_lo(float v) { return std::isnan(v) ? 0.f :",
               "inline float finite_for_lo(float v) { return false ? 0.f :"),
              (CFP, "auto clamp = [top](float v) { return std::isnan(v) ? 0.f :", "auto clamp = [top](float v) { return std::isnan(v) ? v :"),
              (KST, "tl.where(x != x, 0.0, x)", "x"),
              (KUP, "    k = tl.where(k != k, 0.0,", "    k = tl.where(k != k, k,"),
              (KUP, "    v = tl.where(v != v, 0.0,", "    v = tl.where(v != v, v,"),
              (KUT, "            v = tl.where(v != v, 0.0,", "            v = tl.where(v != v, v,"))),
    Mutation("input-sanitize-removed", "the op sets take non-finite q/k/v as they come (0 * NaN reaches other rows)",
             ((REF, "    q, k, v = finite_inputs(q), finite_inputs(k), finite_inputs(v)\n", ""),
              (TOP, "\n        q, k, v = finite_inputs(q), finite_inputs(k), finite_inputs(v)   # non-finite inputs: docs/design.md\n",
               "\n"),
              (TOP, "\n    q, k, v = finite_inputs(q), finite_inputs(k), finite_inputs(v)   # non-finite inputs: docs/design.md\n",
               "\n"),   # run_chunks: the torch and Triton op sets' chunks
              (CST, "  return bad ? at::nan_to_num(x, 0.0, 65504.0, -65504.0) : x;", "  return x;"),
              (KSP, "    return tl.where(x != x, 0.0, tl.minimum(tl.maximum(x, -65504.0), 65504.0))", "    return x"),
              (KDE, "        q = tl.where(qf != qf, 0.0, tl.minimum(tl.maximum(qf, -65504.0), 65504.0)).to(q.dtype)",
               "        q = qf.to(q.dtype)"),
              (KUT, "            k = tl.where(k != k, 0.0, tl.minimum(", "            k = tl.where(k != k, k, tl.minimum("))),
    Mutation("layout-check-removed", "the C++ ops trust a layout meta whose sub-arrays leave the region",
             ((CLY, "  check_layout_extents(l);\n", ""),)),
    Mutation("selection-check-removed", "the C++ ops take a NaN / inf / negative hi ratio (undefined float -> int cast)",
             ((CSL, "  TORCH_CHECK(std::isfinite(ratio) && ratio >= 0 && ratio <= 1 && sinks >= 0 && window >= -1,",
               "  TORCH_CHECK(true || (std::isfinite(ratio) && ratio >= 0 && ratio <= 1 && sinks >= 0 && window >= -1),"),)),
    # one per op set, each killed by the op contract test (tests/kernels/test_ops_contract.py)
    Mutation("torch-ops-store-unbalanced", "the batched torch op set stores decode keys without the balancer (page bytes)",
             ((TDEC, "    store_at(regions, layout, blk, pos % layout.block_size, k, v, b)\n",
               "    store_at(regions, layout, blk, pos % layout.block_size, k, v, None)\n"),)),
    Mutation("cpu-ops-wrong-scale", "the C++ op set's decode call gets a 1 % larger softmax scale (outputs, scores)",
             ((CPO, "    return module.decode_step(regions, cpp_layout(layout, module), block_tables, pos, q, k, v, float(scale), True,",
               "    return module.decode_step(regions, cpp_layout(layout, module), block_tables, pos, q, k, v, float(scale) * 1.01, True,"),)),
    Mutation("triton-ops-store-unbalanced", "the Triton op set stores decode keys without the balancer (page bytes)",
             ((KSP, "                k = k * tl.load(baddr).to(tl.float32)\n", "                k = k\n"),)),
    # issue 26: keys and values at their own widths
    Mutation("kv-bits-swapped", "the oracle and the torch op set quantize / read keys at v_bits and values at k_bits",
             ((PAGE, "        pk, sk = quantize(kb, layout.k_bits, layout.group, layout.scale_fp8)\n        pv, sv = quantize(v.float(), layout.v_bits, layout.group, layout.scale_fp8)\n",
               "        pk, sk = quantize(kb, layout.v_bits, layout.group, layout.scale_fp8)\n        pv, sv = quantize(v.float(), layout.k_bits, layout.group, layout.scale_fp8)\n"),
              (PAGE, "    k, v = lo(views.k_lo, views.k_sz, layout.k_bits), lo(views.v_lo, views.v_sz, layout.v_bits)",
               "    k, v = lo(views.k_lo, views.k_sz, layout.v_bits), lo(views.v_lo, views.v_sz, layout.k_bits)"),
              (TDEC, "        k, v = lo(views.k_lo, views.k_sz, layout.k_bits), lo(views.v_lo, views.v_sz, layout.v_bits)",
               "        k, v = lo(views.k_lo, views.k_sz, layout.v_bits), lo(views.v_lo, views.v_sz, layout.k_bits)"))),
    Mutation("kv-bits-swapped-layout", "the page layout gives keys v_bits and values k_bits (self-consistent: only "
             "a fake-quant reference or the byte offsets tell)",
             ((LAY, "        n, d, kb, vb = block_size, head_dim, config.k_bits, config.v_bits\n",
               "        n, d, kb, vb = block_size, head_dim, config.v_bits, config.k_bits\n"),)),
    Mutation("fp8-scale-not-rounded", "fp8-scale pages store fp16 scales cut to their high byte (rounded down, "
             "not up: codes no longer cover the group)",
             ((PAGE, "        pk, sk = quantize(kb, layout.k_bits, layout.group, layout.scale_fp8)\n        pv, sv = quantize(v.float(), layout.v_bits, layout.group, layout.scale_fp8)\n",
               "        pk, sk = quantize(kb, layout.k_bits, layout.group)\n        pv, sv = quantize(v.float(), layout.v_bits, layout.group)\n"),)),
    # ... in the Triton op set (tests/kernels/test_store.py, test_decode.py, test_ops_contract.py)
    Mutation("triton-v-read-at-k-width", "the Triton attention dequantizes value codes at the key width",
             ((KDE, "vlo_sn, sz_sb, sz_sh, sz_sn, D, VB, GS, BLOCK_N, FP8S)", "vlo_sn, sz_sb, sz_sh, sz_sn, D, KB, GS, BLOCK_N, FP8S)"),)),
    Mutation("triton-v-stored-at-k-width", "the Triton store (old path and decode step) packs value codes at the key width",
             ((KST, "vsz + sz, D, VB, GS, FP8S)", "vsz + sz, D, KB, GS, FP8S)"),
              (KSP, "vsz + sz, D, VB, GS, FP8S)", "vsz + sz, D, KB, GS, FP8S)"))),
    Mutation("triton-fp8-scale-misread", "the Triton attention reads an fp8-scale group's scale from the zero's high byte",
             ((KDE, "s1 = tl.load(sz_ptr + zb[:, None] + gi[None, :] + 2,", "s1 = tl.load(sz_ptr + zb[:, None] + gi[None, :] + 1,"),)),
    Mutation("triton-fp8-scale-not-rounded-up", "the Triton store keeps the fp16 scale for the codes and stores its high "
             "byte (rounded down: codes no longer cover the group)",
             ((KST, "        scale = e5m2_round_up(scale)\n", ""),)),
    # the C++ op set at its own widths and metadata (tests/cpu, tests/kernels/test_ops_contract.py)
    Mutation("cpp-v-read-at-k-bits", "the C++ ops read the lo values at k_bits (decode P.V, prefill context)",
             ((CPP, "    with_bits(L.v_bits, [&](auto vb) {", "    with_bits(L.k_bits, [&](auto vb) {"),
              (PRE, "  with_bits(L.v_bits, [&](auto vb) {", "  with_bits(L.k_bits, [&](auto vb) {"))),
    Mutation("cpp-k-stored-at-v-bits", "the C++ store quantizes keys at v_bits (page bytes)",
             ((CST, "quantize_token(xk, D, L.k_bits, L.group", "quantize_token(xk, D, L.v_bits, L.group"),)),
    Mutation("cpp-fp8-scale-misread", "the C++ ops decode an fp8-scale record's scale from the zero's high byte",
             ((CCD, "s = half_to_float(static_cast<uint16_t>(r[2] << 8));", "s = half_to_float(static_cast<uint16_t>(r[1] << 8));"),)),
    Mutation("cpp-fp8-scale-rounded-down", "the C++ store cuts the fp16 scale to its e5m2 byte instead of rounding "
             "it up (codes no longer cover the group; page bytes)",
             ((CCD, "(h + 0xFF) & 0x7F00", "h & 0x7F00"),)),
    # issue 25: the CUDA-graph-capturable decode step (tests/kernels/test_layer_probe.py, test_capture.py,
    # test_nonfinite.py)
    Mutation("layer-host-sync", "the Triton decode reads a device value on the host inside the layer",
             ((KOP, "        buf, table = plan.kernel[\"triton_step\"]\n",
               "        buf, table = plan.kernel[\"triton_step\"]\n        assert int(buf.seq.max()) >= 0\n"),)),
    Mutation("layer-data-dependent-shape", "the Triton decode selects its live rows with nonzero (a data-dependent shape)",
             ((KOP, "        buf, table = plan.kernel[\"triton_step\"]\n",
               "        buf, table = plan.kernel[\"triton_step\"]\n        table = table[torch.nonzero(buf.seq[: table.shape[0]] >= 0).flatten()]\n"),)),
    Mutation("nan-score-ranked-high", "the Triton upkeep ranks a NaN score above every other (a NaN heavy hitter stays forever)",
             ((KUP, "    sc = tl.where(sc != sc, -float(\"inf\"), sc)", "    sc = tl.where(sc != sc, float(\"inf\"), sc)"),
              (KUT, "sc_key = tl.where(heavy, tl.where(sc != sc, -float(\"inf\"), sc), 0.0)",
               "sc_key = tl.where(heavy, tl.where(sc != sc, float(\"inf\"), sc), 0.0)"),
              (KUT, "tl.where(new_sc != new_sc, -float(\"inf\"), new_sc)", "tl.where(new_sc != new_sc, float(\"inf\"), new_sc)"))),
    Mutation("upkeep-tiles-misranked", "the tiled upkeep keeps the higher-scored heavy hitter of two tiles as the loser",
             ((KUT, "(s_min < bs_)", "(s_min > bs_)"),)),
    Mutation("padded-rows-write", "rows of a captured batch's padding (seq_len 0) store into the page",
             ((KSP, "    if seq > 0:                                          # seq 0: a padded row, no-op",
               "    if seq >= 0:                                          # seq 0: a padded row, no-op"),)),
    Mutation("triton-hi-lookup-own-block", "the Triton decode looks a position's hi copy up among its own block's "
             "tags only (hi copies live in any block of the row: core.layout)",
             ((KSP, "        ok = m & (tag > 0) & (tag <= tl.where(s < own_slot, tl.minimum(ctx, shi), ctx))\n",
               "        ok = m & (tag > 0) & (tag <= tl.where(s < own_slot, tl.minimum(ctx, shi), ctx)) & "
               "((tag - 1) // N == s // R)\n"),
              (KDE, "    ok = (tags > 0) & (tags <= ctx[:, None, None, None]) & live[:, :, None, None]\n",
               "    ok = (tags > 0) & (tags <= ctx[:, None, None, None]) & live[:, :, None, None] & "
               "((tags - 1) // n == torch.arange(nb, device=dev)[None, :, None, None])\n"))),
    # issue 25: shared-prefix rows on the Triton decode step (tests/kernels/test_ops_contract.py, test_capture.py)
    Mutation("triton-shared-score-written", "a reader's slot-score kernel accumulates scores into its shared blocks' slots",
             ((KSP, "    own = (s < nslots) & (s >= tl.load(own_ptr + b) * R)\n", "    own = s < nslots\n"),)),
    Mutation("triton-shared-hi-unbounded", "a reader's decode reads the shared blocks' hi copies beyond shared_hi",
             ((KSP, "tl.where(s < own_slot, tl.minimum(ctx, shi), ctx)", "tl.where(s < own_slot, ctx, ctx)"),)),
    Mutation("triton-shared-slots-upkept", "a reader's hi upkeep walks (and demotes in) its shared blocks' slots",
             ((KUT, "        first = tl.load(own_ptr + b) * R ", "        first = tl.load(own_ptr + b) * 0 "),)),
    Mutation("rotation-not-orthogonal", "the Hadamard rotation is scaled by 1/D instead of 1/sqrt(D)",
             ((ROT, "    return signs[:, None] * hadamard(d) / math.sqrt(d)", "    return signs[:, None] * hadamard(d) / d"),)),
    # issue 25: the rotation folded into the Triton decode step (tests/kernels/test_rotation_step.py)
    Mutation("triton-output-rotated-not-back", "the merge kernel multiplies the output by R instead of R^T",
             ((KRT, "tl.load(rot_ptr + j[:, None] * D + d[None, :]) * o[None, :]", "tl.load(rot_ptr + d[None, :] * D + j[:, None]) * o[None, :]"),)),
    Mutation("triton-rotated-copies-unused", "the kernels after the store read the model-space q / k / v, not the rotated copies",
             ((KSP, "    q, k, v = qr, kr, vr      # the later kernels", "    pass      # the later kernels"),)),
    Mutation("triton-rotation-not-rounded", "the rotated q / k / v stay fp32 instead of being rounded to the input dtype",
             ((KRT, "    if RND == 1:\n", "    if RND == 7:\n"), (KRT, "    elif RND == 2:\n", "    elif RND == 7:\n"))),
    # issue #24: where and how the C++ op is built and chosen
    Mutation("isa-flags-dropped", "every ISA variant is compiled with the common flags only (no SIMD paths)",
             ((BLD, "    return CFLAGS + list(variant.cflags) + [", "    return CFLAGS + ["),)),
    Mutation("isa-switch-ignored", "MIKV_CPU_ISA is ignored: always the best variant the CPU runs",
             ((BLD, "    if requested == \"auto\":\n", "    if True:\n"),)),
    Mutation("prebuilt-ignored", "the loader skips the install-time builds (every engine compiles at start)",
             ((BLD, "    return [PREBUILT_DIR, build_dir()]", "    return [build_dir()]"),)),
    Mutation("op-loaded-on-first-request", "the backend no longer loads the op at engine start (a request would build it)",
             ((BKD, "        self.stats = LayerStats()\n        load_ops_at_start()\n", "        self.stats = LayerStats()\n"),)),
]


def edits_in(mutation: Mutation, files: list[str] | None) -> tuple[tuple[str, str, str], ...]:
    """The mutation's edits, restricted to ``files`` (repo-relative paths) when given (an edit on REF
    counts for any of the :data:`TORCH` files)."""
    return tuple(e for e in mutation.edits
                 if not files or e[0] in files or (e[0] == REF and any(f in files for f in TORCH)))


# The C++ prefill op's own code of a behaviour (mikv_prefill.cpp; the steps it shares with decode are in
# mikv_steps.h, mutated above) and the torch chunk path's, added to the mutations above.
PRE_EDITS = {
    'balancer-not-undone': ((PRE, 'L.k_packed(), binv.data(), xk.data()', 'L.k_packed(), nullptr, xk.data()'),),
    'window-scorer-votes-all': ((PRE, '(obs_window >= 0 && T > 1) ? std::max<int64_t>(0, T - obs_window) : 0;', '(obs_window >= 0 && T > 1) ? 0 : 0;'),),
    'evicted-tokens-attended': ((TCH, 'yield c0, kc, vc, (lambda i0, i1, ok=ok: ok[:, None, None, :])',
                                 'yield c0, kc, vc, (lambda i0, i1, ok=ok: torch.ones_like(ok)[:, None, None, :])'),
                                (PRE, '      ch.ok[p] = 0;   // evicted: weight exactly 0', '      ch.ok[p] = 1;'),),
    'shared-hi-unstable': ((TCH, '    limit[: int(own_from) * r] = min(int(shared_hi), ctx_len)', '    limit[: int(own_from) * r] = ctx_len'),),
}
# The Triton decode step's copy of each behaviour (kernels/step.py, kernels/upkeep_tiled.py).
STEP_EDITS = {
    'promoted-score-stale': ((KUT, "            tl.store(score_ptr + fblk * sc_sb + h * sc_sh + fslot % R, new_sc.to(score_ptr.dtype.element_ty))\n", ""),),
    'new-token-score-lost': ((KUT, "        new_sc = tl.load(nm_ptr + b * snmb + h).to(tl.float32)\n", "        new_sc = tl.load(nm_ptr + b * snmb + h).to(tl.float32) * 0.0\n"),),
    'tag-reset-removed': ((KSP, "mask=(ri < R) & (ri + off == ri))", "mask=(ri < R) & (ri + off == ri) & (ri < 0))"),),
    'scores-not-accumulated': ((KSP, "        new = cur + mass\n", "        new = cur + 0.0 * mass\n"),),
}
MUTATIONS = [dataclasses.replace(m, edits=m.edits + PRE_EDITS.get(m.name, ()) + STEP_EDITS.get(m.name, ()))
             for m in MUTATIONS]


def targets_of(rel: str) -> tuple[str, ...]:
    """The files an edit of ``rel`` applies to: REF's edits reach every torch file (``TORCH``)."""
    return TORCH if rel == REF else (rel,)


def apply(mutation: Mutation, root: Path, files: list[str] | None = None) -> list[str]:
    """Apply every edit of ``mutation`` (in ``files``, when given) under ``root``; return the edits
    that found no match."""
    missing = []
    for rel, old, new in edits_in(mutation, files):
        targets = [f for f in targets_of(rel) if rel != REF or not files or f in files]
        hit = False
        for target in targets:
            path = root / target
            text = path.read_text() if path.exists() else ""
            if old in text:
                path.write_text(text.replace(old, new))
                hit = True
        if not hit:
            missing.append(f"{rel}: {old.strip()[:60]!r}")
    return missing


def syntax_errors(root: Path, mutation: Mutation) -> list[str]:
    """The Python files ``mutation`` edits that no longer compile under ``root`` (a mutation must
    break behaviour, not the syntax: a SyntaxError would "kill" it without testing anything)."""
    errors = []
    for rel in sorted({t for f, _, _ in mutation.edits for t in targets_of(f)}):
        path = root / rel
        if rel.endswith(".py") and path.exists():
            try:
                compile(path.read_text(), str(path), "exec")
            except SyntaxError as e:
                errors.append(f"{rel}:{e.lineno}: {e.msg}")
    return errors


def run_tests(root: Path, timeout: int, tests: list[str] | None = None) -> tuple[bool, str, float]:
    # the C++ op builds inside the scratch copy: builds of other paths with the same source hash
    # would otherwise share (and rebuild, concurrently) one directory of the user's cache
    env = dict(os.environ, PYTHONPATH=str(root), TRITON_INTERPRET="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1", MIKV_CPU_BUILD_DIR=str(root / ".cpu_build"))
    tests = [t for t in (tests or TESTS) if (root / t.split("::")[0]).exists()]   # an older checkout may lack some files
    cmd = [sys.executable, "-m", "pytest", *tests, "-x", "-q", "-p", "no:cacheprovider", "-m", "not engine",
           "--timeout", str(timeout)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    failed = re.findall(r"^FAILED (\S+)", out, flags=re.M) or re.findall(r"^ERROR (\S+)", out, flags=re.M)
    return proc.returncode == 0, (failed[0] if failed else out.strip().splitlines()[-1] if out.strip() else ""), \
        time.monotonic() - t0


def scratch_copy(src: Path) -> Path:
    dst = Path(tempfile.mkdtemp(prefix="mikv-mutation-"))
    for name in ("mikv_vllm", "tests", "benchmarks", "configs", "deploy"):
        if (src / name).exists():   # configs/: the shipped presets (tests/kernels/test_layer_probe.py); deploy/:
            # the image check (tests/cpu/test_build.py)
            shutil.copytree(src / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(src / "pyproject.toml", dst / "pyproject.toml")
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="mutation names to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout to mutate (default: this one)")
    ap.add_argument("--timeout", type=int, default=900, help="pytest-timeout per test (s)")
    ap.add_argument("--files", nargs="*", help="apply only the edits to these repo-relative files (one "
                    "implementation mutated alone, the others stay correct); mutations without such edits are n/a")
    ap.add_argument("--skip-baseline", action="store_true", help="do not run the unmutated tests first (only "
                    "when they passed on this very code, e.g. resuming a run with --only)")
    ap.add_argument("--tests", nargs="*", help="test paths or node ids to run instead of the default list "
                    "(e.g. tests/cpu with --files naming the C++ sources)")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
        ap.error(f"unknown mutation(s): {unknown}")
    if args.list:
        for m in chosen:
            print(f"{m.name:28s} {m.why}")
        return 0
    root = args.root.resolve()
    base = scratch_copy(root)
    try:
        ok, detail, secs = (True, "", 0.0) if args.skip_baseline else run_tests(base, args.timeout, args.tests)
        print(f"baseline (no mutation): {'skipped' if args.skip_baseline else 'pass' if ok else 'FAIL'} in {secs:.0f} s",
              flush=True)
        if not ok:
            print(f"error: the unmutated tests fail ({detail}); fix them first", file=sys.stderr)
            return 2
        results = []
        for m in chosen:
            work = scratch_copy(root)
            try:
                edits = edits_in(m, args.files)
                missing = apply(m, work, args.files)
                if not edits:
                    status, detail, secs = "n/a", "no edit in " + " ".join(args.files), 0.0
                elif len(missing) == len(edits):
                    status, detail, secs = "n/a", "code to mutate not found: " + "; ".join(missing), 0.0
                elif bad := syntax_errors(work, m):
                    status, detail, secs = "INVALID", "the mutated code does not compile: " + "; ".join(bad), 0.0
                else:
                    survived, detail, secs = run_tests(work, args.timeout, args.tests)
                    status = "SURVIVED" if survived else "killed"
                    if missing:
                        detail += f"  (partial: {len(missing)} edit(s) found nothing)"
            finally:
                shutil.rmtree(work, ignore_errors=True)
            results.append((m, status))
            print(f"{status:9s} {m.name:28s} {secs:5.0f} s  {detail}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    applicable = [r for r in results if r[1] != "n/a"]
    killed = sum(r[1] == "killed" for r in applicable)
    print(f"\nkilled {killed} of {len(applicable)} applicable mutations"
          + (f" ({len(results) - len(applicable)} not applicable)" if len(applicable) < len(results) else ""))
    survivors = [m.name for m, s in results if s in ("SURVIVED", "INVALID")]
    if survivors:
        print("survived or invalid: " + ", ".join(survivors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
