"""GRIFFIN's prompt statistic on GPU: stat_sq[slot_t] += z_t^2 / |z_t|^2 for every prompt token t.

A prefill step brings thousands of prompt tokens, mostly long runs of one request, so adding each
token's row into its slot with atomics would pile millions of atomics onto the same addresses.
Each program takes a tile of TOK_TILE tokens x BLOCK_C neurons instead and, when the whole tile
belongs to one slot (all but the tiles at request boundaries), adds the tile's column sums with one
atomic per neuron. Tiles without prompt tokens (every tile of a decode step) return at once.
Token norms come from act_mul_mask's per-block sums of squares, or under tensor parallelism's exact
selection from the all-reduced norm over all ranks' neurons (one part: token_norm_sq[:, None],
decode_mlp.caprese_ff_down). The float32 accumulation matches
`caprese_vllm.methods.griffin.griffin_accumulate`, NaN/Inf included: a prompt token's non-finite
values reach its own slot's statistic (the selection is defined for them), a non-prompt token's never.

    z            [T, >= I]   activations as stored, neuron order (columns [0, I))
    sumsq_parts  [T, P]      float32, sum over the row's parts = |z_t|^2 (act_mul_mask; exact mode: [T, 1])
    token_stat   [T] bool    prompt tokens
    stat_sq      [S, I] float32, updated in place
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _griffin_stats_kernel(z_ptr, parts_ptr, slot_ptr, stat_flag_ptr, stat_ptr, T, I, P, stride_z, stride_parts,
                          stride_stat, TOK_TILE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    t = tl.program_id(0) * TOK_TILE + tl.arange(0, TOK_TILE)
    tok_live = t < T
    flag = tl.load(stat_flag_ptr + t, mask=tok_live, other=0) != 0
    if tl.max(flag.to(tl.int32), axis=0) == 0:
        return
    slot = tl.load(slot_ptr + t, mask=flag, other=0)
    p = tl.arange(0, BLOCK_P)
    parts = tl.load(parts_ptr + t[:, None] * stride_parts + p[None, :], mask=flag[:, None] & (p[None, :] < P),
                    other=0.0)
    # NaN-propagating max: a NaN norm gives NaN everywhere (as griffin_accumulate), not 1 / tiny (~1e38).
    norm_sq = tl.maximum(tl.sum(parts, axis=1), 1.1754943508222875e-38, propagate_nan=tl.PropagateNan.ALL)
    inv = tl.where(flag, 1.0 / norm_sq, 0.0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < I
    zt = tl.load(z_ptr + t[:, None] * stride_z + c[None, :], mask=flag[:, None] & cmask[None, :], other=0.0)
    zt = zt.to(tl.float32)
    # Selected with a where, not masked by a multiply: only prompt tokens' values reach the statistic.
    contrib = tl.where(flag[:, None] & cmask[None, :], zt * zt * inv[:, None], 0.0)   # [TOK_TILE, BLOCK_C]
    lo = tl.min(tl.where(flag, slot, 2147483647), axis=0)
    hi = tl.max(tl.where(flag, slot, -1), axis=0)
    if lo == hi:
        tl.atomic_add(stat_ptr + lo * stride_stat + c, tl.sum(contrib, axis=0), mask=cmask)
    else:
        tl.atomic_add(stat_ptr + slot[:, None] * stride_stat + c[None, :], contrib,
                      mask=flag[:, None] & cmask[None, :])


def griffin_stats_(z: torch.Tensor, inter: int, token_slot: torch.Tensor, token_stat: torch.Tensor,
                   stat_sq: torch.Tensor, sumsq_parts: torch.Tensor, tok_tile: int = 32, block_c: int = 256) -> None:
    num_tokens, num_parts = sumsq_parts.shape
    grid = (triton.cdiv(num_tokens, tok_tile), triton.cdiv(inter, block_c))
    _griffin_stats_kernel[grid](z, sumsq_parts, token_slot, token_stat, stat_sq, num_tokens, inter, num_parts,
                                z.stride(0), sumsq_parts.stride(0), stat_sq.stride(0), TOK_TILE=tok_tile,
                                BLOCK_C=block_c,
                                # exact mode's one part would make a 1-wide block: keep them 2 or wider
                                BLOCK_P=max(2, triton.next_power_of_2(num_parts)))


def griffin_stats_reference_(z, inter, token_slot, token_stat, stat_sq, token_norm_sq=None) -> None:
    """griffin_token_stat (methods/griffin.py), written out: this module must import without pydantic.
    token_norm_sq [T] float32: each token's |z|^2 over all ranks' neurons (exact mode), else |z[t, :I]|^2."""
    zf = z[:, :inter].float()
    norm_sq = zf.square().sum(-1, keepdim=True) if token_norm_sq is None else token_norm_sq[:, None]
    contrib = zf.square() / norm_sq.clamp_min(torch.finfo(torch.float32).tiny)
    stat_sq.index_add_(0, token_slot, torch.where(token_stat[:, None], contrib, 0.0))
