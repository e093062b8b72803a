"""Reliability of the served Caprese model: bad requests, load with aborts, restarts.

One `vllm serve SmolLM2 --caprese-adapter <distilled>` with --max-num-seqs 8 (18 Caprese state
slots), so the load below pushes several times more requests than slots through the server:
a slot that is not freed shows up as failed requests or changed answers.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import pytest
import requests

from conftest import VllmServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import load_test  # noqa: E402

pytestmark = pytest.mark.vllm
NAME = "smollm2-caprese"
PROBE = {"model": NAME, "prompt": "Question: What is 7 times 8?\nAnswer:", "max_tokens": 16, "temperature": 0}


def _serve(model_dirs, distilled_smol, log_path: Path) -> VllmServer:
    return VllmServer(model_dirs["smollm2-135m"], ["--caprese-adapter", str(distilled_smol / "adapter"),
                                                   "--served-model-name", NAME, "--max-num-seqs", "8"], log_path)


@pytest.fixture(scope="module")
def server(model_dirs, distilled_smol, tmp_path_factory):
    srv = _serve(model_dirs, distilled_smol, tmp_path_factory.mktemp("reliability") / "server.log")
    yield srv
    srv.stop()


def _probe(srv: VllmServer) -> str:
    resp = requests.post(srv.base_url + "/v1/completions", json=PROBE, timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


@pytest.mark.parametrize("name, patch", [
    ("prompt longer than max_model_len", {"prompt": "word " * 1500}),
    ("empty prompt", {"prompt": ""}),
    ("max_tokens 0", {"max_tokens": 0}),
    ("negative max_tokens", {"max_tokens": -3}),
    ("temperature out of range", {"temperature": -1}),
    ("unknown model", {"model": "no-such-model"}),
])
def test_bad_request_gets_a_4xx_and_leaves_the_server_as_it_was(server, name, patch):
    before = _probe(server)
    resp = requests.post(server.base_url + "/v1/completions", json={**PROBE, **patch}, timeout=300)
    assert 400 <= resp.status_code < 500, f"{name}: HTTP {resp.status_code} {resp.text[:300]}"
    assert "error" in resp.json(), resp.text
    assert requests.get(server.base_url + "/health", timeout=30).status_code == 200
    assert _probe(server) == before, f"{name} changed the next request's answer"


def test_aborted_stream_does_not_disturb_a_concurrent_request(server):
    before = _probe(server)
    long_body = {**PROBE, "prompt": "Write a long story about the sea.", "max_tokens": 200, "stream": True}
    with requests.post(server.base_url + "/v1/completions", json=long_body, stream=True, timeout=300) as resp:
        lines = resp.iter_lines()
        next(lines)
        assert _probe(server) == before  # served while the stream is open
    # the stream was closed after one chunk: the engine must drop the request
    assert _probe(server) == before


def test_load_with_aborts_and_disconnects_ci_mode(server, capsys):
    code = load_test.main(["--base-url", server.base_url, "--model", NAME, "--ci"])
    out = capsys.readouterr().out
    print(out)
    assert code == 0, out[-4000:]
    assert "0 errors" in out
    assert "no free state slot" not in server.log()


def test_restart_same_answers_and_recovery_after_kill_mid_load(model_dirs, distilled_smol, tmp_path):
    first = _serve(model_dirs, distilled_smol, tmp_path / "first.log")
    try:
        answer = _probe(first)
        stop = threading.Event()

        def hammer():  # keep requests in flight while the server is killed
            while not stop.is_set():
                try:
                    requests.post(first.base_url + "/v1/completions", json={**PROBE, "max_tokens": 64}, timeout=30)
                except requests.RequestException:
                    pass

        threads = [threading.Thread(target=hammer, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        _probe(first)
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=60)
        stop.set()
        for t in threads:
            t.join(timeout=60)
    finally:
        first.stop()
    second = _serve(model_dirs, distilled_smol, tmp_path / "second.log")  # waits for /health
    try:
        assert _probe(second) == answer, "the same adapter served again must answer the same"
    finally:
        second.stop()
