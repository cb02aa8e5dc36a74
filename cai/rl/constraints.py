"""Constraints held by Lagrange multipliers (Safe-RLHF, Dai et al. 2024): maximise the reward subject to
E[g_j] >= bound_j for each constraint j, as the saddle point of

    L(policy, lambda) = E[R] + sum_j lambda_j * (E[g_j] - bound_j),    lambda_j >= 0.

The policy ascends L through its reward (`lagrangian_mix`); each multiplier descends it, once per batch
(`update_multipliers`): it grows while its constraint is violated and shrinks back to 0 once it holds.
A constraint "at most" is the same with g = -value and bound = -bound.

Shapes: B = batch, C = constraints. A constraint need not bear on every answer (a helpfulness bound
on helpful prompts only): `applies` [B, C] says where it does, and elsewhere it adds nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class LagrangeState(NamedTuple):
    """The multipliers, one per constraint: [C], each >= 0."""

    multipliers: Tensor


def constraint_means(values: Tensor, applies: Tensor) -> tuple[Tensor, Tensor]:
    """Each constraint's mean over the answers it applies to, and how many those are.

    Args:
        values: [B, C] the constraint's per-answer value g (oriented so that higher is better).
        applies: [B, C] bool.
    Returns:
        (means [C], NaN where no answer applies; counts [C]).
    """
    weight = applies.to(values.dtype)
    counts = weight.sum(dim=0)
    sums = torch.where(applies, values, torch.zeros_like(values)).sum(dim=0)
    means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
    return means, counts


def update_multipliers(state: LagrangeState, measured: Tensor, bounds: Tensor, lr: Tensor) -> LagrangeState:
    """One projected gradient step on each multiplier:

        lambda_j <- max(0, lambda_j + lr_j * (bound_j - measured_j))

    so lambda_j rises while measured_j < bound_j (the constraint is violated) and falls toward 0 while it
    holds. A constraint measured on no answer this batch (NaN) keeps its multiplier.

    Args:
        state: the multipliers [C].
        measured: [C] this batch's mean of g (NaN: not measured).
        bounds: [C].
        lr: [C] step sizes (> 0).
    Returns:
        the new state.
    """
    step = lr * (bounds - measured)
    moved = (state.multipliers + step).clamp(min=0.0)
    return LagrangeState(torch.where(torch.isnan(measured), state.multipliers, moved))


def lagrangian_mix(reward: Tensor, values: Tensor, applies: Tensor, multipliers: Tensor) -> Tensor:
    """The reward PPO optimises: the task reward and each applying constraint's value, weighted by its
    multiplier, rescaled so that the weights sum to 1 (Safe-RLHF's 1 / (1 + lambda)) and the scale of the
    reward does not grow with the multipliers:

        r[b] = (R[b] + sum_j lambda_j a[b, j] g[b, j]) / (1 + sum_j lambda_j a[b, j])

    Args:
        reward: [B] the task reward R.
        values: [B, C] the constraints' per-answer values g.
        applies: [B, C] bool, a[b, j].
        multipliers: [C] lambda (>= 0).
    Returns:
        [B].
    """
    weight = applies.to(reward.dtype) * multipliers.to(reward.dtype)  # [B, C]
    kept = torch.where(applies, values, torch.zeros_like(values))
    return (reward + (weight * kept).sum(dim=1)) / (1.0 + weight.sum(dim=1))
