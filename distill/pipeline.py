"""The whole distillation, step by step, under one run directory (every step resumable).

    RUN_DIR/config.json     resolved settings (a rerun must match them)
    RUN_DIR/data/           step 1: dense answers (generate.py)
    RUN_DIR/fit/            step 2: statistics, closed form, refinement (fit.py)
    RUN_DIR/adapter/        the adapter: serve it with `vllm serve MODEL --caprese-adapter RUN_DIR/adapter`
    RUN_DIR/eval/           step 3: scores (evaluate.py)
    RUN_DIR/report.{json,md,png}
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from caprese_vllm.adapter import CapreseAdapter
from caprese_vllm.lowrank import default_rank
from caprese_vllm.methods import MethodSpec
from caprese_vllm.methods.spec import default_layers
from distill.config import ConfigError, DistillConfig, DistillError, RunLock, pin_config, write_atomic
from distill.data import read_samples
from distill.generate import generate_data, split_is_current, split_path


def resolve_model(name_or_dir: str) -> Path:
    path = Path(name_or_dir)
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"model {name_or_dir!r}: no readable config.json ({str(err).splitlines()[0]}); "
                                    "pass a Hugging Face checkpoint directory or a caprese-models name") from None
        if not isinstance(config, dict):
            raise FileNotFoundError(f"model {name_or_dir!r}: config.json is not a mapping; pass a Hugging Face "
                                    "checkpoint directory")
        return path
    from caprese_vllm.zoo import CATALOG, ensure_model

    if name_or_dir in CATALOG:
        return ensure_model(name_or_dir)
    raise FileNotFoundError(f"model {name_or_dir!r}: not a directory and not one of caprese-models' names "
                            f"({', '.join(CATALOG)}); pass a local HF checkpoint directory")


def _tp_sizes(model_dir: Path) -> tuple[int, int, int | None]:
    """(intermediate_size, num_attention_heads, num_key_value_heads or None) from the checkpoint's config.json (its
    text_config where it has one, as multimodal Gemma 3 does); ConfigError naming the file and field otherwise."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"model {model_dir}: cannot read config.json for --tp-size ({str(err).splitlines()[0]})") \
            from None
    text = raw.get("text_config") if isinstance(raw, dict) and isinstance(raw.get("text_config"), dict) else raw
    sizes = []
    for field in ("intermediate_size", "num_attention_heads", "num_key_value_heads"):
        value = text.get(field) if isinstance(text, dict) else None
        if field == "num_key_value_heads" and value is None:
            sizes.append(None)
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model {model_dir}: {path.name} has no positive integer {field} ({value!r}), which "
                              "a local-selection fit (--tp-size) needs to shard the model as vLLM will")
        else:
            sizes.append(value)
    return sizes[0], sizes[1], sizes[2]


def check_tensor_parallel(config: DistillConfig, model_dir: Path) -> None:
    """tp_selection local: `vllm serve -tp tp_size` must be able to serve the model and the adapter
    (engine/tensor_parallel.py tensor_parallel_refusal: heads, KV heads and FF width divisible, k >= N), or the
    evaluation would fail after the data and fit steps. ConfigError (one line naming tp_size, and a size that
    works) otherwise."""
    if config.local_shards == 1:
        return
    from caprese_vllm.engine.tensor_parallel import largest_servable_tp, tensor_parallel_refusal
    from caprese_vllm.methods import griffin_k

    inter, heads, kv = _tp_sizes(model_dir)
    n, k = config.tp_size, griffin_k(inter, config.density)
    why = tensor_parallel_refusal(n, inter, heads, kv, k)
    if why is not None:
        fits = largest_servable_tp(n, inter, heads, kv, k)
        instead = f"use --tp-size {fits}" if fits else "no -tp below it serves this model"
        raise ConfigError(f"tp_size (--tp-size) {n}: vLLM cannot serve {config.model} at -tp {n} with local "
                          f"selection at density {config.density:g}: {why}; {instead}, or --tp-selection exact")


class Pipeline:
    def __init__(self, config: DistillConfig):
        self.config = config
        self.model_dir = resolve_model(config.model)
        self._model = self._tokenizer = None
        check_tensor_parallel(config, self.model_dir)  # before config.json pins settings that cannot run
        self.lock = RunLock(config.run_dir)  # held until the process ends: one run per directory
        pin_config(config)

    # ---- shared pieces ---------------------------------------------------------------------
    def load_model(self):
        if self._model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            device, dtype = self.config.resolved_device(), self.config.resolved_dtype()
            self._model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype).to(device).eval()
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return self._model, self._tokenizer

    def method(self) -> MethodSpec:
        from caprese_vllm.adapter.base_info import text_config
        from transformers import AutoConfig

        text = text_config(AutoConfig.from_pretrained(self.model_dir))
        layers = self.config.layers or default_layers(self.config.method, text.num_hidden_layers)
        if self.config.method == "cats":
            return MethodSpec(name="cats", density=self.config.density, layers=layers,
                              thresholds=self._cats_thresholds(layers))
        return MethodSpec(name=self.config.method, density=self.config.density, layers=layers)

    def _cats_thresholds(self, layers: list[int]) -> dict[int, float]:
        """Per-layer tau from the training prompts' gate activations (CATS calibration)."""
        from caprese_vllm.methods import cats_calibrate_threshold
        from distill.data import collate

        path = self.config.run_dir / "fit" / "cats_thresholds.json"
        if path.exists():
            return {int(k): v for k, v in json.loads(path.read_text()).items()}
        model, tokenizer = self.load_model()
        samples = read_samples(split_path(self.config.run_dir, "train"))[:256]
        from caprese_vllm.reference.patch import decoder_layers

        seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        hooks = []
        for i in layers:
            mlp = decoder_layers(model)[i].mlp
            hooks.append(mlp.gate_proj.register_forward_hook(
                lambda m, a, out, i=i, mlp=mlp: seen[i].append(mlp.act_fn(out).abs().flatten()[::7].float().cpu())))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        try:
            with torch.no_grad():
                for start in range(0, len(samples), 16):
                    b = collate(samples[start:start + 16], pad, next(model.parameters()).device)
                    model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False, logits_to_keep=1)
        finally:
            for h in hooks:
                h.remove()
        thresholds = {i: cats_calibrate_threshold(torch.cat(v), self.config.density) for i, v in seen.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(thresholds, indent=2) + "\n")
        return thresholds

    def rank(self, model) -> int:
        if self.config.rank is not None:
            return self.config.rank
        text = model.config.get_text_config()
        return default_rank(model.num_parameters(), text.hidden_size, len(self.method().layers))

    # ---- steps -----------------------------------------------------------------------------
    def generate(self) -> dict[str, int]:
        t0 = time.perf_counter()
        counts = generate_data(self.config, self.model_dir)
        self._record("generate_s", time.perf_counter() - t0)
        return counts

    def fit(self) -> CapreseAdapter:
        from distill.fit import fit_adapter

        t0 = time.perf_counter()
        model, tokenizer = self.load_model()
        method = self.method()
        train = read_samples(split_path(self.config.run_dir, "train"))
        heldout = read_samples(split_path(self.config.run_dir, "heldout_math"))
        if not train:
            raise DistillError(f"{split_path(self.config.run_dir, 'train')}: no training data; run "
                               "`caprese-distill generate` first (or `run`)")
        adapter = fit_adapter(self.config, model, tokenizer, method, self.rank(model), train, heldout)
        self._record("fit_s", time.perf_counter() - t0)
        return adapter

    def evaluate(self, speed: Path | None = None) -> dict:
        """Evaluate (cached per adapter digest) and write report.json/md/png. `speed`: a checked
        decode_latency.py --json-out for this adapter (cli.check_speed_file), kept as RUN_DIR/speed.json."""
        from distill.evaluate import run_evaluation
        from distill.report import active_params, build_report, write_report

        gsm8k = self.config.eval.gsm8k is not None
        if gsm8k and not split_is_current(self.config, "gsm8k"):  # eval.* may change on a resumed run
            self.generate()
        t0 = time.perf_counter()
        model, tokenizer = self.load_model()
        run_dir = self.config.run_dir
        adapter = CapreseAdapter.load(run_dir / "adapter")
        method = adapter.manifest.method
        heldout = {"math": read_samples(split_path(run_dir, "heldout_math")),
                   "language": read_samples(split_path(run_dir, "heldout_language")),
                   "gsm8k": read_samples(split_path(run_dir, "gsm8k")) if gsm8k else []}
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        evaluation = run_evaluation(self.config, self.model_dir, model, run_dir / "eval", heldout, adapter,
                                    run_dir / "adapter", self.config.fit.capture_batch_tokens, pad_id, eos_ids)
        timings = self._record("evaluate_s", time.perf_counter() - t0)
        text = model.config.get_text_config()
        ranks = adapter.manifest.lowrank.ranks
        meta = {
            "model": self.config.model, "method": method.name, "density": method.density, "layers": method.layers,
            "rank": max(ranks.values()), "num_train_samples": len(read_samples(split_path(run_dir, "train"))),
            "num_heldout": {k: len(v) for k, v in heldout.items()},
            "active_params": active_params(model.num_parameters(), text.hidden_size, text.intermediate_size,
                                           ranks, method.density),
            "timings": timings,
            "speed": self._speed_lines(adapter, speed),
        }
        fit = json.loads((run_dir / "fit" / "fit.json").read_text())
        report = build_report(meta, evaluation, fit)
        write_report(report, run_dir)
        return report

    def _speed_lines(self, adapter: CapreseAdapter, speed: Path | None) -> list[str]:
        """The report's speed lines from RUN_DIR/speed.json (copied from `speed` first); a file measured for
        an earlier adapter of this run (refit since) is left out, with a log line."""
        from caprese_vllm.adapter import AdapterError
        from distill.speed import load_speed_result, speed_lines

        kept = self.config.run_dir / "speed.json"
        if speed is not None:  # checked up front (cli.check_speed_file) and again here, before it is kept
            lines = speed_lines(load_speed_result(speed, adapter.manifest))
            write_atomic(kept, Path(speed).read_text())
            return lines
        if not kept.exists():
            return []
        try:
            return speed_lines(load_speed_result(kept, adapter.manifest))
        except AdapterError as err:
            print(f"caprese-distill: report: speed left out: {err}", file=sys.stderr, flush=True)
            return []

    def _record(self, step: str, seconds: float) -> dict[str, float]:
        """Add one step's wall time to RUN_DIR/timings.json (a resumed step adds its remaining time)."""
        path = self.config.run_dir / "timings.json"
        timings = json.loads(path.read_text()) if path.exists() else {}
        timings[step] = timings.get(step, 0.0) + seconds
        write_atomic(path, json.dumps(timings, indent=2) + "\n")
        return timings
