"""Generators for the fault harness (issue 17, last section): fuzzed OpenAI requests, bad serve-time
settings and corrupted adapters. Pure data, no I/O: `benchmarks/fault_harness.py` sends and checks them,
`tests/test_fault_harness.py` runs its short mode.

Every generated case says what a correct server must do with it:
- a request is `expect="ok"` (valid: HTTP 200), `"4xx"` (exactly one invalid parameter, named in
  `kind`: vLLM must refuse it with a 4xx) or `"any"` (validity depends on vLLM details the harness does
  not model: any status below 500 is fine);
- a serve-config case must make `vllm serve` exit non-zero with one `vllm: error:` line naming
  `fragment`, before any engine starts.
Everything is drawn from one `random.Random(seed)`: the same seed gives the same cases.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Literal

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"

Expect = Literal["ok", "4xx", "any"]
Action = Literal["send", "abort", "disconnect"]

# The fixed greedy probe: the same text before, during and after the fuzz (a changed answer means a request
# left state behind or a neighbour in the batch changed it).
PROBE_PROMPT = "Question: What is 7 times 8?\nAnswer:"
PROBE_MAX_TOKENS = 16

WORDS = ["the", "sea", "train", "prime", "number", "key", "moon", "bread", "chess", "rain", "robot", "map",
         "seven", "eight", "apple", "river"]
UNICODE = ["Ünïcödé façade naïve", "日本語のテキスト、句読点。", "emoji 🙂🚀👩‍👩‍👧 flags 🇫🇷",
           "RTL: مرحبا بالعالم שלום", "combining: e\u0301 a\u0308 Z\u0335\u0336",
           "zero width\u200b\u200d joiner",
           "math ∑∫√∞ ≠ ≤", "NUL\u0000inside", "tabs\tand\nnewlines\r\n", "\ufeffBOM first", "\U0001f600" * 8]
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@dataclass(frozen=True)
class FuzzRequest:
    """One request to send. `kind` is the table's row label (`completion`, `chat-stream`, `abort`,
    `invalid:<param>`, ...); `notes` lists the parameters drawn (for reproducing a failure)."""

    kind: str
    path: str
    body: dict
    expect: Expect
    action: Action = "send"
    notes: tuple[str, ...] = ()

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    def repro(self, base_url: str) -> str:
        """A curl command line that sends this request again."""
        return (f"curl -sS {base_url}{self.path} -H 'Content-Type: application/json' "
                f"-d '{json.dumps(self.body)}'")


@dataclass(frozen=True)
class ModelLimits:
    """What the generators need to know about the served model: name, vocabulary size (token ids
    >= vocab_size are invalid), max_model_len (the context length vLLM was started with), max_logprobs."""

    name: str
    vocab_size: int
    max_model_len: int
    max_logprobs: int = 20


def probe_body(model: str) -> dict:
    """The greedy probe request (completions, temperature 0)."""
    return {"model": model, "prompt": PROBE_PROMPT, "max_tokens": PROBE_MAX_TOKENS, "temperature": 0}


# ---- prompts -----------------------------------------------------------------------------------------------


def _text(rng: random.Random) -> str:
    pick = rng.random()
    if pick < 0.25:
        return rng.choice(UNICODE)
    if pick < 0.35:
        return rng.choice(UNICODE) + " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 24)))


def _long_text(rng: random.Random, words: int) -> str:
    """About `words` tokens (" word" is one token for the small models' BPE vocabularies)."""
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _completion_prompt(rng: random.Random, limits: ModelLimits, notes: list[str]):
    pick = rng.random()
    if pick < 0.45:
        notes.append("prompt=text")
        return _text(rng)
    if pick < 0.6:
        notes.append("prompt=list")
        return [_text(rng) for _ in range(rng.randint(1, 3))]
    if pick < 0.75:
        notes.append("prompt=token-ids")
        return [rng.randrange(limits.vocab_size) for _ in range(rng.randint(1, 40))]
    if pick < 0.9:
        notes.append("prompt=token-id-lists")
        return [[rng.randrange(limits.vocab_size) for _ in range(rng.randint(1, 20))]
                for _ in range(rng.randint(1, 3))]
    notes.append("prompt=long")
    return _long_text(rng, rng.randint(limits.max_model_len // 8, limits.max_model_len // 4))


def _messages(rng: random.Random, limits: ModelLimits, notes: list[str]) -> list[dict]:
    if rng.random() < 0.1:
        notes.append("messages=long")
        return [{"role": "user", "content": _long_text(rng, rng.randint(limits.max_model_len // 8,
                                                                          limits.max_model_len // 4))}]
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": _text(rng)})
    for _ in range(rng.choice([0, 0, 1, 2])):
        messages += [{"role": "user", "content": _text(rng)}, {"role": "assistant", "content": _text(rng)}]
    content = _text(rng)
    if rng.random() < 0.2:
        notes.append("content=parts")
        content = [{"type": "text", "text": content}, {"type": "text", "text": _text(rng)}]
    messages.append({"role": "user", "content": content})
    return messages


# ---- valid parameters --------------------------------------------------------------------------------------


def _sampling(rng: random.Random, body: dict, notes: list[str]) -> None:
    """max_tokens, min_tokens, temperature/top_k/top_p, seed, n, stop: all within vLLM's documented ranges."""
    body["max_tokens"] = rng.randint(1, 12)
    if rng.random() < 0.3:
        body["min_tokens"] = rng.randint(0, body["max_tokens"])
    if rng.random() < 0.4:
        body["temperature"] = 0
    else:
        body["temperature"] = rng.choice([0.3, 0.7, 1.0, 1.5, 2.0])
        if rng.random() < 0.5:
            body["top_k"] = rng.choice([-1, 0, 1, 5, 50])
        if rng.random() < 0.5:
            body["top_p"] = rng.choice([0.05, 0.5, 0.9, 1.0])
    if rng.random() < 0.4:
        body["seed"] = rng.choice([0, 1, 2**31 - 1, -5, rng.randrange(2**63)])
    if rng.random() < 0.3 and body["temperature"] > 0:  # vLLM: "n must be 1 when using greedy sampling"
        body["n"] = rng.randint(2, 3)
    if rng.random() < 0.3:
        body["stop"] = rng.choice(["\n", ["the", "."], [rng.choice(UNICODE)[:3]], ["x" * 40]])
    if rng.random() < 0.1:
        body["ignore_eos"] = True
    notes.extend(k for k in ("min_tokens", "top_k", "top_p", "seed", "n", "stop", "ignore_eos") if k in body)


def _structured(rng: random.Random, endpoint: str, body: dict, notes: list[str]) -> None:
    """Structured outputs (vLLM 0.32's `structured_outputs`, chat's `response_format`): json schema, regex,
    choice."""
    pick = rng.choice(["json", "regex", "choice", "response_format"])
    notes.append(f"structured={pick}")
    if pick == "json":
        body["structured_outputs"] = {"json": SCHEMA}
    elif pick == "regex":
        body["structured_outputs"] = {"regex": r"[0-9]{1,3}( apples)?"}
    elif pick == "choice":
        body["structured_outputs"] = {"choice": ["yes", "no", "maybe 🙂"]}
    elif endpoint == CHAT:
        body["response_format"] = rng.choice([
            {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}])
    else:
        body["structured_outputs"] = {"json": SCHEMA}


def valid_request(rng: random.Random, limits: ModelLimits) -> FuzzRequest:
    """A request vLLM must answer with 200 (streamed or not)."""
    notes: list[str] = []
    endpoint = COMPLETIONS if rng.random() < 0.6 else CHAT
    body: dict = {"model": limits.name}
    _sampling(rng, body, notes)
    if endpoint == COMPLETIONS:
        body["prompt"] = _completion_prompt(rng, limits, notes)
        if rng.random() < 0.35:
            body["logprobs"] = rng.randint(0, 5)
            notes.append("logprobs")
        if rng.random() < 0.2:
            body["echo"] = True
            notes.append("echo")
        if rng.random() < 0.1:
            body["prompt_logprobs"] = rng.randint(0, 3)
            notes.append("prompt_logprobs")
        if rng.random() < 0.1:
            body["best_of"] = body.get("n", 1)  # not a field of vLLM 0.32 (ignored with a warning)
            notes.append("best_of")
    else:
        body["messages"] = _messages(rng, limits, notes)
        if rng.random() < 0.35:
            body["logprobs"] = True
            body["top_logprobs"] = rng.randint(0, 5)
            notes.append("logprobs")
    if rng.random() < 0.15:
        _structured(rng, endpoint, body, notes)
    if rng.random() < 0.3 and "prompt_logprobs" not in body:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    kind = ("completion" if endpoint == COMPLETIONS else "chat") + ("-stream" if body.get("stream") else "")
    return FuzzRequest(kind=kind, path=endpoint, body=body, expect="ok", notes=tuple(notes))


# ---- invalid parameters: one per request, each one vLLM documents a 4xx for -------------------------------

def _invalid_mutations(limits: ModelLimits) -> dict[str, tuple[str | None, dict]]:
    """name -> (endpoint it applies to or None for both, the fields that make the request invalid)."""
    too_long = " ".join(["word"] * (limits.max_model_len + 200))
    return {
        "n=0": (None, {"n": 0}),
        "n<0": (None, {"n": -2}),
        "max_tokens=0": (COMPLETIONS, {"max_tokens": 0}),
        "max_tokens<0": (None, {"max_tokens": -5}),
        "max_tokens>context": (None, {"max_tokens": limits.max_model_len * 4}),
        "min_tokens>max_tokens": (None, {"max_tokens": 4, "min_tokens": 9}),
        "min_tokens<0": (None, {"min_tokens": -1}),
        "temperature<0": (None, {"temperature": -0.5}),
        "temperature>2": (None, {"temperature": 7.0}),
        "temperature=str": (None, {"temperature": "hot"}),
        "top_p=0": (None, {"temperature": 1.0, "top_p": 0.0}),
        "top_p>1": (None, {"temperature": 1.0, "top_p": 1.5}),
        "top_k<-1": (None, {"temperature": 1.0, "top_k": -7}),
        "top_k=float": (None, {"temperature": 1.0, "top_k": 2.5}),
        "logprobs>max": (COMPLETIONS, {"logprobs": limits.max_logprobs + 5}),
        "logprobs<-1": (COMPLETIONS, {"logprobs": -3}),
        "top_logprobs>max": (CHAT, {"logprobs": True, "top_logprobs": limits.max_logprobs + 5}),
        "prompt_logprobs+stream": (COMPLETIONS, {"prompt_logprobs": 2, "stream": True}),
        "stop=empty": (None, {"stop": [""]}),
        "seed>int64": (None, {"seed": 2**70}),
        "presence_penalty>2": (None, {"presence_penalty": 5}),
        "repetition_penalty=0": (None, {"repetition_penalty": 0}),
        "prompt>context": (COMPLETIONS, {"prompt": too_long}),
        "messages>context": (CHAT, {"messages": [{"role": "user", "content": too_long}]}),
        "prompt=empty": (COMPLETIONS, {"prompt": ""}),
        "prompt=object": (COMPLETIONS, {"prompt": {"text": "hi"}}),
        "token-id>=vocab": (COMPLETIONS, {"prompt": [1, 2, limits.vocab_size + 17]}),
        "token-id<0": (COMPLETIONS, {"prompt": [1, -4, 2]}),
        "messages=empty": (CHAT, {"messages": []}),
        "n>1 greedy": (None, {"n": 2, "temperature": 0}),
        "message=no-content-type": (CHAT, {"messages": [{"role": "user", "content": [{"type": "nope"}]}]}),
        "structured=two": (None, {"structured_outputs": {"regex": "[a-z]+", "choice": ["a", "b"]}}),
        "structured=bad-regex": (None, {"structured_outputs": {"regex": "(unclosed[a-"}}),
        "structured=bad-schema": (None, {"structured_outputs": {"json": {"type": "no-such-type"}}}),
        "model=unknown": (None, {"model": "no-such-model"}),
    }


def invalid_request(rng: random.Random, limits: ModelLimits) -> FuzzRequest:
    """A valid request with exactly one parameter made invalid: vLLM must refuse it with a 4xx."""
    mutations = _invalid_mutations(limits)
    name = rng.choice(sorted(mutations))
    endpoint, patch = mutations[name]
    base = valid_request(rng, limits)
    while endpoint is not None and base.path != endpoint:
        base = valid_request(rng, limits)
    body = {k: v for k, v in base.body.items() if k not in ("structured_outputs", "response_format")}
    body.update(patch)
    keeps_min = name not in ("min_tokens>max_tokens", "min_tokens<0")
    if "min_tokens" in body and "max_tokens" in body and keeps_min:
        body["min_tokens"] = min(body["min_tokens"], max(body["max_tokens"], 0))
    if name in ("max_tokens=0", "max_tokens<0", "max_tokens>context"):
        body.pop("min_tokens", None)
        body.pop("echo", None)  # echo with max_tokens 0 is valid: the prompt alone
    return FuzzRequest(kind=f"invalid:{name}", path=base.path, body=body, expect="4xx",
                       notes=(*base.notes, name))


def aborted_request(rng: random.Random, limits: ModelLimits) -> FuzzRequest:
    """A long streamed request whose client closes the connection after the first chunk ("abort"), or a
    non-streamed one whose client gives up before the answer ("disconnect")."""
    base = valid_request(rng, limits)
    drop = ("structured_outputs", "response_format", "stop", "min_tokens", "prompt_logprobs", "stream",
            "stream_options")
    body = {k: v for k, v in base.body.items() if k not in drop}
    body["max_tokens"] = rng.randint(24, 64)
    if rng.random() < 0.6:
        body["stream"] = True
        return FuzzRequest(kind="abort", path=base.path, body=body, expect="ok", action="abort",
                           notes=base.notes)
    return FuzzRequest(kind="disconnect", path=base.path, body=body, expect="any", action="disconnect",
                       notes=base.notes)


def fuzz_requests(seed: int, limits: ModelLimits) -> "RequestStream":
    """An endless, reproducible stream of fuzzed requests (about 55% valid, 30% invalid, 15% aborted)."""
    return RequestStream(random.Random(seed), limits)


@dataclass
class RequestStream:
    rng: random.Random
    limits: ModelLimits
    count: int = field(default=0)

    def __iter__(self):
        return self

    def __next__(self) -> FuzzRequest:
        self.count += 1
        pick = self.rng.random()
        if pick < 0.55:
            return valid_request(self.rng, self.limits)
        if pick < 0.85:
            return invalid_request(self.rng, self.limits)
        return aborted_request(self.rng, self.limits)


# ---- serve-time settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigCase:
    """`vllm serve MODEL <args>` that must stop before any engine starts: exit status != 0 and one
    `vllm: error:` line containing `fragment` (ADAPTER in args is replaced by a valid adapter path)."""

    label: str
    args: tuple[str, ...]
    fragment: str
    # where vllm serve refuses it: "argv" the flag translation (caprese_vllm/cli_flags.py, ~10 s on 2 cores),
    # "settings" CapreseServeConfig (engine/config.py), "engine-config" the adapter/model checks of plugin.py
    # create_engine_config (needs the files and vLLM's model config); the last two take ~20 s; no engine
    # starts in any of them
    stage: Literal["argv", "settings", "engine-config"] = "settings"


def _json_case(label: str, config: dict, fragment: str) -> ConfigCase:
    return ConfigCase(label, ("--additional-config", json.dumps(config)), fragment)


def config_cases() -> list[ConfigCase]:
    """Every wrong-type / out-of-range / unknown serve-time setting the harness knows, as flags and as
    --additional-config JSON (the `stage="argv"` ones fail in the flag translation, in ~10 s on 2 cores)."""
    a = "ADAPTER"
    bad = "--additional-config caprese_"
    cases = [
        ConfigCase("flag density=word", ("--caprese-adapter", a, "--caprese-density", "half"),
                   "--caprese-density: invalid value 'half'", "argv"),
        ConfigCase("flag density no value", ("--caprese-adapter", a, "--caprese-density"),
                   "--caprese-density needs a value", "argv"),
        ConfigCase("flag kernels=fast", ("--caprese-adapter", a, "--caprese-kernels", "fast"),
                   "--caprese-kernels: invalid value 'fast'", "argv"),
        ConfigCase("flag fingerprint=maybe", ("--caprese-adapter", a, "--caprese-check-fingerprint", "maybe"),
                   "--caprese-check-fingerprint: invalid value 'maybe'", "argv"),
        ConfigCase("flag unknown", ("--caprese-adapter", a, "--caprese-sparsity", "0.5"),
                   "unknown flag --caprese-sparsity", "argv"),
        ConfigCase("flag adapter empty", ("--caprese-adapter=",), "--caprese-adapter is empty", "argv"),
        ConfigCase("json not an object", ("--caprese-adapter", a, "--additional-config", "[1, 2]"),
                   "is not a JSON object", "argv"),
        ConfigCase("json conflicting density", ("--caprese-adapter", a, "--caprese-density", "0.5",
                                                "--additional-config", '{"caprese_density": 0.4}'),
                   "caprese_density is set twice", "argv"),
        ConfigCase("flag density>1", ("--caprese-adapter", a, "--caprese-density", "1.5"),
                   bad + "density: Input should be less than or equal to 1"),
        ConfigCase("flag density=0", ("--caprese-adapter", a, "--caprese-density", "0"),
                   bad + "density: Input should be greater than 0"),
        ConfigCase("flag density=nan", ("--caprese-adapter", a, "--caprese-density", "nan"),
                   bad + "density: Input should be"),
        ConfigCase("flag density keeps no neuron", ("--caprese-adapter", a, "--caprese-density", "1e-9"),
                   "keeps int(", "engine-config"),
        ConfigCase("flag kernels=on on CPU", ("--caprese-adapter", a, "--caprese-kernels", "on"),
                   "caprese_kernels=on: they need a CUDA device", "engine-config"),
        ConfigCase("flag adapter missing", ("--caprese-adapter", "/nonexistent/caprese-adapter"),
                   "adapter directory does not exist", "engine-config"),
        _json_case("json density=string", {"caprese_adapter": a, "caprese_density": "half"},
                   bad + "density: Input should be a valid number"),
        _json_case("json density=list", {"caprese_adapter": a, "caprese_density": [0.5]},
                   bad + "density: Input should be a valid number"),
        _json_case("json density<0", {"caprese_adapter": a, "caprese_density": -0.25},
                   bad + "density: Input should be greater than 0"),
        _json_case("json density=inf", {"caprese_adapter": a, "caprese_density": float("inf")},
                   bad + "density: Input should be"),
        _json_case("json adapter=int", {"caprese_adapter": 5}, bad + "adapter: Input is not a valid path"),
        _json_case("json adapter=null", {"caprese_adapter": None},
                   bad + "adapter: Input is not a valid path"),
        _json_case("json adapter=list", {"caprese_adapter": [a]}, bad + "adapter: Input is not a valid path"),
        _json_case("json adapter=blank", {"caprese_adapter": "  "}, bad + "adapter: Value error, empty"),
        _json_case("json kernels=fast", {"caprese_adapter": a, "caprese_kernels": "fast"},
                   bad + "kernels: Input should be 'auto', 'on' or 'off'"),
        # words are read in any case on every route (engine/config.py ANY_CASE_FIELDS): "ON" is "on", refused on
        # the CPU as the flag's "on" is, not as a bad word
        ConfigCase("json kernels=ON on CPU", ("--additional-config", json.dumps({"caprese_adapter": a,
                                                                                "caprese_kernels": "ON"})),
                   "caprese_kernels=on: they need a CUDA device", "engine-config"),
        _json_case("json kernels=int", {"caprese_adapter": a, "caprese_kernels": 1},
                   bad + "kernels: Input should be 'auto', 'on' or 'off'"),
        _json_case("json fingerprint=maybe", {"caprese_adapter": a, "caprese_check_fingerprint": "maybe"},
                   bad + "check_fingerprint: Input should be a valid boolean"),
        _json_case("json fingerprint=list", {"caprese_adapter": a, "caprese_check_fingerprint": [True]},
                   bad + "check_fingerprint: Input should be a valid boolean"),
        _json_case("json unknown key", {"caprese_adapter": a, "caprese_sparsity": 0.5},
                   bad + "sparsity: Extra inputs are not permitted"),
        _json_case("json dashed key", {"caprese-adapter": a}, "did you mean caprese_adapter?"),
        _json_case("json capitalised key", {"caprese_adapter": a, "Caprese_Density": 0.5},
                   "did you mean caprese_density?"),
        _json_case("json settings without adapter", {"caprese_density": 0.5}, "but no caprese_adapter"),
    ]
    return cases


# Wrong types that are accepted today (pydantic's lax coercion): a bool or a string where a number is meant.
# Kept apart so the tests can mark them; the lead decides whether CapreseServeConfig becomes strict.
LAX_CONFIG_CASES = [
    _json_case("json density=true", {"caprese_adapter": "ADAPTER", "caprese_density": True},
               "--additional-config caprese_density: Input should be a valid number"),
    _json_case("json density='0.5'", {"caprese_adapter": "ADAPTER", "caprese_density": "0.5"},
               "--additional-config caprese_density: Input should be a valid number"),
]


def case_args(case: ConfigCase, adapter: str) -> list[str]:
    """The case's vllm serve arguments, ADAPTER replaced by a real adapter directory (also inside JSON)."""
    return [arg.replace("ADAPTER", adapter) for arg in case.args]


# ---- corrupted adapters ------------------------------------------------------------------------------------


def corrupt_bytes(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random corruption of a file's bytes: (what was done, the new bytes). Flip bits, truncate, cut a
    hole, append junk or duplicate a slice (the same kinds as tests/test_adapter.py's in-process fuzz)."""
    kind = rng.choice(["flip", "truncate", "hole", "append", "duplicate"])
    n = len(data)
    if kind == "flip":
        out = bytearray(data)
        at = sorted(rng.sample(range(n), min(n, rng.randint(1, 8))))  # distinct: no flip undoes another
        for i in at:
            out[i] ^= 1 << rng.randrange(8)
        return f"flip bits at {at}", bytes(out)
    if kind == "truncate":
        cut = rng.randrange(n)
        return f"truncate to {cut} bytes", data[:cut]
    if kind == "hole":
        a, width = rng.randrange(n), rng.randint(1, 64)
        return f"remove bytes {a}..{a + width}", data[:a] + data[a + width:]
    if kind == "append":
        junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        return f"append {len(junk)} junk bytes", data + junk
    a = rng.randrange(n)
    return f"duplicate bytes {a}..{a + 32}", data[:a] + data[a:a + 32] + data[a:]
