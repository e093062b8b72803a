"""Bounded load test of a running Caprese server (loopback only): concurrency must not change answers.

    python benchmarks/load_test.py --base-url http://127.0.0.1:8000 --model smollm2-135m [--clients 32 --requests 4]
    python benchmarks/load_test.py ... --ci        # short: 32 clients x 2 requests, fewer distinct prompts

1. Reference: every distinct request (mixed prompt lengths, max_tokens, completions / chat, streamed
   or not) is served alone, one after another, greedy.
2. Load: C concurrent clients send R requests each, drawn from the same set, plus on purpose
   - aborts: a streamed request whose client closes the connection after a few chunks;
   - disconnects: a request whose client gives up (timeout) before the answer comes.
3. Checks: zero unexpected errors, every completed answer equal to its reference, the server
   healthy with no running or waiting request left afterwards (vLLM's own gauges), and the
   reference requests answered the same again (no request left state behind). Run the server
   with a small --max-num-seqs so that more requests than Caprese's state slots pass through.
Prints a p50 / p99 latency table per request kind; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx

TOPICS = ["the sea", "a train timetable", "prime numbers", "a lost key", "the moon", "bread baking",
          "a chess opening", "rain in the city", "a tiny robot", "the history of maps"]
MATH = ["What is {a} + {b} * {c}?", "Tom has {a} apples and buys {b} more bags of {c}. How many apples?",
        "What is the remainder when {a}{b} is divided by {c}?"]


@dataclass(frozen=True)
class Request:
    kind: str            # "completion" | "chat"
    prompt: str
    max_tokens: int
    stream: bool

    @property
    def label(self) -> str:
        return f"{self.kind}{'-stream' if self.stream else ''}"


@dataclass
class Outcome:
    request: Request
    text: str | None = None
    latency_s: float = 0.0
    error: str | None = None
    intended: str = ""   # "" | "abort" | "disconnect"


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def make_requests(count: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        if i % 3 == 0:
            prompt = "Please reason step by step. " + rng.choice(MATH).format(a=rng.randint(2, 99), b=rng.randint(2, 9),
                                                                             c=rng.randint(2, 9))
        else:  # lengths from a few tokens to a few hundred
            prompt = f"Write about {rng.choice(TOPICS)}. " + " ".join(rng.choice(TOPICS) for _ in range(rng.choice([0, 8, 60])))
        requests.append(Request(kind=rng.choice(["completion", "chat"]), prompt=prompt,
                                max_tokens=rng.choice([4, 16, 32, 48]), stream=rng.random() < 0.4))
    return requests


def body(model: str, req: Request) -> tuple[str, dict]:
    common = {"model": model, "max_tokens": req.max_tokens, "temperature": 0, "stream": req.stream}
    if req.kind == "chat":
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": req.prompt}]}
    return "/v1/completions", {**common, "prompt": req.prompt}


def _text(kind: str, choice: dict) -> str:
    if kind == "chat":
        part = choice.get("delta") or choice.get("message") or {}
        return part.get("content") or ""
    return choice.get("text") or ""


async def send(client: httpx.AsyncClient, model: str, req: Request, abort_after_chunks: int | None = None,
               timeout_s: float | None = None) -> Outcome:
    path, payload = body(model, req)
    out = Outcome(req)
    start = time.perf_counter()
    try:
        if req.stream:
            pieces = []
            async with client.stream("POST", path, json=payload, timeout=timeout_s) as resp:
                if resp.status_code != 200:
                    out.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                    return out
                chunks = 0
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: "):])
                    pieces += [_text(req.kind, c) for c in chunk.get("choices", [])]
                    chunks += 1
                    if abort_after_chunks is not None and chunks >= abort_after_chunks:
                        out.intended = "abort"
                        return out  # leaving the context closes the connection mid-stream
            out.text = "".join(pieces)
        else:
            resp = await client.post(path, json=payload, timeout=timeout_s)
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                return out
            out.text = _text(req.kind, resp.json()["choices"][0])
    except httpx.TimeoutException:
        if timeout_s is not None:
            out.intended = "disconnect"
        else:
            out.error = "timeout"
    except httpx.HTTPError as err:
        out.error = f"{type(err).__name__}: {err}"
    finally:
        out.latency_s = time.perf_counter() - start
    return out


async def gauges(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    values = {}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        found = re.findall(rf"^{re.escape(name)}{{[^}}]*}} ([0-9.e+]+)$", text, flags=re.M)
        values[name] = sum(float(v) for v in found)
    return values


async def run(args) -> Report:
    report = Report()
    distinct = make_requests(args.distinct, args.seed)
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=args.base_url, timeout=args.timeout, limits=limits) as client:
        if (await client.get("/health")).status_code != 200:
            report.failures.append("server not healthy before the test")
            return report
        print(f"reference: {len(distinct)} requests, one at a time", flush=True)
        reference = {}
        for req in distinct:
            out = await send(client, args.model, req)
            if out.error:
                report.failures.append(f"reference {req.label}: {out.error}")
            reference[req] = out.text

        rng = random.Random(args.seed + 1)

        async def client_task(cid: int) -> list[Outcome]:
            results = []
            for _ in range(args.requests):
                req = rng.choice(distinct)
                roll = rng.random()
                if roll < args.abort_fraction:
                    req = Request(req.kind, req.prompt, 48, True)  # long enough to be cut
                    out = await send(client, args.model, req, abort_after_chunks=2)
                    out.intended = "abort"  # (also when it ended before the cut: no reference for it)
                    results.append(out)
                elif roll < 2 * args.abort_fraction:
                    results.append(await send(client, args.model, req, timeout_s=0.05))
                else:
                    results.append(await send(client, args.model, req))
            return results

        print(f"load: {args.clients} clients x {args.requests} requests", flush=True)
        start = time.perf_counter()
        for results in await asyncio.gather(*(client_task(c) for c in range(args.clients))):
            report.outcomes += results
        wall = time.perf_counter() - start
        print(f"load done in {wall:.1f}s", flush=True)

        for out in report.outcomes:
            if out.error:
                report.failures.append(f"{out.request.label} ({out.request.max_tokens} tokens): {out.error}")
            elif not out.intended and out.text != reference[out.request]:
                report.failures.append(f"{out.request.label} differs from the same request served alone: "
                                       f"{out.text!r} vs {reference[out.request]!r}")

        deadline = time.monotonic() + 60  # aborted requests leave the engine within a step or two
        while True:
            left = await gauges(client)
            if not any(left.values()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        if any(left.values()):
            report.failures.append(f"requests still in the engine after the load: {left}")
        if (await client.get("/health")).status_code != 200:
            report.failures.append("server not healthy after the load")
        for req in distinct:
            again = await send(client, args.model, req)
            if again.error or again.text != reference[req]:
                report.failures.append(f"after the load, {req.label} answers {again.text!r} "
                                       f"({again.error}) instead of {reference[req]!r}")
    return report


def print_table(report: Report) -> None:
    rows: dict[str, list[float]] = {}
    for out in report.outcomes:
        key = out.intended or out.request.label
        if out.error is None:
            rows.setdefault(key, []).append(out.latency_s * 1000)
    errors = sum(1 for o in report.outcomes if o.error)
    print(f"\n{len(report.outcomes)} requests, {errors} errors, "
          f"{sum(1 for o in report.outcomes if o.intended == 'abort')} aborted mid-stream, "
          f"{sum(1 for o in report.outcomes if o.intended == 'disconnect')} client disconnects\n")
    print("| kind | n | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for key, values in sorted(rows.items()):
        values.sort()
        p99 = values[min(len(values) - 1, int(round(0.99 * (len(values) - 1))))]
        print(f"| {key} | {len(values)} | {statistics.median(values):.0f} | {p99:.0f} | {values[-1]:.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="the served model name")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--distinct", type=int, default=24, help="distinct requests the load draws from")
    parser.add_argument("--abort-fraction", type=float, default=0.1, help="of requests aborted, and again of disconnects")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ci", action="store_true", help="short run: 32 clients x 2 requests over 10 distinct ones")
    args = parser.parse_args(argv)
    if not re.match(r"^https?://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?$", args.base_url):
        parser.error("--base-url must be a loopback address (this is a load test)")
    if args.ci:
        args.clients, args.requests, args.distinct = 32, 2, 10
    report = asyncio.run(run(args))
    print_table(report)
    for line in report.failures[:20]:
        print("FAIL " + line)
    print("load test: " + ("PASSED" if not report.failures else f"FAILED ({len(report.failures)} problems)"))
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
