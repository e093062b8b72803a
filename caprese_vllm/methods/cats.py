"""CATS/TEAL-style activation thresholding (Lee et al. 2024, arXiv 2404.08763).

`z = T_tau(act(gate(x))) * up(x)`, where T_tau zeroes entries with |act(gate(x))| < tau. tau is one
number per layer, calibrated so that a target fraction (the density) of activations survives: the
(1 - density) quantile of |act(gate(x))| over calibration tokens. As in Caprese, thresholding only
applies while generating; the prompt runs dense.
"""

from __future__ import annotations

import torch


def cats_keep_mask(gate_act: torch.Tensor, threshold: float) -> torch.Tensor:
    return gate_act.abs() >= threshold


def cats_calibrate_threshold(gate_act_abs_samples: torch.Tensor, density: float) -> float:
    """tau such that a `density` fraction of the sampled |act(gate(x))| values is >= tau."""
    flat = gate_act_abs_samples.flatten().float()
    if density >= 1.0:
        return 0.0
    # kthvalue instead of quantile: quantile refuses inputs over 16M elements.
    k = max(1, int(round((1.0 - density) * flat.numel())))
    return float(flat.kthvalue(k).values)
