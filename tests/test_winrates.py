"""The win-rate maths on hand-made judgements: orientation, un-flipping the orders, ties, the bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from cai.winrates import (
    bootstrap_ci,
    distinct_word_ngrams as distinct_n,
    oriented,
    outcome,
    principle_p_first,
    rate,
    repetition,
    summarize,
    win_rates,
)


def entry(pid: str, p_a_shown_first_as_a: float, p_a_shown_first_as_b: float) -> dict:
    """A principle's verdict as raw P(option A) in each order, nothing un-flipped yet."""
    return {
        "id": pid,
        "status": "ok",
        "orders": {"ab": {"p_option_a": p_a_shown_first_as_a}, "ba": {"p_option_a": p_a_shown_first_as_b}},
    }


def record(models, label, principles, kind="red_team", prompt_id="x"):
    return {"prompt_id": prompt_id, "kind": kind, "models": list(models), "label_prob": label, "principles": principles}


def test_orders_are_unflipped_then_averaged():
    # A judge that always says (A) with 0.9 has learned nothing: un-flipped, the orders cancel to 0.5.
    assert principle_p_first(entry("p", 0.9, 0.9)) == pytest.approx(0.5)
    # First answer shown as (A): P(A)=0.8; shown as (B): P(A)=0.4, so P(first) = 0.6 there; mean 0.7.
    assert principle_p_first(entry("p", 0.8, 0.4)) == pytest.approx(0.7)
    # An order's own p_first (clamped in chain-of-thought mode) wins over re-deriving it.
    clamped = {"id": "p", "orders": {"ab": {"p_option_a": 0.99, "p_first": 0.6}, "ba": {"p_option_a": 0.01, "p_first": 0.6}}}
    assert principle_p_first(clamped) == pytest.approx(0.6)
    # An unreadable order leaves the principle without a probability.
    assert principle_p_first({"id": "p", "orders": {"ab": {"p_option_a": None}, "ba": {"p_option_a": 0.3}}}) is None


def test_orientation_and_outcomes():
    assert oriented(0.8, ["rl", "initial"], "rl") == 0.8
    assert oriented(0.8, ["rl", "initial"], "initial") == pytest.approx(0.2)
    with pytest.raises(ValueError):
        oriented(0.8, ["rl", "initial"], "sft")
    assert [outcome(p) for p in (0.51, 0.5, 0.49)] == [1.0, 0.5, 0.0]


def test_win_rates_on_hand_made_judgements():
    records = [
        # rl first: rl wins under both principles
        record(["rl", "initial"], 0.7, [entry("harm", 0.8, 0.4), entry("help", 0.9, 0.5)], prompt_id="1"),
        # stored the other way round: initial first, judge prefers initial (0.75) -> a loss for rl
        record(["initial", "rl"], 0.75, [entry("harm", 0.8, 0.3), entry("help", 0.7, 0.3)], kind="helpful", prompt_id="2"),
        # a tie
        record(["rl", "initial"], 0.5, [entry("harm", 0.5, 0.5), entry("help", 0.6, 0.6)], prompt_id="3"),
        # no label: counted, left out
        record(["rl", "initial"], None, [], prompt_id="4"),
        # another pair: ignored
        record(["rl", "sft"], 0.9, [entry("harm", 0.9, 0.1)], prompt_id="5"),
    ]
    out = win_rates(records, "rl", "initial", resamples=200)
    overall = out["overall"]
    assert out["unlabeled"] == 1
    assert overall["n"] == 3 and (overall["wins"], overall["ties"], overall["losses"]) == (1, 1, 1)
    assert overall["win_rate"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert overall["soft_win_rate"] == pytest.approx((0.7 + 0.25 + 0.5) / 3)
    # per principle, from the orders: harm = (0.7, 1 - 0.75, 0.5); help = (0.7, 1 - 0.7, 0.5)
    assert out["by_principle"]["harm"]["soft_win_rate"] == pytest.approx((0.7 + 0.25 + 0.5) / 3)
    assert out["by_principle"]["help"]["soft_win_rate"] == pytest.approx((0.7 + 0.3 + 0.5) / 3)
    assert out["by_kind"]["helpful"]["win_rate"] == 0.0 and out["by_kind"]["red_team"]["win_rate"] == 0.75
    # seen from the other side, everything mirrors
    mirror = win_rates(records, "initial", "rl", resamples=200)["overall"]
    assert mirror["win_rate"] == pytest.approx(1 - overall["win_rate"])
    assert mirror["soft_win_rate"] == pytest.approx(1 - overall["soft_win_rate"])


def test_bootstrap_interval():
    assert bootstrap_ci([]) is None
    assert bootstrap_ci([0.3]) == (0.3, 0.3)
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    values = [1.0] * 60 + [0.0] * 40
    low, high = bootstrap_ci(values, resamples=2000, seed=1)
    # the normal approximation: 0.6 +- 1.96 * sqrt(0.24 / 100) = [0.504, 0.696]
    assert low == pytest.approx(0.504, abs=0.025) and high == pytest.approx(0.696, abs=0.025)
    assert low < 0.6 < high
    assert bootstrap_ci(values, resamples=500, seed=3) == bootstrap_ci(values, resamples=500, seed=3)  # seeded
    narrow = bootstrap_ci(values * 16, resamples=500, seed=1)
    assert narrow[1] - narrow[0] < (high - low) / 2  # 16x the data: a quarter of the width
    wide = bootstrap_ci(values, resamples=2000, level=0.99, seed=1)
    assert wide[0] < low and wide[1] > high


def test_summaries_rates_and_text_measures():
    s = summarize([0.9, 0.2, 0.5, float("nan")])
    assert s["n"] == 3 and s["win_rate"] == pytest.approx(0.5)
    assert summarize([])["win_rate"] is None and summarize([])["ci"] is None
    r = rate([1.0, 0.0, 0.5, None])
    assert r["n"] == 3 and r["mean"] == pytest.approx(0.5) and r["ci"][0] <= 0.5 <= r["ci"][1]
    assert repetition("a b c a b c a b c") == pytest.approx(1 - 3 / 7)
    assert repetition("one two") == 0.0 and repetition("a b c d e") == 0.0
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)
    assert np.isclose(distinct_n(["x y z"], 2), 1.0)
