"""`caprese.json`: what an adapter is for and what it holds (pydantic: it crosses a file boundary)."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from caprese_vllm.methods.griffin import check_griffin_k
from caprese_vllm.methods.spec import MethodSpec

FORMAT_VERSION = 1
MANIFEST_FILE = "caprese.json"
TENSORS_FILE = "adapter.safetensors"
LowRankDType = Literal["float32", "bfloat16", "float16"]


class BaseModelInfo(BaseModel):
    """The base model the adapter was fitted on; all fields must match at load time."""

    model_config = ConfigDict(extra="forbid")

    architecture: str
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    fingerprint: str = Field(min_length=8)


class LowRankInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ranks: dict[int, int] = Field(description="layer index -> rank r of lowrank_a [H, r], lowrank_b [r, H]")
    dtype: LowRankDType = "float32"


class TrainingInfo(BaseModel):
    """How the adapter was made; informational, never checked."""

    model_config = ConfigDict(extra="allow")

    num_samples: int = 0
    data: str = ""
    details: dict[str, Any] = Field(default_factory=dict)


class Integrity(BaseModel):
    """Digests written at export. A corrupt copy can still parse (a flipped digit in `density`, a flipped
    bit in a weight) and would load as a slightly different model; with these, loading refuses it."""

    model_config = ConfigDict(extra="forbid")

    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="of this manifest, `integrity` left out")
    tensors_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description=f"of {TENSORS_FILE}'s bytes")


class CapreseManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    base_model: BaseModelInfo
    method: MethodSpec
    lowrank: LowRankInfo
    training: TrainingInfo = Field(default_factory=TrainingInfo)
    integrity: Integrity | None = Field(default=None, description="written by save(); None (hand-made "
                                        "or older adapters): not checked")

    @model_validator(mode="after")
    def _check(self) -> CapreseManifest:
        base = self.base_model
        self.method.check_layers(base.num_layers)
        if self.method.name == "griffin":
            check_griffin_k(base.intermediate_size, self.method.density, "method.density")
        for layer, rank in self.lowrank.ranks.items():
            if layer not in self.method.layers:
                raise ValueError(f"lowrank.ranks has layer {layer}, which method.layers does not compress")
            if not 0 < rank <= base.hidden_size:
                raise ValueError(f"lowrank.ranks[{layer}] = {rank}: a rank must be in [1, hidden_size="
                                 f"{base.hidden_size}]")
        return self

    def content_sha256(self) -> str:
        return hashlib.sha256(self.model_dump_json(exclude={"integrity"}).encode()).hexdigest()

    def extra_params(self) -> int:
        return sum(2 * self.base_model.hidden_size * r for r in self.lowrank.ranks.values())
