"""The Caprese MLP for vLLM models: the model's own fused gate/up and down projections (and their
weight loaders, untouched) plus a sparse decode path and the low-rank branch.

    gate_up = gate_up_proj(x)                       [T, 2I]
    z       = act_and_mul(gate_up)                  [T, I]   dense activations
    z       = sparsify(z)                           prompt tokens feed statistics and stay dense;
                                                    decode tokens keep their request's neurons
    y       = down_proj(z) + (x @ lowrank_a) @ lowrank_b     on decode tokens (a where, float32 product)

This is the portable PyTorch path: it computes every neuron and masks, so it is exact against the
reference and runs anywhere. On CUDA, GRIFFIN layers run the Triton kernels (caprese_kernels, on by
default where they apply; the plugin resolves it): once the weights are loaded (`build_gpu_layout`,
called by vLLM's post-loading pass through `quant_method`) the gate/up and down weights move into
neuron-major buffers that also hold the low-rank rows, and `caprese::fused_ff` runs the cheaper
route per step (kernels/decode_mlp.py): each token gathers its own rows while the step has at most
I // (k + R) tokens (batch-1 decode at density 0.5); above, every row is read once and the
unselected neurons are masked (one gate/up kernel for decode batches, cuBLAS for prefill).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

from caprese_vllm.engine import ops  # noqa: F401  (registers torch.ops.caprese.*)
from caprese_vllm.engine.batch_state import CapreseBatchState, GriffinLayerState
from caprese_vllm.methods import MethodSpec, griffin_k


logger = logging.getLogger("vllm.caprese")


class _AfterLoading(QuantizeMethodBase):
    """vLLM runs `quant_method.process_weights_after_loading(module)` for every module once the
    weights are in place, whatever the load format (dummy included): the hook for the GPU layout.
    The MLP is no quantized linear layer: it neither creates weights nor applies through this."""

    def create_weights(self, *args, **kwargs):
        raise NotImplementedError

    def apply(self, layer, *args, **kwargs):
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.build_gpu_layout()


def _default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    if param.shape != loaded_weight.shape:
        raise ValueError(f"caprese: low-rank tensor of shape {tuple(loaded_weight.shape)} does not fit "
                         f"parameter of shape {tuple(param.shape)}")
    param.data.copy_(loaded_weight)


class CapreseMLP(nn.Module):
    def __init__(self, mlp: nn.Module, layer_idx: int, method: MethodSpec, rank: int | None,
                 act: str, batch_state: CapreseBatchState, hidden_size: int, intermediate_size: int,
                 params_dtype: torch.dtype, use_kernels: bool = False):
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
                                                                                       method.density), layer_idx)
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
        self.quant_method = _AfterLoading()
        self.use_kernels = use_kernels and self.griffin is not None
        # Gathering reads T * (k + R) weight rows, the masked dense GEMMs I + R: gather while cheaper.
        self.gather_max_tokens = 0
        if self.griffin is not None:
            self.gather_max_tokens = max(1, intermediate_size // (self.griffin.k + (rank or 0)))
        # GPU layout (build_gpu_layout): gate_up_ext [2I + R, H], down_t_ext [I + R, H]
        self.gate_up_ext: torch.Tensor | None = None
        self.down_t_ext: torch.Tensor | None = None
        self.workspace = None  # kernels.decode_mlp.DecodeWorkspace, shared by all layers

    def build_gpu_layout(self) -> None:
        if not self.use_kernels:
            return
        weight = self.gate_up_proj.weight
        quant = type(self.gate_up_proj.quant_method).__name__
        if not weight.is_cuda or quant != "UnquantizedLinearMethod":
            # The plugin only turns kernels on for CUDA and unquantized models: a bug if reached.
            raise RuntimeError(f"caprese: layer {self.layer_idx}: GPU kernels on, but weights are "
                               f"{'on ' + str(weight.device) if not weight.is_cuda else quant}")
        from caprese_vllm.kernels.decode_mlp import MASKED_GATE_UP_MAX_TOKENS, fuse_weights

        down = self.down_proj.weight
        self.gate_up_ext, self.down_t_ext = fuse_weights(weight.data, down.data, self._param(self.lowrank_a),
                                                         self._param(self.lowrank_b))
        # The projections keep serving their weights as views of the new buffers: no second copy.
        two_i = weight.shape[0]
        weight.data = self.gate_up_ext[:two_i]
        down.data = self.down_t_ext[: two_i // 2].t()
        self.griffin.enable_keep_mask()
        # Sized for the model's largest gather_max_tokens (I // k), so all layers share one.
        self.workspace = self.batch.decode_workspace(self.intermediate_size // self.griffin.k, weight.shape[1])
        if self.layer_idx == 0:
            logger.info("caprese: GPU kernels on: each token gathers its neurons' rows in steps of up to %d "
                        "tokens, one masked gate/up kernel up to %d, masked dense GEMMs above",
                        self.gather_max_tokens, MASKED_GATE_UP_MAX_TOKENS)

    @staticmethod
    def _param(p: nn.Parameter | None) -> torch.Tensor | None:
        return None if p is None else p.data

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, H]
        num_tokens = x.shape[0]
        batch = self.batch
        if self.gate_up_ext is not None:
            return torch.ops.caprese.fused_ff(
                x, self.gate_up_ext, self.down_t_ext, self.intermediate_size, self.griffin.neuron_idx,
                self.griffin.keep_mask, batch.token_slot[:num_tokens], batch.token_dense[:num_tokens],
                batch.token_stat[:num_tokens], self.griffin.stat_sq, *self.workspace, self.act,
                self.gather_max_tokens)
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
            # Decode tokens only (ops.add_lowrank: why it is a custom op, why a where).
            y = torch.ops.caprese.add_lowrank(y, x, self.lowrank_a, self.lowrank_b, token_dense)   # [T, H]
        return y
