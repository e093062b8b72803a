"""Kernel-level table: microseconds per FF layer for one decode step, Caprese routes vs dense.

    python benchmarks/kernel_latency.py [--models llama-3.1-8b gemma-2-9b] [--tokens 1 8 32]

Per model shape and number of decode tokens T (each its own request, so each its own neuron set):
  dense   vLLM's shape of the dense FF: x W_gu^T -> act_and_mul -> W_d, cuBLAS, bf16
  gather  the Triton route (gather_gate_up + gather_down): each token reads its k neurons' rows + rank r
  masked  the dense-rows route for decode batches: every row of the low-rank-extended weights read once,
          masked_gate_up (gate/up, activation, mask) then a cuBLAS GEMM for down
  floor   the weight bytes of the cheaper route / the copy bandwidth measured on this GPU: T tokens x
          (3k + 2r) rows gathered, or every row once (3I + 2r); `best` is the faster of the two routes
All timed inside CUDA graphs (triton.testing.do_bench_cudagraph), as vLLM runs decode.
With --adapter-config ADAPTER the density and the ranks are that adapter's, mapped onto each shape (layers by
position, ranks by --rank-rule: distill/speed.py), each distinct rank timed, and a last table adds the FF
time of one whole decode step for that configuration: compressed layers at the faster route, the others
dense (without it: --density and --rank on every layer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"llama-3.1-8b": (4096, 14336, "silu"), "gemma-2-9b": (3584, 14336, "gelu_tanh")}


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write), the practical HBM ceiling."""
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=50)
    return 2 * src.numel() / (ms * 1e-3)


def sweep(hidden, inter, k, gate_up_ext, down_t_ext, act) -> None:
    """us of each gather kernel at T=1 for a grid of launch settings (to pick the defaults)."""
    from triton.testing import do_bench_cudagraph

    from caprese_vllm.kernels.gather_down import gather_down, gather_workspace
    from caprese_vllm.kernels.gather_gate_up import gather_gate_up

    x = torch.randn(1, hidden, device="cuda", dtype=gate_up_ext.dtype)
    idx = torch.randperm(inter, device="cuda")[:k].sort().values[None].int()
    slot = torch.zeros(1, dtype=torch.long, device="cuda")
    flags = torch.zeros(1, dtype=torch.bool, device="cuda")
    results = []
    for block_n in (4, 8, 16, 32):
        for block_h in (128, 256, 512):
            for warps in (2, 4, 8):
                f = lambda: gather_gate_up(x, gate_up_ext, inter, idx, slot, flags, act, block_n, block_h, warps)  # noqa: E731
                f()
                results.append((1e3 * do_bench_cudagraph(f, rep=100), "gate_up", block_n, block_h, warps))
    z = gather_gate_up(x, gate_up_ext, inter, idx, slot, flags, act)
    acc, tickets = gather_workspace(1, hidden, x.device)
    stat = torch.zeros(1, inter, device="cuda")
    for split in (8, 16, 32, 64):
        for block_n in (16, 32, 64):
            for block_h in (128, 256, 512):
                for warps in (2, 4, 8):
                    f = lambda: gather_down(z, down_t_ext, inter, idx, slot, flags, flags, stat, acc, tickets,  # noqa: E731
                                            split, block_n, block_h, warps)
                    f()
                    results.append((1e3 * do_bench_cudagraph(f, rep=100), "down", split, block_n, block_h, warps))
    for kind in ("gate_up", "down"):
        best = sorted(r for r in results if r[1] == kind)[:4]
        print(f"  sweep H={hidden} {kind}: " + "; ".join(f"{r[0]:.1f}us {r[2:]}" for r in best), flush=True)


def sweep_masked(hidden, inter, rank, gate_up_ext, act, act_fn, tokens_list) -> None:
    """us of masked_gate_up for a grid of launch settings, beside what it replaces (cuBLAS over
    2I + R rows + act_mul_mask) and the dense shape (cuBLAS over 2I rows + act-and-mul)."""
    from triton.testing import do_bench_cudagraph

    from caprese_vllm.kernels.act_mul_mask import act_mul_mask, act_mul_mask_reference
    from caprese_vllm.kernels.masked_gate_up import masked_gate_up, masked_workspace

    for tokens in tokens_list:
        x = torch.randn(tokens, hidden, device="cuda", dtype=gate_up_ext.dtype)
        keep = (torch.rand(tokens, inter, device="cuda") < 0.5).to(torch.uint8)
        slot = torch.arange(tokens, device="cuda")
        flags = torch.zeros(tokens, dtype=torch.bool, device="cuda")
        stat = torch.zeros(tokens, inter, device="cuda")
        parts, ticket = masked_workspace(inter, x.device)
        want = act_mul_mask_reference(x.float() @ gate_up_ext.float().t(), inter, rank, keep, slot, flags, act)
        w_dense = gate_up_ext[: 2 * inter]

        def cublas_dense():
            h = x @ w_dense.t()
            return act_fn(h[:, :inter]) * h[:, inter:]

        def cublas_ext_mask():
            return act_mul_mask(x @ gate_up_ext.t(), inter, rank, keep, slot, flags, act)[0]

        base = {f.__name__: 1e3 * do_bench_cudagraph(f, rep=200) for f in (cublas_dense, cublas_ext_mask)}
        results = []
        for block_n in (32, 64, 128):
            for block_k in (64, 128, 256):
                for warps in (4, 8):
                    for stages in (3, 5):
                        config = (block_n, block_k, warps, stages)
                        f = lambda: masked_gate_up(x, gate_up_ext, inter, keep, slot, flags, flags, stat,  # noqa: E731
                                                   parts, ticket, act, config)
                        try:
                            err = ((f().float() - want).norm() / want.norm()).item()
                            us = 1e3 * do_bench_cudagraph(f, rep=200)
                        except Exception as e:  # noqa: BLE001 - out of shared memory etc.: skip the setting
                            print(f"    {config}: {type(e).__name__}", flush=True)
                            continue
                        results.append((us, config, err))
        results.sort()
        print(f"  masked sweep H={hidden} T={tokens}: cuBLAS 2I + act-mul {base['cublas_dense']:.1f} us, "
              f"cuBLAS 2I+R + act_mul_mask {base['cublas_ext_mask']:.1f} us; fused best: "
              + "; ".join(f"{us:.1f}us {cfg} err {err:.1e}" for us, cfg, err in results[:6]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--density", type=float, default=0.5, help="without --adapter-config")
    parser.add_argument("--rank", type=int, default=256, help="without --adapter-config: rank on every layer")
    parser.add_argument("--adapter-config", type=Path, default=None,
                        help="time this adapter's configuration (directory or caprese.json)")
    parser.add_argument("--rank-rule", choices=["ff-share", "absolute"], default="ff-share")
    parser.add_argument("--sweep", action="store_true", help="time the gather kernels' launch settings at T=1")
    parser.add_argument("--sweep-masked", action="store_true",
                        help="time masked_gate_up's launch settings at each T of --tokens, then stop")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode_latency import resolve_configurations

    source, mapped = resolve_configurations(args, "kernel_latency.py")
    if not torch.cuda.is_available():
        raise SystemExit("kernel_latency.py: error: needs a CUDA GPU (it times the Triton kernels and cuBLAS); "
                         "run it on a GPU host (benchmarks/gpu_host.sh kernel_latency.py)")

    from triton.testing import do_bench_cudagraph

    from caprese_vllm.kernels.decode_mlp import caprese_ff, decode_workspace, fuse_weights
    from caprese_vllm.methods import griffin_k

    dtype = torch.bfloat16
    bandwidth = copy_bandwidth()
    print(f"GPU: {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    for name, rank in [(name, r) for name in args.models for r in sorted(set(mapped[name].ranks.values()))]:
        hidden, inter, act = SHAPES[name]
        k = griffin_k(inter, mapped[name].density)
        w_gate_up = torch.randn(2 * inter, hidden, device="cuda", dtype=dtype) * 0.01
        w_down = torch.randn(hidden, inter, device="cuda", dtype=dtype) * 0.01
        a = torch.randn(hidden, rank, device="cuda", dtype=dtype) * 0.01
        b = torch.randn(rank, hidden, device="cuda", dtype=dtype) * 0.01
        gate_up_ext, down_t_ext = fuse_weights(w_gate_up, w_down, a, b)
        act_fn = F.silu if act == "silu" else (lambda g: F.gelu(g, approximate="tanh"))
        if args.sweep:
            sweep(hidden, inter, k, gate_up_ext, down_t_ext, act)
        if args.sweep_masked:
            sweep_masked(hidden, inter, rank, gate_up_ext, act, act_fn, args.tokens)
            continue
        for tokens in args.tokens:
            x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
            idx = torch.stack([torch.randperm(inter, device="cuda")[:k].sort().values
                               for _ in range(tokens)]).int()
            keep = torch.zeros(tokens, inter, dtype=torch.uint8, device="cuda").scatter_(1, idx.long(), 1)
            slot = torch.arange(tokens, device="cuda")
            flags = torch.zeros(tokens, dtype=torch.bool, device="cuda")
            stat = torch.zeros(tokens, inter, device="cuda")
            ws = decode_workspace(tokens, hidden, inter, x.device)

            def dense():
                h = x @ w_gate_up.t()
                return (act_fn(h[:, :inter]) * h[:, inter:]) @ w_down.t()

            def gather():
                return caprese_ff(x, gate_up_ext, down_t_ext, inter, idx, keep, slot, flags, flags, stat, ws, act,
                                  gather_max_tokens=tokens)

            def masked():
                return caprese_ff(x, gate_up_ext, down_t_ext, inter, idx, keep, slot, flags, flags, stat, ws, act,
                                  gather_max_tokens=0)

            gather(), masked()  # compile the Triton kernels before capture
            times = {f.__name__: 1e3 * do_bench_cudagraph(f, rep=200) for f in (dense, gather, masked)}
            rows_read = min(tokens * (3 * k + 2 * rank), 3 * inter + 2 * rank)
            floor = 1e6 * rows_read * hidden * 2 / bandwidth
            rows.append((name, rank, tokens, times["dense"], times["gather"], times["masked"], floor))
            print(f"  {name} r={rank} T={tokens}: dense {times['dense']:.1f} us, gather {times['gather']:.1f} us, "
                  f"masked {times['masked']:.1f} us", flush=True)
    print_tables(rows, mapped, source)


def print_tables(rows: list[tuple], mapped: dict, source) -> None:
    """rows: (model, rank, T, dense us, gather us, masked us, floor us) per timed FF layer."""
    from decode_latency import describe_run

    print()
    print("FF layer, one decode step (us)")
    print("| model | rank | T | dense | gather | masked | floor | gather/dense | masked/dense | best/floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, rank, tokens, dense_us, gather_us, masked_us, floor in rows:
        print(f"| {name} | {rank} | {tokens} | {dense_us:.1f} | {gather_us:.1f} | {masked_us:.1f} | {floor:.1f} | "
              f"{gather_us / dense_us:.2f} | {masked_us / dense_us:.2f} | {min(gather_us, masked_us) / floor:.2f} |")
    print()
    print("FF of one whole decode step (us): compressed layers at the faster route, the others dense")
    print("| model | configuration | T | dense | caprese | caprese/dense |")
    print("|---|---|---|---|---|---|")
    for name, m in mapped.items():
        timed = {(rank, tokens): (dense_us, min(gather_us, masked_us))
                 for n, rank, tokens, dense_us, gather_us, masked_us, _ in rows if n == name}
        for tokens in sorted({t for _, t in timed}):
            dense_layer = next(d for (r, t), (d, _) in timed.items() if t == tokens)
            dense_step = dense_layer * m.target.num_layers
            step = sum(timed[(m.ranks[j], tokens)][1] if j in m.ranks else dense_layer
                       for j in range(m.target.num_layers))
            print(f"| {name} | {describe_run(m, source)} | {tokens} | {dense_step:.0f} | {step:.0f} | "
                  f"{step / dense_step:.3f} |")


if __name__ == "__main__":
    main()
