"""Statistics over every rank's rollout: global means and whitening (not per rank).

Each rank reduces its own tensor to a few sums built on that tensor's device (`x.new_tensor`,
reductions of `x`), and `engines.all_reduce_sum` adds them up on `engines.device()`. A scalar
built on the CPU and stacked with a device tensor passes every CPU test and crashes on a GPU
(issue #14); tests/unit/test_device_placement.py keeps it from coming back.
"""
from __future__ import annotations

import math

import torch

from pipeline import engines


def mean_sums(x: torch.Tensor) -> torch.Tensor:
    """(2,) float64 on x's device: the sum of `x` and its element count."""
    return torch.stack([x.sum().double(), x.new_tensor(float(x.numel()), dtype=torch.float64)])


def global_mean(x: torch.Tensor) -> float:
    """Mean of `x` (any shape) over the elements of every rank. Collective."""
    s = engines.all_reduce_sum(mean_sums(x))
    return (s[0] / s[1].clamp(min=1)).item()


def whiten_sums(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(3,) float64 on x's device: masked sum, masked sum of squares, mask count."""
    m = mask.float()
    return torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]).double()


def global_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`x` whitened with the mean and (unbiased) variance of its masked entries on every rank;
    zero where `mask` is 0. Same shape and device as `x`. Collective."""
    total, total_sq, n = engines.all_reduce_sum(whiten_sums(x, mask)).tolist()
    mean = total / max(n, 1)
    var = max(total_sq / max(n, 1) - mean * mean, 0.0) * n / max(n - 1, 1)
    return ((x - mean) / math.sqrt(var + 1e-8)) * mask.float()
