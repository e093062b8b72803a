"""How many FF rows a decode batch of GRIFFIN requests needs: the union of their neuron sets, on real prompts.

A batch of B requests decoding together, each keeping its own k = density x I neurons (GRIFFIN selects per
request from its prompt), can at best read the union of the B sets in a compressed layer; the masked route
(`masked_gate_up`, kernels/decode_mlp.py) reads every row. This measures that union on a real checkpoint
and real prompts (GSM8K questions with the recipe's prompt), so the batch-8 target of issue 18 can be
judged against what any union-reading kernel could save:

    union(B) = |idx_1 U ... U idx_B| / I        averaged over random groups of B prompts, per layer

Runs anywhere (PyTorch reference, float32 on CPU: selection only, no timing). Prints one markdown table:
per batch size, the mean union over the chosen layers, its range over layers, and the FF weight share a
union-reading route would skip (1 - union), next to the masked route's 0.

    python benchmarks/selection_union.py --model ~/.cache/caprese/models/qwen2.5-coder-0.5b \
        --gsm8k ../shared/data/gsm8k/train.jsonl --prompts 64 --batch-sizes 1 2 4 8 16 32
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from caprese_vllm.methods import griffin_accumulate, griffin_k, griffin_select  # noqa: E402
from distill.data import prompt_ids_for  # noqa: E402
from distill.pipeline import resolve_model  # noqa: E402
from distill.problems import read_question_file  # noqa: E402


def neuron_sets(model, tokenizer, questions: list[str], density: float) -> torch.Tensor:
    """GRIFFIN's kept neurons for each prompt and layer: a bool tensor [prompts, layers, I]."""
    layers = model.model.layers
    inter = model.config.intermediate_size
    k = griffin_k(inter, density)
    stat_sq = torch.zeros(len(layers), inter, dtype=torch.float32)

    def hook(layer_idx):
        def pre(_module, args):  # down_proj's input: z = act(gate) * up, [1, S, I]
            griffin_accumulate(stat_sq[layer_idx:layer_idx + 1], args[0].float(),
                               torch.ones(args[0].shape[:2], dtype=torch.bool))
        return pre

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    keep = torch.zeros(len(questions), len(layers), inter, dtype=torch.bool)
    try:
        for n, question in enumerate(tqdm(questions, desc="prefill", unit="prompt")):
            stat_sq.zero_()
            ids = torch.tensor([prompt_ids_for(tokenizer, question)])
            with torch.no_grad():
                model(input_ids=ids)
            keep[n].scatter_(1, griffin_select(stat_sq, k), True)  # neuron_idx [layers, k]
    finally:
        for h in handles:
            h.remove()
    return keep


def layer_set(spec: str, num_layers: int) -> list[int]:
    """first-half | all | A-B (inclusive) -> layer indices."""
    if spec == "first-half":
        return list(range(num_layers // 2))
    if spec == "all":
        return list(range(num_layers))
    lo, _, hi = spec.partition("-")
    if not (lo.isdigit() and hi.isdigit() and int(lo) <= int(hi) < num_layers):
        raise SystemExit(f"--layers {spec}: expected first-half, all or A-B with 0 <= A <= B < {num_layers}")
    return list(range(int(lo), int(hi) + 1))


def union_table(keep: torch.Tensor, layers: list[int], batch_sizes: list[int], groups: int, seed: int) -> str:
    rng = random.Random(seed)
    n = keep.shape[0]
    rows = ["| batch | union of neuron sets / I (mean over layers) | min / max over layers | rows a union route skips |",
            "|---|---|---|---|"]
    for b in batch_sizes:
        if b > n:
            continue
        per_layer = torch.zeros(len(layers))
        for _ in range(groups):
            members = rng.sample(range(n), b)
            per_layer += keep[members][:, layers].any(0).float().mean(-1)
        per_layer /= groups
        mean = per_layer.mean().item()
        rows.append(f"| {b} | {mean:.3f} | {per_layer.min().item():.3f} / {per_layer.max().item():.3f} | "
                    f"{1 - mean:.3f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF checkpoint directory or a caprese-models name")
    parser.add_argument("--gsm8k", type=Path, required=True, help="GSM8K-format JSON lines")
    parser.add_argument("--range", default="-1000:", help="python slice of its lines (default: the dev slice)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--layers", nargs="+", default=["first-half", "all"],
                        help="one table per layer set: first-half | all | A-B")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--groups", type=int, default=200, help="random groups per batch size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    problems = read_question_file(args.gsm8k, args.range, "--gsm8k", need_answers=False)
    problems = random.Random(args.seed).sample(problems, min(args.prompts, len(problems)))
    keep = neuron_sets(model, tokenizer, [p.question for p in problems], args.density)
    num_layers = keep.shape[1]
    for spec in args.layers:
        layers = layer_set(spec, num_layers)
        print(f"\n{model_dir.name}: GRIFFIN density {args.density}, layers {layers[0]}-{layers[-1]} of {num_layers}, "
              f"{len(problems)} GSM8K prompts ({args.gsm8k.name} [{args.range}]), {args.groups} random groups per "
              "batch\n")
        print(union_table(keep, layers, args.batch_sizes, args.groups, args.seed))

if __name__ == "__main__":
    main()
