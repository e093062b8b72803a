"""`vllm serve MODEL --caprese-adapter PATH` as written, answering the official openai client."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from caprese_vllm.adapter import base_info_from_dir, synthetic_adapter
from caprese_vllm.methods import MethodSpec, default_layers
from conftest import VllmServer


@pytest.fixture(scope="module")
def smol_adapter(model_dirs, tmp_path_factory) -> Path:
    base = base_info_from_dir(model_dirs["smollm2-135m"])
    method = MethodSpec(name="griffin", density=0.5, layers=default_layers("griffin", base.num_layers))
    return synthetic_adapter(base, method, rank=16, scale=0.5, seed=7).save(tmp_path_factory.mktemp("a") / "ad")


@pytest.fixture(scope="module")
def server(model_dirs, smol_adapter, tmp_path_factory):
    srv = VllmServer(model_dirs["smollm2-135m"], ["--caprese-adapter", str(smol_adapter),
                                                  "--served-model-name", "smollm2-caprese"],
                     tmp_path_factory.mktemp("server") / "server.log")
    yield srv
    srv.stop()


@pytest.mark.vllm
def test_openai_client_chat_and_completion(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["smollm2-caprese"]
    chat = client.chat.completions.create(model="smollm2-caprese", temperature=0, max_tokens=24,
                                          messages=[{"role": "user", "content": "What is 7 times 6?"}])
    assert chat.choices[0].message.content.strip()
    completion = client.completions.create(model="smollm2-caprese", prompt="2 + 2 =", max_tokens=8, temperature=0)
    assert completion.choices[0].text
    log = server.log()
    assert "caprese: adapter" in log and "method griffin density 0.500 on 15/30 layers" in log
    assert "prefix caching disabled" in log


def _break(kind: str, adapter: Path, tmp_path: Path) -> Path:
    """A copy of a good adapter, broken one way (each way has its own unit test in test_adapter.py)."""
    import shutil

    if kind == "missing directory":
        return tmp_path / "missing"
    broken = Path(shutil.copytree(adapter, tmp_path / "broken"))
    if kind == "truncated tensors":
        path = broken / "adapter.safetensors"
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "edited manifest":
        path = broken / "caprese.json"
        path.write_text(path.read_text().replace('"density": 0.5', '"density": 0.25'))
    return broken


@pytest.mark.vllm
@pytest.mark.parametrize("kind, fragment", [
    ("missing directory", "adapter directory does not exist"),
    ("truncated tensors", "adapter.safetensors: not a readable safetensors file"),
    ("edited manifest", "caprese.json: content does not match integrity.manifest_sha256"),
])
def test_bad_adapter_is_refused_with_one_line(model_dirs, smol_adapter, tmp_path, kind, fragment):
    """Refused before any engine starts: exit 1, one `vllm: error:` line, no traceback."""
    vllm_bin = Path(sys.executable).parent / "vllm"
    proc = subprocess.run([str(vllm_bin), "serve", str(model_dirs["smollm2-135m"]), "--caprese-adapter",
                           str(_break(kind, smol_adapter, tmp_path))], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vllm: error: ") and fragment in last, last
    assert "Traceback" not in proc.stderr
    assert "Starting vLLM server on" not in proc.stderr + proc.stdout, "refused after the server came up"


@pytest.mark.vllm
def test_kernels_on_without_a_gpu_is_refused_with_one_line(model_dirs, smol_adapter):
    vllm_bin = Path(sys.executable).parent / "vllm"
    proc = subprocess.run([str(vllm_bin), "serve", str(model_dirs["smollm2-135m"]), "--caprese-adapter",
                           str(smol_adapter), "--caprese-kernels", "on"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ('vllm: error: --additional-config caprese_kernels=on: they need a CUDA device; '
                    'use "auto" or "off"'), last
    assert "Traceback" not in proc.stderr
