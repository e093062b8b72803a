"""Fault harness for a Caprese server (issue 17, last section): nothing a user sends or configures may crash
the engine or change what it serves.

    python benchmarks/fault_harness.py --model MODEL_DIR --adapter ADAPTER_DIR --minutes 10 --seed 0

1. Request fuzz: `vllm serve MODEL --caprese-adapter ADAPTER` is started (--dtype float32 unless given,
   eager, max_model_len 1024, --max-num-seqs 8 so that requests reuse Caprese's state slots), then W
   concurrent clients send fuzzed /v1/completions and /v1/chat/completions requests for N minutes
   (`fuzz_params.py`: valid ones, ones with exactly one invalid parameter, aborted streams and client
   disconnects). Invariants:
   - no HTTP 5xx, as a status or as an error event inside a 200 stream, except DOCUMENTED_5XX (one vLLM
     0.32 bug that dense vLLM shares); valid requests answered 200 with well-formed choices (count, finish
     reason, finite logprobs, structured outputs that parse, no stop string left); invalid ones refused
     with a 4xx (a stream may carry it as an error event, as vLLM does); no dropped connection;
   - /health answers 200 throughout;
   - a fixed greedy probe (temperature 0) answers the same text before, during (every few seconds, while
     the fuzz runs) and after the fuzz;
   - per-request state drains: vLLM's running/waiting gauges return to 0, and the server's process tree's
     RSS grows by at most --rss-growth-mib after the warm-up (the first 20% of requests);
   - the server log has no fatal engine error, "no free state slot" or traceback other than the
     request-level ones vLLM's OpenAI serving code logs for a request it answers itself.
2. Serve-config fuzz: every case of `fuzz_params.config_cases()` (wrong types, out-of-range values, unknown
   keys; as --caprese-* flags and as --additional-config JSON) must stop `vllm serve` with exit != 0 and one
   `vllm: error:` line naming the problem, no traceback, before the server starts.
3. Adapter fuzz on the engine: K random corruptions of the adapter's files (bit flips, truncation, holes,
   junk, duplicated slices) given to `vllm serve` must be refused the same way.
Prints one table; exits 1 if any invariant is violated (each violation with a curl line that repeats the
request). `tests/test_fault_harness.py` runs the short mode (150 requests, a few settings, one adapter).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_params import (  # noqa: E402
    COMPLETIONS, ConfigCase, FuzzRequest, ModelLimits, case_args, config_cases, corrupt_bytes,
    fuzz_requests, probe_body,
)
from serve_process import VLLM, ServeError, ServeProcess, free_port  # noqa: E402


def _stream_echo_logprobs_n(req: FuzzRequest) -> bool:
    b = req.body
    echoed = bool(b.get("stream") and b.get("echo")) and b.get("logprobs") is not None
    return req.path == COMPLETIONS and echoed and b.get("n", 1) > 1


# HTTP 5xx answers (status or stream error event) that are known vLLM behaviour, not Caprese's: (name, why,
# which requests). Anything else >= 500 is a violation.
DOCUMENTED_5XX = [
    ("vllm-0.32 stream echo+logprobs+n>1",
     "vLLM 0.32's completion_stream_generator raises KeyError (a prompt token id) in "
     "_create_completion_logprobs for a streamed completion with echo, logprobs and n > 1, dense vLLM alike "
     "(no adapter): error event 500",
     _stream_echo_logprobs_n),
]


def documented_5xx(req: FuzzRequest) -> str | None:
    """The name of the DOCUMENTED_5XX entry that covers req, if any."""
    return next((name for name, _, applies in DOCUMENTED_5XX if applies(req)), None)

# Server-log lines that mean the engine or a request's state broke.
FATAL_LOG = re.compile(r"EngineDeadError|EngineCore encountered a fatal error|no free state slot|"
                       r"Fatal Python error|Segmentation fault")
# Tracebacks that vLLM's OpenAI serving code logs for one request (e.g. a streamed request is validated
# inside its generator, which logs the traceback at ERROR and sends the 400 as an error event; xgrammar's
# refusal of a bad schema): that request's own answer is what tells a refusal (4xx) from a failure (5xx), and
# the harness checks it. Any other traceback (engine core, workers, the ASGI app) is a violation.
REQUEST_TRACEBACK = re.compile(r"^\(APIServer pid=\d+\) ERROR \S+ \S+ \[serving\.py:\d+\] Traceback")
_LOG_PREFIX = re.compile(r"^(\(\w+ pid=\d+\) )?(ERROR|WARNING|INFO|DEBUG) \S+ \S+ \[[^\]]+\] ")


# ---- results -----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one fuzzed request got: HTTP status (None: no answer), and the violations it showed."""

    request: FuzzRequest
    status: int | None = None
    stream_error: int | None = None   # the code of an error event in a 200 stream (how vLLM fails streams)
    latency_s: float = 0.0
    violations: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The status as the table shows it: 400, 200, `400 in stream`, `none` (the client left first)."""
        if self.stream_error is not None:
            return f"{self.stream_error} in stream"
        return str(self.status or "none")


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    probes: list[tuple[str, str]] = field(default_factory=list)       # (phase, text)
    health: Counter = field(default_factory=Counter)                   # status -> count
    rss_mib: list[tuple[int, float]] = field(default_factory=list)     # (requests done, MiB)
    rss_baseline_mib: float | None = None
    rss_parts: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (done, MiB per process)
    checks: dict[str, str] = field(default_factory=dict)               # invariant -> "ok" | what broke
    config_results: list[tuple[str, str]] = field(default_factory=list)    # (case, "ok" | what broke)
    adapter_results: list[tuple[str, str]] = field(default_factory=list)

    def violations(self) -> list[str]:
        """Every violated invariant, one line each (empty: all held)."""
        found = [f"{o.request.kind}: {v}\n    repro: {o.request.repro('$BASE_URL')}"
                 for o in self.outcomes for v in o.violations]
        found += [f"{name}: {state}" for name, state in self.checks.items() if state != "ok"]
        found += [f"serve-config {case}: {state}" for case, state in self.config_results if state != "ok"]
        found += [f"adapter {case}: {state}" for case, state in self.adapter_results if state != "ok"]
        return found


# ---- checking one answer -----------------------------------------------------------------------------------


def expected_choices(req: FuzzRequest) -> int:
    """n x the number of prompts (a completions prompt may be a list of strings or of token-id lists)."""
    n = req.body.get("n", 1)
    prompt = req.body.get("prompt")
    if req.path == COMPLETIONS and isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return n * len(prompt)
    return n


def _choice_text(choice: dict) -> str:
    part = choice.get("message") or choice.get("delta") or {}
    return choice.get("text") if "text" in choice else (part.get("content") or "")


def _logprob_values(choice: dict) -> list[float]:
    """Every logprob number in a choice (completions' token_logprobs/top_logprobs, chat's content list)."""
    lp = choice.get("logprobs") or {}
    values = [v for v in lp.get("token_logprobs") or [] if v is not None]
    values += [v for top in lp.get("top_logprobs") or [] if top for v in top.values()]
    for item in lp.get("content") or []:
        values.append(item["logprob"])
        values += [t["logprob"] for t in item.get("top_logprobs") or []]
    return values


def check_choice(req: FuzzRequest, choice: dict, text: str) -> list[str]:
    """Per-choice invariants of a 200 answer: a finish reason, finite logprobs <= 0, structured outputs that
    parse when generation ended on its own (EOS, not max_tokens or a stop string), no stop string left in the
    text."""
    problems = []
    finish = choice.get("finish_reason")
    if finish not in ("stop", "length"):
        problems.append(f"finish_reason {finish!r}")
    bad = [v for v in _logprob_values(choice)
           if not (isinstance(v, (int, float)) and math.isfinite(v) and v <= 1e-4)]
    if bad:
        problems.append(f"non-finite or positive logprobs {bad[:3]}")
    structured = req.body.get("structured_outputs") or {}
    # stop_reason None: ended by EOS / the grammar, not by a stop string (JSON may hold "\n", a stop string)
    if finish == "stop" and choice.get("stop_reason") is None and not req.body.get("echo"):
        if "choice" in structured and text not in structured["choice"]:
            problems.append(f"structured choice answered {text!r}")
        if "regex" in structured and not re.fullmatch(structured["regex"], text):
            problems.append(f"structured regex answered {text!r}")
        if "json" in structured or (req.body.get("response_format") or {}).get("type", "text") != "text":
            try:
                json.loads(text)
            except ValueError:
                problems.append(f"structured json answered {text[:80]!r}")
    stops = req.body.get("stop") or []
    for stop in [stops] if isinstance(stops, str) else stops:  # (min_tokens holds stop strings off: vLLM)
        if stop and stop in text and not req.body.get("echo") and not req.body.get("min_tokens"):
            problems.append(f"stop string {stop!r} left in the text")
    return problems


def check_answer(req: FuzzRequest, status: int | None, choices: list[dict], texts: list[str],
                 error: str | None, stream_error: int | None = None) -> list[str]:
    """The invariants of one request's answer (see the module docstring), as violation lines. A stream's
    request is validated once streaming began: vLLM then refuses it with an error event (its code in
    stream_error) inside the 200 answer; a 4xx code there counts as the refusal."""
    if error is not None:
        return [error]
    if stream_error is not None:
        if stream_error >= 500:
            return [] if documented_5xx(req) else [f"error event {stream_error} in a 200 stream"]
        if req.expect == "ok":
            return [f"valid request refused inside its stream ({stream_error})"]
        return []
    if status is not None and status >= 500:
        return [] if documented_5xx(req) else [f"HTTP {status}"]
    if req.expect == "4xx" and not (status is not None and 400 <= status < 500):
        return [f"invalid request answered HTTP {status}, not a 4xx"]
    if req.expect == "ok" and status != 200:
        return [f"valid request answered HTTP {status}"]
    if status != 200 or req.action != "send":
        return []
    problems = []
    if len(choices) != expected_choices(req):
        problems.append(f"{len(choices)} choices, expected {expected_choices(req)}")
    for choice, text in zip(choices, texts):
        problems += check_choice(req, choice, text)
    return problems


# ---- sending -----------------------------------------------------------------------------------------------


def _read_stream(resp: httpx.Response, abort: bool) -> tuple[list[dict], list[str], str | None, int | None]:
    """Choices (merged per index) and texts of an SSE answer, a problem (a malformed stream or one that
    ended without [DONE]) and the code of an error event. With abort, returns after the first chunk
    (closing the connection)."""
    merged: dict[int, dict] = {}
    texts: dict[int, str] = {}
    done = False
    for line in resp.iter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        chunk = json.loads(line[len("data: "):])
        if "error" in chunk:
            code = chunk["error"].get("code") if isinstance(chunk["error"], dict) else None
            if isinstance(code, int):
                return [], [], None, code
            return [], [], f"error event without a code in a 200 stream: {json.dumps(chunk)[:300]}", None
        for choice in chunk.get("choices", []):
            i = choice.get("index", 0)
            texts[i] = texts.get(i, "") + _choice_text(choice)
            fields = {k: v for k, v in choice.items() if v is not None and k != "logprobs"}
            merged.setdefault(i, {}).update(fields)
            if choice.get("logprobs"):
                lp = merged[i].setdefault("logprobs", {})
                for key, value in choice["logprobs"].items():
                    if isinstance(value, list):
                        lp.setdefault(key, []).extend(value)
        if abort:
            return [], [], None, None
    if not done:
        return [], [], "stream ended without [DONE]", None
    order = sorted(merged)
    return [merged[i] for i in order], [texts.get(i, "") for i in order], None, None


def send(client: httpx.Client, req: FuzzRequest, timeout_s: float) -> Outcome:
    """Send one fuzzed request as its action says (send / abort after the first chunk / disconnect after a
    short client timeout) and check its answer."""
    out = Outcome(req)
    start = time.perf_counter()
    error = None
    choices: list[dict] = []
    texts: list[str] = []
    try:
        if req.action == "disconnect":
            try:
                give_up_s = random.Random(str(req.body)).uniform(0.05, 1.0)
                resp = client.post(req.path, json=req.body, timeout=give_up_s)
                out.status = resp.status_code
            except httpx.TimeoutException:
                pass  # the intended outcome: the client gave up
        elif req.stream:
            with client.stream("POST", req.path, json=req.body, timeout=timeout_s) as resp:
                out.status = resp.status_code
                if resp.status_code == 200:
                    choices, texts, error, out.stream_error = _read_stream(resp, abort=req.action == "abort")
                else:
                    resp.read()
        else:
            resp = client.post(req.path, json=req.body, timeout=timeout_s)
            out.status = resp.status_code
            if resp.status_code == 200:
                choices = resp.json().get("choices", [])
                texts = [_choice_text(c) for c in choices]
    except httpx.HTTPError as err:
        error = f"no answer: {type(err).__name__}: {err}"
    except ValueError as err:  # a body that is not JSON
        error = f"malformed answer: {err}"
    out.latency_s = time.perf_counter() - start
    out.violations = check_answer(req, out.status, choices, texts, error, out.stream_error)
    return out


# ---- server-wide invariants --------------------------------------------------------------------------------


def probe(client: httpx.Client, model: str) -> str:
    """The fixed greedy probe's text (or an `HTTP <status>` / `error ...` marker that never equals a text)."""
    try:
        resp = client.post(COMPLETIONS, json=probe_body(model), timeout=300)
    except httpx.HTTPError as err:
        return f"error {type(err).__name__}"
    return resp.json()["choices"][0]["text"] if resp.status_code == 200 else f"HTTP {resp.status_code}"


def health(client: httpx.Client) -> int:
    try:
        return client.get("/health", timeout=30).status_code
    except httpx.HTTPError:
        return 0


def rss_by_process(pid: int) -> dict[str, float]:
    """Resident memory (MiB) of a process and each of its descendants (vLLM's API server, engine core,
    workers), keyed `name[pid]`; empty if the process is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    sizes = {}
    for proc in procs:
        try:
            sizes[f"{proc.name()}[{proc.pid}]"] = proc.memory_info().rss / 2**20
        except psutil.Error:
            pass
    return sizes



def engine_gauges(client: httpx.Client) -> dict[str, float]:
    """vLLM's running and waiting request gauges (summed over engines)."""
    text = client.get("/metrics", timeout=30).text
    values = {}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        found = re.findall(rf"^{re.escape(name)}{{[^}}]*}} ([0-9.e+]+)$", text, flags=re.M)
        values[name] = sum(float(v) for v in found)
    return values


def wait_drained(client: httpx.Client, timeout_s: float = 60) -> str:
    """ "ok" once no request is running or waiting in the engine, else what is left after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = engine_gauges(client)
        if not any(left.values()):
            return "ok"
        if time.monotonic() > deadline:
            return f"still in the engine {timeout_s:.0f}s after the fuzz: {left}"
        time.sleep(0.5)


def _traceback_exception(lines: list[str], start: int) -> str:
    """The exception line that ends the traceback starting at lines[start] (log prefixes removed)."""
    for line in lines[start + 1:start + 400]:
        message = _LOG_PREFIX.sub("", line)
        if message and not message[0].isspace() and not message.startswith(("Traceback", "During handling",
                                                                                "The above exception")):
            return message.strip()
    return "(traceback without an exception line)"


def scan_log(text: str) -> str:
    """ "ok", or the first server-log line that shows a crash or a broken request state: a fatal engine
    message, or a traceback other than a request-level one of vLLM's serving code (REQUEST_TRACEBACK)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if FATAL_LOG.search(line):
            return f"server log: {line.strip()[:300]}"
        if "Traceback (most recent call last)" in line and not REQUEST_TRACEBACK.match(line):
            return f"server log line {i + 1}: traceback ending in {_traceback_exception(lines, i)[:300]}"
    return "ok"


# ---- the request fuzz --------------------------------------------------------------------------------------


@dataclass
class FuzzSettings:
    base_url: str
    limits: ModelLimits
    pid: int                      # the `vllm serve` process (its tree's RSS is measured)
    seed: int = 0
    requests: int | None = None   # stop after this many fuzzed requests ...
    seconds: float | None = None  # ... or after this long
    workers: int = 4
    timeout_s: float = 300
    rss_growth_mib: float = 256
    warmup_fraction: float = 0.2
    watch_interval_s: float = 2.0  # probe, /health and RSS this often while the fuzz runs


def _watch(client: httpx.Client, settings: FuzzSettings, report: Report, done: list[int],
           stop: threading.Event) -> None:
    """While the fuzz runs: the probe (as "during"), /health, and the server's RSS, every watch_interval_s."""
    while not stop.wait(settings.watch_interval_s):
        report.probes.append(("during", probe(client, settings.limits.name)))
        report.health[health(client)] += 1
        parts = rss_by_process(settings.pid)
        report.rss_parts.append((done[0], parts))
        report.rss_mib.append((done[0], sum(parts.values()) if parts else float("nan")))


def _warm_rss(report: Report, warm_at: int) -> float | None:
    warm = [mib for count, mib in report.rss_mib if count >= warm_at]
    return warm[0] if warm else None


def run_fuzz(settings: FuzzSettings, log_text=lambda: "") -> Report:
    """Send fuzzed requests from settings.workers threads until settings.requests are done or
    settings.seconds have passed; check every answer and the server-wide invariants. `log_text()` returns
    the server's log so far (scanned at the end)."""
    report = Report()
    stream = fuzz_requests(settings.seed, settings.limits)
    lock = threading.Lock()
    done = [0]
    deadline = time.monotonic() + settings.seconds if settings.seconds else None
    limits = httpx.Limits(max_connections=settings.workers + 4)
    with httpx.Client(base_url=settings.base_url, limits=limits) as client:
        report.health[health(client)] += 1
        report.probes.append(("before", probe(client, settings.limits.name)))
        report.rss_parts.append((0, rss_by_process(settings.pid)))
        report.rss_mib.append((0, sum(report.rss_parts[0][1].values())))

        def worker() -> None:
            while True:
                with lock:
                    if (settings.requests is not None and stream.count >= settings.requests) or (
                            deadline is not None and time.monotonic() > deadline):
                        return
                    req = next(stream)
                outcome = send(client, req, settings.timeout_s)
                with lock:
                    report.outcomes.append(outcome)
                    done[0] += 1

        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(client, settings, report, done, stop), daemon=True)
        watcher.start()
        with ThreadPoolExecutor(settings.workers) as pool:
            for future in [pool.submit(worker) for _ in range(settings.workers)]:
                future.result()
        stop.set()
        watcher.join()
        report.checks["requests drained"] = wait_drained(client)
        report.health[health(client)] += 1
        report.probes.append(("after", probe(client, settings.limits.name)))
        parts = rss_by_process(settings.pid)
        report.rss_parts.append((done[0], parts))
        report.rss_mib.append((done[0], sum(parts.values()) if parts else float("nan")))
    _judge(report, settings, log_text())
    return report


def _judge(report: Report, settings: FuzzSettings, log: str) -> None:
    """The server-wide invariants, from what run_fuzz collected."""
    before = report.probes[0][1]
    changed = [(phase, text) for phase, text in report.probes if text != before]
    report.checks["probe identical"] = "ok" if not changed else (
        f"{len(changed)}/{len(report.probes)} probes differ from {before!r}: first {changed[0]}")
    bad_health = {s: n for s, n in report.health.items() if s != 200}
    report.checks["/health 200"] = "ok" if not bad_health else f"answers {dict(report.health)}"
    report.rss_baseline_mib = _warm_rss(report, int(settings.warmup_fraction * len(report.outcomes)))
    end = report.rss_mib[-1][1]
    if report.rss_baseline_mib is None:
        report.checks["RSS bounded"] = "ok"  # too short a run for a sample after the warm-up
        report.rss_baseline_mib = report.rss_mib[0][1]
    else:
        growth = end - report.rss_baseline_mib
        report.checks["RSS bounded"] = "ok" if growth <= settings.rss_growth_mib else (
            f"grew {growth:.0f} MiB after the warm-up ({report.rss_baseline_mib:.0f} -> {end:.0f}; "
            f"limit {settings.rss_growth_mib:.0f})")
    report.checks["server log clean"] = scan_log(log)


# ---- serve-config and adapter fuzz -------------------------------------------------------------------------


def check_refusal(proc: subprocess.CompletedProcess | None, fragment: str | None) -> str:
    """ "ok" if `vllm serve` stopped with exit != 0 and one `vllm: error:` line (the last, containing
    fragment), no traceback, before serving; else what went wrong. proc None: it did not stop in time."""
    if proc is None:
        return "did not stop: vllm serve kept running (the setting was accepted)"
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if "error:" in line.lower() and "vllm: error:" in line]
    lines = proc.stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    if proc.returncode == 0:
        return "exit status 0"
    if "Traceback" in output:
        return f"traceback (exit {proc.returncode}); last line: {last[:200]}"
    if "Starting vLLM server" in output or "Application startup complete" in output:
        return "refused only after the server started"
    if len(errors) != 1 or not last.startswith("vllm: error: "):
        return f"expected one 'vllm: error:' line last, got {len(errors)}; last line: {last[:200]}"
    if fragment and fragment not in last:
        return f"error line does not name {fragment!r}: {last[:300]}"
    return "ok"


def serve_refused(model_dir: Path, args: list[str], timeout_s: float) -> subprocess.CompletedProcess | None:
    """Run `vllm serve MODEL ARGS` (it should stop by itself); None if still running after timeout_s
    (then it is killed with its process group)."""
    cmd = [VLLM, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(free_port()), *args]
    proc = subprocess.Popen(cmd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_config_case(model_dir: Path, adapter: Path, case: ConfigCase, timeout_s: float = 240) -> str:
    """ "ok" if the case is refused as it must be, else what happened."""
    return check_refusal(serve_refused(model_dir, case_args(case, str(adapter)), timeout_s), case.fragment)


def corrupt_adapter(adapter: Path, dst: Path, rng: random.Random) -> str:
    """A copy of adapter at dst with one of its two files corrupted at random; returns what was done."""
    shutil.copytree(adapter, dst)
    name = rng.choice(["caprese.json", "adapter.safetensors"])
    what, data = corrupt_bytes((adapter / name).read_bytes(), rng)
    (dst / name).write_bytes(data)
    return f"{name}: {what}"


def run_adapter_cases(model_dir: Path, adapter: Path, count: int, seed: int, workdir: Path,
                      timeout_s: float = 240) -> list[tuple[str, str]]:
    """count random corruptions of adapter, each given to `vllm serve`: (description, "ok" | what broke)."""
    rng = random.Random(seed)
    results = []
    for i in range(count):
        dst = workdir / f"corrupt-{i}"
        what = corrupt_adapter(adapter, dst, rng)
        proc = serve_refused(model_dir, ["--caprese-adapter", str(dst)], timeout_s)
        results.append((what, check_refusal(proc, str(dst))))
        shutil.rmtree(dst, ignore_errors=True)
    return results


# ---- the table ---------------------------------------------------------------------------------------------


def rss_growth_by_process(report: Report) -> dict[str, tuple[float, float]]:
    """process -> (RSS at the first sample at or after the warm-up baseline, RSS at the end), MiB."""
    if len(report.rss_parts) < 2:
        return {}
    warm_total = report.rss_baseline_mib
    warm = next((parts for (_, parts), (_, total) in zip(report.rss_parts, report.rss_mib)
                 if total == warm_total), report.rss_parts[0][1])
    end = report.rss_parts[-1][1]
    return {name: (warm.get(name, float("nan")), mib) for name, mib in end.items()}


def _group(kind: str) -> str:
    return "invalid (one bad parameter)" if kind.startswith("invalid:") else kind


def format_table(report: Report) -> str:
    """Markdown: requests by kind with their status codes, then the invariants, config and adapter cases."""
    rows: dict[str, Counter] = {}
    for o in report.outcomes:
        rows.setdefault(_group(o.request.kind), Counter())[o.label] += 1
    codes = sorted({c for row in rows.values() for c in row})
    kinds = len({o.request.kind for o in report.outcomes})
    lines = [f"{len(report.outcomes)} fuzzed requests, {kinds} kinds "
             f"({sum(1 for o in report.outcomes if o.request.kind.startswith('invalid:'))} with one invalid "
             f"parameter); status `none` = the client closed the connection first", "",
             "| kind | requests | " + " | ".join(f"HTTP {c}" for c in codes)
             + " | p50 / max s | violations |",
             "|---|---|" + "---|" * len(codes) + "---|---|"]
    for kind in sorted(rows):
        mine = [o for o in report.outcomes if _group(o.request.kind) == kind]
        times = sorted(o.latency_s for o in mine)
        counts = " | ".join(str(rows[kind][c]) for c in codes)
        lines.append(f"| {kind} | {len(mine)} | {counts} | {times[len(times) // 2]:.1f} / {times[-1]:.1f} | "
                     f"{sum(len(o.violations) for o in mine)} |")
    probe_ok = report.checks.get("probe identical") == "ok"
    fivexx = [o for o in report.outcomes if max(o.status or 0, o.stream_error or 0) >= 500]
    known = sum(1 for o in fivexx if documented_5xx(o.request))
    during = sum(1 for phase, _ in report.probes if phase == "during")
    lines += ["", "| invariant | result |", "|---|---|",
              f"| 5xx: undocumented / documented vLLM | {len(fivexx) - known} / {known} |",
              f"| /health 200 | {sum(report.health.values())} checks: {dict(report.health)} |",
              f"| probe identical (before / {during} during / after) "
              f"| {'yes' if probe_ok else 'NO'} |",
              f"| RSS start / after warm-up / end (MiB) | {report.rss_mib[0][1]:.0f} / "
              f"{report.rss_baseline_mib:.0f} / {report.rss_mib[-1][1]:.0f} |"]
    lines += [f"| {name} | {state} |" for name, state in report.checks.items()]
    lines += [f"| RSS of {name} after warm-up / end (MiB) | {warm:.0f} / {end:.0f} |"
              for name, (warm, end) in rss_growth_by_process(report).items()]
    for title, results in (("serve-config", report.config_results),
                           ("corrupted adapter", report.adapter_results)):
        if results:
            ok = sum(1 for _, state in results if state == "ok")
            lines.append(f"| {title} cases refused with one line | {ok}/{len(results)} |")
    return "\n".join(lines)


# ---- the long mode -----------------------------------------------------------------------------------------


class Server(ServeProcess):
    """`vllm serve MODEL --caprese-adapter ADAPTER --served-model-name NAME` (eager, 1 GiB KV cache); one
    line and exit when it does not come up (benchmarks/serve_process.py)."""

    def __init__(self, model_dir: Path, adapter: Path, name: str, log_path: Path, max_model_len: int,
                 extra: list[str], dtype: str = "float32", startup_timeout_s: float = 900):
        args = ["--caprese-adapter", str(adapter), "--served-model-name", name, "--dtype", dtype, "--enforce-eager",
                "--max-model-len", str(max_model_len), *extra]
        try:
            super().__init__(model_dir, args, log_path, startup_timeout_s, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
        except ServeError:
            raise SystemExit(f"fault_harness: error: vllm serve did not come up; see {log_path}") from None


def model_limits(model_dir: Path, name: str, max_model_len: int) -> ModelLimits:
    config = json.loads((model_dir / "config.json").read_text())
    return ModelLimits(name=name, vocab_size=int(config["vocab_size"]), max_model_len=max_model_len)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model directory (HF format)")
    parser.add_argument("--adapter", type=Path, required=True, help="Caprese adapter directory")
    parser.add_argument("--minutes", type=float, default=10, help="request-fuzz duration (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=4, help="concurrent fuzzing clients (default 4)")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--dtype", default="float32",
                        help="serving dtype (default float32, as the tests; bfloat16 is vLLM's CPU default)")
    parser.add_argument("--max-num-seqs", type=int, default=8,
                        help="small, so that requests reuse Caprese's state slots (default 8)")
    parser.add_argument("--rss-growth-mib", type=float, default=256,
                        help="allowed RSS growth of the server after the warm-up (default 256)")
    parser.add_argument("--config-cases", type=int, default=None,
                        help="how many serve-config cases to run (default all)")
    parser.add_argument("--adapter-cases", type=int, default=5,
                        help="how many corrupted adapters to serve (default 5)")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the server log here")
    args = parser.parse_args(argv)
    for path, what in ((args.model / "config.json", "--model"), (args.adapter / "caprese.json", "--adapter")):
        if not path.is_file():
            print(f"fault_harness: error: {what} {path.parent}: no {path.name}; pass the directory "
                  "holding it",
                  file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="fault-harness-"))
    log_dir = args.log_dir or workdir
    log_dir.mkdir(parents=True, exist_ok=True)
    name = "caprese-fuzz"
    print(f"starting vllm serve {args.model} (log: {log_dir / 'server.log'})", flush=True)
    server = Server(args.model, args.adapter, name, log_dir / "server.log", args.max_model_len,
                    ["--max-num-seqs", str(args.max_num_seqs)], dtype=args.dtype)
    try:
        print(f"request fuzz: {args.minutes:g} min, {args.workers} clients, seed {args.seed}", flush=True)
        report = run_fuzz(FuzzSettings(base_url=server.base_url, pid=server.proc.pid, seed=args.seed,
                                       limits=model_limits(args.model, name, args.max_model_len),
                                       seconds=args.minutes * 60, workers=args.workers,
                                       rss_growth_mib=args.rss_growth_mib), server.log)
    finally:
        server.stop()
    cases = config_cases()[:args.config_cases]
    print(f"serve-config fuzz: {len(cases)} cases; corrupted adapters: {args.adapter_cases}", flush=True)
    for case in cases:
        report.config_results.append((case.label, run_config_case(args.model, args.adapter, case)))
    report.adapter_results = run_adapter_cases(args.model, args.adapter, args.adapter_cases, args.seed,
                                               workdir)
    print(format_table(report))
    violations = report.violations()
    for line in violations:
        print(f"VIOLATION {line}".replace("$BASE_URL", server.base_url))
    if violations:
        print(f"server log: {log_dir / 'server.log'}")
    elif args.log_dir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
