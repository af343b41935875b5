"""CPU stand-ins for what only a GPU shows: what one layer's forward dispatches (no vllm import).

:class:`LayerProbe` is a ``TorchDispatchMode`` that records every aten op run inside it and every
Triton launch (``JITFunction.run`` / the interpreter's ``InterpretedFunction.run``; the
interpreter's own tensor traffic during a launch is not recorded). It flags what would break or
stall a captured CUDA graph:

* host syncs: ``aten._local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``), ``aten.equal``,
  ``aten.is_nonzero``;
* data-dependent shapes: ``nonzero``, ``masked_select``, ``unique*``, ``repeat_interleave`` with a
  tensor of repeats, indexing or ``index_put`` with a bool mask;
* host data entering the layer: ``lift_fresh`` (``torch.tensor(list, ...)``) and any copy whose source
  is on the CPU and whose destination is not (a host-to-device copy).

``strict`` raises :class:`LayerSyncError` at the offending op; else :attr:`violations` lists them.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

SYNC_OPS = {aten._local_scalar_dense, aten.equal, aten.is_nonzero}
DATA_SHAPE_OPS = {aten.nonzero, aten.nonzero_static, aten.masked_select, aten._unique, aten._unique2,
                  aten.unique_dim, aten.unique_consecutive, aten.argwhere}
HOST_DATA_OPS = {aten.lift_fresh, aten.lift_fresh_copy}
VIEW_TAG = torch.Tag.view_copy if hasattr(torch.Tag, "view_copy") else None


class LayerSyncError(RuntimeError):
    """An op inside the probed region would sync the host or give a data-dependent shape."""


def _has_bool_index(args) -> bool:
    for a in args:
        if isinstance(a, (list, tuple)):
            if _has_bool_index(a):
                return True
        elif isinstance(a, torch.Tensor) and a.dtype == torch.bool:
            return True
    return False


ALIAS_OPS = {"_unsafe_view", "_reshape_alias"}   # views without an alias annotation in their schema


def _is_view(func) -> bool:
    if func.overloadpacket.__name__ in ALIAS_OPS:
        return True
    schema = func._schema
    return any(a.alias_info is not None and not a.alias_info.is_write for a in schema.returns)


class LayerProbe(TorchDispatchMode):
    """Records aten ops and Triton launches; flags syncs, data-dependent shapes, host data."""

    def __init__(self, strict: bool = True) -> None:
        super().__init__()
        self.strict = strict
        self.ops: list[str] = []          # every aten op (views included)
        self.views: list[str] = []        # the view / alias ops among them (no kernel, no memory)
        self.launches: list[str] = []     # Triton kernels launched
        self.violations: list[str] = []
        self._paused = 0
        self._patches = contextlib.ExitStack()

    # ------------------------------------------------------------------ counts
    @property
    def compute_ops(self) -> list[str]:
        """Ops that run a kernel or touch memory: all recorded ops but views."""
        views = list(self.views)
        out = []
        for op in self.ops:
            if op in views:
                views.remove(op)
            else:
                out.append(op)
        return out

    def summary(self) -> dict:
        return {"torch_ops": len(self.compute_ops), "views": len(self.views), "launches": len(self.launches),
                "total": len(self.compute_ops) + len(self.launches), "ops": self.compute_ops,
                "kernels": list(self.launches), "violations": list(self.violations)}

    # ------------------------------------------------------------------ dispatch
    def _flag(self, what: str) -> None:
        self.violations.append(what)
        if self.strict:
            raise LayerSyncError(f"inside a layer's forward: {what}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._paused:
            return func(*args, **kwargs)
        name = str(func.overloadpacket.__name__)
        self.ops.append(name)
        if _is_view(func):
            self.views.append(name)
        packet = func.overloadpacket
        if packet in SYNC_OPS:
            self._flag(f"host sync {func}")
        elif packet in DATA_SHAPE_OPS:
            self._flag(f"data-dependent shape {func}")
        elif packet in HOST_DATA_OPS:
            self._flag(f"host data copied in ({func})")
        elif packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_) and \
                _has_bool_index(args[1:2]):
            self._flag(f"bool-mask indexing (data-dependent shape) {func}")
        elif packet is aten.repeat_interleave and any(isinstance(a, torch.Tensor) for a in args[1:2]):
            self._flag(f"data-dependent shape {func}")
        elif packet in (aten.copy_, aten._to_copy, aten._copy_from):
            src = args[1] if packet is aten.copy_ else args[0]
            dst_dev = args[0].device if packet is aten.copy_ else kwargs.get("device", src.device)
            if isinstance(src, torch.Tensor) and src.device.type == "cpu" and torch.device(dst_dev).type != "cpu":
                self._flag(f"host-to-device copy {func}")
        return func(*args, **kwargs)

    # ------------------------------------------------------------------ launches
    def _wrap(self, cls) -> None:
        original = cls.run
        probe = self

        def run(fn_self, *args, **kwargs):
            fn = getattr(fn_self, "fn", None)
            probe.launches.append(getattr(fn, "__name__", None) or getattr(fn_self, "__name__", "?"))
            probe._paused += 1
            try:
                return original(fn_self, *args, **kwargs)
            finally:
                probe._paused -= 1

        cls.run = run
        self._patches.callback(setattr, cls, "run", original)

    def __enter__(self):
        try:
            from triton.runtime.jit import JITFunction

            self._wrap(JITFunction)
        except ImportError:   # pragma: no cover - no triton: only torch ops are recorded
            pass
        try:
            from triton.runtime.interpreter import InterpretedFunction

            self._wrap(InterpretedFunction)
        except ImportError:   # pragma: no cover
            pass
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patches.close()
            self._patches = contextlib.ExitStack()
