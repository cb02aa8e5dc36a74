"""Generalised advantage estimation (Schulman et al. 2016): vectorised, and as a plain loop.

Shapes: B = batch, T = response length.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def returns_to_go(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Each token's discounted return to the end of its response, the advantage of PPO without a value model
    (REINFORCE; its baseline is the whitening's batch mean, or the siblings' mean with rl.group_baseline).

    G_t = r_t + gamma * G_{t+1}, with G = 0 past the last valid token: GAE with V = 0 and lambda = 1.

    Args:
        rewards: [B, T] per-token rewards (see `shaped_rewards`).
        mask: [B, T] bool, a prefix of each row.
        gamma: discount.
    Returns:
        [B, T], zero where `mask` is False.
    """
    return gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0).advantages


class GAEOutput(NamedTuple):
    advantages: Tensor  # [B, T]
    returns: Tensor  # [B, T], advantages + values: the value head's target


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> GAEOutput:
    """Advantages and returns by GAE, each response an episode ending at its last valid token.

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t
    with V_{t+1} = A_{t+1} = 0 past the last valid token (the episode is over: no bootstrap).
    Vectorised over the batch, one backwards pass over T. The mask is expected to be a prefix
    (what `truncate_after_eos` gives); a False position ends the episode before it.

    Args:
        rewards: [B, T] per-token rewards (see `shaped_rewards`).
        values: [B, T] value-head estimates V_t for the state before token t.
        mask: [B, T] bool.
        gamma: discount; lam: GAE lambda.
    Returns:
        GAEOutput(advantages [B, T], returns [B, T]), both zero where `mask` is False.
    """
    zeros = torch.zeros_like(values[:, 0])
    next_value, next_advantage = zeros, zeros
    reversed_advantages = []
    for t in reversed(range(rewards.shape[1])):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(valid, delta + gamma * lam * next_advantage, zeros)
        next_value = torch.where(valid, values[:, t], zeros)
        next_advantage = advantage
        reversed_advantages.append(advantage)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return GAEOutput(advantages, returns)


def gae_reference(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> GAEOutput:
    """The same GAE, one row at a time with Python loops and floats: the check for `gae`.

    Each row's mask must be a prefix (True...True False...False). Same shapes and outputs as `gae`.
    """
    advantages = torch.zeros_like(values, dtype=torch.float64)
    returns = torch.zeros_like(values, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        row_mask = [bool(m) for m in mask[b].tolist()]
        length = sum(row_mask)
        if row_mask != [True] * length + [False] * (len(row_mask) - length):
            raise ValueError(f"row {b} of the mask is not a prefix: {row_mask}")
        r, v = rewards[b].tolist(), values[b].tolist()
        running = 0.0
        for t in reversed(range(length)):
            next_v = v[t + 1] if t + 1 < length else 0.0
            running = r[t] + gamma * next_v - v[t] + gamma * lam * running
            advantages[b, t] = running
            returns[b, t] = running + v[t]
    return GAEOutput(advantages.to(values.dtype), returns.to(values.dtype))
