"""From a sequence-level score to per-token rewards.

Shapes: B = batch, T = response length.
"""

from __future__ import annotations

import torch
from torch import Tensor


def score_unfinished(scores: Tensor, ended: Tensor, penalty: float | None) -> Tensor:
    """Give answers that never produced EOS a fixed score instead of their reward.

    score'[b] = scores[b] if ended[b] else penalty. Cut-off answers are easy to over-score, so a
    fixed low score (e.g. -1) discourages rambling to the length limit (Huang et al. 2024).

    Args:
        scores: [B] float, reward-model or labeler scores.
        ended: [B] bool, from `truncate_after_eos`.
        penalty: the score of an unfinished answer; None keeps the reward.
    Returns:
        [B].
    """
    if penalty is None:
        return scores.clone()
    return torch.where(ended, scores, torch.full_like(scores, penalty))


def clip_rewards(score: Tensor, limit: float) -> Tensor:
    """Clamp scores to [-limit, limit]. Any shape."""
    if not limit > 0:
        raise ValueError(f"reward clip limit must be > 0, got {limit}")
    return score.clamp(min=-limit, max=limit)


def leave_one_out(scores: Tensor, group_size: int) -> Tensor:
    """Each score less the mean of its siblings': the answers to one prompt sit in consecutive groups.

    score'[b] = scores[b] - (sum of scores in b's group - scores[b]) / (group_size - 1)

    RLOO's baseline (Kool et al. 2019; Ahmadian et al. 2024). What every answer to a prompt scores alike
    (how the reward rates the prompt's kind, not the answer) cancels, so the score says how this answer
    compares with others to the same request.

    Args:
        scores: [B] float, B a multiple of group_size, each group's rows consecutive.
        group_size: G >= 2 answers per prompt.
    Returns:
        [B].
    """
    if group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores cannot be cut into groups of {group_size} (G >= 2)")
    groups = scores.view(-1, group_size)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).view(-1)


def shaped_rewards(score: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token PPO reward: a KL penalty on every token, the score on the last one.

    R[b, t] = -kl_coef * kl[b, t]                      for every valid t
    R[b, last_b] += score[b]                           last_b = last valid position of row b
    (Ziegler et al. 2019, eq. 2, spread over tokens.) Zero where `mask` is False.

    Args:
        score: [B] sequence scores.
        kl: [B, T] per-token KL estimate (see `kl_penalty_per_token`).
        mask: [B, T] bool; every row needs at least one valid token.
        kl_coef: beta, the KL weight.
    Returns:
        [B, T].
    """
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every row needs at least one valid token to carry its score")
    rewards = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(dim=1, keepdim=True)  # [B, 1]
    return rewards.scatter_add(1, last, score.to(rewards.dtype).unsqueeze(1))
