"""Where a steady decode step's time goes: GPU kernels per step of vLLM dense vs vLLM + Caprese.

    python benchmarks/decode_profile.py --model llama-3.1-8b --batch 32 [--variants dense caprese]

Each variant runs in its own process with the engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0,
so torch.profiler sees the GPU work). `batch` requests with 256-token prompts (dummy weights, as
decode_latency.py) are stepped through the engine; steps STEADY_FROM..STEADY_FROM + --steps (all
decode, every request selected) are profiled. Prints, per variant: host time per step, GPU busy time
per step (union of kernel intervals) and the kernels, grouped by name, in us per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from decode_latency import make_model_dir, run_worker  # noqa: E402

STEADY_FROM = 8


def worker(args) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from caprese_vllm.fork_safety import no_cpu_thread_pool

    root = Path(args.workdir)
    with no_cpu_thread_pool():
        model_dir, extra = make_model_dir(args.model, args.variant, root, args.rank, args.density)
    llm = LLM(model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=256 + STEADY_FROM + args.steps + 16, max_num_seqs=args.batch,
              gpu_memory_utilization=0.85, seed=0, **extra)
    engine = llm.llm_engine
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    params = SamplingParams(temperature=0.0, max_tokens=STEADY_FROM + args.steps + 8, ignore_eos=True,
                            detokenize=False)

    def run(profile: bool, tag: str):
        offset = 5000 * ("warm", "plain", "prof").index(tag)  # new prompts: no prefix-cache hits for dense
        for i in range(args.batch):
            prompt = [1000 + offset + 37 * i + j for j in range(256)]
            engine.add_request(f"{tag}-{i}", TokensPrompt(prompt_token_ids=prompt), params)
        for _ in range(STEADY_FROM):
            engine.step()
        sync()
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                  torch.profiler.ProfilerActivity.CUDA]) if profile else None
        if prof:
            prof.__enter__()
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        sync()
        host_ms = (time.perf_counter() - start) * 1e3 / args.steps
        if prof:
            prof.__exit__(None, None, None)
        while engine.has_unfinished_requests():
            engine.step()
        return host_ms, prof

    run(False, "warm")
    host_plain, _ = run(False, "plain")
    host_prof, prof = run(True, "prof")
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]  # [] on a CPU host
    per_name: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    intervals = []
    for e in kernels:
        per_name[e.name] += e.time_range.elapsed_us() / args.steps
        calls[e.name] += 1
        intervals.append((e.time_range.start, e.time_range.end))
    intervals.sort()
    busy, end = 0.0, float("-inf")
    for s, e in intervals:
        if e > end:
            busy += e - max(s, end)
            end = e
    print("RESULT " + json.dumps({
        "host_ms_per_step": host_plain, "host_ms_per_step_profiled": host_prof,
        "gpu_busy_ms_per_step": busy / 1e3 / args.steps,
        "kernels": {n: [us, calls[n] / args.steps] for n, us in per_name.items()},
    }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--variants", nargs="+", default=["dense", "caprese"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--worker", "--workdir", workdir, "--model", args.model, "--variant",
                   variant, "--batch", str(args.batch), "--steps", str(args.steps), "--rank", str(args.rank),
                   "--density", str(args.density)]
            result, _ = run_worker(cmd, Path(workdir) / f"{variant}.log", variant)
            if result is not None:
                results[variant] = result
    print(f"\n### {args.model}, batch {args.batch}: one steady decode step (mean of {args.steps})\n")
    print("| variant | host ms/step | host ms/step (profiled) | GPU busy ms/step |")
    print("|---|---|---|---|")
    for variant, r in results.items():
        print(f"| {variant} | {r['host_ms_per_step']:.3f} | {r['host_ms_per_step_profiled']:.3f} | "
              f"{r['gpu_busy_ms_per_step']:.3f} |")
    names = sorted({n for r in results.values() for n in r["kernels"]},
                   key=lambda n: -max(r["kernels"].get(n, [0, 0])[0] for r in results.values()))
    print("\n| kernel | " + " | ".join(f"{v} us/step (calls)" for v in results) + " |")
    print("|---|" + "---|" * len(results))
    for name in names[: args.top]:
        cells = [f"{r['kernels'][name][0]:.1f} ({r['kernels'][name][1]:.0f})" if name in r["kernels"] else "-"
                 for r in results.values()]
        print(f"| {name[:90]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
