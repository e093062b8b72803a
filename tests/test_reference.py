"""The plain-PyTorch reference: exactness where nothing should change, the paper's GRIFFIN formula,
the folded low-rank form, and the Caprese path plumbing, on the real SmolLM2 and Gemma-3 models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from caprese_vllm.adapter import base_info_from_model, synthetic_adapter
from caprese_vllm.lowrank import fold_lowrank, folded_mlp_forward, lowrank_forward
from caprese_vllm.methods import MethodSpec, cats_calibrate_threshold, default_layers
from caprese_vllm.reference import patch_model, teacher_forcing, unpatch_model
from caprese_vllm.reference.patch import decoder_layers

MODELS = ["smollm2-135m", "gemma3-270m"]
PROMPTS = [
    "Question: Tom has 3 boxes with 12 apples each. He gives away 7 apples. How many are left?\nAnswer:",
    "The quick brown fox",
]


@pytest.fixture(params=MODELS)
def model_tok(request, hf_models):
    model, tok = hf_models[request.param]
    yield model, tok
    unpatch_model(model)


def n_layers(model) -> int:
    return len(decoder_layers(model))


def griffin(model, density: float, layers=None) -> MethodSpec:
    return MethodSpec(name="griffin", density=density,
                      layers=default_layers("griffin", n_layers(model)) if layers is None else layers)


def encode(tok, prompt: str) -> torch.Tensor:
    return tok(prompt, return_tensors="pt").input_ids


def greedy(model, input_ids: torch.Tensor, n: int = 12) -> torch.Tensor:
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                         do_sample=False, output_scores=True, return_dict_in_generate=True)
    return out.sequences[0, input_ids.shape[1]:], torch.stack(out.scores)


def teacher_forced_logits(model, input_ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mask[:, :prompt_len] = True
    with torch.no_grad(), teacher_forcing(model, mask):
        return model(input_ids).logits


@torch.no_grad()
def test_density_one_reproduces_dense_exactly(model_tok):
    model, tok = model_tok
    ids = encode(tok, PROMPTS[0])
    dense_logits = model(ids).logits
    dense_tokens, dense_scores = greedy(model, ids)
    patch_model(model, griffin(model, 1.0, layers=list(range(n_layers(model)))))
    assert torch.equal(teacher_forced_logits(model, ids, prompt_len=ids.shape[1] // 2), dense_logits)
    tokens, scores = greedy(model, ids)
    assert torch.equal(tokens, dense_tokens) and torch.equal(scores, dense_scores)


def sparse_then_with_adapter(model, ids, scale: float):
    """Teacher-forced logits and greedy decode of GRIFFIN 0.5 without, then with, a rank-16 adapter
    of the given scale; the model is left patched with the adapter."""
    method = griffin(model, 0.5)
    runs = []
    for adapter in (None, synthetic_adapter(base_info_from_model(model), method, rank=16, scale=scale)):
        unpatch_model(model)
        patch_model(model, method, adapter)
        runs.append((teacher_forced_logits(model, ids, prompt_len=10), *greedy(model, ids)))
    return runs


@torch.no_grad()
def test_zero_lowrank_changes_nothing(model_tok):
    model, tok = model_tok
    (plain, plain_tokens, plain_scores), (zero, tokens, scores) = sparse_then_with_adapter(
        model, encode(tok, PROMPTS[0]), scale=0.0)
    assert torch.equal(zero, plain)
    assert torch.equal(tokens, plain_tokens) and torch.equal(scores, plain_scores)


class GriffinRepoMLP(nn.Module):
    """GRIFFIN as its reference code does it (src/griffin/llama.py, mode 'gen', batch size 1):
    the prompt pass is dense and slices new weight matrices for the top-k neurons."""

    def __init__(self, mlp: nn.Module, k_factor: float):
        super().__init__()
        self.mlp, self.k_factor = mlp, k_factor

    def forward(self, x):
        mlp = self.mlp
        if x.shape[1] > 1:
            int_states = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            k = int(int_states.shape[-1] * self.k_factor)
            neuron_stat = (int_states / int_states.norm(dim=-1).unsqueeze(-1)).norm(dim=1)
            idx = torch.topk(neuron_stat, k, dim=-1).indices[0]
            self.gate_w = mlp.gate_proj.weight[idx]
            self.up_w = mlp.up_proj.weight[idx]
            self.down_w = mlp.down_proj.weight[:, idx]
            return mlp.down_proj(int_states)
        return (mlp.act_fn(x @ self.gate_w.t()) * (x @ self.up_w.t())) @ self.down_w.t()


@torch.no_grad()
def test_griffin_matches_reference_formula_and_changes_outputs(model_tok):
    model, tok = model_tok
    ids = encode(tok, PROMPTS[0])
    dense_tokens, dense_scores = greedy(model, ids, n=16)
    method = griffin(model, 0.5)

    layers = decoder_layers(model)
    originals = {i: layers[i].mlp for i in method.layers}
    for i in method.layers:
        layers[i].mlp = GriffinRepoMLP(originals[i], 0.5)
    try:
        repo_tokens, repo_scores = greedy(model, ids, n=16)
    finally:
        for i, mlp in originals.items():
            layers[i].mlp = mlp

    patch_model(model, method)
    tokens, scores = greedy(model, ids, n=16)
    assert torch.equal(tokens, repo_tokens)
    # Masking with zeros vs slicing the weights: same math, different summation order.
    torch.testing.assert_close(scores, repo_scores, rtol=1e-4, atol=1e-4)
    # Step 0's logits come from the (dense) prompt pass; decode steps must differ from dense.
    common = min(len(scores), len(dense_scores))
    assert common > 1 and (scores[1:common] - dense_scores[1:common]).abs().max() > 1e-2, \
        "GRIFFIN at density 0.5 must change the decode logits"


@torch.no_grad()
def test_griffin_selection_is_per_sequence_and_padding_free(model_tok):
    """Two prompts of different lengths batched (left padding) decode as each does alone."""
    model, tok = model_tok
    patch_model(model, griffin(model, 0.5))
    alone = [greedy(model, encode(tok, p), n=8)[0] for p in PROMPTS]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    for row, expected in enumerate(alone):
        assert torch.equal(out[row, batch.input_ids.shape[1]:], expected), PROMPTS[row]


def test_local_shards_that_cannot_select_leave_the_model_unpatched(model_tok):
    """patch_model(local_shards=...) checks every layer's shards before it swaps anything: a float, shards with
    CATS, shards not dividing the FF width and k < shards used to patch the model and fail later (or never)."""
    model, _ = model_tok
    inter = decoder_layers(model)[0].mlp.gate_proj.out_features
    cats = MethodSpec(name="cats", density=0.5, layers=[0], thresholds={0: 0.1})
    for method, shards, message in ((griffin(model, 0.5, [0, 1]), 2.0, "do not divide"),
                                    (griffin(model, 0.5, [0, 1]), 7, "do not divide"),
                                    (griffin(model, 1 / inter, [0, 1]), 2, "keeps k=1 neurons over 2 shards"),
                                    (cats, 2, "applies to GRIFFIN only")):
        with pytest.raises(ValueError, match=message):
            patch_model(model, method, local_shards=shards)
        assert getattr(model, "_caprese_runtime", None) is None
        assert not any(type(layer.mlp).__name__ == "CapreseMLP" for layer in decoder_layers(model))


@torch.no_grad()
def test_lowrank_path_applies_to_generated_tokens_only(model_tok):
    model, tok = model_tok
    (plain, *_), (with_path, *_) = sparse_then_with_adapter(model, encode(tok, PROMPTS[0]), scale=0.5)
    assert torch.equal(with_path[:, :10], plain[:, :10]), "prompt tokens run the dense model"
    assert (with_path[:, 10:] - plain[:, 10:]).abs().max() > 1e-3


@torch.no_grad()
def test_folded_lowrank_equals_unfused(hf_models):
    """The merge the fast kernels run equals sparse FF + x A B (float64: equal up to rounding)."""
    model, tok = hf_models["smollm2-135m"]
    mlp = decoder_layers(model)[3].mlp
    gate_w, up_w, down_w = (p.weight.double() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    inter, hidden = gate_w.shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, hidden, generator=gen, dtype=torch.float64)
    neuron_idx = torch.randperm(inter, generator=gen)[: inter // 2].sort().values
    a = torch.randn(hidden, 32, generator=gen, dtype=torch.float64) * 0.05
    b = torch.randn(32, hidden, generator=gen, dtype=torch.float64) * 0.05

    keep = torch.zeros(inter, dtype=torch.bool)
    keep[neuron_idx] = True
    unfused = (mlp.act_fn(x @ gate_w.t()) * (x @ up_w.t()) * keep) @ down_w.t() + lowrank_forward(x, a, b)
    folded_gate_up, folded_down = fold_lowrank(gate_w[neuron_idx], up_w[neuron_idx], down_w[:, neuron_idx], a, b)
    k = len(neuron_idx)
    assert folded_gate_up.shape == (2 * k + 32, hidden) and folded_down.shape == (hidden, k + 32)
    folded = folded_mlp_forward(x, folded_gate_up, folded_down, k, mlp.act_fn)
    torch.testing.assert_close(folded, unfused, rtol=1e-12, atol=1e-12)


@torch.no_grad()
def test_cats_keeps_target_density_on_held_out_text(model_tok):
    model, tok = model_tok
    layers = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    hooks = [layers[i].mlp.act_fn.register_forward_hook(
        lambda m, inp, out, i=i: captured.__setitem__(i, out.detach())) for i in range(len(layers))]
    try:
        model(encode(tok, PROMPTS[0] + " " + PROMPTS[1]))
        thresholds = {i: cats_calibrate_threshold(captured[i].abs(), 0.5) for i in captured}
        model(encode(tok, "Write a short poem about the sea and the sailors who cross it."))
    finally:
        for h in hooks:
            h.remove()
    kept = torch.stack([(captured[i].abs() >= t).float().mean() for i, t in thresholds.items()])
    assert 0.3 < kept.mean().item() < 0.7, kept

    method = MethodSpec(name="cats", density=0.5, layers=list(thresholds), thresholds=thresholds)
    ids = encode(tok, PROMPTS[0])
    dense_logits = model(ids).logits
    patch_model(model, method)
    logits = teacher_forced_logits(model, ids, prompt_len=10)
    assert torch.equal(logits[:, :10], dense_logits[:, :10])
    assert (logits[:, 10:] - dense_logits[:, 10:]).abs().max() > 1e-2


@torch.no_grad()
def test_sampled_generation_runs_with_kv_cache(model_tok):
    model, tok = model_tok
    patch_model(model, adapter=synthetic_adapter(base_info_from_model(model), griffin(model, 0.5), rank=8,
                                                 scale=0.3))
    ids = encode(tok, PROMPTS[1])
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=True,
                         top_p=0.9, temperature=0.8)
    assert out.shape[1] == ids.shape[1] + 10 or tok.eos_token_id in out[0, ids.shape[1]:].tolist()


def test_default_rank_keeps_about_one_percent_extra_parameters(hf_models):
    from caprese_vllm.lowrank import default_rank

    # Llama-3.1-8B, all 32 layers: the paper's r = 256 is 0.84%; the ~1% default lands just above.
    r = default_rank(8_030_000_000, 4096, 32)
    assert r % 8 == 0 and 0.009 <= 2 * 4096 * r * 32 / 8.03e9 <= 0.01
    model = hf_models["smollm2-135m"][0]
    n_params = sum(p.numel() for p in model.parameters())
    r = default_rank(n_params, 576, 15)
    assert 0.007 <= 2 * 576 * r * 15 / n_params <= 0.01
