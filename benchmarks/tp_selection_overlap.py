"""How far tensor parallelism's local GRIFFIN selection is from the exact one, on a model's real prompts.

    python benchmarks/tp_selection_overlap.py [--model DIR] [--density 0.5] [--tp 2 4]

For each prompt and compressed layer (the first half, as Caprese compresses), the fraction of the exact
top-k (each token normalised over all I neurons: TP=1's, and -tp's exact mode) that local mode keeps too
(each rank normalises over its own I/tp neurons and keeps its own k/tp: engine/tensor_parallel.py).
Measured on 2 CPU cores (float32, HF transformers, ~1 min), Qwen2.5-Coder-0.5B, density 0.5:
TP=2 mean 0.965 (min 0.911), TP=4 mean 0.951 (min 0.900) over the 4 prompts x 12 layers below.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from caprese_vllm.methods.griffin import griffin_k, griffin_keep, griffin_token_stat
from caprese_vllm.reference.sparsifiers import GriffinSparsifier

PROMPTS = ["Please reason step by step. What is 17 + 25 * 3?",
           ("Please reason step by step. Natalia sold clips to 48 of her friends in April, and then she sold half "
            "as many clips in May. How many clips did Natalia sell altogether in April and May?"),
           "Once upon a time, in a small village,",
           'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n']


def local_keep(z: torch.Tensor, density: float, tp: int) -> torch.Tensor:
    """keep [I]: each of tp shards of z [S, I] keeps its own top-k/tp of its own normalisation (the reference's
    local selection, reference/sparsifiers.py: what caprese-distill --tp-selection local fits on)."""
    sparsifier = GriffinSparsifier(z.shape[-1], density, local_shards=tp)
    sparsifier.observe(z[None], None, torch.ones(1, z.shape[0], dtype=torch.bool))
    return sparsifier.keep_mask(torch.empty(1, 1, z.shape[-1]))[0, 0]


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(Path.home() / ".cache/caprese/models/qwen2.5-coder-0.5b"))
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    layers = list(range(model.config.num_hidden_layers // 2))
    captured: dict[int, torch.Tensor] = {}
    for i in layers:  # down_proj's input is z = act(gate) * up, [1, S, I]
        model.model.layers[i].mlp.down_proj.register_forward_hook(
            lambda m, inp, out, i=i: captured.__setitem__(i, inp[0][0].detach()))
    k = griffin_k(model.config.intermediate_size, args.density)
    overlaps: dict[int, list[float]] = {tp: [] for tp in args.tp}
    for prompt in PROMPTS:
        with torch.no_grad():
            model(**tok(prompt, return_tensors="pt"))
        for i in layers:
            exact = griffin_keep(griffin_token_stat(captured[i]).sum(0), k)
            for tp in args.tp:
                overlaps[tp].append(float((exact & local_keep(captured[i], args.density, tp)).sum()) / k)
    for tp, values in overlaps.items():
        t = torch.tensor(values)
        print(f"TP={tp}: local vs exact selection overlap, {len(PROMPTS)} prompts x {len(layers)} layers, density "
              f"{args.density:g}: mean {t.mean():.4f}, min {t.min():.4f}, max {t.max():.4f}")


if __name__ == "__main__":
    main()
