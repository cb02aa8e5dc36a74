"""Numbers to watch during RL, not to train on: value fit, repetition, reward-length correlation.

Each returns a plain float, and 0.0 where the quantity is undefined (zero variance, no n-grams),
so the logs stay finite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from cai.rl.stats import masked_var


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """How much of the returns' variance the value head explains.

    ev = 1 - Var(R - V) / Var(R) over valid tokens: 1 = perfect, 0 = no better than a constant,
    < 0 = worse than a constant. 0.0 when Var(R) = 0 or no token is valid.

    Args:
        values, returns: [B, T]; mask: [B, T] bool.
    """
    if not bool(mask.any()):
        return 0.0
    var_returns = float(masked_var(returns.double(), mask, unbiased=False))
    if var_returns == 0.0:
        return 0.0
    var_residual = float(masked_var((returns - values).double(), mask, unbiased=False))
    return 1.0 - var_residual / var_returns


def distinct_token_ngrams(token_lists: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n over token ids: the share of token n-grams that are distinct, over all the sequences
    together (Li et al. 2016). `cai.winrates.distinct_word_ngrams` is the same over words of text.

    distinct-n = |set of n-grams| / number of n-grams. Falls toward 0 as answers repeat
    themselves or each other. 0.0 when no sequence has n tokens.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ngrams = [
        tuple(tokens[i : i + n]) for tokens in token_lists for i in range(len(tokens) - n + 1)
    ]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def pearson(x: Sequence[float] | Tensor, y: Sequence[float] | Tensor) -> float:
    """Pearson correlation of two equal-length 1-D series (e.g. reward and answer length).

    r = cov(x, y) / (std(x) * std(y)); 0.0 when either has zero variance or fewer than 2 points.
    """
    xs = torch.as_tensor(x, dtype=torch.float64).flatten()
    ys = torch.as_tensor(y, dtype=torch.float64).flatten()
    if xs.numel() != ys.numel():
        raise ValueError(f"pearson needs equal lengths, got {xs.numel()} and {ys.numel()}")
    if xs.numel() < 2:
        return 0.0
    dx, dy = xs - xs.mean(), ys - ys.mean()
    denominator = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return float((dx * dy).sum()) / denominator if denominator > 0 else 0.0
