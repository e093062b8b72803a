"""Bad input to caprese-distill and to the serve-time settings: one error line, exit status 1, no traceback
(cases found by trying to break the CLIs; each failed with a traceback before)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from caprese_vllm.engine.config import CapreseServeConfig
from distill.cli import main

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
REPO = Path(__file__).resolve().parents[1]


def _run(capsys, *argv: str) -> str:
    assert main(list(argv)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("caprese-distill: error: "), err
    return err[0]


def _cli(*argv: str) -> str:
    """Run the real `caprese-distill` in a subprocess; assert exit 1 and one error line (no traceback)."""
    proc = subprocess.run([sys.executable, "-m", "distill.cli", *argv], capture_output=True, text=True, cwd=REPO)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1 and err[0].startswith("caprese-distill: error: "), proc.stderr
    return err[0]


def _generate_refused(tmp_path: Path, model_dir: Path, *argv: str) -> str:
    """`caprese-distill generate` with these flags: its one error line; asserts nothing was written."""
    run_dir = tmp_path / "r"
    line = _cli("generate", "--model", str(model_dir), "--run-dir", str(run_dir), *argv)
    assert not run_dir.exists()
    return line


@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return d


def test_a_config_file_that_is_not_utf8(capsys, tmp_path, model_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"model: \xff\xfe\n")
    assert "not valid YAML" in _run(capsys, "generate", "--config", str(bad), "--run-dir", str(tmp_path / "r"))


def test_a_section_that_is_not_a_mapping_under_a_flag(capsys, tmp_path, model_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: 5\n")
    line = _run(capsys, "generate", "--config", str(cfg), "--model", str(model_dir), "--run-dir",
                str(tmp_path / "r"), "--num-samples", "4")
    assert "field data: expected a mapping" in line


@pytest.mark.parametrize("bad", ["::-0", "::00"])
def test_a_slice_step_of_zero_in_any_spelling(capsys, tmp_path, model_dir, bad):
    line = _run(capsys, "generate", "--model", str(model_dir), "--run-dir", str(tmp_path / "r"),
                "--questions", str(GSM8K), f"--questions-range={bad}")
    assert "not a slice" in line


def test_a_run_dir_that_is_a_file(capsys, tmp_path, model_dir):
    file = tmp_path / "file"
    file.write_text("x")
    for run_dir in (file, file / "under"):
        assert "--run-dir" in _run(capsys, "generate", "--model", str(model_dir), "--run-dir", str(run_dir))


def test_a_corrupt_run_config(capsys, tmp_path, model_dir):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{torn")
    assert "not the settings of a run" in _run(capsys, "generate", "--model", str(model_dir), "--run-dir",
                                               str(run_dir))


def test_a_model_dir_without_a_checkpoint_config_writes_nothing(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run_dir = tmp_path / "r"
    assert "no readable config.json" in _run(capsys, "generate", "--model", str(empty), "--run-dir", str(run_dir))
    assert not run_dir.exists()


@pytest.mark.parametrize("value", ["{not json", "[1, 2]", 5])
def test_additional_config_that_is_not_an_object(value):
    with pytest.raises(ValueError, match="--additional-config is not a JSON object.*caprese_adapter"):
        CapreseServeConfig.from_additional_config(value)


# ---- issue 17: caprese-distill -------------------------------------------------------------------------------

@pytest.mark.parametrize("step", ["fit", "evaluate"])
def test_a_step_before_the_data_step_writes_nothing(tmp_path, model_dir, step):
    """`fit` / `evaluate` on a fresh run dir pinned its settings before failing, so the corrected rerun was then
    refused ("different settings")."""
    run_dir = tmp_path / "r"
    line = _cli(step, "--model", str(model_dir), "--run-dir", str(run_dir), "--density", "0.3")
    assert f"{run_dir / 'data' / 'train.jsonl'} does not exist yet; run `caprese-distill generate`" in line
    assert not run_dir.exists()


def test_evaluate_before_the_fit_step_names_fit(tmp_path, model_dir):
    run_dir = tmp_path / "r"
    (run_dir / "data").mkdir(parents=True)
    for split in ("train", "heldout_math", "heldout_language"):
        (run_dir / "data" / f"{split}.jsonl").write_text("")
    line = _cli("evaluate", "--model", str(model_dir), "--run-dir", str(run_dir))
    assert "adapter/caprese.json does not exist yet; run `caprese-distill fit`" in line
    assert sorted(p.name for p in run_dir.iterdir()) == ["data"]  # no config.json, no lock


@pytest.mark.parametrize("device, message", [
    ("bogus", "field device: Value error, 'bogus' is not a device; use auto, cpu, cuda or cuda:N"),
    ("meta", "'meta' is not a device"),
    ("cuda:99", "field device: 'cuda:99', but this machine has"),
])
def test_a_device_is_checked_before_anything_is_written(tmp_path, model_dir, device, message):
    """`--device bogus` failed only after the data step (minutes of vLLM)."""
    run_dir = tmp_path / "r"
    assert message in _cli("generate", "--model", str(model_dir), "--run-dir", str(run_dir), "--device", device)
    assert not run_dir.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_cuda_device(tmp_path, model_dir):
    run_dir = tmp_path / "r"
    line = _cli("generate", "--model", str(model_dir), "--run-dir", str(run_dir), "--device", "cuda")
    assert "field device: 'cuda', but this machine has no CUDA device" in line and "--device cpu" in line
    assert not run_dir.exists()


@pytest.mark.parametrize("argv, flag, value", [
    (["--gsm8k", str(GSM8K), "--gsm8k-range", "--e2e-epochs", "2"], "--gsm8k-range", "--e2e-epochs"),
    (["--questions", str(GSM8K), "--questions-range", "--seed", "1"], "--questions-range", "--seed"),
    (["--e2e-lr", "--num-samples", "4"], "--e2e-lr", "--num-samples"),
    (["--questions-range=--x"], "--questions-range", "--x"),
])
def test_a_forgotten_value_does_not_swallow_the_next_flag(tmp_path, model_dir, argv, flag, value):
    """`--gsm8k-range --e2e-epochs 2` took "--e2e-epochs" for the range (and "2" went nowhere)."""
    line = _generate_refused(tmp_path, model_dir, *argv)
    assert f"{flag} needs a value, got {value!r}" in line


@pytest.mark.parametrize("argv, needs", [
    (["--gsm8k-range", "-100:"], "--gsm8k"),
    (["--gsm8k-max-new-tokens", "64"], "--gsm8k"),
    (["--questions-range", ":100"], "--questions"),
])
def test_a_range_without_its_file_is_refused(tmp_path, model_dir, argv, needs):
    """`--gsm8k-range` without `--gsm8k` (or `--questions-range` without `--questions`) was silently ignored."""
    line = _generate_refused(tmp_path, model_dir, *argv)
    assert f"{argv[0]} is given but no file for it is: pass {needs} FILE" in line


def test_a_range_with_its_file_in_the_config_file_applies(tmp_path):
    from distill.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: m\nrun_dir: {tmp_path / 'r'}\neval:\n  gsm8k: {GSM8K}\n")
    config = load_config(cfg, {"eval.gsm8k_range": "-100:", "eval.gsm8k_max_new_tokens": 64})
    assert (config.eval.gsm8k_range, config.eval.gsm8k_max_new_tokens) == ("-100:", 64)


@pytest.mark.parametrize("argv, field", [
    (["--e2e-lr", "inf"], "fit.e2e_lr"),
    (["--e2e-lr", "nan"], "fit.e2e_lr"),
    (["--density", "nan"], "density"),
])
def test_non_finite_settings_are_refused(tmp_path, model_dir, argv, field):
    """`--e2e-lr inf` passed `gt=0`."""
    line = _generate_refused(tmp_path, model_dir, *argv)
    assert f"field {field}: Input should be a finite number" in line


@pytest.mark.parametrize("section, key", [("fit", "ridge"), ("fit", "e2e_warmup"), ("data", "temperature"),
                                          ("fit", "e2e_clip"), ("fit", "layerwise_lr")])
def test_every_float_setting_must_be_finite(tmp_path, section, key):
    from distill.config import ConfigError, load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: m\nrun_dir: r\n{section}:\n  {key}: .inf\n")
    with pytest.raises(ConfigError, match=rf"field {section}.{key}: Input should be a finite number"):
        load_config(cfg, {})


@pytest.fixture
def llama_dir(tmp_path) -> Path:
    """A checkpoint config (FF width I = 1536, 12 heads, 4 KV heads); no weights needed."""
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 4, "num_attention_heads": 12, "num_key_value_heads": 4, "vocab_size": 1000}))
    return d


@pytest.mark.parametrize("argv, message", [
    (["--tp-selection", "local"], "tp_selection local needs tp_size >= 2 (the -tp the adapter will be served at), "
                                  "got 1; set tp_size (--tp-size N)"),
    (["--tp-size", "2"], "tp_size 2 applies to tp_selection local only"),
    (["--tp-selection", "local", "--tp-size", "2", "--method", "cats"], "tp_selection local applies to GRIFFIN only"),
    (["--tp-selection", "local", "--tp-size", "0"], "field tp_size: Input should be greater than or equal to 1"),
    # what vLLM (or the plugin) would refuse at the evaluation, after the data and fit steps, and a size that works
    (["--tp-selection", "local", "--tp-size", "5"], "num_attention_heads 12 is not divisible by 5; use --tp-size 4"),
    (["--tp-selection", "local", "--tp-size", "6"], "num_key_value_heads 4 and 6: neither divides the other; use "
                                                    "--tp-size 4"),
    (["--tp-selection", "local", "--tp-size", "4", "--density", "0.002"],
     "local selection keeps k=3 neurons, fewer than 4 ranks (some would keep none); use --tp-size 2"),
    # huge: answered at once (the search is bounded by the head count), not after minutes
    (["--tp-selection", "local", "--tp-size", str(10 ** 30)], "is not divisible by " + str(10 ** 30)
     + "; use --tp-size 12"),
    (["--tp-selection", "LOCAL", "--tp-size", "5"], "use --tp-size 4"),   # any case, as vllm serve's flag
])
def test_a_tensor_parallel_fit_that_cannot_be_served_is_refused_before_anything_is_written(tmp_path, llama_dir,
                                                                                            argv, message):
    """Fitting for -tp N's local selection (issue 19): every setting that `vllm serve -tp N` would refuse, or that
    would change nothing, is one line before the run directory exists."""
    line = _generate_refused(tmp_path, llama_dir, *argv)
    assert message in line, line


@pytest.mark.parametrize("config", [{"architectures": ["LlamaForCausalLM"]}, {"model_type": "gpt2"},
                                    {"model_type": "llama", "intermediate_size": None, "num_attention_heads": 4}])
def test_a_tensor_parallel_fit_on_a_config_without_the_sizes_is_one_line(tmp_path, config):
    """A config.json without the FF width or heads gave a traceback from the --tp-size check."""
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    line = _generate_refused(tmp_path, d, "--tp-selection", "local", "--tp-size", "2")
    assert "has no positive integer" in line and "--tp-size" in line, line
