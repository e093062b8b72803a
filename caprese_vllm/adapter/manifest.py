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


class TensorParallelInfo(BaseModel):
    """The GRIFFIN selection under tensor parallelism that the adapter was fitted for (engine/tensor_parallel.py).
    Absent (older adapters, and every adapter fitted at TP=1): exact, the TP=1 selection."""

    model_config = ConfigDict(extra="forbid")

    selection: Literal["exact", "local"] = "exact"
    size: int | None = Field(default=None, ge=1, description="local: the -tp whose shards it was fitted on")


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
    tensor_parallel: TensorParallelInfo | None = Field(default=None, description="None: exact selection")
    integrity: Integrity | None = Field(default=None, description="written by save(); None (hand-made "
                                        "or older adapters): not checked")

    @model_validator(mode="after")
    def _check(self) -> CapreseManifest:
        base = self.base_model
        self.method.check_layers(base.num_layers)
        if self.method.name == "griffin":
            check_griffin_k(base.intermediate_size, self.method.density, "method.density")
        if self.tp_selection == "local" and self.method.name != "griffin":
            raise ValueError(f"tensor_parallel.selection local applies to GRIFFIN adapters only, not "
                             f"{self.method.name}")
        tp = self.tensor_parallel
        if tp is not None and tp.size is not None:
            # Nothing written is ignored: a size only means something for the local selection's shards.
            if tp.selection != "local":
                raise ValueError(f"tensor_parallel.size {tp.size} applies to selection local only (the -tp whose "
                                 f"shards a local adapter was fitted on), and selection is {tp.selection}; drop "
                                 "size, or set selection local")
            if base.intermediate_size % tp.size:
                raise ValueError(f"tensor_parallel.size {tp.size} does not divide base_model.intermediate_size "
                                 f"{base.intermediate_size}: no -tp shards the model so; fix the size")
        for layer, rank in self.lowrank.ranks.items():
            if layer not in self.method.layers:
                raise ValueError(f"lowrank.ranks has layer {layer}, which method.layers does not compress")
            if not 0 < rank <= base.hidden_size:
                raise ValueError(f"lowrank.ranks[{layer}] = {rank}: a rank must be in [1, hidden_size="
                                 f"{base.hidden_size}]")
        return self

    def content_sha256(self) -> str:
        return hashlib.sha256(self.model_dump_json(exclude=self.unset_optional() | {"integrity"}).encode()).hexdigest()

    def unset_optional(self) -> set[str]:
        """Fields added after format 1 that are left out of the file and its digest while unset, so manifests
        written before them keep their digest (integrity.manifest_sha256) and read as before."""
        return {"tensor_parallel"} if self.tensor_parallel is None else set()

    @property
    def tp_selection(self) -> Literal["exact", "local"]:
        return "exact" if self.tensor_parallel is None else self.tensor_parallel.selection

    @property
    def local_shards(self) -> int:
        """The shards GRIFFIN's selection was fitted over: N for `tensor_parallel {selection: local, size: N}`
        (the reference and caprese-distill's evaluation select so, as `-tp N` serves it), else 1."""
        tp = self.tensor_parallel
        return tp.size if tp is not None and tp.selection == "local" and tp.size is not None else 1

    def extra_params(self) -> int:
        return sum(2 * self.base_model.hidden_size * r for r in self.lowrank.ranks.values())
