"""vLLM model classes with the Caprese MLP, registered over the built-in architecture names.

Each class is the vLLM class itself plus two lines: install the Caprese MLPs after construction
(nothing happens without `caprese_adapter` in --additional-config) and load the adapter's tensors
after the base weights.
"""

from __future__ import annotations

from vllm.model_executor.models.gemma2 import Gemma2ForCausalLM
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from caprese_vllm.engine.install import caprese_load_weights, install_caprese


def _caprese(base: type) -> type:
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        base.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)
        install_caprese(self, vllm_config)

    def load_weights(self, weights):
        return caprese_load_weights(self, lambda w: base.load_weights(self, w), weights)

    return type(f"Caprese{base.__name__}", (base,), {
        "__init__": __init__, "load_weights": load_weights, "__module__": __name__,
        "__doc__": f"{base.__name__} with Caprese MLPs when an adapter is configured.",
    })


CapreseLlamaForCausalLM = _caprese(LlamaForCausalLM)
CapreseGemma2ForCausalLM = _caprese(Gemma2ForCausalLM)
CapreseGemma3ForCausalLM = _caprese(Gemma3ForCausalLM)
CapreseQwen2ForCausalLM = _caprese(Qwen2ForCausalLM)
