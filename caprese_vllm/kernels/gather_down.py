"""y[t] = sum over token t's virtual columns v of z[t, v] * down_t_ext[row(v)]: the gathered down projection.

Rows are neuron-major (see __init__), so a selected neuron's down weights are one contiguous row.
Batch-1 decode needs more programs than hidden blocks to fill the GPU, so programs also split each
token's columns into SPLIT chunks and add partial rows into a float32 workspace with atomics. The
last program of a (token, hidden block) to finish (a ticket counter) writes the sum out in y's dtype
and leaves workspace and counter at zero for the next call: one kernel, no memset, no cast kernel.
Prompt tokens also add GRIFFIN's statistic here (a dense token's columns are its neurons), so the
gather route needs no separate statistics kernel.

    z            [T, I + R]    from gather_gate_up
    down_t_ext   [I + R, H]
    neuron_idx   [S, K]        as gather_gate_up's: an entry >= I (exact mode's sentinel) adds nothing and reads
                               no row (row I of down_t_ext is the first low-rank row)
    acc          [>= T, H] float32, tickets [>= T * cdiv(H, BLOCK_H)] int32: zero, and zero again after
    stat_sq      [S, I] float32, updated in place for prompt tokens (token_stat)
    token_norm_sq [T] float32, optional: each token's |z|^2 to normalise the statistic by (tensor parallelism's
                 exact mode: the norm over all ranks' neurons, all-reduced); without it, |z[t, :I]|^2 here
    -> y         [T, H]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_down_kernel(z_ptr, w_ptr, idx_ptr, slot_ptr, dense_ptr, stat_flag_ptr, stat_ptr, norm_ptr, acc_ptr,
                        ticket_ptr, y_ptr, H, I, K, R, stride_z, stride_w, stride_idx, stride_stat, stride_acc,
                        stride_y, SPLIT, NUM_HB, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
                        HAS_NORM: tl.constexpr, SENTINEL: tl.constexpr):
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
        if SENTINEL:  # exact TP selection only: a sentinel (>= I) is no neuron, nothing loaded
            real = live & ((v >= count) | (row < I))
        else:
            real = live
        zv = tl.load(z_ptr + t * stride_z + v, mask=real, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + row[:, None] * stride_w + hh[None, :], mask=real[:, None] & hmask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * zv[:, None], axis=0)
    tl.atomic_add(acc_ptr + t * stride_acc + hh, acc, mask=hmask)

    if (pid_h == 0) & dense & (tl.load(stat_flag_ptr + t) != 0):
        # GRIFFIN: stat_sq[slot, n] += z_n^2 / |z|^2 for this program's chunk of neurons.
        if HAS_NORM:
            norm_sq = tl.load(norm_ptr + t)
        else:
            sumsq = tl.zeros([BLOCK_S], dtype=tl.float32)
            for c0 in range(0, I, BLOCK_S):
                c = c0 + tl.arange(0, BLOCK_S)
                zc = tl.load(z_ptr + t * stride_z + c, mask=c < I, other=0.0).to(tl.float32)
                sumsq += zc * zc
            norm_sq = tl.sum(sumsq, axis=0)
        # A NaN norm stays NaN (z^2 / NaN, as griffin_accumulate): the default max would return the smallest normal.
        inv = 1.0 / tl.maximum(norm_sq, 1.1754943508222875e-38, propagate_nan=tl.PropagateNan.ALL)
        for c0 in range(lo, hi, BLOCK_S):
            c = c0 + tl.arange(0, BLOCK_S)
            zc = tl.load(z_ptr + t * stride_z + c, mask=c < hi, other=0.0).to(tl.float32)
            tl.atomic_add(stat_ptr + slot * stride_stat + c, zc * zc * inv, mask=c < hi)

    # acq_rel atomics: every program's partial sum is in acc before its ticket is counted.
    ticket = tl.atomic_add(ticket_ptr + t * NUM_HB + pid_h, 1)
    if ticket == tl.cdiv(total, chunk) - 1:
        # The last one: read the sum where the atomics landed (adding 0 reads past the L1 cache), then
        # zero workspace and ticket with plain stores: no other program of this launch touches them now.
        zero = tl.zeros([BLOCK_H], dtype=tl.float32)
        out = tl.atomic_add(acc_ptr + t * stride_acc + hh, zero, mask=hmask)
        tl.store(acc_ptr + t * stride_acc + hh, zero, mask=hmask)
        tl.store(ticket_ptr + t * NUM_HB + pid_h, 0)
        tl.store(y_ptr + t * stride_y + hh, out.to(y_ptr.dtype.element_ty), mask=hmask)


def gather_workspace(max_tokens: int, hidden: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(acc, tickets) for gather_down with up to max_tokens tokens; any block_h >= 64 fits."""
    return (torch.zeros(max_tokens, hidden, dtype=torch.float32, device=device),
            torch.zeros(max_tokens * triton.cdiv(hidden, 64), dtype=torch.int32, device=device))


def gather_down(z: torch.Tensor, down_t_ext: torch.Tensor, inter: int, neuron_idx: torch.Tensor,
                token_slot: torch.Tensor, token_dense: torch.Tensor, token_stat: torch.Tensor, stat_sq: torch.Tensor,
                acc: torch.Tensor, tickets: torch.Tensor, split: int = 64, block_n: int = 64, block_h: int = 256,
                num_warps: int = 2, token_norm_sq: torch.Tensor | None = None, sentinel: bool = False) -> torch.Tensor:
    """sentinel: neuron_idx may hold entries >= inter (exact TP selection's fill), to be skipped."""
    num_tokens = z.shape[0]
    hidden = down_t_ext.shape[1]
    rank, k = down_t_ext.shape[0] - inter, neuron_idx.shape[1]
    num_hb = triton.cdiv(hidden, block_h)
    if acc.shape[0] < num_tokens or acc.shape[1] != hidden or tickets.numel() < num_tokens * num_hb:
        raise ValueError(f"gather_down: workspace {tuple(acc.shape)} / {tickets.numel()} tickets too small for "
                         f"{num_tokens} tokens of hidden size {hidden}")
    y = torch.empty(num_tokens, hidden, dtype=z.dtype, device=z.device)
    grid = (num_tokens, num_hb, split)
    _gather_down_kernel[grid](
        z, down_t_ext, neuron_idx, token_slot, token_dense, token_stat, stat_sq,
        stat_sq if token_norm_sq is None else token_norm_sq, acc, tickets, y, hidden, inter, k, rank, z.stride(0),
        down_t_ext.stride(0), neuron_idx.stride(0), stat_sq.stride(0), acc.stride(0), y.stride(0), split, num_hb,
        BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_S=1024, HAS_NORM=token_norm_sq is not None, SENTINEL=sentinel,
        num_warps=num_warps)
    return y


def gather_down_reference(z, down_t_ext, inter, neuron_idx, token_slot, token_dense):
    """Token by token, in float32 (the statistic's definition is griffin_stats_reference_)."""
    rank, k = down_t_ext.shape[0] - inter, neuron_idx.shape[1]
    y = torch.zeros(z.shape[0], down_t_ext.shape[1], dtype=torch.float32, device=z.device)
    for t in range(z.shape[0]):
        zt = z[t].float()
        if bool(token_dense[t]):
            y[t] = zt[:inter] @ down_t_ext[:inter].float()
        else:
            idx = neuron_idx[int(token_slot[t])].long()
            real = idx < inter                  # a sentinel (>= I) is no neuron: nothing added, no row read
            y[t] = zt[:k][real] @ down_t_ext[idx[real]].float() + zt[k: k + rank] @ down_t_ext[inter:].float()
    return y
