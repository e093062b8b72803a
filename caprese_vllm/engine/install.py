"""Put Caprese into a vLLM model right after vLLM built it, and load the adapter's tensors.

The engine process loads the adapter itself (one read of each file into memory, checked there:
adapter/checkpoint.py) and, once its tensors are in the model, confirms what it serves
(observability.confirm_served: the summary log line and the API server's caprese:* gauges).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from caprese_vllm.adapter import TENSORS_FILE, AdapterError, CapreseAdapter, tensor_names
from caprese_vllm.adapter.base_info import base_info_from_config, text_config
from caprese_vllm.adapter.fingerprint import fingerprint_checkpoint
from caprese_vllm.engine.batch_state import CapreseBatchState
from caprese_vllm.engine.config import CapreseServeConfig
from caprese_vllm.engine.step_info import set_step_listener
from caprese_vllm.engine.tensor_parallel import (
    GriffinSelector,
    TensorParallelShard,
    TpSelection,
    largest_servable_tp,
    tensor_parallel_refusal,
)
from caprese_vllm.layers.caprese_mlp import CapreseMLP
from caprese_vllm.methods import check_griffin_k, griffin_k

if TYPE_CHECKING:
    from caprese_vllm.observability import ServedSelection

logger = logging.getLogger("vllm.caprese")

_ACT_BY_HF_NAME = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _hidden_act(hf_text_config) -> str:
    name = getattr(hf_text_config, "hidden_activation", None) or getattr(hf_text_config, "hidden_act", None)
    if name not in _ACT_BY_HF_NAME:
        raise AdapterError(f"caprese: unsupported FF activation {name!r} (supported: {sorted(_ACT_BY_HF_NAME)})")
    return _ACT_BY_HF_NAME[name]


def fingerprint_source(vllm_config) -> Path | None:
    model = vllm_config.model_config.model
    path = Path(model)
    if path.is_dir():
        return path
    try:  # a hub id that vLLM already resolved into the local cache
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(model, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # noqa: BLE001 - any failure means: no local files to fingerprint
        return None


def load_checked_adapter(serve: CapreseServeConfig, vllm_config,
                         adapter: CapreseAdapter | None = None) -> CapreseAdapter:
    """The adapter (loaded unless given), validated against the model vLLM is serving: base model
    (sizes, layers, fingerprint), the density actually served (k >= 1 neuron kept), and the tensors'
    finiteness in the serving dtype. Raises AdapterError (one line; the plugin prints `vllm: error:`)."""
    adapter = adapter if adapter is not None else CapreseAdapter.load(serve.adapter)
    hf_config = vllm_config.model_config.hf_config
    num_layers = text_config(hf_config).num_hidden_layers
    load_format = str(getattr(vllm_config.load_config, "load_format", "auto"))
    expected = adapter.manifest.base_model.fingerprint
    if load_format == "dummy" or not serve.check_fingerprint:
        fingerprint = expected
        logger.warning("caprese: adapter fingerprint NOT checked (%s)",
                       "dummy weights" if load_format == "dummy" else "caprese_check_fingerprint=false")
    else:
        source = fingerprint_source(vllm_config)
        if source is None:
            raise AdapterError(f"caprese: cannot read the weights of {vllm_config.model_config.model} to check the "
                               "adapter's fingerprint; pass a local model directory")
        fingerprint = fingerprint_checkpoint(source, num_layers)
    adapter.check_base(base_info_from_config(hf_config, fingerprint), source=str(vllm_config.model_config.model))
    serve.check_applies(adapter.manifest.method.name)
    if serve.density is not None and serve.density != adapter.manifest.method.density:
        logger.warning("caprese: density overridden %g -> %g; the adapter was distilled at %g",
                       adapter.manifest.method.density, serve.density, adapter.manifest.method.density)
        adapter.manifest.method = adapter.manifest.method.model_copy(update={"density": serve.density})
    if adapter.manifest.method.name == "griffin":
        source = ("caprese: --caprese-density (additional_config caprese_density)" if serve.density is not None
                  else f"caprese: {serve.adapter}: method.density")
        try:
            check_griffin_k(text_config(hf_config).intermediate_size, adapter.manifest.method.density, source)
        except ValueError as err:
            raise AdapterError(str(err)) from None
    adapter.check_dtype(vllm_config.model_config.dtype, where=f"caprese: {serve.adapter / TENSORS_FILE}")
    return adapter


def resolve_tp_selection(serve: CapreseServeConfig, vllm_config, manifest, announce: bool = True) -> TpSelection:
    """The GRIFFIN selection under tensor parallelism: caprese_tp_selection, else the manifest's
    `tensor_parallel.selection` (exact when absent). Written back into serve (and additional_config, which vLLM
    hashes into its compile cache key: the modes trace different graphs under -tp > 1). Logs one line when -tp > 1, and a
    warning when the flag overrides what the adapter was fitted for."""
    fitted = manifest.tp_selection
    selection = serve.tp_selection or fitted
    tp = vllm_config.parallel_config.tensor_parallel_size
    fitted_size = manifest.tensor_parallel.size if manifest.tensor_parallel is not None else None
    if announce and fitted == "local" and fitted_size not in (None, tp) and (tp == 1 or selection == "local"):
        # At -tp 1 too: one rank keeps the top-k of all neurons, not the per-shard top-k the adapter was fitted on
        # (under -tp > 1 an override to exact is warned about below).
        logger.warning("caprese: the adapter was fitted for local selection at -tp %d, served at -tp %d: "
                       "%s", fitted_size, tp, "each rank's neurons differ from the fit" if tp > 1 else
                       "the one rank keeps the top-k over all neurons, not each shard's top-k/tp; serve it at "
                       f"-tp {fitted_size}")
    if tp > 1 and announce:  # the front-end's lines; the engine's ranks say it in their summary line
        if serve.tp_selection and serve.tp_selection != fitted:
            logger.warning("caprese: tensor-parallel selection overridden %s -> %s; %s", fitted, selection,
                           f"the adapter was fitted for {fitted}" if manifest.tensor_parallel is not None else
                           "the adapter names none (exact by default)")
        if manifest.method.name == "griffin":
            how = ("each token's norm all-reduced and the top-k taken over all ranks' statistics, as at TP=1"
                   if selection == "exact" else "each rank normalises over its own neurons and keeps its own "
                   "top-k/tp, no extra collective")
            logger.info("caprese: tensor parallel %d: %s GRIFFIN selection (caprese_tp_selection=%s%s): %s", tp,
                        selection, serve.tp_selection or selection, "" if serve.tp_selection else (
                            ", from the adapter" if manifest.tensor_parallel is not None else ", the default"), how)
    serve.tp_selection = selection
    if tp > 1 and isinstance(vllm_config.additional_config, dict):  # at TP=1 both modes are one graph
        vllm_config.additional_config["caprese_tp_selection"] = selection
    return selection


def check_parallelism(vllm_config, manifest, selection: TpSelection) -> None:
    """Raise AdapterError (one line: what is wrong, and a -tp that works, -pp, or exact selection / a higher
    density) for a -tp that cannot shard this model and adapter. The rules are tensor_parallel_refusal's
    (engine/tensor_parallel.py, the one rule set distill and the benchmarks use too): vLLM's divisibility of the
    attention heads, KV heads and FF width I (MergedColumnParallelLinear gives each rank I/tp neurons), and local
    selection keeping a neuron on every rank (k >= tp); the -tp offered is largest_servable_tp's. Pipeline
    parallelism is served (each stage installs the adapter's layers it holds: stage_layers). The plugin calls it
    before the engine starts; install_caprese again in the engine (an engine made without the CLI hook)."""
    tp = vllm_config.parallel_config.tensor_parallel_size
    if tp == 1:
        return
    text = text_config(vllm_config.model_config.hf_config)
    sizes = (text.intermediate_size, text.num_attention_heads, getattr(text, "num_key_value_heads", None))
    method = manifest.method
    k = griffin_k(sizes[0], method.density) if method.name == "griffin" and selection == "local" else None
    why = tensor_parallel_refusal(tp, *sizes, k)
    if why is None:
        return
    fits = largest_servable_tp(tp, *sizes, k) or 1
    if tensor_parallel_refusal(tp, *sizes) is None:  # only local selection's k: exact selection serves this -tp
        raise AdapterError(f"caprese: --caprese-tp-selection local at -tp {tp}: {why}; use --caprese-tp-selection "
                           f"exact, a higher density or -tp {fits}")
    raise AdapterError(f"caprese: --tensor-parallel-size {tp} cannot shard this model: {why}; use -tp {fits}, or "
                       f"-pp {tp} to spread the layers instead")


def install_caprese(model: nn.Module, vllm_config) -> None:
    """Swap the MLPs of the adapter's compressed layers; a no-op without caprese_adapter."""
    serve = CapreseServeConfig.from_additional_config(vllm_config.additional_config)
    if serve is None:
        return
    parallel = vllm_config.parallel_config
    adapter = load_checked_adapter(serve, vllm_config)
    manifest = adapter.manifest
    selection = resolve_tp_selection(serve, vllm_config, manifest, announce=False)
    check_parallelism(vllm_config, manifest, selection)
    shard = _tensor_parallel_shard(selection, parallel)
    text = text_config(vllm_config.model_config.hf_config)
    device = next(model.parameters()).device
    sched = vllm_config.scheduler_config
    local = stage_layers(model, manifest.method.layers)
    # The runner may hold more requests than it schedules at once (waiting, preempted): margin.
    griffin = manifest.method.name == "griffin"
    inter = text.intermediate_size
    selector = GriffinSelector(griffin_k(inter, manifest.method.density), inter, shard,
                               _tp_all_gather if shard.exact else None)
    batch_state = CapreseBatchState(max_slots=2 * sched.max_num_seqs + 2,
                                    max_tokens=sched.max_num_batched_tokens + sched.max_num_seqs, device=device,
                                    griffin_layers=len(local) if griffin else 0,
                                    intermediate_size=shard.local_intermediate(inter),
                                    griffin_k=selector.width, selector=selector)
    act = _hidden_act(text)
    dtype = vllm_config.model_config.dtype
    layers = model.model.layers
    for i in local:
        layers[i].mlp = CapreseMLP(layers[i].mlp, i, manifest.method, manifest.lowrank.ranks.get(i), act,
                                   batch_state, text.hidden_size, text.intermediate_size, dtype,
                                   use_kernels=serve.kernels == "on", shard=shard)
    model._caprese_adapter = adapter
    model._caprese_local_layers = local
    model._caprese_batch_state = batch_state
    model._caprese_tp_rank = shard.tp_rank
    set_step_listener(batch_state.on_step)
    base = manifest.base_model
    stage = (f"; pipeline stage holds layers {model.model.start_layer}-{model.model.end_layer - 1}, {len(local)} of "
             f"them compressed" if parallel.pipeline_parallel_size > 1 else "")
    if shard.sharded:
        stage += (f"; tensor-parallel rank {shard.tp_rank}/{shard.tp_size} holds FF neurons "
                  f"{shard.neuron_offset(inter)}-{shard.neuron_offset(inter) + shard.local_intermediate(inter) - 1}"
                  f" and low-rank channels {sorted({shard.local_rank(r) for r in manifest.lowrank.ranks.values()})}"
                  " per layer")
    logger.info("caprese: adapter %s loaded: %s, method %s density %g on %d/%d layers, low-rank ranks %s "
                "(+%.2fM params)%s", serve.adapter, base.architecture, manifest.method.name, manifest.method.density,
                len(manifest.method.layers), base.num_layers, sorted(set(manifest.lowrank.ranks.values())),
                manifest.extra_params() / 1e6, stage)
    model._caprese_summary = _summary(model, serve, vllm_config)
    if str(getattr(vllm_config.load_config, "load_format", "auto")) == "dummy":
        _confirm(model)  # no weights are loaded into the model (random values, by request): installed now


def _tensor_parallel_shard(selection: TpSelection, parallel) -> TensorParallelShard:
    if parallel.tensor_parallel_size == 1:
        return TensorParallelShard(selection=selection)
    from vllm.distributed import get_tensor_model_parallel_rank

    return TensorParallelShard(parallel.tensor_parallel_size, get_tensor_model_parallel_rank(), selection)


def _tp_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """The ranks' tensors concatenated along the last dimension in rank order (exact selection's statistics)."""
    from vllm.distributed import tensor_model_parallel_all_gather

    return tensor_model_parallel_all_gather(tensor, dim=-1)


def stage_layers(model: nn.Module, layers: list[int]) -> list[int]:
    """The adapter's compressed layers that this pipeline stage holds: [start_layer, end_layer) of vLLM's
    model (vllm/model_executor/models/utils.py make_layers; the others are PPMissingLayer). All of them
    without pipeline parallelism."""
    inner = model.model
    start = getattr(inner, "start_layer", 0)
    end = getattr(inner, "end_layer", len(inner.layers))
    return [i for i in layers if start <= i < end]


def _summary(model: nn.Module, serve: CapreseServeConfig, vllm_config):
    """The operator's view (observability.AdapterSummary) of what this model runs, FF path included."""
    from caprese_vllm.observability import summarize

    mlps = [m for m in model.modules() if isinstance(m, CapreseMLP)]
    name = vllm_config.model_config.served_model_name or vllm_config.model_config.model
    name = name[0] if isinstance(name, (list, tuple)) else name
    adapter = model._caprese_adapter
    return summarize(adapter, str(serve.adapter), str(name), fingerprint_source(vllm_config),
                     adapter.manifest.method.density,
                     # a pipeline stage without compressed layers reports what the others run
                     "triton" if (any(m.use_kernels for m in mlps) if mlps else serve.kernels == "on"
                                  and adapter.manifest.method.name == "griffin") else "portable",
                     vllm_config.parallel_config.tensor_parallel_size,
                     _served_selection(serve, vllm_config, adapter.manifest.method.name))


def _served_selection(serve: CapreseServeConfig, vllm_config, method: str) -> ServedSelection:
    """What decides the kept neurons, for the summary line and gauge: CATS thresholds each activation on its own
    ("threshold": rank-local and as at TP=1 by construction); GRIFFIN at -tp 1 runs the TP=1 selection whatever
    the mode (one rank holds every neuron), else the resolved mode."""
    if method != "griffin":
        return "threshold"
    if vllm_config.parallel_config.tensor_parallel_size == 1:
        return "exact"
    return serve.tp_selection or "exact"


def _confirm(model: nn.Module) -> None:
    from caprese_vllm.observability import confirm_served

    if getattr(model, "_caprese_tp_rank", 0) == 0:  # one line and one file per model, not one per TP rank
        confirm_served(model._caprese_summary)


def load_adapter_weights(model: nn.Module) -> set[str]:
    """Copy the adapter's tensors into the Caprese MLPs; return the parameter names it filled."""
    adapter: CapreseAdapter | None = getattr(model, "_caprese_adapter", None)
    if adapter is None:
        return set()
    params = dict(model.named_parameters())
    loaded = set()
    local = set(model._caprese_local_layers)  # set with _caprese_adapter by install_caprese
    for layer in (i for i in adapter.manifest.lowrank.ranks if i in local):
        for src_name, tensor in zip(tensor_names(layer), (adapter.lowrank_a[layer], adapter.lowrank_b[layer])):
            name = f"model.layers.{layer}.mlp.{src_name.split('.')[-1]}"
            param = params[name]
            param.weight_loader(param, tensor.to(param.dtype))
            loaded.add(name)
    return loaded


def caprese_load_weights(model: nn.Module, base_load_weights, weights: Iterable[tuple[str, torch.Tensor]]):
    loaded = base_load_weights(weights)
    loaded = (set(loaded) if loaded is not None else set()) | load_adapter_weights(model)
    if getattr(model, "_caprese_adapter", None) is not None:
        _confirm(model)  # the adapter is in the model: now the operator may be told so
    return loaded
