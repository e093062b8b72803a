"""Triton kernels against their PyTorch references (GPU only: run on a CUDA host, e.g. the device tool).

The two routes of kernels/decode_mlp.py must also agree with each other and with the portable
masked formulation (dense FF with the other neurons zeroed + x A B), which is what the CPU plugin
runs and the reference implementation defines.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the Triton kernels need a CUDA GPU", allow_module_level=True)

from caprese_vllm.kernels.act_mul_mask import act_mul_mask, act_mul_mask_reference  # noqa: E402
from caprese_vllm.kernels.decode_mlp import (  # noqa: E402
    caprese_ff, fuse_weights, gather_route_reference, masked_route_reference,
)
from caprese_vllm.kernels.gather_down import gather_down, gather_down_reference  # noqa: E402
from caprese_vllm.kernels.gather_gate_up import gather_gate_up, gather_gate_up_reference  # noqa: E402
from caprese_vllm.kernels.griffin_stats import griffin_stats_, griffin_stats_reference_  # noqa: E402

SHAPES = [  # hidden, intermediate, rank, activation
    (576, 1536, 72, "silu"), (640, 2048, 232, "gelu_tanh"), (4096, 14336, 256, "silu"), (1000, 3000, 20, "silu"),
]
SLOTS = 5


def _case(hidden, inter, rank, num_tokens, dtype=torch.bfloat16, seed=0, dense_tokens=(1,)):
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = inter // 2
    x = torch.randn(num_tokens, hidden, device="cuda", generator=g).to(dtype)
    gate_up = (torch.randn(2 * inter, hidden, device="cuda", generator=g) / hidden ** 0.5).to(dtype)
    down = (torch.randn(hidden, inter, device="cuda", generator=g) / inter ** 0.5).to(dtype)
    a = (torch.randn(hidden, rank, device="cuda", generator=g) / hidden ** 0.5).to(dtype)
    b = (torch.randn(rank, hidden, device="cuda", generator=g) / rank ** 0.5).to(dtype)
    gate_up_ext, down_t_ext = fuse_weights(gate_up, down, a, b)
    idx = torch.stack([torch.randperm(inter, device="cuda", generator=g)[:k].sort().values for _ in range(SLOTS)])
    keep = torch.zeros(SLOTS, inter, dtype=torch.uint8, device="cuda").scatter_(1, idx, 1)
    slot = torch.randint(0, SLOTS, (num_tokens,), device="cuda", generator=g)
    dense = torch.zeros(num_tokens, dtype=torch.bool, device="cuda")
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
    z = torch.randn(num_tokens, inter + rank, device="cuda").to(torch.bfloat16)
    args = (z, c["down_t_ext"], inter, c["idx"], c["slot"], c["dense"])
    torch.testing.assert_close(gather_down(*args).float(), gather_down_reference(*args), rtol=2e-2, atol=3e-2)


@pytest.mark.parametrize("hidden, inter, rank, act", SHAPES)
def test_act_mul_mask_matches_reference(hidden, inter, rank, act):
    c = _case(hidden, inter, rank, 9, dense_tokens=(0, 4))
    h = torch.randn(9, 2 * inter + rank, device="cuda").to(torch.bfloat16)
    args = (h, inter, c["keep"], c["slot"], c["dense"], act)
    torch.testing.assert_close(act_mul_mask(*args).float(), act_mul_mask_reference(*args), rtol=2e-2, atol=2e-2)


def test_griffin_stats_match_the_reference_accumulation():
    z = torch.randn(7, 1536, device="cuda")
    slot = torch.tensor([0, 0, 1, 2, 2, 2, 3], device="cuda")
    stat_flag = torch.tensor([1, 1, 0, 1, 1, 0, 1], dtype=torch.bool, device="cuda")
    got, want = torch.zeros(5, 1536, device="cuda"), torch.zeros(5, 1536, device="cuda")
    griffin_stats_(z, 1536, slot, stat_flag, got)
    griffin_stats_reference_(z, 1536, slot, stat_flag, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("hidden, inter, rank, act", SHAPES[:2])
def test_both_routes_equal_the_masked_dense_formulation(hidden, inter, rank, act):
    """Gather route == masked route == dense FF with unselected neurons zeroed + x A B."""
    c = _case(hidden, inter, rank, 6, dtype=torch.float32, dense_tokens=(2,))
    acts = {"silu": torch.nn.functional.silu,
            "gelu_tanh": lambda g: torch.nn.functional.gelu(g, approximate="tanh")}
    h = c["x"] @ c["gate_up"].t()
    z = acts[act](h[:, :inter]) * h[:, inter:]
    keep = c["keep"][c["slot"]].bool() | c["dense"][:, None]
    want = (z * keep) @ c["down"].t() + ((c["x"] @ c["a"]) @ c["b"]) * (~c["dense"])[:, None]
    for gather_max in (0, 6):  # masked route, gather route
        stat = torch.zeros(SLOTS, inter, device="cuda")
        got = caprese_ff(c["x"], c["gate_up_ext"], c["down_t_ext"], inter, c["idx"], c["keep"], c["slot"],
                         c["dense"], c["dense"], stat, act, gather_max)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        ref_stat = torch.zeros_like(stat)
        griffin_stats_reference_(z, inter, c["slot"], c["dense"], ref_stat)
        torch.testing.assert_close(stat, ref_stat, rtol=1e-4, atol=1e-6)
    args = (c["x"], c["gate_up_ext"], c["down_t_ext"], inter)
    torch.testing.assert_close(gather_route_reference(*args, c["idx"], c["slot"], c["dense"], act), want,
                               rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(masked_route_reference(*args, c["keep"], c["slot"], c["dense"], act), want,
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("gather_max", [0, 8])
def test_routes_replay_in_a_cuda_graph(gather_max):
    """Fixed shapes, indices and flags read from device buffers: a captured graph follows new selections."""
    c = _case(576, 1536, 72, 4)
    stat = torch.zeros(SLOTS, 1536, device="cuda")
    args = lambda: (c["x"], c["gate_up_ext"], c["down_t_ext"], 1536, c["idx"], c["keep"], c["slot"],  # noqa: E731
                    c["dense"], c["dense"], stat, "silu", gather_max)
    out = torch.empty(4, 576, dtype=c["x"].dtype, device="cuda")
    caprese_ff(*args())  # compile the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(caprese_ff(*args()))
    c["idx"].copy_(torch.stack([torch.randperm(1536, device="cuda")[:768].sort().values for _ in range(SLOTS)]))
    c["keep"].zero_().scatter_(1, c["idx"], 1)
    c["dense"].fill_(False)
    graph.replay()
    want = gather_route_reference(c["x"], c["gate_up_ext"], c["down_t_ext"], 1536, c["idx"], c["slot"], c["dense"],
                                  "silu")
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=3e-2)
