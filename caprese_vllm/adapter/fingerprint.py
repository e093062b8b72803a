"""Identify a base model's weights, so an adapter is never applied to a model it was not fitted on.

The fingerprint hashes, for every layer, the shapes and a fixed corner ([:16, :64]) of the gate,
up and down projection weights, rounded to bf16 so the same model stored in fp32 or bf16 gives the
same value. It reads a handful of rows, so it is cheap for an 8B checkpoint too, and it can be
computed from a loaded transformers model or straight from the safetensors files on disk (what the
vLLM plugin does, since vLLM renames and fuses the weights it loads). The plugin runs this while
vLLM builds the model, under vLLM's default device (CUDA) and dtype: every tensor here is read onto
the CPU explicitly and hashed from CPU memory, whatever the defaults.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

FF_WEIGHTS = ("gate_proj", "up_proj", "down_proj")
_ROWS, _COLS = 16, 64


def ff_weight_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def fingerprint_weights(get_corner: Callable[[str], tuple[tuple[int, ...], torch.Tensor]],
                        num_layers: int) -> str:
    """`get_corner(name)` returns (full shape, tensor[:16, :64]) of the named HF weight."""
    digest = hashlib.sha256()
    for layer in range(num_layers):
        for proj in FF_WEIGHTS:
            name = ff_weight_name(layer, proj)
            shape, corner = get_corner(name)
            corner = corner.to("cpu", torch.bfloat16).contiguous().view(torch.int16)
            digest.update(f"{name}:{tuple(shape)}".encode())
            digest.update(corner.numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:32]


def fingerprint_module(model: torch.nn.Module, num_layers: int) -> str:
    params = dict(model.named_parameters())
    prefix = _hf_prefix(params)

    def get_corner(name: str):
        w = params[prefix + name].detach()
        return tuple(w.shape), w[:_ROWS, :_COLS].cpu()

    return fingerprint_weights(get_corner, num_layers)


def fingerprint_checkpoint(model_dir: str | Path, num_layers: int) -> str:
    """Fingerprint from the safetensors files of a Hugging Face model directory. Raises FileNotFoundError
    without model.safetensors(.index.json), KeyError without gated-FF weight names."""
    with torch.device("cpu"):  # safetensors' slices follow the default device (vLLM's: CUDA), not device=
        return _fingerprint_checkpoint(Path(model_dir), num_layers)


def _fingerprint_checkpoint(model_dir: Path, num_layers: int) -> str:
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    else:
        single = model_dir / "model.safetensors"
        if not single.is_file():
            raise FileNotFoundError(f"{model_dir} has no model.safetensors(.index.json) to fingerprint")
        with safe_open(str(single), "pt", device="cpu") as f:
            weight_map = {k: single.name for k in f.keys()}
    prefix = _hf_prefix(weight_map)
    handles: dict[str, object] = {}

    def get_corner(name: str):
        file = weight_map[prefix + name]
        if file not in handles:
            handles[file] = safe_open(str(model_dir / file), "pt", device="cpu")
        tensor_slice = handles[file].get_slice(prefix + name)
        return tuple(tensor_slice.get_shape()), tensor_slice[:_ROWS, :_COLS]

    return fingerprint_weights(get_corner, num_layers)


def _hf_prefix(names) -> str:
    """'' for *ForCausalLM checkpoints; multimodal wrappers nest the language model deeper."""
    probe = ff_weight_name(0, "gate_proj")
    for name in names:
        if name.endswith(probe):
            return name[: -len(probe)]
    raise KeyError(f"no weight named like {probe!r}: not a gated-FF decoder (Llama/Gemma/Qwen2)")
