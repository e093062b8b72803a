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

from caprese_vllm.methods import MethodSpec, cats_keep_mask, griffin_accumulate, griffin_k, griffin_select


class DenseSparsifier:
    def observe(self, z: torch.Tensor, gate_act: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        pass

    def keep_mask(self, gate_act: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(gate_act, dtype=torch.bool)


class GriffinSparsifier:
    def __init__(self, intermediate_size: int, density: float):
        self.k = griffin_k(intermediate_size, density)
        self.stat_sq: torch.Tensor | None = None   # [B, I] float32, sum over prompt tokens
        self.neuron_idx: torch.Tensor | None = None  # [B, k], set once the prompt is done

    def observe(self, z: torch.Tensor, gate_act: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        if self.stat_sq is None:
            self.stat_sq = torch.zeros(z.shape[0], z.shape[-1], dtype=torch.float32, device=z.device)
        griffin_accumulate(self.stat_sq, z, prompt_mask)
        self.neuron_idx = None  # more prompt seen: select again

    def keep_mask(self, gate_act: torch.Tensor) -> torch.Tensor:
        if self.stat_sq is None:
            raise RuntimeError("GRIFFIN needs the prompt's activations before the first generated token")
        if self.neuron_idx is None:
            self.neuron_idx = griffin_select(self.stat_sq, self.k)
        keep = torch.zeros(self.stat_sq.shape, dtype=torch.bool, device=gate_act.device)
        keep.scatter_(1, self.neuron_idx, True)
        return keep.unsqueeze(1).expand_as(gate_act)


class CatsSparsifier:
    def __init__(self, threshold: float):
        self.threshold = threshold

    def observe(self, z: torch.Tensor, gate_act: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        pass

    def keep_mask(self, gate_act: torch.Tensor) -> torch.Tensor:
        return cats_keep_mask(gate_act, self.threshold)


Sparsifier = DenseSparsifier | GriffinSparsifier | CatsSparsifier


def make_sparsifier(method: MethodSpec, layer: int, intermediate_size: int) -> Sparsifier:
    if method.name == "griffin":
        return GriffinSparsifier(intermediate_size, method.density)
    if method.name == "cats":
        return CatsSparsifier(method.thresholds[layer])
    return DenseSparsifier()
