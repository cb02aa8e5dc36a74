"""Means, variances and whitening over the valid entries of a tensor only.

Masks are bool tensors of the same shape as the data: True = a real response token, False = padding.
Values under False are never read (they may be anything, even NaN or inf).
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over entries where `mask` is True.

    mean = sum(x * mask) / max(sum(mask), 1)

    A slice with no valid entry has mean 0 (not NaN), so an empty micro-batch cannot poison a loss.

    Args:
        x: [...] float, e.g. [B, T].
        mask: same shape as `x`, bool.
        dim: reduce over this dimension only (e.g. dim=1 gives one mean per row, [B]); None = all.
    Returns:
        a scalar tensor, or `x` with `dim` reduced.
    """
    kept = torch.where(mask, x, torch.zeros_like(x))
    if dim is None:
        return kept.sum() / mask.sum().clamp(min=1)
    return kept.sum(dim=dim) / mask.sum(dim=dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over entries where `mask` is True.

    var = sum(mask * (x - mean)^2) / (n - 1 if unbiased else n),  n = number of valid entries.

    Args:
        x: [...] float, e.g. [B, T].
        mask: same shape, bool.
        unbiased: Bessel's correction (divide by n - 1); needs n >= 2.
    Returns:
        scalar tensor.
    """
    n = int(mask.sum())
    if n < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs {'2' if unbiased else '1'}+ valid entries, got {n}")
    mean = masked_mean(x, mask)
    squared = torch.where(mask, (x - mean) ** 2, torch.zeros_like(x))
    return squared.sum() / (n - 1 if unbiased else n)


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, unbiased: bool = True, eps: float = 1e-8
) -> Tensor:
    """Normalise the valid entries of `x` to unit variance (and zero mean if `shift_mean`).

    white = (x - mean) / sqrt(var + eps)            if shift_mean   (advantages)
    white = (x - mean) / sqrt(var + eps) + mean     otherwise       (rewards: scale only)

    mean and var are taken over valid entries only; entries under False are returned unchanged.

    Args:
        x: [B, T] float (any shape works).
        mask: same shape, bool.
        shift_mean: remove the mean (True) or keep it (False).
        unbiased: use the unbiased variance (see `masked_var`).
        eps: added to the variance.
    Returns:
        same shape as `x`.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=unbiased)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return torch.where(mask, white, x)
