"""An adapter's configuration at other model shapes, and the decode speed measured for it (issue 18).

Accuracy is measured on the small models that run here (Qwen2.5-Coder-0.5B: 24 layers, H 896, I 4864); speed
on the shapes the paper reports (Llama-3.1-8B, Gemma-2-9B) with dummy weights. A speed figure only means
something for the configuration whose accuracy it goes with, so `benchmarks/decode_latency.py` and
`kernel_latency.py` take that configuration from the adapter's `caprese.json` (`--adapter-config`) and map
it onto the target shape here; the result file names the adapter (its manifest digest), and
`caprese-distill ... --speed FILE` puts the line in the report only for that adapter.

Mapping (`map_configuration`):
  layers   by relative position: target layer j is compressed iff source layer floor(j * L_src / L_tgt) is
           (the first half of 24 layers -> the first half of 32);
  density  the method's density (one value for every compressed layer, as in the manifest);
  rank     per target layer, from the source layer at the same position, by `rank_rule`:
             "ff-share" (default): r_tgt = r_src * I_tgt / I_src, so the low-rank path is the same share of
               its layer's FF weights (2 H r / 3 H I) and adds the same fraction of the FF's decode bytes;
             "absolute": r_tgt = r_src;
           rounded to a multiple of 16 (tensor-core tiles), at least 16, at most H_tgt.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from caprese_vllm.adapter import AdapterError
from caprese_vllm.adapter.manifest import MANIFEST_FILE, CapreseManifest
from caprese_vllm.methods import griffin_k

RankRule = Literal["ff-share", "absolute"]
Milliseconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
RANK_MULTIPLE = 16
# The HF config.json of each target model the speed benchmarks build (dummy weights) and map adapters onto.
# Package data beside this file: an installed (non-editable) package has no benchmarks/ folder.
TARGET_SHAPES = Path(__file__).resolve().parent / "target_shapes"


def target_shape_names() -> list[str]:
    """Names accepted by target_shape / decode_latency.py --models (target_shapes/NAME.json)."""
    return sorted(p.stem for p in TARGET_SHAPES.glob("*.json"))


class ModelShape(BaseModel):
    """The sizes that decide an FF layer's decode cost (from an HF config.json)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)

    @classmethod
    def from_hf_config(cls, name: str, config: dict) -> ModelShape:
        return cls(name=name, num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
                   intermediate_size=config["intermediate_size"])


class AdapterConfiguration(BaseModel):
    """What a speed figure was measured for: an adapter's method, density, compressed layers and ranks on
    its own model (`source`), and the manifest digest that names the adapter."""

    model_config = ConfigDict(extra="forbid")

    adapter_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="CapreseManifest.content_sha256()")
    method: str
    density: float = Field(gt=0, le=1)
    source: ModelShape
    layers: list[int]
    ranks: dict[int, int]
    tp_selection: Literal["exact", "local"] = Field("exact", description="the GRIFFIN selection under -tp > 1 "
                                                    "it was fitted for (manifest tensor_parallel)")

    @classmethod
    def from_manifest(cls, manifest: CapreseManifest) -> AdapterConfiguration:
        base = manifest.base_model
        return cls(adapter_sha256=manifest.content_sha256(), method=manifest.method.name,
                   density=manifest.method.density,
                   source=ModelShape(name=base.architecture, num_layers=base.num_layers,
                                     hidden_size=base.hidden_size, intermediate_size=base.intermediate_size),
                   layers=sorted(manifest.method.layers), ranks=dict(sorted(manifest.lowrank.ranks.items())),
                   tp_selection=manifest.tp_selection)

    def describe(self) -> str:
        """e.g. 'griffin density 0.5 on layers 0-11 of 24, rank 288' (the adapter's own model)."""
        return describe(self.method, self.density, self.layers, self.source.num_layers, self.ranks)


class MappedConfiguration(BaseModel):
    """An AdapterConfiguration at a target shape (see the module docstring for the rules)."""

    model_config = ConfigDict(extra="forbid")

    target: ModelShape
    rank_rule: RankRule
    layers: list[int]
    ranks: dict[int, int]
    density: float

    def describe(self) -> str:
        return describe("", self.density, self.layers, self.target.num_layers, self.ranks)

    def ff_width_read(self) -> int:
        """FF width a compressed layer reads per decode token: k kept neurons + the mean rank (a compressed
        layer without a low-rank path counts 0)."""
        k = griffin_k(self.target.intermediate_size, self.density)
        return k + round(sum(self.ranks.values()) / max(len(self.layers), 1))

    def compressed_fraction(self) -> float:
        return len(self.layers) / self.target.num_layers


class SpeedResult(BaseModel):
    """decode_latency.py's --json-out with --adapter-config: ms per decode step (TTNT) per target model,
    variant and batch size, for one adapter configuration."""

    model_config = ConfigDict(extra="forbid")

    configuration: AdapterConfiguration
    mapped: dict[str, MappedConfiguration]
    ttnt_ms: dict[str, dict[str, dict[int, Milliseconds]]] = Field(description="model -> variant -> batch -> ms")
    device: str = ""
    vllm_version: str = ""
    tensor_parallel_size: int = Field(1, ge=1, description="every variant ran at -tp N (decode_latency.py -tp)")
    tp_selection: Literal["exact", "local"] = "exact"

    @model_validator(mode="after")
    def _check(self) -> SpeedResult:
        """Every timed model has dense and Caprese at a common batch size and a mapping that is the one
        map_configuration gives for this configuration (a hand-edited mapping would name another one)."""
        if not self.ttnt_ms:
            raise ValueError("no model was timed (every decode_latency.py worker failed?)")
        for model, variants in self.ttnt_ms.items():
            if not set(variants.get("dense", {})) & set(variants.get("caprese", {})):
                raise ValueError(f"{model}: no batch size timed for both dense and caprese")
            mapped = self.mapped.get(model)
            if mapped is None:
                raise ValueError(f"{model}: timed but not in `mapped`")
            if mapped != map_configuration(self.configuration, mapped.target, mapped.rank_rule):
                raise ValueError(f"{model}: `mapped` is not what this configuration maps to ({mapped.rank_rule})")
        return self


def describe(method: str, density: float, layers: list[int], num_layers: int, ranks: dict[int, int]) -> str:
    span = layer_spans(sorted(layers))
    distinct = sorted(set(ranks.values()) | ({0} if set(layers) - set(ranks) else set()))
    rank = ("no low-rank path" if distinct in ([], [0]) else f"rank {distinct[0]}" if len(distinct) == 1
            else f"ranks {distinct[0]}-{distinct[-1]} per layer")
    return f"{method + ' ' if method else ''}density {density:g} on layers {span} of {num_layers}, {rank}"


def layer_spans(layers: list[int]) -> str:
    if not layers:
        return "none"
    parts, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(parts)


def map_layers(layers: list[int], source_layers: int, target_layers: int) -> dict[int, int]:
    """{target layer: the source layer at its relative position} for every compressed target layer."""
    chosen = set(layers)
    out = {}
    for j in range(target_layers):
        i = j * source_layers // target_layers
        if i in chosen:
            out[j] = i
    return out


def map_rank(rank: int, source: ModelShape, target: ModelShape, rule: RankRule) -> int:
    raw = rank * target.intermediate_size / source.intermediate_size if rule == "ff-share" else rank
    rounded = max(RANK_MULTIPLE, RANK_MULTIPLE * math.floor(raw / RANK_MULTIPLE + 0.5))
    return min(rounded, target.hidden_size)


def map_configuration(config: AdapterConfiguration, target: ModelShape,
                      rank_rule: RankRule = "ff-share") -> MappedConfiguration:
    """Raises ValueError when the configuration compresses no layer of `target` (e.g. single layers of a
    deeper model that fall between the target's positions) or keeps no neuron of its FF (k = 0)."""
    at = map_layers(config.layers, config.source.num_layers, target.num_layers)
    if not at:
        raise ValueError(f"{config.describe()} maps onto no layer of {target.name} ({target.num_layers} layers); "
                         "nothing there would run compressed")
    if griffin_k(target.intermediate_size, config.density) < 1:
        raise ValueError(f"density {config.density:g} keeps no neuron of {target.name}'s {target.intermediate_size}")
    # a compressed layer may have no low-rank path (the manifest's ranks leave it out): none there either
    ranks = {j: map_rank(config.ranks[i], config.source, target, rank_rule) for j, i in at.items() if i in config.ranks}
    return MappedConfiguration(target=target, rank_rule=rank_rule, layers=sorted(at), ranks=ranks,
                               density=config.density)


def load_adapter_configuration(path: str | Path) -> AdapterConfiguration:
    """From an adapter directory or its caprese.json. Raises AdapterError (one line) when it is neither or
    does not validate (the tensors are not read: a speed run needs the configuration only)."""
    from caprese_vllm.adapter.checkpoint import load_manifest

    path = Path(path)
    if path.is_file() and path.name == MANIFEST_FILE:
        path = path.parent
    if not (path / MANIFEST_FILE).is_file():
        raise AdapterError(f"--adapter-config {path}: no {MANIFEST_FILE} there; pass an adapter directory "
                           f"(RUN_DIR/adapter) or its {MANIFEST_FILE}")
    return AdapterConfiguration.from_manifest(load_manifest(path))


def load_bench_shape(name: str) -> ModelShape:
    """A target shape from distill/target_shapes/NAME.json."""
    return ModelShape.from_hf_config(name, json.loads((TARGET_SHAPES / f"{name}.json").read_text()))


def load_speed_result(path: str | Path, manifest: CapreseManifest) -> SpeedResult:
    """Read a decode_latency.py --json-out file for the report; it must have been measured for `manifest`
    (same content digest). Raises AdapterError (one line, naming the file and the fix)."""
    path = Path(path)
    try:
        result = SpeedResult.model_validate_json(path.read_bytes())
    except OSError as err:
        raise AdapterError(f"--speed {path}: {err.strerror or err}") from None
    except (ValidationError, ValueError) as err:
        first = err.errors()[0] if isinstance(err, ValidationError) else {"loc": (), "msg": str(err)}
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise AdapterError(f"--speed {path}: {where}: {first['msg']}; pass the --json-out file of "
                           "benchmarks/decode_latency.py run with --adapter-config") from None
    if result.configuration.adapter_sha256 != manifest.content_sha256():
        raise AdapterError(
            f"--speed {path}: measured for adapter {result.configuration.adapter_sha256[:12]} "
            f"({result.configuration.describe()}), not this run's adapter {manifest.content_sha256()[:12]}; "
            "measure this one: benchmarks/decode_latency.py --adapter-config RUN_DIR/adapter --json-out FILE")
    return result


def speed_lines(result: SpeedResult) -> list[str]:
    """Markdown lines for the report: per target model, TTNT of dense and Caprese at each batch size."""
    lines = []
    for model, variants in result.ttnt_ms.items():  # SpeedResult checked: dense, caprese and mapped are there
        dense, caprese = variants["dense"], variants["caprese"]
        batches = [b for b in sorted(caprese) if b in dense]
        cells = ", ".join(f"batch {b}: {dense[b]:.2f} -> {caprese[b]:.2f} ms "
                          f"({100 * (caprese[b] / dense[b] - 1):+.1f}%)" for b in batches)
        mapped = result.mapped[model].describe()
        where = ", ".join(x for x in (result.device, f"vLLM {result.vllm_version}" if result.vllm_version else "")
                          if x)
        if result.tensor_parallel_size > 1:
            where = f"-tp {result.tensor_parallel_size}, {result.tp_selection} selection" + (", " + where if where
                                                                                             else "")
        lines.append(f"- Speed at {model} shapes ({mapped}; dummy weights{', ' + where if where else ''}): "
                     f"TTNT dense -> Caprese, {cells}")
    return lines
