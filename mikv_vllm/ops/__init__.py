"""MiKV op sets behind one contract (no vllm import).

* :class:`contract.MiKVOps`: the protocol every op set implements (``prepare`` once per step,
  ``decode`` / ``chunks`` on the step plan, ``request`` unplanned);
* :mod:`.plan`: the :class:`StepPlan` the metadata builder makes once per step
  (:class:`PlanBuilder`, buffers reused across steps);
* the op sets: :class:`torch_ops.TorchOps` (batched torch), ``cpu.CpuOps`` (fused C++),
  ``kernels.TritonOps`` (Triton), picked by :func:`get_ops` (``MIKV_VLLM_OPS``).

``core.reference`` is the oracle they are tested against (``tests/test_ops_contract.py``).
"""

from .contract import MiKVOps
from .plan import ChunkPlan, DecodePlan, PlanBuilder, StepPlan, plan_for
from .select import OPS_CHOICES, OPS_ENV, get_ops, ops_choice

__all__ = ["ChunkPlan", "DecodePlan", "MiKVOps", "OPS_CHOICES", "OPS_ENV", "PlanBuilder", "StepPlan", "get_ops",
           "ops_choice", "plan_for"]
