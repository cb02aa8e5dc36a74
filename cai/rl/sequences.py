"""From logits and sampled tokens to per-token log-probs, entropy and the response mask.

Shapes: B = batch, T = response length, V = vocabulary. `logits[:, t]` must be the logits that
*predicted* `tokens[:, t]` (the caller drops the last position and the prompt before calling).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from cai.rl.stats import masked_mean


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each sampled token under the tempered distribution.

    logp[b, t] = log softmax(logits[b, t] / temperature)[tokens[b, t]]

    The sampler divided the logits by the temperature before drawing, so the log-probs that PPO
    compares against must be taken from the same tempered distribution (Huang et al. 2024).
    Computed in float32 whatever the dtype of `logits`.

    Args:
        logits: [B, T, V] float.
        tokens: [B, T] long, the sampled tokens.
        temperature: > 0, the sampling temperature.
    Returns:
        [B, T] float32.
    """
    _check_temperature(temperature)
    scaled = logits.float() / temperature
    picked = scaled.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


def entropy_from_logits(logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean entropy of the (tempered) next-token distribution over valid tokens.

    H[b, t] = logsumexp(z) - sum_v softmax(z)_v * z_v,  with z = logits[b, t] / temperature;
    returns the mean of H over positions where `mask` is True.

    Args:
        logits: [B, T, V] float.
        mask: [B, T] bool, True on response tokens.
        temperature: > 0.
    Returns:
        scalar tensor (nats).
    """
    _check_temperature(temperature)
    z = logits.float() / temperature
    probs = torch.softmax(z, dim=-1)
    entropy = torch.logsumexp(z, dim=-1) - (probs * z).sum(dim=-1)
    return masked_mean(entropy, mask)


class TruncatedResponses(NamedTuple):
    """What `truncate_after_eos` returns."""

    tokens: Tensor  # [B, T] same dtype as the input; pad after the first EOS
    mask: Tensor  # [B, T] bool; True up to and including the first EOS
    ended: Tensor  # [B] bool; True where the row contains an EOS


def truncate_after_eos(tokens: Tensor, eos_id: int, pad_id: int) -> TruncatedResponses:
    """Cut each response at its first EOS.

    Every token strictly after the first EOS of a row becomes `pad_id` and leaves the mask; the
    EOS itself stays and is in the mask. A row with no EOS keeps all its tokens and `ended` is
    False for it (see `score_unfinished`).

    Args:
        tokens: [B, T] long, sampled response tokens (no prompt).
        eos_id: the end-of-sequence token id.
        pad_id: the padding token id; must differ from `eos_id`, or a padded row could not be told
            from one that ended.
    Returns:
        TruncatedResponses(tokens [B, T], mask [B, T] bool, ended [B] bool).
    """
    if eos_id == pad_id:
        raise ValueError(
            f"pad_id and eos_id are both {eos_id}: padding must use a token distinct from EOS"
        )
    is_eos = tokens == eos_id
    # Number of EOS tokens strictly before each position: > 0 means "after the first EOS".
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()
    after_first_eos = eos_before > 0
    return TruncatedResponses(
        tokens=tokens.masked_fill(after_first_eos, pad_id),
        mask=~after_first_eos,
        ended=is_eos.any(dim=1),
    )
