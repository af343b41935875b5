"""Peak bytes of the tensors a piece of torch code allocates (CPU too), by dispatch interception.

Every aten op output whose storage is new is counted until the last tensor that views that
storage is garbage collected; inputs that existed before (the pages, q/k/v) are not counted.
Allocations made inside one C++ kernel and freed before it returns (e.g. sort scratch) are
invisible, and the Triton interpreter's host copies of kernel arguments (made under
``triton/runtime/interpreter.py``; a GPU launch makes none) are skipped: this measures the
temporaries the code itself holds.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _in_interpreter() -> bool:
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_filename.endswith(("triton/runtime/interpreter.py", "triton\\runtime\\interpreter.py")):
            return True
        f = f.f_back
    return False


class PeakTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list] = {}      # storage data_ptr -> [bytes, referencing tensor count]
        self._before: set[int] = set()

    def __enter__(self):
        self._before = set()
        return super().__enter__()

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat_in, _ = tree_flatten((args, kwargs))
        known = {t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        flat_out, _ = tree_flatten(out)
        for t in flat_out:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key == 0:
                continue
            if key in self._refs:
                self._refs[key][1] += 1
            elif key in known or _in_interpreter():
                continue                      # a view of a pre-existing tensor / interpreter copy
            else:
                self._refs[key] = [st.nbytes(), 1]
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, key)
        return out
