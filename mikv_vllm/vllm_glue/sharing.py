"""Prefix caching: which blocks of each request row the step may write (docs/design.md, "Shared blocks").

vLLM hands a request a prefix-cache hit as ``num_computed_tokens > 0`` when it is admitted
(``NewRequestData``; a request resumed after preemption is re-admitted with its new hit): the first
``num_computed_tokens // block_size`` blocks of its row were filled by another request (or by itself
before the preemption) and are shared, read-only. ``CommonAttentionMetadata`` carries no such
information, so a worker-side hook records it:

* ``_update_states`` (model runner) stores each admitted request's ``num_computed_tokens`` on its
  ``CachedRequestState`` (``mikv_admitted_tokens``) and, once the persistent batch is final
  (condensed, reordered), the list of them in row order;
* ``_build_attention_metadata`` publishes that list for the builders of this step
  (:func:`step_rows`); other builds (dummy / profiling runs) see None = nothing shared.

The hook patches vLLM's ``GPUModelRunner`` (``CPUModelRunner`` inherits it) from the MiKV metadata
builder, i.e. in the worker process only, when prefix caching is on.
"""

from __future__ import annotations

import threading

_ATTR = "mikv_admitted_tokens"
_state = threading.local()
_lock = threading.Lock()
_installed = False


def step_rows() -> list[int] | None:
    """Per request row of the metadata being built: tokens computed when the request was admitted
    (its shared prefix); None outside a model step."""
    return getattr(_state, "rows", None)


def admitted_tokens(scheduler_output) -> dict[str, int]:
    """Requests (re-)admitted by this scheduler output -> their ``num_computed_tokens`` then:
    new requests, and requests resumed after preemption (their blocks were replaced)."""
    out = {new.req_id: int(new.num_computed_tokens) for new in scheduler_output.scheduled_new_reqs}
    cached = scheduler_output.scheduled_cached_reqs
    resumed = cached.resumed_req_ids
    for i, req_id in enumerate(cached.req_ids):
        if req_id in resumed:
            out[req_id] = int(cached.num_computed_tokens[i])
    return out


def install() -> None:
    """Patch the model runner (idempotent); called in the worker when prefix caching is on."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    update_states = GPUModelRunner._update_states
    build_metadata = GPUModelRunner._build_attention_metadata

    def _update_states(self, scheduler_output):
        result = update_states(self, scheduler_output)
        for req_id, tokens in admitted_tokens(scheduler_output).items():
            state = self.requests.get(req_id)
            if state is not None:
                setattr(state, _ATTR, tokens)
        # the batch is final here (condensed, reordered): rows in input-batch order
        self._mikv_step_rows = [getattr(self.requests[r], _ATTR, 0) if r is not None else 0
                                for r in self.input_batch.req_ids]
        return result

    def _build_attention_metadata(self, *args, **kwargs):
        rows = getattr(self, "_mikv_step_rows", None)
        self._mikv_step_rows = None           # one model step, one build; dummy runs get None
        num_reqs = kwargs.get("num_reqs")
        if rows is not None and num_reqs is not None:
            rows = rows[:num_reqs]
        _state.rows = rows
        try:
            return build_metadata(self, *args, **kwargs)
        finally:
            _state.rows = None

    GPUModelRunner._update_states = _update_states
    GPUModelRunner._build_attention_metadata = _build_attention_metadata
