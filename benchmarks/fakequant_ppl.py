"""Independent check of the engine's PPL probe for uniform (rtn) configs: HF transformers, fake quantization.

The model runs in HF transformers (not vLLM, not the MiKV backend) on the engine probe's text (the eval
corpus's first 1024-token PPL window) in 16-token chunks: every query sees its own chunk's K/V raw and
earlier chunks' K/V fake-quantized (``core.quant.fake_quantize``: per token, asymmetric, fp16 scale/zero),
optionally after a randomised Hadamard rotation of each head vector (``x R``, undone with ``R^T``). It
prints the PPL ratio to the full cache per config, to set beside ``benchmarks/ppl_probe.py``'s engine
numbers. Rotations: ``engine`` (the engine's matrix, ``core.rotation``), ``seed=N`` (random signs from
seed N), ``layer`` (another seed per layer)::

    python benchmarks/fakequant_ppl.py int3:g32 int3:g32:engine int3:g32:seed=1 int3:g32:seed=2 int3:g32:layer

Measured (docs/results.md): with the engine's matrix it reproduces the engine within 0.4 % (INT3 g32:
1.089 vs 1.085; INT4 g64: 1.0205 vs 1.020), and the PPL of rotated INT3 moves by +-3 % with the sign
draw, more than rotation's average gain on this model.
"""

from __future__ import annotations

import argparse
import math

import torch


def parse(spec: str) -> tuple[int, int, str | None]:
    """``int<bits>:g<group>[:engine|:seed=N|:layer]`` -> (bits, group, rotation)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0].startswith("int") or not parts[1].startswith("g"):
        raise SystemExit(f"config {spec!r}: expected int<bits>:g<group>[:engine|:seed=N|:layer]")
    return int(parts[0][3:]), int(parts[1][1:]), parts[2] if len(parts) == 3 else None


def rotation(d: int, how: str | None, layer: int) -> torch.Tensor | None:
    from mikv_vllm.core.rotation import rotation_matrix

    if how is None:
        return None
    if how == "engine":
        return rotation_matrix(d)
    if how == "layer":
        return rotation_matrix(d, seed=1000 + layer)
    if how.startswith("seed="):
        return rotation_matrix(d, seed=int(how[5:]))
    raise SystemExit(f"rotation {how!r}: engine, layer or seed=N")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--length", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from mikv_vllm.core.quant import fake_quantize
    from mikv_vllm.eval.data import TokenStream
    from mikv_vllm.model import prepare_model

    path = str(prepare_model(progress=False))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([TokenStream(tok).windows("ppl", args.length, 1)[0]])
    current: dict = {}

    def attention(module, q, k, v, mask, scaling, dropout=0.0, **_):
        bits, group, how = current["cfg"]
        rep = q.shape[1] // k.shape[1]
        kq, vq = k, v
        if bits:
            r = rotation(k.shape[-1], how, module.layer_idx)
            rot = (lambda x: x @ r) if r is not None else (lambda x: x)
            back = (lambda x: x @ r.T) if r is not None else (lambda x: x)
            kq, vq = back(fake_quantize(rot(k), bits, group)), back(fake_quantize(rot(v), bits, group))
        k, v, kq, vq = (t.repeat_interleave(rep, 1) for t in (k, v, kq, vq))
        pos = torch.arange(q.shape[2])
        same = (pos // args.chunk)[:, None] == (pos // args.chunk)[None, :]
        logits = torch.where(same, q @ k.transpose(-1, -2), q @ kq.transpose(-1, -2)) * scaling
        p = logits.masked_fill(pos[None, :] > pos[:, None], -float("inf")).softmax(-1)
        return ((p * same) @ v + (p * ~same) @ vq).transpose(1, 2).contiguous(), None

    ALL_ATTENTION_FUNCTIONS["mikv_fakequant"] = attention
    model.config._attn_implementation = "mikv_fakequant"

    def nll(cfg) -> float:
        current["cfg"] = cfg
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits[args.chunk - 1:], ids[0, args.chunk:]).item()

    full = nll((0, 0, None))
    print(f"full cache: NLL {full:.4f}")
    for spec in args.configs:
        value = nll(parse(spec))
        print(f"{spec}: NLL {value:.4f}, PPL ratio {math.exp(value - full):.4f}", flush=True)


if __name__ == "__main__":
    main()
