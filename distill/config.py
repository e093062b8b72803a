"""Distillation settings: a YAML file and/or CLI flags, validated (pydantic: it crosses a file boundary).

    caprese-distill run --model smollm2-135m --run-dir runs/smol --num-samples 300
    caprese-distill run --config my.yaml            # same fields, nested as below

The resolved config is written to `RUN_DIR/config.json` on the first run; a later run on the same
directory must resolve to the same config (it resumes), or it stops naming the differing fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    num_samples: int = Field(20000, gt=0, description="training math samples (the paper: ~20K)")
    heldout_math: int = Field(200, gt=0, description="held-out math problems for the report")
    heldout_language: int = Field(100, ge=0, description="held-out language prompts for the report")
    max_new_tokens: int = Field(384, gt=0, description="longest answer the dense model may write")
    temperature: float = Field(0.7, ge=0.0, description="sampling temperature of training answers "
                               "(held-out answers are greedy)")
    gen_dtype: str = Field("auto", description="vLLM dtype for data generation (auto: float32 on CPU)")
    gen_chunk: int = Field(512, gt=0, description="prompts per vLLM call; each finished chunk is saved")


class FitConfig(_Strict):
    ridge: float = Field(1e-4, ge=0.0, description="ridge of the closed-form init, relative to mean diag(X^T X)")
    refine: Literal["none", "layerwise", "e2e"] = "e2e"
    # layer-wise refinement: Adam on the exact per-layer objective, from the captured statistics
    layerwise_steps: int = Field(200, gt=0)
    layerwise_lr: float = Field(1e-3, gt=0.0)
    # end-to-end refinement (the paper's stage 2): all low-rank paths together, teacher-forced
    e2e_loss: Literal["hidden_mse", "kl", "hidden_mse+kl"] = "hidden_mse+kl"
    e2e_kl_top: int = Field(0, ge=0, description="KL over the union of the dense model's top-k tokens per "
                                                 "batch (0: the whole vocabulary)")
    e2e_epochs: int = Field(1, gt=0)
    e2e_lr: float = Field(2e-4, gt=0.0)
    e2e_batch_tokens: int = Field(4096, gt=0, description="tokens per optimizer step (sequences are packed "
                                  "by length into batches of about this many tokens)")
    e2e_warmup: float = Field(0.02, ge=0.0, lt=1.0)
    capture_batch_tokens: int = Field(8192, gt=0)


class EvalConfig(_Strict):
    max_new_tokens: int | None = Field(None, description="default: data.max_new_tokens (then the dense answers "
                                       "of the data step are reused)")


class DistillConfig(_Strict):
    model: str = Field(description="a directory with an HF checkpoint, or a caprese-models name")
    run_dir: Path
    method: Literal["griffin", "cats"] = "griffin"
    density: float = Field(0.5, gt=0.0, lt=1.0)
    layers: list[int] | None = Field(None, description="compressed layers (default: GRIFFIN first half, CATS all)")
    rank: int | None = Field(None, gt=0, description="low-rank path rank (default: ~1% extra parameters)")
    seed: int = 0
    device: str = Field("auto", description="auto: cuda when available, else cpu")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="fit/eval dtype (auto: bf16 on GPU)")
    data: DataConfig = Field(default_factory=DataConfig)
    fit: FitConfig = Field(default_factory=FitConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().startswith("cuda") else torch.float32
        return getattr(torch, self.dtype)


# Fields that may change between runs on one directory without invalidating finished steps.
VOLATILE_FIELDS = ("device", "run_dir")


class DistillError(RuntimeError):
    """A step cannot go on; the message is one line: what failed, where, and what to do."""


class ConfigError(DistillError, ValueError):
    """One line: which file / flag / field is wrong and how to fix it."""


def _first_error(err: ValidationError, source: str) -> ConfigError:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    return ConfigError(f"{source}: field {loc}: {first['msg']}")


def load_config(yaml_path: Path | None, overrides: dict) -> DistillConfig:
    """YAML file (optional) with dotted-key CLI overrides ({'data.num_samples': 300}) on top."""
    import yaml

    raw: dict = {}
    if yaml_path is not None:
        try:
            raw = yaml.safe_load(Path(yaml_path).read_text()) or {}
        except OSError as err:
            raise ConfigError(f"{yaml_path}: cannot read ({err.strerror})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{yaml_path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of settings at the top level")
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return DistillConfig.model_validate(raw)
    except ValidationError as err:
        raise _first_error(err, str(yaml_path) if yaml_path else "caprese-distill flags") from None


def _known_fields(raw: dict, model: type[BaseModel]) -> dict:
    out = {}
    for key, value in raw.items():
        field = model.model_fields.get(key)
        if field is None:
            continue
        sub = field.annotation
        out[key] = _known_fields(value, sub) if isinstance(value, dict) and isinstance(sub, type) and issubclass(
            sub, BaseModel) else value
    return out


def pin_config(config: DistillConfig) -> None:
    """Write RUN_DIR/config.json, or check that an existing one matches (resume)."""
    path = config.run_dir / "config.json"
    mine = json.loads(config.model_dump_json())
    if path.exists():
        theirs = json.loads(path.read_text())
        try:  # settings added since that run was made count with their defaults (what that run used),
            # settings removed since then are dropped (they no longer change anything)
            theirs = json.loads(DistillConfig.model_validate(_known_fields(theirs, DistillConfig)).model_dump_json())
        except ValidationError:
            pass  # compared as written: the differing fields are named below
        differing = sorted(k for k in set(mine) | set(theirs)
                           if k not in VOLATILE_FIELDS and mine.get(k) != theirs.get(k))
        if differing:
            raise ConfigError(f"{path}: this run directory was made with different settings ({', '.join(differing)}"
                              "); resume with the same settings or pass a new --run-dir")
        return
    config.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(mine, indent=2) + "\n")
    tmp.replace(path)
