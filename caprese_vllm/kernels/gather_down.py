"""y[t] = sum over token t's virtual columns v of z[t, v] * down_t_ext[row(v)]: the gathered down projection.

Rows are neuron-major (see __init__), so a selected neuron's down weights are one contiguous row.
Programs split each token's columns into SPLIT chunks and add partial rows into a float32 output
with atomics (batch-1 decode needs that split to fill the GPU).

    z            [T, I + R]    from gather_gate_up
    down_t_ext   [I + R, H]
    -> y         [T, H]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_down_kernel(z_ptr, w_ptr, idx_ptr, slot_ptr, dense_ptr, y_ptr,
                        H, I, K, R, stride_z, stride_w, stride_idx, stride_y, SPLIT,
                        BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_s = tl.program_id(2)
    dense = tl.load(dense_ptr + t) != 0
    count = tl.where(dense, I, K)
    total = count + tl.where(dense, 0, R)
    chunk = tl.cdiv(tl.cdiv(total, SPLIT), BLOCK_N) * BLOCK_N
    lo = pid_s * chunk
    hi = tl.minimum(lo + chunk, total)
    if lo >= hi:
        return
    slot = tl.load(slot_ptr + t)
    hh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = hh < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for v0 in range(lo, hi, BLOCK_N):
        v = v0 + tl.arange(0, BLOCK_N)
        live = v < hi
        is_neuron = v < count
        table = tl.load(idx_ptr + slot * stride_idx + v, mask=live & is_neuron & (v < K), other=0)
        row = tl.where(is_neuron, tl.where(dense, v, table), I + (v - count)).to(tl.int64)
        zv = tl.load(z_ptr + t * stride_z + v, mask=live, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + row[:, None] * stride_w + hh[None, :], mask=live[:, None] & hmask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * zv[:, None], axis=0)
    tl.atomic_add(y_ptr + t * stride_y + hh, acc, mask=hmask)


def gather_down(z: torch.Tensor, down_t_ext: torch.Tensor, inter: int, neuron_idx: torch.Tensor,
                token_slot: torch.Tensor, token_dense: torch.Tensor, split: int = 64, block_n: int = 64,
                block_h: int = 256, num_warps: int = 2) -> torch.Tensor:
    num_tokens = z.shape[0]
    hidden = down_t_ext.shape[1]
    rank, k = down_t_ext.shape[0] - inter, neuron_idx.shape[1]
    y = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=z.device)
    grid = (num_tokens, triton.cdiv(hidden, block_h), split)
    _gather_down_kernel[grid](
        z, down_t_ext, neuron_idx, token_slot, token_dense, y, hidden, inter, k, rank, z.stride(0),
        down_t_ext.stride(0), neuron_idx.stride(0), y.stride(0), split, BLOCK_N=block_n, BLOCK_H=block_h,
        num_warps=num_warps)
    return y.to(z.dtype)


def gather_down_reference(z, down_t_ext, inter, neuron_idx, token_slot, token_dense):
    rank, k = down_t_ext.shape[0] - inter, neuron_idx.shape[1]
    y = torch.zeros(z.shape[0], down_t_ext.shape[1], dtype=torch.float32, device=z.device)
    for t in range(z.shape[0]):
        zt = z[t].float()
        if bool(token_dense[t]):
            y[t] = zt[:inter] @ down_t_ext[:inter].float()
        else:
            idx = neuron_idx[int(token_slot[t])].long()
            y[t] = zt[:k] @ down_t_ext[idx].float() + zt[k: k + rank] @ down_t_ext[inter:].float()
    return y
