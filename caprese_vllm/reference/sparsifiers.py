"""Per-layer, per-batch state of an FF method in the reference implementation.

Contract, for one FF layer and a batch of B sequences:
  observe(z, gate_act, prompt_mask)  prompt tokens (mask [B, S]) feed the method's statistics
  keep_mask(gate_act) -> [B, S, I]   which activations a *generated* token keeps
The reference keeps all I activations and selects with the mask (`where`, not a multiply: an
unselected neuron's NaN/Inf must not leak): simple, exact, and the ground truth that the gathering
fast paths are tested against. GRIFFIN's selection is defined for any statistic, NaN and Inf
included (methods/griffin.py), so its indices are always in range.
"""

from __future__ import annotations

import torch

from caprese_vllm.engine.tensor_parallel import TensorParallelShard
from caprese_vllm.methods import (
    MethodSpec, cats_keep_mask, griffin_accumulate, griffin_k, griffin_select, keep_of_indices,
)


class DenseSparsifier:
    def observe(self, z: torch.Tensor, gate_act: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        pass

    def keep_mask(self, gate_act: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(gate_act, dtype=torch.bool)


class GriffinSparsifier:
    """GRIFFIN on one layer. `local_shards` N > 1: the selection that `-tp N --caprese-tp-selection local` serves
    (engine/tensor_parallel.py), computed on one device: neurons [s*I/N, (s+1)*I/N) form shard s; each prompt
    token is normalised over each shard's neurons alone and shard s keeps its own top-k_s, k_s = k // N (+1 on
    the first k % N shards). What distillation fits a local-selection adapter on."""

    def __init__(self, intermediate_size: int, density: float, local_shards: int = 1):
        if isinstance(local_shards, bool) or not isinstance(local_shards, int) or local_shards < 1 \
                or intermediate_size % local_shards:
            raise ValueError(f"caprese: {local_shards!r} local-selection shards do not divide the layer's "
                             f"{intermediate_size} FF neurons")
        self.k = griffin_k(intermediate_size, density)
        if local_shards > 1 and self.k < local_shards:  # as -tp N local refuses it (engine/install.py)
            raise ValueError(f"caprese: local selection keeps k={self.k} neurons over {local_shards} shards, none on "
                             "some; use a higher density or fewer shards")
        self.local_shards = local_shards
        self.stat_sq: torch.Tensor | None = None   # [B, I] float32, sum over prompt tokens
        self.neuron_idx: torch.Tensor | None = None  # [B, k], set once the prompt is done

    def observe(self, z: torch.Tensor, gate_act: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        if self.stat_sq is None:
            self.stat_sq = torch.zeros(z.shape[0], z.shape[-1], dtype=torch.float32, device=z.device)
        # [B, S, I] -> [B, S, N, I/N] (N = 1 at TP=1): each token's norm is taken over each shard's neurons
        shards = z.unflatten(-1, (self.local_shards, -1))
        griffin_accumulate(self.stat_sq.view(self.stat_sq.shape[0], self.local_shards, -1), shards, prompt_mask)
        self.neuron_idx = None  # more prompt seen: select again

    def _select(self) -> torch.Tensor:
        """neuron_idx [B, k] int64 ascending."""
        if self.local_shards == 1:
            return griffin_select(self.stat_sq, self.k)
        width = self.stat_sq.shape[-1] // self.local_shards
        parts = []
        for s, stat in enumerate(self.stat_sq.split(width, dim=-1)):
            k_s = TensorParallelShard(self.local_shards, s, "local").local_k(self.k)
            parts.append(griffin_select(stat, k_s) + s * width)
        return torch.cat(parts, dim=-1)

    def keep_mask(self, gate_act: torch.Tensor) -> torch.Tensor:
        if self.stat_sq is None:
            raise RuntimeError("GRIFFIN needs the prompt's activations before the first generated token")
        if self.neuron_idx is None:
            self.neuron_idx = self._select()
        keep = keep_of_indices(self.neuron_idx, self.stat_sq.shape[-1])   # [B, I]
        return keep.unsqueeze(1).expand_as(gate_act)


class CatsSparsifier:
    def __init__(self, threshold: float):
        self.threshold = threshold

    def observe(self, z: torch.Tensor, gate_act: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        pass

    def keep_mask(self, gate_act: torch.Tensor) -> torch.Tensor:
        return cats_keep_mask(gate_act, self.threshold)


Sparsifier = DenseSparsifier | GriffinSparsifier | CatsSparsifier


def make_sparsifier(method: MethodSpec, layer: int, intermediate_size: int, local_shards: int = 1) -> Sparsifier:
    """local_shards: GRIFFIN's local tensor-parallel selection over that many shards (1: the TP=1 selection);
    ValueError for shards with another method (CATS has no selection: the same at any -tp)."""
    if local_shards != 1 and method.name != "griffin":
        raise ValueError(f"caprese: local selection over {local_shards!r} shards applies to GRIFFIN only, not "
                         f"{method.name}")
    if method.name == "griffin":
        return GriffinSparsifier(intermediate_size, method.density, local_shards)
    if method.name == "cats":
        return CatsSparsifier(method.thresholds[layer])
    return DenseSparsifier()
