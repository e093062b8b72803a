"""Decode batches' gate/up in one pass: z = [act(g) * u * keep | h_lowrank * sparse], g|u|h = x gate_up_ext^T.

The masked route (more tokens than gathering pays for) reads every row of gate_up_ext once for all
tokens of the step. Doing that in cuBLAS and masking afterwards costs a second launch and a round
trip of h [T, 2I + R] through memory, and cuBLAS picks a slower tile for 2I + R rows than for the
dense 2I. Here each program takes BLOCK_N neurons, streams their gate and up rows through the
tensor cores against the step's few tokens (weights as the MMA's M side: T is only 8..64), and
applies activation, the per-request keep mask and the low-rank channels' sparse gate in registers.
Programs past the neurons take the R low-rank rows (h_lowrank = x A, zero for dense tokens).

GRIFFIN's statistic for prompt tokens needs each token's norm over the whole row: every program
writes its block's sums of squares into `parts`; the last program to finish (a ticket, as in
gather_down) adds the statistic of the step's prompt tokens, if any, and resets the ticket. A decode
step pays one atomic per program for it. Under tensor parallelism's exact selection the norm is over all
ranks' neurons, known only after an all-reduce: given `sumsq`, the last program writes each token's sum of
squares there instead (this rank's share of the norm), and griffin_stats_ adds the statistic afterwards with
the all-reduced norms (decode_mlp.caprese_ff_gate_up / caprese_ff_down).

    x            [T, H]             T <= MAX_TOKENS
    gate_up_ext  [2I + R, H]
    keep_mask    [S, I] uint8       per-slot selected neurons (1 = kept)
    token_slot   [T] int64, token_dense [T] bool, token_stat [T] bool
    stat_sq      [S, I] float32     updated in place for prompt tokens
    parts        [MAX_TOKENS, >= cdiv(I, BLOCK_N)] float32 scratch, written before it is read
    ticket       [1] int32, zero before and zero again after
    sumsq        [T] float32, optional: written with each token's sum of squares of z[t, :I] as stored;
                 token_stat and stat_sq are then not read (None)
    -> z         [T, I + R]
float32 models (tests, the equivalence check) get full float32 products, as cuBLAS gives them; the
tensor cores' tf32 would part from the PyTorch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from caprese_vllm.kernels.gather_gate_up import ACTIVATIONS, apply_act

MAX_TOKENS = 64


def launch_config(num_tokens: int, element_size: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages): the fastest of benchmarks/kernel_latency.py --sweep-masked
    on an H100 at 8 and 32 tokens for the Llama-3.1-8B and Gemma-2-9B shapes (or within 0.5 us of it),
    for 16-bit weights. Wider elements (float32) take a narrower BLOCK_K, so that each pipeline stage
    holds the same bytes of shared memory: float32 at BLOCK_K 128 asked 288 KiB at 64 tokens, more than
    an H100's 227 KiB."""
    block_k = 128 * 2 // max(element_size, 2)
    if num_tokens <= 16:
        return (64, block_k, 4, 3)
    return (128, block_k, 8, 3) if num_tokens <= 32 else (64, block_k, 8, 3)  # 128 x 64: out of shared memory


@triton.jit
def _weight_tile(rows, row_live, k, H, EVEN_K: tl.constexpr):
    """[rows, BLOCK_K] of weight rows (row pointers [rows, 1]) at columns k."""
    if EVEN_K:
        return tl.load(rows + k[None, :], mask=row_live[:, None], other=0.0)
    return tl.load(rows + k[None, :], mask=row_live[:, None] & (k < H)[None, :], other=0.0)


@triton.jit
def _x_t_tile(x_cols, t_live, k, H, EVEN_K: tl.constexpr):
    """x^T [BLOCK_K, BLOCK_T] (token pointers [1, BLOCK_T]) at rows k."""
    if EVEN_K:
        return tl.load(x_cols + k[:, None], mask=t_live[None, :], other=0.0)
    return tl.load(x_cols + k[:, None], mask=(k < H)[:, None] & t_live[None, :], other=0.0)


@triton.jit
def _masked_gate_up_kernel(x_ptr, w_ptr, keep_ptr, slot_ptr, dense_ptr, stat_flag_ptr, stat_ptr, parts_ptr,
                           ticket_ptr, z_ptr, sumsq_ptr, T, H, I, R, stride_x, stride_w, stride_keep, stride_stat,
                           stride_parts, stride_z, ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
                           EVEN_K: tl.constexpr, PRECISION: tl.constexpr, SUMSQ: tl.constexpr):
    pid = tl.program_id(0)
    num_neuron_tiles = tl.cdiv(I, BLOCK_N)
    t = tl.arange(0, BLOCK_T)
    t_live = t < T
    kk = tl.arange(0, BLOCK_K)
    x_cols = x_ptr + t[None, :] * stride_x          # x^T tile [BLOCK_K, BLOCK_T]: weights are the MMA's M side
    dense = tl.load(dense_ptr + t, mask=t_live, other=1) != 0
    if pid < num_neuron_tiles:
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_live = n < I
        gate_rows = w_ptr + n.to(tl.int64)[:, None] * stride_w
        up_rows = w_ptr + (n + I).to(tl.int64)[:, None] * stride_w
        acc_gate = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + kk
            xt = _x_t_tile(x_cols, t_live, k, H, EVEN_K)
            wg = _weight_tile(gate_rows, n_live, k, H, EVEN_K)
            wu = _weight_tile(up_rows, n_live, k, H, EVEN_K)
            acc_gate = tl.dot(wg, xt, acc_gate, input_precision=PRECISION)
            acc_up = tl.dot(wu, xt, acc_up, input_precision=PRECISION)
        slot = tl.load(slot_ptr + t, mask=t_live, other=0)
        live = n_live[:, None] & t_live[None, :]
        keep = tl.load(keep_ptr + slot[None, :] * stride_keep + n[:, None], mask=live, other=0) != 0
        keep = keep | dense[None, :]
        z = tl.where(keep, apply_act(acc_gate, ACT) * acc_up, 0.0).to(z_ptr.dtype.element_ty)
        tl.store(z_ptr + t[None, :] * stride_z + n[:, None], z, mask=live)
        zf = tl.where(live, z.to(tl.float32), 0.0)
        tl.store(parts_ptr + t * stride_parts + pid, tl.sum(zf * zf, axis=0), mask=t_live)
    else:
        j = (pid - num_neuron_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        j_live = j < R
        rows = w_ptr + (2 * I + j).to(tl.int64)[:, None] * stride_w
        acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + kk
            w = _weight_tile(rows, j_live, k, H, EVEN_K)
            acc = tl.dot(w, _x_t_tile(x_cols, t_live, k, H, EVEN_K), acc, input_precision=PRECISION)
        z = tl.where(dense[None, :], 0.0, acc).to(z_ptr.dtype.element_ty)
        tl.store(z_ptr + t[None, :] * stride_z + (I + j)[:, None], z, mask=j_live[:, None] & t_live[None, :])

    # Every program's z and parts are stored before its ticket counts (barrier, then a release atomic).
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        tl.store(ticket_ptr, 0)
        if SUMSQ:
            # Every token's |z[t, :I]|^2 (this rank's share of exact mode's norm); the statistic comes later.
            p = tl.arange(0, BLOCK_P)
            part = tl.load(parts_ptr + t[:, None] * stride_parts + p[None, :],
                           mask=t_live[:, None] & (p < num_neuron_tiles)[None, :], other=0.0, cache_modifier=".cg")
            tl.store(sumsq_ptr + t, tl.sum(part, axis=1), mask=t_live)
        else:
            is_stat = tl.load(stat_flag_ptr + t, mask=t_live, other=0) != 0
            if tl.max(is_stat.to(tl.int32), axis=0) != 0:
                p = tl.arange(0, BLOCK_P)
                c = tl.arange(0, BLOCK_S)
                for tt in range(0, T):
                    if tl.load(stat_flag_ptr + tt) != 0:
                        # .cg: read what other programs wrote where it landed (L2), not a stale L1 line.
                        sumsq = tl.sum(tl.load(parts_ptr + tt * stride_parts + p, mask=p < num_neuron_tiles,
                                               other=0.0, cache_modifier=".cg"), axis=0)
                        # NaN-propagating: a NaN norm must give NaN, as griffin_accumulate (not 1 / tiny).
                        inv = 1.0 / tl.maximum(sumsq, 1.1754943508222875e-38, propagate_nan=tl.PropagateNan.ALL)
                        stat_row = stat_ptr + tl.load(slot_ptr + tt) * stride_stat
                        for c0 in range(0, I, BLOCK_S):
                            cc = c0 + c
                            zc = tl.load(z_ptr + tt * stride_z + cc, mask=cc < I, other=0.0,
                                         cache_modifier=".cg").to(tl.float32)
                            # The only program writing stat_sq in this launch: no atomics needed.
                            old = tl.load(stat_row + cc, mask=cc < I, other=0.0)
                            tl.store(stat_row + cc, old + zc * zc * inv, mask=cc < I)


def masked_workspace(inter: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(parts, ticket) for masked_gate_up with any BLOCK_N >= 16, shared by all layers of this width."""
    return (torch.zeros(MAX_TOKENS, triton.cdiv(inter, 16), dtype=torch.float32, device=device),
            torch.zeros(1, dtype=torch.int32, device=device))


def masked_gate_up(x: torch.Tensor, gate_up_ext: torch.Tensor, inter: int, keep_mask: torch.Tensor,
                   token_slot: torch.Tensor, token_dense: torch.Tensor, token_stat: torch.Tensor | None,
                   stat_sq: torch.Tensor | None, parts: torch.Tensor, ticket: torch.Tensor, act: str,
                   config: tuple[int, int, int, int] | None = None,
                   sumsq: torch.Tensor | None = None) -> torch.Tensor:
    num_tokens, hidden = x.shape
    if num_tokens > MAX_TOKENS:
        raise ValueError(f"masked_gate_up: {num_tokens} tokens, at most {MAX_TOKENS}")
    block_n, block_k, num_warps, num_stages = config or launch_config(num_tokens, x.element_size())
    rank = gate_up_ext.shape[0] - 2 * inter
    num_neuron_tiles = triton.cdiv(inter, block_n)
    if parts.shape[1] < num_neuron_tiles:
        raise ValueError(f"masked_gate_up: parts {tuple(parts.shape)} too small for {num_neuron_tiles} tiles")
    if sumsq is None and (token_stat is None or stat_sq is None):
        raise ValueError("masked_gate_up: the statistic needs token_stat and stat_sq (or sumsq, for exact mode)")
    if sumsq is not None:  # the statistic's pointers are not read: any tensor stands in
        token_stat, stat_sq = token_dense, parts
    z = torch.empty(num_tokens, inter + rank, dtype=x.dtype, device=x.device)
    grid = (num_neuron_tiles + triton.cdiv(rank, block_n),)
    _masked_gate_up_kernel[grid](
        x, gate_up_ext, keep_mask, token_slot, token_dense, token_stat, stat_sq, parts, ticket, z,
        parts if sumsq is None else sumsq, num_tokens, hidden, inter, rank, x.stride(0), gate_up_ext.stride(0),
        keep_mask.stride(0), stat_sq.stride(0), parts.stride(0), z.stride(0), ACT=ACTIVATIONS[act],
        BLOCK_T=max(16, triton.next_power_of_2(num_tokens)), BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_P=triton.next_power_of_2(num_neuron_tiles), BLOCK_S=1024, EVEN_K=hidden % block_k == 0,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", SUMSQ=sumsq is not None,
        num_warps=num_warps, num_stages=num_stages)
    return z
