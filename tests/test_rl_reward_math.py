"""The maths of reward uncertainty, per-principle rewards and constraints (cai/rl/ensemble.py,
cai/rl/constraints.py), on hand-computed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from cai.rl import (
    LagrangeState,
    combine_members,
    combine_principles,
    constraint_means,
    lagrangian_mix,
    member_disagreement,
    normalize_over_batch,
    update_multipliers,
)

MEMBERS = torch.tensor([[1.0, 3.0, 2.0],    # answer 0: members disagree
                        [0.5, 0.5, 0.5],    # answer 1: they agree
                        [-1.0, 2.0, 0.5]])  # answer 2


def test_ensemble_mean_uncertainty_and_worst_case_by_hand():
    assert combine_members(MEMBERS, "mean").tolist() == pytest.approx([2.0, 0.5, 0.5])
    std0 = math.sqrt(((1 - 2) ** 2 + (3 - 2) ** 2 + 0) / 3)  # population std: sqrt(2/3)
    std2 = math.sqrt((1.5 ** 2 + 1.5 ** 2 + 0) / 3)
    assert member_disagreement(MEMBERS).tolist() == pytest.approx([std0, 0.0, std2])
    assert combine_members(MEMBERS, "uncertainty", coef=0.5).tolist() == pytest.approx([2 - 0.5 * std0, 0.5, 0.5 - 0.5 * std2])
    assert combine_members(MEMBERS, "worst").tolist() == [1.0, 0.5, -1.0]
    one = MEMBERS[:, :1]  # one member: every combination is that member, and it disagrees with no one
    for how in ("mean", "uncertainty", "worst"):
        assert combine_members(one, how).tolist() == one[:, 0].tolist()
    with pytest.raises(ValueError, match="unknown ensemble combination"):
        combine_members(MEMBERS, "median")


def test_principles_weighted_sum_skips_principles_that_do_not_apply():
    rewards = torch.tensor([[[1.0, 2.0]], [[3.0, -1.0]]])  # [B=2, K=1, P=2]
    weights = torch.tensor([0.25, 0.75])
    assert combine_principles(rewards, weights)[:, 0].tolist() == pytest.approx([0.25 + 1.5, 0.75 - 0.75])
    applies = torch.tensor([[True, False], [True, True]])
    assert combine_principles(rewards, weights, applies)[:, 0].tolist() == pytest.approx([0.25, 0.0])


def test_normalise_then_sum_by_hand():
    # principle 0 spreads widely (0, 10, 20), principle 1 narrowly (1, 1.1, 1.2): normalised, each counts the same
    rewards = torch.tensor([[[0.0, 1.0]], [[10.0, 1.1]], [[20.0, 1.2]]])  # [B=3, K=1, P=2]
    z = math.sqrt(1.5)  # (x - mean) / population std for three evenly spaced values: -z, 0, +z
    normalised = normalize_over_batch(rewards, torch.ones(3, 2, dtype=torch.bool))
    assert normalised[:, 0, 0].tolist() == pytest.approx([-z, 0.0, z], abs=1e-4)
    assert normalised[:, 0, 1].tolist() == pytest.approx([-z, 0.0, z], abs=1e-4)
    summed = combine_principles(rewards, torch.tensor([0.5, 0.5]), normalize=True)
    assert summed[:, 0].tolist() == pytest.approx([-z, 0.0, z], abs=1e-4)
    plain = combine_principles(rewards, torch.tensor([0.5, 0.5]))  # without it, principle 0 decides everything
    assert plain[:, 0].tolist() == pytest.approx([0.5, 5.55, 10.6])
    # a principle normalised only over the answers it applies to; 0 elsewhere and where one answer is all it has
    applies = torch.tensor([[True, True], [True, False], [False, False]])
    partial = normalize_over_batch(rewards, applies)
    assert partial[:, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-4)
    assert partial[:, 0, 1].tolist() == [0.0, 0.0, 0.0]


def test_a_multiplier_rises_while_its_constraint_is_violated_and_falls_back_when_it_holds():
    """A toy batch of 4 answers, two constraints: helpfulness >= 0.75 on helpful prompts (answers 0-2), and
    "at most 0.5 of answers refuse" written as -refuses >= -0.5."""
    applies = torch.tensor([[True, True], [True, True], [True, True], [False, True]])
    violated = torch.tensor([[1.0, -1.0], [0.0, -1.0], [0.0, 0.0], [1.0, 0.0]])  # helpful 1/3; refusals 2/4
    means, counts = constraint_means(violated, applies)
    assert means.tolist() == pytest.approx([1 / 3, -0.5]) and counts.tolist() == [3, 4]
    bounds, lr = torch.tensor([0.75, -0.5]), torch.tensor([2.0, 1.0])
    state = LagrangeState(torch.tensor([0.0, 0.2]))
    state = update_multipliers(state, means, bounds, lr)
    assert state.multipliers.tolist() == pytest.approx([2 * (0.75 - 1 / 3), 0.2])  # 0.8333; exactly at its bound: unchanged
    state = update_multipliers(state, means, bounds, lr)
    assert state.multipliers.tolist() == pytest.approx([4 * (0.75 - 1 / 3), 0.2])  # still violated: 1.6667
    holds = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # helpful 3/3, no refusals
    means, _ = constraint_means(holds, applies)
    for expected in ([1.6667 - 0.5, 0.0], [1.1667 - 0.5, 0.0], [0.6667 - 0.5, 0.0], [0.0, 0.0], [0.0, 0.0]):
        state = update_multipliers(state, means, bounds, lr)
        assert state.multipliers.tolist() == pytest.approx(expected, abs=1e-4)  # falls back, never below 0
    # a constraint that bears on no answer of the batch keeps its multiplier
    none = torch.zeros(4, 2, dtype=torch.bool)
    means, counts = constraint_means(holds, none)
    assert math.isnan(means[0]) and counts.tolist() == [0, 0]
    assert update_multipliers(LagrangeState(torch.tensor([0.7, 0.1])), means, bounds, lr).multipliers.tolist() == pytest.approx([0.7, 0.1])


def test_lagrangian_mix_by_hand():
    reward = torch.tensor([2.0, 2.0, -1.0])
    values = torch.tensor([[0.0], [1.0], [1.0]])
    applies = torch.tensor([[True], [True], [False]])
    mixed = lagrangian_mix(reward, values, applies, torch.tensor([3.0]))
    assert mixed.tolist() == pytest.approx([(2 + 0) / 4, (2 + 3) / 4, -1.0])  # where it does not apply: R unchanged
    assert lagrangian_mix(reward, values, applies, torch.tensor([0.0])).tolist() == reward.tolist()
    # a large multiplier: the answer that keeps the constraint now beats the one with the higher reward
    assert lagrangian_mix(torch.tensor([3.0, 0.0]), torch.tensor([[0.0], [1.0]]), torch.ones(2, 1, dtype=torch.bool),
                          torch.tensor([10.0])).argmax().item() == 1
