"""Adapters not fitted on data: zero (a no-op path) or random (benchmarks, plumbing tests)."""

from __future__ import annotations

import torch

from caprese_vllm.adapter.checkpoint import CapreseAdapter
from caprese_vllm.adapter.manifest import BaseModelInfo, CapreseManifest, LowRankInfo, TrainingInfo
from caprese_vllm.methods import MethodSpec


def synthetic_adapter(base: BaseModelInfo, method: MethodSpec, rank: int | dict[int, int], scale: float = 0.0,
                      seed: int = 0, dtype: str = "float32") -> CapreseAdapter:
    """A low-rank path on every compressed layer, of rank `rank` (or `rank[layer]` per layer: a layer left out
    of the dict gets none); entries ~ N(0, scale^2 / H) (scale 0: all zero).

    With scale s, x @ A @ B has roughly s^2 * sqrt(r / H) times the norm of x: small s keeps a random
    adapter from derailing generation while still changing outputs.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = base.hidden_size
    ranks = rank if isinstance(rank, dict) else {layer: rank for layer in method.layers}
    lowrank_a, lowrank_b = {}, {}
    for layer in (i for i in method.layers if i in ranks):
        lowrank_a[layer] = torch.randn(hidden, ranks[layer], generator=gen, dtype=torch.float32, device="cpu") * (
            scale / hidden ** 0.5)
        lowrank_b[layer] = torch.randn(ranks[layer], hidden, generator=gen, dtype=torch.float32, device="cpu") * (
            scale / hidden ** 0.5)
    kind = "random" if scale else "zero"
    manifest = CapreseManifest(
        base_model=base, method=method,
        lowrank=LowRankInfo(ranks={layer: ranks[layer] for layer in method.layers if layer in ranks}, dtype=dtype),
        training=TrainingInfo(data=f"{kind} adapter (scale={scale}, seed={seed}), not distilled"),
    )
    return CapreseAdapter(manifest=manifest, lowrank_a=lowrank_a, lowrank_b=lowrank_b)
