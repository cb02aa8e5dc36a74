"""The KL penalty that keeps the policy near the reference model, and the controllers of its weight.

Shapes: B = batch, T = response length.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k3"]


def kl_penalty_per_token(
    logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: KLEstimator = "k1"
) -> Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens.

    With tokens drawn from the policy p and log r = log p_ref - log p (Schulman, "Approximating KL
    divergence", 2020):
      k1 = log p - log p_ref = -log r          unbiased, can be negative on a single token
      k3 = (r - 1) - log r                     unbiased, always >= 0, lower variance
    Both sum over a row to an estimate of the sequence KL.

    Args:
        logprobs: [B, T] policy log-probs of the sampled tokens.
        ref_logprobs: [B, T] reference-model log-probs of the same tokens.
        mask: [B, T] bool, True on response tokens.
        estimator: "k1" or "k3".
    Returns:
        [B, T], zero where `mask` is False.
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        kl = -log_ratio
    elif estimator == "k3":
        kl = torch.expm1(log_ratio) - log_ratio
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose 'k1' or 'k3'")
    return torch.where(mask, kl, torch.zeros_like(kl))


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, coef: float) -> None:
        if coef < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019), section 2.2: steer beta so that the KL stays near a target.

    error = clip(KL / target - 1, -0.2, 0.2)
    beta <- beta * (1 + error * n_steps / horizon)
    so one update with n_steps = horizon moves beta by at most 20%.
    """

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        if init_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                "need init_coef >= 0, target > 0, horizon > 0; "
                f"got {init_coef}, {target}, {horizon}"
            )
        self.value, self.target, self.horizon = float(init_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: mean sequence KL of the last batch; n_steps: episodes in that batch."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


KLController = FixedKLController | AdaptiveKLController
