"""GRIFFIN's prompt statistic on GPU: stat_sq[slot_t] += z_t^2 / |z_t|^2 for every prompt token t.

One program per token; non-prompt tokens return at once (decode steps pay only the launch). The
float32 accumulation matches `caprese_vllm.methods.griffin.griffin_accumulate`.

    z           [T, >= I]   dense activations in neuron order (columns [0, I))
    token_stat  [T] bool    prompt tokens
    stat_sq     [S, I] float32, updated in place
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl



@triton.jit
def _griffin_stats_kernel(z_ptr, slot_ptr, stat_flag_ptr, stat_ptr, I, stride_z, stride_stat,
                          BLOCK: tl.constexpr):
    t = tl.program_id(0)
    if tl.load(stat_flag_ptr + t) == 0:
        return
    slot = tl.load(slot_ptr + t)
    sumsq = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, I, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        zv = tl.load(z_ptr + t * stride_z + c, mask=c < I, other=0.0).to(tl.float32)
        sumsq += zv * zv
    inv = 1.0 / tl.maximum(tl.sum(sumsq, axis=0), 1.1754943508222875e-38)
    for c0 in range(0, I, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        zv = tl.load(z_ptr + t * stride_z + c, mask=c < I, other=0.0).to(tl.float32)
        tl.atomic_add(stat_ptr + slot * stride_stat + c, zv * zv * inv, mask=c < I)


def griffin_stats_(z: torch.Tensor, inter: int, token_slot: torch.Tensor, token_stat: torch.Tensor,
                   stat_sq: torch.Tensor, block: int = 1024) -> None:
    _griffin_stats_kernel[(z.shape[0],)](z, token_slot, token_stat, stat_sq, inter, z.stride(0), stat_sq.stride(0),
                                         BLOCK=block)


def griffin_stats_reference_(z, inter, token_slot, token_stat, stat_sq) -> None:
    """griffin_token_stat (methods/griffin.py), written out: this module must import without pydantic."""
    zf = z[:, :inter].float()
    contrib = zf.square() / zf.square().sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    stat_sq.index_add_(0, token_slot, contrib * token_stat[:, None])
