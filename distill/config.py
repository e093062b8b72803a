"""Distillation settings: a YAML file and/or CLI flags, validated (pydantic: it crosses a file boundary).

    caprese-distill run --model smollm2-135m --run-dir runs/smol --num-samples 300
    caprese-distill run --config my.yaml            # same fields, nested as below

The resolved config is written to `RUN_DIR/config.json` on the first run; a later run on the same
directory must resolve to the same config (it resumes), or it stops naming the differing fields.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.functional_validators import AfterValidator


class _Strict(BaseModel):
    # unknown keys are errors (a misspelt setting is not silently ignored), and so are inf and nan in any
    # float field: `--e2e-lr inf` passes `gt=0` and would train on a non-finite step
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


_SLICE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*)?$")


def parse_slice(text: str) -> slice:
    """A python slice written as text ("-1000:", ":-1000", "10:20", "::2", ":") -> slice; ValueError otherwise."""
    match = _SLICE.match(text)
    if match is None or (match.group(3) is not None and int(match.group(3)) == 0):
        raise ValueError(f"{text!r} is not a slice such as ':-1000', '-1000:' or '0:500'")
    return slice(*(None if g is None else int(g) for g in match.groups()))


def _check_slice(text: str) -> str:
    parse_slice(text)
    return text


SliceText = Annotated[str, AfterValidator(_check_slice)]


def _check_device(text: str) -> str:
    """`auto`, or a device torch.device parses whose type the steps run on (cpu, cuda, cuda:N); ValueError
    otherwise. Whether that device exists here is check_device_available's business (not a property of
    the settings: config.json is reread on machines without it)."""
    if text == "auto":
        return text
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N")
    return text


DeviceText = Annotated[str, AfterValidator(_check_device)]
# kept absolute in RUN_DIR/config.json, so that a resume from another directory means the same file
FilePath = Annotated[Path, AfterValidator(lambda p: p.expanduser().absolute())]


class DataConfig(_Strict):
    num_samples: int = Field(20000, gt=0, description="training math samples (the paper: ~20K)")
    heldout_math: int = Field(200, gt=0, description="held-out math problems for the report")
    heldout_language: int = Field(100, ge=0, description="held-out language prompts for the report")
    max_new_tokens: int = Field(384, gt=0, description="longest answer the dense model may write")
    temperature: float = Field(0.7, ge=0.0, description="sampling temperature of training answers "
                               "(held-out answers are greedy)")
    gen_dtype: str = Field("auto", description="vLLM dtype for data generation (auto: float32 on CPU)")
    gen_chunk: int = Field(512, gt=0, description="prompts per vLLM call; each finished chunk is saved")
    questions: FilePath | None = Field(None, description="JSON lines with a `question` each (GSM8K format): the "
                                   "training prompts, cycled to num_samples (default: templated math)")
    questions_range: SliceText = Field(":", description="python slice over the question file's lines "
                                       "(\":-1000\": all but the last 1000)")


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
    e2e_clip: float = Field(1.0, gt=0.0, description="clip each step's gradient to this global L2 norm")
    e2e_samples: int | None = Field(None, gt=0, description="train end to end on a seeded subset of this many "
                                    "training samples (default: all; the closed form always uses all)")
    capture_batch_tokens: int = Field(8192, gt=0)


class EvalConfig(_Strict):
    max_new_tokens: int | None = Field(None, description="default: data.max_new_tokens (then the dense answers "
                                       "of the data step are reused)")
    gsm8k: FilePath | None = Field(None, description="GSM8K-format JSON lines (`question`, `answer` ending in `#### N`)"
                               ": a held-out split scored by exact-answer accuracy")
    gsm8k_range: SliceText = Field(":", description="python slice over the GSM8K file's lines (\"-1000:\": "
                                   "the last 1000)")
    gsm8k_max_new_tokens: int = Field(512, gt=0, description="longest GSM8K answer (dense, sparse and Caprese)")


class DistillConfig(_Strict):
    model: str = Field(description="a directory with an HF checkpoint, or a caprese-models name")
    run_dir: Path
    method: Literal["griffin", "cats"] = "griffin"
    density: float = Field(0.5, gt=0.0, lt=1.0)
    layers: list[int] | None = Field(None, description="compressed layers (default: GRIFFIN first half, CATS all)")
    rank: int | None = Field(None, gt=0, description="low-rank path rank (default: ~1% extra parameters)")
    seed: int = 0
    device: DeviceText = Field("auto", description="auto: cuda when available, else cpu; cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="fit/eval dtype (auto: bf16 on GPU)")
    # Fit for how the adapter will be served under tensor parallelism (issue 19; engine/tensor_parallel.py).
    # exact: the TP=1 selection, which `-tp N` reproduces exactly; local: each of tp_size shards of the FF
    # neurons normalises over its own neurons and keeps its own top-k/N, so the adapter learns the error
    # of the selection `-tp tp_size --caprese-tp-selection local` serves (the manifest records it).
    tp_selection: Literal["exact", "local"] = Field("exact", description="GRIFFIN selection to fit for: exact "
                                                    "(TP=1's, any -tp) or local (-tp tp_size's per-shard top-k)")
    tp_size: int = Field(1, ge=1, description="local: the -tp it will be served at (>= 2); exact: 1")
    data: DataConfig = Field(default_factory=DataConfig)
    fit: FitConfig = Field(default_factory=FitConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _tensor_parallel(self) -> DistillConfig:
        # Nothing set is ignored: a size only means something for the local selection, which only GRIFFIN has.
        if self.tp_selection == "local":
            if self.method != "griffin":
                raise ValueError(f"tp_selection local applies to GRIFFIN only (CATS thresholds each neuron on its "
                                 f"own: the same at any -tp), and method is {self.method}; drop tp_selection "
                                 "(--tp-selection)")
            if self.tp_size < 2:
                raise ValueError(f"tp_selection local needs tp_size >= 2 (the -tp the adapter will be served at), "
                                 f"got {self.tp_size}; set tp_size (--tp-size N)")
        elif self.tp_size != 1:
            raise ValueError(f"tp_size {self.tp_size} applies to tp_selection local only (an exact-selection adapter "
                             "serves at any -tp); drop tp_size (--tp-size), or set tp_selection local")
        return self

    @property
    def local_shards(self) -> int:
        """The shards GRIFFIN's fit-time selection runs over (reference/sparsifiers.py): tp_size for local, else 1."""
        return self.tp_size if self.tp_selection == "local" else 1

    def tensor_parallel_info(self):
        """The adapter manifest's `tensor_parallel` (caprese_vllm.adapter.manifest.TensorParallelInfo): None for
        exact (the default, left out of the file: older readers and digests unchanged), else local + size."""
        from caprese_vllm.adapter.manifest import TensorParallelInfo

        return None if self.tp_selection == "exact" else TensorParallelInfo(selection="local", size=self.tp_size)

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


# Fields that may change between runs on one directory without invalidating finished steps: the
# evaluation's settings too (its results are cached per adapter and settings, and the GSM8K split is
# regenerated when its file, range or length limit change: distill.generate.Split.source), so that one
# fitted adapter can be scored on the dev slice, then once on the test split.
VOLATILE_FIELDS = ("device", "run_dir", "eval")


class DistillError(RuntimeError):
    """A step cannot go on; the message is one line: what failed, where, and what to do."""


class ConfigError(DistillError, ValueError):
    """One line: which file / flag / field is wrong and how to fix it."""


def _first_error(err: ValidationError, source: str) -> ConfigError:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if not loc and first["type"] == "value_error":  # a rule across fields (DistillConfig's validators): it names them
        return ConfigError(f"{source}: {first['msg'].removeprefix('Value error, ')}")
    return ConfigError(f"{source}: field {loc or '(top level)'}: {first['msg']}")


def load_config(yaml_path: Path | None, overrides: dict) -> DistillConfig:
    """YAML file (optional) with dotted-key CLI overrides ({'data.num_samples': 300}) on top."""
    import yaml

    raw: dict = {}
    if yaml_path is not None:
        try:
            raw = yaml.safe_load(Path(yaml_path).read_text()) or {}
        except OSError as err:
            raise ConfigError(f"{yaml_path}: cannot read ({err.strerror})") from None
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{yaml_path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of settings at the top level")
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for depth, key in enumerate(parents):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                where = ".".join(parents[:depth + 1])
                raise ConfigError(f"{yaml_path or 'caprese-distill flags'}: field {where}: expected a mapping of "
                                  f"settings, got {type(node).__name__} (flag --{leaf.replace('_', '-')} sets {dotted})")
        node[leaf] = value
    source = str(yaml_path) if yaml_path else "caprese-distill flags"
    for key, flag in (("model", "--model MODEL_DIR"), ("run_dir", "--run-dir DIR")):
        if raw.get(key) is None:
            raise ConfigError(f"{source}: no {key} given; pass {flag} (or set `{key}:` in a --config file)")
    try:
        config = DistillConfig.model_validate(raw)
    except ValidationError as err:
        raise _first_error(err, source) from None
    check_flags_apply(config, overrides)
    check_device_available(config, source)
    check_question_files(config)
    return config


# a flag's setting -> the setting it refines, without which it changes nothing
_REFINES = {"eval.gsm8k_range": "eval.gsm8k", "eval.gsm8k_max_new_tokens": "eval.gsm8k",
            "data.questions_range": "data.questions"}


def _flag(dotted: str) -> str:
    return "--" + dotted.rsplit(".", 1)[-1].replace("_", "-")


def check_flags_apply(config: DistillConfig, overrides: dict) -> None:
    """A flag that refines a file setting (`--gsm8k-range`, `--gsm8k-max-new-tokens`, `--questions-range`) when
    that file is set neither by its flag nor in the config file would be silently ignored: ConfigError."""
    for dotted, needs in _REFINES.items():
        if overrides.get(dotted) is None:
            continue
        section, field = needs.split(".")
        if getattr(getattr(config, section), field) is None:
            raise ConfigError(f"{_flag(dotted)} is given but no file for it is: pass {_flag(needs)} FILE (or set "
                              f"{needs} in the --config file), or drop {_flag(dotted)}")


def check_device_available(config: DistillConfig, source: str) -> None:
    """A cuda device must exist on this machine (torch.cuda), and a local-selection fit's evaluation, served at
    -tp tp_size by vLLM on the GPUs when there are any (distill.vllm_worker), needs that many: checked before
    anything is written, not after the data step has run for minutes. ConfigError naming the field."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if config.device.startswith("cuda"):
        index = torch.device(config.device).index or 0
        if index >= count:
            have = f"{count} CUDA device{'s' if count != 1 else ''}" if count else "no CUDA device (torch.cuda)"
            raise ConfigError(f"{source}: field device: {config.device!r}, but this machine has {have}; pass "
                              "--device cpu (or auto: cuda when available)")
    if 0 < count < config.local_shards:
        raise ConfigError(f"{source}: field tp_size: {config.tp_size}, but the evaluation serves the adapter as it "
                          f"will be served, at -tp {config.tp_size}, and vLLM here has {count} GPU"
                          f"{'s' if count != 1 else ''}; run on a machine with {config.tp_size} GPUs")


def check_question_files(config: DistillConfig) -> None:
    """data.questions and eval.gsm8k exist and parse (rows in range, GSM8K format, eval answers with `#### N`),
    and when both name one file their row ranges do not overlap: never train on the evaluation's rows.
    Raises ConfigError naming the field."""
    from distill.problems import read_question_file

    d, e = config.data, config.eval
    if d.questions is not None:
        read_question_file(d.questions, d.questions_range, "data.questions", need_answers=False)
    if e.gsm8k is not None:
        read_question_file(e.gsm8k, e.gsm8k_range, "eval.gsm8k", need_answers=True)
    if d.questions is not None and e.gsm8k is not None and d.questions.resolve() == e.gsm8k.resolve():
        count = len(d.questions.read_text().splitlines())
        train, dev = (set(range(count)[parse_slice(r)]) for r in (d.questions_range, e.gsm8k_range))
        if train & dev:
            raise ConfigError(f"data.questions_range {d.questions_range!r} and eval.gsm8k_range {e.gsm8k_range!r} "
                              f"share {len(train & dev)} rows of {d.questions}: never train on the evaluation "
                              "rows; pick disjoint ranges (e.g. ':-1000' and '-1000:')")


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
        try:
            theirs = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: not the settings of a run ({str(err).splitlines()[0]}); pass a new --run-dir "
                              "or delete that file") from None
        if not isinstance(theirs, dict):
            raise ConfigError(f"{path}: not the settings of a run; pass a new --run-dir or delete that file")
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
    write_atomic(path, json.dumps(mine, indent=2) + "\n")


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` by rename from a temporary name unique to this process and call: a kill leaves
    the old file or the new one, never a torn one, and two writers never share a temporary file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_TMP_IDS)}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


_TMP_IDS = itertools.count()


def save_atomic(path: Path, obj) -> None:
    """torch.save by rename, like write_atomic (checkpoints, captured statistics)."""
    import torch

    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_TMP_IDS)}.tmp")
    try:
        torch.save(obj, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


class RunLock:
    """An exclusive lock on RUN_DIR/.lock (fcntl.flock) for one Pipeline's lifetime; the kernel releases it
    when the process ends, however it ends. DistillError (one line) when another process holds it."""

    def __init__(self, run_dir: Path):
        import fcntl

        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / ".lock"
        self._file = open(path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "?"
            self._file.close()
            raise DistillError(f"{run_dir}: another caprese-distill run (pid {holder}) is using this run "
                               "directory; wait for it to finish or pass another --run-dir") from None
        self._file.truncate(0)
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        self._file.close()
