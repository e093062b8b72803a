"""benchmarks/pareto.py (issue 18 item 2): points -> distill settings, the front, the table and the PNG, from
the H200 reports kept in benchmarks/results (the GPU steps themselves run on a GPU host)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))
import pareto  # noqa: E402

from distill.config import load_config  # noqa: E402
from distill.speed import AdapterConfiguration, SpeedResult, load_bench_shape, map_configuration  # noqa: E402


def test_layer_choices():
    assert pareto.resolve_layers("first-half", 24) == list(range(12))
    assert pareto.resolve_layers("all", 24) == list(range(24))
    assert pareto.resolve_layers("0-5,18-23", 24) == [0, 1, 2, 3, 4, 5, 18, 19, 20, 21, 22, 23]
    assert pareto.resolve_layers("7", 24) == [7]
    for bad in ("0-24", "a-b", "3,3", "", "least-sensitive:4"):
        with pytest.raises(ValueError, match="layers"):
            pareto.resolve_layers(bad, 24)


def test_least_sensitive_layers_come_from_the_measured_sparse_error(tmp_path):
    errors = {str(i): 0.5 + 0.01 * ((i * 7) % 24) for i in range(24)}
    (tmp_path / "report.json").write_text(json.dumps({"fit": {"relative_error": {"heldout": {"sparse": errors}}}}))
    chosen = pareto.resolve_layers("least-sensitive:6", 24, tmp_path)
    assert chosen == sorted(sorted(range(24), key=lambda i: errors[str(i)])[:6])
    with pytest.raises(ValueError, match="measured 24 of 32 layers"):
        pareto.resolve_layers("least-sensitive:6", 32, tmp_path)


def test_a_point_is_the_preset_with_its_settings(tmp_path):
    point = pareto.Point(name="all-d0.4", layers="all", density=0.4, rank=128, e2e_epochs=2, e2e_samples=5000)
    path = tmp_path / "p.yaml"
    import yaml

    path.write_text(yaml.safe_dump(pareto.point_config(point, list(range(24)))))
    config = load_config(path, {"model": "m", "run_dir": str(tmp_path / "run")})
    assert config.layers == list(range(24)) and config.density == 0.4 and config.rank == 128
    assert config.fit.e2e_epochs == 2 and config.fit.e2e_samples == 5000
    assert config.data.num_samples == 20000 and config.eval.gsm8k_range == "-1000:"  # the preset's
    assert config.tp_selection == "exact" and config.tp_size == 1
    path.write_text(yaml.safe_dump(pareto.point_config(pareto.Point(name="local2", tp_local=2), list(range(12)))))
    local = load_config(path, {"model": "m", "run_dir": str(tmp_path / "run2")})
    assert local.tp_selection == "local" and local.tp_size == 2 and local.local_shards == 2
    with pytest.raises(ValueError):
        pareto.Point(name="bad name/", layers="all")
    with pytest.raises(ValueError, match="tp_local"):
        pareto.Point(name="one", tp_local=1)   # -tp 1 has no local selection


def _run_dir(root: Path, name: str, report: str, epochs: int, ttnt: dict[int, float] | None) -> Path:
    """A finished run: the kept H200 report, its adapter's configuration (a synthetic adapter of that shape)
    and, when `ttnt` is given, a speed.json for that adapter (Caprese/dense ratio per batch size)."""
    from caprese_vllm.adapter import BaseModelInfo, synthetic_adapter
    from caprese_vllm.methods import MethodSpec

    run = root / name
    run.mkdir()
    shutil.copy(RESULTS / report, run / "report.json")
    (run / "config.json").write_text(json.dumps({"fit": {"e2e_epochs": epochs}}))
    data = json.loads((run / "report.json").read_text())
    base = BaseModelInfo(architecture="Qwen2ForCausalLM", hidden_size=896, intermediate_size=4864, num_layers=24,
                         fingerprint="sha256:test")
    adapter = synthetic_adapter(base, MethodSpec(name="griffin", density=data["density"], layers=data["layers"]),
                                rank=data["rank"])
    adapter.save(run / "adapter")
    if ttnt:
        config = AdapterConfiguration.from_manifest(adapter.manifest)
        dense = {1: 4.94, 8: 5.22}
        speed = SpeedResult(configuration=config,
                            mapped={"llama-3.1-8b": map_configuration(config, load_bench_shape("llama-3.1-8b"))},
                            ttnt_ms={"llama-3.1-8b": {"dense": dense, "caprese": {b: dense[b] * r
                                                                                  for b, r in ttnt.items()}}})
        (run / "speed.json").write_text(speed.model_dump_json())
    return run


def test_table_marks_the_front_and_writes_md_json_png(tmp_path, capsys):
    one = _run_dir(tmp_path, "first-half-1ep", "qwen2.5-coder-0.5b-gsm8k-dev-h200.json", 1, {1: 0.88, 8: 0.98})
    two = _run_dir(tmp_path, "first-half-2ep", "qwen2.5-coder-0.5b-gsm8k-dev-h200-2epochs.json", 2,
                   {1: 0.88, 8: 0.97})
    untimed = _run_dir(tmp_path, "untimed", "qwen2.5-coder-0.5b-gsm8k-dev-h200.json", 1, None)
    out = tmp_path / "out" / "front"
    pareto.main(["table", str(one), str(two), str(untimed), str(tmp_path / "no-report"), "--out", str(out)])
    rows = {r["name"]: r for r in json.loads(out.with_suffix(".json").read_text())}
    # same TTNT ratio, 88.3% > 87.0% of the gap: only the 2-epoch point is on the front
    assert rows["first-half-2ep"]["pareto"] and not rows["first-half-1ep"]["pareto"]
    assert not rows["untimed"]["pareto"] and rows["untimed"]["ttnt_ratio"] == {}
    assert abs(rows["first-half-2ep"]["gap_recovered"] - 0.8831) < 1e-3
    text = out.with_suffix(".md").read_text()
    assert "| first-half-2ep | 0-11 | 0.5 | 288 | 2 | 20000 | 24.9% | 88.3% | 0.997 |" in text
    assert text.splitlines()[0].startswith("<!-- python benchmarks/pareto.py table ")
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "| 0.880 | 0.970 | yes |" in capsys.readouterr().out


def test_table_refuses_when_nothing_finished(tmp_path):
    with pytest.raises(SystemExit, match="none of the run directories has a report.json"):
        pareto.main(["table", str(tmp_path)])


def test_table_checks_its_inputs_and_outputs(tmp_path, capsys):
    """Found by trying to break it: --out lost everything after its last dot and could overwrite a run's own
    report; a speed.json of another adapter counted; a report without GSM8K gave a KeyError traceback."""
    run = _run_dir(tmp_path, "a", "qwen2.5-coder-0.5b-gsm8k-dev-h200.json", 1, {1: 0.9, 8: 1.0})
    pareto.main(["table", str(run), "--out", str(tmp_path / "pareto-qwen2.5-coder-0.5b")])
    assert (tmp_path / "pareto-qwen2.5-coder-0.5b.md").exists() and (tmp_path / "pareto-qwen2.5-coder-0.5b.png").exists()
    with pytest.raises(SystemExit, match="would overwrite a run's report"):
        pareto.main(["table", str(run), "--out", str(run / "report")])

    other = _run_dir(tmp_path, "b", "qwen2.5-coder-0.5b-gsm8k-dev-h200.json", 1, None)
    shutil.copy(run / "speed.json", other / "speed.json")  # measured for a's adapter, not b's (another seed)
    from caprese_vllm.adapter import CapreseAdapter, synthetic_adapter

    mine = CapreseAdapter.load(other / "adapter").manifest
    synthetic_adapter(mine.base_model, mine.method, rank=288, scale=0.1, seed=5).save(other / "adapter")
    capsys.readouterr()
    pareto.main(["table", str(other)])
    captured = capsys.readouterr()
    assert "b: speed left out: --speed" in captured.err and "measured for adapter" in captured.err
    assert captured.out.splitlines()[-1].endswith("| 0.885 |  |")  # no TTNT, not on the front

    report = json.loads((other / "report.json").read_text())
    for row in report["results"].values():
        row.pop("gsm8k_accuracy")
    (other / "report.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match=r"b/report.json: not a finished caprese-distill report with GSM8K "
                                         r"results \(no 'gsm8k_accuracy'\)"):
        pareto.main(["table", str(other)])


def test_run_refuses_bad_points_before_anything_is_written(tmp_path):
    points = tmp_path / "points.yaml"
    base = tmp_path / "base"
    (base / "data").mkdir(parents=True)
    (base / "config.json").write_text(json.dumps({"model": str(tmp_path)}))
    files = tmp_path / "q.jsonl"
    files.write_text("{}\n")
    argv = ["run", "--points", str(points), "--base-run", str(base), "--out", str(tmp_path / "out"), "--model",
            str(tmp_path), "--questions", str(files), "--gsm8k", str(files)]
    for text, message in [
        ("- {name: a}\n- {name: a}\n", "point names must be distinct"),
        ("- {name: ..}\n", r"point 1: name: String should match pattern"),
        ("- {name: a, rank: 0}\n", "point 1: rank: Input should be greater than 0"),
        ("[]\n", "expected a non-empty YAML list"),
        ("- {name: a, layers: '0-99999999999'}\n", "no config.json|No such file"),  # (the model is checked first)
    ]:
        points.write_text(text)
        with pytest.raises(SystemExit, match=message):
            pareto.main(argv)
    points.write_text("- {name: a}\n")
    with pytest.raises(SystemExit, match="--speed-model nope: not in distill/target_shapes"):
        pareto.main(argv + ["--speed-model", "nope"])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"N must be a whole number in \[1, 24\]"):
        pareto.resolve_layers("least-sensitive:0", 24)
    with pytest.raises(ValueError, match="ranges like"):
        pareto.resolve_layers("0-99999999999", 24)
