"""The accuracy/speed front of Caprese configurations (issue 18 item 2): distil each point, measure its speed
at 8B/9B shapes, tabulate GSM8K gap recovered against TTNT and parameters per decode token.

    # GPU host: every point distilled from one base run's data (no second generation), then its speed
    python benchmarks/pareto.py run --points points.yaml --base-run RUNS/base --out RUNS/sweep \
        --model qwen2.5-coder-0.5b --questions gsm8k/train.jsonl --gsm8k gsm8k/train.jsonl [--speed-model llama-3.1-8b]
    # anywhere: the table (markdown) and the PNG from finished run directories
    python benchmarks/pareto.py table RUNS/base RUNS/sweep/* --out benchmarks/results/pareto-qwen05

points.yaml, a list of points; any field left out keeps the preset's (gsm8k-paper) value:
    - name: first-half-d0.5
      layers: first-half         # first-half | all | "0-11" | "0-5,18-23" | least-sensitive:N
      density: 0.5
      rank: 288                  # omitted: ~1% extra parameters
      e2e_epochs: 2
      e2e_samples: 5000          # end-to-end epochs on a seeded subset (data size)
`least-sensitive:N` compresses the N layers whose GRIFFIN FF error (report.json fit.relative_error.heldout
.sparse: |FF - FF_sparse| / |FF| on held-out math, dense inputs) is smallest in the --sensitivity-run (a run
that compressed every layer): a per-layer choice from measured sensitivity.

The table: one row per run directory, the Pareto front marked (no other point recovers more of the gap with
a TTNT ratio at batch 1 no higher); TTNT ratios come from RUN/speed.json (decode_latency.py
--adapter-config), missing ones are shown as "-" and such points are not on the front.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distill.speed import layer_spans, target_shape_names

REPO = Path(__file__).resolve().parent.parent
PRESET = REPO / "distill" / "presets" / "gsm8k-paper.yaml"


class Point(BaseModel):
    """One configuration of the sweep (points.yaml)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="its run directory's name under --out")
    layers: str = "first-half"
    density: float | None = Field(None, gt=0, lt=1)
    rank: int | None = Field(None, gt=0)
    e2e_epochs: int | None = Field(None, gt=0)
    e2e_samples: int | None = Field(None, gt=0)
    tp_local: int | None = Field(None, ge=2, description="fit for `-tp N --caprese-tp-selection local` "
                                 "(caprese-distill --tp-selection local --tp-size N; evaluated at -tp N)")


def resolve_layers(spec: str, num_layers: int, sensitivity_run: Path | None = None) -> list[int]:
    """The compressed layers of a point: 'first-half', 'all', 'A-B[,C-D...]' or 'least-sensitive:N'.
    Raises ValueError (one line) for anything else, an out-of-range layer, or a missing sensitivity run."""
    if spec == "first-half":
        return list(range(num_layers // 2))
    if spec == "all":
        return list(range(num_layers))
    if spec.startswith("least-sensitive:"):
        n = spec.split(":", 1)[1]
        if not n.isdigit() or not 0 < int(n) <= num_layers:
            raise ValueError(f"layers {spec!r}: N must be a whole number in [1, {num_layers}]")
        report = (sensitivity_run / "report.json") if sensitivity_run else None
        if report is None or not report.exists():
            raise ValueError(f"layers {spec!r} needs --sensitivity-run RUN_DIR (a finished run on every layer)")
        try:
            errors = json.loads(report.read_text())["fit"]["relative_error"]["heldout"]["sparse"]
            sparse = {int(layer): float(err) for layer, err in errors.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"layers {spec!r}: {report} has no fit.relative_error.heldout.sparse per layer (a "
                             "caprese-distill report.json)") from None
        if sorted(sparse) != list(range(num_layers)):
            raise ValueError(f"layers {spec!r}: {report} measured {len(sparse)} of {num_layers} layers (it must "
                             "compress every layer)")
        return sorted(sorted(sparse, key=lambda layer: (sparse[layer], layer))[:int(n)])
    layers: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        lo, hi = lo.strip(), (hi.strip() if hi else lo.strip())
        if not lo.isdigit() or not hi.isdigit() or not int(lo) <= int(hi) < num_layers:
            raise ValueError(f"layers {spec!r}: write first-half, all, least-sensitive:N or ranges like 0-11,20-23 "
                             f"of layers in [0, {num_layers})")
        layers += list(range(int(lo), int(hi) + 1))
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers {spec!r}: a layer appears twice")
    return sorted(layers)


def load_points(path: Path) -> list[Point]:
    """points.yaml: a list of points with distinct names. Raises ValueError (one line) naming the file and
    the point."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"--points {path}: {getattr(err, 'strerror', None) or 'not YAML'}") from None
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"--points {path}: expected a non-empty YAML list of points (see pareto.py --help)")
    points = []
    for i, item in enumerate(raw):
        try:
            points.append(Point.model_validate(item))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(the point)"
            raise ValueError(f"--points {path}: point {i + 1}: {where}: {first['msg']}") from None
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ValueError(f"--points {path}: point names must be distinct (each names its run directory)")
    return points


def point_config(point: Point, layers: list[int]) -> dict:
    """The preset with the point's settings: the YAML `caprese-distill run --config` takes."""
    config = yaml.safe_load(PRESET.read_text())
    config["layers"] = layers
    if point.density is not None:
        config["density"] = point.density
    if point.rank is not None:
        config["rank"] = point.rank
    if point.tp_local is not None:
        config |= {"tp_selection": "local", "tp_size": point.tp_local}
    for key in ("e2e_epochs", "e2e_samples"):
        if getattr(point, key) is not None:
            config.setdefault("fit", {})[key] = getattr(point, key)
    return config


def _model_dir(model: str) -> Path:
    if Path(model).is_dir():
        return Path(model).resolve()
    from caprese_vllm.zoo import ensure_model

    return ensure_model(model, progress=False)


def run_points(args) -> None:
    """Check everything first (points, files, the base run's data and model), then distil each point."""
    points = load_points(args.points)
    for flag, path in (("--questions", args.questions), ("--gsm8k", args.gsm8k)):
        if not path.is_file():
            raise ValueError(f"{flag} {path}: no such file")
    if not (args.base_run / "data").is_dir() or not (args.base_run / "config.json").is_file():
        raise ValueError(f"--base-run {args.base_run}: no data/ and config.json there (a gsm8k-paper run's "
                         "directory after its generate step)")
    known = target_shape_names()
    if bad := [m for m in args.speed_model if m not in known]:
        raise ValueError(f"--speed-model {' '.join(bad)}: not in distill/target_shapes ({', '.join(known)})")
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats}: at least 1")
    try:
        model_dir = _model_dir(args.model)
        base_model = _model_dir(json.loads((args.base_run / "config.json").read_text())["model"])
        num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise ValueError(f"--model {args.model} / --base-run {args.base_run}: {err}") from None
    if base_model != model_dir:
        raise ValueError(f"--base-run {args.base_run} was made with {base_model}, not --model {args.model}: its "
                         "data would not be this model's answers")
    plans = [(p, resolve_layers(p.layers, num_layers, args.sensitivity_run)) for p in points]
    distill = [sys.executable, "-m", "distill.cli"]
    for point, layers in plans:
        run_dir = args.out / point.name
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "data").exists():  # the base run's data: same data settings, no second generation
            shutil.copytree(args.base_run / "data", run_dir / "data")
        config_path = run_dir.parent / f"{point.name}.yaml"
        config_path.write_text(yaml.safe_dump(point_config(point, layers)))
        settings = ["--config", str(config_path), "--model", args.model, "--run-dir", str(run_dir),
                    "--questions", str(args.questions), "--gsm8k", str(args.gsm8k)]
        print(f"== {point.name}: layers {layers}", flush=True)
        subprocess.run(distill + ["run"] + settings, check=True)
        if args.speed_model:
            speed = run_dir / "speed-measured.json"
            subprocess.run([sys.executable, str(REPO / "benchmarks" / "decode_latency.py"), "--adapter-config",
                            str(run_dir / "adapter"), "--models", *args.speed_model, "--json-out", str(speed),
                            "--variants", "dense", "caprese", "--repeats", str(args.repeats)], check=True)
            subprocess.run(distill + ["evaluate"] + settings + ["--speed", str(speed)], check=True)


class Row(BaseModel):
    name: str
    layers: str
    density: float
    rank: int
    epochs: int | None
    samples: int
    gsm8k_accuracy: float
    gap_recovered: float | None
    length_vs_dense: float | None
    params_ratio: float = Field(description="parameters read per decode token, Caprese / dense")
    ttnt_ratio: dict[int, float] = Field(default_factory=dict, description="batch -> Caprese / dense TTNT")
    pareto: bool = False


def read_row(run_dir: Path, speed_model: str) -> Row:
    """One run's row. Raises ValueError (one line, naming the file) for a report that is not a finished
    caprese-distill report with GSM8K results; a speed.json that is not this run's adapter's is left out,
    with a line on stderr."""
    from caprese_vllm.adapter import AdapterError
    from caprese_vllm.adapter.checkpoint import load_manifest
    from distill.speed import load_speed_result

    path = run_dir / "report.json"
    try:
        report = json.loads(path.read_text())
        config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
        fit = config.get("fit", {})
        dense, caprese = report["results"]["dense"], report["results"]["caprese"]
        params = report["active_params"]
        row = dict(name=run_dir.name, layers=layer_spans(report["layers"]), density=report["density"],
                   rank=report["rank"], epochs=fit.get("e2e_epochs"),
                   samples=fit.get("e2e_samples") or report["num_train_samples"],
                   gsm8k_accuracy=caprese["gsm8k_accuracy"],
                   gap_recovered=report["gap_recovered"].get("gsm8k_accuracy"),
                   length_vs_dense=caprese["gsm8k_length"] / dense["gsm8k_length"] if dense["gsm8k_length"] else None,
                   params_ratio=params["caprese"] / params["dense"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        what = f"no {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]
        raise ValueError(f"{path}: not a finished caprese-distill report with GSM8K results ({what}); run "
                         "`caprese-distill run ... --gsm8k FILE` to finish it") from None
    ttnt = {}
    if (run_dir / "speed.json").exists():
        try:
            speed = load_speed_result(run_dir / "speed.json", load_manifest(run_dir / "adapter"))
        except AdapterError as err:
            print(f"pareto.py: {run_dir.name}: speed left out: {err}", file=sys.stderr)
        else:
            variants = speed.ttnt_ms.get(speed_model, {})
            if "dense" in variants and "caprese" in variants:
                ttnt = {b: variants["caprese"][b] / variants["dense"][b]
                        for b in variants["caprese"] if b in variants["dense"]}
    return Row(**row, ttnt_ratio=ttnt)


def mark_front(rows: list[Row], batch: int = 1) -> None:
    """pareto = no other row recovers at least as much of the gap at a TTNT ratio (at `batch`) no higher,
    with one of the two strictly better. Rows without a speed or a gap are never on the front."""
    timed = [r for r in rows if batch in r.ttnt_ratio and r.gap_recovered is not None]
    for r in timed:
        def dominates(o: Row) -> bool:
            better_or_equal = o.gap_recovered >= r.gap_recovered and o.ttnt_ratio[batch] <= r.ttnt_ratio[batch]
            return better_or_equal and (o.gap_recovered > r.gap_recovered or o.ttnt_ratio[batch] < r.ttnt_ratio[batch])

        r.pareto = not any(o is not r and dominates(o) for o in timed)


def render_table(rows: list[Row], speed_model: str) -> str:
    batches = sorted({b for r in rows for b in r.ttnt_ratio})
    head = ["point", "layers", "density", "rank", "e2e epochs", "samples", "GSM8K", "gap recovered",
            "length / dense", "params / dense"] + [f"TTNT / dense b{b} ({speed_model})" for b in batches] + ["front"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r.ttnt_ratio.get(1, 9.0), -(r.gap_recovered or 0))):
        cells = [r.name, r.layers, f"{r.density:g}", str(r.rank), str(r.epochs or "-"), str(r.samples),
                 f"{100 * r.gsm8k_accuracy:.1f}%", "-" if r.gap_recovered is None else f"{100 * r.gap_recovered:.1f}%",
                 "-" if r.length_vs_dense is None else f"{r.length_vs_dense:.3f}", f"{r.params_ratio:.3f}"]
        cells += [f"{r.ttnt_ratio[b]:.3f}" if b in r.ttnt_ratio else "-" for b in batches]
        lines.append("| " + " | ".join(cells + ["yes" if r.pareto else ""]) + " |")
    return "\n".join(lines)


def render_plot(rows: list[Row], path: Path, speed_model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    timed = [r for r in rows if 1 in r.ttnt_ratio and r.gap_recovered is not None]
    for r in timed:
        ax.scatter(r.ttnt_ratio[1], 100 * r.gap_recovered, color="C3" if r.pareto else "C0")
        ax.annotate(r.name, (r.ttnt_ratio[1], 100 * r.gap_recovered), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    front = sorted((r for r in timed if r.pareto), key=lambda r: r.ttnt_ratio[1])
    if front:
        ax.plot([r.ttnt_ratio[1] for r in front], [100 * r.gap_recovered for r in front], color="C3", lw=1)
    ax.axhline(90, color="grey", ls="--", lw=0.8)
    ax.axvline(0.7, color="grey", ls=":", lw=0.8)
    ax.set_xlabel(f"TTNT Caprese / dense, batch 1 ({speed_model} shapes)")
    ax.set_ylabel("GSM8K gap recovered (%)")
    ax.set_title("Caprese configurations: accuracy recovered vs decode time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def output_paths(prefix: Path, runs: list[Path]) -> dict[str, Path]:
    """PREFIX.md / .json / .png (suffixes appended: 'pareto-qwen2.5' stays whole). Raises ValueError when
    one would overwrite a run's own report files."""
    if not prefix.name:
        raise ValueError(f"--out {prefix}: give a file name prefix, e.g. benchmarks/results/pareto-qwen05")
    paths = {ext: prefix.with_name(prefix.name + "." + ext) for ext in ("md", "json", "png")}
    own = {(run / f"report.{ext}").resolve() for run in runs for ext in ("md", "json", "png")}
    if any(p.resolve() in own for p in paths.values()):
        raise ValueError(f"--out {prefix}: would overwrite a run's report; write the table elsewhere")
    return paths


def table(args) -> None:
    paths = output_paths(args.out, args.runs) if args.out else None
    missing = [str(r) for r in args.runs if not (r / "report.json").exists()]
    if missing:
        print(f"pareto.py: no report.json (unfinished or mistyped), left out: {', '.join(missing)}", file=sys.stderr)
    rows = [read_row(run_dir, args.speed_model) for run_dir in args.runs if (run_dir / "report.json").exists()]
    if not rows:
        raise ValueError("none of the run directories has a report.json; pass finished runs")
    mark_front(rows)
    text = render_table(rows, args.speed_model)
    print(text)
    if paths:
        paths["md"].parent.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/pareto.py table " + " ".join(str(r) for r in args.runs)
        png_tmp = paths["png"].with_name(paths["png"].name + ".tmp.png")
        render_plot(rows, png_tmp, args.speed_model)  # first: the step most likely to fail
        paths["md"].write_text(f"<!-- {command} -->\n\n{text}\n")
        paths["json"].write_text(json.dumps([r.model_dump() for r in rows], indent=2) + "\n")
        png_tmp.replace(paths["png"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="distil (and time) every point")
    run.add_argument("--points", type=Path, required=True)
    run.add_argument("--base-run", type=Path, required=True, help="a gsm8k-paper run whose data/ every point reuses")
    run.add_argument("--out", type=Path, required=True, help="one run directory per point under here")
    run.add_argument("--model", required=True)
    run.add_argument("--questions", type=Path, required=True)
    run.add_argument("--gsm8k", type=Path, required=True)
    run.add_argument("--sensitivity-run", type=Path, default=None)
    run.add_argument("--speed-model", nargs="*", default=["llama-3.1-8b"], help="none: skip the speed step")
    run.add_argument("--repeats", type=int, default=3)
    tab = sub.add_parser("table", help="the table and PNG from finished runs")
    tab.add_argument("runs", nargs="+", type=Path)
    tab.add_argument("--speed-model", default="llama-3.1-8b")
    tab.add_argument("--out", type=Path, default=None, help="writes OUT.md, OUT.json, OUT.png")
    args = parser.parse_args(argv)
    try:
        run_points(args) if args.command == "run" else table(args)
    except (ValueError, OSError) as err:
        raise SystemExit(f"pareto.py: error: {err}") from None


if __name__ == "__main__":
    main()
