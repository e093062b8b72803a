"""Scores and answers of real vLLM (bf16, the served default) for the exactness tests, as JSON.

    python tests/vllm_exactness.py --model DIR [--adapter DIR] --out FILE

One engine, compiled as `vllm serve` runs, `--scheduling-policy priority`, max_num_seqs 4 and a KV cache of
exactly 4 blocks of 128 tokens (`num_gpu_blocks_override`: a byte budget gives a machine-dependent count):
  scores: the prompt tokens' logprobs of SCORED prompts (prompt_logprobs, as echo + logprobs and lm-eval's
    loglikelihood read them) and the first answer token's;
  batches: greedy answers of one prompt alone, beside one other prompt and beside three (ids and logprobs);
  children: n=4 children at top_k=1 of a prompt whose greedy answer has no tied top-2 logprobs (a tie
    lets top_k keep both tokens);
  preemption: PREEMPT_PROMPTS with priorities, answers of ~155 tokens (2 blocks each) for 4 running
    requests: they preempt each other; then each prompt alone (with an adapter only: dense vLLM passes it,
    checked once, 8 preemptions, and the CI's time is short).
Runs in a child process for the same reasons as tests/vllm_generate.py.
"""

import argparse
import json

SCORED = ["Q: Explain why the sky is blue.\nA:", "Once upon a time, in a small village,",
          "The quick brown fox jumps over the lazy dog. The dog"]
BATCH_PROMPT = "Once upon a time, in a small village,"
BATCH_OTHERS = ["Hi", "The capital of France is", "def fib(n):"]
CHILDREN_PROMPT = "The capital of France is"
PREEMPT_PROMPTS = [f"Story {i}: once upon a time, a {animal} lived in" for i, animal in
                   enumerate(["cat", "dog", "fox", "owl", "bear", "wolf", "hare", "mole", "frog", "crow", "lynx", "seal"])]


def _lp(step: dict) -> float:
    return next(iter(step.values())).logprob


def scoring(llm, SamplingParams) -> dict:  # noqa: N803 (vLLM's class, imported in main)
    out = llm.generate(SCORED, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0, logprobs=0))
    scores = [{"prompt_logprobs": [None] + [_lp(d) for d in o.prompt_logprobs[1:]],
               "first_token": list(o.outputs[0].token_ids), "first_logprob": _lp(o.outputs[0].logprobs[0])}
              for o in out]
    greedy = SamplingParams(temperature=0, max_tokens=24, logprobs=0, ignore_eos=True)

    def answer(prompts):
        o = llm.generate(prompts, greedy)[0].outputs[0]
        return {"token_ids": list(o.token_ids), "logprobs": [_lp(d) for d in o.logprobs]}

    batches = {"alone": answer([BATCH_PROMPT]), "with 1": answer([BATCH_PROMPT] + BATCH_OTHERS[:1]),
               "with 3": answer([BATCH_PROMPT] + BATCH_OTHERS)}
    alone = llm.generate([CHILDREN_PROMPT], SamplingParams(temperature=0, max_tokens=24, logprobs=1,
                                                           ignore_eos=True))[0].outputs[0]
    top2 = [sorted(v.logprob for v in d.values())[-2:] for d in alone.logprobs]
    children = llm.generate([CHILDREN_PROMPT], SamplingParams(temperature=1.0, top_k=1, n=4, seed=1, max_tokens=24,
                                                              ignore_eos=True))[0].outputs
    return {"scores": scores, "batches": batches,
            "children": {"alone": list(alone.token_ids), "tied_steps": [i for i, t in enumerate(top2)
                                                                          if len(t) == 2 and t[0] == t[1]],
                         "children": [list(c.token_ids) for c in children]}}


def preemption(llm, SamplingParams) -> dict:  # noqa: N803
    params = SamplingParams(temperature=0, max_tokens=140, ignore_eos=True)
    priorities = [i % 4 for i in range(len(PREEMPT_PROMPTS))]
    outputs = llm.generate(PREEMPT_PROMPTS, params, priority=priorities)
    together = [list(o.outputs[0].token_ids) for o in outputs]
    # per request (RequestOutput.metrics, vllm/v1/metrics/stats.py RequestStateStats), and vLLM's counter
    per_request = [getattr(o.metrics, "num_preemptions", None) for o in outputs]
    counter = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    alone = [list(llm.generate([p], params)[0].outputs[0].token_ids) for p in PREEMPT_PROMPTS]
    cache = llm.llm_engine.vllm_config.cache_config
    return {"together": together, "alone": alone, "preemptions": counter, "preemptions_per_request": per_request,
            "kv_cache": {"num_blocks": cache.num_gpu_blocks, "block_size": cache.block_size}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    extra = {"additional_config": {"caprese_adapter": args.adapter}} if args.adapter else {}
    # SmolLM2-135M in bf16: 30 layers x 2 x 3 KV heads x 64 x 2 bytes = 22.5 KiB a token; the byte budget
    # holds 8 blocks of 128 tokens, the override keeps 4 (one is vLLM's null block: 3 for requests)
    llm = LLM(model=args.model, dtype="bfloat16", max_model_len=256, enforce_eager=False,
              kv_cache_memory_bytes=8 * 128 * 23040, num_gpu_blocks_override=4, seed=0, enable_prefix_caching=False, max_num_seqs=4,
              scheduling_policy="priority", disable_log_stats=False, **extra)
    result = scoring(llm, SamplingParams)
    if args.adapter:
        result["preemption"] = preemption(llm, SamplingParams)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
