"""Tensor parallelism (issue 19 items 1, 3): the sharding logic, one process, the collectives written out.

Each test splits a layer as vLLM's TP does (engine/tensor_parallel.py: rank q holds neurons
[q*I/tp, (q+1)*I/tp) of gate, up and down; low-rank channels [q*rl, (q+1)*rl)), runs every rank's share
through the engine's own ops and selection, replaces all-reduce by an explicit sum and all-gather by a
concatenation, and compares with the unsharded reference (reference/sparsifiers.py, the TP=1 code path).
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from caprese_vllm.adapter import AdapterError, CapreseAdapter, synthetic_adapter
from caprese_vllm.adapter.manifest import MANIFEST_FILE, BaseModelInfo, TensorParallelInfo
from caprese_vllm.cli_flags import translate_argv
from caprese_vllm.engine import ops  # noqa: F401  (registers torch.ops.caprese.*)
from caprese_vllm.engine.config import CapreseServeConfig
from caprese_vllm.engine.install import check_parallelism
from caprese_vllm.engine.batch_state import CapreseBatchState
from caprese_vllm.engine.tensor_parallel import GriffinSelector, TensorParallelShard, exact_local_keep
from caprese_vllm.methods.griffin import keep_of_indices
from caprese_vllm.lowrank import lowrank_forward
from caprese_vllm.methods import MethodSpec, griffin_k
from caprese_vllm.methods.griffin import griffin_keep
from caprese_vllm.reference.sparsifiers import GriffinSparsifier

H, INTER, RANK, DENSITY = 24, 48, 7, 0.5   # RANK odd: the shards are padded


def _layer(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"gate": torch.randn(INTER, H, generator=gen, dtype=torch.float64) / H ** 0.5,
            "up": torch.randn(INTER, H, generator=gen, dtype=torch.float64) / H ** 0.5,
            "down": torch.randn(H, INTER, generator=gen, dtype=torch.float64) / INTER ** 0.5,
            "lowrank_a": torch.randn(H, RANK, generator=gen, dtype=torch.float64) / H ** 0.5,
            "lowrank_b": torch.randn(RANK, H, generator=gen, dtype=torch.float64) / H ** 0.5}


def _z(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(x @ gate.t()) * (x @ up.t())


def _reference(w, prompt: torch.Tensor, decode: torch.Tensor, density: float = DENSITY, local_shards: int = 1):
    """The reference sparsifier's statistic and selection (local_shards 1: TP=1's; N: -tp N local's, on one
    device), then sparse FF + x A B for the decode tokens."""
    sparsifier = GriffinSparsifier(INTER, density, local_shards)
    z_prompt = _z(prompt, w["gate"], w["up"])
    sparsifier.observe(z_prompt[None], None, torch.ones(1, prompt.shape[0], dtype=torch.bool))
    z = _z(decode, w["gate"], w["up"])
    keep = sparsifier.keep_mask(torch.empty(1, decode.shape[0], INTER))[0]
    y = torch.where(keep, z, 0.0) @ w["down"].t() + lowrank_forward(decode, w["lowrank_a"], w["lowrank_b"])
    return sparsifier.stat_sq[0], sparsifier.neuron_idx[0], y


def _shard_rows(w: torch.Tensor, shard: TensorParallelShard) -> torch.Tensor:
    local = shard.local_intermediate(INTER)
    return w[shard.tp_rank * local:(shard.tp_rank + 1) * local]


def _run_sharded(w, prompt: torch.Tensor, decode: torch.Tensor, tp: int, selection: str, density: float = DENSITY):
    """Every rank through the engine's ops (griffin_sparsify[_sharded], add_lowrank) and its GriffinSelector;
    all-reduce = sum over ranks, all-gather = concatenation. Returns (stat_sq [I], kept neurons, y [T, H])."""
    shards = [TensorParallelShard(tp, q, selection) for q in range(tp)]
    k = griffin_k(INTER, density)
    n_prompt, n_decode = prompt.shape[0], decode.shape[0]
    x = torch.cat([prompt, decode])
    token_slot = torch.zeros(x.shape[0], dtype=torch.int64)
    token_stat = torch.arange(x.shape[0]) < n_prompt
    z = [_z(x, _shard_rows(w["gate"], s), _shard_rows(w["up"], s)) for s in shards]       # [T, I/tp] each
    token_norm_sq = sum(zq.float().square().sum(-1) for zq in z)                              # the all-reduce
    stat_sq = [torch.zeros(2, s.local_intermediate(INTER)) for s in shards]                   # slot 0 + dummy
    selectors = [GriffinSelector(k, INTER, s, all_gather=lambda t: torch.cat([st[None, :1] for st in stat_sq], -1))
                 for s in shards]
    neuron_idx = [torch.zeros(2, sel.width, dtype=torch.int64) for sel in selectors]
    # prompt step: every token dense, statistics accumulate
    for q, s in enumerate(shards):
        dense = torch.ones(x.shape[0], dtype=torch.bool)
        if s.exact:
            torch.ops.caprese.griffin_sparsify_sharded(z[q], token_norm_sq, token_slot, token_stat, dense,
                                                       stat_sq[q], neuron_idx[q])
        else:
            torch.ops.caprese.griffin_sparsify(z[q], token_slot, token_stat, dense, stat_sq[q], neuron_idx[q])
    kept = []
    for q, s in enumerate(shards):   # selection, once the prompt is done
        _, idx, _ = selectors[q].select(stat_sq[q][None, :1])
        neuron_idx[q][0] = idx[0, 0]
        local = s.local_intermediate(INTER)
        kept += [s.neuron_offset(INTER) + i for i in idx[0, 0].tolist() if i < local]
    # decode step: the partial outputs (down's local matmul + the rank's low-rank share) summed = all-reduce
    y = torch.zeros(n_decode, H, dtype=torch.float64)
    dense = torch.zeros(n_decode, dtype=torch.bool)
    for q, s in enumerate(shards):
        zd = z[q][n_prompt:]
        no_stat = torch.zeros(n_decode, dtype=torch.bool)
        if s.exact:
            zd = torch.ops.caprese.griffin_sparsify_sharded(zd, token_norm_sq[n_prompt:], token_slot[n_prompt:],
                                                            no_stat, dense, stat_sq[q], neuron_idx[q])
        else:
            zd = torch.ops.caprese.griffin_sparsify(zd, token_slot[n_prompt:], no_stat, dense, stat_sq[q],
                                                    neuron_idx[q])
        partial = zd @ w["down"][:, q * s.local_intermediate(INTER):(q + 1) * s.local_intermediate(INTER)].t()
        y += torch.ops.caprese.add_lowrank(partial, decode, s.shard_lowrank_a(w["lowrank_a"]),
                                           s.shard_lowrank_b(w["lowrank_b"]), dense)
    return torch.cat([st[0] for st in stat_sq]), sorted(kept), y


@pytest.mark.parametrize("tp", [2, 4])
def test_exact_mode_equals_tp1(tp):
    w = _layer()
    gen = torch.Generator().manual_seed(1)
    prompt, decode = torch.randn(9, H, generator=gen, dtype=torch.float64), torch.randn(3, H, generator=gen,
                                                                                        dtype=torch.float64)
    stat_ref, idx_ref, y_ref = _reference(w, prompt, decode)
    stat, kept, y = _run_sharded(w, prompt, decode, tp, "exact")
    torch.testing.assert_close(stat, stat_ref.float(), rtol=1e-5, atol=1e-7)   # float32 order only
    assert kept == idx_ref.tolist()
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)


def test_local_mode_keeps_k_in_all_and_runs_its_own_math():
    w = _layer()
    gen = torch.Generator().manual_seed(2)
    prompt, decode = torch.randn(9, H, generator=gen, dtype=torch.float64), torch.randn(3, H, generator=gen,
                                                                                        dtype=torch.float64)
    _, kept, y = _run_sharded(w, prompt, decode, 2, "local")
    assert len(kept) == griffin_k(INTER, DENSITY) and len(set(kept)) == len(kept)
    # what local mode means: each rank's own top-k/tp of its own normalisation
    z = _z(prompt, w["gate"], w["up"]).float()
    expected = []
    for q in range(2):
        zq = z[:, q * INTER // 2:(q + 1) * INTER // 2]
        stat_q = (zq.square() / zq.square().sum(-1, keepdim=True)).sum(0)
        expected += [q * INTER // 2 + i for i in torch.nonzero(griffin_keep(stat_q, griffin_k(INTER, DENSITY) // 2))
                     .flatten().tolist()]
    assert kept == sorted(expected)
    keep = torch.zeros(INTER, dtype=torch.bool)
    keep[kept] = True
    y_expected = (torch.where(keep, _z(decode, w["gate"], w["up"]), 0.0) @ w["down"].t()
                  + lowrank_forward(decode, w["lowrank_a"], w["lowrank_b"]))
    torch.testing.assert_close(y, y_expected)


@pytest.mark.parametrize(("tp", "density"), [(2, 0.5), (4, 0.5), (2, 0.4375), (4, 0.4375), (8, 0.2)])
def test_reference_local_selection_is_what_tp_local_serves(tp, density):
    """What caprese-distill fits a local-selection adapter on (the reference with local_shards = N, one device)
    keeps the neurons and computes the output that -tp N --caprese-tp-selection local serves (the engine's ops
    and selector on every rank); k % N != 0 (density 0.4375: k = 21) and k_s = 1 (tp 8, k = 9) included."""
    w = _layer(3)
    gen = torch.Generator().manual_seed(4)
    prompt, decode = torch.randn(9, H, generator=gen, dtype=torch.float64), torch.randn(3, H, generator=gen,
                                                                                        dtype=torch.float64)
    _, idx_ref, y_ref = _reference(w, prompt, decode, density, local_shards=tp)
    _, kept, y = _run_sharded(w, prompt, decode, tp, "local", density)
    assert idx_ref.tolist() == kept and len(kept) == griffin_k(INTER, density)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    _, idx_tp1, _ = _reference(w, prompt, decode, density)
    assert idx_tp1.tolist() != kept   # the two selections differ here: the test tells them apart


def test_local_k_splits_k_exactly():
    for k, tp in [(2432, 2), (7, 2), (7, 4), (1025, 8)]:
        ks = [TensorParallelShard(tp, q, "local").local_k(k) for q in range(tp)]
        assert sum(ks) == k and max(ks) - min(ks) <= 1


def test_local_selection_overlap_with_exact():
    """The fast mode's selection vs the exact one on GRIFFIN-like statistics (heavy-tailed, Qwen2.5-0.5B's
    I = 4864): reported, and well above chance (density 0.5 -> 0.5)."""
    gen = torch.Generator().manual_seed(0)
    inter, k, tp = 4864, griffin_k(4864, 0.5), 2
    stat = torch.randn(16, inter, generator=gen).exp()           # 16 requests' statistics
    exact = griffin_keep(stat, k)
    local = torch.cat([griffin_keep(part, TensorParallelShard(tp, q, "local").local_k(k))
                       for q, part in enumerate(stat.chunk(tp, dim=-1))], dim=-1)
    overlap = float((exact & local).sum() / exact.sum())
    print(f"local vs exact selection overlap at -tp {tp}, I={inter}, density 0.5: {overlap:.4f}")
    assert 0.9 < overlap < 1.0


def test_exact_selection_keeps_ties_and_nonfinite_defined_across_shards():
    """The ranks' kept neurons, concatenated, are griffin_keep's over all I (ties -> lowest indices, NaN/Inf
    last), whatever count each rank gets: all of them, none included."""
    inter, k = 8, 4
    rows = torch.tensor([[float("nan")] * 8,                              # all NaN: 0..3, all on rank 0
                         [1.0] * 8,                                       # all tied: 0..3
                         [0, 0, 0, 0, 5, 5, 5, 5.0],                       # all on rank 1
                         [float("inf"), 2, 1, 1, 1, 1, float("nan"), 3]])  # Inf ranks last; ties at 1
    for tp in (2, 4):
        shards = [TensorParallelShard(tp, q, "exact") for q in range(tp)]
        kept = torch.cat([exact_local_keep(rows, k, s) for s in shards], dim=-1)
        assert torch.equal(kept, griffin_keep(rows, k))
    selector = GriffinSelector(k, inter, TensorParallelShard(2, 1, "exact"), all_gather=lambda t: rows)
    _, idx, checked = selector.select(rows[:, 4:])
    assert idx[0].tolist() == [4, 4, 4, 4] and idx[2].tolist() == [0, 1, 2, 3]   # sentinel I/tp = 4 fills
    assert checked is None                                           # rank 0 checks the gathered statistic
    z = torch.arange(1.0, 5.0).repeat(4, 1)                          # 4 decode tokens, one per request slot
    out = torch.ops.caprese.griffin_sparsify_sharded(
        z, torch.ones(4), torch.arange(4), torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool),
        torch.zeros(4, 4), idx)
    assert out[0].tolist() == [0, 0, 0, 0] and out[2].tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("tp", [2, 4])
def test_exact_mode_kernel_references_equal_the_portable_op(tp):
    """CPU, no kernels: what the GPU kernels are tested against in exact mode (tests/test_kernels.py) computes what
    the portable path does, rank by rank: the gather route's references on neuron_idx rows filled with the
    sentinel, the masked route's on keep_of_indices' mask, and the statistic divided by the all-reduced token norm
    (griffin_stats_reference_ with token_norm_sq) equal griffin_sparsify_sharded, then down + the rank's x A B."""
    from caprese_vllm.kernels.decode_mlp import fuse_weights, masked_route_reference
    from caprese_vllm.kernels.gather_down import gather_down_reference
    from caprese_vllm.kernels.gather_gate_up import gather_gate_up_reference
    from caprese_vllm.kernels.griffin_stats import griffin_stats_reference_

    w = {name: t.float() for name, t in _layer(5).items()}
    gen = torch.Generator().manual_seed(6)
    k, local = griffin_k(INTER, DENSITY), INTER // tp
    shards = [TensorParallelShard(tp, q, "exact") for q in range(tp)]
    # Two requests' prompts (slots 0, 1) give every rank its statistic; the selection is the engine's.
    prompts = torch.randn(14, H, generator=gen)
    prompt_slot = torch.tensor([0] * 9 + [1] * 5)
    z_all = _z(prompts, w["gate"], w["up"])                                            # [14, I]
    norm = z_all.square().sum(-1)
    stats = [torch.zeros(3, local) for _ in shards]                                    # slots 0, 1 + dummy
    for q, s in enumerate(shards):
        torch.ops.caprese.griffin_sparsify_sharded(z_all[:, q * local:(q + 1) * local], norm, prompt_slot,
                                                   torch.ones(14, dtype=torch.bool), torch.ones(14, dtype=torch.bool),
                                                   stats[q], torch.zeros(3, s.k_capacity(k, INTER), dtype=torch.long))
    gathered = torch.cat([st[:2] for st in stats], dim=-1)                             # the all-gather
    neuron_idx = []
    for s, st in zip(shards, stats):
        _, idx, _ = GriffinSelector(k, INTER, s, all_gather=lambda t: gathered[None]).select(st[None, :2])
        neuron_idx.append(torch.cat([idx[0], torch.zeros_like(idx[0, :1])]))          # + slot 2's, unselected
    assert all(bool((idx[:2] == local).any()) for idx in neuron_idx), "the premise: every rank's rows hold it"
    # One mixed step: decode tokens of both requests and a new prompt's tokens (dense, feeding slot 2's statistic).
    x = torch.randn(7, H, generator=gen)
    token_slot = torch.tensor([0, 1, 2, 2, 2, 1, 0])
    token_dense = torch.tensor([False, False, True, True, True, False, False])
    z = _z(x, w["gate"], w["up"])
    token_norm_sq = z.square().sum(-1)                                                 # the all-reduce
    for q, s in enumerate(shards):
        rows = slice(q * local, (q + 1) * local)
        lowrank_a, lowrank_b = s.shard_lowrank_a(w["lowrank_a"]), s.shard_lowrank_b(w["lowrank_b"])
        stat_portable, stat_ref = stats[q].clone(), stats[q].clone()
        zq = torch.ops.caprese.griffin_sparsify_sharded(z[:, rows], token_norm_sq, token_slot, token_dense,
                                                        token_dense, stat_portable, neuron_idx[q])
        y_portable = torch.ops.caprese.add_lowrank(zq @ w["down"][:, rows].t(), x, lowrank_a, lowrank_b, token_dense)
        gate_up_ext, down_t_ext = fuse_weights(torch.cat([w["gate"][rows], w["up"][rows]]), w["down"][:, rows],
                                               lowrank_a, lowrank_b)
        # the gather route: a sentinel gives z = 0 and, whatever z holds there, adds nothing
        z_gather = gather_gate_up_reference(x, gate_up_ext, local, neuron_idx[q], token_slot, token_dense, "silu")
        width = neuron_idx[q].shape[1]
        sentinel = (neuron_idx[q][token_slot] == local) & ~token_dense[:, None]            # [T, width]
        assert bool((z_gather[:, :width][sentinel] == 0).all())
        z_gather[:, :width][sentinel] = float("nan")
        y_gather = gather_down_reference(z_gather, down_t_ext, local, neuron_idx[q], token_slot, token_dense)
        keep = keep_of_indices(neuron_idx[q], local).to(torch.uint8)
        y_masked = masked_route_reference(x, gate_up_ext, down_t_ext, local, keep, token_slot, token_dense, "silu")
        torch.testing.assert_close(y_gather, y_portable, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(y_masked, y_portable, rtol=1e-4, atol=1e-5)
        griffin_stats_reference_(z[:, rows], local, token_slot, token_dense, stat_ref, token_norm_sq)
        torch.testing.assert_close(stat_ref, stat_portable, rtol=1e-6, atol=1e-7)


def test_batch_state_keep_mask_drops_exact_modes_sentinel():
    """The GPU kernels' masked route reads keep_mask: built from, and restored from, neuron_idx rows that hold the
    sentinel I/tp (exact mode), it keeps the rank's real neurons only (no out-of-range scatter, no extra neuron)."""
    shard = TensorParallelShard(2, 1, "exact")
    k, local = griffin_k(INTER, DENSITY), INTER // 2
    selector = GriffinSelector(k, INTER, shard, all_gather=lambda t: torch.cat([t, t], dim=-1))
    state = CapreseBatchState(max_slots=2, max_tokens=4, device="cpu", griffin_layers=1, intermediate_size=local,
                              griffin_k=selector.width, selector=selector)
    row = torch.tensor([1, 5, 7] + [local] * (selector.width - 3))
    state.neuron_idx[0, 0] = row
    keep = state.enable_keep_mask()                                   # [1, slots + 1, I/tp] uint8
    assert keep.shape == (1, 3, local) and torch.nonzero(keep[0, 0]).flatten().tolist() == [1, 5, 7]
    state.saved_selection["r"] = torch.stack([row.flip(0)]).to(torch.int32)   # preempted, then resumed in slot 1
    state._restore_selection("r", 1)
    assert torch.nonzero(keep[0, 1]).flatten().tolist() == [1, 5, 7]


@pytest.mark.parametrize("rank, tp", [(7, 2), (8, 2), (5, 4), (1, 2)])
def test_lowrank_shards_sum_to_the_full_product(rank, tp):
    gen = torch.Generator().manual_seed(rank)
    a, b = torch.randn(H, rank, generator=gen, dtype=torch.float64), torch.randn(rank, H, generator=gen,
                                                                                dtype=torch.float64)
    x = torch.randn(5, H, generator=gen, dtype=torch.float64)
    shards = [TensorParallelShard(tp, q) for q in range(tp)]
    assert all(s.shard_lowrank_a(a).shape == (H, math.ceil(rank / tp)) for s in shards)
    total = sum(lowrank_forward(x, s.shard_lowrank_a(a), s.shard_lowrank_b(b)) for s in shards)
    torch.testing.assert_close(total, lowrank_forward(x, a, b))


def _base() -> BaseModelInfo:
    return BaseModelInfo(architecture="Qwen2ForCausalLM", hidden_size=H, intermediate_size=INTER, num_layers=4,
                         fingerprint="0123456789abcdef")


def test_manifest_without_tensor_parallel_reads_as_exact_and_keeps_its_digest(tmp_path):
    adapter = synthetic_adapter(_base(), MethodSpec(name="griffin", density=0.5, layers=[0, 1]), rank=4, scale=0.1)
    path = adapter.save(tmp_path / "old")
    raw = json.loads((path / MANIFEST_FILE).read_text())
    assert "tensor_parallel" not in raw          # files as before this field: older readers still read them
    loaded = CapreseAdapter.load(path)
    assert loaded.manifest.tensor_parallel is None and loaded.manifest.tp_selection == "exact"
    fitted = synthetic_adapter(_base(), MethodSpec(name="griffin", density=0.5, layers=[0, 1]), rank=4, scale=0.1)
    fitted.manifest.tensor_parallel = TensorParallelInfo(selection="local", size=2)
    reloaded = CapreseAdapter.load(fitted.save(tmp_path / "local")).manifest
    assert reloaded.tp_selection == "local" and reloaded.tensor_parallel.size == 2


def test_tp_selection_setting_and_flag():
    assert CapreseServeConfig.from_additional_config({"caprese_adapter": "a"}).tp_selection is None
    serve = CapreseServeConfig.from_additional_config({"caprese_adapter": "a", "caprese_tp_selection": "local"})
    assert serve.tp_selection == "local"
    with pytest.raises(ValueError, match="caprese_tp_selection"):
        CapreseServeConfig.from_additional_config({"caprese_adapter": "a", "caprese_tp_selection": "fast"})
    with pytest.raises(ValueError, match="applies to GRIFFIN adapters only"):
        serve.check_applies("cats")
    argv = translate_argv(["serve", "m", "--caprese-adapter", "a", "--caprese-tp-selection", "LOCAL"])
    assert json.loads(argv[-1]) == {"caprese_adapter": "a", "caprese_tp_selection": "local"}


def test_a_value_the_flag_takes_is_taken_in_additional_config_too():
    # The flags read any case (LOCAL, Off); --additional-config refused the same values until this test.
    for flag, key, typed, value in (("--caprese-tp-selection", "caprese_tp_selection", "LOCAL", "local"),
                                    ("--caprese-kernels", "caprese_kernels", "Off", "off")):
        via_flag = json.loads(translate_argv(["serve", "m", "--caprese-adapter", "a", flag, typed])[-1])
        direct = CapreseServeConfig.from_additional_config({"caprese_adapter": "a", key: typed})
        assert via_flag[key] == getattr(direct, key[len("caprese_"):]) == value
    with pytest.raises(ValueError, match="caprese_kernels"):
        CapreseServeConfig.from_additional_config({"caprese_adapter": "a", "caprese_kernels": "ONN"})


def _config(tp: int, inter: int, heads: int = 12):
    """The two fields of vLLM's VllmConfig that check_parallelism reads (sizes: intermediate_size, heads)."""
    hf_config = SimpleNamespace(intermediate_size=inter, num_attention_heads=heads, text_config=None)
    return SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=tp),
                           model_config=SimpleNamespace(hf_config=hf_config))


def test_check_parallelism_refuses_what_cannot_shard_in_one_line():
    """The rules are tensor_parallel_refusal's, the -tp offered largest_servable_tp's (one rule set)."""
    manifest = synthetic_adapter(_base(), MethodSpec(name="griffin", density=0.5, layers=[0]), rank=4).manifest
    check_parallelism(_config(2, 4864), manifest, "exact")
    check_parallelism(_config(1, 4863), manifest, "exact")
    with pytest.raises(AdapterError, match=r"--tensor-parallel-size 3 cannot shard this model: intermediate_size "
                       r"4864 \(FF neurons\) is not divisible by 3; use -tp 2, or -pp 3") as err:
        check_parallelism(_config(3, 4864), manifest, "exact")
    assert "\n" not in str(err.value)
    # answered at once, not after 10^9 sizes; the -tp offered divides the 12 heads too (not 4864: 12 heads)
    with pytest.raises(AdapterError, match="num_attention_heads 12 is not divisible by 1000000001; use -tp 4, or -pp"):
        check_parallelism(_config(10 ** 9 + 1, 4864), manifest, "exact")
    tiny = synthetic_adapter(_base(), MethodSpec(name="griffin", density=0.05, layers=[0]), rank=4).manifest
    with pytest.raises(AdapterError, match="local at -tp 4: local selection keeps k=2 neurons, fewer than 4 ranks "
                       r"\(some would keep none\); use --caprese-tp-selection exact, a higher density or -tp 2"):
        check_parallelism(_config(4, INTER), tiny, "local")
    check_parallelism(_config(4, INTER), tiny, "exact")      # exact selection: a rank may keep none of the k


@pytest.mark.parametrize(("method", "selection", "says"), [
    (MethodSpec(name="griffin", density=0.5, layers=[0, 1]), "local", "tensor parallel 2, local selection"),
    # CATS thresholds each neuron's own activation: no GRIFFIN selection runs, exact or local
    (MethodSpec(name="cats", density=0.5, layers=[0], thresholds={0: 0.1}), "threshold",
     "tensor parallel 2, CATS thresholds per neuron (as at TP=1)"),
])
def test_summary_says_and_exports_what_selects_under_tp(tmp_path, method, selection, says):
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from caprese_vllm.engine.install import _served_selection
    from caprese_vllm.observability import ServedCollector, confirm_served, summarize

    tp2 = SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=2))
    serve = CapreseServeConfig.from_additional_config({"caprese_adapter": "a", "caprese_tp_selection": "local"}
                                                      if method.name == "griffin" else {"caprese_adapter": "a"})
    assert _served_selection(serve, tp2, method.name) == selection
    adapter = synthetic_adapter(_base(), method, rank=4)
    summary = summarize(adapter, "ad", "m", None, 0.5, "portable", tp_size=2, tp_selection=selection)
    assert summary.log_line().endswith(f"FF path: portable PyTorch; {says}")
    registry = CollectorRegistry()
    registry.register(ServedCollector(tmp_path))
    confirm_served(summary, tmp_path)
    assert f'caprese:tensor_parallel{{selection="{selection}"}} 2.0' in generate_latest(registry).decode()


def test_selection_comes_from_the_flag_else_the_manifest_else_exact(caplog):
    import logging

    from caprese_vllm.engine.install import resolve_tp_selection

    logging.getLogger("vllm.caprese").addHandler(caplog.handler)   # vLLM's logger does not propagate
    caplog.set_level(logging.INFO, logger="vllm.caprese")
    fitted_local = synthetic_adapter(_base(), MethodSpec(name="griffin", density=0.5, layers=[0]), rank=4).manifest
    fitted_local.tensor_parallel = TensorParallelInfo(selection="local", size=4)
    plain = synthetic_adapter(_base(), MethodSpec(name="griffin", density=0.5, layers=[0]), rank=4).manifest
    try:
        for manifest, flag, want in [(plain, None, "exact"), (fitted_local, None, "local"),
                                     (fitted_local, "exact", "exact"), (plain, "local", "local")]:
            serve = CapreseServeConfig(adapter="a", tp_selection=flag)
            config = _config(2, INTER)
            config.additional_config = {"caprese_adapter": "a"}
            caplog.clear()
            assert resolve_tp_selection(serve, config, manifest) == want
            assert serve.tp_selection == want and config.additional_config["caprese_tp_selection"] == want
            assert f"caprese: tensor parallel 2: {want} GRIFFIN selection" in caplog.text
            assert ("overridden" in caplog.text) == (flag is not None and flag != manifest.tp_selection)
            assert ("fitted for local selection at -tp 4, served at -tp 2" in caplog.text) == (want == "local" and
                                                                                               manifest is fitted_local)
        at_tp1 = _config(1, INTER)
        at_tp1.additional_config = {"caprese_adapter": "a"}
        assert resolve_tp_selection(CapreseServeConfig(adapter="a"), at_tp1, plain) == "exact"
        assert at_tp1.additional_config == {"caprese_adapter": "a"}, "TP=1: the compile cache key is unchanged"
    finally:
        logging.getLogger("vllm.caprese").removeHandler(caplog.handler)


def _engine_args(tmp_path, tp: int, **settings):
    """What the plugin's create_engine_config wrapper reads, for a model of _base()'s shapes, and the `original`
    (vLLM's create_engine_config) that returns a VllmConfig's fields that the checks read."""
    adapter = synthetic_adapter(_base(), MethodSpec(name="griffin", density=0.5, layers=[0, 1]), rank=4, scale=0.1)
    path = adapter.save(tmp_path / "adapter")
    additional = {"caprese_adapter": str(path), "caprese_check_fingerprint": False, **settings}
    engine_args = SimpleNamespace(additional_config=additional, enable_prefix_caching=None)

    def original(args):
        config = _config(tp, INTER)
        config.additional_config = args.additional_config
        config.model_config.hf_config = SimpleNamespace(
            intermediate_size=INTER, hidden_size=H, num_hidden_layers=4, num_attention_heads=12,
            architectures=["Qwen2ForCausalLM"])
        config.model_config.model = "m"
        config.model_config.dtype = torch.float32
        config.load_config = SimpleNamespace(load_format="auto")
        return config

    return engine_args, original


def test_front_end_checks_the_density_the_engine_serves(tmp_path, monkeypatch):
    """caprese_density lowers k: local selection with k < tp must be refused by the front-end (one line), not
    accepted there and refused by every engine rank in install_caprese, which applies the override first."""
    from caprese_vllm import plugin

    for name in ("check_architecture", "resolve_kernels", "register_models"):
        monkeypatch.setattr(plugin, name, lambda *a, **k: None)
    monkeypatch.setattr("caprese_vllm.observability.watch_engines", lambda *a, **k: None)
    monkeypatch.delenv(plugin.ACTIVE_ENV, raising=False)
    # k = int(48 * 0.05) = 2 neurons, over 4 ranks
    engine_args, original = _engine_args(tmp_path, 4, caprese_tp_selection="local", caprese_density=0.05)
    with pytest.raises(AdapterError, match="keeps k=2 neurons, fewer than 4 ranks"):
        plugin._create_engine_config_single_threaded(original, engine_args)
    engine_args, original = _engine_args(tmp_path, 2, caprese_tp_selection="local", caprese_density=0.05)
    assert plugin._create_engine_config_single_threaded(original, engine_args).additional_config[
        "caprese_tp_selection"] == "local"


@pytest.mark.parametrize("tensor_parallel, error", [
    ({"selection": "exact", "size": 2}, "tensor_parallel.size 2 applies to selection local only"),
    ({"size": 2}, "tensor_parallel.size 2 applies to selection local only"),
    ({"selection": "local", "size": 5}, "tensor_parallel.size 5 does not divide base_model.intermediate_size 48"),
])
def test_manifest_refuses_a_tensor_parallel_size_that_means_nothing(tmp_path, tensor_parallel, error):
    """Nothing written in caprese.json is ignored: a size without local selection, or one no -tp can have."""
    path = synthetic_adapter(_base(), MethodSpec(name="griffin", density=0.5, layers=[0]), rank=4).save(tmp_path / "a")
    raw = json.loads((path / MANIFEST_FILE).read_text())
    del raw["integrity"]
    raw["tensor_parallel"] = tensor_parallel
    (path / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(AdapterError, match=error) as err:
        CapreseAdapter.load(path)
    assert "\n" not in str(err.value) and MANIFEST_FILE in str(err.value)


def test_local_fit_served_at_tp1_is_warned_and_reported_as_what_runs(caplog):
    """An adapter fitted for local selection at -tp 2 served at -tp 1: the one rank keeps the global top-k, not
    the shards' top-k/2 it was fitted for (warned as at -tp 4), and the summary/gauge say the TP=1 selection."""
    import logging

    from caprese_vllm.engine.install import _summary, resolve_tp_selection

    logging.getLogger("vllm.caprese").addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="vllm.caprese")
    adapter = synthetic_adapter(_base(), MethodSpec(name="griffin", density=0.5, layers=[0]), rank=4)
    adapter.manifest.tensor_parallel = TensorParallelInfo(selection="local", size=2)
    try:
        config = _config(1, INTER)
        config.additional_config = {"caprese_adapter": "a"}
        serve = CapreseServeConfig(adapter="a")
        assert resolve_tp_selection(serve, config, adapter.manifest) == "local"
        assert "fitted for local selection at -tp 2, served at -tp 1" in caplog.text
        assert config.additional_config == {"caprese_adapter": "a"}
        model = torch.nn.Module()
        model._caprese_adapter = adapter
        config.model_config.served_model_name = "m"
        config.model_config.model = "/nonexistent/m"
        assert _summary(model, serve, config).tp_selection == "exact"
        caplog.clear()
        at_tp2 = _config(2, INTER)
        at_tp2.additional_config = {}
        resolve_tp_selection(CapreseServeConfig(adapter="a"), at_tp2, adapter.manifest)
        assert "fitted for local selection" not in caplog.text, "served as fitted: nothing to warn about"
    finally:
        logging.getLogger("vllm.caprese").removeHandler(caplog.handler)


@pytest.mark.parametrize("selection", ["exact", "local"])
def test_nonfinite_statistic_is_counted_once_not_once_per_rank(selection):
    """Each rank's engine process writes its own non-finite count and /metrics sums them: in either selection only
    rank 0 may hand a statistic to the check (local mode's NaN, which spreads to every rank, was counted tp times)."""
    stat = torch.full((1, 1, INTER), float("nan"))
    gather = (lambda t: torch.cat([t, t], dim=-1)) if selection == "exact" else None
    checked = [GriffinSelector(griffin_k(INTER, DENSITY), INTER, TensorParallelShard(2, q, selection),
                               gather).select(stat[..., : INTER // 2])[2] for q in range(2)]
    assert checked[0] is not None and not torch.isfinite(checked[0]).all()
    assert checked[1] is None


def test_selection_log_says_where_the_mode_came_from(caplog):
    """An adapter whose manifest names no selection (every adapter fitted so far): the log says `the default`,
    not `from the adapter`, and an override is not said to contradict a fit that never chose (new-user trial)."""
    import logging

    from caprese_vllm.engine.install import resolve_tp_selection

    logging.getLogger("vllm.caprese").addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="vllm.caprese")
    adapter = synthetic_adapter(_base(), MethodSpec(name="griffin", density=0.5, layers=[0]), rank=4)
    try:
        config = _config(2, INTER)
        config.additional_config = {}
        resolve_tp_selection(CapreseServeConfig(adapter="a"), config, adapter.manifest)
        assert "(caprese_tp_selection=exact, the default)" in caplog.text
        caplog.clear()
        resolve_tp_selection(CapreseServeConfig(adapter="a", tp_selection="local"), config, adapter.manifest)
        assert "overridden exact -> local; the adapter names none (exact by default)" in caplog.text
        assert "fitted for exact" not in caplog.text
        caplog.clear()
        adapter.manifest.tensor_parallel = TensorParallelInfo(selection="local", size=2)
        resolve_tp_selection(CapreseServeConfig(adapter="a"), config, adapter.manifest)
        assert "(caprese_tp_selection=local, from the adapter)" in caplog.text
    finally:
        logging.getLogger("vllm.caprese").removeHandler(caplog.handler)


def test_tp_local_fit_compares_only_runs_that_differ_in_the_selection():
    """benchmarks/tp_local_fit.py: the exact-fitted adapter is served local as --caprese-tp-selection local serves
    it (tensors unchanged, manifest's selection local N); runs that differ in anything else are refused."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import tp_local_fit
    finally:
        sys.path.pop(0)
    method = MethodSpec(name="griffin", density=0.5, layers=[0, 1])
    exact = synthetic_adapter(_base(), method, rank=4, seed=1)
    local = synthetic_adapter(_base(), method, rank=4, seed=2)
    local.manifest.tensor_parallel = TensorParallelInfo(selection="local", size=2)
    assert tp_local_fit.check_comparable(exact, local) == 2
    served = tp_local_fit.served_local(exact, 2)
    assert served.manifest.local_shards == 2 and served.lowrank_a[0] is exact.lowrank_a[0]
    assert exact.manifest.local_shards == 1                       # the original is left as it was
    with pytest.raises(ValueError, match="not fitted for local selection"):
        tp_local_fit.check_comparable(exact, exact)
    with pytest.raises(ValueError, match="was fitted for local selection"):
        tp_local_fit.check_comparable(local, local)
    other = synthetic_adapter(_base(), MethodSpec(name="griffin", density=0.25, layers=[0, 1]), rank=4)
    other.manifest.tensor_parallel = TensorParallelInfo(selection="local", size=2)
    with pytest.raises(ValueError, match="differ in base model, method"):
        tp_local_fit.check_comparable(exact, other)
