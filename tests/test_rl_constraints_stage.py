"""PPO with an ensemble, per-principle reward model and constraints (rl.ensemble_reward, rl.principle_*,
rl.constraints) on the tiny model: every step logs the members' disagreement, each principle's reward and
each constraint's measure, bound and multiplier; a run killed after a checkpoint resumes with the
multipliers it had and ends like an uninterrupted run; configs that ask what the reward cannot give are
refused in one line before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cai.errors import CaiError
from cai.records import mark_done, read_jsonl
from cai.stages import stage_fingerprint
from tests.test_rl_stage import one_thread, rl_config, run_rl  # noqa: F401 - fixtures

ENSEMBLE = ("rm.ensemble=3", "rm.per_principle=true", "rl.reward=rm", "rl.steps=4", "rl.batch_size=8", "rl.minibatch_size=4",
            "rl.samples=2", "rl.unfinished_score=null")
HELPS = "rl.constraints=[{check: {expect: {min_chars: 20}}, at_least: 0.9, kind: helpful, lr: 0.5, name: long_enough}]"


def ensemble_reward_model(cfg, baseline: float = 0.05) -> Path:
    """A random tiny reward model with 3 members x 2 principles (tiny.yaml's), in the rm/ layout, done."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(cfg.output_dir) / "rm"
    sft_dir = Path(cfg.output_dir) / "sft"
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(sft_dir, num_labels=6)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "normalization.json").write_text(json.dumps(
        {"mean": 0.0, "std": 1.0, "outputs": {"mean": [0.0] * 6, "std": [1.0] * 6}, "disagreement": baseline}))
    (folder / "outputs.json").write_text(json.dumps({"members": 3, "principles": ["less_harmful", "more_helpful"], "share": "heads"}))
    mark_done(folder, stage_fingerprint(cfg, "rm"))
    return folder


def test_every_step_logs_disagreement_principles_and_constraints(rl_config, capsys):
    cfg = rl_config(*ENSEMBLE, "rl.ensemble_reward=worst", HELPS)
    ensemble_reward_model(cfg)
    run_rl(cfg)
    out = Path(cfg.output_dir) / "rl"
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(rows) == 4
    for row in rows:
        assert row["reward_disagreement"] > 0 and row["reward_disagreement_ratio"] == pytest.approx(row["reward_disagreement"] / 0.05)
        assert set(k for k in row if k.startswith("principle_reward/")) == {"principle_reward/less_harmful", "principle_reward/more_helpful"}
        assert row["bound/long_enough"] == 0.9 and row["constraint_answers/long_enough"] > 0
        assert 0.0 <= row["constraint/long_enough"] <= 1.0
    # the multiplier is the one the previous step left: rises by lr x (bound - measured) while below the bound
    for before, after in zip(rows, rows[1:]):
        expected = max(0.0, before["multiplier/long_enough"] + 0.5 * (0.9 - before["constraint/long_enough"]))
        assert after["multiplier/long_enough"] == pytest.approx(expected, abs=1e-5)
    # the random members disagree far more than the baseline written beside them: the monitor says so
    assert any("the reward ensemble's members disagree" in w for w in rows[0]["warnings"])
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["disagreement_trajectory"] == [round(r["reward_disagreement"], 4) for r in rows]
    assert summary["constraints"]["long_enough"]["bound"] == 0.9 and len(summary["constraints"]["long_enough"]["multiplier"]) == 4
    printed = capsys.readouterr().out
    assert "disagreement" in printed and "long_enough" in printed and "lambda" in printed
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 2 and all(isinstance(s["reward"], float) for s in samples)  # the reward model's score

    # the report plots them: disagreement, each principle's reward, the constraint beside its bound and its multiplier
    from cai.report import write_report

    (Path(cfg.output_dir) / "eval").mkdir()
    (Path(cfg.output_dir) / "eval" / "metrics.json").write_text("{}")
    html_path, md_path = write_report(cfg.output_dir)
    html = html_path.read_text()
    assert "<h2>Reward monitors: ensemble disagreement and constraints</h2>" in html
    assert (html_path.parent / "plots" / "reward_monitors.png").stat().st_size > 1000
    last = rows[-1]
    assert f"<td>long_enough</td><td>0.90</td><td>{rows[0]['constraint/long_enough']:.2f}</td>" in html.replace("\n", "")
    assert f"{last['multiplier/long_enough']:.2f}" in md_path.read_text()


def interrupting_reward(prompts: list[str], answers: list[str]) -> list[float]:
    """Length in characters / 10; raises KeyboardInterrupt at its CALLS_BEFORE_KILL-th call (a kill mid-run)."""
    global CALLS
    CALLS += 1
    if CALLS == CALLS_BEFORE_KILL:
        raise KeyboardInterrupt
    return [len(a) / 10 for a in answers]


CALLS, CALLS_BEFORE_KILL = 0, 0


def test_a_resumed_run_keeps_its_multipliers_and_ends_like_an_uninterrupted_one(rl_config, tmp_path):
    global CALLS, CALLS_BEFORE_KILL
    common = ("rl.reward=tests.test_rl_constraints_stage:interrupting_reward", "rl.steps=5", "rl.batch_size=4", "rl.minibatch_size=2",
              "rl.checkpoint_every=2", "rl.samples=0", "rl.unfinished_score=null", HELPS.replace("lr: 0.5", "lr: 2.0"))
    CALLS, CALLS_BEFORE_KILL = 0, 0
    whole = rl_config(f"output_dir={tmp_path / 'whole'}", *common)
    run_rl(whole)
    expected = read_jsonl(Path(whole.output_dir) / "rl" / "metrics.jsonl")
    assert expected[2]["multiplier/long_enough"] > 0  # step 3 starts from a multiplier that only the checkpoint holds

    CALLS, CALLS_BEFORE_KILL = 0, 4  # killed in step 4, after the checkpoint of step 2
    killed = rl_config(f"output_dir={tmp_path / 'killed'}", *common)
    with pytest.raises(KeyboardInterrupt):
        run_rl(killed)
    checkpoint = Path(killed.output_dir) / "rl" / "checkpoints" / "step-2"
    assert checkpoint.is_dir()
    CALLS, CALLS_BEFORE_KILL = 0, 0
    run_rl(killed)
    resumed = read_jsonl(Path(killed.output_dir) / "rl" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(expected, resumed):
        assert b["multiplier/long_enough"] == pytest.approx(a["multiplier/long_enough"], abs=1e-6)
        assert b["constraint/long_enough"] == pytest.approx(a["constraint/long_enough"], abs=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (("rl.ensemble_reward=worst",), "rl.ensemble_reward=worst needs an ensemble reward model"),
    (("rl.principle_weights={less_harmful: 1}",), "need a reward with one output per principle"),
    (("rm.per_principle=true", "rl.principle_weights={kind: 1}"), "rl.principle_weights: 'kind' is not a comparison principle"),
    (("rl.constraints=[{principle: more_helpful, at_least: 0}]",), r"rl.constraints\[0\].principle='more_helpful' needs a reward model"),
    (("rl.constraints=[{check: nope, at_least: 0.5}]",), r"rl.constraints\[0\].check='nope': no principle"),
    (("rl.constraints=[{check: {expect: {refuse: true}}, at_least: 0.5}]",), r"rl.constraints\[0\].check: .*unknown"),
    (("rl.constraints=[{check: {expect: {refuses: true}}, at_least: 0.5}, {check: {expect: {refuses: false}}, at_most: 0.5}]",),
     "two constraints are named 'check'"),
])
def test_configs_that_ask_what_the_reward_cannot_give_are_refused_before_anything_is_written(rl_config, overrides, message):
    cfg = rl_config("rl.reward=rm", *overrides)
    ensemble_reward_model(cfg)  # the check comes first, whatever rm/ holds
    with pytest.raises(CaiError, match=message):
        run_rl(cfg)
    assert not (Path(cfg.output_dir) / "rl").exists()


def test_a_constraint_needs_one_source_and_one_bound():
    from cai.config import load_config

    with pytest.raises(CaiError, match="name exactly one of check or principle"):
        load_config(None, ["rl.constraints=[{at_least: 0.5}]"])
    with pytest.raises(CaiError, match="give exactly one bound"):
        load_config(None, ["rl.constraints=[{check: full_help, at_least: 0.5, at_most: 0.9}]"])


def test_the_shipped_constrained_config_names_what_its_constitution_has():
    from cai.config import load_config
    from cai.policy_models import check_reward_reading
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "configs" / "known_truth_constrained.yaml")
    check_reward_reading(cfg)  # full_help is a principle of checkable.yaml that carries a check
    assert [c.label for c in cfg.rl.constraints] == ["full_help@helpful"]
    # the benchmark copies the known-truth run's reward model into this one's: the same rm and earlier sections
    base = load_config(ROOT / "configs" / "known_truth.yaml").model_dump(mode="json")
    mine = cfg.model_dump(mode="json")
    assert all(mine[s] == base[s] for s in ("seed", "constitution", "policy", "labeler", "choice_labeler", "data", "sl", "sft", "prefs", "rm"))
