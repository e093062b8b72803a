"""`caprese-distill`: produce a Caprese adapter for a base model, and the report that judges it.

    caprese-distill run      --model smollm2-135m --run-dir runs/smol --num-samples 300
    caprese-distill run      --preset smollm2-135m        # the default adapter (CPU, ~20 min)
    caprese-distill run      --preset gsm8k-paper --model DIR --run-dir runs/x \
        --questions gsm8k/train.jsonl --gsm8k gsm8k/train.jsonl   # the paper's recipe, GSM8K dev score
    caprese-distill generate ...   # step 1 only: the dense model answers the prompts (vLLM)
    caprese-distill fit ...        # step 2 only: fit the low-rank paths -> RUN_DIR/adapter
    caprese-distill evaluate ...   # step 3 only: RUN_DIR/report.{json,md,png}

Settings come from `--config FILE.yaml` (fields of distill.config.DistillConfig) with flags on top.
Every step resumes: rerunning the same command continues where an interrupted one stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distill.config import DistillConfig

# flag -> dotted config field
_FLAGS = {
    "model": "model", "run_dir": "run_dir", "method": "method", "density": "density", "rank": "rank",
    "seed": "seed", "device": "device", "dtype": "dtype", "num_samples": "data.num_samples",
    "heldout_math": "data.heldout_math", "heldout_language": "data.heldout_language",
    "max_new_tokens": "data.max_new_tokens", "refine": "fit.refine", "e2e_epochs": "fit.e2e_epochs",
    "e2e_lr": "fit.e2e_lr", "e2e_loss": "fit.e2e_loss", "e2e_batch_tokens": "fit.e2e_batch_tokens",
    "questions": "data.questions", "questions_range": "data.questions_range", "gsm8k": "eval.gsm8k",
    "gsm8k_range": "eval.gsm8k_range", "gsm8k_max_new_tokens": "eval.gsm8k_max_new_tokens",
    "tp_selection": "tp_selection", "tp_size": "tp_size",
}


def _add_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file with settings (flags override it)")
    from distill.presets import preset_names

    parser.add_argument("--preset", choices=preset_names(), metavar="PRESET",
                        help=f"ready-made settings ({', '.join(preset_names())}; gsm8k-paper: the paper's recipe for "
                        "any --model); run dir defaults to ~/.cache/caprese/runs/PRESET")
    parser.add_argument("--model", help="HF checkpoint directory or a caprese-models name (smollm2-135m, ...)")
    parser.add_argument("--speed", type=Path, help="evaluate only: the --json-out of benchmarks/decode_latency.py "
                        "--adapter-config RUN_DIR/adapter (GPU, dummy weights at 8B/9B shapes); the report then "
                        "carries this adapter's speed line")
    parser.add_argument("--run-dir", help="where everything is written (resumable)")
    parser.add_argument("--method", choices=["griffin", "cats"])
    parser.add_argument("--density", type=float)
    parser.add_argument("--rank", type=int, help="default: ~1%% extra parameters")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available; checked before "
                        "anything runs)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--tp-selection", type=str.lower, choices=["exact", "local"],
                        help="GRIFFIN selection to fit for: exact (default; serves at any -tp) or local "
                        "(per-shard top-k of `vllm serve -tp N --caprese-tp-selection local`; needs --tp-size N; "
                        "evaluated at -tp N)")
    parser.add_argument("--tp-size", type=int, help="with --tp-selection local: the -tp it will be served at")
    parser.add_argument("--num-samples", type=int, help="training samples (default 20000, as in the paper)")
    parser.add_argument("--heldout-math", type=int)
    parser.add_argument("--heldout-language", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--refine", choices=["none", "layerwise", "e2e"])
    parser.add_argument("--e2e-epochs", type=int)
    parser.add_argument("--e2e-lr", type=float)
    parser.add_argument("--e2e-loss", choices=["hidden_mse", "kl", "hidden_mse+kl"])
    parser.add_argument("--e2e-batch-tokens", type=int)
    parser.add_argument("--questions", help="training prompts from this GSM8K-format JSONL (`question` per line), "
                        "prefixed 'Please reason step by step.', cycled to --num-samples (default: templated math)")
    parser.add_argument("--questions-range", help="python slice of its lines, e.g. ':-1000' (default ':'; needs "
                        "--questions)")
    parser.add_argument("--gsm8k", help="GSM8K-format JSONL (`question`, `answer` ending in '#### N'): held-out "
                        "split scored by exact-answer accuracy, length, truncation")
    parser.add_argument("--gsm8k-range", help="python slice of its lines, e.g. '-1000:' (default ':'); must not "
                        "overlap --questions-range when both name one file; needs --gsm8k")
    parser.add_argument("--gsm8k-max-new-tokens", type=int, help="longest GSM8K answer (default 512; needs --gsm8k)")


_RANGE_FLAGS = ("--questions-range", "--gsm8k-range")
# every option of the subcommands takes a value
_VALUE_FLAGS = frozenset(("--config", "--preset", "--speed", *("--" + flag.replace("_", "-") for flag in _FLAGS)))


def glue_range_values(argv: list[str]) -> list[str]:
    """`--gsm8k-range -1000:` -> `--gsm8k-range=-1000:`: argparse takes a value starting with "-" (a slice
    from the end) for an unknown option and stops with "expected one argument". A word starting with "--"
    is never glued: it is the next flag (refuse_flags_as_values)."""
    out = []
    for arg in argv:
        if out and out[-1] in _RANGE_FLAGS and arg.startswith("-") and not arg.startswith("--"):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def refuse_flags_as_values(argv: list[str]) -> None:
    """A value that starts with "--", given to any option (`--gsm8k-range --e2e-epochs 2`: the range was
    forgotten, or `--e2e-lr=--seed`), is the next flag, never a setting: ConfigError naming both."""
    from distill.config import ConfigError

    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name not in _VALUE_FLAGS or not (eq or i + 1 < len(argv)):
            continue  # a missing last value is argparse's "expected one argument"
        value = value if eq else argv[i + 1]
        if value.startswith("--"):
            raise ConfigError(f"{name} needs a value, got {value!r}: write {name} VALUE (was its value "
                              "forgotten?)")


def step_to_run_first(config: DistillConfig, command: str) -> tuple[str, Path] | None:
    """(the step to run first, the missing file) when `command` cannot run yet on config.run_dir, else None.
    `fit` needs the data step's splits (data/{train,heldout_math,heldout_language}.jsonl, each written last, by
    rename: present means complete); `evaluate` also needs the fit step's adapter/caprese.json and
    fit/fit.json. Checked before the run directory is touched: a refused step writes nothing, so it does
    not pin its settings (config.json) either."""
    from distill.generate import split_path

    if command not in ("fit", "evaluate"):
        return None
    splits = ["train", "heldout_math"] + (["heldout_language"] if config.data.heldout_language else [])
    for name in splits:
        if not split_path(config.run_dir, name).exists():
            return "generate", split_path(config.run_dir, name)
    if command == "evaluate":
        for path in (config.run_dir / "adapter" / "caprese.json", config.run_dir / "fit" / "fit.json"):
            if not path.exists():
                return "fit", path
    return None


def check_speed_file(speed: Path, run_dir: Path) -> None:
    """Refuse --speed up front unless the file was measured for the adapter in RUN_DIR/adapter
    (distill.speed.load_speed_result). Raises AdapterError (one line)."""
    from caprese_vllm.adapter.checkpoint import load_manifest
    from distill.speed import load_speed_result

    load_speed_result(speed, load_manifest(run_dir / "adapter"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caprese-distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in (("run", "all steps"), ("generate", "step 1: data"), ("fit", "step 2: adapter"),
                            ("evaluate", "step 3: report")):
        _add_settings(sub.add_parser(name, help=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    from distill.config import DistillError, load_config

    argv = sys.argv[1:] if argv is None else argv
    try:
        refuse_flags_as_values(argv)
    except DistillError as err:
        print(f"caprese-distill: error: {err}", file=sys.stderr)
        return 1
    parser = build_parser()
    args = parser.parse_args(glue_range_values(argv))
    if args.command is None:
        parser.print_help()
        return 2
    from caprese_vllm.adapter import AdapterError

    overrides = {field: getattr(args, flag) for flag, field in _FLAGS.items()}
    try:
        config_file = args.config
        if args.preset:
            from distill.presets import default_run_dir, preset_path

            if args.config:
                raise DistillError("pass either --preset or --config, not both")
            config_file = preset_path(args.preset)
            overrides["run_dir"] = overrides["run_dir"] or str(default_run_dir(args.preset))
        config = load_config(config_file, overrides)
        if args.speed is not None and args.command != "evaluate":
            raise DistillError(f"--speed applies to `caprese-distill evaluate` (the speed of the adapter a finished "
                               f"run made), not `{args.command}`: run `{args.command}` first, then `evaluate "
                               "--speed FILE`")
        first = step_to_run_first(config, args.command)
        if first is not None:
            raise DistillError(f"{args.command}: {first[1]} does not exist yet; run `caprese-distill {first[0]}` "
                               "with the same settings first (or `caprese-distill run` for every step)")
        if args.speed is not None:
            check_speed_file(args.speed, config.run_dir)
        from distill.pipeline import Pipeline

        pipeline = Pipeline(config)
        if args.command in ("run", "generate"):
            counts = pipeline.generate()
            print("data: " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
        if args.command in ("run", "fit"):
            adapter = pipeline.fit()
            print(f"fit: adapter written to {config.run_dir / 'adapter'} ({adapter.manifest.extra_params() / 1e6:.2f}M "
                  "low-rank parameters)", flush=True)
        if args.command in ("run", "evaluate"):
            report = pipeline.evaluate(speed=args.speed)
            print((config.run_dir / "report.md").read_text(), flush=True)
            if args.command == "run":
                from distill.report import step_times

                times = step_times(report)
                print("time per step (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
                      + f"; total {sum(times.values()):.0f}", flush=True)
    except (DistillError, AdapterError, FileNotFoundError) as err:
        print(f"caprese-distill: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # the run directory is a file, sits under one, or cannot be written
        print(f"caprese-distill: error: {err.filename or ''}: {err.strerror or err}; pass a --run-dir that is "
              "a writable directory (or a path where one can be made)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
