"""The RL maths of cai: small pure functions on [B, T] tensors (B = batch, T = response length).

Order of use in one PPO step (Ziegler et al. 2019; Ouyang et al. 2022; Huang et al. 2024):
truncate_after_eos -> logprobs_from_logits -> score_unfinished / clip_rewards ->
kl_penalty_per_token -> shaped_rewards -> (masked_whiten rewards) -> gae -> masked_whiten advantages
-> policy_loss + value_loss; the KL controller updates beta once per batch. Without a value model
(rl.value_model=false) returns_to_go stands in for gae and there is no value loss.
A reward model with several outputs (ensemble members, principles) is reduced to the score by
combine_principles -> combine_members; constraints enter by lagrangian_mix, their multipliers move by
update_multipliers once per batch; with several answers per prompt (rl.group_baseline), leave_one_out
then takes each score relative to its siblings' before shaped_rewards.
"""

from cai.rl.advantages import GAEOutput, gae, gae_reference, returns_to_go
from cai.rl.constraints import LagrangeState, constraint_means, lagrangian_mix, update_multipliers
from cai.rl.ensemble import (
    EnsembleCombine,
    combine_members,
    combine_principles,
    member_disagreement,
    normalize_over_batch,
)
from cai.rl.kl import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    KLEstimator,
    kl_penalty_per_token,
)
from cai.rl.losses import PolicyLossOutput, ValueLossOutput, policy_loss, value_loss
from cai.rl.monitors import distinct_token_ngrams, explained_variance, pearson
from cai.rl.rewards import clip_rewards, leave_one_out, score_unfinished, shaped_rewards
from cai.rl.sequences import (
    TruncatedResponses,
    entropy_from_logits,
    logprobs_from_logits,
    truncate_after_eos,
)
from cai.rl.stats import masked_mean, masked_var, masked_whiten

__all__ = [
    "AdaptiveKLController",
    "EnsembleCombine",
    "FixedKLController",
    "GAEOutput",
    "KLController",
    "KLEstimator",
    "LagrangeState",
    "PolicyLossOutput",
    "TruncatedResponses",
    "ValueLossOutput",
    "clip_rewards",
    "combine_members",
    "combine_principles",
    "constraint_means",
    "distinct_token_ngrams",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "gae_reference",
    "kl_penalty_per_token",
    "lagrangian_mix",
    "leave_one_out",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "member_disagreement",
    "normalize_over_batch",
    "pearson",
    "policy_loss",
    "returns_to_go",
    "score_unfinished",
    "shaped_rewards",
    "truncate_after_eos",
    "update_multipliers",
    "value_loss",
]
