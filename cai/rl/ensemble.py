"""From a reward model's many outputs to PPO's one score: K ensemble members, P principles.

A reward model with K members and one output per principle scores a batch as a [B, K, P] tensor
(B = batch; each output normalised on the SFT model's samples). PPO needs [B]:

1. per member, the principles are combined (`combine_principles`): a weighted sum, or GDPO's
   normalise-then-sum, where each principle's reward is first normalised over the batch so that one
   principle with a wide spread cannot drown the others (GDPO, 2026);
2. across members, the ensemble is combined (`combine_members`): the mean, the mean minus
   coef x std (uncertainty-weighted), or the minimum (worst case) (Coste et al. 2024).
`member_disagreement` is the members' spread, the hacking monitor: it grows where the policy's answers
leave the distribution the reward model was trained on.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

EnsembleCombine = Literal["mean", "uncertainty", "worst"]


def member_disagreement(member_rewards: Tensor) -> Tensor:
    """The members' standard deviation for each answer (population std, 0 with one member).

    Args:
        member_rewards: [B, K].
    Returns:
        [B].
    """
    return member_rewards.std(dim=1, unbiased=False)


def combine_members(member_rewards: Tensor, how: EnsembleCombine, coef: float = 1.0) -> Tensor:
    """One reward per answer from K members' rewards.

    mean:         r = mean_k r_k
    uncertainty:  r = mean_k r_k - coef * std_k r_k      (std over members, population)
    worst:        r = min_k r_k

    Args:
        member_rewards: [B, K].
        how: "mean", "uncertainty" or "worst".
        coef: the weight of the std for "uncertainty" (>= 0).
    Returns:
        [B].
    """
    if how == "mean":
        return member_rewards.mean(dim=1)
    if how == "uncertainty":
        if coef < 0:
            raise ValueError(f"the uncertainty coefficient must be >= 0, got {coef}")
        return member_rewards.mean(dim=1) - coef * member_disagreement(member_rewards)
    if how == "worst":
        return member_rewards.amin(dim=1)
    raise ValueError(f"unknown ensemble combination {how!r}; choose mean, uncertainty or worst")


def normalize_over_batch(rewards: Tensor, applies: Tensor, eps: float = 1e-6) -> Tensor:
    """Each column normalised to mean 0, std 1 over the rows where it applies; 0 where it does not.

    out[b, ..., p] = (r[b, ..., p] - mean_p) / (std_p + eps)   over rows b with applies[b, p]
    A column with one applicable row, or none, is 0 there (no spread to normalise by).

    Args:
        rewards: [B, K, P] (or [B, P]).
        applies: [B, P] bool.
    Returns:
        same shape as `rewards`.
    """
    mask = applies.unsqueeze(1).expand_as(rewards) if rewards.dim() == 3 else applies
    weight = mask.to(rewards.dtype)
    n = weight.sum(dim=0, keepdim=True)
    mean = (rewards * weight).sum(dim=0, keepdim=True) / n.clamp(min=1)
    var = (((rewards - mean) * weight) ** 2).sum(dim=0, keepdim=True) / n.clamp(min=1)
    out = (rewards - mean) / (var.sqrt() + eps)
    return torch.where(mask & (n > 1), out, torch.zeros_like(rewards))


def combine_principles(rewards: Tensor, weights: Tensor, applies: Tensor | None = None, normalize: bool = False) -> Tensor:
    """Each member's principle rewards summed with `weights`; principles that do not apply count 0.

    weighted sum:       r[b, k] = sum_p w_p * applies[b, p] * r[b, k, p]
    normalise-then-sum: the same over `normalize_over_batch(r, applies)` (GDPO)

    Args:
        rewards: [B, K, P].
        weights: [P].
        applies: [B, P] bool, whether principle p bears on answer b (None: all apply).
        normalize: normalise each principle over the batch first.
    Returns:
        [B, K].
    """
    if applies is None:
        applies = torch.ones(rewards.shape[0], rewards.shape[2], dtype=torch.bool, device=rewards.device)
    if normalize:
        rewards = normalize_over_batch(rewards, applies)
    kept = torch.where(applies.unsqueeze(1), rewards, torch.zeros_like(rewards))
    return (kept * weights.to(rewards.dtype)).sum(dim=2)
