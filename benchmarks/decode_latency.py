"""Decode latency (time to next token) of vLLM dense vs vLLM + Caprese, with dummy weights.

Prints one table per model: ms per decode step at each batch size for
  dense      the model as is;
  width7424  the same model with FF width 7424: the ceiling for 50% FF density + a rank-256 path;
  caprese    GRIFFIN density 0.5 on every layer + a random rank-256 path (~0.8% extra parameters),
             through the Triton kernels (caprese_kernels "on", the default on CUDA);
  caprese-portable  the same through the portable masked PyTorch path (not run unless asked for).
TTNT is measured as (time of a request with 1 + D output tokens - time with 1 output token) / D, on
fresh random 256-token prompts (both variants prefill every prompt), D = 128 by default, median of
repeats: per-request costs (Caprese's neuron selection) are spread over D tokens. Each variant runs
in its own process (a fresh engine).

    python benchmarks/decode_latency.py --models llama-3.1-8b gemma-2-9b --batch-sizes 1 8 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"
VARIANTS = ("dense", "width7424", "caprese", "caprese-portable")
# caprese: the Triton kernels; caprese-portable: the masked PyTorch path.
KERNELS = {"caprese": "on", "caprese-portable": "off"}


def make_model_dir(model: str, variant: str, root: Path, rank: int, density: float) -> tuple[Path, dict]:
    config = json.loads((CONFIGS / f"{model}.json").read_text())
    if variant == "width7424":
        config["intermediate_size"] = 7424
    model_dir = root / f"{model}-{variant}"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config))
    extra = {}
    if variant.startswith("caprese"):
        from caprese_vllm.adapter import BaseModelInfo, synthetic_adapter
        from caprese_vllm.methods import MethodSpec

        base = BaseModelInfo(architecture=config["architectures"][0], hidden_size=config["hidden_size"],
                             intermediate_size=config["intermediate_size"],
                             num_layers=config["num_hidden_layers"], fingerprint="sha256:dummy-weights")
        method = MethodSpec(name="griffin", density=density, layers=list(range(base.num_layers)))
        adapter = synthetic_adapter(base, method, rank=rank, scale=0.1, dtype="bfloat16")
        adapter.save(root / f"{model}-adapter")
        extra["additional_config"] = {"caprese_adapter": str(root / f"{model}-adapter"),
                                      "caprese_kernels": KERNELS[variant]}
    return model_dir, extra


def worker(args) -> None:
    """Runs in a child process: one engine, every batch size, prints a JSON line."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if os.environ.get("CAPRESE_BENCH_STACKS"):  # diagnosis: dump every thread's stack periodically
        import faulthandler

        faulthandler.dump_traceback_later(int(os.environ["CAPRESE_BENCH_STACKS"]), repeat=True)
    root = Path(args.workdir)
    from caprese_vllm.fork_safety import no_cpu_thread_pool

    with no_cpu_thread_pool():  # this process forks vLLM's engine core next
        model_dir, extra = make_model_dir(args.models[0], args.variants[0], root, args.rank, args.density)
    max_batch = max(args.batch_sizes)
    llm = LLM(model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=args.prompt_len + args.decode_steps + 8, max_num_seqs=max_batch,
              gpu_memory_utilization=0.85, seed=0, enforce_eager=args.enforce_eager, **extra)
    import random

    rng = random.Random(0)
    results = {}
    for batch in args.batch_sizes:
        def timed(n_out: int) -> float:
            # Fresh prompts every time: a repeated prompt would be served from vLLM's prefix cache for the
            # dense model (Caprese turns it off: GRIFFIN needs the prompt's activations), and the two
            # would no longer run the same steps.
            prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(1000, 30000) for _ in range(args.prompt_len)])
                       for _ in range(batch)]
            params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True, detokenize=False)
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            return time.perf_counter() - start

        print(f"batch {batch}: warm-up", file=sys.stderr, flush=True)
        timed(args.decode_steps)  # warm-up
        ttnt = []
        for _ in range(args.repeats):
            t_prefill, t_full = timed(1), timed(1 + args.decode_steps)
            ttnt.append((t_full - t_prefill) / args.decode_steps * 1000)
        results[batch] = statistics.median(ttnt)
        print(f"batch {batch}: {results[batch]:.2f} ms per decode step", file=sys.stderr, flush=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(range(100, 164)))],
                           SamplingParams(temperature=0.0, max_tokens=8, detokenize=False), use_tqdm=False)
    print("RESULT " + json.dumps({"ttnt_ms": results, "sample_tokens": list(outputs[0].outputs[0].token_ids)}),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama-3.1-8b", "gemma-2-9b"],
                        choices=sorted(p.stem for p in CONFIGS.glob("*.json")))
    parser.add_argument("--variants", nargs="+", default=["dense", "width7424", "caprese"], choices=VARIANTS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--log-dir", type=Path, default=None, help="keep each engine's full log here")
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile / CUDA graphs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    table: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for model in args.models:
            for variant in args.variants:
                cmd = [sys.executable, __file__, "--worker", "--workdir", workdir, "--models", model,
                       "--variants", variant, "--batch-sizes", *map(str, args.batch_sizes),
                       "--prompt-len", str(args.prompt_len), "--decode-steps", str(args.decode_steps),
                       "--repeats", str(args.repeats), "--rank", str(args.rank), "--density", str(args.density),
                       *(["--enforce-eager"] if args.enforce_eager else [])]
                start = time.perf_counter()
                log_dir = args.log_dir or Path(workdir)
                result, log_text = run_worker(cmd, log_dir / f"{model}-{variant}.log", f"{model} {variant}")
                if result is None:
                    continue
                table.setdefault(model, {})[variant] = result
                caprese_lines = [ln for ln in log_text.splitlines() if "caprese" in ln.lower()]
                print(f"[{model} {variant}] done in {time.perf_counter() - start:.0f}s", flush=True)
                for ln in caprese_lines[-6:]:
                    print("    " + ln[-220:], flush=True)
    print_table(table, args.batch_sizes)
    if args.json_out:
        args.json_out.write_text(json.dumps(table, indent=2))


def run_worker(cmd: list[str], log_path: Path, name: str) -> tuple[dict | None, str]:
    """Run a benchmark worker process, its whole output in log_path; (its RESULT json or None, the log)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:  # vLLM logs to stdout: keep both streams in the file
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    text = log_path.read_text()
    line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        print(f"[{name}] FAILED (exit {proc.returncode}), log {log_path}:\n{text[-6000:]}", flush=True)
        return None, text
    return json.loads(line[len("RESULT "):]), text


def print_table(table: dict, batch_sizes: list[int]) -> None:
    for model, variants in table.items():
        print(f"\n### {model}: ms per decode step (TTNT)\n")
        print("| variant | " + " | ".join(f"batch {b}" for b in batch_sizes) + " | vs dense | vs width7424 |")
        print("|---|" + "---|" * (len(batch_sizes) + 2))
        dense = variants.get("dense", {}).get("ttnt_ms", {})
        ceiling = variants.get("width7424", {}).get("ttnt_ms", {})
        for name, res in variants.items():
            ttnt = res["ttnt_ms"]
            cells = [f"{ttnt[str(b)] if str(b) in ttnt else ttnt[b]:.2f}" for b in batch_sizes]

            def ratios(ref):
                if not ref:
                    return "-"
                return " / ".join(f"{_get(ttnt, b) / _get(ref, b):.3f}" for b in batch_sizes)

            print(f"| {name} | " + " | ".join(cells) + f" | {ratios(dense)} | {ratios(ceiling)} |")


def _get(d: dict, b: int) -> float:
    return d[str(b)] if str(b) in d else d[b]


if __name__ == "__main__":
    main()
