"""Describe a base model the way `caprese.json` does, from a transformers config plus weights."""

from __future__ import annotations

from pathlib import Path

import torch

from caprese_vllm.adapter.fingerprint import fingerprint_checkpoint, fingerprint_module
from caprese_vllm.adapter.manifest import BaseModelInfo


def text_config(config):
    """The language-model part of a config (Gemma 3 multimodal configs nest it)."""
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def base_info_from_config(config, fingerprint: str) -> BaseModelInfo:
    text = text_config(config)
    architectures = getattr(config, "architectures", None) or [type(config).__name__]
    return BaseModelInfo(
        architecture=architectures[0],
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        fingerprint=fingerprint,
    )


def base_info_from_model(model: torch.nn.Module) -> BaseModelInfo:
    num_layers = text_config(model.config).num_hidden_layers
    return base_info_from_config(model.config, fingerprint_module(model, num_layers))


def base_info_from_dir(model_dir: str | Path) -> BaseModelInfo:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    num_layers = text_config(config).num_hidden_layers
    return base_info_from_config(config, fingerprint_checkpoint(model_dir, num_layers))
