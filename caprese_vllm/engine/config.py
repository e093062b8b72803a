"""Serving settings, read from `--additional-config` (vLLM's route for plugin settings).

    vllm serve MODEL --additional-config '{"caprese_adapter": "/path/to/adapter"}'

Every `caprese_*` key is validated here; without `caprese_adapter` the plugin changes nothing.
Method and density come from the adapter's manifest unless overridden.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PREFIX = "caprese_"


class CapreseServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: Path = Field(description="adapter directory (caprese.json + adapter.safetensors)")
    density: float | None = Field(default=None, gt=0.0, le=1.0,
                                  description="override the manifest's density (the adapter was fitted at its own)")
    check_fingerprint: bool = Field(default=True, description="refuse adapters fitted on other weights")
    # The plugin resolves "auto" to "on"/"off" in the front-end and writes it back into
    # additional_config: vLLM hashes additional_config into its torch.compile cache key, and the two
    # settings trace different graphs from the same source file, so each must get its own cache.
    kernels: Literal["auto", "on", "off"] = Field(
        default="auto", description="GPU Triton kernels for GRIFFIN layers; auto = on where they apply "
                                    "(CUDA, unquantized weights), off = the portable PyTorch path")

    @classmethod
    def from_additional_config(cls, additional_config: dict | None) -> CapreseServeConfig | None:
        ours = {k[len(PREFIX):]: v for k, v in (additional_config or {}).items() if k.startswith(PREFIX)}
        if "adapter" not in ours:
            if ours:
                raise ValueError(f"--additional-config has {sorted(PREFIX + k for k in ours)} but no "
                                 "caprese_adapter; add \"caprese_adapter\": \"/path/to/adapter\"")
            return None
        try:
            return cls.model_validate(ours)
        except ValidationError as err:
            first = err.errors()[0]
            key = PREFIX + ".".join(str(p) for p in first["loc"])
            raise ValueError(f"--additional-config {key}: {first['msg']}") from None
