"""Step 3: score dense / sparse method / sparse + Caprese on held-out math and language prompts.

Teacher-forced (on the dense model's own greedy answers, at the positions that run compressed):
  agreement  fraction of positions whose argmax equals the dense model's argmax
  kl         mean KL(dense || variant) of the next-token distributions
Free generation (greedy, each variant with the reference implementation, left-padded batches):
  accuracy   exact final-number answer (math)
  length     mean number of generated tokens
Results per variant and split are saved as `eval/{variant}.json` when done (resume point).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from caprese_vllm.adapter import CapreseAdapter
from caprese_vllm.methods import MethodSpec
from caprese_vllm.reference import patch_model, teacher_forcing, unpatch_model
from distill.data import Sample, collate, length_batches
from distill.e2e import FinalHidden, chunked_log_probs
from distill.problems import extract_answer

VARIANTS = ("dense", "sparse", "caprese")


def _patch(model, variant: str, method: MethodSpec, adapter: CapreseAdapter) -> None:
    if variant == "sparse":
        patch_model(model, method)
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


def generate(model, tokenizer, samples: list[Sample], variant: str, method: MethodSpec, adapter: CapreseAdapter,
             max_new_tokens: int, batch_size: int, desc: str) -> list[list[int]]:
    """Greedy completions (token ids, without the end token) of every sample's prompt."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    completions: list[list[int]] = []
    _patch(model, variant, method, adapter)
    try:
        for start in tqdm(range(0, len(samples), batch_size), desc=desc, unit="batch"):
            group = samples[start:start + batch_size]
            width = max(len(s.prompt_ids) for s in group)
            ids = torch.full((len(group), width), pad_id, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for row, s in enumerate(group):  # left padding: every prompt ends at the same column
                ids[row, width - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
                mask[row, width - len(s.prompt_ids):] = 1
            with torch.no_grad():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad_id, top_p=None, top_k=None,
                                     temperature=None)
            for row in out[:, width:].tolist():
                cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
                completions.append(row[:cut])
    finally:
        unpatch_model(model)
    return completions


def evaluate_variant(model, tokenizer, variant: str, heldout: dict[str, list[Sample]], method: MethodSpec,
                     adapter: CapreseAdapter, max_new_tokens: int, batch_size: int) -> dict:
    result = {}
    for split, samples in heldout.items():
        if not samples:
            continue
        completions = generate(model, tokenizer, samples, variant, method, adapter, max_new_tokens, batch_size,
                               f"eval: generate {variant} ({split})")
        lengths = [len(c) for c in completions]
        entry = {"length": sum(lengths) / len(lengths), "num_prompts": len(samples)}
        if split == "math":
            texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
            correct = [extract_answer(t) == s.answer for t, s in zip(texts, samples, strict=True)]
            entry["accuracy"] = sum(correct) / len(correct)
        result[split] = entry
    return result


def run_evaluation(model, tokenizer, eval_dir: Path, heldout: dict[str, list[Sample]], method: MethodSpec,
                   adapter: CapreseAdapter, max_new_tokens: int, batch_size: int, batch_tokens: int) -> dict:
    """{'teacher_forced': {split: ...}, 'generation': {variant: {split: ...}}}, each part cached in eval_dir."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tf_path = eval_dir / "teacher_forced.json"
    if tf_path.exists():
        tf = json.loads(tf_path.read_text())
    else:
        tf = {split: teacher_forced(model, samples, method, adapter, pad_id, batch_tokens,
                                    f"eval: teacher-forced ({split})")
              for split, samples in heldout.items() if samples}
        _write(tf_path, tf)
    generation = {}
    for variant in VARIANTS:
        path = eval_dir / f"generate_{variant}.json"
        if path.exists():
            generation[variant] = json.loads(path.read_text())
            continue
        generation[variant] = evaluate_variant(model, tokenizer, variant, heldout, method, adapter,
                                               max_new_tokens, batch_size)
        _write(path, generation[variant])
    return {"teacher_forced": tf, "generation": generation}


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
