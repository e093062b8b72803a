"""z[t, v] = act(gate_n . x_t) * (up_n . x_t) for each of token t's neurons n, then (A^T_j . x_t): one pass.

A gathered GEMV per token: every selected row of gate_up_ext is read once per token, which for
batch-1 decode is the whole cost (bandwidth-bound).

    x            [T, H]
    gate_up_ext  [2I + R, H]   (see __init__)
    neuron_idx   [S, K]        per-slot selected neurons, int32 or int64; an entry >= I is no neuron (tensor
                               parallelism's exact mode fills a rank's rows past its count with the sentinel
                               I/tp, engine/tensor_parallel.py): z = 0 there and no weight row is read (row I
                               of gate_up_ext is neuron 0's up row, not a neuron of this token)
    token_slot   [T] int64,  token_dense [T] bool
    sumsq        [T] float32, optional, zero: each dense token's sum of squares of z[t, :I] as stored is added
                 (exact mode's local share of the token norm; other tokens' entries stay zero)
    -> z         [T, I + R]    columns [0, count_t + rank_t) written
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
TORCH_ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}


@triton.jit
def apply_act(g, ACT: tl.constexpr):
    if ACT == 0:
        return g * tl.sigmoid(g)
    u = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # gelu-tanh; tanh(u) = 2 sigmoid(2u) - 1
    return 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))


@triton.jit
def _gather_gate_up_kernel(x_ptr, w_ptr, idx_ptr, slot_ptr, dense_ptr, z_ptr, sumsq_ptr,
                           H, I, K, R, stride_x, stride_w, stride_idx, stride_z,
                           ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, SUMSQ: tl.constexpr,
                           SENTINEL: tl.constexpr):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    dense = tl.load(dense_ptr + t) != 0
    count = tl.where(dense, I, K)
    total = count + tl.where(dense, 0, R)
    if pid_n * BLOCK_N >= total:
        return
    slot = tl.load(slot_ptr + t)
    v = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    live = v < total
    is_neuron = v < count
    table = tl.load(idx_ptr + slot * stride_idx + v, mask=live & is_neuron & (v < K), other=0)
    neuron = tl.where(dense, v, table).to(tl.int64)
    zrow = z_ptr + t * stride_z
    if SENTINEL:
        # A sentinel entry (>= I) reads no row and gives z = 0. Compiled in for exact TP selection only: at TP=1
        # and in local mode every entry is a neuron, and the kernel stays the one the H200 results were measured on.
        real = live & ((v >= count) | (neuron < I))
        if tl.max(real.to(tl.int32), axis=0) == 0:     # only sentinels (past the rank's count)
            tl.store(zrow + v, tl.zeros([BLOCK_N], dtype=z_ptr.dtype.element_ty), mask=live)
            return
    else:
        real = live
    gate_row = tl.where(is_neuron, neuron, 2 * I + (v - count)).to(tl.int64)
    up_row = neuron + I
    acc_gate = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
    h = tl.arange(0, BLOCK_H)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + h
        hmask = hh < H
        xv = tl.load(x_ptr + t * stride_x + hh, mask=hmask, other=0.0).to(tl.float32)
        g = tl.load(w_ptr + gate_row[:, None] * stride_w + hh[None, :], mask=real[:, None] & hmask[None, :],
                    other=0.0)
        acc_gate += tl.sum(g.to(tl.float32) * xv[None, :], axis=1)
        u = tl.load(w_ptr + up_row[:, None] * stride_w + hh[None, :],
                    mask=(real & is_neuron)[:, None] & hmask[None, :], other=0.0)
        acc_up += tl.sum(u.to(tl.float32) * xv[None, :], axis=1)
    z = tl.where(is_neuron, apply_act(acc_gate, ACT) * acc_up, acc_gate)
    if SENTINEL:
        z = tl.where(real, z, 0.0)
    z = z.to(z_ptr.dtype.element_ty)
    tl.store(zrow + v, z, mask=live)
    if SUMSQ:
        if dense:
            zf = tl.where(live, z.to(tl.float32), 0.0)
            tl.atomic_add(sumsq_ptr + t, tl.sum(zf * zf, axis=0))


def gather_gate_up(x: torch.Tensor, gate_up_ext: torch.Tensor, inter: int, neuron_idx: torch.Tensor,
                   token_slot: torch.Tensor, token_dense: torch.Tensor, act: str, block_n: int = 4,
                   block_h: int = 256, num_warps: int = 4, sumsq: torch.Tensor | None = None,
                   sentinel: bool = False) -> torch.Tensor:
    """sentinel: neuron_idx may hold entries >= inter (exact TP selection's fill), to be skipped."""
    num_tokens, hidden = x.shape
    rank, k = gate_up_ext.shape[0] - 2 * inter, neuron_idx.shape[1]
    z = torch.empty(num_tokens, inter + rank, dtype=x.dtype, device=x.device)
    grid = (num_tokens, triton.cdiv(inter + rank, block_n))
    _gather_gate_up_kernel[grid](
        x, gate_up_ext, neuron_idx, token_slot, token_dense, z, z if sumsq is None else sumsq, hidden, inter, k,
        rank, x.stride(0), gate_up_ext.stride(0), neuron_idx.stride(0), z.stride(0), ACT=ACTIVATIONS[act],
        BLOCK_N=block_n, BLOCK_H=block_h, SUMSQ=sumsq is not None, SENTINEL=sentinel,
        num_warps=num_warps)
    return z


def gather_gate_up_reference(x, gate_up_ext, inter, neuron_idx, token_slot, token_dense, act):
    """Token by token, in float32: the definition the kernel is tested against."""
    rank, k = gate_up_ext.shape[0] - 2 * inter, neuron_idx.shape[1]
    z = torch.zeros(x.shape[0], inter + rank, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        xt = x[t].float()
        dense = bool(token_dense[t])
        idx = torch.arange(inter, device=x.device) if dense else neuron_idx[int(token_slot[t])].long()
        real = idx < inter                      # a sentinel (>= I) is no neuron: z = 0, no row read
        gate = gate_up_ext[idx[real]].float() @ xt
        up = gate_up_ext[idx[real] + inter].float() @ xt
        z[t, : idx.numel()][real] = TORCH_ACTIVATIONS[act](gate) * up
        if not dense:
            z[t, k: k + rank] = gate_up_ext[2 * inter:].float() @ xt
    return z
