"""Compile the kernels' real launches for a CUDA target without a GPU (run as a script).

Installs a stand-in triton driver that reports ``GPUTarget("cuda", ARCH, 32)`` and turns
every launch into a compile-only warmup, then drives the host wrappers on CPU tensors.
Exit 0: all compiled to cubin; 77: this triton's internals differ (caller skips).
Usage: python tests/kernels/_aot_compile.py [ARCH]
"""

import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime import jit as tjit

    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90

    class _CompileOnlyDriver:
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(_CompileOnlyDriver())
    _run = tjit.JITFunction.run
except Exception as exc:  # noqa: BLE001
    print(f"unsupported triton internals: {exc}")
    sys.exit(77)

compiled = []


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    compiled.append((self.fn.__name__, "cubin" in kernel.asm, kernel.metadata.shared))
    return kernel


tjit.JITFunction.run = _compile_only

from mikv_vllm.config import MiKVConfig  # noqa: E402
from mikv_vllm.core.layout import RegionLayout  # noqa: E402
from mikv_vllm.kernels import decode_attention, store_tokens  # noqa: E402
from mikv_vllm.kernels.upkeep import maintain_hi_decode  # noqa: E402

# (lo bits, hi ratio, head_dim, GQA group, query dtype, hi dtype, other fields): fp16 / tf32 (bf16) / ieee
# dots; the last: keys at 4 bits, values at 3, fp8-scale group metadata
CASES = [(2, 0.2, 128, 4, torch.float16, "float16", {}), (0, 0.2, 64, 8, torch.float32, "float32", {}),
         (3, 0.1, 128, 4, torch.bfloat16, "float16", {}), (3, 0.1, 128, 8, torch.bfloat16, "bfloat16", {}),
         (4, 0.1, 64, 3, torch.bfloat16, "float8_e4m3fn", dict(v_bits=3, group_meta="fp8-scale"))]
for bits, r, d, g, qdt, hdt, extra in CASES[: int(os.environ.get("AOT_CASES", len(CASES)))]:
    cfg = MiKVConfig(policy="mikv" if bits else "h2o", lo_bits=bits, hi_ratio=r, balancer=bits > 0,
                     hi_dtype=hdt).replace(**extra)
    lay = RegionLayout.build(cfg, 16, d)
    regions = torch.zeros(8, 2, lay.region_bytes, dtype=torch.uint8)
    tables = torch.arange(8, dtype=torch.int32).view(2, 4)
    q, k, v = torch.randn(2, 2 * g, d).to(qdt), torch.randn(2, 2, d), torch.randn(2, 2, d)
    bal = torch.ones(2, 2, d) if lay.has_balancer else None
    store_tokens(regions, lay, torch.tensor([1, 5]), torch.tensor([0, 3]), k.half(), v, bal)
    nm = torch.zeros(2, 2)
    decode_attention(regions, lay, tables, torch.tensor([40, 33]), q, k, v, 0.1, bal, max_ctx=40, block_n=32,
                     accumulate=True, new_mass=nm)
    maintain_hi_decode(regions, lay, cfg, tables, torch.tensor([40, 33]), k, v, nm)
# every shipped preset (configs/*.yaml) through the decode step of the Triton op set (kernels/step.py),
# bf16 activations, head_dim 64 and 128
import yaml  # noqa: E402

from mikv_vllm.config import preset  # noqa: E402
from mikv_vllm.kernels._common import supported  # noqa: E402
from mikv_vllm.kernels.ops import TritonOps  # noqa: E402
from mikv_vllm.ops.plan import StepPlan, plan_for  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs")
step_configs = []
for fname in sorted(os.listdir(CONFIGS)):
    if not fname.endswith(".yaml"):
        continue
    with open(os.path.join(CONFIGS, fname)) as fh:
        data = yaml.safe_load(fh) or {}
    fields = {k[len("mikv-"):].replace("-", "_"): v for k, v in data.items() if k.startswith("mikv-") and k != "mikv-config"}
    step_configs.append((fname[:-5], preset(data["mikv-config"]).replace(**fields)))
shipped = len(step_configs)
step_configs.append(("mikv-int4-r03", preset("mikv-int4-r03")))
step_configs.append(("mikv-rot-fp16", preset("mikv-int4-r03").replace(rotation=True)))   # fp16 activations below
presets_done = []
for name, cfg in step_configs:
    for d, g in ((64, 3), (128, 4)):
        lay = RegionLayout.build(cfg, 16, d)
        if not supported(lay):
            continue
        regions = torch.zeros(8, 2, lay.region_bytes, dtype=torch.uint8)
        tables = torch.arange(8, dtype=torch.int32).view(2, 4)
        act = torch.float16 if name == "mikv-rot-fp16" else torch.bfloat16
        q, k, v = torch.randn(2, 2 * g, d).to(act), torch.randn(2, 2, d).to(act), torch.randn(2, 2, d).to(act)
        plan = plan_for(cfg, lay, tables, [40, 33])
        TritonOps.prepare(StepPlan(decode=plan), lay, cfg, 2 * g, 2)
        if cfg.rotation:   # the rotation folded into the store and merge kernels (kernels/rotate.py)
            from mikv_vllm.core.rotation import rotation_for

            TritonOps.decode_rotated(regions, lay, cfg, plan, q, k, v, 0.1, rotation_for(d))
        else:
            TritonOps.decode(regions, lay, cfg, plan, q, k, v, 0.1)
        presets_done.append(f"{name}/d{d}")
print(f"decode step compiled for the shipped presets, k4/v3 fp8-scale and rotated fp16: {presets_done}")
names = sorted({n for n, _, _ in compiled})
bad = [c for c in compiled if not c[1]]
print(f"compiled {len(compiled)} launches of {names} for sm_{arch}; without cubin: {bad}")
step_kernels = {"_row_store_kernel", "_map_kernel", "_step_merge_kernel", "_slot_score_kernel"}
sys.exit(1 if bad or len(names) < 6 or not step_kernels <= set(names) or len(presets_done) < 2 * shipped + 4 else 0)
