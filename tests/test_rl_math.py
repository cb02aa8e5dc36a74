"""cai.rl on small hand-written tensors; the expected numbers are worked out in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from cai.rl import (
    AdaptiveKLController,
    FixedKLController,
    clip_rewards,
    distinct_token_ngrams as distinct_n,
    entropy_from_logits,
    explained_variance,
    gae,
    gae_reference,
    kl_penalty_per_token,
    leave_one_out,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    pearson,
    policy_loss,
    returns_to_go,
    score_unfinished,
    shaped_rewards,
    truncate_after_eos,
    value_loss,
)

T_, F_ = True, False
LN2 = math.log(2.0)


def close(actual: torch.Tensor, expected: list, atol: float = 1e-4) -> None:
    torch.testing.assert_close(
        actual.double(), torch.tensor(expected, dtype=torch.float64), atol=atol, rtol=0
    )


# --- sequences ------------------------------------------------------------------------------------


def test_logprobs_gathers_the_sampled_token_and_temperature_changes_them():
    # logits (0, ln 3): p = (1/4, 3/4). Row 2 picks token 0 at both positions.
    logits = torch.tensor([[[0.0, math.log(3.0)]] * 2, [[0.0, math.log(3.0)]] * 2])
    tokens = torch.tensor([[1, 0], [0, 0]])
    # T = 1: log 3/4 = -0.28768, log 1/4 = -1.38629
    close(logprobs_from_logits(logits, tokens, 1.0), [[-0.28768, -1.38629], [-1.38629, -1.38629]])
    # T = 2: z = (0, ln3 / 2), p = (1, sqrt 3) / (1 + sqrt 3) = (0.36603, 0.63397)
    # log 0.63397 = -0.45575, log 0.36603 = -1.00505
    close(logprobs_from_logits(logits, tokens, 2.0), [[-0.45575, -1.00505], [-1.00505, -1.00505]])


def test_logprobs_reject_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), 0.0)


def test_truncate_after_first_eos():
    eos, pad = 2, 0
    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    out = truncate_after_eos(tokens, eos, pad)
    # Row 0: the first EOS stays, the later 7 and second EOS become pad. Row 1 never ends.
    assert out.tokens.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert out.mask.tolist() == [[T_, T_, F_, F_], [T_, T_, T_, T_], [T_, F_, F_, F_]]
    assert out.mask.dtype == torch.bool
    assert out.ended.tolist() == [True, False, True]
    assert tokens.tolist() == [[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]]  # input untouched


def test_truncate_refuses_pad_equal_to_eos():
    with pytest.raises(ValueError, match="distinct"):
        truncate_after_eos(torch.tensor([[1, 2]]), eos_id=2, pad_id=2)


def test_entropy_is_masked_mean_over_valid_tokens():
    # Row 0, pos 0: uniform over 4 -> ln 4 = 1.38629.
    # Row 0, pos 1: softmax(ln 3, 0, -inf, -inf) = (3/4, 1/4, 0, 0)
    #   -> -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.21576 + 0.34657 = 0.56233.
    # Row 1 is masked out (a peaked distribution that would pull the mean down).
    neg = -1e9
    logits = torch.tensor(
        [
            [[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, neg, neg]],
            [[50.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0]],
        ]
    )
    mask = torch.tensor([[T_, T_], [F_, F_]])
    close(entropy_from_logits(logits, mask), (1.38629 + 0.56233) / 2)


# --- rewards --------------------------------------------------------------------------------------


def test_score_unfinished_replaces_only_unended_rows():
    scores = torch.tensor([0.5, 3.0, -0.2])
    ended = torch.tensor([True, False, True])
    close(score_unfinished(scores, ended, -1.0), [0.5, -1.0, -0.2])
    close(score_unfinished(scores, ended, None), [0.5, 3.0, -0.2])


def test_clip_rewards():
    close(clip_rewards(torch.tensor([-3.0, 0.5, 3.0]), 2.0), [-2.0, 0.5, 2.0])
    with pytest.raises(ValueError):
        clip_rewards(torch.tensor([1.0]), 0.0)


def test_leave_one_out_scores_each_answer_against_its_siblings_by_hand():
    # two prompts, three answers each: [1, 2, 6] and [4, 4, 4]
    # 1 - (2 + 6) / 2 = -3;  2 - (1 + 6) / 2 = -1.5;  6 - (1 + 2) / 2 = 4.5;  a group scored alike -> 0
    close(leave_one_out(torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, 4.0]), 3), [-3.0, -1.5, 4.5, 0.0, 0.0, 0.0])
    # pairs: each answer's score less the other's
    close(leave_one_out(torch.tensor([0.5, -0.5, 2.0, 1.0]), 2), [1.0, -1.0, 1.0, -1.0])
    with pytest.raises(ValueError, match="groups of 4"):
        leave_one_out(torch.tensor([1.0, 2.0, 3.0]), 4)
    with pytest.raises(ValueError):
        leave_one_out(torch.tensor([1.0, 2.0]), 1)


def test_kl_k1_and_k3_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.5], [0.5, 0.5, 0.9]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.5], [0.1, 0.1, 0.1]]))
    mask = torch.tensor([[T_, T_, T_], [T_, F_, F_]])
    # k1 = logp - ref: ln 2, -ln 2, 0; row 1: ln 5 = 1.60944, then masked.
    close(kl_penalty_per_token(logp, ref, mask, "k1"), [[LN2, -LN2, 0.0], [1.60944, 0.0, 0.0]])
    # k3 = (r - 1) - ln r, r = p_ref / p:
    #   r = 1/2: -0.5 + ln 2 = 0.19315;  r = 2: 1 - ln 2 = 0.30685;  r = 1: 0
    #   r = 1/5: -0.8 + ln 5 = 0.80944
    close(
        kl_penalty_per_token(logp, ref, mask, "k3"), [[0.19315, 0.30685, 0.0], [0.80944, 0.0, 0.0]]
    )
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty_per_token(logp, ref, mask, "k2")  # type: ignore[arg-type]


def test_shaped_rewards_put_the_score_on_the_last_valid_token():
    score = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[T_, T_, T_], [T_, T_, F_]])
    # -0.5 * kl everywhere valid; row 0 score at t=2: -0.15 + 1 = 0.85;
    # row 1 score at t=1: -0.25 + 2 = 1.75; t=2 is padding -> 0.
    close(shaped_rewards(score, kl, mask, 0.5), [[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0]])


def test_shaped_rewards_refuse_a_row_without_valid_tokens():
    with pytest.raises(ValueError, match="valid token"):
        shaped_rewards(torch.ones(2), torch.zeros(2, 2), torch.tensor([[T_, T_], [F_, F_]]), 0.1)


# --- GAE ------------------------------------------------------------------------------------------


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 0.5, 7.0]])
    mask = torch.tensor([[T_, T_, T_], [T_, T_, F_]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # Row 0: reward-to-go (6, 5, 3) minus V (0.5, 1, 1.5) = (5.5, 4, 1.5); returns = (6, 5, 3).
    # Row 1: ends at t=1, so the padded reward 99 and value 7 are never used:
    #   reward-to-go (2, 1) minus V (0.5, 0.5) = (1.5, 0.5); returns (2, 1).
    close(adv, [[5.5, 4.0, 1.5], [1.5, 0.5, 0.0]])
    close(ret, [[6.0, 5.0, 3.0], [2.0, 1.0, 0.0]])


def test_returns_to_go_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 1.0, 99.0]])
    mask = torch.tensor([[T_, T_, T_], [T_, T_, F_]])
    # gamma 1: (6, 5, 3) and, the second row ending at t=1, (5, 1, 0); gamma 0.5: 1 + 0.5 (2 + 0.5 * 3) = 2.75,
    # 2 + 1.5 = 3.5, 3; and 4 + 0.5 = 4.5, 1, 0.
    close(returns_to_go(rewards, mask, 1.0), [[6.0, 5.0, 3.0], [5.0, 1.0, 0.0]])
    close(returns_to_go(rewards, mask, 0.5), [[2.75, 3.5, 3.0], [4.5, 1.0, 0.0]])


def test_gae_gamma_lambda_half_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 4.0, 5.0]])
    values = torch.tensor([[1.0, 2.0, 4.0], [2.0, 0.0, 3.0]])
    mask = torch.tensor([[T_, T_, T_], [T_, T_, F_]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # Row 0 (gamma * lam = 0.25):
    #   t=2: delta = 2 + 0 - 4 = -2                 A = -2
    #   t=1: delta = 0 + 0.5*4 - 2 = 0              A = 0 + 0.25*(-2) = -0.5
    #   t=0: delta = 1 + 0.5*2 - 1 = 1              A = 1 + 0.25*(-0.5) = 0.875
    #   returns = A + V = (1.875, 1.5, 2)
    # Row 1 (last valid t=1, bootstrap 0, not V=3):
    #   t=1: delta = 4 + 0 - 0 = 4                  A = 4
    #   t=0: delta = 0 + 0.5*0 - 2 = -2             A = -2 + 0.25*4 = -1
    #   returns = (1, 4, 0)
    close(adv, [[0.875, -0.5, -2.0], [-1.0, 4.0, 0.0]])
    close(ret, [[1.875, 1.5, 2.0], [1.0, 4.0, 0.0]])


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)])
def test_vectorised_gae_matches_the_loop_on_ragged_masks(gamma: float, lam: float):
    generator = torch.Generator().manual_seed(0)
    batch, length = 16, 11
    rewards = torch.randn(batch, length, generator=generator, dtype=torch.float64)
    values = torch.randn(batch, length, generator=generator, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0], lengths[1] = 1, length  # the extremes
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    assert 1 < len(set(lengths.tolist()))  # genuinely ragged
    fast = gae(rewards, values, mask, gamma, lam)
    slow = gae_reference(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(fast.advantages, slow.advantages)
    torch.testing.assert_close(fast.returns, slow.returns)


def test_gae_reference_refuses_a_mask_with_holes():
    with pytest.raises(ValueError, match="prefix"):
        gae_reference(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[T_, F_, T_]]), 1.0, 1.0)


# --- statistics -----------------------------------------------------------------------------------


def test_masked_mean_and_var_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, float("nan")]])
    mask = torch.tensor([[T_, T_, T_], [T_, F_, F_]])
    # valid entries 1, 2, 3, 4: mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    close(masked_mean(x, mask), 2.5)
    close(masked_mean(x, mask, dim=1), [2.0, 4.0])
    close(masked_var(x, mask, unbiased=False), 5 / 4)
    close(masked_var(x, mask, unbiased=True), 5 / 3)


def test_masked_whiten_on_valid_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -7.0]])
    mask = torch.tensor([[T_, T_, T_], [T_, F_, F_]])
    white = masked_whiten(x, mask)
    # (x - 2.5) / sqrt(5/3) = (x - 2.5) / 1.29099 -> -1.16190, -0.38730, 0.38730, 1.16190
    close(white, [[-1.16190, -0.38730, 0.38730], [1.16190, 100.0, -7.0]])
    valid = white[mask]
    assert abs(float(valid.mean())) < 1e-6
    assert abs(float(valid.std()) - 1.0) < 1e-6
    # Without the mean shift: scaled but centred back on 2.5.
    close(
        masked_whiten(x, mask, shift_mean=False),
        [[1.33810, 2.11270, 2.88730], [3.66190, 100.0, -7.0]],
    )


# --- losses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "advantage, expected_loss",
    [
        # A = +1: unclipped -A*r = (-1, -1.5, -0.5), clipped (-1, -1.2, -0.8);
        # max = (-1, -1.2, -0.5): the clipped term wins only at r = 1.5. loss = -2.7 / 3 = -0.9
        (1.0, -0.9),
        # A = -1: unclipped (1, 1.5, 0.5), clipped (1, 1.2, 0.8);
        # max = (1, 1.5, 0.8): the clipped term wins only at r = 0.5. loss = 3.3 / 3 = 1.1
        (-1.0, 1.1),
    ],
)
def test_policy_loss_one_of_three_tokens_clips(advantage: float, expected_loss: float):
    # Row 0: ratios 1, 1.5, 0.5 (eps = 0.2). Row 1 is padding with a wild ratio.
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5], [50.0, 50.0, 50.0]])).requires_grad_()
    adv = torch.full((2, 3), advantage)
    mask = torch.tensor([[T_, T_, T_], [F_, F_, F_]])
    out = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    close(out.loss, expected_loss)
    close(out.clip_fraction, 1 / 3)
    # approx_kl = mean((r - 1) - ln r) = (0 + (0.5 - 0.405465) + (-0.5 + 0.693147)) / 3 = 0.095894
    close(out.approx_kl, 0.095894)
    assert not out.clip_fraction.requires_grad and not out.approx_kl.requires_grad
    out.loss.backward()
    # d loss / d logp = -A * r / 3 where the unclipped term wins, 0 where the clipped one does.
    if advantage > 0:
        close(logp.grad, [[-1 / 3, 0.0, -0.5 / 3], [0.0, 0.0, 0.0]])
    else:
        close(logp.grad, [[1 / 3, 1.5 / 3, 0.0], [0.0, 0.0, 0.0]])


def test_value_loss_clipping_by_hand():
    old = torch.zeros(2, 3)
    values = torch.tensor([[0.1, 0.5, -0.5], [9.0, 9.0, 9.0]])
    returns = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[T_, T_, T_], [F_, F_, F_]])
    out = value_loss(values, old, returns, mask, clip_eps=0.2)
    # t0: |v - v_old| = 0.1 < eps, both errors 0.01
    # t1: v_clip = 0.2; (0.5-1)^2 = 0.25 < (0.2-1)^2 = 0.64  -> clipped term wins
    # t2: v_clip = -0.2; (-0.5-1)^2 = 2.25 > (-0.2-1)^2 = 1.44 -> unclipped wins
    # loss = 0.5 * (0.01 + 0.64 + 2.25) / 3 = 0.483333
    close(out.loss, 0.483333)
    close(out.clip_fraction, 1 / 3)


# --- KL controllers -------------------------------------------------------------------------------


def test_adaptive_kl_controller_moves_toward_target_within_the_clip():
    def after(kl: float, n_steps: int = 1000) -> float:
        controller = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10_000)
        controller.update(kl, n_steps)
        return controller.value

    # error = clip(KL/6 - 1, -0.2, 0.2); beta *= 1 + error * 1000 / 10000
    assert after(6.6) == pytest.approx(0.1 * 1.01)  # error 0.1: up
    assert after(12.0) == pytest.approx(0.1 * 1.02)  # error 1 clipped to 0.2: up
    assert after(5.4) == pytest.approx(0.1 * 0.99)  # error -0.1: down
    assert after(0.0) == pytest.approx(0.1 * 0.98)  # error -1 clipped to -0.2: down
    assert after(6.0) == pytest.approx(0.1)  # on target: unchanged
    # One full horizon moves beta by at most 20%, however far off the KL is.
    assert after(1e6, n_steps=10_000) == pytest.approx(0.12)
    assert after(0.0, n_steps=10_000) == pytest.approx(0.08)


def test_kl_controllers_restore_from_state_dict():
    controller = AdaptiveKLController(0.1, 6.0, 10_000)
    for _ in range(3):
        controller.update(20.0, 1000)
    restored = AdaptiveKLController(0.1, 6.0, 10_000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value == pytest.approx(0.1 * 1.02**3)

    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    other = FixedKLController(0.3)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


# --- monitors -------------------------------------------------------------------------------------


def test_explained_variance_by_hand():
    returns = torch.tensor([[1.0, 2.0, 3.0], [50.0, 0.0, 0.0]])
    mask = torch.tensor([[T_, T_, T_], [F_, F_, F_]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(2, 3), returns, mask) == pytest.approx(0.0)
    # residual (0, 0, 1): var 2/9; var(R) = 2/3 -> 1 - 1/3 = 2/3
    values = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0]])
    assert explained_variance(values, returns, mask) == pytest.approx(2 / 3)
    assert explained_variance(values, torch.ones(2, 3), mask) == 0.0  # constant returns


def test_distinct_n():
    # bigrams (1,2) (2,1) (1,2): 2 distinct of 3; unigrams {1, 2} of 4
    assert distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)
    assert distinct_n([[1, 2, 1, 2]], 1) == pytest.approx(0.5)
    # across sequences: two identical answers halve the share
    assert distinct_n([[1, 2, 3], [1, 2, 3]], 1) == pytest.approx(0.5)
    assert distinct_n([[1]], 2) == 0.0


def test_pearson_and_zero_variance_guard():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # dx = (-1, 0, 1), dy = (-1, 1, 0): cov 1 / sqrt(2 * 2) = 0.5
    x, y = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0])
    assert pearson(x, y) == pytest.approx(0.5)
    assert pearson([1, 2, 3], [5, 5, 5]) == 0.0
    with pytest.raises(ValueError):
        pearson([1, 2], [1, 2, 3])


# --- purity ---------------------------------------------------------------------------------------


def test_functions_do_not_modify_their_inputs():
    generator = torch.Generator().manual_seed(1)
    logp, old, ref, values, returns, adv = torch.randn(6, 2, 3, generator=generator)
    mask = torch.tensor([[T_, T_, F_], [T_, T_, T_]])
    score = torch.tensor([1.0, -1.0])
    inputs = [logp, old, ref, values, returns, adv, mask, score]
    snapshot = [t.clone() for t in inputs]
    kl = kl_penalty_per_token(logp, ref, mask, "k3")
    rewards = shaped_rewards(score, kl, mask, 0.1)
    gae(rewards, values, mask, 0.9, 0.95)
    masked_whiten(adv, mask)
    policy_loss(logp, old, adv, mask, 0.2)
    value_loss(values, old, returns, mask, 0.2)
    score_unfinished(score, torch.tensor([True, False]), -1.0)
    for before, after in zip(snapshot, inputs):
        assert torch.equal(before, after)
