"""Caprese under vLLM tensor parallelism (-tp N): which part of a compressed layer each rank holds, and the
GRIFFIN selection over neurons that the ranks hold in pieces.

Sharding follows vLLM's own, so a neuron's gate, up and down weights are on one rank
(vllm/model_executor/layers/linear.py):
    gate_up_proj  MergedColumnParallelLinear: gate and up rows [r*I/tp, (r+1)*I/tp) each    -> [2I/tp, H]
    down_proj     RowParallelLinear: input columns [r*I/tp, (r+1)*I/tp), output all-reduced -> [H, I/tp]
so rank r holds neurons [r*I/tp, (r+1)*I/tp) (`neuron_offset`) and a keep mask stays rank-local. The low-rank
path shards its rank dimension, as vLLM's sharded LoRA shards its inner dimension
(vllm/lora/layers/row_parallel_linear.py, S-LoRA):
    lowrank_a [H, r] -> columns [q*rl, (q+1)*rl)   [H, rl]     rl = ceil(r / tp), zero-padded to tp * rl
    lowrank_b [r, H] -> rows    [q*rl, (q+1)*rl)   [rl, H]
    x @ A @ B = sum over ranks of (x @ A_q) @ B_q
so each rank adds its partial product into down_proj's partial output before the one all-reduce the dense
model does anyway: no new collective.

GRIFFIN's statistic normalises each prompt token over all I neurons and keeps the top-k over all of them.
Two selections (`TpSelection`):
  exact  as at TP=1 up to floating-point order: each prompt token's squared norm is all-reduced ([T] float32,
         one small collective per compressed layer and step), and at selection time (once per request) the
         ranks all-gather their statistics ([L, n, I/tp] float32 each), take the top-k over all I neurons and
         each keeps the neurons of it that it holds: a count that differs per rank. neuron_idx rows are
         `k_capacity = min(k, I/tp)` wide, filled up with the sentinel I/tp (a neuron no rank has: the masked
         route drops it).
  local  no collective of its own: each rank normalises over its own neurons and keeps its own top-k_r,
         k_r = k // tp (+1 on the first k % tp ranks: k in all, a fixed count per rank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from caprese_vllm.methods.griffin import griffin_indices, griffin_keep

TpSelection = Literal["exact", "local"]


@dataclass(frozen=True)
class TensorParallelShard:
    """What rank `tp_rank` of `tp_size` holds of every compressed layer, and how GRIFFIN selects there."""

    tp_size: int = 1
    tp_rank: int = 0
    selection: TpSelection = "exact"

    @property
    def sharded(self) -> bool:
        return self.tp_size > 1

    @property
    def exact(self) -> bool:
        """Selections that need the other ranks' statistics (exact mode under TP)."""
        return self.sharded and self.selection == "exact"

    # ---- FF neurons -------------------------------------------------------------------------------------
    def local_intermediate(self, intermediate_size: int) -> int:
        """I/tp: the neurons this rank holds (vLLM's divide() refuses a size tp does not divide)."""
        if intermediate_size % self.tp_size:
            raise ValueError(f"caprese: tensor parallel size {self.tp_size} does not divide the model's "
                             f"{intermediate_size} FF neurons")
        return intermediate_size // self.tp_size

    def neuron_offset(self, intermediate_size: int) -> int:
        """Global index of this rank's first neuron (MergedColumnParallelLinear's shard start)."""
        return self.tp_rank * self.local_intermediate(intermediate_size)

    def local_k(self, k: int) -> int:
        """local mode: the neurons this rank keeps per request, k // tp, one more on the first k % tp ranks."""
        return k // self.tp_size + (1 if self.tp_rank < k % self.tp_size else 0)

    def k_capacity(self, k: int, intermediate_size: int) -> int:
        """Width of this rank's neuron_idx rows: k at TP=1; local mode: its own fixed count; exact mode: the
        most of the global top-k it can hold (its count varies per request)."""
        if not self.sharded:
            return k
        if self.selection == "local":
            return self.local_k(k)
        return min(k, self.local_intermediate(intermediate_size))

    def mean_k(self, k: int) -> int:
        """The neurons a decode token reads on this rank, at most (TP=1, local mode: its fixed count) or on
        average, rounded up (exact mode: ceil(k / tp); a request's count on a rank varies, the rest of its row is
        the sentinel, which the gather kernels skip). Sets where gathering stops paying (CapreseMLP)."""
        if not self.sharded:
            return k
        return self.local_k(k) if self.selection == "local" else -(-k // self.tp_size)

    def neuron_fill(self, intermediate_size: int) -> int | None:
        """exact mode: the sentinel index that fills neuron_idx rows past this rank's count (= I/tp, masked
        out by griffin_sparsify_sharded); None where every row holds k_capacity real neurons."""
        return self.local_intermediate(intermediate_size) if self.exact else None

    # ---- low-rank path ----------------------------------------------------------------------------------
    def local_rank(self, rank: int) -> int:
        """rl = ceil(r / tp): the low-rank channels per rank (the last ones zero where tp does not divide r)."""
        return math.ceil(rank / self.tp_size)

    def shard_lowrank_a(self, lowrank_a: torch.Tensor) -> torch.Tensor:
        """Full lowrank_a [H, r] -> this rank's columns [H, rl], zero-padded."""
        rl = self.local_rank(lowrank_a.shape[1])
        padded = torch.zeros(lowrank_a.shape[0], rl * self.tp_size, dtype=lowrank_a.dtype, device=lowrank_a.device)
        padded[:, : lowrank_a.shape[1]] = lowrank_a
        return padded[:, self.tp_rank * rl:(self.tp_rank + 1) * rl]

    def shard_lowrank_b(self, lowrank_b: torch.Tensor) -> torch.Tensor:
        """Full lowrank_b [r, H] -> this rank's rows [rl, H], zero-padded."""
        return self.shard_lowrank_a(lowrank_b.t()).t()


def exact_local_keep(stat_sq_global: torch.Tensor, k: int, shard: TensorParallelShard) -> torch.Tensor:
    """keep [..., I/tp] bool: the neurons this rank holds of the global top-k (griffin_keep over all I
    neurons of stat_sq_global [..., I], the ranks' statistics concatenated in rank order)."""
    local = stat_sq_global.shape[-1] // shard.tp_size
    keep = griffin_keep(stat_sq_global, k)
    return keep[..., shard.tp_rank * local:(shard.tp_rank + 1) * local]


def exact_local_indices(stat_sq_global: torch.Tensor, k: int, shard: TensorParallelShard) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """(keep [..., I/tp], neuron_idx [..., k_capacity]) of this rank in exact mode: local indices ascending,
    filled up with the sentinel I/tp past this rank's count."""
    intermediate = stat_sq_global.shape[-1]
    keep = exact_local_keep(stat_sq_global, k, shard)
    idx = griffin_indices(keep, shard.k_capacity(k, intermediate), fill=shard.neuron_fill(intermediate))
    return keep, idx


NO_TENSOR_PARALLEL = TensorParallelShard()


def tensor_parallel_refusal(tp: int, intermediate_size: int, num_heads: int, num_kv_heads: int | None = None,
                            k: int | None = None) -> str | None:
    """Why `-tp tp` cannot serve a model of these sizes, or None. vLLM's own rules: attention heads divisible by tp
    (vllm/config/model.py verify_with_parallel_config), KV heads divisible by tp or tp by them (QKVParallelLinear
    replicates KV heads past their count), FF width divisible (MergedColumnParallelLinear's divide()); and, with
    `k` (local selection's global k), every rank keeping a neuron (k >= tp). The one rule set: serving
    (install.check_parallelism), caprese-distill's --tp-size and the benchmarks' -tp checks all ask it."""
    kv = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % tp:
        return f"num_attention_heads {num_heads} is not divisible by {tp}"
    if (kv % tp) if tp <= kv else (tp % kv):
        return f"num_key_value_heads {kv} and {tp}: neither divides the other"
    if intermediate_size % tp:
        return f"intermediate_size {intermediate_size} (FF neurons) is not divisible by {tp}"
    if k is not None and k < tp:
        return f"local selection keeps k={k} neurons, fewer than {tp} ranks (some would keep none)"
    return None


def largest_servable_tp(below: int, intermediate_size: int, num_heads: int, num_kv_heads: int | None = None,
                        k: int | None = None) -> int | None:
    """The largest -tp in [2, below) that tensor_parallel_refusal accepts, or None (bounded by the head count:
    any servable -tp divides it)."""
    return next((tp for tp in range(min(below - 1, num_heads), 1, -1)
                 if tensor_parallel_refusal(tp, intermediate_size, num_heads, num_kv_heads, k) is None), None)


class GriffinSelector:
    """Turns a rank's GRIFFIN statistics into the neurons it keeps, once per request (CapreseBatchState._select).

    TP=1 and local mode select from the rank's own statistic; exact mode first all-gathers every rank's
    ([L, n, I/tp] float32 each, `all_gather` concatenating along the last dimension in rank order, as
    vLLM's GroupCoordinator.all_gather does), so every rank sees what TP=1 sees. All ranks call it in the
    same step for the same slots: they run the same scheduler output through the same slot bookkeeping."""

    def __init__(self, k: int, intermediate_size: int, shard: TensorParallelShard = NO_TENSOR_PARALLEL,
                 all_gather=None):
        if shard.exact and all_gather is None:
            raise ValueError("caprese: exact tensor-parallel selection needs the TP group's all_gather")
        self.shard = shard
        self.k = k                                              # the global k (TP=1: int(I * density))
        self.width = shard.k_capacity(k, intermediate_size)     # neuron_idx row width on this rank
        self.fill = shard.neuron_fill(intermediate_size)        # exact mode's sentinel, else None
        self.all_gather = all_gather

    def select(self, stat_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """stat_sq [L, n, I/tp] float32 -> (keep [L, n, I/tp] bool, neuron_idx [L, n, width] int64, the
        statistic the non-finite check should see or None: rank 0 only, so a request is counted once, not once
        per rank (every rank's engine process writes its own count, and /metrics sums them). Exact mode checks
        the gathered statistic; local mode rank 0's own, without a collective: a NaN/Inf confined to another
        rank's neurons in one layer reaches rank 0 in the next compressed layer (down_proj's all-reduce spreads
        it into the hidden state), so only one in the last compressed layer goes uncounted.)"""
        if self.shard.exact:
            gathered = self.all_gather(stat_sq.contiguous())     # [L, n, I]
            keep, idx = exact_local_indices(gathered, self.k, self.shard)
            return keep, idx, gathered if self.shard.tp_rank == 0 else None
        keep = griffin_keep(stat_sq, self.width)
        return keep, griffin_indices(keep, self.width), stat_sq if self.shard.tp_rank == 0 else None
