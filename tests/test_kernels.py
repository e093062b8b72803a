"""Triton kernels against their PyTorch references.

The two routes of kernels/decode_mlp.py must also agree with each other and with the portable
masked formulation (dense FF with the other neurons zeroed + x A B), which is what the CPU plugin
runs and the reference implementation defines.

On a CUDA host this runs the compiled kernels at the real model shapes. Without a GPU,
test_kernels_interpreted.py runs this same file in a subprocess under Triton's interpreter
(TRITON_INTERPRET=1 must be set before triton is first imported, so not in this process) at small
shapes: the kernels' indexing, masking, atomics and statistics are checked in CI too.
"""

from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    pytest.skip("no GPU: test_kernels_interpreted.py runs these tests under Triton's interpreter",
                allow_module_level=True)

from caprese_vllm.kernels.act_mul_mask import act_mul_mask, act_mul_mask_reference  # noqa: E402
from caprese_vllm.kernels.decode_mlp import (  # noqa: E402
    caprese_ff, caprese_ff_down, caprese_ff_gate_up, decode_workspace, fuse_weights, gather_route_reference,
    masked_route_reference,
)
from caprese_vllm.kernels.gather_down import gather_down, gather_down_reference, gather_workspace  # noqa: E402
from caprese_vllm.kernels.gather_gate_up import gather_gate_up, gather_gate_up_reference  # noqa: E402
from caprese_vllm.kernels.griffin_stats import griffin_stats_, griffin_stats_reference_  # noqa: E402
from caprese_vllm.kernels.masked_gate_up import MAX_TOKENS, masked_gate_up, masked_workspace  # noqa: E402

SHAPES = [  # hidden, intermediate, rank, activation
    (576, 1536, 72, "silu"), (640, 2048, 232, "gelu_tanh"), (4096, 14336, 256, "silu"), (1000, 3000, 20, "silu"),
] if DEVICE == "cuda" else [(64, 192, 8, "silu"), (100, 300, 20, "gelu_tanh")]
# Triton's interpreter multiplies bfloat16 tl.dot operands as raw bits: interpreted dot kernels get float32.
DOT_DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
CUDA_ONLY = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
SLOTS = 5


def _case(hidden, inter, rank, num_tokens, dtype=torch.bfloat16, seed=0, dense_tokens=(1,)):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    k = inter // 2
    x = torch.randn(num_tokens, hidden, device=DEVICE, generator=g).to(dtype)
    gate_up = (torch.randn(2 * inter, hidden, device=DEVICE, generator=g) / hidden ** 0.5).to(dtype)
    down = (torch.randn(hidden, inter, device=DEVICE, generator=g) / inter ** 0.5).to(dtype)
    a = (torch.randn(hidden, rank, device=DEVICE, generator=g) / hidden ** 0.5).to(dtype)
    b = (torch.randn(rank, hidden, device=DEVICE, generator=g) / rank ** 0.5).to(dtype)
    gate_up_ext, down_t_ext = fuse_weights(gate_up, down, a, b)
    idx = torch.stack([torch.randperm(inter, device=DEVICE, generator=g)[:k].sort().values for _ in range(SLOTS)])
    keep = torch.zeros(SLOTS, inter, dtype=torch.uint8, device=DEVICE).scatter_(1, idx, 1)
    slot = torch.randint(0, SLOTS, (num_tokens,), device=DEVICE, generator=g)
    dense = torch.zeros(num_tokens, dtype=torch.bool, device=DEVICE)
    for t in dense_tokens:
        if t < num_tokens:
            dense[t] = True
    return dict(x=x, gate_up=gate_up, down=down, a=a, b=b, gate_up_ext=gate_up_ext, down_t_ext=down_t_ext,
                idx=idx, keep=keep, slot=slot, dense=dense, inter=inter, k=k, rank=rank)


@pytest.mark.parametrize("hidden, inter, rank, act", SHAPES)
@pytest.mark.parametrize("num_tokens", [1, 3, 8])
def test_gather_gate_up_matches_reference(hidden, inter, rank, act, num_tokens):
    c = _case(hidden, inter, rank, num_tokens)
    args = (c["x"], c["gate_up_ext"], inter, c["idx"], c["slot"], c["dense"], act)
    got, want = gather_gate_up(*args).float(), gather_gate_up_reference(*args)
    for t in range(num_tokens):
        n = inter if c["dense"][t] else c["k"] + rank
        torch.testing.assert_close(got[t, :n], want[t, :n], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("hidden, inter, rank, act", SHAPES)
@pytest.mark.parametrize("num_tokens", [1, 8])
def test_gather_down_matches_reference(hidden, inter, rank, act, num_tokens):
    c = _case(hidden, inter, rank, num_tokens)
    z = torch.randn(num_tokens, inter + rank, device=DEVICE).to(torch.bfloat16)
    args = (z, c["down_t_ext"], inter, c["idx"], c["slot"], c["dense"])
    acc, tickets = gather_workspace(num_tokens, hidden, torch.device(DEVICE))
    no_stat = torch.zeros(num_tokens, dtype=torch.bool, device=DEVICE)
    stat = torch.zeros(SLOTS, inter, device=DEVICE)
    for _ in range(2):  # the second call relies on the first leaving its workspace at zero
        got = gather_down(*args, no_stat, stat, acc, tickets)
        torch.testing.assert_close(got.float(), gather_down_reference(*args), rtol=2e-2, atol=3e-2)
    assert not acc.any() and not tickets.any(), "gather_down must leave its workspace at zero"
    assert not stat.any(), "no prompt token: the statistic must not move"


@pytest.mark.parametrize("hidden, inter, rank, act", SHAPES[:2])
def test_gather_down_adds_the_statistic_of_prompt_tokens(hidden, inter, rank, act):
    c = _case(hidden, inter, rank, 3, dense_tokens=(0, 2))
    c["slot"] = torch.tensor([1, 1, 3], device=DEVICE)
    token_stat = torch.tensor([True, False, True], device=DEVICE)  # token 1 decodes: no statistic
    z = torch.randn(3, inter + rank, device=DEVICE).to(torch.bfloat16)
    acc, tickets = gather_workspace(3, hidden, torch.device(DEVICE))
    got, want = torch.ones(SLOTS, inter, device=DEVICE), torch.ones(SLOTS, inter, device=DEVICE)
    gather_down(z, c["down_t_ext"], inter, c["idx"], c["slot"], c["dense"], token_stat, got, acc, tickets)
    griffin_stats_reference_(z, inter, c["slot"], token_stat, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_gather_down_refuses_a_small_workspace():
    c = _case(64, 192, 8, 2)
    acc, tickets = gather_workspace(1, 64, torch.device(DEVICE))
    with pytest.raises(ValueError, match="workspace"):
        gather_down(torch.zeros(2, 200, device=DEVICE), c["down_t_ext"], 192, c["idx"], c["slot"], c["dense"],
                    c["dense"], torch.zeros(SLOTS, 192, device=DEVICE), acc, tickets)


@pytest.mark.parametrize("hidden, inter, rank, act", SHAPES)
def test_act_mul_mask_matches_reference(hidden, inter, rank, act):
    c = _case(hidden, inter, rank, 9, dense_tokens=(0, 4))
    h = torch.randn(9, 2 * inter + rank, device=DEVICE).to(torch.bfloat16)
    args = (h, inter, rank, c["keep"], c["slot"], c["dense"], act)
    z, sumsq_parts = act_mul_mask(*args)
    torch.testing.assert_close(z.float(), act_mul_mask_reference(*args), rtol=2e-2, atol=2e-2)
    # The parts add up to each token's squared norm over the neuron columns of z as stored.
    torch.testing.assert_close(sumsq_parts.sum(1), z[:, :inter].float().square().sum(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hidden, inter, rank, act", SHAPES)
@pytest.mark.parametrize("num_tokens", [2, 9, 17, 33, MAX_TOKENS])  # each launch setting
@pytest.mark.parametrize("dtype", list(dict.fromkeys([DOT_DTYPE, torch.float32])))  # float32: wider smem tiles
def test_masked_gate_up_matches_reference(hidden, inter, rank, act, num_tokens, dtype):
    """z and, for prompt tokens, the statistic (added by the last program), twice: the ticket resets."""
    c = _case(hidden, inter, rank, num_tokens, dtype=dtype, dense_tokens=(0, 1, num_tokens - 1))
    token_stat = c["dense"].clone()
    token_stat[1] = False  # dense but recomputed: no statistic
    parts, ticket = masked_workspace(inter, torch.device(DEVICE))
    got, want = torch.ones(SLOTS, inter, device=DEVICE), torch.ones(SLOTS, inter, device=DEVICE)
    h = c["x"].float() @ c["gate_up_ext"].float().t()
    want_z = act_mul_mask_reference(h, inter, rank, c["keep"], c["slot"], c["dense"], act)
    for _ in range(2):
        z = masked_gate_up(c["x"], c["gate_up_ext"], inter, c["keep"], c["slot"], c["dense"], token_stat, got,
                           parts, ticket, act)
        torch.testing.assert_close(z.float(), want_z, rtol=2e-2, atol=2e-2)
        griffin_stats_reference_(z, inter, c["slot"], token_stat, want)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        assert int(ticket.item()) == 0, "the last program must reset the ticket"


def test_masked_gate_up_leaves_the_statistic_alone_in_decode_steps():
    c = _case(64, 192, 8, 5, dtype=DOT_DTYPE, dense_tokens=())
    parts, ticket = masked_workspace(192, torch.device(DEVICE))
    stat = torch.ones(SLOTS, 192, device=DEVICE)
    masked_gate_up(c["x"], c["gate_up_ext"], 192, c["keep"], c["slot"], c["dense"], c["dense"], stat, parts, ticket,
                   "silu")
    assert bool((stat == 1).all())


@pytest.mark.parametrize("runs", [
    [(0, 7, True), (2, 1, False), (1, 3, True)],                          # short, mixed, decode token between
    [(3, 70, True), (1, 45, True), (2, 1, False), (0, 33, True), (4, 2, False)],  # long runs over tile borders
])
def test_griffin_stats_match_the_reference_accumulation(runs):
    """Prefill-shaped steps: runs of tokens of one slot (one request's chunk), prompt or not."""
    slot = torch.tensor([s for s, n, _ in runs for _ in range(n)], device=DEVICE)
    stat_flag = torch.tensor([f for _, n, f in runs for _ in range(n)], dtype=torch.bool, device=DEVICE)
    inter = 1536 if DEVICE == "cuda" else 300
    z = torch.randn(slot.numel(), inter + 8, device=DEVICE).to(torch.bfloat16)
    parts = z[:, :inter].float().square().reshape(slot.numel(), 4, -1).sum(-1)  # any split into parts
    got, want = torch.ones(5, inter, device=DEVICE), torch.ones(5, inter, device=DEVICE)
    griffin_stats_(z, inter, slot, stat_flag, got, parts)
    griffin_stats_reference_(z, inter, slot, stat_flag, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_griffin_stats_never_read_non_prompt_tokens():
    """A decode / padding token's NaN or Inf (e.g. its parts) must not reach any slot's statistic."""
    runs = [(0, 7, True), (2, 1, False), (0, 3, True), (1, 40, False), (1, 5, True)]
    slot = torch.tensor([s for s, n, _ in runs for _ in range(n)], device=DEVICE)
    stat_flag = torch.tensor([f for _, n, f in runs for _ in range(n)], dtype=torch.bool, device=DEVICE)
    inter = 300
    z = torch.randn(slot.numel(), inter, device=DEVICE)
    parts = z.square().reshape(slot.numel(), 4, -1).sum(-1)
    want = torch.zeros(5, inter, device=DEVICE)
    griffin_stats_reference_(z, inter, slot, stat_flag, want)
    z[~stat_flag], parts[~stat_flag] = float("nan"), float("inf")
    got = torch.zeros(5, inter, device=DEVICE)
    griffin_stats_(z, inter, slot, stat_flag, got, parts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_tokens", [4, 12, MAX_TOKENS + 4])  # gather and masked; masked_gate_up; act_mul_mask
def test_non_finite_tokens_stay_in_their_own_row_and_slot(num_tokens):
    """Token 1 (decode) has NaN inputs, token 3 (prompt) an Inf: every other token's output and every other
    slot's statistic are what they are without them (the selection from slot 3's: tests/test_nonfinite.py)."""
    hidden, inter, rank, act = SHAPES[0]
    c = _case(hidden, inter, rank, num_tokens, dtype=torch.float32, dense_tokens=(0, 3))
    c["slot"] = torch.tensor([0, 1, 2, 3] + [4] * (num_tokens - 4), device=DEVICE)
    ws = decode_workspace(num_tokens, hidden, inter, torch.device(DEVICE))
    poisoned = c["x"].clone()
    poisoned[1], poisoned[3, 0] = float("nan"), float("inf")
    others = [t for t in range(num_tokens) if t not in (1, 3)]
    for gather_max in (0, num_tokens)[:2 if num_tokens <= 8 else 1]:
        out, stat = [], []
        for x in (c["x"], poisoned):
            stat.append(torch.zeros(SLOTS, inter, device=DEVICE))
            out.append(caprese_ff(x, c["gate_up_ext"], c["down_t_ext"], inter, c["idx"], c["keep"], c["slot"],
                                  c["dense"], c["dense"], stat[-1], ws, act, gather_max))
        torch.testing.assert_close(out[1][others], out[0][others], rtol=1e-5, atol=1e-6)
        keep_slots = [0, 1, 2, 4]
        torch.testing.assert_close(stat[1][keep_slots], stat[0][keep_slots], rtol=1e-5, atol=1e-6)
        assert not bool(torch.isfinite(stat[1][3]).all()), "the premise: slot 3's statistic is non-finite"


@pytest.mark.parametrize("num_tokens, gather_max", [(4, 4), (4, 0), (12, 0), (MAX_TOKENS + 4, 0)])  # each route
def test_a_prompt_tokens_nan_norm_makes_its_whole_statistic_row_nan_as_the_reference(num_tokens, gather_max):
    """A prompt token with one NaN activation (an overflowed neuron: gate -Inf, silu gives NaN) has a NaN norm, so
    griffin_accumulate (griffin_stats_reference_) adds z^2 / NaN = NaN to every neuron of its slot. The kernels must
    keep that NaN: a NaN-dropping max(norm, tiny) made it the smallest normal float, every finite z^2 some 1e35 and
    ranked first, a selection the reference never makes. At TP=1 (the NaN among the token's own neurons) and in exact
    mode (the NaN on another rank: the all-reduced norm is NaN, this rank's activations all finite)."""
    hidden, inter, rank, act = SHAPES[0]
    c = _case(hidden, inter, rank, num_tokens, dtype=torch.float32, dense_tokens=(0, 3))
    c["slot"] = torch.tensor([0, 1, 2, 3] + [4] * (num_tokens - 4), device=DEVICE)
    ws = decode_workspace(num_tokens, hidden, inter, torch.device(DEVICE))
    # TP=1: neuron 5's gate is -Inf for every token (x[:, 0] > 0), its activation NaN, the other neurons finite
    x = c["x"].clone()
    x[:, 0] = x[:, 0].abs() + 0.5
    gate_up_ext = c["gate_up_ext"].clone()
    gate_up_ext[5] = 0.0
    gate_up_ext[5, 0] = float("-inf")
    stat = torch.zeros(SLOTS, inter, device=DEVICE)
    caprese_ff(x, gate_up_ext, c["down_t_ext"], inter, c["idx"], c["keep"], c["slot"], c["dense"], c["dense"], stat,
               ws, act, gather_max)
    assert bool(stat[[0, 3]].isnan().all()), f"finite entries where the reference has NaN: {stat[[0, 3]]}"
    assert not stat[[1, 2, 4]].any(), "no prompt token there"
    # exact mode: this rank's activations finite; token 3's norm NaN from another rank's share, token 0's finite
    z, sumsq = caprese_ff_gate_up(c["x"], c["gate_up_ext"], inter, c["idx"], c["keep"], c["slot"], c["dense"],
                                  ws.parts, ws.ticket, act, gather_max)
    assert bool(torch.isfinite(z[c["dense"], :inter]).all()), "the premise"
    token_norm_sq = sumsq + torch.where(torch.arange(num_tokens, device=DEVICE) == 3, float("nan"), 1.0)
    stat = torch.zeros(SLOTS, inter, device=DEVICE)
    caprese_ff_down(z, c["down_t_ext"], inter, c["idx"], c["slot"], c["dense"], c["dense"], stat, token_norm_sq,
                    ws.acc, ws.tickets, gather_max)
    want = torch.zeros(SLOTS, inter, device=DEVICE)
    griffin_stats_reference_(z, inter, c["slot"], c["dense"], want, token_norm_sq)
    assert bool(want[3].isnan().all())
    torch.testing.assert_close(stat, want, rtol=1e-4, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("hidden, inter, rank, act", SHAPES[:2])
@pytest.mark.parametrize("num_tokens", [6, MAX_TOKENS + 6])  # masked_gate_up / cuBLAS and act_mul_mask
def test_both_routes_equal_the_masked_dense_formulation(hidden, inter, rank, act, num_tokens):
    """Gather route == masked route == dense FF with unselected neurons zeroed + x A B."""
    c = _case(hidden, inter, rank, num_tokens, dtype=torch.float32, dense_tokens=(2, num_tokens - 1))
    acts = {"silu": torch.nn.functional.silu,
            "gelu_tanh": lambda g: torch.nn.functional.gelu(g, approximate="tanh")}
    h = c["x"] @ c["gate_up"].t()
    z = acts[act](h[:, :inter]) * h[:, inter:]
    keep = c["keep"][c["slot"]].bool() | c["dense"][:, None]
    want = (z * keep) @ c["down"].t() + ((c["x"] @ c["a"]) @ c["b"]) * (~c["dense"])[:, None]
    ws = decode_workspace(num_tokens, hidden, inter, torch.device(DEVICE))
    for gather_max in (0, num_tokens)[:2 if num_tokens <= 8 else 1]:  # masked route, gather route
        stat = torch.zeros(SLOTS, inter, device=DEVICE)
        got = caprese_ff(c["x"], c["gate_up_ext"], c["down_t_ext"], inter, c["idx"], c["keep"], c["slot"],
                         c["dense"], c["dense"], stat, ws, act, gather_max)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        ref_stat = torch.zeros_like(stat)
        griffin_stats_reference_(z, inter, c["slot"], c["dense"], ref_stat)
        torch.testing.assert_close(stat, ref_stat, rtol=1e-4, atol=1e-6)
    args = (c["x"], c["gate_up_ext"], c["down_t_ext"], inter)
    torch.testing.assert_close(gather_route_reference(*args, c["idx"], c["slot"], c["dense"], act), want,
                               rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(masked_route_reference(*args, c["keep"], c["slot"], c["dense"], act), want,
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("num_tokens", [6, MAX_TOKENS + 6])
def test_tensor_parallel_local_shards_sum_to_the_masked_formulation(num_tokens):
    """-tp 2 with local selection (engine/tensor_parallel.py): each rank runs both routes on its own shard, with
    local shapes (I/2 neurons, its own k/2 per slot, its 5 of the 9 low-rank channels, one zero-padded); the
    ranks' partial outputs sum (the all-reduce) to the dense FF with the union of their neurons kept + x A B,
    and each rank's statistic is normalised over its own neurons, as local selection defines it."""
    from caprese_vllm.engine.tensor_parallel import TensorParallelShard

    hidden, inter, rank, act, tp = 64, 192, 9, "silu", 2
    c = _case(hidden, inter, rank, num_tokens, dtype=torch.float32, dense_tokens=(2, num_tokens - 1))
    local = inter // tp
    g = torch.Generator(device=DEVICE).manual_seed(7)
    h = c["x"] @ c["gate_up"].t()
    z = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
    keep_all = torch.zeros(SLOTS, inter, dtype=torch.bool, device=DEVICE)
    for gather_max in (0, num_tokens)[:2 if num_tokens <= 8 else 1]:  # masked route, gather route
        got = torch.zeros(num_tokens, hidden, device=DEVICE)
        for q in range(tp):
            shard = TensorParallelShard(tp, q, "local")
            rows = slice(q * local, (q + 1) * local)
            gate_up = torch.cat([c["gate_up"][rows], c["gate_up"][inter:][rows]])            # [2I/tp, H]
            gate_up_ext, down_t_ext = fuse_weights(gate_up, c["down"][:, rows], shard.shard_lowrank_a(c["a"]),
                                                   shard.shard_lowrank_b(c["b"]))
            k_local = shard.local_k(c["k"])
            idx = torch.stack([torch.randperm(local, device=DEVICE, generator=g)[:k_local].sort().values
                               for _ in range(SLOTS)])
            keep = torch.zeros(SLOTS, local, dtype=torch.uint8, device=DEVICE).scatter_(1, idx, 1)
            keep_all[:, rows] = keep.bool()
            stat = torch.zeros(SLOTS, local, device=DEVICE)
            ws = decode_workspace(num_tokens, hidden, local, torch.device(DEVICE))
            got += caprese_ff(c["x"], gate_up_ext, down_t_ext, local, idx, keep, c["slot"], c["dense"], c["dense"],
                              stat, ws, act, gather_max)
            ref_stat = torch.zeros_like(stat)
            griffin_stats_reference_(z[:, rows], local, c["slot"], c["dense"], ref_stat)
            torch.testing.assert_close(stat, ref_stat, rtol=1e-4, atol=1e-6)
        keep = keep_all[c["slot"]] | c["dense"][:, None]
        want = (z * keep) @ c["down"].t() + ((c["x"] @ c["a"]) @ c["b"]) * (~c["dense"])[:, None]
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@CUDA_ONLY
@pytest.mark.parametrize("gather_max", [0, 8])
def test_routes_replay_in_a_cuda_graph(gather_max):
    """Fixed shapes, indices and flags read from device buffers: a captured graph follows new selections."""
    c = _case(576, 1536, 72, 4)
    stat = torch.zeros(SLOTS, 1536, device=DEVICE)
    ws = decode_workspace(4, 576, 1536, torch.device(DEVICE))
    args = lambda: (c["x"], c["gate_up_ext"], c["down_t_ext"], 1536, c["idx"], c["keep"], c["slot"],  # noqa: E731
                    c["dense"], c["dense"], stat, ws, "silu", gather_max)
    out = torch.empty(4, 576, dtype=c["x"].dtype, device=DEVICE)
    caprese_ff(*args())  # compile the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(caprese_ff(*args()))
    c["idx"].copy_(torch.stack([torch.randperm(1536, device=DEVICE)[:768].sort().values for _ in range(SLOTS)]))
    c["keep"].zero_().scatter_(1, c["idx"], 1)
    c["dense"].fill_(False)
    graph.replay()
    want = gather_route_reference(c["x"], c["gate_up_ext"], c["down_t_ext"], 1536, c["idx"], c["slot"], c["dense"],
                                  "silu")
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=3e-2)



@CUDA_ONLY
@pytest.mark.parametrize("gather_max", [0, 8])
def test_exact_mode_halves_replay_in_a_cuda_graph(gather_max):
    """Exact mode's two halves with the all-reduce between them (here a doubling: another rank's equal share), as
    CapreseMLP.forward runs them in a captured graph: the replay follows new sentinel-filled selections."""
    c = _case(576, 1536, 72, 4)
    idx = _sentinel_idx(1536, 768, (768, 0, 200, 767, 1))
    keep = _keep_of(idx, 1536)
    stat = torch.zeros(SLOTS, 1536, device=DEVICE)
    ws = decode_workspace(4, 576, 1536, torch.device(DEVICE))

    def step():
        z, sumsq = caprese_ff_gate_up(c["x"], c["gate_up_ext"], 1536, idx, keep, c["slot"], c["dense"], ws.parts,
                                      ws.ticket, "silu", gather_max)
        return caprese_ff_down(z, c["down_t_ext"], 1536, idx, c["slot"], c["dense"], c["dense"], stat, sumsq * 2,
                               ws.acc, ws.tickets, gather_max)

    out = torch.empty(4, 576, dtype=c["x"].dtype, device=DEVICE)
    step()  # compile the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(step())
    idx.copy_(_sentinel_idx(1536, 768, (3, 768, 0, 500, 90), seed=9))
    keep.copy_(_keep_of(idx, 1536))
    c["dense"].fill_(False)
    graph.replay()
    want = gather_route_reference(c["x"], c["gate_up_ext"], c["down_t_ext"], 1536, idx, c["slot"], c["dense"], "silu")
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=3e-2)

# ---- tensor parallelism's exact selection (engine/tensor_parallel.py): a rank's neuron_idx rows hold its own,
# varying count of the global top-k, filled up with the sentinel I/tp (here `inter`, the rank's neuron count),
# and the statistic is normalised by each token's norm over all ranks' neurons (all-reduced, given).

def _sentinel_idx(inter, width, counts, seed=3):
    """neuron_idx [len(counts), width] as exact mode fills a rank's rows: counts[s] neurons ascending, then the
    sentinel `inter` (TensorParallelShard.neuron_fill)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    rows = []
    for n in counts:
        real = torch.randperm(inter, device=DEVICE, generator=g)[:n].sort().values
        rows.append(torch.cat([real, torch.full((width - n,), inter, dtype=real.dtype, device=DEVICE)]))
    return torch.stack(rows)


def _keep_of(idx, inter):
    """The masked route's keep mask of sentinel-filled rows: the sentinel keeps nothing (keep_of_indices)."""
    keep = torch.zeros(idx.shape[0], inter + 1, dtype=torch.uint8, device=DEVICE).scatter_(1, idx, 1)
    return keep[:, :inter].contiguous()


def _sentinel_counts(k):
    return (k, 0, k // 3, k - 1, 1)   # per slot: full, none (all sentinel), and counts in between


@pytest.mark.parametrize("hidden, inter, rank, act", SHAPES)
@pytest.mark.parametrize("num_tokens", [1, 3, 8])
def test_gather_gate_up_skips_exact_modes_sentinel_and_sums_dense_tokens_squares(hidden, inter, rank, act,
                                                                                 num_tokens):
    """A sentinel entry (= inter) gives z = 0 and reads no row: row `inter` of gate_up_ext is neuron 0's up row, so
    reading it would give a value where the reference has 0. With sumsq, each dense token gets |z[t, :I]|^2."""
    c = _case(hidden, inter, rank, num_tokens)
    slot = torch.arange(num_tokens, device=DEVICE) % SLOTS
    idx = _sentinel_idx(inter, c["k"], _sentinel_counts(c["k"]))
    args = (c["x"], c["gate_up_ext"], inter, idx, slot, c["dense"], act)
    sumsq = torch.zeros(num_tokens, device=DEVICE)
    z = gather_gate_up(*args, sumsq=sumsq, sentinel=True)
    got, want = z.float(), gather_gate_up_reference(*args)
    for t in range(num_tokens):
        n = inter if c["dense"][t] else c["k"] + rank
        torch.testing.assert_close(got[t, :n], want[t, :n], rtol=2e-2, atol=2e-2)
        if not c["dense"][t]:
            sentinel = (idx[slot[t]] == inter).nonzero().squeeze(1)
            assert bool((want[t, sentinel] == 0).all()) and bool((got[t, sentinel] == 0).all())
    want_sumsq = torch.where(c["dense"], got[:, :inter].square().sum(1), 0.0)
    torch.testing.assert_close(sumsq, want_sumsq, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hidden, inter, rank, act", SHAPES)
@pytest.mark.parametrize("num_tokens", [1, 8])
def test_gather_down_skips_exact_modes_sentinel(hidden, inter, rank, act, num_tokens):
    """Row `inter` of down_t_ext is the first low-rank row: a sentinel must add nothing, even where z holds NaN."""
    c = _case(hidden, inter, rank, num_tokens)
    slot = torch.arange(num_tokens, device=DEVICE) % SLOTS
    idx = _sentinel_idx(inter, c["k"], _sentinel_counts(c["k"]))
    z = torch.randn(num_tokens, inter + rank, device=DEVICE).to(torch.bfloat16)
    for t in range(num_tokens):
        if not c["dense"][t]:
            z[t, : c["k"]][idx[slot[t]] == inter] = float("nan")   # not loaded: the NaN stays out
    args = (z, c["down_t_ext"], inter, idx, slot, c["dense"])
    acc, tickets = gather_workspace(num_tokens, hidden, torch.device(DEVICE))
    no_stat = torch.zeros(num_tokens, dtype=torch.bool, device=DEVICE)
    want = gather_down_reference(*args)
    assert bool(torch.isfinite(want).all())
    for _ in range(2):
        got = gather_down(*args, no_stat, torch.zeros(SLOTS, inter, device=DEVICE), acc, tickets, sentinel=True)
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=3e-2)
    assert not acc.any() and not tickets.any(), "gather_down must leave its workspace at zero"


@pytest.mark.parametrize("hidden, inter, rank, act", SHAPES[:2])
def test_statistic_with_a_given_global_token_norm_matches_the_reference(hidden, inter, rank, act):
    """Exact mode: stat_sq += z^2 / token_norm_sq with the all-reduced norm (here this rank's |z|^2 plus another
    rank's share), in gather_down and in griffin_stats_ (one part), as griffin_sparsify_sharded defines it."""
    c = _case(hidden, inter, rank, 3, dense_tokens=(0, 2))
    slot = torch.tensor([1, 1, 3], device=DEVICE)
    token_stat = torch.tensor([True, False, True], device=DEVICE)  # token 1 decodes: no statistic
    z = torch.randn(3, inter + rank, device=DEVICE).to(torch.bfloat16)
    token_norm_sq = z[:, :inter].float().square().sum(1) + torch.tensor([50.0, float("nan"), 7.0], device=DEVICE)
    want = torch.ones(SLOTS, inter, device=DEVICE)
    griffin_stats_reference_(z, inter, slot, token_stat, want, token_norm_sq)
    local = torch.ones(SLOTS, inter, device=DEVICE)
    griffin_stats_reference_(z, inter, slot, token_stat, local)
    assert not torch.allclose(want, local), "the premise: the global norm changes the statistic"
    acc, tickets = gather_workspace(3, hidden, torch.device(DEVICE))
    got = torch.ones(SLOTS, inter, device=DEVICE)
    gather_down(z, c["down_t_ext"], inter, c["idx"], slot, c["dense"], token_stat, got, acc, tickets,
                token_norm_sq=token_norm_sq)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    got = torch.ones(SLOTS, inter, device=DEVICE)
    griffin_stats_(z, inter, slot, token_stat, got, token_norm_sq[:, None])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("hidden, inter, rank, act", SHAPES)
@pytest.mark.parametrize("num_tokens", [2, 17, MAX_TOKENS])
def test_masked_gate_up_writes_token_norms_instead_of_the_statistic(hidden, inter, rank, act, num_tokens):
    """Exact mode's masked route: with sumsq the last program writes every token's |z[t, :I]|^2 (the keep mask
    comes from sentinel-filled rows and never holds the sentinel), twice: the ticket resets."""
    c = _case(hidden, inter, rank, num_tokens, dtype=DOT_DTYPE, dense_tokens=(0, num_tokens - 1))
    keep = _keep_of(_sentinel_idx(inter, c["k"], _sentinel_counts(c["k"])), inter)
    parts, ticket = masked_workspace(inter, torch.device(DEVICE))
    h = c["x"].float() @ c["gate_up_ext"].float().t()
    want_z = act_mul_mask_reference(h, inter, rank, keep, c["slot"], c["dense"], act)
    for _ in range(2):
        sumsq = torch.full((num_tokens,), float("nan"), device=DEVICE)
        z = masked_gate_up(c["x"], c["gate_up_ext"], inter, keep, c["slot"], c["dense"], None, None, parts, ticket,
                           act, sumsq=sumsq)
        torch.testing.assert_close(z.float(), want_z, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(sumsq, z[:, :inter].float().square().sum(1), rtol=1e-4, atol=1e-5)
        assert int(ticket.item()) == 0, "the last program must reset the ticket"


@pytest.mark.parametrize("num_tokens", [6, 12, MAX_TOKENS + 6])  # gather and masked; masked_gate_up; act_mul_mask
def test_tensor_parallel_exact_shards_sum_to_the_masked_formulation(num_tokens):
    """-tp 2 with exact selection: each rank runs caprese_ff_gate_up, the ranks' sumsq are summed (the all-reduce),
    then caprese_ff_down; rank q's neuron_idx rows hold its share of a global top-k (differing per slot and rank,
    none at all on one), filled with the sentinel. The partial outputs sum to the dense FF with the global
    selection kept + x A B, and each rank's statistic is TP=1's for its neurons (normalised over all I)."""
    from caprese_vllm.engine.tensor_parallel import TensorParallelShard
    from caprese_vllm.methods.griffin import keep_of_indices
    from caprese_vllm.methods.griffin import griffin_indices

    hidden, inter, rank, act, tp = 64, 192, 9, "silu", 2
    c = _case(hidden, inter, rank, num_tokens, dtype=torch.float32, dense_tokens=(2, num_tokens - 1))
    c["slot"] = torch.arange(num_tokens, device=DEVICE) % SLOTS
    local = inter // tp
    g = torch.Generator(device=DEVICE).manual_seed(11)
    keep_all = torch.zeros(SLOTS, inter, dtype=torch.bool, device=DEVICE)
    for s in range(SLOTS):
        chosen = torch.arange(c["k"], device=DEVICE) if s == 0 else \
            torch.randperm(inter, device=DEVICE, generator=g)[: c["k"]]   # slot 0: all on rank 0, none on rank 1
        keep_all[s, chosen] = True
    h = c["x"] @ c["gate_up"].t()
    z = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
    keep = keep_all[c["slot"]] | c["dense"][:, None]
    want = (z * keep) @ c["down"].t() + ((c["x"] @ c["a"]) @ c["b"]) * (~c["dense"])[:, None]
    want_stat = torch.zeros(SLOTS, inter, device=DEVICE)
    griffin_stats_reference_(z, inter, c["slot"], c["dense"], want_stat)
    for gather_max in (0, num_tokens)[:2 if num_tokens <= 8 else 1]:  # masked route, gather route
        ranks = []
        for q in range(tp):
            shard = TensorParallelShard(tp, q, "exact")
            rows = slice(q * local, (q + 1) * local)
            gate_up = torch.cat([c["gate_up"][rows], c["gate_up"][inter:][rows]])
            gate_up_ext, down_t_ext = fuse_weights(gate_up, c["down"][:, rows], shard.shard_lowrank_a(c["a"]),
                                                   shard.shard_lowrank_b(c["b"]))
            idx = griffin_indices(keep_all[:, rows], shard.k_capacity(c["k"], inter), fill=shard.neuron_fill(inter))
            keep_q = keep_of_indices(idx, local).to(torch.uint8)
            assert bool((keep_q.bool() == keep_all[:, rows]).all())
            ws = decode_workspace(num_tokens, hidden, local, torch.device(DEVICE))
            z_q, sumsq = caprese_ff_gate_up(c["x"], gate_up_ext, local, idx, keep_q, c["slot"], c["dense"], ws.parts,
                                            ws.ticket, act, gather_max)
            ranks.append((down_t_ext, idx, ws, z_q, sumsq))
        token_norm_sq = sum(r[4] for r in ranks)                                   # the all-reduce
        got = torch.zeros(num_tokens, hidden, device=DEVICE)
        for q, (down_t_ext, idx, ws, z_q, _) in enumerate(ranks):
            stat = torch.zeros(SLOTS, local, device=DEVICE)
            got += caprese_ff_down(z_q, down_t_ext, local, idx, c["slot"], c["dense"], c["dense"], stat,
                                   token_norm_sq, ws.acc, ws.tickets, gather_max)
            torch.testing.assert_close(stat, want_stat[:, q * local:(q + 1) * local], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("num_tokens, gather_max", [(4, 8), (6, 0), (MAX_TOKENS + 6, 0)])   # each route
def test_exact_mode_ops_declare_their_mutations_and_fake_their_outputs(num_tokens, gather_max):
    """caprese::fused_ff_gate_up / fused_ff_down as vLLM's torch.compile traces them (opaque, through their fake
    implementations): the schema names every argument they write, the fakes' shapes and dtypes are the outputs'."""
    from caprese_vllm.engine import ops  # noqa: F401  (registers torch.ops.caprese.*)

    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    c = _case(64, 192, 8, num_tokens, dtype=torch.float32, dense_tokens=(0, 2))
    idx = _sentinel_idx(192, c["k"], _sentinel_counts(c["k"]))
    ws = decode_workspace(num_tokens, 64, 192, torch.device(DEVICE))
    args = (c["x"], c["gate_up_ext"], 192, idx, _keep_of(idx, 192), c["slot"], c["dense"], ws.parts, ws.ticket,
            "silu", gather_max)
    torch.library.opcheck(torch.ops.caprese.fused_ff_gate_up.default, args, test_utils=checks)
    z, sumsq = torch.ops.caprese.fused_ff_gate_up(*args)
    args = (z, c["down_t_ext"], 192, idx, c["slot"], c["dense"], c["dense"], torch.zeros(SLOTS, 192, device=DEVICE),
            sumsq, ws.acc, ws.tickets, gather_max)
    torch.library.opcheck(torch.ops.caprese.fused_ff_down.default, args, test_utils=checks)
