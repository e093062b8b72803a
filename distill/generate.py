"""Step 1: the dense model answers math (training + held-out), language (held-out) and, with `eval.gsm8k`,
GSM8K (held-out) prompts via vLLM, all in one engine start.

Training prompts are templated math problems, or with `data.questions` the questions of that file (its
`data.questions_range` rows, prefixed "Please reason step by step.") cycled to `data.num_samples`.

Files under RUN_DIR/data/: `{split}.requests.jsonl` (prompts as token ids), `{split}.answers.jsonl`
(appended by the vLLM worker as chunks finish: the resume point), `{split}.jsonl` (the joined samples,
written last, by rename, so its presence means the split is complete).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from distill.config import DistillConfig, DistillError, write_atomic
from distill.data import Sample, prompt_ids_for, read_samples
from distill.problems import Problem, cycle_questions, language_problems, math_problems, read_question_file


@dataclass(frozen=True)
class Split:
    name: str
    temperature: float
    max_new_tokens: int
    # what the split's prompts come from when that may change on a resumed run (eval.* is not pinned):
    # kept in data/{name}.source; a different one regenerates the split
    source: str = ""


def splits(config: DistillConfig) -> list[tuple[Split, list[Problem]]]:
    """Every split the data step answers, with its problems in sample order (deterministic from config.seed)."""
    d, tokens = config.data, config.data.max_new_tokens
    if d.questions is not None:
        questions = read_question_file(d.questions, d.questions_range, "data.questions", need_answers=False)
        train = cycle_questions(questions, d.num_samples, seed=config.seed)
    else:
        train = math_problems(d.num_samples, seed=config.seed)
    heldout = math_problems(d.heldout_math, seed=config.seed + 1, exclude={p.question for p in train})
    out = [(Split("train", d.temperature, tokens), train), (Split("heldout_math", 0.0, tokens), heldout)]
    if d.heldout_language:
        out.append((Split("heldout_language", 0.0, tokens),
                    language_problems(d.heldout_language, seed=config.seed + 2)))
    if config.eval.gsm8k is not None:
        gsm8k = read_question_file(config.eval.gsm8k, config.eval.gsm8k_range, "eval.gsm8k", need_answers=True)
        out.append((Split("gsm8k", 0.0, config.eval.gsm8k_max_new_tokens, split_source(config, "gsm8k")), gsm8k))
    return out


def split_path(run_dir: Path, name: str) -> Path:
    return run_dir / "data" / f"{name}.jsonl"


def generate_data(config: DistillConfig, model_dir: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data_dir = config.run_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    counts, pending = {}, []
    for split, problems in splits(config):
        final = split_path(config.run_dir, split.name)
        source = data_dir / f"{split.name}.source"
        if split.source and (not source.exists() or source.read_text() != split.source):
            for stale in (final, data_dir / f"{split.name}.answers.jsonl"):
                stale.unlink(missing_ok=True)
            write_atomic(source, split.source)
        if final.exists():
            counts[split.name] = len(read_samples(final))
            print(f"data: {split.name}: {counts[split.name]} samples already generated", flush=True)
            continue
        samples = [Sample(id=f"{split.name}-{i}", kind=p.kind, topic=p.topic, question=p.question, answer=p.answer,
                          prompt_ids=prompt_ids_for(tokenizer, p.question)) for i, p in enumerate(problems)]
        pending.append((split, samples))
    if not pending:
        return counts
    answered = answer_with_vllm(config, model_dir, data_dir, {
        split.name: (samples, split.temperature, split.max_new_tokens) for split, samples in pending},
        step="data", who="the dense model")
    for split, samples in pending:
        joined = [s.model_copy(update={k: a[k] for k in ("completion_ids", "text", "finish_reason")})
                  for s, a in zip(samples, answered[split.name], strict=True)]
        write_atomic(split_path(config.run_dir, split.name), "".join(s.model_dump_json() + "\n" for s in joined))
        counts[split.name] = len(joined)
    return counts


def split_source(config: DistillConfig, name: str) -> str:
    """Split.source: the settings a split comes from that a resumed run may change ("" for pinned ones)."""
    if name != "gsm8k":
        return ""
    e = config.eval
    return json.dumps({"file": str(e.gsm8k), "range": e.gsm8k_range, "max_new_tokens": e.gsm8k_max_new_tokens})


def split_is_current(config: DistillConfig, name: str) -> bool:
    """Whether data/{name}.jsonl is complete and made from the split's current source (Split.source)."""
    source, path = split_source(config, name), config.run_dir / "data" / f"{name}.source"
    return split_path(config.run_dir, name).exists() and (
        not source or (path.exists() and path.read_text() == source))


def answer_with_vllm(config: DistillConfig, model_dir: Path, work_dir: Path,
                     sets: dict[str, tuple[list[Sample], float, int]], step: str, who: str,
                     adapter: Path | None = None) -> dict[str, list[dict]]:
    """Answer each named set of (samples, temperature, max new tokens) in one vLLM worker: {name: answers in
    sample order}. Files: work_dir/{name}.requests.jsonl, {name}.answers.jsonl (appended by the worker as
    chunks finish: a rerun answers only what is missing)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    jobs, outs = [], {}
    for name, (samples, temperature, max_tokens) in sets.items():
        requests, outs[name] = work_dir / f"{name}.requests.jsonl", work_dir / f"{name}.answers.jsonl"
        write_atomic(requests, "".join(json.dumps({"id": s.id, "prompt_ids": s.prompt_ids}) + "\n" for s in samples))
        jobs.append({"requests": str(requests.resolve()), "out": str(outs[name].resolve()),
                     "temperature": temperature, "max_tokens": max_tokens})
    _run_worker(config, model_dir, jobs, work_dir, step, who, adapter)
    result = {}
    for name, (samples, *_) in sets.items():
        answers = _read_answers(outs[name])
        missing = [s.id for s in samples if s.id not in answers]
        if missing:
            raise DistillError(f"{step}: {len(missing)} answers missing from {outs[name]} (first: {missing[0]}); "
                               "rerun to resume")
        result[name] = [answers[s.id] for s in samples]
    return result


def _free_gpu_share(cap: float = 0.9) -> float | None:
    """The share of the GPU a vLLM worker may take: `cap` of what this process leaves free (None on CPU).

    vLLM refuses to start when less than gpu_memory_utilization x total is free; after the fit, this
    process still holds the model and PyTorch's cached blocks, which vLLM's default of 0.9 does not leave
    room for, so the cache is emptied first and the rest left alone."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    return min(cap, cap * free / total)


def _run_worker(config: DistillConfig, model_dir: Path, jobs: list[dict], work_dir: Path, step: str, who: str,
                adapter: Path | None = None) -> None:
    """Answer `jobs` (requests files -> answers files) in a vLLM worker process; its log goes to
    work_dir/vllm.log. With `adapter`, the model is served with that Caprese adapter."""
    jobs_path, log_path = work_dir / "jobs.json", work_dir / "vllm.log"
    write_atomic(jobs_path, json.dumps(jobs, indent=2))
    cmd = [sys.executable, "-m", "distill.vllm_worker", "--model", str(model_dir.resolve()),
           "--jobs", str(jobs_path.resolve()), "--dtype", config.data.gen_dtype, "--chunk",
           str(config.data.gen_chunk), "--seed", str(config.seed)]
    tp = 1
    if adapter is not None:
        from caprese_vllm.adapter.checkpoint import load_manifest

        cmd += ["--adapter", str(adapter.resolve())]
        # an adapter fitted for local selection over N shards answers as it is served: at -tp N
        tp = load_manifest(adapter).local_shards
        if tp > 1:
            cmd += ["--tensor-parallel-size", str(tp)]
    share = _free_gpu_share()
    if share is not None:
        cmd += ["--gpu-memory-utilization", f"{share:.3f}"]
    at = f" at -tp {tp} (the adapter's local selection)" if tp > 1 else ""
    print(f"{step}: {who} answers {len(jobs)} prompt sets with vLLM{at} (engine log: {log_path})", flush=True)
    with open(log_path, "a") as log:
        # tqdm draws on stderr and stays on the terminal; vLLM's log (stdout) goes to the file
        proc = subprocess.run(cmd, stdout=log)
    if proc.returncode != 0:
        raise DistillError(f"{step}: vLLM generation failed (exit {proc.returncode}); see {log_path}; rerun the "
                           "same command to resume")


def _read_answers(path: Path) -> dict[str, dict]:
    """The worker's answers by sample id (a torn last line of an interrupted run is skipped)."""
    got = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        got[row["id"]] = row
    return got
