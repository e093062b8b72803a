"""GRIFFIN neuron selection (Dong et al. 2024, arXiv 2404.01365; reference code hdong920/GRIFFIN).

During the prompt the FF block runs dense. From the prompt's FF activations
`z = act(gate(x)) * up(x)` ([prompt_len, I]) each token row is scaled to unit L2 norm, the
statistic of neuron j is the L2 norm of column j over the prompt's tokens, and the top
`k = int(I * density)` neurons are kept for every generated token of that request.

This matches `src/griffin/llama.py` (mode 'gen', selection_method 'topk'):
    neuron_stat = (int_states / int_states.norm(dim=-1).unsqueeze(-1)).norm(dim=1)
    k = int(int_states.shape[-1] * k_factor); torch.topk(neuron_stat, k)
over all prompt tokens (the last one included). Deviations, all numerical, none in what is selected:
- we keep the *squared* statistic (sum over tokens of squared normalised activations) in float32 and
  accumulate it token by token, so a prompt split into chunks (vLLM's chunked prefill) gives the same
  selection as one pass; top-k of the square equals top-k of the norm;
- an all-zero activation row (never seen in practice) contributes nothing instead of NaN;
- `neuron_idx` is returned sorted ascending, so gathers read weight rows in memory order;
- the selection is defined for any statistic: a non-finite entry (NaN, +Inf, -Inf: an activation
  that overflowed) ranks below every finite one, ties go to the lowest index, so exactly k distinct
  in-range neurons come back whatever the statistic holds (an all-NaN row keeps neurons 0..k-1).
  Tokens are masked out of the statistic with a `where`, never a multiply (NaN * 0 = NaN).
"""

from __future__ import annotations

import math

import torch

_TINY = torch.finfo(torch.float32).tiny


def griffin_k(intermediate_size: int, density: float) -> int:
    """Neurons kept per layer: int(I * density) (the reference code's rule); 0 for a tiny density."""
    return int(intermediate_size * density)


def check_griffin_k(intermediate_size: int, density: float, source: str) -> int:
    """griffin_k, or ValueError naming `source` (the field or flag the density came from) when it keeps
    no neuron: k = 0 would fail on the first decode step (issue 17 item 5)."""
    k = griffin_k(intermediate_size, density)
    if k < 1:
        least = math.ceil(1e6 / intermediate_size) / 1e6
        raise ValueError(f"{source} {density:g} keeps int({intermediate_size} * {density:g}) = 0 of the model's "
                         f"{intermediate_size} FF neurons per layer; GRIFFIN needs at least 1: use a density >= "
                         f"{least:g}")
    return k


def griffin_token_stat(z: torch.Tensor, norm_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token contribution to the squared statistic: (z / ||z||)^2, [..., I] float32.
    norm_sq [...] float32: each token's ||z||^2 when z holds only some of its neurons (a tensor-parallel
    shard [..., I/tp]; the squared norm summed over the ranks), else computed from z."""
    z = z.float()
    if norm_sq is None:
        norm_sq = z.square().sum(dim=-1, keepdim=True)
    else:
        norm_sq = norm_sq.unsqueeze(-1)
    return z.square() / norm_sq.clamp_min(_TINY)


def griffin_accumulate(stat_sq: torch.Tensor, z: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Add the masked tokens of z [B, S, I] to stat_sq [B, I] (in place); token_mask [B, S] bool.
    Masked-out tokens (padding, generated) contribute exactly 0, even where their z is NaN or Inf.
    z may have groups of neurons normalised on their own, z [B, S, N, I/N] into stat_sq [B, N, I/N] (tensor
    parallelism's local selection over N shards: reference/sparsifiers.py)."""
    mask = token_mask.reshape(*token_mask.shape, *([1] * (z.dim() - token_mask.dim())))   # [B, S, 1...]
    contrib = torch.where(mask, griffin_token_stat(z), 0.0)
    stat_sq += contrib.sum(dim=1)
    return stat_sq


def griffin_keep(stat_sq: torch.Tensor, k: int) -> torch.Tensor:
    """keep [..., I] bool with exactly k True per row, for any stat_sq [..., I] (float): the k neurons
    with the largest statistic, where every non-finite entry (NaN, +Inf, -Inf) ranks below every
    finite one; of neurons tied at the k-th largest value (non-finite ones included), the lowest
    indices (torch.topk leaves ties unspecified). So an all-NaN or all-equal row keeps 0..k-1.
    Raises ValueError unless 1 <= k <= I (a shape check: no host sync).

    Built from the k-th largest value and elementwise ops instead of topk(k = I / 2), which is slow
    for such a k (selecting 32 requests x 32 layers of 14336 neurons: 2.3 ms with topk on an H100)."""
    if not 1 <= k <= stat_sq.shape[-1]:
        raise ValueError(f"caprese: GRIFFIN keeps k={k} of {stat_sq.shape[-1]} neurons; k must be in [1, I]")
    stat_sq = torch.where(torch.isfinite(stat_sq), stat_sq, float("-inf"))
    kth = torch.kthvalue(stat_sq, stat_sq.shape[-1] - k + 1, dim=-1, keepdim=True).values
    above = stat_sq > kth
    tied = stat_sq == kth
    room = k - above.sum(dim=-1, keepdim=True)  # places left for neurons tied at the k-th value
    return above | (tied & (tied.cumsum(dim=-1) <= room))


def griffin_indices(keep: torch.Tensor, k: int, fill: int | None = None) -> torch.Tensor:
    """neuron_idx [..., k] int64, ascending, of a keep mask [..., I] with k neurons per row: each kept
    neuron's place is the count of kept neurons before it (a scatter, no host sync, capturable).
    Always in [0, I), whatever keep holds: past the k-th, kept neurons are dropped; a row with fewer
    than k repeats neuron 0 in its last places (griffin_keep always gives exactly k), or `fill` when
    given (tensor parallelism's exact mode: a rank holds a varying share of the k, the rest of its row
    is a sentinel neuron that the masked route drops; engine/tensor_parallel.py)."""
    place = keep.cumsum(dim=-1) - 1
    place = torch.where(keep & (place < k), place, k)  # place k collects the neurons not kept
    idx = torch.full((*keep.shape[:-1], k + 1), 0 if fill is None else fill, dtype=torch.int64, device=keep.device)
    neurons = torch.arange(keep.shape[-1], device=keep.device).expand(keep.shape)
    return idx.scatter_(-1, place, neurons)[..., :k]


def keep_of_indices(neuron_idx: torch.Tensor, intermediate_size: int) -> torch.Tensor:
    """keep [..., I] bool of neuron_idx [..., k] rows over I neurons (I/tp on a tensor-parallel rank): the inverse
    of griffin_indices. An index I (tensor parallelism's exact-mode sentinel, griffin_indices' `fill`;
    engine/tensor_parallel.py) keeps nothing, wherever it stands in a row."""
    keep = torch.zeros(*neuron_idx.shape[:-1], intermediate_size + 1, dtype=torch.bool, device=neuron_idx.device)
    keep.scatter_(-1, neuron_idx, True)              # the sentinel lands in the last column, dropped
    return keep[..., :intermediate_size]


def griffin_select(stat_sq: torch.Tensor, k: int) -> torch.Tensor:
    """neuron_idx [..., k] int64: the k neurons with the largest statistic, ascending (ties: griffin_keep)."""
    return griffin_indices(griffin_keep(stat_sq, k), k)
