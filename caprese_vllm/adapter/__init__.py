"""Caprese adapter checkpoints: manifest (caprese.json) + low-rank tensors (adapter.safetensors)."""

from caprese_vllm.adapter.base_info import base_info_from_config, base_info_from_dir, base_info_from_model
from caprese_vllm.adapter.checkpoint import AdapterError, CapreseAdapter, tensor_names
from caprese_vllm.adapter.manifest import (
    FORMAT_VERSION, MANIFEST_FILE, TENSORS_FILE, BaseModelInfo, CapreseManifest, LowRankInfo, TrainingInfo,
)
from caprese_vllm.adapter.synthetic import synthetic_adapter

__all__ = [
    "FORMAT_VERSION", "MANIFEST_FILE", "TENSORS_FILE", "AdapterError", "BaseModelInfo", "CapreseAdapter",
    "CapreseManifest", "LowRankInfo", "TrainingInfo", "base_info_from_config", "base_info_from_dir",
    "base_info_from_model", "synthetic_adapter", "tensor_names",
]
