"""Per-request Caprese state inside the engine: slots, per-token buffers, GRIFFIN selections.

Every running request owns a slot in [0, max_slots); slot `max_slots` is a dummy that padding
tokens and warm-up runs point at. Before each step (see step_info.py) the host:
  1. frees the slots of requests the runner no longer holds or that were preempted (they restart from
     position 0) and gives new requests a slot;
  2. resets a slot's statistics when its request starts (again) from position 0 (new request,
     or recompute after preemption), so a reused slot never leaks another request's state; a preempted
     request's selection is kept aside (host memory) and restored when it resumes, so the answer tokens
     it recomputes run sparse with its own neurons, as they first ran: its output equals the one it
     gives alone, preempted or not;
  3. takes the top-k for slots whose prompt is complete and which decode in this step (defined for
     any statistic; a non-finite one is flagged to the NonfiniteMonitor, read without a sync);
  4. writes per-token slot / prompt / dense flags into fixed device buffers the layers read.
Every tensor is made with an explicit device and dtype: vLLM builds the model under its own default
device (torch.device(cuda) context) and dtype.
A steady decode step (the same requests as the step before, one decode token each, as that step)
finds the buffers already right and costs a list comparison: no host work, no copies, no kernels
(at batch 32 the full update was ~1-2% of a decode step of an 8B model).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from caprese_vllm.engine.nonfinite import NonfiniteMonitor
from caprese_vllm.engine.step_info import StepInfo
from caprese_vllm.engine.tensor_parallel import GriffinSelector
from caprese_vllm.methods.griffin import keep_of_indices


class GriffinLayerState:
    """Selection state of one compressed layer, views into the batch's stacked tensors:
    stat_sq [slots + 1, I] fp32, neuron_idx [slots + 1, k], keep_mask [slots + 1, I] uint8 or None.
    Under tensor parallelism I is this rank's I/tp neurons and k its neuron_idx width (GriffinSelector.width)."""

    def __init__(self, batch: CapreseBatchState, index: int):
        self.batch = batch
        self.index = index
        self.k = batch.griffin_k
        self.stat_sq = batch.stat_sq[index]
        self.neuron_idx = batch.neuron_idx[index]

    @property
    def keep_mask(self) -> torch.Tensor | None:
        return None if self.batch.keep_mask is None else self.batch.keep_mask[self.index]

    def enable_keep_mask(self) -> torch.Tensor:
        return self.batch.enable_keep_mask()[self.index]


class CapreseBatchState:
    def __init__(self, max_slots: int, max_tokens: int, device: torch.device, griffin_layers: int = 0,
                 intermediate_size: int = 0, griffin_k: int = 0, selector: GriffinSelector | None = None):
        """intermediate_size: the FF neurons this process holds (I/tp under tensor parallelism); griffin_k: the
        neuron_idx row width; selector: how a selection is made (default: top-griffin_k of the own statistic,
        TP=1's; engine/tensor_parallel.py for -tp)."""
        self.max_slots = max_slots
        self.dummy_slot = max_slots
        self.device = torch.device(device)
        self.free_slots = list(range(max_slots - 1, -1, -1))
        self.slot_of: dict[str, int] = {}
        self.selected = np.zeros(max_slots + 1, dtype=bool)
        # GRIFFIN state of all compressed layers stacked, so a request's selection is one top-k call.
        self.griffin_k = griffin_k
        self.selector = selector if selector is not None else GriffinSelector(griffin_k, intermediate_size)
        if self.selector.width != griffin_k:
            raise ValueError(f"caprese: selector keeps {self.selector.width} neurons per row, the state holds "
                             f"{griffin_k}")
        self.stat_sq = torch.zeros(griffin_layers, max_slots + 1, intermediate_size, dtype=torch.float32,
                                   device=device)
        self.neuron_idx = torch.arange(griffin_k, dtype=torch.int64, device=device).repeat(griffin_layers,
                                                                                           max_slots + 1, 1)
        # [L, slots + 1, I] uint8, the selections as masks: only the GPU kernels' masked route needs it
        self.keep_mask: torch.Tensor | None = None
        self.griffin_layers: list[GriffinLayerState] = []
        self.griffin_layer_ids: list[int] = []  # the model's layer index of each stacked GRIFFIN layer
        self.nonfinite = NonfiniteMonitor(self.griffin_layer_ids)
        self.token_slot = torch.full((max_tokens,), self.dummy_slot, dtype=torch.int64, device=device)
        self.token_stat = torch.zeros(max_tokens, dtype=torch.bool, device=device)
        # Default for tokens no step describes (warm-up, CUDA-graph padding): plain dense FF.
        self.token_dense = torch.ones(max_tokens, dtype=torch.bool, device=device)
        self._decode_workspace = None  # kernels.decode_mlp.DecodeWorkspace, made by the first GPU layer
        # Requests of the last step when it was a steady decode step (its buffers stay valid), else None.
        self._steady_req_ids: list[str] | None = None
        # Selections of preempted requests, kept until they resume: req_id -> neuron_idx [L, k] int32 on the
        # host. At most max_slots (oldest dropped: that request then recomputes its answer tokens dense).
        self.saved_selection: OrderedDict[str, torch.Tensor] = OrderedDict()

    def add_griffin_layer(self, intermediate_size: int, k: int, layer_idx: int | None = None) -> GriffinLayerState:
        if len(self.griffin_layers) == self.stat_sq.shape[0] or (intermediate_size, k) != (self.stat_sq.shape[2],
                                                                                            self.griffin_k):
            raise ValueError(f"caprese: GRIFFIN layer {len(self.griffin_layers)} (I={intermediate_size}, k={k}) "
                             f"does not fit the batch state ({self.stat_sq.shape[0]} layers, "
                             f"I={self.stat_sq.shape[2]}, k={self.griffin_k})")
        state = GriffinLayerState(self, len(self.griffin_layers))
        self.griffin_layers.append(state)
        self.griffin_layer_ids.append(len(self.griffin_layer_ids) if layer_idx is None else layer_idx)
        return state

    def enable_keep_mask(self) -> torch.Tensor:
        if self.keep_mask is None:  # exact tensor-parallel mode's sentinel in neuron_idx keeps nothing
            self.keep_mask = keep_of_indices(self.neuron_idx, self.stat_sq.shape[2]).to(torch.uint8)
        return self.keep_mask

    def decode_workspace(self, gather_tokens: int, hidden: int):
        """The GPU kernels' scratch, one for all layers (they run one after another): a DecodeWorkspace
        for gather steps of up to gather_tokens tokens."""
        if self._decode_workspace is None or self._decode_workspace.acc.shape[0] < gather_tokens:
            from caprese_vllm.kernels.decode_mlp import decode_workspace

            self._decode_workspace = decode_workspace(gather_tokens, hidden, self.stat_sq.shape[2], self.device)
        return self._decode_workspace

    def on_step(self, info: StepInfo) -> None:
        if self.nonfinite.pending:  # last selections' non-finite flags, once their copy has landed
            self.nonfinite.poll()
        steady = bool((info.num_scheduled == 1).all() and not info.in_prefill.any()
                      and (info.chunk_start >= info.prompt_len).all() and not info.preempted_req_ids)
        if steady and info.req_ids == self._steady_req_ids:
            return
        self._steady_req_ids = None
        self._update(info)
        # Every request of a steady step is selected by now: the same requests again need nothing.
        self._steady_req_ids = list(info.req_ids) if steady else None

    def _update(self, info: StepInfo) -> None:
        # Free the slots of requests the runner dropped and of preempted ones (they restart from position 0,
        # see StepInfo.preempted_req_ids): live requests then never outnumber the running limit's slots.
        scheduled = set(info.req_ids)
        for req_id in list(self.slot_of):
            preempted = req_id in info.preempted_req_ids and req_id not in scheduled
            if preempted:
                self._save_selection(req_id, self.slot_of[req_id])
            if preempted or req_id not in info.live_req_ids:
                self.free_slots.append(self.slot_of.pop(req_id))
        slots = np.empty(len(info.req_ids), dtype=np.int64)
        for i, req_id in enumerate(info.req_ids):
            slot = self.slot_of.get(req_id)
            if slot is None:
                if not self.free_slots:
                    raise RuntimeError(f"caprese: no free state slot for request {req_id}: all "
                                       f"{self.max_slots} hold live requests")
                slot = self.free_slots.pop()
                self.slot_of[req_id] = slot
            slots[i] = slot

        starting = info.chunk_start == 0  # a one-token prompt is never 'in prefill' (V1's view)
        if starting.any():
            self.stat_sq[:, self._device_index(slots[starting])] = 0.0
            self.selected[slots[starting]] = False
            for i in np.flatnonzero(starting):
                self._restore_selection(info.req_ids[i], int(slots[i]))

        token_slot = np.repeat(slots, info.num_scheduled)
        offsets = np.arange(token_slot.size) - np.repeat(np.cumsum(info.num_scheduled) - info.num_scheduled,
                                                         info.num_scheduled)
        positions = np.repeat(info.chunk_start, info.num_scheduled) + offsets
        token_stat = positions < np.repeat(info.prompt_len, info.num_scheduled)
        # Recomputed answer tokens (after preemption) run sparse when the request's selection was restored.
        token_dense = token_stat | np.repeat(info.in_prefill & ~self.selected[slots], info.num_scheduled)

        decoding = ~info.in_prefill & (info.chunk_start >= info.prompt_len)
        to_select = np.unique(slots[decoding & ~self.selected[slots]])
        if to_select.size and self.stat_sq.shape[0]:  # no GRIFFIN layer (CATS): nothing to select
            req_of = {slot: req_id for req_id, slot in self.slot_of.items()}
            self._select(self._device_index(to_select), [req_of[int(s)] for s in to_select])
            self.selected[to_select] = True

        while len(self.saved_selection) > self.max_slots:  # after this step's restores
            self.saved_selection.popitem(last=False)
        self._write(self.token_slot, torch.from_numpy(token_slot), self.dummy_slot)
        self._write(self.token_stat, torch.from_numpy(token_stat), False)
        self._write(self.token_dense, torch.from_numpy(token_dense), True)

    def _save_selection(self, req_id: str, slot: int) -> None:
        if not self.selected[slot] or not self.stat_sq.shape[0]:
            return  # preempted before its first sparse step (or no GRIFFIN layer): nothing to keep
        self.saved_selection[req_id] = self.neuron_idx[:, slot].to("cpu", torch.int32)   # [L, k]
        self.saved_selection.move_to_end(req_id)

    def _restore_selection(self, req_id: str, slot: int) -> None:
        saved = self.saved_selection.pop(req_id, None)
        if saved is None:
            return
        idx = saved.to(self.device, torch.int64)                                    # [L, k]
        self.neuron_idx[:, slot] = idx
        if self.keep_mask is not None:
            self.keep_mask[:, slot] = keep_of_indices(idx, self.keep_mask.shape[2]).to(torch.uint8)
        self.selected[slot] = True

    def _select(self, slots: torch.Tensor, req_ids: list[str]) -> None:
        """Top-k of every compressed layer for these slots (their requests: req_ids): one call over [L, n, I].
        Any statistic, NaN/Inf included, gives k in-range neurons; a non-finite one is flagged."""
        stat_sq = self.stat_sq[:, slots]                                             # [L, n, I] float32
        keep, neuron_idx, checked = self.selector.select(stat_sq)                    # [L, n, I] bool, [L, n, k]
        if checked is not None:
            self.nonfinite.check(checked, req_ids)
        self.neuron_idx[:, slots] = neuron_idx
        if self.keep_mask is not None:
            self.keep_mask[:, slots] = keep.to(torch.uint8)

    def _staged(self, values: torch.Tensor) -> torch.Tensor:
        """Host values ready for a non-blocking copy: a pageable copy to the GPU would wait for it to drain."""
        return values.pin_memory() if self.device.type == "cuda" else values

    def _device_index(self, values: np.ndarray) -> torch.Tensor:
        return self._staged(torch.from_numpy(values)).to(self.device, non_blocking=True)

    def _write(self, buffer: torch.Tensor, values: torch.Tensor, fill) -> None:
        n = values.numel()
        if n > buffer.numel():
            raise RuntimeError(f"caprese: step has {n} tokens, buffers hold {buffer.numel()}")
        buffer[:n].copy_(self._staged(values), non_blocking=True)
        buffer[n:].fill_(fill)
