"""`report.json`, `report.md` and `report.png` from the evaluation and fit results."""

from __future__ import annotations

import json
import os
from pathlib import Path

from distill.config import write_atomic
from distill.evaluate import VARIANTS


def gap_recovered(dense: float, sparse: float, caprese: float) -> float | None:
    """Fraction of the dense-vs-sparse gap that Caprese closes (None when there is no gap)."""
    gap = dense - sparse
    return None if abs(gap) < 1e-12 else (caprese - sparse) / gap


def active_params(total: int, hidden: int, intermediate: int, ranks: dict[int, int], density: float) -> dict:
    """Parameters read per decode token: dense, and with the compressed layers' FF (k neurons) + low-rank."""
    k = int(intermediate * density)
    dropped = sum(3 * hidden * (intermediate - k) for _ in ranks)
    added = sum(2 * hidden * r for r in ranks.values())
    return {"dense": total, "sparse": total - dropped, "caprese": total - dropped + added, "lowrank": added}


SPLITS = ("gsm8k", "math", "language")  # held-out splits, in report order
METRICS = ("accuracy", "length", "truncation", "agreement", "kl")  # per split: free generation, teacher-forced
HEADLINE = ("gsm8k_accuracy", "math_agreement", "math_accuracy", "gsm8k_agreement", "language_agreement")


def build_report(meta: dict, evaluation: dict, fit: dict) -> dict:
    """report.json: meta + results {variant: {SPLIT_METRIC: value}} + gap_recovered {SPLIT_METRIC: fraction}
    (HEADLINE metrics; for KL the fraction of the sparse model's KL removed) + fit."""
    tf, gen = evaluation["teacher_forced"], evaluation["generation"]
    rows = {}
    for variant in VARIANTS:
        row = {}
        for split in SPLITS:
            if split in tf:
                row[f"{split}_agreement"] = tf[split][variant]["agreement"]
                row[f"{split}_kl"] = tf[split][variant]["kl"]
            for metric in ("accuracy", "length", "truncation"):
                if metric in gen[variant].get(split, {}):
                    row[f"{split}_{metric}"] = gen[variant][split][metric]
        rows[variant] = row
    headline = {}
    for metric in HEADLINE:
        if all(metric in rows[v] for v in VARIANTS):
            headline[metric] = gap_recovered(*(rows[v][metric] for v in VARIANTS))
    for metric in (f"{split}_kl" for split in SPLITS):
        if metric in rows["sparse"] and rows["sparse"][metric] > 0:
            headline[metric] = 1 - rows["caprese"][metric] / rows["sparse"][metric]
    return {**meta, "results": rows, "gap_recovered": headline, "fit": fit}


def _fmt(value, column: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):  # lengths are token counts: one decimal
        return f"{value:.1f}" if column.endswith("length") or abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def step_times(report: dict) -> dict[str, float]:
    """Seconds per step: generate, capture, closed form, refine, evaluate (timings.json + fit.json; a step
    resumed later counts the time of every attempt; fit.json's part times are its last fit's)."""
    timings, fit = report["timings"], report["fit"].get("timings", {})
    steps = {"generate": timings.get("generate_s"), "capture": fit.get("capture_s"),
             "closed form": fit.get("closed_form_s"), "refine": fit.get("refine_s"),
             "evaluate": timings.get("evaluate_s")}
    return {name: seconds for name, seconds in steps.items() if seconds is not None}


def render_markdown(report: dict) -> str:
    rows = report["results"]
    params = report["active_params"]
    names = {"dense": "dense", "sparse": report["method"], "caprese": f"{report['method']} + Caprese"}
    heldout = ", ".join(f"{n} {k}" for k, n in report["num_heldout"].items() if n)
    lines = [
        f"# Caprese distillation report: {report['model']}",
        "",
        f"Method {report['method']} at density {report['density']} on layers {report['layers']}, rank "
        f"{report['rank']}; {report['num_train_samples']} training samples; held-out prompts: {heldout}.",
        f"Parameters per decode token: dense {params['dense'] / 1e6:.2f}M, {report['method']} "
        f"{params['sparse'] / 1e6:.2f}M, Caprese {params['caprese'] / 1e6:.2f}M (low-rank paths "
        f"{params['lowrank'] / 1e6:.2f}M = {100 * params['lowrank'] / params['dense']:.2f}% of the model).",
        *report.get("speed", []),
        "",
        "Accuracy / length / truncation: greedy generation served by vLLM (length in tokens, end token "
        "excluded; truncation: the fraction of answers stopped by the length limit). Agreement / KL: "
        "teacher-forced on the dense model's greedy answers (compressed positions only).",
    ]
    for split in SPLITS:
        columns = [m for m in METRICS if f"{split}_{m}" in rows["dense"]]
        if not columns:
            continue
        lines += ["", f"**{split}**", "", "| variant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for variant in VARIANTS:
            lines.append(f"| {names[variant]} | " + " | ".join(_fmt(rows[variant].get(f"{split}_{m}"), m)
                                                              for m in columns) + " |")
    lines += ["", "**Gap recovered by Caprese** (fraction of the dense-vs-sparse gap closed; for KL: the "
              "fraction of the sparse model's KL removed):", ""]
    for metric, value in report["gap_recovered"].items():
        lines.append(f"- {metric}: {_fmt(value)}")
    errors = report["fit"]["relative_error"]["heldout"]
    lines += ["", "Per-layer relative FF error |FF - FF_hat| / |FF| on held-out math (dense inputs):", "",
              "| layer | sparse | closed form | final |", "|---|---|---|---|"]
    for layer in errors["sparse"]:
        lines.append(f"| {layer} | {errors['sparse'][layer]:.4f} | {errors['stage1'][layer]:.4f} | "
                     f"{errors['final'][layer]:.4f} |")
    lines += ["", "Time per step (s): " + ", ".join(f"{k} {v:.0f}" for k, v in step_times(report).items()), ""]
    return "\n".join(lines)


def render_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    metrics = [m for m in ("gsm8k_accuracy", "gsm8k_truncation", "math_agreement", "math_accuracy",
                           "language_agreement") if m in rows["dense"]]
    width = 0.8 / len(VARIANTS)
    for i, variant in enumerate(VARIANTS):
        values = [rows[variant].get(m, float("nan")) for m in metrics]  # NaN: no bar (not measured)
        left.bar([j + i * width for j in range(len(metrics))], values, width,
                 label=variant if variant != "sparse" else report["method"])
    left.set_xticks([j + width for j in range(len(metrics))], metrics, rotation=15, fontsize=8)
    left.set_ylim(0, 1.05)
    left.set_title(f"{report['model']}: held-out scores")
    left.legend()
    errors = report["fit"]["relative_error"]["heldout"]
    layers = [int(x) for x in errors["sparse"]]
    for key, label in (("sparse", report["method"]), ("stage1", "closed form"), ("final", "final")):
        right.plot(layers, list(errors[key].values()), marker="o", label=label)
    right.set_xlabel("layer")
    right.set_ylabel("|FF - FF_hat| / |FF| (held-out)")
    right.set_title("per-layer FF error")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out_dir: Path) -> None:
    png = out_dir / f".report.{os.getpid()}.png"  # atomic like the others: drawn aside, then renamed
    render_plot(report, png)
    png.replace(out_dir / "report.png")
    write_atomic(out_dir / "report.md", render_markdown(report))
    write_atomic(out_dir / "report.json", json.dumps(report, indent=2) + "\n")  # last: the step is done
