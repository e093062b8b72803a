"""Stream the statistics a layer-wise fit needs, without keeping any activations.

For every compressed layer, over the completion tokens of the data (the tokens that run compressed
when serving), with x the FF input on the *dense* model's trajectory (the paper's stage 1) and
r = FF(x) - sparse_FF(x) the part the sparse block misses:
    xtx = sum x^T x   [H, H]      xtr = sum x^T r   [H, H]
    rr  = sum |r|^2               yy  = sum |FF(x)|^2          count = tokens
These are sufficient for the closed-form reduced-rank regression and for the exact layer-wise
error of any (A, B): |R - X A B|^2 = rr - 2 tr(B^T A^T xtr) + tr(B^T A^T xtx A B).
The method's selection (GRIFFIN top-k from each sequence's own prompt) is the reference
implementation's, so it is exactly what serving does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from caprese_vllm.methods import MethodSpec
from caprese_vllm.reference import patch_model, teacher_forcing, unpatch_model
from distill.config import save_atomic
from distill.data import Sample, collate, length_batches


@dataclass
class LayerStats:
    xtx: torch.Tensor   # [H, H] float64
    xtr: torch.Tensor   # [H, H] float64
    rr: float
    yy: float
    count: int

    @classmethod
    def zeros(cls, hidden: int, device) -> LayerStats:
        return cls(torch.zeros(hidden, hidden, dtype=torch.float64, device=device),
                   torch.zeros(hidden, hidden, dtype=torch.float64, device=device), 0.0, 0.0, 0)

    def residual_error(self, lowrank_a: torch.Tensor | None, lowrank_b: torch.Tensor | None) -> float:
        """sum |r - x A B|^2 over the captured tokens (A, B of None: the sparse block alone)."""
        if lowrank_a is None:
            return self.rr
        a, b = lowrank_a.to(self.xtx), lowrank_b.to(self.xtx)
        cross = torch.trace(b.t() @ (a.t() @ self.xtr))
        quad = torch.trace(b.t() @ (a.t() @ self.xtx @ a) @ b)
        return float(self.rr - 2 * cross + quad)

    def relative_error(self, lowrank_a=None, lowrank_b=None) -> float:
        """|FF - sparse_FF - xAB| / |FF| over the captured tokens."""
        return max(self.residual_error(lowrank_a, lowrank_b), 0.0) ** 0.5 / max(self.yy, 1e-30) ** 0.5

    def state(self) -> dict:
        return {"xtx": self.xtx.cpu(), "xtr": self.xtr.cpu(), "rr": self.rr, "yy": self.yy, "count": self.count}


def capture_stats(model: torch.nn.Module, method: MethodSpec, samples: list[Sample], batch_tokens: int,
                  pad_id: int, desc: str, local_shards: int = 1) -> dict[int, LayerStats]:
    """Per compressed layer, the statistics of the generated tokens' FF error (what the closed form fits).
    local_shards: GRIFFIN's local tensor-parallel selection over N shards (DistillConfig.local_shards)."""
    device = next(model.parameters()).device
    hidden = model.config.get_text_config().hidden_size
    stats = {layer: LayerStats.zeros(hidden, device) for layer in method.layers}

    def tap(layer: int, x, y, y_sparse, generated) -> None:
        rows = generated.reshape(-1)
        x_g = x.reshape(-1, x.shape[-1])[rows].float()
        y_g = y.reshape(-1, y.shape[-1])[rows].float()
        r_g = y_g - y_sparse.reshape(-1, y.shape[-1])[rows].float()
        s = stats[layer]
        s.xtx += (x_g.t() @ x_g).double()
        s.xtr += (x_g.t() @ r_g).double()
        s.rr += float(r_g.double().square().sum())
        s.yy += float(y_g.double().square().sum())
        s.count += int(rows.sum())

    runtime = patch_model(model, method, local_shards=local_shards)
    runtime.tap, runtime.dense_passthrough = tap, True
    batches = list(length_batches(samples, batch_tokens))
    try:
        with torch.no_grad():
            for group in tqdm(batches, desc=desc, unit="batch"):
                batch = collate(group, pad_id, device)
                with teacher_forcing(model, batch.prompt_mask):
                    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                          logits_to_keep=1)
    finally:
        unpatch_model(model)
    return stats


def save_stats(stats: dict[int, LayerStats], path: Path) -> None:
    save_atomic(path, {layer: s.state() for layer, s in stats.items()})


def load_stats(path: Path, device) -> dict[int, LayerStats]:
    raw = torch.load(path, map_location=device)
    return {layer: LayerStats(d["xtx"], d["xtr"], d["rr"], d["yy"], d["count"]) for layer, d in raw.items()}
