"""The whole `caprese-distill` pipeline on real SmolLM2 (the default adapter), judged by its own report."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from caprese_vllm.adapter import CapreseAdapter
from caprese_vllm.reference import patch_model, unpatch_model
from conftest import run_vllm_generate

PROMPTS = ["Please reason step by step. What is 17 + 25 * 3?",
           "Please reason step by step. Tom buys 4 books at $7 each and pays with $50. How much change does he get?"]


def test_report_shows_caprese_recovers_at_least_half_the_gap(distilled_smol):
    report = json.loads((distilled_smol / "report.json").read_text())
    assert report["gap_recovered"]["math_agreement"] >= 0.5, report["gap_recovered"]
    rows = report["results"]
    assert rows["sparse"]["math_agreement"] < rows["caprese"]["math_agreement"] < 1.0
    assert rows["caprese"]["math_kl"] < rows["sparse"]["math_kl"]
    assert report["active_params"]["lowrank"] / report["active_params"]["dense"] < 0.011
    errors = report["fit"]["relative_error"]["heldout"]
    for layer, sparse_error in errors["sparse"].items():
        assert errors["stage1"][layer] < sparse_error, layer
    for name in ("report.md", "report.png"):
        assert (distilled_smol / name).stat().st_size > 1000
    assert "Gap recovered by Caprese" in (distilled_smol / "report.md").read_text()


def test_rerun_resumes_without_redoing_work(distilled_smol):
    adapter_file = distilled_smol / "adapter" / "adapter.safetensors"
    before = hashlib.sha256(adapter_file.read_bytes()).hexdigest()
    start = time.monotonic()
    proc = subprocess.run([str(Path(sys.executable).parent / "caprese-distill"), "run", "--preset", "smollm2-135m",
                           "--run-dir", str(distilled_smol)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - start < 120
    assert "already generated" in proc.stdout and "already fitted" in proc.stdout
    assert hashlib.sha256(adapter_file.read_bytes()).hexdigest() == before


def test_rerun_with_other_settings_is_refused(distilled_smol):
    proc = subprocess.run([str(Path(sys.executable).parent / "caprese-distill"), "fit", "--preset", "smollm2-135m",
                           "--run-dir", str(distilled_smol), "--density", "0.3"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("caprese-distill: error: ")
    assert "different settings (density)" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.vllm
def test_distilled_adapter_in_vllm_equals_reference(distilled_smol, model_dirs, hf_models, tmp_path):
    adapter_dir = distilled_smol / "adapter"
    model, tok = hf_models["smollm2-135m"]
    adapter = CapreseAdapter.load(adapter_dir)
    patch_model(model, adapter=adapter)
    try:
        expected = []
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
            expected.append(out[0, ids.shape[1]:].tolist())
    finally:
        unpatch_model(model)
    run = run_vllm_generate(model_dirs["smollm2-135m"], PROMPTS, 24, tmp_path,
                            extra_args={"additional_config": json.dumps({"caprese_adapter": str(adapter_dir)})})
    assert [o["token_ids"] for o in run.outputs] == expected


def test_evaluate_with_speed_puts_this_adapters_speed_line_in_the_report(distilled_smol, tmp_path):
    """issue 18 item 1: the report carries the speed measured for its own adapter's configuration (the
    evaluation is cached per adapter digest, so this only re-renders the report)."""
    import shutil

    from distill.speed import AdapterConfiguration, SpeedResult, load_bench_shape, map_configuration

    run_dir = tmp_path / "run"
    for name in ("adapter", "data", "eval"):
        shutil.copytree(distilled_smol / name, run_dir / name)
    for name in ("config.json", "timings.json", "fit/fit.json"):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(distilled_smol / name, run_dir / name)
    manifest = CapreseAdapter.load(run_dir / "adapter").manifest
    config = AdapterConfiguration.from_manifest(manifest)
    speed = SpeedResult(configuration=config,
                        mapped={"llama-3.1-8b": map_configuration(config, load_bench_shape("llama-3.1-8b"))},
                        ttnt_ms={"llama-3.1-8b": {"dense": {1: 4.94}, "caprese": {1: 4.33}}}, device="NVIDIA H200")
    (tmp_path / "speed.json").write_text(speed.model_dump_json())
    distill = [str(Path(sys.executable).parent / "caprese-distill")]
    settings = ["--preset", "smollm2-135m", "--run-dir", str(run_dir), "--speed", str(tmp_path / "speed.json")]

    proc = subprocess.run(distill + ["run"] + settings, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "--speed applies to `caprese-distill evaluate`" in proc.stderr

    proc = subprocess.run(distill + ["evaluate"] + settings, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (run_dir / "report.md").read_text()
    assert "Speed at llama-3.1-8b shapes (density 0.5 on layers" in report
    assert "batch 1: 4.94 -> 4.33 ms (-12.3%)" in report
    assert json.loads((run_dir / "report.json").read_text())["speed"]

    # measured for another configuration: refused before anything runs, the kept speed.json untouched
    other = config.model_copy(update={"adapter_sha256": "f" * 64})
    (tmp_path / "speed.json").write_text(speed.model_copy(update={"configuration": other}).model_dump_json())
    proc = subprocess.run(distill + ["evaluate"] + settings, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "measured for adapter ffffffffffff" in proc.stderr.strip().splitlines()[-1]
    assert (run_dir / "speed.json").read_text() != (tmp_path / "speed.json").read_text()
