"""Step 1: the dense model answers math (training + held-out) and language (held-out) prompts via vLLM.

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

from distill.config import DistillConfig, DistillError
from distill.data import Sample, prompt_ids_for, read_samples
from distill.problems import Problem, language_problems, math_problems


@dataclass(frozen=True)
class Split:
    name: str
    temperature: float


def splits(config: DistillConfig) -> list[tuple[Split, list[Problem]]]:
    d = config.data
    train = math_problems(d.num_samples, seed=config.seed)
    heldout = math_problems(d.heldout_math, seed=config.seed + 1, exclude={p.question for p in train})
    out = [(Split("train", d.temperature), train), (Split("heldout_math", 0.0), heldout)]
    if d.heldout_language:
        out.append((Split("heldout_language", 0.0), language_problems(d.heldout_language, seed=config.seed + 2)))
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
        if final.exists():
            counts[split.name] = len(read_samples(final))
            print(f"data: {split.name}: {counts[split.name]} samples already generated", flush=True)
            continue
        samples = [Sample(id=f"{split.name}-{i}", kind=p.kind, topic=p.topic, question=p.question, answer=p.answer,
                          prompt_ids=prompt_ids_for(tokenizer, p.question)) for i, p in enumerate(problems)]
        pending.append((split, samples))
    if not pending:
        return counts
    answered = answer_with_vllm(config, model_dir, data_dir, {split.name: (samples, split.temperature)
                                                              for split, samples in pending},
                                config.data.max_new_tokens, step="data", who="the dense model")
    for split, samples in pending:
        joined = [s.model_copy(update={k: a[k] for k in ("completion_ids", "text", "finish_reason")})
                  for s, a in zip(samples, answered[split.name], strict=True)]
        final = split_path(config.run_dir, split.name)
        tmp = final.with_suffix(".tmp")
        tmp.write_text("".join(s.model_dump_json() + "\n" for s in joined))
        tmp.replace(final)
        counts[split.name] = len(joined)
    return counts


def answer_with_vllm(config: DistillConfig, model_dir: Path, work_dir: Path,
                     sets: dict[str, tuple[list[Sample], float]], max_new_tokens: int, step: str, who: str,
                     adapter: Path | None = None) -> dict[str, list[dict]]:
    """Answer each named set of samples (at its temperature) in one vLLM worker: {name: answers in sample
    order}. Files: work_dir/{name}.requests.jsonl, {name}.answers.jsonl (appended by the worker as
    chunks finish: a rerun answers only what is missing)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    jobs, outs = [], {}
    for name, (samples, temperature) in sets.items():
        requests, outs[name] = work_dir / f"{name}.requests.jsonl", work_dir / f"{name}.answers.jsonl"
        requests.write_text("".join(json.dumps({"id": s.id, "prompt_ids": s.prompt_ids}) + "\n" for s in samples))
        jobs.append({"requests": str(requests.resolve()), "out": str(outs[name].resolve()),
                     "temperature": temperature})
    _run_worker(config, model_dir, jobs, work_dir, max_new_tokens, step, who, adapter)
    result = {}
    for name, (samples, _) in sets.items():
        answers = _read_answers(outs[name])
        missing = [s.id for s in samples if s.id not in answers]
        if missing:
            raise DistillError(f"{step}: {len(missing)} answers missing from {outs[name]} (first: {missing[0]}); "
                               "rerun to resume")
        result[name] = [answers[s.id] for s in samples]
    return result


def _run_worker(config: DistillConfig, model_dir: Path, jobs: list[dict], work_dir: Path, max_new_tokens: int,
               step: str, who: str, adapter: Path | None = None) -> None:
    """Answer `jobs` (requests files -> answers files) in a vLLM worker process; its log goes to
    work_dir/vllm.log. With `adapter`, the model is served with that Caprese adapter."""
    jobs_path, log_path = work_dir / "jobs.json", work_dir / "vllm.log"
    jobs_path.write_text(json.dumps(jobs, indent=2))
    cmd = [sys.executable, "-m", "distill.vllm_worker", "--model", str(model_dir.resolve()),
           "--jobs", str(jobs_path.resolve()), "--max-new-tokens", str(max_new_tokens),
           "--dtype", config.data.gen_dtype, "--chunk", str(config.data.gen_chunk), "--seed", str(config.seed)]
    if adapter is not None:
        cmd += ["--adapter", str(adapter.resolve())]
    print(f"{step}: {who} answers {len(jobs)} prompt sets with vLLM (engine log: {log_path})", flush=True)
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
