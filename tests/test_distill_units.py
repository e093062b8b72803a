"""distill/ building blocks: problems, batching, statistics, closed form, config; no vLLM."""

from __future__ import annotations

import math
import re

import pytest
import torch

from distill.capture import LayerStats
from distill.config import ConfigError, DistillConfig, load_config, pin_config
from distill.data import Sample, collate, length_batches
from distill.problems import MATH_TEMPLATES, extract_answer, language_problems, math_problems
from distill.report import gap_recovered
from distill.rrr import closed_form, layerwise_refine


def _solve(question: str) -> int:
    """An independent solver for a few templates, written from the question text alone."""
    nums = [int(n) for n in re.findall(r"-?\d+", question)]
    if "remainder when" in question:
        return nums[0] % nums[1]
    if "greatest common divisor" in question:
        return math.gcd(nums[0], nums[1])
    if "sum of the first" in question:
        return sum(range(1, nums[0] + 1))
    if "units digit" in question:
        return int(str(nums[0] ** nums[1])[-1])
    if "Solve for x" in question:
        a, b, c = nums
        sign = -1 if " - " in question else 1
        return (c - sign * abs(b)) // a
    raise KeyError(question)


def test_math_answers_match_an_independent_solver():
    checked = 0
    for p in math_problems(400, seed=3):
        try:
            expected = _solve(p.question)
        except KeyError:
            continue
        assert p.answer == str(expected), p.question
        checked += 1
    assert checked > 80


def test_math_problems_are_distinct_varied_and_heldout_is_disjoint():
    train = math_problems(500, seed=0)
    heldout = math_problems(100, seed=1, exclude={p.question for p in train})
    assert len({p.question for p in train}) == 500
    assert not {p.question for p in train} & {p.question for p in heldout}
    assert {p.topic for p in train} == set(MATH_TEMPLATES)
    assert all(p.question.startswith("Please reason step by step.") for p in train)


def test_language_problems_use_real_prose():
    problems = language_problems(60, seed=0)
    assert len({p.question for p in problems}) == 60
    summaries = [p for p in problems if p.topic == "summary"]
    assert summaries and all(len(p.question.split()) > 40 for p in summaries)


@pytest.mark.parametrize("text, answer", [
    ("3 + 4 = 7, so the answer is 7.", "7"), ("The answer is 1,200 dollars", "1200"),
    ("x = -5", "-5"), ("so 12.0 apples", "12"), ("I don't know", None),
    ("The answer is: 42. (We used 3 steps.)", "42"),  # the number after "answer is", not the last one
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def _sample(i: int, prompt: int, completion: int) -> Sample:
    return Sample(id=str(i), kind="math", topic="t", question="q", answer="1",
                  prompt_ids=list(range(1, prompt + 1)), completion_ids=list(range(100, 100 + completion)))


def test_collate_masks_mark_prompt_completion_and_scored_positions():
    batch = collate([_sample(0, 3, 4), _sample(1, 2, 1)], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 100, 101, 102, 103], [1, 2, 100, 0, 0, 0, 0]]
    assert batch.prompt_mask.int().tolist() == [[1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]]
    assert batch.completion_mask.int().tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0, 0]]
    # compressed positions that predict a further completion token
    assert batch.target_mask.int().tolist() == [[0, 0, 0, 1, 1, 1, 0], [0] * 7]


def test_length_batches_cover_every_sample_within_budget():
    samples = [_sample(i, 5 + i % 7, 10 + (i * 13) % 50) for i in range(40)]
    batches = list(length_batches(samples, max_tokens=300))
    assert sorted(s.id for b in batches for s in b) == sorted(s.id for s in samples)
    assert all(len(b) == 1 or max(s.num_tokens for s in b) * len(b) <= 300 for b in batches)


def _random_stats(n=4000, hidden=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    true_map = torch.randn(hidden, 3, generator=g, dtype=torch.float64) @ torch.randn(3, hidden, generator=g,
                                                                                       dtype=torch.float64)
    r = x @ true_map + 0.3 * torch.randn(n, hidden, generator=g, dtype=torch.float64)
    y = r + torch.randn(n, hidden, generator=g, dtype=torch.float64)
    stats = LayerStats(x.t() @ x, x.t() @ r, float(r.square().sum()), float(y.square().sum()), n)
    return stats, x, r, y


def test_stats_error_formula_equals_direct_computation():
    stats, x, r, y = _random_stats()
    a, b = torch.randn(24, 4, dtype=torch.float64), torch.randn(4, 24, dtype=torch.float64)
    direct = float((r - x @ a @ b).square().sum())
    assert stats.residual_error(a, b) == pytest.approx(direct, rel=1e-9)
    assert stats.relative_error() == pytest.approx(float(r.norm() / y.norm()), rel=1e-9)


def test_closed_form_is_the_best_rank_r_fit():
    stats, x, r, _ = _random_stats()
    a, b = closed_form(stats, rank=3, ridge=0.0)
    err = stats.residual_error(a, b)
    # Eckart-Young on the least-squares fitted values: the optimum of the reduced-rank problem
    w = torch.linalg.lstsq(x, r).solution
    u, s, vh = torch.linalg.svd(x @ w, full_matrices=False)
    best = float((r - u[:, :3] @ torch.diag(s[:3]) @ vh[:3]).square().sum())
    assert err == pytest.approx(best, rel=1e-5)
    assert err < 0.2 * stats.rr
    # Adam on the same objective cannot beat it
    a2, b2 = layerwise_refine(stats, a, b, steps=50, lr=1e-3)
    assert stats.residual_error(a2, b2) >= err * (1 - 1e-4)


def test_gap_recovered():
    assert gap_recovered(1.0, 0.6, 0.8) == pytest.approx(0.5)
    assert gap_recovered(0.5, 0.5, 0.5) is None


def test_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("model: m\nrun_dir: r\ndata:\n  num_samples: -3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: field data.num_samples: .*greater than 0"):
        load_config(bad, {})
    with pytest.raises(ConfigError, match="field fit.nope"):
        load_config(None, {"model": "m", "run_dir": "r", "fit.nope": 1})
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, {})


def test_resume_requires_the_same_settings(tmp_path):
    config = DistillConfig(model="m", run_dir=tmp_path / "run")
    pin_config(config)
    pin_config(config.model_copy(update={"device": "cuda"}))  # where it runs may change
    with pytest.raises(ConfigError, match=r"different settings \(density\)"):
        pin_config(config.model_copy(update={"density": 0.3}))


def test_kl_over_the_dense_top_tokens(hf_models):
    """e2e_kl_top: the whole vocabulary gives the exact KL; a top-k union is the KL of both sides renormalised
    on those tokens (so it is >= 0 and 0 for identical inputs), and gradients reach the hidden states."""
    from distill.e2e import kl_to_dense, lm_logits

    model, _ = hf_models["smollm2-135m"]
    g = torch.Generator().manual_seed(0)
    target = torch.randn(6, model.config.hidden_size, generator=g)
    hidden = (target + 0.3 * torch.randn(6, model.config.hidden_size, generator=g)).requires_grad_(True)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    full = kl_to_dense(model, target, hidden)
    torch.testing.assert_close(kl_to_dense(model, target, hidden, top=vocab_size), full, rtol=1e-4, atol=1e-6)
    top = kl_to_dense(model, target, hidden, top=16)
    vocab = lm_logits(model, target).topk(16, dim=-1).indices.unique()
    log_p = torch.log_softmax(lm_logits(model, target)[:, vocab], -1)
    log_q = torch.log_softmax(lm_logits(model, hidden)[:, vocab], -1)
    torch.testing.assert_close(top, (log_p.exp() * (log_p - log_q)).sum(-1), rtol=1e-4, atol=1e-6)
    assert (top >= -1e-6).all() and kl_to_dense(model, target, target, top=16).abs().max() < 1e-5
    top.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    # Later epochs reuse each chunk's vocabulary instead of the whole vocabulary's dense logits.
    vocabs: list[torch.Tensor] = []
    first = kl_to_dense(model, target, hidden, chunk=4, top=16, vocabs=vocabs)
    assert len(vocabs) == 2
    vocabs[1] = vocabs[1][:3]  # a different cached vocabulary must be what the second pass uses
    again = kl_to_dense(model, target, hidden, chunk=4, top=16, vocabs=vocabs)
    torch.testing.assert_close(again[:4], first[:4], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(again[4:], first[4:])


def test_scores_count_tokens_before_the_end_token_and_exact_answers():
    from distill.evaluate import score

    samples = [Sample(id=str(i), kind="math", topic="t", question="q", answer=a, prompt_ids=[1])
               for i, a in enumerate(["12", "7"])]
    answers = [{"completion_ids": [5, 6, 7, 2], "text": "so the answer is 12"},
               {"completion_ids": [5, 6], "text": "it is 8"}]
    got = score({"math": answers}, {"math": samples}, eos_ids={2})
    assert got == {"math": {"length": 2.5, "truncation": 0.0, "num_prompts": 2, "accuracy": 0.5}}


def test_resume_accepts_a_run_made_before_a_setting_existed(tmp_path):
    """A setting added later (with the default the old run used) must not make old run directories unusable."""
    import json

    config = DistillConfig(model="smollm2-135m", run_dir=tmp_path)
    pin_config(config)
    written = json.loads((tmp_path / "config.json").read_text())
    del written["fit"]["e2e_kl_top"]
    written["eval"]["batch_size"] = 16  # a setting since removed
    (tmp_path / "config.json").write_text(json.dumps(written))
    pin_config(config)  # same settings: resumes
    with pytest.raises(ConfigError, match="fit"):
        pin_config(DistillConfig(model="smollm2-135m", run_dir=tmp_path, fit={"e2e_kl_top": 64}))


def test_a_fit_for_local_selection_fits_that_selection_and_records_it(hf_models, tmp_path):
    """--tp-selection local --tp-size 2 (issue 19): the training statistics are captured under -tp 2's local
    selection (reference/sparsifiers.py, shown equal to the engine's in test_tensor_parallel.py), so the closed form
    fits that selection's error: on those statistics it beats an adapter fitted for the TP=1 selection; the
    manifest says local, size 2, and the reference then selects so by default."""
    from caprese_vllm.methods import MethodSpec
    from caprese_vllm.reference import patch_model, unpatch_model
    from distill.capture import capture_stats
    from distill.fit import fit_adapter

    model, tokenizer = hf_models["smollm2-135m"]
    texts = [("What is 12 times 7?", " 12 times 7 is 84. The answer is 84."),
             ("Sum the numbers 3, 9 and 14.", " 3 + 9 = 12 and 12 + 14 = 26, so 26."),
             ("Write one sentence about rivers.", " Rivers carry water from the hills down to the sea.")]
    samples = [Sample(id=str(i), kind="math", topic="t", question=q, answer=None,
                      prompt_ids=tokenizer(q)["input_ids"], completion_ids=tokenizer(a)["input_ids"])
               for i, (q, a) in enumerate(texts * 2)]
    method = MethodSpec(name="griffin", density=0.5, layers=[0, 1])
    fits = {}
    for selection, size in (("local", 2), ("exact", 1)):
        config = DistillConfig(model="smollm2-135m", run_dir=tmp_path / selection, tp_selection=selection,
                               tp_size=size, fit={"refine": "none", "ridge": 1e-6})
        fits[selection] = fit_adapter(config, model, tokenizer, method, 8, samples, samples)
    local, exact = fits["local"], fits["exact"]
    assert local.manifest.tensor_parallel.selection == "local" and local.manifest.tensor_parallel.size == 2
    assert exact.manifest.tensor_parallel is None   # the default, left out of the file as before
    stats_local = capture_stats(model, method, samples, 4096, tokenizer.eos_token_id, "local", local_shards=2)
    stats_exact = capture_stats(model, method, samples, 4096, tokenizer.eos_token_id, "exact")
    for layer in method.layers:
        # the sparse error differs between the selections: the capture tells them apart
        assert stats_local[layer].relative_error() != pytest.approx(stats_exact[layer].relative_error(), rel=1e-6)
        served = stats_local[layer]
        assert (served.relative_error(local.lowrank_a[layer], local.lowrank_b[layer])
                < served.relative_error(exact.lowrank_a[layer], exact.lowrank_b[layer]))
    runtime = patch_model(model, adapter=local)
    try:
        assert {mlp.local_shards for mlp in runtime.mlps} == {2}
    finally:
        unpatch_model(model)
