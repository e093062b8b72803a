"""Non-finite activations: GRIFFIN's selection is defined for any statistic, masking never lets a NaN
through, and a non-finite statistic is logged and counted (issue 16 deliverable 2b, issue 17 items 6, 8).

Unit tests on CPU for every layer of it (selection, reference sparsifier, portable ops, engine batch
state, the cross-process counter), then the real engine: SmolLM2 whose embedding row of one rare token
is +Inf, served by `vllm serve` with a random adapter, a batch mixing a prompt with that token and
normal prompts.
"""

from __future__ import annotations

import json
import logging
import math
import urllib.request

import numpy as np
import pytest
import torch

from caprese_vllm.adapter import base_info_from_dir, synthetic_adapter
from caprese_vllm.engine import ops  # noqa: F401  (registers torch.ops.caprese.*)
from caprese_vllm.engine.batch_state import CapreseBatchState
from caprese_vllm.engine.nonfinite import NonfiniteMonitor, read_total, write_count
from caprese_vllm.engine.step_info import StepInfo
from caprese_vllm.lowrank import lowrank_forward
from caprese_vllm.methods import MethodSpec, default_layers
from caprese_vllm.methods.griffin import griffin_accumulate, griffin_indices, griffin_keep, griffin_select
from caprese_vllm.reference.sparsifiers import GriffinSparsifier
from conftest import VllmServer

NAN, INF = float("nan"), float("inf")


def expected_selection(row: list[float], k: int) -> list[int]:
    """The documented rule, written out: finite values first, largest first; non-finite last; ties -> lowest index."""
    order = sorted(range(len(row)), key=lambda j: (0, -row[j], j) if math.isfinite(row[j]) else (1, 0, j))
    return sorted(order[:k])


def check_selection(stat: torch.Tensor, k: int) -> None:
    idx = griffin_select(stat, k)
    keep = griffin_keep(stat, k)
    assert idx.shape == (*stat.shape[:-1], k) and bool((keep.sum(-1) == k).all())
    flat_stat, flat_idx = stat.reshape(-1, stat.shape[-1]), idx.reshape(-1, k)
    for row, got in zip(flat_stat.tolist(), flat_idx.tolist()):
        assert got == expected_selection(row, k), (row, got)  # k distinct, in range, ascending, as defined


@pytest.mark.parametrize("name,row", [
    ("nan", [1.0, NAN, 3.0, 0.5, 2.0, 0.1]),
    ("+inf", [1.0, INF, 3.0, 0.5, 2.0, 0.1]),
    ("-inf", [1.0, -INF, 3.0, 0.5, 2.0, 0.1]),
    ("all equal", [0.7] * 6),
    ("all nan", [NAN] * 6),
    ("all +inf", [INF] * 6),
    ("mixed non-finite", [NAN, INF, -INF, 2.0, NAN, 1.0]),
    ("nan at the k-th place", [3.0, 2.0, NAN, NAN, 0.0, 0.0]),
])
def test_selection_is_defined_for_any_statistic(name, row):
    for k in (1, 3, 6):
        check_selection(torch.tensor([row]), k)


def test_selection_of_random_statistics_with_random_non_finite_entries():
    gen = torch.Generator().manual_seed(0)
    stat = torch.rand(3, 5, 200, generator=gen)
    stat[0, 0] = NAN                                             # a whole row NaN
    stat[1, 1, ::3] = INF
    poison = torch.rand(stat.shape, generator=gen) < 0.1
    stat = torch.where(poison, torch.tensor([NAN, INF, -INF])[torch.randint(0, 3, stat.shape, generator=gen)], stat)
    stat[2, 2, 10:60] = 0.25                                     # ties across the k-th value
    for k in (1, 37, 100, 200):
        check_selection(stat, k)


def test_finite_statistics_select_as_before():
    stat = torch.rand(2, 3, 1000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(griffin_select(stat, 400), torch.topk(stat, 400, dim=-1).indices.sort(dim=-1).values)


def test_k_outside_one_to_i_is_refused():
    for k in (0, 7):
        with pytest.raises(ValueError, match=f"k={k} of 6 neurons"):
            griffin_keep(torch.zeros(1, 6), k)


def test_indices_stay_in_range_for_any_keep_mask():
    keep = torch.tensor([[True] * 6, [False] * 6, [True, False, True, False, False, False]])
    idx = griffin_indices(keep, 3)
    assert idx.tolist() == [[0, 1, 2], [0, 0, 0], [0, 2, 0]]


def test_masked_out_tokens_never_reach_the_statistic():
    z = torch.rand(1, 4, 8, generator=torch.Generator().manual_seed(2))
    poisoned = z.clone()
    poisoned[0, 3] = NAN                                         # a padding / generated token
    poisoned[0, 2, 1] = INF
    mask = torch.tensor([[True, True, False, False]])
    clean = griffin_accumulate(torch.zeros(1, 8), z, mask)
    assert torch.equal(griffin_accumulate(torch.zeros(1, 8), poisoned, mask), clean)


def test_reference_sparsifier_with_a_nan_prompt_keeps_k_in_range_neurons():
    sparsifier = GriffinSparsifier(intermediate_size=16, density=0.25)
    z = torch.rand(2, 5, 16, generator=torch.Generator().manual_seed(3))
    z[0, 2] = NAN                                                # sequence 0's prompt overflowed
    z[1, 4] = INF                                                # sequence 1: a padding token
    mask = torch.tensor([[True] * 5, [True] * 4 + [False]])
    sparsifier.observe(z, z, mask)
    keep = sparsifier.keep_mask(torch.zeros(2, 1, 16))
    assert keep.shape == (2, 1, 16) and keep.sum(-1).tolist() == [[4], [4]]
    assert keep[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3], "all-NaN statistic: neurons 0..k-1"
    clean = griffin_select(griffin_accumulate(torch.zeros(1, 16), z[1:, :4], mask[1:, :4]), 4)
    assert keep[1, 0].nonzero().flatten().tolist() == clean[0].tolist(), "padding's Inf changed nothing"


def test_portable_ops_select_with_where():
    """griffin_sparsify: a decode token's NaN stays out of the statistic, an unselected neuron's Inf out of
    the output; cats_sparsify likewise."""
    inter = 8
    stat_sq = torch.zeros(2, inter)
    neuron_idx = torch.tensor([[1, 5], [0, 1]])
    z = torch.rand(3, inter, generator=torch.Generator().manual_seed(4))
    z[1, 0] = INF                                                # token 1 decodes slot 0: neuron 0 unselected
    z[2] = NAN                                                   # token 2 decodes slot 0 too, all NaN
    token_slot, token_stat = torch.tensor([0, 0, 0]), torch.tensor([True, False, False])
    token_dense = torch.tensor([True, False, False])
    out = torch.ops.caprese.griffin_sparsify(z, token_slot, token_stat, token_dense, stat_sq, neuron_idx)
    assert bool(torch.isfinite(stat_sq).all()) and torch.equal(out[0], z[0])
    expected = torch.zeros(inter)
    expected[[1, 5]] = z[1, [1, 5]]
    assert torch.equal(out[1], expected), "the unselected neuron's Inf must not leak (Inf * 0 = NaN)"
    gate = torch.tensor([[5.0, 0.0]])
    out = torch.ops.caprese.cats_sparsify(torch.tensor([[1.0, INF]]), gate, torch.tensor([False]), 1.0, "silu")
    assert out.tolist() == [[1.0, 0.0]]


def test_lowrank_product_runs_in_float32_for_half_precision_inputs():
    """fp16 x @ A overflows (> 65504) although x @ A @ B is small: computed in float32, it is finite."""
    x = torch.full((2, 64), 4.0, dtype=torch.float16)
    a = torch.full((64, 4), 1e3, dtype=torch.float16)
    b = torch.full((4, 64), 1e-4, dtype=torch.float16)
    assert not bool(torch.isfinite((x @ a) @ b).all()), "the premise: the half-precision product overflows"
    y = lowrank_forward(x, a, b)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), (x.double() @ a.double() @ b.double()).float(), rtol=1e-3, atol=1e-3)


class Engine:
    """One CapreseBatchState with two GRIFFIN layers (model layers 3 and 7) fed through the portable op."""

    INTER, K = 32, 8

    def __init__(self, stats_dir=None, warn_interval_s=60.0, device="cpu"):
        self.device = torch.device(device)
        self.state = CapreseBatchState(max_slots=4, max_tokens=64, device=self.device, griffin_layers=2,
                                       intermediate_size=self.INTER, griffin_k=self.K)
        self.layers = [self.state.add_griffin_layer(self.INTER, self.K, layer_idx=i) for i in (3, 7)]
        self.state.nonfinite = NonfiniteMonitor(self.state.griffin_layer_ids, stats_dir, warn_interval_s)
        self.z: dict[str, torch.Tensor] = {}

    def step(self, reqs):
        """reqs: (req_id, chunk_start, num_tokens, prompt_len); in prefill while chunk_start < prompt_len."""
        info = StepInfo(req_ids=[r[0] for r in reqs], num_scheduled=np.array([r[2] for r in reqs]),
                        chunk_start=np.array([r[1] for r in reqs]), prompt_len=np.array([r[3] for r in reqs]),
                        in_prefill=np.array([r[1] < r[3] for r in reqs]), live_req_ids=set(self.z))
        self.state.on_step(info)
        z = torch.cat([self.z[r[0]][r[1]:r[1] + r[2]] for r in reqs]).to(self.device)
        s = self.state
        n = z.shape[0]
        for layer in self.layers:
            torch.ops.caprese.griffin_sparsify(z, s.token_slot[:n], s.token_stat[:n], s.token_dense[:n],
                                               layer.stat_sq, layer.neuron_idx)

    def run(self, prompts: dict[str, torch.Tensor]):
        """Prefill every prompt in one step, then one decode step (which selects)."""
        self.z.update({r: torch.cat([z, torch.rand(4, self.INTER)]) for r, z in prompts.items()})
        self.step([(r, 0, len(z), len(z)) for r, z in prompts.items()])
        self.step([(r, len(z), 1, len(z)) for r, z in prompts.items()])

    def selection(self, req: str) -> list[list[int]]:
        slot = self.state.slot_of[req]
        return [layer.neuron_idx[slot].tolist() for layer in self.layers]


def clean_selection(z: torch.Tensor, k: int) -> list[int]:
    stat = griffin_accumulate(torch.zeros(1, z.shape[-1]), z[None], torch.ones(1, len(z), dtype=torch.bool))
    return griffin_select(stat, k)[0].tolist()


def test_engine_state_flags_logs_and_counts_a_non_finite_statistic(tmp_path, caplog):
    gen = torch.Generator().manual_seed(5)
    good, bad = torch.rand(6, Engine.INTER, generator=gen), torch.rand(5, Engine.INTER, generator=gen)
    bad[2, 3] = INF                                              # its token row -> NaN at neuron 3, 0 elsewhere
    engine = Engine(stats_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="vllm.caprese"):
        engine.run({"good": good, "bad": bad})
    assert engine.selection("good") == [clean_selection(good, Engine.K)] * 2, "the other request is unaffected"
    for idx in engine.selection("bad"):
        assert len(set(idx)) == Engine.K and all(0 <= j < Engine.INTER for j in idx) and 3 not in idx
    lines = [r.getMessage() for r in caplog.records if "non-finite GRIFFIN statistic" in r.getMessage()]
    assert len(lines) == 1 and "request bad in layer(s) [3, 7]" in lines[0], lines
    assert engine.state.nonfinite.count == 1 and read_total(tmp_path) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the non-blocking device-to-host path needs CUDA")
def test_on_cuda_the_flags_are_read_once_their_copy_has_landed(tmp_path):
    engine = Engine(stats_dir=tmp_path, device="cuda")
    good = torch.rand(6, Engine.INTER, generator=torch.Generator().manual_seed(6))
    engine.run({"good": good, "bad": torch.full((3, Engine.INTER), NAN)})
    torch.cuda.synchronize()
    engine.state.nonfinite.poll()  # what the next step's on_step does, whatever it schedules
    assert engine.state.nonfinite.count == 1 and not engine.state.nonfinite.pending and read_total(tmp_path) == 1
    assert engine.selection("bad") == [list(range(Engine.K))] * 2
    assert engine.selection("good") == [clean_selection(good, Engine.K)] * 2


def test_warnings_are_rate_limited_and_every_request_is_counted(tmp_path, caplog):
    engine = Engine(stats_dir=tmp_path, warn_interval_s=3600)
    with caplog.at_level(logging.WARNING, logger="vllm.caprese"):
        engine.run({"a": torch.full((3, Engine.INTER), NAN), "b": torch.full((4, Engine.INTER), NAN)})
        engine.run({"c": torch.full((2, Engine.INTER), INF)})
    assert len([r for r in caplog.records if "non-finite" in r.getMessage()]) == 1
    assert engine.state.nonfinite.count == 3 and read_total(tmp_path) == 3
    assert engine.selection("c") == [list(range(Engine.K))] * 2


def test_counter_sums_the_engine_processes_files_at_scrape_time(tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    from caprese_vllm.observability import NonfiniteCollector

    registry = CollectorRegistry()
    registry.register(NonfiniteCollector(tmp_path))
    scrape = lambda: generate_latest(registry).decode()  # noqa: E731
    assert "caprese:nonfinite_statistics_total 0.0" in scrape()
    write_count(tmp_path, 2, pid=101)
    write_count(tmp_path, 5, pid=102)
    (tmp_path / "nonfinite-103.txt").write_text("torn")         # unreadable: counts 0, never fails a scrape
    assert "caprese:nonfinite_statistics_total 7.0" in scrape()


# ---- the real engine ---------------------------------------------------------------------------------


def poisoned_copy(model_dir, dst, token_id: int):
    """A copy of the checkpoint whose embedding row `token_id` is +Inf, with the LM head untied (a copy of the
    original embedding), so only prompts holding that token see it. RMSNorm renormalises any finite
    value, so an overflow is modelled by its result: Inf, which the norm turns into NaN and the FF
    into a non-finite statistic. FF weights are untouched: the adapter's fingerprint still matches."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    embed = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = embed.clone()
    embed[token_id] = INF
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (dst / "config.json").write_text(json.dumps(config))
    return dst


NORMAL_PROMPTS = ["2 + 2 =", "The capital of France is", "Question: What is 15% of 80?\nAnswer:"]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as r:
        return json.loads(r.read())


@pytest.mark.vllm
def test_engine_survives_a_non_finite_prompt_and_other_requests_are_unaffected(model_dirs, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dirs["smollm2-135m"])
    word = " Zanzibar"
    token_id = tok(word).input_ids[-1]
    assert all(token_id not in tok(p).input_ids for p in NORMAL_PROMPTS)
    model_dir = poisoned_copy(model_dirs["smollm2-135m"], tmp_path / "model", token_id)
    base = base_info_from_dir(model_dir)
    method = MethodSpec(name="griffin", density=0.5, layers=default_layers("griffin", base.num_layers))
    adapter = synthetic_adapter(base, method, rank=16, scale=0.5, seed=7).save(tmp_path / "adapter")
    poison_prompt = f"Tell me about{word} and its history."
    assert token_id in tok(poison_prompt).input_ids

    server = VllmServer(model_dir, ["--caprese-adapter", str(adapter), "--served-model-name", "m"],
                        tmp_path / "server.log")
    try:
        url = server.base_url + "/v1/completions"
        params = {"model": "m", "max_tokens": 12, "temperature": 0}
        batch = _post(url, {**params, "prompt": [poison_prompt, *NORMAL_PROMPTS]})["choices"]
        alone = [_post(url, {**params, "prompt": p})["choices"][0]["text"] for p in NORMAL_PROMPTS]
        with urllib.request.urlopen(server.base_url + "/metrics", timeout=30) as r:
            metrics = r.read().decode()
        with urllib.request.urlopen(server.base_url + "/health", timeout=30) as r:
            assert r.status == 200
        log = server.log()  # while serving: a SIGTERM'd engine may log an EngineDeadError at shutdown
    finally:
        server.stop()
    texts = {c["index"]: c["text"] for c in batch}
    assert [texts[i + 1] for i in range(len(NORMAL_PROMPTS))] == alone
    assert all(texts[i + 1] for i in range(len(NORMAL_PROMPTS)))
    assert "non-finite GRIFFIN statistic" in log and "layer(s) [0, 1, 2" in log, log[-3000:]
    assert "Traceback" not in log
    count = [line for line in metrics.splitlines() if line.startswith("caprese:nonfinite_statistics_total")]
    assert count and float(count[0].split()[-1]) >= 1, count
