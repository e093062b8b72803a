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
    assert "caprese: adapter" in log and "method griffin density 0.5 on 15/30 layers" in log
    assert "prefix caching disabled" in log


@pytest.mark.vllm
def test_operator_view_says_what_the_engine_runs(server, smol_adapter):
    """Issue 17 items 3 and 10: the summary comes from the engine once the adapter is in its model, and says
    which FF path runs (auto resolves to the portable path on CPU: logged with the reason, and exported)."""
    import urllib.request

    lines = server.log().splitlines()
    front = [line for line in lines if "caprese: FF path: portable PyTorch (caprese_kernels=auto: the kernels need "
             "a CUDA device)" in line]
    summary = [line for line in lines if "caprese: serving smollm2-caprese (LlamaForCausalLM)" in line]
    assert len(front) == 1 and len(summary) == 1, (front, summary)
    assert summary[0].split(")")[0] != front[0].split(")")[0], "the summary must come from the engine's process"
    assert summary[0].endswith("; FF path: portable PyTorch") and f"with adapter {smol_adapter}:" in summary[0]
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=30) as r:
        metrics = r.read().decode()
    assert 'caprese:kernels{path="portable"} 1.0' in metrics and "caprese:density 0.5" in metrics
    assert f'caprese:adapter_info{{adapter="{smol_adapter}",base_model="smollm2-caprese",' in metrics


def test_gauges_appear_only_once_an_engine_confirms(model_dirs, smol_adapter, tmp_path):
    """The API server's caprese:* gauges come from what an engine process wrote after installing the adapter:
    none before (an engine that built vLLM's stock class never writes), then exactly that summary."""
    from prometheus_client import CollectorRegistry, generate_latest

    from caprese_vllm.adapter import CapreseAdapter
    from caprese_vllm.observability import ServedCollector, confirm_served, summarize

    registry = CollectorRegistry()
    registry.register(ServedCollector(tmp_path))
    scrape = lambda: generate_latest(registry).decode()  # noqa: E731
    assert "caprese:" not in scrape()
    (tmp_path / "served-1.json").write_text("{torn")  # a torn or foreign file never fails a scrape
    assert "caprese:" not in scrape()
    summary = summarize(CapreseAdapter.load(smol_adapter), str(smol_adapter), "m", model_dirs["smollm2-135m"], 0.5,
                        "portable")
    confirm_served(summary, tmp_path)
    metrics = scrape()
    assert 'caprese:kernels{path="portable"} 1.0' in metrics and "caprese:compressed_layers 15.0" in metrics
    assert 'caprese:tensor_parallel{selection="exact"} 1.0' in metrics
    assert f'caprese:adapter_info{{adapter="{smol_adapter}",base_model="m",' in metrics
    assert 'method="griffin"' in metrics
    assert 'caprese:params{kind="dense"} 1.34515008e+08' in metrics


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


def _mistral_copy(model_dir: Path, dst: Path) -> Path:
    """SmolLM2 declared as MistralForCausalLM (same layer structure): vLLM serves it with its own Mistral
    class, which this plugin does not replace."""
    import json

    dst.mkdir()
    for path in model_dir.iterdir():
        (dst / path.name).symlink_to(path)
    (dst / "config.json").unlink()
    config = json.loads((model_dir / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"],
                                                 "model_type": "mistral"}))
    return dst


def _adapter_for(model_dir: Path, dst: Path, method: str = "griffin") -> Path:
    base = base_info_from_dir(model_dir)
    layers = default_layers(method, base.num_layers)
    thresholds = {i: 0.1 for i in layers} if method == "cats" else None
    method = MethodSpec(name=method, density=0.5, layers=layers, thresholds=thresholds)
    return synthetic_adapter(base, method, rank=8, scale=0.5).save(dst)


@pytest.mark.vllm
@pytest.mark.parametrize("case, fragment", [
    # issue 17 item 3: before, these served the dense model while logging and exporting the adapter
    ("mistral", "runs as MistralForCausalLM in vLLM, which Caprese does not cover (supported: Gemma2ForCausalLM, "
                "Gemma3ForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM); serve it without an adapter"),
    ("transformers backend", "runs as TransformersForCausalLM in vLLM, which Caprese does not cover"),
    # issue 17 item 10: before, the density override was logged and exported but CATS ignored it
    ("cats density", "caprese_density=0.4: applies to GRIFFIN adapters only"),
    # issue 17 item 9: before, "" became "." and the current directory was loaded as the adapter
    ("empty adapter", "--caprese-adapter is empty; pass the adapter directory"),
    # issue 19: -tp is served now (tests/test_tensor_parallel_vllm.py); a TP setting that CATS would ignore is not
    ("tensor parallel local cats", "caprese_tp_selection=local: applies to GRIFFIN adapters only"),
])
def test_settings_that_would_not_apply_are_refused_with_one_line(model_dirs, smol_adapter, tmp_path, case, fragment):
    """Refused before any engine starts: exit 1, one `vllm: error:` line, no traceback."""
    model, args = model_dirs["smollm2-135m"], ["--caprese-adapter", str(smol_adapter)]
    if case == "mistral":
        model = _mistral_copy(model, tmp_path / "mistral")
        args = ["--caprese-adapter", str(_adapter_for(model, tmp_path / "ad"))]  # made for it: it matches
    elif case == "transformers backend":
        args += ["--model-impl", "transformers"]
    elif case == "cats density":
        args = ["--caprese-adapter", str(_adapter_for(model, tmp_path / "ad", "cats")), "--caprese-density", "0.4"]
    elif case == "empty adapter":
        args = ["--caprese-adapter", ""]
    elif case == "tensor parallel local cats":  # Gemma-3-270M: 4 heads and 1 KV head, which vLLM shards over 2
        model = model_dirs["gemma3-270m"]
        args = ["--caprese-adapter", str(_adapter_for(model, tmp_path / "ad", "cats")), "-tp", "2",
                "--caprese-tp-selection", "local"]
    vllm_bin = Path(sys.executable).parent / "vllm"
    proc = subprocess.run([str(vllm_bin), "serve", str(model), *args], capture_output=True, text=True, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("vllm: error: ") and fragment in last, last
    assert "Traceback" not in proc.stderr


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
