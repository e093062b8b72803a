"""Shared fixtures: the real offline models, built once per machine and cached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from caprese_vllm.zoo import CATALOG, ensure_model

TESTS_DIR = Path(__file__).parent


@pytest.fixture(scope="session")
def model_dirs() -> dict[str, Path]:
    """Every catalog model as a converted HF directory (the first run builds them, ~2 min)."""
    return {name: ensure_model(name, progress=False) for name in CATALOG}


@dataclass
class VllmRun:
    outputs: list[dict]
    log: str


def run_vllm_generate(model_dir: Path, prompts: list[str], max_tokens: int, tmp_path: Path,
                      dtype: str = "float32", env: dict[str, str] | None = None,
                      extra_args: dict[str, str] | None = None, timeout_s: int = 900) -> VllmRun:
    """Start real vLLM in a child process, generate greedily, return outputs and its whole log."""
    out = tmp_path / "vllm_out.json"
    cmd = [sys.executable, str(TESTS_DIR / "vllm_generate.py"), "--model", str(model_dir),
           "--prompts-json", json.dumps(prompts), "--max-tokens", str(max_tokens),
           "--dtype", dtype, "--out", str(out)]
    for key, value in (extra_args or {}).items():
        cmd += [f"--{key.replace('_', '-')}", value]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, **(env or {})})
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"vLLM run failed (exit {proc.returncode}); last log lines:\n{log[-4000:]}")
    return VllmRun(outputs=json.loads(out.read_text()), log=log)


@pytest.fixture(scope="session")
def hf_models(model_dirs):
    """float32 transformers models and tokenizers, loaded once; tests must unpatch what they patch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = {}
    for name, path in model_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        loaded[name] = (model, AutoTokenizer.from_pretrained(path))
    return loaded
