"""The fault harness's short mode (issue 17, last section; the long mode is `benchmarks/fault_harness.py`).

One `vllm serve SmolLM2 --caprese-adapter <distilled>` (--max-num-seqs 8: requests reuse Caprese's state
slots) takes 150 fuzzed requests with a fixed seed from 4 concurrent clients: valid and invalid OpenAI
parameters, structured outputs, prompt lists, token ids, long and unicode prompts, aborted streams and
client disconnects. Then a handful of bad serve-time settings and one corrupted adapter, each a `vllm serve`
that must stop before any engine starts. The whole module runs in about 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from conftest import VllmServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import fault_harness as fh  # noqa: E402
from fuzz_params import (  # noqa: E402
    LAX_CONFIG_CASES, ConfigCase, FuzzRequest, ModelLimits, case_args, config_cases, fuzz_requests,
)

NAME = "smollm2-caprese"
MAX_MODEL_LEN = 1024          # VllmServer's
CI_SEED = 17
CI_REQUESTS = 150
# One case per stage that refuses a setting (cli_flags, CapreseServeConfig, the model-dependent checks).
CI_CONFIG_CASES = ("flag density=word", "json density=string", "flag density keeps no neuron")


def _case(label: str) -> ConfigCase:
    return next(c for c in config_cases() if c.label == label)


@pytest.fixture(scope="module")
def adapter(distilled_smol) -> Path:
    return distilled_smol / "adapter"


@pytest.fixture(scope="module")
def refusals(model_dirs, adapter, tmp_path_factory):
    """The serve-config cases and one corrupted adapter, each a `vllm serve` that must stop by itself, run one
    after another in a background thread while the fuzz server starts (its start is mostly one busy core, and
    CI is near its time limit): case label -> future of fuzz-harness result ("ok" or what went wrong)."""
    from concurrent.futures import ThreadPoolExecutor

    model = model_dirs["smollm2-135m"]
    pool = ThreadPoolExecutor(1)
    futures = {label: pool.submit(fh.run_config_case, model, adapter, _case(label), 300)
               for label in CI_CONFIG_CASES}
    futures["corrupted adapter"] = pool.submit(fh.run_adapter_cases, model, adapter, 1, CI_SEED,
                                               tmp_path_factory.mktemp("corrupt"), 300)
    yield futures
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def server(model_dirs, adapter, refusals, tmp_path_factory):
    args = ["--caprese-adapter", str(adapter), "--served-model-name", NAME, "--max-num-seqs", "8"]
    srv = VllmServer(model_dirs["smollm2-135m"], args, tmp_path_factory.mktemp("fault") / "server.log")
    yield srv
    srv.stop()


@pytest.mark.vllm
def test_request_fuzz_keeps_the_server_serving(server, model_dirs):
    """No undocumented 5xx, every valid request answered and every invalid one refused with a 4xx, /health
    200, the greedy probe identical before / during / after, requests drained, RSS bounded, no crash in the
    log."""
    limits = fh.model_limits(model_dirs["smollm2-135m"], NAME, MAX_MODEL_LEN)
    settings = fh.FuzzSettings(base_url=server.base_url, pid=server.proc.pid, seed=CI_SEED, limits=limits,
                               requests=CI_REQUESTS, workers=4, watch_interval_s=5)
    report = fh.run_fuzz(settings, server.log)
    print(fh.format_table(report))
    assert len(report.outcomes) == CI_REQUESTS
    assert sum(1 for p, _ in report.probes if p == "during") >= 2, "the probe must run while the fuzz does"
    violations = [v.replace("$BASE_URL", server.base_url) for v in report.violations()]
    assert not violations, "\n".join(violations)


@pytest.mark.vllm
@pytest.mark.parametrize("label", CI_CONFIG_CASES)
def test_bad_serve_setting_stops_vllm_serve_with_one_line(refusals, label):
    """Exit != 0, one `vllm: error:` line naming the setting, no traceback, never serving."""
    assert refusals[label].result() == "ok", _case(label)


@pytest.mark.vllm
def test_corrupted_adapter_stops_vllm_serve_with_one_line(refusals):
    """The adapter fuzz of tests/test_adapter.py, extended to a real `vllm serve` (one random corruption)."""
    [(what, result)] = refusals["corrupted adapter"].result()
    assert result == "ok", what


# ---- every serve-config case in-process (no vLLM start): the code vllm serve runs before its engine -------


def _refusal_in_process(case: ConfigCase) -> str:
    """The one-line message the flag translation or CapreseServeConfig gives for case (AssertionError if
    neither refuses it)."""
    from caprese_vllm.cli_flags import CapreseFlagError, translate_argv
    from caprese_vllm.engine.config import CapreseServeConfig

    argv = ["serve", "MODEL", *case_args(case, "/adapter")]
    try:
        translated = translate_argv(argv)
    except CapreseFlagError as err:
        return str(err.code)
    config = json.loads(translated[translated.index("--additional-config") + 1])
    try:
        CapreseServeConfig.from_additional_config(config)
    except ValueError as err:
        return f"vllm: error: {err}"
    raise AssertionError(f"{case.label}: accepted as {config}")


@pytest.mark.parametrize("case", [c for c in config_cases() if c.stage != "engine-config"],
                         ids=lambda c: c.label)
def test_every_bad_setting_is_one_line_naming_it(case):
    message = _refusal_in_process(case)
    assert "\n" not in message and message.startswith("vllm: error: ") and case.fragment in message, message


@pytest.mark.parametrize("case", LAX_CONFIG_CASES, ids=lambda c: c.label)
def test_wrong_json_types_are_refused(case):
    message = _refusal_in_process(case)
    assert case.fragment in message, message


# ---- the harness's own checks catch what they are for ------------------------------------------------------


LIMITS = ModelLimits(name=NAME, vocab_size=49152, max_model_len=MAX_MODEL_LEN)


def test_the_same_seed_gives_the_same_requests():
    first = [r.body for r, _ in zip(fuzz_requests(3, LIMITS), range(300))]
    assert first == [r.body for r, _ in zip(fuzz_requests(3, LIMITS), range(300))]
    assert first != [r.body for r, _ in zip(fuzz_requests(4, LIMITS), range(300))]
    kinds = {r.kind.split(":")[0] for r, _ in zip(fuzz_requests(3, LIMITS), range(300))}
    assert kinds == {"completion", "completion-stream", "chat", "chat-stream", "invalid", "abort",
                     "disconnect"}


def _completion(**body) -> FuzzRequest:
    return FuzzRequest(kind="completion", path=fh.COMPLETIONS, body={"model": NAME, **body}, expect="ok")


def test_answer_checks_flag_server_errors_and_broken_answers():
    req = _completion(prompt="hi", n=2, logprobs=1, temperature=1.0)
    good = [{"text": "a", "finish_reason": "length", "logprobs": {"token_logprobs": [-0.5]}}] * 2
    assert fh.check_answer(req, 200, good, ["a", "a"], None) == []
    assert fh.check_answer(req, 500, [], [], None) == ["HTTP 500"]
    assert fh.check_answer(req, 200, good[:1], ["a"], None) == ["1 choices, expected 2"]
    nan = [{**good[0], "logprobs": {"token_logprobs": [float("nan")]}}] * 2
    assert "non-finite" in fh.check_answer(req, 200, nan, ["a", "a"], None)[0]
    invalid = FuzzRequest(kind="invalid:n=0", path=fh.COMPLETIONS, body={"n": 0}, expect="4xx")
    assert fh.check_answer(invalid, 200, good, ["a", "a"], None) == [
        "invalid request answered HTTP 200, not a 4xx"]
    assert fh.check_answer(invalid, 200, [], [], None, stream_error=400) == []
    choice = _completion(prompt="hi", structured_outputs={"choice": ["yes", "no"]})
    assert fh.check_answer(choice, 200, [{"text": "maybe", "finish_reason": "stop"}], ["maybe"], None)
    cut = [{"text": "ye", "finish_reason": "stop", "stop_reason": "s"}]  # a stop string ended it: not judged
    assert fh.check_answer(choice, 200, cut, ["ye"], None) == []


def test_only_the_documented_vllm_5xx_is_accepted():
    known = _completion(prompt=[[1, 2]], n=3, temperature=1.0, echo=True, logprobs=1, stream=True)
    assert fh.check_answer(known, 200, [], [], None, stream_error=500) == []
    other = _completion(prompt=[[1, 2]], n=3, temperature=1.0, logprobs=1, stream=True)
    assert fh.check_answer(other, 200, [], [], None, stream_error=500) == ["error event 500 in a 200 stream"]


def test_log_scan_tells_request_refusals_from_crashes():
    api = "(APIServer pid=7) ERROR 11-30 18:57:22 [serving.py:929] "
    core = "(EngineCore pid=8) ERROR 11-30 18:57:22 [core.py:900] "
    refusal = (f"{api}Traceback (most recent call last):\n{api}  File \"x.py\", line 1, in f\n"
               f"{api}vllm.exceptions.VLLMValidationError: bad\n")
    assert fh.scan_log(refusal) == "ok"
    crash = (f"{core}Traceback (most recent call last):\n"
             f"{core}  File \"caprese_mlp.py\", line 3, in forward\n"
             f"{core}RuntimeError: no free state slot\n")
    assert "no free state slot" in fh.scan_log(refusal + crash)
    assert "IndexError: k" in fh.scan_log(crash.replace("RuntimeError: no free state slot", "IndexError: k"))


def test_refusal_check_wants_exactly_one_error_line():
    import subprocess

    def proc(rc: int, stderr: str) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess([], rc, "", stderr)

    assert fh.check_refusal(proc(1, "INFO x\nvllm: error: caprese_density: bad\n"), "caprese_density") == "ok"
    assert fh.check_refusal(proc(1, "Traceback (most recent call last):\nValueError: x\n"), None).startswith(
        "traceback")
    assert fh.check_refusal(proc(0, "vllm: error: x\n"), None) == "exit status 0"
    assert fh.check_refusal(None, None).startswith("did not stop")
    assert "does not name" in fh.check_refusal(proc(1, "vllm: error: something else\n"), "caprese_density")


def test_corruptions_change_the_bytes():
    rng = random.Random(0)
    data = bytes(range(256)) * 4
    for _ in range(50):
        what, corrupted = fh.corrupt_bytes(data, rng)
        assert corrupted != data, what
