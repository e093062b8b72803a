"""The Caprese FF of one layer on GPU for all tokens of a step, choosing the cheaper route.

    gather  (T <= gather_max_tokens): each token reads only its k neurons' rows + the R low-rank rows
            (gather_gate_up, gather_down; two kernels, the statistic and the output cast inside the
            second). Batch-1 decode reads ~half the FF weights.
    masked  (more tokens): with several requests each reading its own rows, gathering would read more
            than the dense matrices hold, so the step reads every row of gate_up_ext and down_t_ext
            (low-rank rows included) once, with the unselected neurons zeroed: the cost of the dense
            FF plus the R extra rows, never a second pass.
              decode batches (T <= masked_gate_up.MAX_TOKENS): masked_gate_up computes gate/up,
                activation and mask in one kernel (the statistic too), then one cuBLAS GEMM for down;
              prefill-sized steps: cuBLAS GEMMs, act_mul_mask between them, griffin_stats.
Both routes compute the same function (tested against each other and against the portable path);
dense tokens (prompt, recompute) get every neuron and no low-rank path. `DecodeWorkspace` holds the
kernels' scratch, shared by all layers (they run one after another); its accumulators and tickets
are zero between calls.

Tensor parallelism's exact selection (engine/tensor_parallel.py) normalises each prompt token's statistic
by its norm over all ranks' neurons, which needs an all-reduce between computing z and adding the
statistic; that collective stays outside the custom ops (vLLM's own registered all-reduce, which its
compilation and CUDA-graph capture know). So exact mode runs caprese_ff in two halves, the same routes
and kernels: caprese_ff_gate_up (z, and each token's sum of squares over this rank's neurons, [T]
float32), the caller's all-reduce of those sums, then caprese_ff_down (the statistic divided by the
all-reduced norm, and the down projection). Its neuron_idx rows hold the rank's varying count, filled
up with the sentinel I (= I/tp of the model), which the gather kernels skip; the masked route's keep
mask never holds it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from caprese_vllm.kernels.act_mul_mask import act_mul_mask, act_mul_mask_reference
from caprese_vllm.kernels.gather_down import gather_down, gather_down_reference, gather_workspace
from caprese_vllm.kernels.gather_gate_up import gather_gate_up, gather_gate_up_reference
from caprese_vllm.kernels.griffin_stats import griffin_stats_
from caprese_vllm.kernels.masked_gate_up import MAX_TOKENS as MASKED_GATE_UP_MAX_TOKENS
from caprese_vllm.kernels.masked_gate_up import masked_gate_up, masked_workspace


class DecodeWorkspace(NamedTuple):
    acc: torch.Tensor        # gather_down: [>= gather tokens, H] float32
    tickets: torch.Tensor    # gather_down: int32
    parts: torch.Tensor      # masked_gate_up: [MAX_TOKENS, P] float32
    ticket: torch.Tensor     # masked_gate_up: [1] int32


def decode_workspace(gather_tokens: int, hidden: int, inter: int, device: torch.device) -> DecodeWorkspace:
    return DecodeWorkspace(*gather_workspace(gather_tokens, hidden, device), *masked_workspace(inter, device))


def caprese_ff(x: torch.Tensor, gate_up_ext: torch.Tensor, down_t_ext: torch.Tensor, inter: int,
               neuron_idx: torch.Tensor, keep_mask: torch.Tensor, token_slot: torch.Tensor,
               token_dense: torch.Tensor, token_stat: torch.Tensor, stat_sq: torch.Tensor, ws: DecodeWorkspace,
               act: str, gather_max_tokens: int) -> torch.Tensor:
    num_tokens = x.shape[0]
    if num_tokens <= gather_max_tokens:
        z = gather_gate_up(x, gate_up_ext, inter, neuron_idx, token_slot, token_dense, act)
        return gather_down(z, down_t_ext, inter, neuron_idx, token_slot, token_dense, token_stat, stat_sq, ws.acc,
                           ws.tickets)
    if num_tokens <= MASKED_GATE_UP_MAX_TOKENS:
        z = masked_gate_up(x, gate_up_ext, inter, keep_mask, token_slot, token_dense, token_stat, stat_sq, ws.parts,
                           ws.ticket, act)
        return z @ down_t_ext
    rank = down_t_ext.shape[0] - inter
    z, sumsq_parts = act_mul_mask(x @ gate_up_ext.t(), inter, rank, keep_mask, token_slot, token_dense, act)
    griffin_stats_(z, inter, token_slot, token_stat, stat_sq, sumsq_parts)
    return z @ down_t_ext


def caprese_ff_gate_up(x: torch.Tensor, gate_up_ext: torch.Tensor, inter: int, neuron_idx: torch.Tensor,
                       keep_mask: torch.Tensor, token_slot: torch.Tensor, token_dense: torch.Tensor,
                       parts: torch.Tensor, ticket: torch.Tensor, act: str,
                       gather_max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mode, first half of caprese_ff: (z [T, I + R] in the route's layout, sumsq [T] float32). sumsq holds
    each dense token's |z[t, :I]|^2 (this rank's share of its norm); other tokens' entries are unspecified (the
    gather route leaves them 0) and never read: only prompt tokens, which are dense, feed the statistic.
    parts, ticket: the DecodeWorkspace's masked_gate_up scratch."""
    num_tokens = x.shape[0]
    if num_tokens <= gather_max_tokens:
        sumsq = torch.zeros(num_tokens, dtype=torch.float32, device=x.device)
        z = gather_gate_up(x, gate_up_ext, inter, neuron_idx, token_slot, token_dense, act, sumsq=sumsq,
                           sentinel=True)
        return z, sumsq
    if num_tokens <= MASKED_GATE_UP_MAX_TOKENS:
        sumsq = torch.empty(num_tokens, dtype=torch.float32, device=x.device)
        z = masked_gate_up(x, gate_up_ext, inter, keep_mask, token_slot, token_dense, None, None, parts, ticket,
                           act, sumsq=sumsq)
        return z, sumsq
    rank = gate_up_ext.shape[0] - 2 * inter
    z, sumsq_parts = act_mul_mask(x @ gate_up_ext.t(), inter, rank, keep_mask, token_slot, token_dense, act)
    return z, sumsq_parts.sum(dim=1)


def caprese_ff_down(z: torch.Tensor, down_t_ext: torch.Tensor, inter: int, neuron_idx: torch.Tensor,
                    token_slot: torch.Tensor, token_dense: torch.Tensor, token_stat: torch.Tensor,
                    stat_sq: torch.Tensor, token_norm_sq: torch.Tensor, acc: torch.Tensor, tickets: torch.Tensor,
                    gather_max_tokens: int) -> torch.Tensor:
    """Exact mode, second half of caprese_ff: z from caprese_ff_gate_up (same tokens, same gather_max_tokens, so
    the same route), token_norm_sq [T] float32 each token's |z|^2 over all ranks' neurons (its sumsq all-reduced);
    adds the prompt tokens' statistic into stat_sq [S, I] and returns this rank's partial y [T, H].
    acc, tickets: the DecodeWorkspace's gather_down scratch."""
    num_tokens = z.shape[0]
    if num_tokens <= gather_max_tokens:
        return gather_down(z, down_t_ext, inter, neuron_idx, token_slot, token_dense, token_stat, stat_sq, acc,
                           tickets, token_norm_sq=token_norm_sq, sentinel=True)
    griffin_stats_(z, inter, token_slot, token_stat, stat_sq, token_norm_sq[:, None])
    return z @ down_t_ext


def gather_route_reference(x, gate_up_ext, down_t_ext, inter, neuron_idx, token_slot, token_dense, act):
    z = gather_gate_up_reference(x, gate_up_ext, inter, neuron_idx, token_slot, token_dense, act)
    return gather_down_reference(z, down_t_ext, inter, neuron_idx, token_slot, token_dense)


def masked_route_reference(x, gate_up_ext, down_t_ext, inter, keep_mask, token_slot, token_dense, act):
    z = act_mul_mask_reference(x.float() @ gate_up_ext.float().t(), inter, down_t_ext.shape[0] - inter, keep_mask,
                               token_slot, token_dense, act)
    return z @ down_t_ext.float()


def fuse_weights(gate_up_w: torch.Tensor, down_w: torch.Tensor, lowrank_a: torch.Tensor | None,
                 lowrank_b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up_ext [2I + R, H], down_t_ext [I + R, H]) from torch-layout weights gate_up [2I, H],
    down [H, I] and lowrank_a [H, R], lowrank_b [R, H] (R = 0 without a low-rank path)."""
    two_i, hidden = gate_up_w.shape
    rank = 0 if lowrank_a is None else lowrank_a.shape[1]
    gate_up_ext = torch.empty(two_i + rank, hidden, dtype=gate_up_w.dtype, device=gate_up_w.device)
    gate_up_ext[:two_i] = gate_up_w
    down_t_ext = torch.empty(two_i // 2 + rank, hidden, dtype=down_w.dtype, device=down_w.device)
    down_t_ext[: two_i // 2] = down_w.t()
    if rank:
        gate_up_ext[two_i:] = lowrank_a.t()
        down_t_ext[two_i // 2:] = lowrank_b
    return gate_up_ext, down_t_ext
