"""End to end: `vllm serve SmolLM2 --caprese-adapter <distilled adapter>` on 127.0.0.1, spoken to with the
official openai client and with raw HTTP, the way a user of vLLM's OpenAI-compatible server would."""

from __future__ import annotations

import json

import pytest
import requests
import torch

from caprese_vllm.adapter import CapreseAdapter
from caprese_vllm.reference import patch_model, unpatch_model
from conftest import VllmServer

pytestmark = pytest.mark.vllm
NAME = "smollm2-caprese"
MATH = "Please reason step by step. A shop sells pens at $3 each. Mia buys 6 pens. How much does she pay?"


@pytest.fixture(scope="module")
def server(model_dirs, distilled_smol, tmp_path_factory):
    srv = VllmServer(model_dirs["smollm2-135m"], ["--caprese-adapter", str(distilled_smol / "adapter"),
                                                  "--served-model-name", NAME],
                     tmp_path_factory.mktemp("e2e") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_models_route_raw_http_and_client(server, client):
    raw = requests.get(server.base_url + "/v1/models", timeout=30)
    assert raw.status_code == 200
    assert [m["id"] for m in raw.json()["data"]] == [NAME]
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completion_equals_the_reference_implementation(server, model_dirs, distilled_smol, hf_models):
    """Served greedy text == the PyTorch reference with the same adapter (what distill evaluated)."""
    prompt = "Question: What is 12 times 4?\nAnswer:"
    body = {"model": NAME, "prompt": prompt, "max_tokens": 24, "temperature": 0}
    served = requests.post(server.base_url + "/v1/completions", json=body, timeout=300).json()
    model, tok = hf_models["smollm2-135m"]
    patch_model(model, adapter=CapreseAdapter.load(distilled_smol / "adapter"))
    try:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    finally:
        unpatch_model(model)
    assert served["choices"][0]["text"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_chat_streaming_assembles_to_the_non_streaming_answer(client):
    messages = [{"role": "user", "content": MATH}]
    full = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=48)
    chunks = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=48, stream=True)
    pieces, finish = [], None
    for chunk in chunks:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert len(pieces) > 5
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason


def test_completion_streaming_over_raw_sse(server, client):
    body = {"model": NAME, "prompt": "The three primary colors are", "max_tokens": 20, "temperature": 0}
    full = client.completions.create(**body).choices[0].text
    resp = requests.post(server.base_url + "/v1/completions", json={**body, "stream": True}, stream=True, timeout=300)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    text, done = "", False
    for line in resp.iter_lines(decode_unicode=True):
        if not line:
            continue
        assert line.startswith("data: ")
        payload = line[len("data: "):]
        if payload == "[DONE]":
            done = True
            break
        text += json.loads(payload)["choices"][0]["text"]
    assert done and text == full


def test_max_tokens_and_usage(client):
    out = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=7, temperature=0)
    assert out.usage.completion_tokens == 7
    assert out.choices[0].finish_reason == "length"


def test_stop_sequence(client):
    base = client.completions.create(model=NAME, prompt="Count: 1, 2, 3,", max_tokens=30, temperature=0).choices[0]
    stop = base.text.strip().split(",")[1].strip() if "," in base.text else base.text.strip()[:2]
    assert stop
    out = client.completions.create(model=NAME, prompt="Count: 1, 2, 3,", max_tokens=30, temperature=0,
                                    stop=[stop]).choices[0]
    assert out.finish_reason == "stop"
    assert stop not in out.text and base.text.startswith(out.text)


def test_n_greater_than_one(client):
    """n samples of one prompt share the prompt's GRIFFIN selection; seeded sampling is reproducible."""
    kwargs = dict(model=NAME, messages=[{"role": "user", "content": "Name a fruit."}], n=3, temperature=1.0,
                  max_tokens=12, seed=1)
    out = client.chat.completions.create(**kwargs)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert all(c.message.content for c in out.choices)
    again = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]


def test_logprobs(client):
    out = client.completions.create(model=NAME, prompt="2 + 2 =", max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0.0
        assert token in top and max(top.values()) == pytest.approx(logprob, abs=1e-4)  # greedy: the top token
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)


def test_operator_sees_the_adapter_in_log_and_metrics(server, distilled_smol):
    log = server.log()
    assert f"caprese: serving {NAME} (LlamaForCausalLM) with adapter {distilled_smol / 'adapter'}" in log
    assert "griffin density 0.5 on 15/30 layers" in log
    metrics = requests.get(server.base_url + "/metrics", timeout=30).text
    info = [line for line in metrics.splitlines() if line.startswith("caprese:adapter_info{")]
    assert len(info) == 1 and f'adapter="{distilled_smol / "adapter"}"' in info[0] and info[0].endswith(" 1.0")
    assert "caprese:density 0.5" in metrics
    assert "caprese:compressed_layers 15.0" in metrics
    values = {line.split("{")[1].split("}")[0]: float(line.split()[-1])
              for line in metrics.splitlines() if line.startswith("caprese:params{")}
    assert values['kind="active"'] < values['kind="dense"']
    assert values['kind="lowrank"'] / values['kind="dense"'] < 0.011
    assert requests.get(server.base_url + "/health", timeout=30).status_code == 200
