"""The Caprese MLP for vLLM models: the model's own fused gate/up and down projections (and their
weight loaders, untouched) plus a sparse decode path and the low-rank branch.

    gate_up = gate_up_proj(x)                       [T, 2I]
    z       = act_and_mul(gate_up)                  [T, I]   dense activations
    z       = sparsify(z)                           prompt tokens feed statistics and stay dense;
                                                    decode tokens keep their request's neurons
    y       = down_proj(z) + (x @ lowrank_a) @ lowrank_b     on decode tokens (a where, float32 product)

Under tensor parallelism (-tp N) every tensor above is this rank's shard (engine/tensor_parallel.py: the
sharding rules and their vLLM sources): gate_up [T, 2I/tp], z [T, I/tp], lowrank_a [H, r/tp], lowrank_b
[r/tp, H]; down_proj's partial output plus the partial low-rank product are all-reduced once, as the dense
model's down_proj output is (RowParallelLinear with reduce_results), so the low-rank path adds no collective.
Exact selection adds one: each token's squared norm over all I neurons ([T] float32, all-reduced), so the
statistic normalises as at TP=1.

This is the portable PyTorch path: it computes every neuron and masks, so it is exact against the
reference and runs anywhere. On CUDA, GRIFFIN layers run the Triton kernels (caprese_kernels, on by
default where they apply; the plugin resolves it): once the weights are loaded (`build_gpu_layout`,
called by vLLM's post-loading pass through `quant_method`) the gate/up and down weights move into
neuron-major buffers that also hold the low-rank rows, and `caprese::fused_ff` runs the cheaper
route per step (kernels/decode_mlp.py): each token gathers its own rows while the step has at most
I // (k + R) tokens (batch-1 decode at density 0.5); above, every row is read once and the
unselected neurons are masked (one gate/up kernel for decode batches, cuBLAS for prefill). Under -tp N
they run on this rank's shard, with either selection: exact mode splits the op in two around the
all-reduce of each token's squared norm (`fused_ff_gate_up`, `fused_ff_down`), so the statistic is
normalised over all I neurons, and its neuron_idx rows' sentinel (past the rank's count) is skipped.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

from caprese_vllm.engine import ops  # noqa: F401  (registers torch.ops.caprese.*)
from caprese_vllm.engine.batch_state import CapreseBatchState, GriffinLayerState
from caprese_vllm.engine.tensor_parallel import NO_TENSOR_PARALLEL, TensorParallelShard
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


class LowRankShardLoader:
    """weight_loader of a low-rank parameter under tensor parallelism: takes the adapter's full tensor
    (lowrank_a [H, r] or lowrank_b [r, H]) and copies this rank's zero-padded shard (TensorParallelShard
    shard_lowrank_a / shard_lowrank_b), as vLLM's loaders slice checkpoint tensors."""

    def __init__(self, shard: TensorParallelShard, which: str):
        self.slice = shard.shard_lowrank_a if which == "a" else shard.shard_lowrank_b

    def __call__(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        _default_weight_loader(param, self.slice(loaded_weight))


class CapreseMLP(nn.Module):
    def __init__(self, mlp: nn.Module, layer_idx: int, method: MethodSpec, rank: int | None,
                 act: str, batch_state: CapreseBatchState, hidden_size: int, intermediate_size: int,
                 params_dtype: torch.dtype, use_kernels: bool = False,
                 shard: TensorParallelShard = NO_TENSOR_PARALLEL):
        """intermediate_size: the model's I (all ranks'); this rank builds its shard's state (`shard`)."""
        super().__init__()
        # Adopt the original submodules under their own names, so checkpoint names still match.
        self.gate_up_proj = mlp.gate_up_proj
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn
        self.layer_idx = layer_idx
        self.method = method.name
        self.act = act
        self.shard = shard
        # The neurons this rank holds (all of them at TP=1): the width of gate_up's halves and of down's input.
        self.intermediate_size = shard.local_intermediate(intermediate_size)
        self.batch = batch_state
        self.griffin: GriffinLayerState | None = None
        reads = 0  # the neurons a decode token reads on this rank (TensorParallelShard.mean_k)
        if method.name == "griffin":
            k = griffin_k(intermediate_size, method.density)
            self.griffin = batch_state.add_griffin_layer(self.intermediate_size,
                                                         shard.k_capacity(k, intermediate_size), layer_idx)
            reads = max(1, shard.mean_k(k))
        self.threshold = float(method.thresholds[layer_idx]) if method.name == "cats" else 0.0
        self.lowrank_a = self.lowrank_b = None
        local_rank = shard.local_rank(rank) if rank else 0
        if rank:
            device = mlp.gate_up_proj.weight.device
            self.lowrank_a = nn.Parameter(torch.zeros(hidden_size, local_rank, dtype=params_dtype, device=device),
                                          requires_grad=False)
            self.lowrank_b = nn.Parameter(torch.zeros(local_rank, hidden_size, dtype=params_dtype, device=device),
                                          requires_grad=False)
            if shard.sharded:
                self.lowrank_a.weight_loader = LowRankShardLoader(shard, "a")
                self.lowrank_b.weight_loader = LowRankShardLoader(shard, "b")
            else:
                for p in (self.lowrank_a, self.lowrank_b):
                    p.weight_loader = _default_weight_loader
        # down_proj's output is all-reduced by us under TP (after the low-rank partial product is added), as
        # RowParallelLinear.forward would; a model that reduces later itself (reduce_results=False) keeps that.
        self.reduce_output = shard.sharded and getattr(self.down_proj, "reduce_results", True)
        self.quant_method = _AfterLoading()
        self.use_kernels = use_kernels and self.griffin is not None
        # Gathering reads T * (k + R) weight rows, the masked dense GEMMs I + R: gather while cheaper (exact mode:
        # k a rank's mean share; its neuron_idx rows are wider, filled with a sentinel the kernels skip).
        self.reads = reads
        self.gather_max_tokens = max(1, self.intermediate_size // (reads + local_rank)) if reads else 0
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
        self.workspace = self.batch.decode_workspace(self.intermediate_size // self.reads, weight.shape[1])
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
            # Under TP the kernels compute this rank's partial sum.
            g, ws = self.griffin, self.workspace
            token_slot, token_dense = batch.token_slot[:num_tokens], batch.token_dense[:num_tokens]
            if self.shard.exact:
                # Two halves around the all-reduce of each token's squared norm (vLLM's op, kept out of ours): the
                # statistic normalises over all I neurons, as at TP=1.
                z, sumsq = torch.ops.caprese.fused_ff_gate_up(
                    x, self.gate_up_ext, self.intermediate_size, g.neuron_idx, g.keep_mask, token_slot, token_dense,
                    ws.parts, ws.ticket, self.act, self.gather_max_tokens)          # [T, I/tp + R], [T] float32
                y = torch.ops.caprese.fused_ff_down(
                    z, self.down_t_ext, self.intermediate_size, g.neuron_idx, token_slot, token_dense,
                    batch.token_stat[:num_tokens], g.stat_sq, tensor_model_parallel_all_reduce(sumsq), ws.acc,
                    ws.tickets, self.gather_max_tokens)
            else:
                y = torch.ops.caprese.fused_ff(
                    x, self.gate_up_ext, self.down_t_ext, self.intermediate_size, g.neuron_idx, g.keep_mask,
                    token_slot, token_dense, batch.token_stat[:num_tokens], g.stat_sq, *ws, self.act,
                    self.gather_max_tokens)
            return tensor_model_parallel_all_reduce(y) if self.reduce_output else y
        token_dense = batch.token_dense[:num_tokens]
        gate_up, _ = self.gate_up_proj(x)                 # [T, 2I/tp]
        z = self.act_fn(gate_up)                          # [T, I/tp]
        if self.griffin is not None and self.shard.exact:
            # Each token's norm over all I neurons: the ranks' partial sums of squares, summed ([T] float32).
            token_norm_sq = tensor_model_parallel_all_reduce(z.float().square().sum(dim=-1))
            z = torch.ops.caprese.griffin_sparsify_sharded(
                z, token_norm_sq, batch.token_slot[:num_tokens], batch.token_stat[:num_tokens], token_dense,
                self.griffin.stat_sq, self.griffin.neuron_idx)
        elif self.griffin is not None:  # TP=1, or local selection: the rank's own neurons are the whole story
            z = torch.ops.caprese.griffin_sparsify(z, batch.token_slot[:num_tokens], batch.token_stat[:num_tokens],
                                                   token_dense, self.griffin.stat_sq, self.griffin.neuron_idx)
        elif self.method == "cats":
            z = torch.ops.caprese.cats_sparsify(z, gate_up[:, : self.intermediate_size], token_dense,
                                                self.threshold, self.act)
        if not self.shard.sharded:
            y, _ = self.down_proj(z)                      # [T, H]
            if self.lowrank_a is not None:
                # Decode tokens only (ops.add_lowrank: why it is a custom op, why a where).
                y = torch.ops.caprese.add_lowrank(y, x, self.lowrank_a, self.lowrank_b, token_dense)   # [T, H]
            return y
        y = self._down_partial(z)                         # [T, H], this rank's share of the sum
        if self.lowrank_a is not None:                    # + (x @ A_q) @ B_q, before the one all-reduce
            y = torch.ops.caprese.add_lowrank(y, x, self.lowrank_a, self.lowrank_b, token_dense)
        return tensor_model_parallel_all_reduce(y) if self.reduce_output else y

    def _down_partial(self, z: torch.Tensor) -> torch.Tensor:
        """down_proj's local matmul without its all-reduce: RowParallelLinear.forward with input_is_parallel
        (vllm/model_executor/layers/linear.py), the bias on rank 0 only (added once in the sum)."""
        down = self.down_proj
        bias = None if (self.shard.tp_rank > 0 or down.skip_bias_add) else down.bias
        return down.quant_method.apply(down, z, bias)
