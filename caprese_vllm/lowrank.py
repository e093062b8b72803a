"""The Caprese low-rank path, and its folding into the FF projections.

Unfused: y = sparse_FF(x) + (x @ lowrank_a) @ lowrank_b, lowrank_a [H, r], lowrank_b [r, H].

Folded (the paper's merge, what the fast kernels run): with the k selected neurons' weights
gate_w [k, H], up_w [k, H], down_w [H, k] (torch Linear layout, out x in):
    gate_up_w = [gate_w ; up_w ; lowrank_a^T]      [2k + r, H]   one GEMM for all three
    down_w'   = [down_w | lowrank_b^T]             [H, k + r]
    h = x @ gate_up_w^T;  z = [act(h[:k]) * h[k:2k] | h[2k:]];  y = z @ down_w'^T
The r extra channels are not gated and not activated, so they compute exactly x A B.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def default_rank(num_params: int, hidden_size: int, num_lowrank_layers: int,
                 budget: float = 0.01, multiple: int = 8) -> int:
    """Largest rank (a multiple of `multiple`, at most hidden_size) keeping A and B of every
    low-rank layer within `budget` of the model's parameters (the paper: ~1%)."""
    per_rank = 2 * hidden_size * max(num_lowrank_layers, 1)
    rank = int(budget * num_params) // per_rank
    rank = (rank // multiple) * multiple
    return max(multiple, min(rank, hidden_size))


def lowrank_forward(x: torch.Tensor, lowrank_a: torch.Tensor, lowrank_b: torch.Tensor) -> torch.Tensor:
    """(x @ A) @ B for x [..., H], A [H, r], B [r, H] -> [..., H] in x's dtype: two thin GEMMs, never the
    dense H x H product, computed in float32 (float64 stays float64) whatever the dtypes: bf16/fp16 x @ A
    overflows or rounds away what the float32 fit learned; gradients reach float32 A and B as such."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return ((x.to(dtype) @ lowrank_a.to(dtype)) @ lowrank_b.to(dtype)).to(x.dtype)


def lowrank_forward_rowwise(x: torch.Tensor, lowrank_a: torch.Tensor, lowrank_b: torch.Tensor) -> torch.Tensor:
    """lowrank_forward for x [T, H], each row computed as its own [1, H] product (a batched GEMM over rows):
    a row's result is the same whatever other rows the step holds. One [T, H] GEMM is not: on CPU,
    float32 GEMMs switch kernels at 4 rows (MKL), so a request's decode token came out differently
    alone than batched, and greedy answers changed with the batch (issue 17.2), while vLLM's bf16 GEMMs
    give each row the same result at any batch size. Reads A and B once per row: for decode tokens."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    rows = x.shape[0]
    xa = torch.bmm(x.to(dtype).unsqueeze(1), lowrank_a.to(dtype).expand(rows, *lowrank_a.shape))   # [T, 1, r]
    return torch.bmm(xa, lowrank_b.to(dtype).expand(rows, *lowrank_b.shape)).squeeze(1).to(x.dtype)


def fold_lowrank(gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor,
                 lowrank_a: torch.Tensor, lowrank_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up_w [2k + r, H], down_w [H, k + r]) for the selected neurons plus the low-rank path."""
    gate_up_w = torch.cat([gate_w, up_w, lowrank_a.t().to(gate_w.dtype)], dim=0)
    folded_down_w = torch.cat([down_w, lowrank_b.t().to(down_w.dtype)], dim=1)
    return gate_up_w, folded_down_w


def folded_mlp_forward(x: torch.Tensor, gate_up_w: torch.Tensor, down_w: torch.Tensor, k: int,
                       act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    h = x @ gate_up_w.t()                                        # [..., 2k + r]
    z = torch.cat([act(h[..., :k]) * h[..., k:2 * k], h[..., 2 * k:]], dim=-1)  # [..., k + r]
    return z @ down_w.t()
