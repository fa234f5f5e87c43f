"""Pair reconstructed images with ground-truth images for the metrics of a batch."""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment


def match_batch(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Permutation `perm` with recon[perm[i]] the reconstruction of truth[i].

    Hungarian matching on the per-image mean squared error (images (N, C, H, W), same N).
    """
    if recon.shape != truth.shape:
        raise ValueError(f"shapes differ: reconstruction {tuple(recon.shape)}, truth {tuple(truth.shape)}")
    n = recon.shape[0]
    r = recon.detach().reshape(n, -1).double().cpu()
    t = truth.detach().reshape(n, -1).double().cpu()
    cost = torch.cdist(t, r).pow(2) / r.shape[1]  # cost[i, j] = mse(truth i, recon j)
    rows, cols = linear_sum_assignment(cost.numpy())
    perm = torch.empty(n, dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm
