"""`report.json`, `report.md` and `report.png` from the evaluation and fit results."""

from __future__ import annotations

import json
from pathlib import Path

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


def build_report(meta: dict, evaluation: dict, fit: dict) -> dict:
    tf, gen = evaluation["teacher_forced"], evaluation["generation"]
    rows = {}
    for variant in VARIANTS:
        row = {}
        for split in ("math", "language"):
            if split in tf:
                row[f"{split}_agreement"] = tf[split][variant]["agreement"]
                row[f"{split}_kl"] = tf[split][variant]["kl"]
            if split in gen[variant]:
                row[f"{split}_length"] = gen[variant][split]["length"]
                if "accuracy" in gen[variant][split]:
                    row[f"{split}_accuracy"] = gen[variant][split]["accuracy"]
        rows[variant] = row
    headline = {}
    for metric in ("math_agreement", "math_accuracy", "language_agreement"):
        if metric in rows["dense"]:
            headline[metric] = gap_recovered(*(rows[v][metric] for v in VARIANTS))
    for metric in ("math_kl", "language_kl"):
        if metric in rows["sparse"] and rows["sparse"][metric] > 0:
            headline[metric] = 1 - rows["caprese"][metric] / rows["sparse"][metric]
    return {**meta, "results": rows, "gap_recovered": headline, "fit": fit}


def _fmt(value, column: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):  # lengths are token counts: one decimal
        return f"{value:.1f}" if column.endswith("_length") or abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def render_markdown(report: dict) -> str:
    rows = report["results"]
    columns = [c for c in ("math_agreement", "math_kl", "math_accuracy", "math_length", "language_agreement",
                           "language_kl", "language_length") if c in rows["dense"]]
    params = report["active_params"]
    lines = [
        f"# Caprese distillation report: {report['model']}",
        "",
        f"Method {report['method']} at density {report['density']} on layers {report['layers']}, rank "
        f"{report['rank']}; {report['num_train_samples']} training samples; held-out: "
        f"{report['num_heldout']['math']} math, {report['num_heldout'].get('language', 0)} language prompts.",
        f"Parameters per decode token: dense {params['dense'] / 1e6:.2f}M, {report['method']} "
        f"{params['sparse'] / 1e6:.2f}M, Caprese {params['caprese'] / 1e6:.2f}M (low-rank paths "
        f"{params['lowrank'] / 1e6:.2f}M = {100 * params['lowrank'] / params['dense']:.2f}% of the model).",
        "",
        "Agreement / KL: teacher-forced on the dense model's greedy answers (compressed positions only). "
        "Accuracy / length: greedy generation (length in tokens).",
        "",
        "| variant | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    names = {"dense": "dense", "sparse": report["method"], "caprese": f"{report['method']} + Caprese"}
    for variant in VARIANTS:
        lines.append(f"| {names[variant]} | " + " | ".join(_fmt(rows[variant].get(c), c) for c in columns) + " |")
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
    timings = report["timings"]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    return "\n".join(lines)


def render_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    metrics = [m for m in ("math_agreement", "math_accuracy", "language_agreement") if m in rows["dense"]]
    width = 0.8 / len(VARIANTS)
    for i, variant in enumerate(VARIANTS):
        left.bar([j + i * width for j in range(len(metrics))], [rows[variant][m] for m in metrics], width,
                 label=variant if variant != "sparse" else report["method"])
    left.set_xticks([j + width for j in range(len(metrics))], metrics)
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
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(render_markdown(report))
    render_plot(report, out_dir / "report.png")
