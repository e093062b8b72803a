"""Shared fixtures: the real offline models, built once per machine and cached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from caprese_vllm.zoo import ensure_model

TESTS_DIR = Path(__file__).parent
sys.path.insert(0, str(TESTS_DIR.parent / "benchmarks"))
from serve_process import ServeError, ServeProcess  # noqa: E402  (benchmarks/ is no package)
# The catalog models the tests use (`make models` fetches the same); the larger ones are for GPU hosts.
TEST_MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def model_dirs() -> dict[str, Path]:
    """The test models as converted HF directories (the first run builds them, ~3 min)."""
    return {name: ensure_model(name, progress=False) for name in TEST_MODELS}


@pytest.fixture(scope="session")
def distilled_smol(model_dirs) -> Path:
    """The run directory of SmolLM2's default adapter (`caprese-distill run --preset smollm2-135m`, the one
    `make serve` serves); distilled on first use (~17 min on 2 CPU cores), then reused from the cache."""
    from distill.presets import default_run_dir

    run_dir = default_run_dir("smollm2-135m")
    if not (run_dir / "report.json").exists():
        log = run_dir.parent / "smollm2-135m.distill.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(Path(sys.executable).parent / "caprese-distill"), "run", "--preset", "smollm2-135m",
               "--run-dir", str(run_dir)]
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=3600)
        if proc.returncode != 0:
            raise AssertionError(f"distillation failed (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
    return run_dir


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


class VllmServer(ServeProcess):
    """`vllm serve` for the tests: float32, max-model-len 1024, eager, a 1 GiB KV cache, then `args`
    (benchmarks/serve_process.py); a server that does not come up fails the test with its log."""

    def __init__(self, model_dir: Path, args: list[str], log_path: Path, startup_timeout_s: int = 600):
        try:
            super().__init__(model_dir, ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", *args],
                             log_path, startup_timeout_s, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
        except ServeError as err:
            raise AssertionError(str(err)) from None
