"""Turn a transformers Llama / Gemma 2 / Gemma 3 / Qwen2 model into its Caprese version.

Each compressed layer's MLP becomes a `CapreseMLP`: prompt tokens run the dense FF and feed the
method's statistics; generated tokens run the sparse FF plus the low-rank path
    y = down(where(keep, act(gate(x)) * up(x), 0)) + (x @ lowrank_a) @ lowrank_b   (low-rank in float32).
Which tokens are "prompt" comes from a `ForwardPlan` that a forward pre-hook on the model sets:
  - with `model.generate`: the forward that starts a sequence (empty KV cache) is the prompt
    (its non-padding tokens); every later forward is generation;
  - with `teacher_forcing(model, prompt_mask)`: every forward is a whole sequence, and the mask
    says which tokens are prompt; the rest are scored as if generated (what distillation needs).
Per-sequence method state (GRIFFIN statistics and selection) is reset when a sequence starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from caprese_vllm.adapter import CapreseAdapter, base_info_from_model
from caprese_vllm.adapter.base_info import text_config
from caprese_vllm.lowrank import lowrank_forward
from caprese_vllm.methods import MethodSpec
from caprese_vllm.reference.sparsifiers import Sparsifier, make_sparsifier


@dataclass
class ForwardPlan:
    prompt_mask: torch.Tensor  # [B, S] bool: dense FF, feeds statistics
    valid_mask: torch.Tensor   # [B, S] bool: False on padding


class CapreseRuntime:
    """What every CapreseMLP of one model shares: the current forward's plan."""

    def __init__(self) -> None:
        self.plan: ForwardPlan | None = None
        self.forced_prompt_mask: torch.Tensor | None = None
        self.mlps: list[CapreseMLP] = []
        # Distillation hooks: `tap(layer, x, y_dense, y_compressed, generated_mask)` sees every compressed
        # layer's FF; with `dense_passthrough` the model follows the dense trajectory (the layers return
        # the dense output) while the taps still see what the compressed path would have produced.
        self.tap: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
        self.dense_passthrough = False

    def reset_sequences(self) -> None:
        for mlp in self.mlps:
            mlp.reset()

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        batch, seq = (input_ids.shape if input_ids is not None else embeds.shape[:2])
        device = (input_ids if input_ids is not None else embeds).device
        attention_mask = kwargs.get("attention_mask")
        valid = (attention_mask[:, -seq:].bool() if attention_mask is not None
                 else torch.ones(batch, seq, dtype=torch.bool, device=device))
        if self.forced_prompt_mask is not None:
            if self.forced_prompt_mask.shape != (batch, seq):
                raise ValueError(f"teacher_forcing prompt_mask has shape {tuple(self.forced_prompt_mask.shape)}, "
                                 f"the input has {(batch, seq)}")
            self.reset_sequences()
            self.plan = ForwardPlan(self.forced_prompt_mask.to(device) & valid, valid)
            return
        cache = kwargs.get("past_key_values")
        past_len = cache.get_seq_length() if cache is not None else 0
        if past_len == 0:  # a new sequence: its tokens are the prompt
            self.reset_sequences()
            self.plan = ForwardPlan(valid, valid)
        else:
            self.plan = ForwardPlan(torch.zeros_like(valid), valid)


class CapreseMLP(nn.Module):
    """Gated FF `down(act(gate(x)) * up(x))` with a sparse decode path and a low-rank branch."""

    def __init__(self, mlp: nn.Module, layer: int, method: MethodSpec, runtime: CapreseRuntime,
                 lowrank_a: torch.Tensor | None, lowrank_b: torch.Tensor | None, local_shards: int = 1):
        super().__init__()
        self.dense_mlp = mlp  # the original module, weights untouched
        self.layer = layer
        self.method = method
        self.runtime = runtime
        self.intermediate_size = mlp.gate_proj.out_features
        self.local_shards = local_shards  # GRIFFIN's local tensor-parallel selection over N shards (1: TP=1's)
        self.lowrank_a = None if lowrank_a is None else nn.Parameter(lowrank_a, requires_grad=False)
        self.lowrank_b = None if lowrank_b is None else nn.Parameter(lowrank_b, requires_grad=False)
        self.sparsifier: Sparsifier = make_sparsifier(method, layer, self.intermediate_size, local_shards)

    def reset(self) -> None:
        self.sparsifier = make_sparsifier(self.method, self.layer, self.intermediate_size, self.local_shards)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, S, H]
        mlp, plan = self.dense_mlp, self.runtime.plan
        gate_act = mlp.act_fn(mlp.gate_proj(x))   # [B, S, I]
        z = gate_act * mlp.up_proj(x)              # [B, S, I]
        y = mlp.down_proj(z)                       # [B, S, H] dense output
        if plan.prompt_mask.any():
            self.sparsifier.observe(z, gate_act, plan.prompt_mask)
        generated = plan.valid_mask & ~plan.prompt_mask
        if not generated.any():
            return y
        keep = self.sparsifier.keep_mask(gate_act)
        y_sparse = mlp.down_proj(torch.where(keep, z, 0.0))  # not z * keep: an unselected Inf/NaN stays out
        if self.lowrank_a is not None:
            y_sparse = y_sparse + lowrank_forward(x, self.lowrank_a, self.lowrank_b)
        if self.runtime.tap is not None:
            self.runtime.tap(self.layer, x, y, y_sparse, generated)
        if self.runtime.dense_passthrough:
            return y
        return torch.where(generated.unsqueeze(-1), y_sparse, y)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return inner.layers


def patch_model(model: nn.Module, method: MethodSpec | None = None,
                adapter: CapreseAdapter | None = None, local_shards: int | None = None) -> CapreseRuntime:
    """Swap the MLPs of `method.layers` (default: the adapter's method) for CapreseMLPs, in place.

    local_shards: GRIFFIN selects as `-tp N --caprese-tp-selection local` serves (reference/sparsifiers.py);
    default: the adapter's `tensor_parallel` (local with a size N: N shards), else 1 (the TP=1 selection).
    The adapter is checked against the model (sizes, layer count, weight fingerprint) first, so
    nothing is patched when it does not fit. Raises ValueError for shards that do not divide the FF width.
    """
    if getattr(model, "_caprese_runtime", None) is not None:
        raise RuntimeError("model is already patched; call unpatch_model first")
    if method is None:
        if adapter is None:
            raise ValueError("patch_model needs a method, an adapter, or both")
        method = adapter.manifest.method
    num_layers = text_config(model.config).num_hidden_layers
    method.check_layers(num_layers)
    if adapter is not None:
        adapter.check_base(base_info_from_model(model), source="the model being patched")
        missing = set(adapter.manifest.lowrank.ranks) - set(method.layers)
        if missing:
            raise ValueError(f"adapter has low-rank paths for layers {sorted(missing)} that method.layers "
                             "does not compress")
    if local_shards is None:
        local_shards = adapter.manifest.local_shards if adapter is not None else 1
    # every layer's sparsifier is made (and its shards checked) before the first MLP is swapped: nothing half-patched
    layers = decoder_layers(model)
    for i in method.layers:
        make_sparsifier(method, i, layers[i].mlp.gate_proj.out_features, local_shards)
    runtime = CapreseRuntime()
    device = next(model.parameters()).device
    for i in method.layers:
        a = b = None
        if adapter is not None and i in adapter.lowrank_a:
            a, b = adapter.lowrank_a[i].to(device), adapter.lowrank_b[i].to(device)
        mlp = CapreseMLP(layers[i].mlp, i, method, runtime, a, b, local_shards)
        runtime.mlps.append(mlp)
        layers[i].mlp = mlp
    model._caprese_runtime = runtime
    model._caprese_hook = model.register_forward_pre_hook(runtime.pre_forward, with_kwargs=True)
    return runtime


def unpatch_model(model: nn.Module) -> None:
    runtime: CapreseRuntime | None = getattr(model, "_caprese_runtime", None)
    if runtime is None:
        return
    layers = decoder_layers(model)
    for mlp in runtime.mlps:
        layers[mlp.layer].mlp = mlp.dense_mlp
    model._caprese_hook.remove()
    model._caprese_runtime = None


@contextmanager
def teacher_forcing(model: nn.Module, prompt_mask: torch.Tensor) -> Iterator[None]:
    """Within the block, forwards score whole sequences: prompt_mask [B, S] marks prompt tokens."""
    runtime: CapreseRuntime = model._caprese_runtime
    runtime.forced_prompt_mask = prompt_mask.bool()
    try:
        yield
    finally:
        runtime.forced_prompt_mask = None
