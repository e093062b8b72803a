"""Layer-wise fit of one low-rank path from captured statistics (no data needed at this point).

Closed form (reduced-rank ridge regression of the residual r on the input x):
    W   = (xtx + lam I)^-1 xtr                  [H, H]   the full-rank ridge solution
    M   = W^T xtx W                             [H, H]   covariance of the fitted values X W
    V_r = top-r eigenvectors of M               [H, r]
    A = W V_r,  B = V_r^T                       the best rank-r map (fitted values projected on V_r)
The paper calls this too costly at scale and trains stage 1 with Adam instead; it costs one H x H
solve and one eigendecomposition per layer (seconds at H=4096 on a GPU), so we use it as the init
and keep Adam (`layerwise_refine`, on the same exact objective) as an option.
"""

from __future__ import annotations

import torch

from distill.capture import LayerStats


def closed_form(stats: LayerStats, rank: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lowrank_a [H, r], lowrank_b [r, H]) in float32."""
    xtx, xtr = stats.xtx.double(), stats.xtr.double()
    hidden = xtx.shape[0]
    lam = ridge * float(torch.diagonal(xtx).mean()) + 1e-12
    w = torch.linalg.solve(xtx + lam * torch.eye(hidden, dtype=xtx.dtype, device=xtx.device), xtr)
    fitted_cov = w.t() @ xtx @ w
    fitted_cov = (fitted_cov + fitted_cov.t()) / 2
    _, eigvecs = torch.linalg.eigh(fitted_cov)          # ascending eigenvalues
    v_r = eigvecs[:, -rank:].flip(-1)                   # [H, r], largest first
    lowrank_a, lowrank_b = w @ v_r, v_r.t()
    # Balance the two factors (same column/row norms): the product is unchanged, Adam steps on A and B
    # are then of comparable effect in the end-to-end refinement.
    scale = (lowrank_a.norm(dim=0) / lowrank_b.norm(dim=1).clamp_min(1e-12)).clamp_min(1e-12).sqrt()
    lowrank_a, lowrank_b = lowrank_a / scale, lowrank_b * scale.unsqueeze(1)
    return lowrank_a.float(), lowrank_b.float()


def layerwise_refine(stats: LayerStats, lowrank_a: torch.Tensor, lowrank_b: torch.Tensor, steps: int,
                     lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on the exact layer-wise objective |R - X A B|^2 / |R|^2 (full batch, from the statistics)."""
    xtx, xtr = stats.xtx.float(), stats.xtr.float()
    a = lowrank_a.clone().float().requires_grad_(True)
    b = lowrank_b.clone().float().requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=lr)
    norm = max(stats.rr, 1e-30)
    for _ in range(steps):
        opt.zero_grad()
        cross = torch.trace(b.t() @ (a.t() @ xtr))
        quad = torch.trace(b.t() @ (a.t() @ xtx @ a) @ b)
        loss = (stats.rr - 2 * cross + quad) / norm
        loss.backward()
        opt.step()
    return a.detach(), b.detach()
