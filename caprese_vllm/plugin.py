"""vLLM general plugin entry point (`vllm.general_plugins` -> `caprese = caprese_vllm.plugin:register`).

vLLM calls `register()` in every process it starts (API server, engine core, workers), possibly
more than once per process, so it is idempotent and cheap. It wraps
`EngineArgs.create_engine_config`, which runs in the front-end process once the CLI or `LLM(...)`
arguments are known. When `--additional-config` holds `caprese_adapter`, that wrapper
  - validates the Caprese settings and the adapter before anything starts (one clear error line);
  - turns prefix caching off (a cache hit would skip prompt tokens whose FF activations GRIFFIN's
    selection needs), with a log line saying so;
  - refuses a model whose class would not be Caprese's (`check_architecture`): vLLM would build its
    stock class and serve the dense model under the adapter's name;
  - registers the Caprese model classes over vLLM's Llama/Gemma2/Gemma3/Qwen2 classes and sets
    CAPRESE_ACTIVE=1 so the engine processes it spawns register them too;
  - logs the FF path that will run (`resolve_kernels`) and sets up the caprese:* gauges, which show
    only what an engine confirms it installed (observability.py).
Without an adapter nothing is registered and vLLM runs exactly as it would without this package.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

from caprese_vllm import __version__

logger = logging.getLogger("vllm.caprese")

ACTIVE_ENV = "CAPRESE_ACTIVE"
ARCHITECTURES = {
    "LlamaForCausalLM": "CapreseLlamaForCausalLM",
    "Gemma2ForCausalLM": "CapreseGemma2ForCausalLM",
    "Gemma3ForCausalLM": "CapreseGemma3ForCausalLM",
    "Qwen2ForCausalLM": "CapreseQwen2ForCausalLM",
}

_registered = False
_models_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    import vllm

    _registered = True
    _wrap_create_engine_config()
    if os.environ.get(ACTIVE_ENV) == "1":
        register_models()
    logger.info("caprese-vllm %s plugin registered (vLLM %s)", __version__, vllm.__version__)


def register_models() -> None:
    global _models_registered
    if _models_registered:
        return
    import warnings

    from vllm import ModelRegistry

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for arch, cls in ARCHITECTURES.items():
            ModelRegistry.register_model(arch, f"caprese_vllm.engine.models:{cls}")
    _models_registered = True


def _wrap_create_engine_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_caprese_wrapped", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        try:
            return _create_engine_config(original, self, *args, **kwargs)
        except ValueError as err:  # AdapterError and bad caprese_* settings
            if "caprese" not in str(err).lower() and not _is_adapter_error(err):
                raise
            if os.path.basename(sys.argv[0]) == "vllm":
                raise SystemExit(f"vllm: error: {err}") from None  # one line, exit status 1
            raise

    create_engine_config._caprese_wrapped = True
    EngineArgs.create_engine_config = create_engine_config


def _is_adapter_error(err: Exception) -> bool:
    from caprese_vllm.adapter import AdapterError

    return isinstance(err, AdapterError)


def _create_engine_config(original, engine_args, *args, **kwargs):
    from caprese_vllm.fork_safety import no_cpu_thread_pool

    with no_cpu_thread_pool():  # vLLM may fork the engine core from this process next
        return _create_engine_config_single_threaded(original, engine_args, *args, **kwargs)


def _create_engine_config_single_threaded(original, engine_args, *args, **kwargs):
    from caprese_vllm.engine.config import CapreseServeConfig

    serve = CapreseServeConfig.from_additional_config(engine_args.additional_config)
    if serve is None:
        return original(engine_args, *args, **kwargs)
    from caprese_vllm.adapter import CapreseAdapter

    adapter = CapreseAdapter.load(serve.adapter)  # files and manifest, before vLLM does any work
    if engine_args.enable_prefix_caching is not False:
        logger.info("caprese: prefix caching disabled: GRIFFIN selects neurons from every prompt "
                    "token's FF activations, which a prefix-cache hit would skip")
    engine_args.enable_prefix_caching = False
    vllm_config = original(engine_args, *args, **kwargs)

    from caprese_vllm.engine.install import check_parallelism, load_checked_adapter, resolve_tp_selection
    from caprese_vllm.observability import watch_engines

    check_architecture(vllm_config)
    # First: it applies caprese_density to the manifest, and the TP checks must judge the k the engine serves
    # (install_caprese checks in this order too; otherwise the engine refuses what the front-end accepted).
    adapter = load_checked_adapter(serve, vllm_config, adapter)  # sizes and weight fingerprint vs. the model
    selection = resolve_tp_selection(serve, vllm_config, adapter.manifest)  # logs it under -tp > 1
    check_parallelism(vllm_config, adapter.manifest, selection)
    resolve_kernels(serve, vllm_config, adapter.manifest.method.name)
    os.environ[ACTIVE_ENV] = "1"
    register_models()
    watch_engines()  # before the engines start: they inherit its directory and confirm what they installed
    return vllm_config


def check_architecture(vllm_config) -> None:
    """Raise AdapterError (one line) unless vLLM will build one of the Caprese classes for this model: the
    architecture it resolved must be one of ARCHITECTURES and not replaced by a model_class_overrides
    entry. Otherwise (MistralForCausalLM, the Transformers backend, ...) vLLM builds a class this plugin
    never touches and serves the dense model while an adapter is configured (issue 17 item 3)."""
    from caprese_vllm.adapter import AdapterError

    model_config = vllm_config.model_config
    arch = getattr(model_config, "architecture", None) or model_config.architectures[0]
    if arch not in ARCHITECTURES:
        raise AdapterError(f"caprese: {model_config.model} runs as {arch} in vLLM, which Caprese does not cover "
                           f"(supported: {', '.join(sorted(ARCHITECTURES))}); serve it without an adapter")
    if arch in (getattr(model_config, "model_class_overrides", None) or {}):
        raise AdapterError(f"caprese: model_class_overrides replaces the class of {arch}, which Caprese needs "
                           "its own; drop that override or the adapter")


def resolve_kernels(serve, vllm_config, method: str) -> bool:
    """Whether the GRIFFIN layers run the Triton kernels; written back as caprese_kernels "on"/"off". They
    apply to GRIFFIN on CUDA with unquantized weights, at any -tp (each rank's shard) and with either
    tensor-parallel selection (exact: layers/caprese_mlp.py).

    The write-back is what keeps torch.compile caches apart: vLLM keys its compile cache on the
    config (additional_config included) and on the traced source files, and both paths trace from
    the same caprese_mlp.py. Without it, a kernels run could load the graph compiled for the
    portable path (or the reverse) and run it on the other path's weight layout.
    """
    from vllm.platforms import current_platform

    why_not = None
    if not current_platform.is_cuda():
        why_not = "they need a CUDA device"
    elif method != "griffin":
        why_not = f"they implement GRIFFIN only (the adapter's method is {method})"
    elif vllm_config.model_config.quantization is not None:
        why_not = f"they need unquantized weights (this model is {vllm_config.model_config.quantization})"
    if serve.kernels == "on" and why_not:
        raise ValueError(f"--additional-config caprese_kernels=on: {why_not}; use \"auto\" or \"off\"")
    use = serve.kernels != "off" and why_not is None
    reason = f": the kernels {why_not.removeprefix('they ')}" if serve.kernels == "auto" and why_not else ""
    logger.info("caprese: FF path: %s (caprese_kernels=%s%s)", "Triton kernels" if use else "portable PyTorch",
                serve.kernels, reason)  # the engine's summary line and caprese:kernels{path} say it again
    if isinstance(vllm_config.additional_config, dict):
        vllm_config.additional_config["caprese_kernels"] = "on" if use else "off"
    return use
