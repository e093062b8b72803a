"""Bad input to caprese-distill and to the serve-time settings: one error line, exit status 1, no traceback
(cases found by trying to break the CLIs; each failed with a traceback before)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caprese_vllm.engine.config import CapreseServeConfig
from distill.cli import main

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def _run(capsys, *argv: str) -> str:
    assert main(list(argv)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("caprese-distill: error: "), err
    return err[0]


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
