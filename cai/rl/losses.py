"""PPO's clipped objectives (Schulman et al. 2017), token-level, averaged over valid tokens.

Shapes: B = batch, T = response length. "old" = recorded when the batch was sampled.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from cai.rl.stats import masked_mean


class PolicyLossOutput(NamedTuple):
    loss: Tensor  # scalar, to minimise
    clip_fraction: Tensor  # scalar, detached: share of valid tokens where the clipped term won
    approx_kl: Tensor  # scalar, detached: k3 estimate of KL(old || new)


class ValueLossOutput(NamedTuple):
    loss: Tensor  # scalar, to minimise
    clip_fraction: Tensor  # scalar, detached: share of valid tokens where the clipped term won


def _check_eps(clip_eps: float) -> None:
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> PolicyLossOutput:
    """PPO clipped surrogate loss.

    ratio_t = exp(logp_t - logp_old_t)
    loss_t  = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))
    loss    = masked mean of loss_t over valid tokens
    approx_kl = masked mean of (ratio - 1) - log ratio   (k3; estimates KL(old || new), >= 0)

    Args:
        logprobs: [B, T] current policy log-probs (carries the gradient).
        old_logprobs: [B, T] log-probs at sampling time.
        advantages: [B, T] (usually whitened).
        mask: [B, T] bool.
        clip_eps: epsilon of the ratio clip.
    Returns:
        PolicyLossOutput(loss, clip_fraction, approx_kl), all scalars.
    """
    _check_eps(clip_eps)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return PolicyLossOutput(loss, clip_fraction, approx_kl)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float
) -> ValueLossOutput:
    """Clipped value loss: the value head may not move further than eps from its old estimate.

    v_clip_t = v_old_t + clip(v_t - v_old_t, -eps, eps)
    loss     = 0.5 * masked mean of max((v_t - R_t)^2, (v_clip_t - R_t)^2)

    Args:
        values: [B, T] current value estimates (carries the gradient).
        old_values: [B, T] value estimates at sampling time.
        returns: [B, T] GAE returns (see `gae`).
        mask: [B, T] bool.
        clip_eps: epsilon of the value clip (in reward units).
    Returns:
        ValueLossOutput(loss, clip_fraction), scalars.
    """
    _check_eps(clip_eps)
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > unclipped_error).float(), mask)
    return ValueLossOutput(loss, clip_fraction)
