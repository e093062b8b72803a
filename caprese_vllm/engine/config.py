"""Serving settings, read from `--additional-config` (vLLM's route for plugin settings).

    vllm serve MODEL --additional-config '{"caprese_adapter": "/path/to/adapter"}'

Every `caprese_*` key is validated here; without `caprese_adapter` the plugin changes nothing.
Method and density come from the adapter's manifest unless overridden. Nothing set is ignored
(issue 17 items 9, 10): a key that looks like ours but is spelled otherwise (`caprese-adapter`,
`Caprese_density`) is refused, as are an empty adapter path and settings the adapter's method has no
use for (`check_applies`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PREFIX = "caprese_"
# Settings whose values are words read in any case (the flags lower-case them: cli_flags); one rule for every
# route in, so a value the flag takes is never refused, nor counted as a second value, in --additional-config.
ANY_CASE_FIELDS = ("kernels", "tp_selection")


class CapreseServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: Path = Field(description="adapter directory (caprese.json + adapter.safetensors)")
    # strict: JSON true is not density 1.0 nor "0.5" a number, and "false" (a string) is not False; every
    # route in (flags, dotted keys, YAML, JSON) hands over typed values (cli_flags parses them)
    density: float | None = Field(default=None, gt=0.0, le=1.0, strict=True,
                                  description="override the manifest's density (the adapter was fitted at its own)")
    check_fingerprint: bool = Field(default=True, strict=True, description="refuse adapters fitted on other weights")
    # The plugin resolves "auto" to "on"/"off" in the front-end and writes it back into
    # additional_config: vLLM hashes additional_config into its torch.compile cache key, and the two
    # settings trace different graphs from the same source file, so each must get its own cache.
    kernels: Literal["auto", "on", "off"] = Field(
        default="auto", description="GPU Triton kernels for GRIFFIN layers; auto = on where they apply "
                                    "(CUDA, unquantized weights), off = the portable PyTorch path")

    # None: the adapter manifest's `tensor_parallel.selection` (exact when it has none). Written back resolved
    # ("exact"/"local") by the plugin, as kernels is: the two trace different graphs (exact all-reduces norms).
    tp_selection: Literal["exact", "local"] | None = Field(
        default=None, description="GRIFFIN selection under -tp > 1: exact = as at TP=1 (all-reduced token norms, "
                                  "all-gathered statistics), local = each rank's own top-k/tp, no collective")

    @field_validator(*ANY_CASE_FIELDS, mode="before")
    @classmethod
    def _any_case(cls, value):
        return value.lower() if isinstance(value, str) else value

    @field_validator("adapter", mode="before")
    @classmethod
    def _named(cls, value):
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty: name the adapter directory (the folder holding caprese.json)")
        return value

    @classmethod
    def from_additional_config(cls, additional_config: dict | None) -> CapreseServeConfig | None:
        """The settings in vLLM's additional_config, None without caprese_adapter. Raises ValueError (one
        line naming the key) for a bad value, an unknown caprese_* key or a misspelled prefix, and for an
        additional_config that is not a mapping (vLLM passes a non-JSON string through as it is)."""
        if additional_config is not None and not isinstance(additional_config, dict):
            raise ValueError(f"--additional-config is not a JSON object ({str(additional_config)[:60]!r}); pass "
                             "e.g. '{\"caprese_adapter\": \"/path/to/adapter\"}'")
        for key in additional_config or {}:
            if str(key).lower().startswith("caprese") and not str(key).startswith(PREFIX):
                fixed = PREFIX + str(key)[len(PREFIX):].replace("-", "_").lower()
                raise ValueError(f"--additional-config {key}: not a Caprese setting; did you mean {fixed}? "
                                 "(keys are spelled with underscores, e.g. caprese_adapter)")
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

    def check_applies(self, method: str) -> None:
        """Refuse settings the adapter's method would ignore: a density override changes GRIFFIN's k, but a
        CATS adapter's thresholds were fitted for its density (a new density needs new thresholds)."""
        if self.density is not None and method != "griffin":
            raise ValueError(f"--additional-config caprese_density={self.density:g}: applies to GRIFFIN adapters "
                             f"only (CATS thresholds are fitted at the adapter's density), and {self.adapter} is "
                             f"{method}; drop --caprese-density, or distil an adapter at that density")
        if self.tp_selection == "local" and method != "griffin":
            raise ValueError(f"--additional-config caprese_tp_selection=local: applies to GRIFFIN adapters only "
                             f"(CATS thresholds each token's own activations, rank-local already), and "
                             f"{self.adapter} is {method}; drop --caprese-tp-selection")
