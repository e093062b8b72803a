"""Prefill-sized masked steps' activation: z = [act(g) * u * keep | h_lowrank * sparse] from h = x gate_up_ext^T.

With many tokens, each decode token with its own neurons, gathering reads more rows than the matrix
holds, so the step runs the dense GEMMs over gate_up_ext / down_t_ext (their low-rank rows included) and
this kernel, in place of vLLM's act_and_mul, zeroes each decode token's unselected neurons and its
low-rank channels' gate (dense tokens keep every neuron and get no low-rank contribution).

GRIFFIN's statistic needs each prompt token's norm over the whole row before any column can be
added: each program also writes the sum of squares of its block of z (as stored), and
griffin_stats.py adds the statistic with one atomic per neuron per tile of tokens. (Decode batches
take masked_gate_up instead, which does all of this in one kernel.)

    h            [T, >= 2I + R]  (rows past 2I + R: gate_up_ext's padding, never read)
    keep_mask    [S, I] uint8   per-slot selected neurons (1 = kept)
    -> z         [T, I + R]
       sumsq_parts [T, cdiv(I + R, BLOCK)] float32
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from caprese_vllm.kernels.gather_gate_up import ACTIVATIONS, TORCH_ACTIVATIONS, apply_act


@triton.jit
def _act_mul_mask_kernel(h_ptr, keep_ptr, slot_ptr, dense_ptr, z_ptr, parts_ptr, I, R, stride_h, stride_keep,
                         stride_z, stride_parts, ACT: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = c < I + R
    is_neuron = c < I
    dense = tl.load(dense_ptr + t) != 0
    slot = tl.load(slot_ptr + t)
    keep = tl.load(keep_ptr + slot * stride_keep + c, mask=live & is_neuron, other=0) != 0
    keep = keep | dense
    row = h_ptr + t.to(tl.int64) * stride_h
    # Column c's up value is h[I + c]; past the neurons, h[I + c] (c >= I) is low-rank channel c - I:
    # one contiguous load serves both, so both loads vectorize.
    gate = tl.load(row + c, mask=live & is_neuron, other=0.0).to(tl.float32)
    up_or_lowrank = tl.load(row + I + c, mask=live, other=0.0).to(tl.float32)
    z = tl.where(is_neuron, tl.where(keep, apply_act(gate, ACT) * up_or_lowrank, 0.0),
                 tl.where(dense, 0.0, up_or_lowrank))
    z = z.to(z_ptr.dtype.element_ty)
    tl.store(z_ptr + t * stride_z + c, z, mask=live)
    zf = tl.where(live & is_neuron, z.to(tl.float32), 0.0)
    tl.store(parts_ptr + t * stride_parts + tl.program_id(1), tl.sum(zf * zf, axis=0))


def act_mul_mask(h: torch.Tensor, inter: int, rank: int, keep_mask: torch.Tensor, token_slot: torch.Tensor,
                 token_dense: torch.Tensor, act: str, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens = h.shape[0]
    z = torch.empty(num_tokens, inter + rank, dtype=h.dtype, device=h.device)
    grid = (num_tokens, triton.cdiv(inter + rank, block))
    sumsq_parts = torch.empty(num_tokens, grid[1], dtype=torch.float32, device=h.device)
    _act_mul_mask_kernel[grid](h, keep_mask, token_slot, token_dense, z, sumsq_parts, inter, rank, h.stride(0),
                               keep_mask.stride(0), z.stride(0), sumsq_parts.stride(0), ACT=ACTIVATIONS[act],
                               BLOCK=block)
    return z, sumsq_parts


def act_mul_mask_reference(h, inter, rank, keep_mask, token_slot, token_dense, act):
    h = h.float()
    keep = keep_mask[token_slot].bool() | token_dense[:, None]
    z = torch.where(keep, TORCH_ACTIVATIONS[act](h[:, :inter]) * h[:, inter:2 * inter], 0.0)
    lowrank = torch.where(token_dense[:, None], 0.0, h[:, 2 * inter:2 * inter + rank])
    return torch.cat([z, lowrank], dim=1)
