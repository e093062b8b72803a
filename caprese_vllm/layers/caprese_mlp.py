"""The Caprese MLP for vLLM models: the model's own fused gate/up and down projections (and their
weight loaders, untouched) plus a sparse decode path and the low-rank branch.

    gate_up = gate_up_proj(x)                       [T, 2I]
    z       = act_and_mul(gate_up)                  [T, I]   dense activations
    z       = sparsify(z)                           prompt tokens feed statistics and stay dense;
                                                    decode tokens keep their request's neurons
    y       = down_proj(z) + sparse_scale * (x @ lowrank_a) @ lowrank_b

This is the portable PyTorch path: it computes every neuron and masks, so it is exact against the
reference and runs anywhere; the GPU path replaces the decode part with gathering kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from caprese_vllm.engine import ops  # noqa: F401  (registers torch.ops.caprese.*)
from caprese_vllm.engine.batch_state import CapreseBatchState, GriffinLayerState
from caprese_vllm.methods import MethodSpec, griffin_k


def _default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    if param.shape != loaded_weight.shape:
        raise ValueError(f"caprese: low-rank tensor of shape {tuple(loaded_weight.shape)} does not fit "
                         f"parameter of shape {tuple(param.shape)}")
    param.data.copy_(loaded_weight)


class CapreseMLP(nn.Module):
    def __init__(self, mlp: nn.Module, layer_idx: int, method: MethodSpec, rank: int | None,
                 act: str, batch_state: CapreseBatchState, hidden_size: int, intermediate_size: int,
                 params_dtype: torch.dtype):
        super().__init__()
        # Adopt the original submodules under their own names, so checkpoint names still match.
        self.gate_up_proj = mlp.gate_up_proj
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn
        self.layer_idx = layer_idx
        self.method = method.name
        self.act = act
        self.intermediate_size = intermediate_size
        self.batch = batch_state
        self.griffin: GriffinLayerState | None = None
        if method.name == "griffin":
            self.griffin = batch_state.add_griffin_layer(intermediate_size, griffin_k(intermediate_size,
                                                                                       method.density))
        self.threshold = float(method.thresholds[layer_idx]) if method.name == "cats" else 0.0
        self.lowrank_a = self.lowrank_b = None
        if rank:
            device = mlp.gate_up_proj.weight.device
            self.lowrank_a = nn.Parameter(torch.zeros(hidden_size, rank, dtype=params_dtype, device=device),
                                          requires_grad=False)
            self.lowrank_b = nn.Parameter(torch.zeros(rank, hidden_size, dtype=params_dtype, device=device),
                                          requires_grad=False)
            for p in (self.lowrank_a, self.lowrank_b):
                p.weight_loader = _default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, H]
        num_tokens = x.shape[0]
        batch = self.batch
        token_dense = batch.token_dense[:num_tokens]
        gate_up, _ = self.gate_up_proj(x)                 # [T, 2I]
        z = self.act_fn(gate_up)                          # [T, I]
        if self.griffin is not None:
            z = torch.ops.caprese.griffin_sparsify(z, batch.token_slot[:num_tokens], batch.token_stat[:num_tokens],
                                                   token_dense, self.griffin.stat_sq, self.griffin.neuron_idx)
        elif self.method == "cats":
            z = torch.ops.caprese.cats_sparsify(z, gate_up[:, : self.intermediate_size], token_dense,
                                                self.threshold, self.act)
        y, _ = self.down_proj(z)                          # [T, H]
        if self.lowrank_a is not None:
            lowrank = (x @ self.lowrank_a) @ self.lowrank_b
            y = y + lowrank * batch.token_sparse_scale[:num_tokens].to(y.dtype)
        return y
