"""End-to-end refinement (the paper's stage 2): all low-rank paths trained together, teacher-forced.

Each step runs a batch twice: all tokens dense (the target) and as served (prompt dense, completion
through the sparse FF + low-rank paths). The loss compares them on the completion tokens:
  hidden_mse    mean squared error of the final hidden state (after the final norm, before the LM
                head), divided by the target's mean square (the paper's loss, made scale-free);
  kl            KL(dense || Caprese) of the next-token distributions (fit.e2e_kl_top > 0: over the union
                of the dense model's top tokens at the batch's positions, both sides renormalised there:
                the LM head then runs with gradients on a few thousand rows, not the whole vocabulary,
                which for Gemma's 262K tokens is most of a step's time);
  hidden_mse+kl their sum.
Base weights stay frozen; A and B train in float32 whatever the model's dtype, and the low-rank product
runs in float32 (caprese_vllm.lowrank.lowrank_forward). The checkpoint (`fit/e2e.pt`) is written after
every epoch, so an interrupted run resumes at the last epoch.

Numerical guard. The bf16 fit crashed on an H200 (Qwen2.5-Coder-0.5B, 5K samples, around batch 64 of
349) with a device-side assert in the selection's scatter, while the same run in float32 finished. The
path from one non-finite value to that crash: a step whose loss is finite but whose gradient is not (the
backward runs in bf16) writes NaN into A and B through Adam; on the next batch the compressed
tokens turn NaN, and since a teacher-forced pass attends over the whole sequence at once, attention
multiplies their NaN keys and values by zero weights (NaN * 0 = NaN) and every later layer's *prompt*
statistic turns NaN as well; the selection of a NaN statistic returned out-of-range neuron indices
(tests/test_e2e_guard.py replays this path on CPU). The old loop checked the loss, never the gradient.
So: every step's gradient is clipped to `fit.e2e_clip` (global L2 norm); a step with a non-finite loss
or gradient is skipped and counted (`e2e_skipped_steps` in the adapter's training details), and more
than `MAX_SKIPPED_STEPS` in a row stop the fit with one error line; the low-rank product runs in float32, and the selection is
defined for any statistic (caprese_vllm.methods.griffin), so no index can leave the layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from caprese_vllm.adapter import CapreseAdapter
from caprese_vllm.reference import patch_model, teacher_forcing, unpatch_model
from distill.config import DistillConfig, DistillError, save_atomic
from distill.data import Sample, collate, length_batches


class FinalHidden:
    """Forward hook on the decoder stack: keeps its last hidden state (post-norm)."""

    def __init__(self, model: torch.nn.Module):
        self.value: torch.Tensor | None = None
        self._handle = model.get_decoder().register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.value = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def remove(self) -> None:
        self._handle.remove()


def lm_logits(model: torch.nn.Module, hidden: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
    """LM-head logits [N, V] (or [N, len(vocab)] for those token ids) for hidden [N, H], with the model's
    final soft-capping where it has one."""
    head = model.get_output_embeddings()
    if vocab is None:
        logits = head(hidden).float()
    else:
        logits = F.linear(hidden, head.weight[vocab], None if head.bias is None else head.bias[vocab]).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def chunked_log_probs(model, dense_hidden: torch.Tensor, hidden: torch.Tensor, chunk: int = 1024, top: int = 0,
                      vocabs: list[torch.Tensor] | None = None):
    """Yield (log_p dense, log_q model) next-token log-probabilities, `chunk` positions at a time
    (a [positions, vocab] float32 tensor of a 262K vocabulary is gigabytes); top > 0: over the union of
    the dense top-`top` token ids of the chunk's positions, both sides renormalised there.
    vocabs (top > 0): each chunk's union, appended on the first pass over these positions and read on
    later ones, which then never compute the whole vocabulary's logits again."""
    for n, start in enumerate(range(0, hidden.shape[0], chunk)):
        vocab = None
        with torch.no_grad():
            if top:
                if vocabs is not None and n < len(vocabs):
                    vocab = vocabs[n]
                else:
                    full = lm_logits(model, dense_hidden[start:start + chunk])
                    vocab = full.topk(min(top, full.shape[-1]), dim=-1).indices.unique()
                    del full
                    if vocabs is not None:
                        vocabs.append(vocab)
            log_p = F.log_softmax(lm_logits(model, dense_hidden[start:start + chunk], vocab), dim=-1)
        yield log_p, F.log_softmax(lm_logits(model, hidden[start:start + chunk], vocab), dim=-1)


def kl_to_dense(model, dense_hidden: torch.Tensor, hidden: torch.Tensor, chunk: int = 1024,
                top: int = 0, vocabs: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Per-token KL(dense || model) [N] (see chunked_log_probs)."""
    return torch.cat([(log_p.exp() * (log_p - log_q)).sum(-1)
                      for log_p, log_q in chunked_log_probs(model, dense_hidden, hidden, chunk, top, vocabs)])


@dataclass
class DenseTarget:
    """What the dense model gives a batch, kept for later epochs: final hidden states of the completion
    tokens and, for a top-k KL, each chunk's vocabulary."""

    hidden: torch.Tensor                                   # [N, H]
    vocabs: list[torch.Tensor] = field(default_factory=list)


# Dense targets are kept across epochs while they fit: on a CPU in TARGET_CACHE_BYTES (a small model's
# few hundred samples: ~150 MB), on a GPU in TARGET_CACHE_GPU_SHARE of the memory free once the model is
# loaded (the paper's 20K answers of Qwen2.5-Coder-0.5B: ~10 GB of bf16 hidden states, which skips the
# dense pass, about a third of a step, on every epoch after the first). Above it every epoch recomputes
# them. Same loss either way.
TARGET_CACHE_BYTES = 2 << 30
TARGET_CACHE_GPU_SHARE = 0.4
# Consecutive skipped (non-finite) steps after which the fit stops: the run is diverging, not unlucky.
MAX_SKIPPED_STEPS = 10


def target_cache_budget(device: torch.device) -> int:
    """Bytes the dense targets may take on `device` (see TARGET_CACHE_BYTES)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * TARGET_CACHE_GPU_SHARE)
    return TARGET_CACHE_BYTES


def _loss(kind: str, model, target: DenseTarget, hidden: torch.Tensor, kl_top: int = 0) -> torch.Tensor:
    dense = target.hidden
    loss = hidden.new_zeros((), dtype=torch.float32)
    if "hidden_mse" in kind:
        loss = loss + (hidden.float() - dense.float()).square().mean() / dense.float().square().mean()
    if "kl" in kind:
        loss = loss + kl_to_dense(model, dense, hidden, top=kl_top, vocabs=target.vocabs).mean()
    return loss


def refine_end_to_end(config: DistillConfig, model, pad_id: int, init: CapreseAdapter, train: list[Sample],
                      fit_dir: Path) -> CapreseAdapter:
    fc = config.fit
    device = next(model.parameters()).device
    model.requires_grad_(False)
    ckpt_path = fit_dir / "e2e.pt"
    ckpt = torch.load(ckpt_path, map_location="cpu") if ckpt_path.exists() else None
    # Train copies: patch_model's parameters may share storage with the adapter's tensors (.to() on the
    # same device is a no-op), and `init` must stay the closed-form solution for the report.
    lowrank_a = ckpt["lowrank_a"] if ckpt is not None else init.lowrank_a
    lowrank_b = ckpt["lowrank_b"] if ckpt is not None else init.lowrank_b
    adapter = CapreseAdapter(manifest=init.manifest, lowrank_a={k: v.clone() for k, v in lowrank_a.items()},
                             lowrank_b={k: v.clone() for k, v in lowrank_b.items()})
    runtime = patch_model(model, adapter=adapter)
    final_hidden = FinalHidden(model)
    params = []
    for mlp in runtime.mlps:
        mlp.lowrank_a.data = mlp.lowrank_a.data.float()
        mlp.lowrank_b.data = mlp.lowrank_b.data.float()
        mlp.lowrank_a.requires_grad_(True)
        mlp.lowrank_b.requires_grad_(True)
        params += [mlp.lowrank_a, mlp.lowrank_b]
    if fc.e2e_samples is not None and fc.e2e_samples < len(train):
        # a fixed, seeded subset: the same samples on every epoch and on a resumed run
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))[:fc.e2e_samples]
        train = [train[i] for i in sorted(pick.tolist())]
    batches = list(length_batches(train, fc.e2e_batch_tokens))
    hidden_size = model.config.get_text_config().hidden_size
    completion_tokens = sum(len(s.completion_ids) for s in train)
    target_bytes = completion_tokens * hidden_size * next(model.parameters()).element_size()
    keep_targets = fc.e2e_epochs > 1 and target_bytes <= target_cache_budget(device)
    if fc.e2e_epochs > 1:
        tqdm.write(f"fit: dense targets ({target_bytes / 2**30:.2f} GiB) "
                   f"{'kept for later epochs' if keep_targets else 'recomputed on every epoch (too large to keep)'}")
    targets: dict[int, DenseTarget] = {}  # batch index -> its dense target (keep_targets)
    total = fc.e2e_epochs * len(batches)
    warmup = max(1, int(fc.e2e_warmup * total))
    opt = torch.optim.Adam(params, lr=fc.e2e_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup))))
    start_epoch, skipped, skipped_in_a_row = 0, 0, 0
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start_epoch = ckpt["epochs_done"]
        skipped = ckpt.get("skipped_steps", 0)
    try:
        for epoch in range(start_epoch, fc.e2e_epochs):
            order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(config.seed + epoch))
            bar = tqdm(order.tolist(), desc=f"fit: end-to-end epoch {epoch + 1}/{fc.e2e_epochs}", unit="batch")
            for i in bar:
                batch = collate(batches[i], pad_id, device)
                completion = batch.completion_mask
                kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                              logits_to_keep=1)
                target = targets.get(i)
                if target is None:
                    with torch.no_grad(), teacher_forcing(model, batch.attention_mask.bool()):  # all dense
                        model(**kwargs)
                        target = DenseTarget(final_hidden.value[completion])
                    if keep_targets:
                        targets[i] = target
                with teacher_forcing(model, batch.prompt_mask):
                    model(**kwargs)
                    hidden = final_hidden.value[completion]
                loss = _loss(fc.e2e_loss, model, target, hidden, fc.e2e_kl_top)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, fc.e2e_clip)
                step_ok = math.isfinite(loss.item()) and math.isfinite(grad_norm.item())
                if step_ok:
                    opt.step()
                    skipped_in_a_row = 0
                else:  # never let a non-finite gradient into A and B (see the module docstring)
                    skipped, skipped_in_a_row = skipped + 1, skipped_in_a_row + 1
                    tqdm.write(f"fit: end-to-end step skipped: loss {loss.item():.4g}, gradient norm "
                               f"{grad_norm.item():.4g} (non-finite; {skipped} skipped so far)")
                    if skipped_in_a_row > MAX_SKIPPED_STEPS:
                        raise DistillError(f"fit: {skipped_in_a_row} end-to-end steps in a row had a non-finite "
                                           f"loss or gradient at epoch {epoch + 1}; lower fit.e2e_lr or use "
                                           "--dtype float32 and rerun (the last finished epoch is kept)")
                sched.step()
                bar.set_postfix(loss=f"{loss.item():.4g}", skipped=skipped)
            state = {"epochs_done": epoch + 1, "skipped_steps": skipped, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "lowrank_a": {m.layer: m.lowrank_a.detach().cpu().clone() for m in runtime.mlps},
                     "lowrank_b": {m.layer: m.lowrank_b.detach().cpu().clone() for m in runtime.mlps}}
            save_atomic(ckpt_path, state)
        lowrank_a = {m.layer: m.lowrank_a.detach().cpu().clone() for m in runtime.mlps}
        lowrank_b = {m.layer: m.lowrank_b.detach().cpu().clone() for m in runtime.mlps}
    finally:
        final_hidden.remove()
        unpatch_model(model)
    details = {**init.manifest.training.details, "e2e_loss": fc.e2e_loss, "e2e_epochs": fc.e2e_epochs,
               "e2e_lr": fc.e2e_lr, "e2e_kl_top": fc.e2e_kl_top, "e2e_clip": fc.e2e_clip,
               "e2e_samples": len(train), "e2e_skipped_steps": skipped}
    training = init.manifest.training.model_copy(update={"details": details})
    return CapreseAdapter(manifest=init.manifest.model_copy(update={"training": training}),
                          lowrank_a=lowrank_a, lowrank_b=lowrank_b)
