"""The bf16 end-to-end crash (H200, Qwen2.5-Coder-0.5B) replayed on CPU with the real SmolLM2: one non-finite
value in the low-rank weights must neither reach the GRIFFIN selection through padding tokens nor get into
A and B through an optimizer step (distill/e2e.py, module docstring)."""

from __future__ import annotations

import pytest
import torch

import distill.e2e as e2e
from caprese_vllm.adapter import base_info_from_model, synthetic_adapter
from caprese_vllm.methods import MethodSpec, default_layers
from caprese_vllm.reference import patch_model, teacher_forcing, unpatch_model
from distill.config import DistillConfig, DistillError
from distill.data import Sample, collate


def _samples(tokenizer) -> list[Sample]:
    """Two sequences of different lengths: the shorter one is right-padded after its completion."""
    out = []
    for i, (question, answer) in enumerate((("What is 2 + 3?", " 2 + 3 = 5. The answer is 5."),
                                            ("Name a colour.", " Blue."))):
        out.append(Sample(id=f"s{i}", kind="math", topic="t", question=question, answer=None,
                          prompt_ids=tokenizer(question).input_ids,
                          completion_ids=tokenizer(answer, add_special_tokens=False).input_ids))
    return out


def _adapter(model, value: float | None = None):
    layers = default_layers("griffin", model.config.num_hidden_layers)
    adapter = synthetic_adapter(base_info_from_model(model), MethodSpec(name="griffin", density=0.5, layers=layers),
                                rank=8, scale=0.5, seed=1)
    if value is not None:
        adapter.lowrank_a[layers[0]][0, 0] = value
    return adapter


def test_nan_low_rank_weights_still_give_every_layer_a_valid_selection(hf_models):
    """NaN in layer 0's low-rank path makes the completion tokens NaN from layer 0's output on; in a
    teacher-forced pass attention multiplies their NaN values by a zero weight (NaN * 0 = NaN), so from
    layer 1 on the *prompt* tokens' statistic is NaN too. That was the crash: the selection of a NaN
    statistic returned out-of-range indices. It must now be exactly k distinct in-range neurons."""
    model, tokenizer = hf_models["smollm2-135m"]
    samples = _samples(tokenizer)
    batch = collate(samples, tokenizer.eos_token_id)
    assert (batch.attention_mask == 0).any(), "the batch must hold padding tokens"
    runtime = patch_model(model, adapter=_adapter(model, float("nan")))
    try:
        with torch.no_grad(), teacher_forcing(model, batch.prompt_mask):
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        first, *later = runtime.mlps
        assert torch.isfinite(first.sparsifier.stat_sq).all(), "layer 0's prompt tokens never see the NaN"
        assert not torch.isfinite(later[0].sparsifier.stat_sq).all(), "the replay must reach a NaN statistic"
        for mlp in runtime.mlps:
            sparsifier = mlp.sparsifier
            idx = sparsifier.neuron_idx
            assert idx.shape[-1] == sparsifier.k and int(idx.min()) >= 0, mlp.layer
            assert int(idx.max()) < mlp.intermediate_size, mlp.layer
            assert all(len(set(row.tolist())) == sparsifier.k for row in idx), mlp.layer
    finally:
        unpatch_model(model)


def _config(tmp_path, **fit) -> DistillConfig:
    return DistillConfig(model="smollm2-135m", run_dir=tmp_path, seed=0,
                         fit={"e2e_epochs": 1, "e2e_lr": 1e-3, "e2e_batch_tokens": 64, "e2e_loss": "hidden_mse",
                              **fit})


def test_non_finite_steps_are_skipped_and_a_diverged_fit_stops_with_one_line(hf_models, tmp_path, monkeypatch):
    model, tokenizer = hf_models["smollm2-135m"]
    pad = tokenizer.eos_token_id
    # an infinite weight: x @ A is inf/NaN on every compressed token, so every step's loss is non-finite
    init = _adapter(model, float("inf"))
    monkeypatch.setattr(e2e, "MAX_SKIPPED_STEPS", 0)
    with pytest.raises(DistillError, match=r"non-finite loss or gradient .* lower fit.e2e_lr"):
        e2e.refine_end_to_end(_config(tmp_path), model, pad, init, _samples(tokenizer), tmp_path)
    assert getattr(model, "_caprese_runtime", None) is None, "the model must be left unpatched"
    # allowed to skip: the fit finishes, the skipped steps are recorded and A and B never took the values
    monkeypatch.setattr(e2e, "MAX_SKIPPED_STEPS", 10)
    run_b = tmp_path / "b"
    run_b.mkdir()
    fitted = e2e.refine_end_to_end(_config(run_b), model, pad, init, _samples(tokenizer), run_b)
    assert fitted.manifest.training.details["e2e_skipped_steps"] >= 1
    for layer, a in fitted.lowrank_a.items():
        assert torch.equal(a, init.lowrank_a[layer]) and torch.equal(fitted.lowrank_b[layer], init.lowrank_b[layer])


def test_a_finite_fit_moves_the_weights_and_skips_nothing(hf_models, tmp_path):
    model, tokenizer = hf_models["smollm2-135m"]
    init = _adapter(model)
    fitted = e2e.refine_end_to_end(_config(tmp_path, e2e_samples=1), model, tokenizer.eos_token_id, init,
                                   _samples(tokenizer), tmp_path)
    details = fitted.manifest.training.details
    assert details["e2e_skipped_steps"] == 0 and details["e2e_samples"] == 1
    assert all(torch.isfinite(a).all() for a in fitted.lowrank_a.values())
    assert any(not torch.equal(fitted.lowrank_a[k], init.lowrank_a[k]) for k in init.lowrank_a)
