"""Run real vLLM offline generation in a fresh process and write the results as JSON.

Tests start vLLM through this script rather than in the pytest process: vLLM spawns an engine
core and workers, grabs memory for its KV cache, and logs from every process; a child process
keeps all of that contained and lets the test read the complete log.

    python tests/vllm_generate.py --model DIR --prompts-json '["..."]' --max-tokens N --out FILE [--dtype float32]
"""

import argparse
import json

# An explicit KV-cache size: on the CPU backend vLLM otherwise reserves a fraction (0.92) of the
# NUMA node's memory, which fails on a shared 24 GiB machine; tiny test models need little.
KV_CACHE_BYTES = 1 << 30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts-json", required=True)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", required=True)
    parser.add_argument("--additional-config", default=None, help="JSON for vLLM's --additional-config")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--distributed-executor-backend", default=None, help="e.g. mp")
    parser.add_argument("--enforce-eager", type=int, default=1)
    parser.add_argument("--compilation-config", default=None, help="JSON for vLLM's compilation_config")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate max_tokens tokens")
    parser.add_argument("--logprobs", type=int, default=None, help="also write each step's top-N logprobs")
    parser.add_argument("--chat", action="store_true", help="each prompt framed as distillation frames questions: "
                        "a user turn of the chat template (a Q/A frame for base models)")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    extra = {}
    if args.additional_config:
        extra["additional_config"] = json.loads(args.additional_config)
    if args.max_num_batched_tokens:
        extra["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.max_num_seqs:
        extra["max_num_seqs"] = args.max_num_seqs
    if args.pipeline_parallel_size != 1:
        extra["pipeline_parallel_size"] = args.pipeline_parallel_size
    if args.tensor_parallel_size != 1:
        extra["tensor_parallel_size"] = args.tensor_parallel_size
    if args.distributed_executor_backend:
        extra["distributed_executor_backend"] = args.distributed_executor_backend
    if args.compilation_config:
        extra["compilation_config"] = json.loads(args.compilation_config)
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=1024, enforce_eager=bool(args.enforce_eager),
              kv_cache_memory_bytes=KV_CACHE_BYTES, seed=0, **extra)
    prompts = json.loads(args.prompts_json)
    inputs = prompts
    if args.chat:
        from distill.data import prompt_ids_for

        tokenizer = llm.get_tokenizer()
        inputs = [{"prompt_token_ids": prompt_ids_for(tokenizer, p)} for p in prompts]
    outputs = llm.generate(inputs, SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                                ignore_eos=args.ignore_eos, logprobs=args.logprobs))
    result = [{"prompt": p, "token_ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text}
              for p, o in zip(prompts, outputs)]
    if args.logprobs:
        for row, o in zip(result, outputs):  # per step: [[token_id, logprob], ...], best first
            row["logprobs"] = [sorted(([t, lp.logprob] for t, lp in step.items()), key=lambda x: -x[1])
                               for step in o.outputs[0].logprobs]
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
