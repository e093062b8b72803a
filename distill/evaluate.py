"""Step 3: score dense / sparse method / sparse + Caprese on held-out math, language and GSM8K prompts.

Teacher-forced (on the dense model's own greedy answers, at the positions that run compressed):
  agreement  fraction of positions whose argmax equals the dense model's argmax
  kl         mean KL(dense || variant) of the next-token distributions
Free generation (greedy, served by vLLM: dense, with a sparse-only adapter, with the adapter):
  accuracy   exact final answer (math, GSM8K: `problems.extract_answer` against the gold number)
  length     mean number of generated tokens (the end token excluded)
  truncation fraction of answers stopped by the length limit (vLLM finish_reason "length")
Results are cached under `eval/` (teacher_forced.json, generate_{variant}.json: the resume points) for
one adapter and one set of held-out splits (`eval/key.json`): a refit or other splits start afresh.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from caprese_vllm.adapter import CapreseAdapter
from caprese_vllm.adapter.manifest import LowRankInfo, TrainingInfo
from caprese_vllm.methods import MethodSpec
from caprese_vllm.reference import patch_model, teacher_forcing, unpatch_model
from distill.config import DistillConfig, write_atomic
from distill.data import Sample, collate, length_batches
from distill.e2e import FinalHidden, chunked_log_probs
from distill.generate import answer_with_vllm
from distill.problems import extract_answer

VARIANTS = ("dense", "sparse", "caprese")


def _patch(model, variant: str, method: MethodSpec, adapter: CapreseAdapter) -> None:
    if variant == "sparse":  # the selection the adapter was fitted for (local_shards), without its low-rank paths
        patch_model(model, method, local_shards=adapter.manifest.local_shards)
    elif variant == "caprese":
        patch_model(model, adapter=adapter)


def _agreement_and_kl(model, dense_hidden: torch.Tensor, hidden: torch.Tensor) -> tuple[float, float]:
    """Summed top-1 agreement and KL(dense || variant) over positions, 512 at a time (Gemma-3 ran out
    of memory here with whole batches of positions)."""
    agree = kl = 0.0
    for log_p, log_q in chunked_log_probs(model, dense_hidden, hidden, chunk=512):
        agree += float((log_q.argmax(-1) == log_p.argmax(-1)).sum())
        kl += float((log_p.exp() * (log_p - log_q)).sum())
    return agree, kl


def teacher_forced(model, samples: list[Sample], method: MethodSpec, adapter: CapreseAdapter, pad_id: int,
                   batch_tokens: int, desc: str) -> dict[str, dict[str, float]]:
    """{variant: {agreement, kl}} for sparse and caprese (dense is 1.0 / 0.0 by definition)."""
    device = next(model.parameters()).device
    final_hidden = FinalHidden(model)
    sums = {v: {"agree": 0.0, "kl": 0.0} for v in ("sparse", "caprese")}
    count = 0
    try:
        with torch.no_grad():
            for group in tqdm(list(length_batches(samples, batch_tokens)), desc=desc, unit="batch"):
                batch = collate(group, pad_id, device)
                kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                              logits_to_keep=1)
                model(**kwargs)
                dense_hidden = final_hidden.value[batch.target_mask]
                count += dense_hidden.shape[0]
                for variant in sums:
                    _patch(model, variant, method, adapter)
                    try:
                        with teacher_forcing(model, batch.prompt_mask):
                            model(**kwargs)
                    finally:
                        unpatch_model(model)
                    agree, kl = _agreement_and_kl(model, dense_hidden, final_hidden.value[batch.target_mask])
                    sums[variant]["agree"] += agree
                    sums[variant]["kl"] += kl
    finally:
        final_hidden.remove()
    out = {"dense": {"agreement": 1.0, "kl": 0.0}}
    for variant, s in sums.items():
        out[variant] = {"agreement": s["agree"] / max(count, 1), "kl": s["kl"] / max(count, 1)}
    out["positions"] = count
    return out


def _sparse_only(adapter: CapreseAdapter) -> CapreseAdapter:
    """The adapter's method without its low-rank paths: the sparse model as the plugin serves it."""
    training = TrainingInfo(data="no low-rank path: the sparse method alone (caprese-distill evaluation)")
    manifest = adapter.manifest.model_copy(update={
        "lowrank": LowRankInfo(ranks={}, dtype=adapter.manifest.lowrank.dtype), "training": training,
        "integrity": None})
    return CapreseAdapter(manifest=manifest, lowrank_a={}, lowrank_b={})


def score(answers: dict[str, list[dict]], heldout: dict[str, list[Sample]], eos_ids: set[int]) -> dict:
    """{split: {length, truncation, num_prompts[, accuracy]}}: mean tokens before the end token, the fraction
    of answers cut by the length limit, and exact-answer accuracy where the samples have answers (math)."""
    result = {}
    for split, samples in heldout.items():
        rows = answers[split]
        lengths = [sum(1 for t in row["completion_ids"] if t not in eos_ids) for row in rows]
        truncated = [row.get("finish_reason") == "length" for row in rows]
        entry = {"length": sum(lengths) / len(lengths), "truncation": sum(truncated) / len(rows),
                 "num_prompts": len(samples)}
        if any(s.answer is not None for s in samples):
            correct = [extract_answer(row["text"]) == s.answer for row, s in zip(rows, samples, strict=True)]
            entry["accuracy"] = sum(correct) / len(correct)
        result[split] = entry
    return result


def generation_limits(config: DistillConfig, splits) -> dict[str, tuple[int, int]]:
    """{split: (max new tokens of its dense answers in the data step, of the evaluation's answers)}: GSM8K
    uses eval.gsm8k_max_new_tokens for both; the other splits data.max_new_tokens, then eval.max_new_tokens."""
    data, e = config.data.max_new_tokens, config.eval
    return {split: (e.gsm8k_max_new_tokens,) * 2 if split == "gsm8k" else (data, e.max_new_tokens or data)
            for split in splits}


def _reset_cache(eval_dir: Path, key: dict, adapter_dir: Path) -> None:
    """Empty eval_dir unless its results were made for `key` (adapter digest, splits, limits), then pin it.
    Results of a run made before keys existed are kept if none is older than the adapter."""
    import shutil

    path = eval_dir / "key.json"
    if path.exists() and json.loads(path.read_text()) == key:
        return
    made = (adapter_dir / "caprese.json").stat().st_mtime
    cached = list(eval_dir.glob("*.json")) if eval_dir.exists() else []
    if not path.exists() and cached and all(f.stat().st_mtime >= made for f in cached):
        _write(path, key)
        return
    if eval_dir.exists():
        print(f"eval: {eval_dir} holds results of another adapter or other splits; starting afresh", flush=True)
        shutil.rmtree(eval_dir)
    eval_dir.mkdir(parents=True)
    _write(path, key)


def adapter_digest(adapter: CapreseAdapter) -> str:
    """The adapter's identity: its manifest's and tensors' sha256 as written by save()."""
    integrity = adapter.manifest.integrity
    if integrity is None:
        return "manifest:" + adapter.manifest.content_sha256()
    return f"{integrity.manifest_sha256}:{integrity.tensors_sha256}"


def run_evaluation(config: DistillConfig, model_dir: Path, model, eval_dir: Path, heldout: dict[str, list[Sample]],
                   adapter: CapreseAdapter, adapter_dir: Path, batch_tokens: int, pad_id: int,
                   eos_ids: set[int]) -> dict:
    """{'teacher_forced': {split: ...}, 'generation': {variant: {split: ...}}}, each part cached in eval_dir.

    Free generation runs where the adapter is meant to run, in vLLM: the dense answers are the data
    step's held-out answers (greedy, by the same engine) where their length limit is the evaluation's
    (`generation_limits`), else dense vLLM answers them; the sparse method and Caprese are served with
    the plugin (a sparse-only adapter, the adapter), all splits in one engine start per variant."""
    heldout = {split: samples for split, samples in heldout.items() if samples}
    limits = generation_limits(config, heldout)
    _reset_cache(eval_dir, {"adapter": adapter_digest(adapter), "splits": {k: len(v) for k, v in heldout.items()},
                            "max_new_tokens": {k: v[1] for k, v in limits.items()},
                            "eval": json.loads(config.eval.model_dump_json())}, adapter_dir)
    method = adapter.manifest.method
    tf_path = eval_dir / "teacher_forced.json"
    if tf_path.exists():
        tf = json.loads(tf_path.read_text())
    else:
        tf = {split: teacher_forced(model, samples, method, adapter, pad_id, batch_tokens,
                                    f"eval: teacher-forced ({split})")
              for split, samples in heldout.items()}
        _write(tf_path, tf)
    generation = {}
    for variant in VARIANTS:
        path = eval_dir / f"generate_{variant}.json"
        if path.exists():
            generation[variant] = json.loads(path.read_text())
            continue
        answers, todo = {}, dict(heldout)
        if variant == "dense":  # the data step's greedy answers, where generated with the same limit
            for split in [s for s, (data, limit) in limits.items() if data == limit]:
                answers[split] = [s.model_dump(include={"completion_ids", "text", "finish_reason"})
                                  for s in todo.pop(split)]
        if todo:
            served = {"dense": None, "sparse": eval_dir / "sparse" / "adapter", "caprese": adapter_dir}[variant]
            if variant == "sparse" and not (served / "caprese.json").exists():
                _sparse_only(adapter).save(served)
            who = variant if served is None else f"{variant} (adapter {served})"
            answers |= answer_with_vllm(config, model_dir, eval_dir / variant,
                                        {split: (samples, 0.0, limits[split][1]) for split, samples in todo.items()},
                                        "eval", who, served)
        generation[variant] = score(answers, heldout, eos_ids)
        _write(path, generation[variant])
    return {"teacher_forced": tf, "generation": generation}


def _write(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")
