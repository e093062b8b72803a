"""Caprese's per-token FF sparsification as torch custom ops (portable PyTorch path).

Custom ops keep torch.compile from tracing into data-dependent code and make the in-place
statistics update explicit (`mutates_args`). They read only fixed device buffers, so they can be
captured in CUDA graphs. Inputs, for T tokens of one FF layer with I neurons:
  z            [T, I]  act(gate) * up of every token (the dense activations)
  token_slot   [T]     int64 per-request state slot of each token (a dummy slot for padding)
  token_stat   [T]     bool: prompt token, feeds the GRIFFIN statistic
  token_dense  [T]     bool: runs the dense FF (prompt / recomputed tokens); others are decoded sparse
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from caprese_vllm.methods import cats_keep_mask, griffin_token_stat, keep_of_indices


@torch.library.custom_op("caprese::griffin_sparsify", mutates_args=("stat_sq",))
def griffin_sparsify(z: torch.Tensor, token_slot: torch.Tensor, token_stat: torch.Tensor,
                     token_dense: torch.Tensor, stat_sq: torch.Tensor, neuron_idx: torch.Tensor) -> torch.Tensor:
    """Accumulate prompt statistics into stat_sq [slots, I]; keep each decode token's own neurons.
    Masks select (`where`), never multiply: a non-prompt token's NaN/Inf (NaN * 0 = NaN) must not
    reach the statistic, nor an unselected neuron's the output."""
    contrib = torch.where(token_stat.unsqueeze(-1), griffin_token_stat(z), 0.0)   # [T, I] float32
    stat_sq.index_add_(0, token_slot, contrib)
    keep = torch.zeros(z.shape, dtype=torch.bool, device=z.device)
    keep.scatter_(1, neuron_idx.index_select(0, token_slot), True)    # [T, I] the slot's k neurons
    keep |= token_dense.unsqueeze(-1)
    return torch.where(keep, z, 0.0)


@griffin_sparsify.register_fake
def _(z, token_slot, token_stat, token_dense, stat_sq, neuron_idx):
    return torch.empty_like(z)


@torch.library.custom_op("caprese::griffin_sparsify_sharded", mutates_args=("stat_sq",))
def griffin_sparsify_sharded(z: torch.Tensor, token_norm_sq: torch.Tensor, token_slot: torch.Tensor,
                             token_stat: torch.Tensor, token_dense: torch.Tensor, stat_sq: torch.Tensor,
                             neuron_idx: torch.Tensor) -> torch.Tensor:
    """griffin_sparsify on a tensor-parallel rank's neurons in exact mode (engine/tensor_parallel.py):
    z [T, I/tp] this rank's activations; token_norm_sq [T] float32 each token's squared norm over ALL I
    neurons (summed over the ranks), so stat_sq [slots, I/tp] accumulates what TP=1 does for these neurons;
    neuron_idx [slots, k_capacity] may hold the sentinel I/tp past the rank's count: it lands in an extra
    keep column that is dropped, so a rank may keep any number of neurons, none included."""
    contrib = torch.where(token_stat.unsqueeze(-1), griffin_token_stat(z, token_norm_sq), 0.0)   # [T, I/tp]
    stat_sq.index_add_(0, token_slot, contrib)
    keep = keep_of_indices(neuron_idx.index_select(0, token_slot), z.shape[1])   # [T, I/tp], the sentinel dropped
    keep |= token_dense.unsqueeze(-1)
    return torch.where(keep, z, 0.0)


@griffin_sparsify_sharded.register_fake
def _(z, token_norm_sq, token_slot, token_stat, token_dense, stat_sq, neuron_idx):
    return torch.empty_like(z)


@torch.library.custom_op("caprese::add_lowrank", mutates_args=())
def add_lowrank(y: torch.Tensor, x: torch.Tensor, lowrank_a: torch.Tensor, lowrank_b: torch.Tensor,
                token_dense: torch.Tensor) -> torch.Tensor:
    """y [T, H] + (x [T, H] @ lowrank_a [H, r]) @ lowrank_b [r, H] on decode tokens; dense tokens keep y as is.

    Opaque to torch.compile on purpose: traced, the low-rank branch's float32 copy of x and the where
    became part of Inductor's fused residual-add / RMSNorm kernels, which then rounded the residual
    stream differently from the dense model's graph (Inductor drops bf16 round trips it fuses over), so
    prompt tokens scored differently from dense vLLM (issue 17.1). Behind this boundary the graph
    around the MLP is the dense model's: its output is a plain tensor with y's values on dense tokens.
    Selected with a where (or an index), never a multiply: a prompt token's Inf times 0 would be NaN.

    Batch invariance follows the backend's dense GEMMs: on CPU, where vLLM's bf16 GEMMs give a row the same
    result at any batch size, the decode rows' products are computed row by row (lowrank_forward_rowwise),
    so a request decodes the same tokens alone and batched (issue 17.2); on CUDA one GEMM over all rows, as
    cuBLAS's (not batch-invariant) dense GEMMs, with fixed shapes that CUDA graphs can capture."""
    from caprese_vllm.lowrank import lowrank_forward, lowrank_forward_rowwise

    if y.device.type == "cpu":
        rows = torch.nonzero(~token_dense).squeeze(1)                       # [D] decode tokens
        out = y.clone()
        if rows.numel():
            out[rows] = y[rows] + lowrank_forward_rowwise(x[rows], lowrank_a, lowrank_b)
        return out
    return torch.where(token_dense.unsqueeze(-1), y, y + lowrank_forward(x, lowrank_a, lowrank_b))


@add_lowrank.register_fake
def _(y, x, lowrank_a, lowrank_b, token_dense):
    return torch.empty_like(y)


_ACTS = {"silu": F.silu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}


@torch.library.custom_op("caprese::cats_sparsify", mutates_args=())
def cats_sparsify(z: torch.Tensor, gate: torch.Tensor, token_dense: torch.Tensor, threshold: float,
                  act: str) -> torch.Tensor:
    """Zero decode-token activations whose |act(gate)| is under the layer's threshold."""
    keep = cats_keep_mask(_ACTS[act](gate), threshold) | token_dense.unsqueeze(-1)
    return torch.where(keep, z, 0.0)


@cats_sparsify.register_fake
def _(z, gate, token_dense, threshold, act):
    return torch.empty_like(z)


@torch.library.custom_op("caprese::fused_ff", mutates_args=("stat_sq", "acc", "tickets", "parts", "ticket"))
def fused_ff(x: torch.Tensor, gate_up_ext: torch.Tensor, down_t_ext: torch.Tensor, inter: int,
             neuron_idx: torch.Tensor, keep_mask: torch.Tensor, token_slot: torch.Tensor, token_dense: torch.Tensor,
             token_stat: torch.Tensor, stat_sq: torch.Tensor, acc: torch.Tensor, tickets: torch.Tensor,
             parts: torch.Tensor, ticket: torch.Tensor, act: str, gather_max_tokens: int) -> torch.Tensor:
    """GPU: the whole GRIFFIN Caprese FF of a layer through the Triton kernels (kernels/decode_mlp.py).
    acc, tickets, parts, ticket: the kernels' DecodeWorkspace (scratch; acc and the tickets are zero before and
    after, declared mutated all the same)."""
    from caprese_vllm.kernels.decode_mlp import DecodeWorkspace, caprese_ff

    return caprese_ff(x, gate_up_ext, down_t_ext, inter, neuron_idx, keep_mask, token_slot, token_dense,
                      token_stat, stat_sq, DecodeWorkspace(acc, tickets, parts, ticket), act, gather_max_tokens)


@fused_ff.register_fake
def _(x, gate_up_ext, down_t_ext, inter, neuron_idx, keep_mask, token_slot, token_dense, token_stat, stat_sq, acc,
      tickets, parts, ticket, act, gather_max_tokens):
    return x.new_empty(x.shape[0], down_t_ext.shape[1])


# Tensor parallelism's exact selection: fused_ff in two halves, the all-reduce of each token's squared norm between
# them in CapreseMLP.forward (vLLM's registered all-reduce op, outside these opaque ops: compile and CUDA graphs
# see it as they see the dense model's).

@torch.library.custom_op("caprese::fused_ff_gate_up", mutates_args=("parts", "ticket"))
def fused_ff_gate_up(x: torch.Tensor, gate_up_ext: torch.Tensor, inter: int, neuron_idx: torch.Tensor,
                     keep_mask: torch.Tensor, token_slot: torch.Tensor, token_dense: torch.Tensor,
                     parts: torch.Tensor, ticket: torch.Tensor, act: str,
                     gather_max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPU, exact mode, first half: (z [T, I/tp + R], sumsq [T] float32: each dense token's sum of squares over this
    rank's neurons) (kernels/decode_mlp.py caprese_ff_gate_up). neuron_idx [slots, k_capacity] may hold the
    sentinel I/tp past the rank's count. parts, ticket: the DecodeWorkspace's masked_gate_up scratch."""
    from caprese_vllm.kernels.decode_mlp import caprese_ff_gate_up

    return caprese_ff_gate_up(x, gate_up_ext, inter, neuron_idx, keep_mask, token_slot, token_dense, parts, ticket,
                              act, gather_max_tokens)


@fused_ff_gate_up.register_fake
def _(x, gate_up_ext, inter, neuron_idx, keep_mask, token_slot, token_dense, parts, ticket, act, gather_max_tokens):
    rank = gate_up_ext.shape[0] - 2 * inter
    return x.new_empty(x.shape[0], inter + rank), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("caprese::fused_ff_down", mutates_args=("stat_sq", "acc", "tickets"))
def fused_ff_down(z: torch.Tensor, down_t_ext: torch.Tensor, inter: int, neuron_idx: torch.Tensor,
                  token_slot: torch.Tensor, token_dense: torch.Tensor, token_stat: torch.Tensor, stat_sq: torch.Tensor,
                  token_norm_sq: torch.Tensor, acc: torch.Tensor, tickets: torch.Tensor,
                  gather_max_tokens: int) -> torch.Tensor:
    """GPU, exact mode, second half: stat_sq [slots, I/tp] += each prompt token's z^2 / token_norm_sq (token_norm_sq
    [T] float32: fused_ff_gate_up's sumsq all-reduced over the ranks, as griffin_sparsify_sharded takes it), and
    this rank's partial y [T, H] (kernels/decode_mlp.py caprese_ff_down). acc, tickets: gather_down's scratch."""
    from caprese_vllm.kernels.decode_mlp import caprese_ff_down

    return caprese_ff_down(z, down_t_ext, inter, neuron_idx, token_slot, token_dense, token_stat, stat_sq,
                           token_norm_sq, acc, tickets, gather_max_tokens)


@fused_ff_down.register_fake
def _(z, down_t_ext, inter, neuron_idx, token_slot, token_dense, token_stat, stat_sq, token_norm_sq, acc, tickets,
      gather_max_tokens):
    return z.new_empty(z.shape[0], down_t_ext.shape[1])
