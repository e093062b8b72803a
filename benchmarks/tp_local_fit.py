"""Does fitting for tensor parallelism's local selection pay? Teacher-forced quality under `-tp N
--caprese-tp-selection local` of an adapter fitted for the exact (TP=1) selection and of one fitted for the local
selection (`caprese-distill run --tp-selection local --tp-size N`) on the same data (issue 19 item 1).

    python benchmarks/tp_local_fit.py --exact-run RUNS/exact --local-run RUNS/local [--split heldout_math]

Both runs must be of one model, method, density and layers (the local run's data copied from the exact run, as
benchmarks/pareto.py does). Rows, on the runs' held-out samples (the dense answers, teacher-forced; distill/
evaluate.py's metrics: top-1 agreement with dense and KL(dense || variant) per scored position):
  GRIFFIN exact (TP=1)          the sparse model as -tp 1 (or -tp N exact) serves it, no low-rank path
  exact-fitted, exact           the exact-fitted adapter where it was fitted
  GRIFFIN local (-tp N)         the sparse model under local selection
  exact-fitted, served local    the exact-fitted adapter served at -tp N local (its manifest's selection
                                overridden, as --caprese-tp-selection local does)
  local-fitted, served local    the local-fitted adapter where it was fitted
The local selection runs on one device (reference/sparsifiers.py; equal to the engine's ranks:
tests/test_tensor_parallel.py). Prints a markdown table; --json-out keeps it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from caprese_vllm.adapter import CapreseAdapter
from caprese_vllm.adapter.manifest import TensorParallelInfo


def served_local(adapter: CapreseAdapter, shards: int) -> CapreseAdapter:
    """The adapter as `-tp shards --caprese-tp-selection local` serves it (its tensors unchanged)."""
    manifest = adapter.manifest.model_copy(update={
        "tensor_parallel": TensorParallelInfo(selection="local", size=shards), "integrity": None})
    return CapreseAdapter(manifest=manifest, lowrank_a=adapter.lowrank_a, lowrank_b=adapter.lowrank_b)


def check_comparable(exact: CapreseAdapter, local: CapreseAdapter) -> int:
    """The local run's shard count; ValueError (one line) unless the two adapters differ only in the selection they
    were fitted for (and their tensors)."""
    a, b = exact.manifest, local.manifest
    if b.local_shards == 1:
        raise ValueError("--local-run: its adapter was not fitted for local selection (caprese-distill run "
                         "--tp-selection local --tp-size N)")
    if a.local_shards != 1:
        raise ValueError("--exact-run: its adapter was fitted for local selection; pass an exact-selection run")
    if a.base_model != b.base_model or a.method != b.method or a.lowrank.ranks != b.lowrank.ranks:
        raise ValueError("--exact-run and --local-run differ in base model, method (density, layers) or ranks; "
                         "compare runs that differ only in --tp-selection/--tp-size")
    return b.local_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exact-run", type=Path, required=True, help="a caprese-distill run fitted for exact")
    parser.add_argument("--local-run", type=Path, required=True, help="the same run fitted for local selection")
    parser.add_argument("--split", nargs="+", default=["heldout_math", "heldout_language"])
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    try:
        exact = CapreseAdapter.load(args.exact_run / "adapter")
        local = CapreseAdapter.load(args.local_run / "adapter")
        shards = check_comparable(exact, local)
    except (OSError, ValueError) as err:
        sys.exit(f"tp_local_fit.py: error: {str(err).splitlines()[0]}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from caprese_vllm.adapter import AdapterError
    from distill.data import read_samples
    from distill.generate import split_path
    from distill.pipeline import resolve_model

    splits = {}
    for split in args.split:
        path = split_path(args.local_run, split)
        samples = read_samples(path) if path.exists() else []
        if not samples:
            sys.exit(f"tp_local_fit.py: error: --split {split}: no samples at {path}; pass splits the runs have "
                     "(heldout_math, heldout_language)")
        splits[split] = samples
    try:
        model_dir = resolve_model(run_model(args.local_run))
    except (OSError, ValueError) as err:
        sys.exit(f"tp_local_fit.py: error: --local-run {args.local_run}: {str(err).splitlines()[0]}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    table: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for split, samples in splits.items():
            table.update(compare(model, samples, split, exact, local, shards, pad_id, args.batch_tokens))
    except AdapterError as err:   # the runs' model is not the adapters' (checked against the loaded weights)
        sys.exit(f"tp_local_fit.py: error: {str(err).splitlines()[0]}")
    print_table(table, shards, exact)
    if args.json_out:
        args.json_out.write_text(json.dumps({"shards": shards, "table": table}, indent=2) + "\n")


def run_model(run_dir: Path) -> str:
    """The `model` a caprese-distill run was made with (RUN_DIR/config.json); ValueError (one line) otherwise."""
    try:
        model = json.loads((run_dir / "config.json").read_text()).get("model")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"no readable config.json of a caprese-distill run ({str(err).splitlines()[0]})") from None
    if not isinstance(model, str):
        raise ValueError("its config.json names no model")
    return model


def compare(model, samples, split: str, exact: CapreseAdapter, local: CapreseAdapter, shards: int, pad_id: int,
            batch_tokens: int) -> dict[str, dict[str, dict[str, float]]]:
    """{split title: {variant: {agreement, kl}}}: the module docstring's rows on one split."""
    from distill.evaluate import teacher_forced

    method = exact.manifest.method
    row = {}
    at_tp1 = teacher_forced(model, samples, method, exact, pad_id, batch_tokens, f"{split}: exact")
    row["GRIFFIN exact (TP=1)"], row["exact-fitted, exact"] = at_tp1["sparse"], at_tp1["caprese"]
    served = teacher_forced(model, samples, method, served_local(exact, shards), pad_id, batch_tokens,
                            f"{split}: exact-fitted at -tp {shards} local")
    row[f"GRIFFIN local (-tp {shards})"], row["exact-fitted, served local"] = served["sparse"], served["caprese"]
    fitted = teacher_forced(model, samples, method, local, pad_id, batch_tokens,
                            f"{split}: local-fitted at -tp {shards} local")
    row["local-fitted, served local"] = fitted["caprese"]
    return {f"{split} ({at_tp1['positions']} positions)": row}


def print_table(table: dict, shards: int, exact: CapreseAdapter) -> None:
    method = exact.manifest.method
    print(f"\n### Teacher-forced quality under -tp {shards} local selection: {method.name} density "
          f"{method.density:g} on {len(method.layers)} layers, rank {max(exact.manifest.lowrank.ranks.values())}\n")
    splits = list(table)
    print("| variant | " + " | ".join(f"{s}: agreement / KL" for s in splits) + " |")
    print("|---|" + "---|" * len(splits))
    for name in next(iter(table.values()), {}):
        cells = [f"{table[s][name]['agreement']:.3f} / {table[s][name]['kl']:.4f}" for s in splits]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
