"""Per-request GRIFFIN state in the engine: chunking, slot reuse and preemption, step by step.

Drives the real CapreseBatchState and caprese::griffin_sparsify op with the StepInfo sequences
vLLM's runners produce, and checks every selection against GRIFFIN over the whole prompt.
"""

from __future__ import annotations

import numpy as np
import torch

from caprese_vllm.engine import ops  # noqa: F401
from caprese_vllm.engine.batch_state import CapreseBatchState
from caprese_vllm.engine.step_info import StepInfo
from caprese_vllm.methods import griffin_accumulate, griffin_select

INTER, K = 64, 16


class Harness:
    """One GRIFFIN layer; each request's token activations are fixed random rows per position."""

    def __init__(self, max_slots=4):
        self.state = CapreseBatchState(max_slots=max_slots, max_tokens=256, device=torch.device("cpu"),
                                       griffin_layers=1, intermediate_size=INTER, griffin_k=K)
        self.layer = self.state.add_griffin_layer(INTER, K)
        self.z: dict[str, torch.Tensor] = {}

    def acts(self, req, seed):
        self.z[req] = torch.randn(100, INTER, generator=torch.Generator().manual_seed(seed))

    def step(self, reqs, finished=(), preempted=()):
        """reqs: (req_id, chunk_start, num_tokens, prompt_len, in_prefill); finished: ids the runner dropped;
        preempted: ids the scheduler preempted (the V1 runner keeps them live)."""
        self.live = (getattr(self, "live", set()) | {r[0] for r in reqs}) - set(finished)
        info = StepInfo(req_ids=[r[0] for r in reqs], num_scheduled=np.array([r[2] for r in reqs]),
                        chunk_start=np.array([r[1] for r in reqs]), prompt_len=np.array([r[3] for r in reqs]),
                        in_prefill=np.array([r[4] for r in reqs]), live_req_ids=set(self.live),
                        preempted_req_ids=frozenset(preempted))
        self.state.on_step(info)
        z = torch.cat([self.z[r[0]][r[1]:r[1] + r[2]] for r in reqs])
        n = z.shape[0]
        s = self.state
        return torch.ops.caprese.griffin_sparsify(z, s.token_slot[:n], s.token_stat[:n], s.token_dense[:n],
                                                  self.layer.stat_sq, self.layer.neuron_idx), z

    def expected_idx(self, req, prompt_len):
        stat = torch.zeros(1, INTER)
        griffin_accumulate(stat, self.z[req][None, :prompt_len], torch.ones(1, prompt_len, dtype=torch.bool))
        return griffin_select(stat, K)[0]

    def kept(self, out_row):
        return torch.nonzero(out_row != 0).flatten()


def test_chunked_prompt_then_decode_uses_whole_prompt_selection():
    h = Harness()
    h.acts("a", 1)
    h.step([("a", 0, 4, 10, True)])
    h.step([("a", 4, 4, 10, True)])
    out, z = h.step([("a", 8, 2, 10, True)])
    assert torch.equal(out, z), "prompt tokens run dense"
    out, _ = h.step([("a", 10, 1, 10, False)])
    assert torch.equal(h.kept(out[0]), h.expected_idx("a", 10))


def test_mixed_batch_each_decode_token_uses_its_own_request():
    h = Harness()
    h.acts("a", 1), h.acts("b", 2)
    h.step([("a", 0, 6, 6, True), ("b", 0, 9, 9, True)])
    h.acts("c", 3)
    out, z = h.step([("a", 6, 1, 6, False), ("c", 0, 5, 5, True), ("b", 9, 1, 9, False)])
    assert torch.equal(h.kept(out[0]), h.expected_idx("a", 6))
    assert torch.equal(out[1:6], z[1:6])
    assert torch.equal(h.kept(out[6]), h.expected_idx("b", 9))


def test_reused_slot_starts_from_clean_statistics():
    h = Harness(max_slots=1)
    h.acts("a", 1), h.acts("b", 2)
    h.step([("a", 0, 8, 8, True)])
    h.step([("a", 8, 1, 8, False)])
    h.step([("b", 0, 7, 7, True)], finished={"a"})
    assert h.state.slot_of == {"b": 0}
    out, _ = h.step([("b", 7, 1, 7, False)])
    assert torch.equal(h.kept(out[0]), h.expected_idx("b", 7))


def test_preemption_and_recompute_give_the_same_selection():
    h = Harness()
    h.acts("a", 1)
    h.step([("a", 0, 12, 12, True)])
    first, _ = h.step([("a", 12, 1, 12, False)])
    h.step([("a", 13, 1, 12, False)])
    # Preempted, then resumed: vLLM recomputes prompt + the 2 generated tokens in one prefill.
    out, z = h.step([("a", 0, 14, 12, True)])
    assert torch.equal(out, z), "recomputed tokens run dense"
    again, _ = h.step([("a", 14, 1, 12, False)])
    assert torch.equal(h.kept(again[0]), h.kept(first[0])) and torch.equal(h.kept(first[0]), h.expected_idx("a", 12))


def test_padding_tokens_point_at_the_dummy_slot_and_stay_dense():
    h = Harness()
    h.acts("a", 1)
    h.step([("a", 0, 5, 5, True)])
    s = h.state
    assert bool(s.token_dense[5:].all()) and bool((s.token_slot[5:] == s.dummy_slot).all())
    assert not bool(s.token_stat[5:].any())


def test_slots_of_requests_the_runner_dropped_are_freed_without_a_finished_notice():
    """A step that schedules no tokens never reaches the hook: its finished ids are never seen."""
    h = Harness(max_slots=2)
    for i in range(6):
        req = f"r{i}"
        h.acts(req, i)
        h.live = set()  # every earlier request finished in a token-less step
        h.step([(req, 0, 4, 4, True)])
    assert h.state.slot_of.keys() == {"r5"}


def test_steady_decode_steps_skip_the_update_and_every_change_takes_it_again():
    h = Harness()
    for req, seed in (("a", 1), ("b", 2), ("c", 3)):
        h.acts(req, seed)
    h.step([("a", 0, 6, 6, True), ("b", 0, 9, 9, True)])
    h.step([("a", 6, 1, 6, False), ("b", 9, 1, 9, False)])            # selects: a full update
    writes = []
    h.state._update = lambda info, update=h.state._update: (writes.append(info.req_ids), update(info))[1]
    out, _ = h.step([("a", 7, 1, 6, False), ("b", 10, 1, 9, False)])   # steady: nothing to write
    assert writes == []
    assert torch.equal(h.kept(out[0]), h.expected_idx("a", 6)) and torch.equal(h.kept(out[1]), h.expected_idx("b", 9))
    out, _ = h.step([("b", 11, 1, 9, False), ("a", 8, 1, 6, False)])   # another order: the slots move
    assert torch.equal(h.kept(out[0]), h.expected_idx("b", 9)) and torch.equal(h.kept(out[1]), h.expected_idx("a", 6))
    out, z = h.step([("b", 12, 1, 9, False), ("c", 0, 4, 4, True)], finished={"a"})  # a prompt joins
    assert torch.equal(out[1:], z[1:]), "prompt tokens run dense"
    out, _ = h.step([("b", 13, 1, 9, False), ("c", 4, 1, 4, False)])
    h.step([("b", 14, 1, 9, False), ("c", 5, 1, 4, False)])
    assert writes == [["b", "a"], ["b", "c"], ["b", "c"]]
    assert torch.equal(h.kept(out[0]), h.expected_idx("b", 9)) and torch.equal(h.kept(out[1]), h.expected_idx("c", 4))
    assert not bool(h.state.token_stat.any()) and not bool(h.state.token_dense[:2].any())


def test_griffin_select_is_topk_and_breaks_ties_toward_the_lowest_index():
    stat = torch.rand(3, 4, 1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(griffin_select(stat, 500), torch.topk(stat, 500, dim=-1).indices.sort(dim=-1).values)
    tied = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, 3.0], [0.0] * 6])
    assert griffin_select(tied, 3).tolist() == [[1, 2, 5], [0, 1, 2]]


def test_preempted_requests_give_their_slots_back():
    """Priority preemption (V1 runner): preempted requests stay in the runner's cache until they finish, so
    with slots freed only on finish, more requests than slots were 'live' and the next new request
    raised 'no free state slot' inside the model runner. A preempted request restarts from position 0."""
    h = Harness(max_slots=2)
    for i, req in enumerate("abcde"):
        h.acts(req, i + 1)
    h.step([("a", 0, 5, 5, True), ("b", 0, 6, 6, True)])
    h.step([("a", 5, 1, 5, False), ("b", 6, 1, 6, False)])
    # c (higher priority) arrives; a and b are preempted for its blocks, then d: all four stay live
    h.step([("c", 0, 7, 7, True)], preempted=("a", "b"))
    h.step([("c", 7, 1, 7, False), ("d", 0, 4, 4, True)])
    out, _ = h.step([("c", 8, 1, 7, False), ("d", 4, 1, 4, False)])
    assert torch.equal(h.kept(out[0]), h.expected_idx("c", 7))
    assert torch.equal(h.kept(out[1]), h.expected_idx("d", 4))
    # a resumes once d is preempted in its turn: it recomputes its prompt and its one answer token from
    # position 0; the answer token runs sparse with a's own selection, as it first ran (not dense)
    out, z = h.step([("a", 0, 6, 5, True)], preempted=("d",))
    assert torch.equal(out[:5], z[:5]), "prompt tokens run dense"
    assert torch.equal(h.kept(out[5]), h.expected_idx("a", 5))
    out, _ = h.step([("a", 6, 1, 5, False), ("c", 9, 1, 7, False)])
    assert torch.equal(h.kept(out[0]), h.expected_idx("a", 5))
    assert torch.equal(h.kept(out[1]), h.expected_idx("c", 7))
    # b, preempted earlier, resumes with its selection too; c's and d's wait for their turn
    out, _ = h.step([("b", 0, 8, 6, True)], preempted=("c",))
    assert torch.equal(h.kept(out[6]), h.expected_idx("b", 6)) and torch.equal(h.kept(out[7]), h.expected_idx("b", 6))
    assert set(h.state.saved_selection) == {"c", "d"}
