"""Step 2: fit every compressed layer's low-rank path: closed-form init, then the configured refinement.

Files under RUN_DIR/fit/: `stats.pt` (captured training statistics), `stats_heldout.pt`, `stage1/`
(closed-form adapter), `fit.json` (per-layer relative errors, timings); the final adapter goes to
RUN_DIR/adapter/. Each file is written by rename when its stage finishes; a rerun skips those.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from caprese_vllm.adapter import CapreseAdapter, base_info_from_model
from caprese_vllm.adapter.manifest import CapreseManifest, LowRankInfo, TensorParallelInfo, TrainingInfo
from caprese_vllm.file_modes import readable_by_all
from caprese_vllm.methods import MethodSpec
from distill.capture import LayerStats, capture_stats, load_stats, save_stats
from distill.config import DistillConfig, write_atomic
from distill.data import Sample
from distill.rrr import closed_form, layerwise_refine


def make_adapter(model, method: MethodSpec, lowrank: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 training: TrainingInfo, tensor_parallel: TensorParallelInfo | None = None) -> CapreseAdapter:
    manifest = CapreseManifest(
        base_model=base_info_from_model(model), method=method,
        lowrank=LowRankInfo(ranks={layer: a.shape[1] for layer, (a, _) in lowrank.items()}, dtype="float32"),
        training=training, tensor_parallel=tensor_parallel)
    return CapreseAdapter(manifest=manifest, lowrank_a={k: a.cpu() for k, (a, _) in lowrank.items()},
                          lowrank_b={k: b.cpu() for k, (_, b) in lowrank.items()})


def _stats(path: Path, model, method, samples, config: DistillConfig, pad_id: int, desc: str):
    device = next(model.parameters()).device
    if path.exists():
        return load_stats(path, device)
    stats = capture_stats(model, method, samples, config.fit.capture_batch_tokens, pad_id, desc,
                          config.local_shards)
    save_stats(stats, path)
    return stats


def layer_errors(stats: dict[int, LayerStats], adapter: CapreseAdapter | None) -> dict[int, float]:
    """Per layer |FF - sparse_FF - xAB| / |FF| (adapter None: the sparse block alone)."""
    errors = {}
    for layer, s in stats.items():
        lowrank = (adapter.lowrank_a[layer], adapter.lowrank_b[layer]) if adapter is not None else (None, None)
        errors[layer] = s.relative_error(*lowrank)
    return errors


def fit_adapter(config: DistillConfig, model, tokenizer, method: MethodSpec, rank: int,
                train: list[Sample], heldout: list[Sample]) -> CapreseAdapter:
    fit_dir = config.run_dir / "fit"
    fit_dir.mkdir(parents=True, exist_ok=True)
    final_dir = config.run_dir / "adapter"
    if (final_dir / "caprese.json").exists():
        print(f"fit: {final_dir} already fitted", flush=True)
        readable_by_all(final_dir)  # adapters saved before files got the umask's mode were 0600
        return CapreseAdapter.load(final_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    timings = {}
    t0 = time.perf_counter()
    stats = _stats(fit_dir / "stats.pt", model, method, train, config, pad_id, "fit: capture (train)")
    stats_heldout = _stats(fit_dir / "stats_heldout.pt", model, method, heldout, config, pad_id,
                           "fit: capture (held-out)")
    timings["capture_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stage1_dir = fit_dir / "stage1"
    source = (f"questions of {config.data.questions.name} [{config.data.questions_range}]"
              if config.data.questions else "templated math problems")
    training = TrainingInfo(num_samples=len(train),
                            data=f"the model's own answers to {source} (caprese-distill)",
                            details={"stage1": "closed-form reduced-rank ridge regression", "rank": rank,
                                     "ridge": config.fit.ridge, "refine": config.fit.refine})
    if (stage1_dir / "caprese.json").exists():
        stage1 = CapreseAdapter.load(stage1_dir)
    else:
        lowrank = {layer: closed_form(s, rank, config.fit.ridge)
                   for layer, s in tqdm(stats.items(), desc="fit: closed form", unit="layer")}
        stage1 = make_adapter(model, method, lowrank, training, config.tensor_parallel_info())
        stage1.save(stage1_dir)
    timings["closed_form_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if config.fit.refine == "layerwise":
        lowrank = {layer: layerwise_refine(s, stage1.lowrank_a[layer], stage1.lowrank_b[layer],
                                           config.fit.layerwise_steps, config.fit.layerwise_lr)
                   for layer, s in tqdm(stats.items(), desc="fit: layer-wise Adam", unit="layer")}
        final = make_adapter(model, method, lowrank, training, config.tensor_parallel_info())
    elif config.fit.refine == "e2e":
        from distill.e2e import refine_end_to_end

        final = refine_end_to_end(config, model, pad_id, stage1, train, fit_dir)
    else:
        final = stage1
    timings["refine_s"] = time.perf_counter() - t0

    report = {
        "rank": rank, "layers": method.layers, "extra_params": final.manifest.extra_params(),
        "train_tokens": next(iter(stats.values())).count, "heldout_tokens": next(iter(stats_heldout.values())).count,
        "relative_error": {
            split: {"sparse": layer_errors(s, None), "stage1": layer_errors(s, stage1),
                    "final": layer_errors(s, final)}
            for split, s in (("train", stats), ("heldout", stats_heldout))},
        "timings": timings,
    }
    write_atomic(fit_dir / "fit.json", json.dumps(report, indent=2) + "\n")
    final.save(final_dir)
    return final
