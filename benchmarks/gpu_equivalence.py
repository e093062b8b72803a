"""On a GPU: do the Triton kernels give the same greedy tokens as the portable PyTorch path?

    python benchmarks/gpu_equivalence.py --model-dir DIR --adapter DIR [--max-tokens 48]

Three vLLM runs of the same prompts (each a user turn of the chat template; float32, torch.compile +
CUDA graphs as served, max_tokens tokens each: EOS ignored, so every prompt compares the whole
length), each in its own process:
  portable          caprese_kernels "off": dense FF + masks + x A B in PyTorch (the CPU plugin's path,
                    tested token-for-token against the reference implementation)
  kernels, batched  the Triton kernels; 8 requests per step -> the masked route
  kernels, alone    the Triton kernels; max_num_seqs=1 -> the gather route (batch-1 decode)
Prints one row per prompt and exits non-zero if any run differs from the portable one.

Every run sets TRITON_F32_DEFAULT=ieee. vLLM's float32 attention on CUDA (TRITON_ATTN) calls tl.dot
with Triton's default precision, TF32 (10-bit mantissa): a last-bit difference in a layer's output
moves some attention inputs across a TF32 rounding step, and the next logits by ~1e-4. Measured with
TF32 attention: chosen-token logprobs 1e-3 apart on average after a few steps and two near-ties
(0.00014 and 0.01 nats) decided the other way, which says nothing about the FF kernels under test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = [
    "Please reason step by step. What is 17 + 25 * 3?",
    "Please reason step by step. Tom buys 4 books at $7 each and pays with $50. How much change does he get?",
    "The capital of France is",
    "Please reason step by step. What is the remainder when 1234 is divided by 7?",
    "Write a short poem about the sea.",
    "Please reason step by step. A train travels 60 km per hour for 3 hours. How far does it go?",
    "Once upon a time",
    "Please reason step by step. How many positive divisors does 36 have?",
]
GENERATE = Path(__file__).resolve().parent.parent / "tests" / "vllm_generate.py"


def run(model_dir: str, adapter: str, max_tokens: int, kernels: bool, alone: bool, out_dir: Path,
        eager: bool = False, env_extra: dict | None = None, no_graphs: bool = False) -> list[dict]:
    tag = f"{'kernels' if kernels else 'portable'}-{'alone' if alone else 'batched'}{'-eager' if eager else ''}"
    tag += "-nographs" if no_graphs else ""
    tag += "".join(f"-{k}={v}" for k, v in (env_extra or {}).items())
    out = out_dir / f"{tag}.json"
    config = {"caprese_adapter": adapter, "caprese_check_fingerprint": False,
              "caprese_kernels": "on" if kernels else "off"}
    cmd = [sys.executable, str(GENERATE), "--model", model_dir, "--prompts-json", json.dumps(PROMPTS), "--chat",
           "--max-tokens", str(max_tokens), "--ignore-eos", "--dtype", "float32", "--out", str(out), "--logprobs", "2",
           "--enforce-eager",
           "1" if eager else "0",
           "--additional-config", json.dumps(config)]
    if alone:
        cmd += ["--max-num-seqs", "1"]
    if no_graphs:
        cmd += ["--compilation-config", json.dumps({"cudagraph_mode": "NONE"})]
    env = {**os.environ, "TRITON_F32_DEFAULT": "ieee", **(env_extra or {})}  # float32 attention (docstring)
    log = out_dir / f"{tag}.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        print(log.read_text()[-3000:])
        raise SystemExit(f"{tag}: vLLM failed (exit {proc.returncode})")
    text = log.read_text()
    if kernels and "caprese: GPU kernels on" not in text:
        raise SystemExit(f"{tag}: the GPU kernels were not used (no 'caprese: GPU kernels on' in the log)")
    if not kernels and "caprese: GPU kernels on" in text:
        raise SystemExit(f"{tag}: caprese_kernels=off did not keep the portable path")
    return json.loads(out.read_text())  # per prompt: token_ids, and each step's top-2 logprobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--diagnose", action="store_true", help="also: kernels eager, kernels with the masked "
                        "route only, and the gather route for up to 8 tokens")
    args = parser.parse_args()
    out_dir = Path(tempfile.mkdtemp(prefix="caprese-equivalence-"))
    portable = run(args.model_dir, args.adapter, args.max_tokens, kernels=False, alone=False, out_dir=out_dir)
    batched = run(args.model_dir, args.adapter, args.max_tokens, kernels=True, alone=False, out_dir=out_dir)
    alone = run(args.model_dir, args.adapter, args.max_tokens, kernels=True, alone=True, out_dir=out_dir)
    if args.diagnose:
        for name, kernels, kwargs in (("portable eager", False, {"eager": True}),
                                      ("portable compiled, no graphs", False, {"no_graphs": True}),
                                      ("kernels eager", True, {"eager": True}),
                                      ("kernels compiled, no graphs", True, {"no_graphs": True})):
            got = run(args.model_dir, args.adapter, args.max_tokens, kernels=kernels, alone=False, out_dir=out_dir,
                      **kwargs)
            print(f"diagnose: {name} vs portable compiled+graphs: "
                  + ", ".join(agree(a, b) for a, b in zip(portable, got)), flush=True)

    print("| prompt | kernels, batched (masked route) | kernels, alone (gather route) |")
    print("|---|---|---|")
    for i, prompt in enumerate(PROMPTS):
        print(f"| {prompt[:48]!r} | {agree(portable[i], batched[i])} | {agree(portable[i], alone[i])} |")
    same = [o["token_ids"] for o in portable] == [o["token_ids"] for o in batched] == [o["token_ids"] for o in alone]
    print(f"\ngreedy tokens of the GPU kernels equal the portable PyTorch path: {'YES' if same else 'NO'}")
    sys.exit(0 if same else 1)


def agree(ref: dict, got: dict) -> str:
    """'same (N tokens)', or where the tokens part and the reference's top-2 logprob margin there (a
    margin of a few 1e-5 nats is a near-tie that float32 summation order decides either way); then the
    largest difference of the chosen token's logprob over the steps before any parting."""
    a, b = ref["token_ids"], got["token_ids"]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    shared = min(first, len(ref["logprobs"]), len(got["logprobs"]))
    drift = max((abs(ref["logprobs"][i][0][1] - got["logprobs"][i][0][1]) for i in range(shared)), default=0.0)
    if a == b:
        return f"same ({len(a)} tokens), max logprob diff {drift:.1e}"
    top2 = ref["logprobs"][first] if first < len(ref["logprobs"]) else []
    margin = f", reference top-2 margin {top2[0][1] - top2[1][1]:.2g} nats" if len(top2) > 1 else ""
    return f"DIFFERS at token {first}{margin}, max logprob diff before {drift:.1e}"


if __name__ == "__main__":
    main()
