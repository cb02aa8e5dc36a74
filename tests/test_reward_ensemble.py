"""Reward models with several outputs (rm.ensemble, rm.ensemble_share, rm.per_principle) and how PPO reads
them (cai.policy_models.PPOReward): each principle's labels from the records, the bootstrap weights, the
ensemble loss by hand, a heads ensemble and a LoRA ensemble trained on the tiny model's preference pairs,
and the worst case of hand-built heads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
import torch

from cai import reward_training
from cai.errors import CaiError
from cai.records import read_jsonl
from cai.rewards import RewardModelScorer
from cai.stages import rm
from tests.test_eval_report import models, scripted  # noqa: F401 - fixtures
from tests.test_prefs_rm_stages import copy_run, prefs_run, sft_run  # noqa: F401 - module fixtures


def pair_row(pair_id: str, chosen: str, rejected: str, label: float = 0.6) -> dict:
    return {"id": pair_id, "prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "label_prob": label}


def test_each_principle_label_follows_the_chosen_answer_and_principles_not_asked_are_masked():
    records = [
        {"id": "p1", "answers": ["first", "second"], "principles": [{"id": "a", "p_first": 0.8}, {"id": "b", "p_first": 0.3}]},
        {"id": "p2", "answers": ["one", "two"], "principles": [{"id": "b", "p_first": 0.9}, {"id": "c", "p_first": None}]},
    ]
    dataset = datasets.Dataset.from_list([pair_row("p1", "first", "second"), pair_row("p2", "two", "one")])
    labels, mask = reward_training.principle_labels(dataset, records, ["a", "b", "c"])
    assert labels[0] == pytest.approx([0.8, 0.3, 0.5]) and mask[0] == [True, True, False]  # c was not asked
    # p2's chosen is the record's second answer: its labels are turned around; c was asked but unreadable
    assert labels[1] == pytest.approx([0.5, 0.1, 0.5]) and mask[1] == [False, True, False]
    hard, _ = reward_training.principle_labels(dataset, records, ["a", "b", "c"], hard=True)
    assert hard == [[1.0, 0.0, 0.5], [0.5, 0.0, 0.5]]
    with pytest.raises(CaiError, match="pair 'p3' has no preference record"):
        reward_training.principle_labels(datasets.Dataset.from_list([pair_row("p3", "x", "y")]), records, ["a"])
    with pytest.raises(CaiError, match="neither answer of its record"):
        reward_training.principle_labels(datasets.Dataset.from_list([pair_row("p1", "other", "y")]), records, ["a"])


def test_bootstrap_weights_are_seeded_per_pair_and_differ_between_members():
    ids = [f"pair-{i}" for i in range(400)]
    weights = reward_training.bootstrap_weights(ids, 3, seed=0, bootstrap=True)
    assert weights == reward_training.bootstrap_weights(ids, 3, seed=0, bootstrap=True)
    assert weights[:5] != reward_training.bootstrap_weights(ids, 3, seed=1, bootstrap=True)[:5]
    # a pair keeps its weights whatever the other pairs are (the rl stage's rounds add pairs)
    assert reward_training.bootstrap_weights(ids[200:], 3, seed=0, bootstrap=True) == weights[200:]
    columns = list(zip(*weights))
    for column in columns:  # Poisson(1): mean 1, about e^-1 of the pairs left out
        assert sum(column) / len(column) == pytest.approx(1.0, abs=0.15)
        assert sum(w == 0 for w in column) / len(column) == pytest.approx(math.exp(-1), abs=0.08)
    assert columns[0] != columns[1]
    assert reward_training.bootstrap_weights(ids, 3, seed=0, bootstrap=False) == [[1.0] * 3] * 400
    assert reward_training.bootstrap_weights(ids, 1, seed=0, bootstrap=True) == [[1.0]] * 400


def test_the_ensemble_loss_by_hand():
    # B = 2 pairs, K = 2 members, P = 2 principles
    chosen = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
    rejected = torch.zeros(2, 2, 2)
    labels = torch.tensor([[1.0, 0.5], [0.5, 0.8]])
    mask = torch.tensor([[True, False], [True, True]])
    weights = torch.tensor([[1.0, 2.0], [0.0, 1.0]])

    def bce(d, y):
        return -(y * math.log(1 / (1 + math.exp(-d))) + (1 - y) * math.log(1 / (1 + math.exp(d))))

    pair0 = [bce(1, 1.0), bce(2, 1.0)]  # only principle 0 is labelled
    pair1 = [(bce(0, 0.5) + bce(0, 0.8)) / 2, (bce(0, 0.5) + bce(1, 0.8)) / 2]
    member0 = (1.0 * pair0[0] + 0.0 * pair1[0]) / 2
    member1 = (2.0 * pair0[1] + 1.0 * pair1[1]) / 2
    loss = reward_training.ensemble_soft_label_loss(chosen, rejected, labels, mask, weights)
    assert loss.item() == pytest.approx((member0 + member1) / 2, abs=1e-6)
    # one member, one output, weight 1: the soft-label loss
    c, r, y = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5]), torch.tensor([0.7, 0.9])
    one = reward_training.ensemble_soft_label_loss(c.view(2, 1, 1), r.view(2, 1, 1), y.view(2, 1), torch.ones(2, 1, dtype=torch.bool), torch.ones(2, 1))
    assert one.item() == pytest.approx(reward_training.soft_label_loss(c, r, y).item(), abs=1e-6)


def samples_of(cfg) -> tuple[list[str], list[str]]:
    rows = read_jsonl(Path(cfg.output_dir) / "prefs" / "samples.jsonl")
    pairs = [(s["prompt"], a) for s in rows for a in s["answers"] if a.strip()]
    return [p for p, _ in pairs], [a for _, a in pairs]


def test_a_heads_ensemble_with_one_output_per_principle(prefs_run, tmp_path):
    make_cfg = copy_run(prefs_run[2], tmp_path / "run", ("sl", "sft", "prefs"))
    cfg = make_cfg("rm.eval_fraction=0.25", "rm.ensemble=3", "rm.per_principle=true")
    out = rm.run(cfg)
    layout = json.loads((out / "outputs.json").read_text())
    assert layout == {"members": 3, "principles": ["less_harmful", "more_helpful"], "share": "heads"}
    norm = json.loads((out / "normalization.json").read_text())
    assert len(norm["outputs"]["mean"]) == 6 and norm["disagreement"] > 0
    metrics = json.loads((out / "metrics.json").read_text())
    held = metrics["held_out"]
    assert len(held["member_accuracy"]) == 3 and set(held["principle_accuracy"]) == {"less_harmful", "more_helpful"}
    assert held["disagreement"] > 0

    scorer = RewardModelScorer(out, cfg.cache_dir)
    prompts, answers = samples_of(cfg)
    outputs = scorer.outputs(prompts, answers)
    assert outputs.shape == (len(answers), 3, 2)
    flat = outputs.reshape(len(answers), 6)
    assert flat.mean(dim=0).abs().max() < 1e-4 and (flat.std(dim=0, unbiased=False) - 1).abs().max() < 1e-3  # each output normalised
    score = torch.tensor(scorer(prompts, answers))
    assert abs(float(score.mean())) < 1e-4 and abs(float(score.std(unbiased=False)) - 1) < 1e-3
    assert not torch.allclose(outputs[:, 0], outputs[:, 1], atol=1e-3)  # the members are not one model three times
    assert scorer.baseline_disagreement == pytest.approx(float(outputs.mean(dim=2).std(dim=1, unbiased=False).mean()), rel=1e-3)

    # the value model starts from it and predicts the reward model's score
    from cai.policy_models import value_from_reward_model

    from cai.chat import policy_input
    from cai.rewards import chat_token_ids

    backbone, head = value_from_reward_model(out, "cpu")
    conversation = policy_input(scorer.templates, prompts[0], scorer.system_prompt, answers[0])  # as the scorer reads it
    ids = torch.tensor([chat_token_ids(scorer.tokenizer, conversation, scorer.max_length)])
    with torch.no_grad():
        value = head(backbone(input_ids=ids).last_hidden_state[:, -1]).item()
    assert value == pytest.approx(scorer([prompts[0]], [answers[0]])[0], abs=1e-3)


def test_a_lora_ensemble_trains_each_member_on_one_base_and_continues(prefs_run, tmp_path):
    make_cfg = copy_run(prefs_run[2], tmp_path / "run", ("sl", "sft", "prefs"))
    cfg = make_cfg("rm.eval_fraction=0", "rm.ensemble=2", "rm.ensemble_share=lora", "rm.learning_rate=1e-2")
    out = rm.run(cfg)
    assert (out / "members" / "m0" / "adapter_config.json").is_file() and (out / "members" / "m1" / "adapter_config.json").is_file()
    assert not (out / "checkpoints").exists()
    scorer = RewardModelScorer(out, cfg.cache_dir)
    prompts, answers = samples_of(cfg)
    outputs = scorer.outputs(prompts, answers)
    assert outputs.shape == (len(answers), 2, 1) and not torch.allclose(outputs[:, 0], outputs[:, 1], atol=1e-3)
    assert abs(float(torch.tensor(scorer(prompts, answers)).mean())) < 1e-4
    # continued from the finished LoRA ensemble (as the rl stage's rounds would): same layout, new adapters
    dataset = datasets.load_from_disk(str(Path(cfg.output_dir) / "prefs" / "dataset"))
    metrics = reward_training.train_reward_model(cfg, dataset, tmp_path / "again", start_from=out,
                                                 normalize_on=list(zip(prompts, answers)))
    assert metrics["steps"] >= 2 and RewardModelScorer(tmp_path / "again", cfg.cache_dir).outputs(prompts, answers).shape == outputs.shape
    with pytest.raises(CaiError, match="are not the ones rm.* asks for"):
        reward_training.train_reward_model(make_cfg("rm.ensemble=3", "rm.ensemble_share=lora"), dataset, tmp_path / "x",
                                           start_from=out, normalize_on=list(zip(prompts, answers)))


def hand_built_reward_model(folder: Path, tiny_model_dir: Path, rows: torch.Tensor, members: int, principles: list[str] | None):
    """A reward model whose score head's rows are `rows` [K * P, hidden], offsets 0 and 1 for every output."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=rows.shape[0])
    with torch.no_grad():
        model.score.weight.copy_(rows)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    n = rows.shape[0]
    (folder / "normalization.json").write_text(json.dumps({"mean": 0.0, "std": 1.0, "outputs": {"mean": [0.0] * n, "std": [1.0] * n}}))
    (folder / "outputs.json").write_text(json.dumps({"members": members, "principles": principles, "share": "heads"}))
    return RewardModelScorer(folder, folder)


def hidden_size(model_dir: Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).hidden_size


PROMPTS = ["How do I bake bread?", "Hi", "Tell me a story about a cat.", "How do I pick a lock?"]
ANSWERS = ["Mix flour and water, then bake.", "Hello!", "Once upon a time a cat met a dog.", "I can't help with that."]


def test_the_worst_case_reward_is_the_least_of_the_members_on_hand_built_heads(tiny_config, tiny_model_dir, tmp_path):
    from cai.policy_models import PPOReward

    torch.manual_seed(0)
    w = torch.randn(1, hidden_size(tiny_model_dir))
    rows = torch.cat([w, -w, 0.5 * w])  # three members that disagree in known ways
    folder = tmp_path / "rm"
    folder.mkdir()
    scorer = hand_built_reward_model(folder, tiny_model_dir, rows, members=3, principles=None)
    members = torch.tensor(scorer.raw_outputs(PROMPTS, ANSWERS).tolist())  # [4, 3]
    kinds = ["helpful"] * 4
    worst = PPOReward(tiny_config("rl.ensemble_reward=worst"), scorer).score(PROMPTS, ANSWERS, kinds)
    assert worst.reward.tolist() == pytest.approx(members.min(dim=1).values.tolist(), abs=1e-5)
    assert worst.reward.tolist() == pytest.approx((-members[:, 0].abs()).tolist(), abs=1e-5)  # min(x, -x, x/2) = -|x|
    mean = PPOReward(tiny_config("rl.ensemble_reward=mean"), scorer).score(PROMPTS, ANSWERS, kinds)
    assert mean.reward.tolist() == pytest.approx((members[:, 0] / 6).tolist(), abs=1e-5)  # (1 - 1 + 0.5) / 3
    cautious = PPOReward(tiny_config("rl.ensemble_reward=uncertainty", "rl.uncertainty_coef=2"), scorer).score(PROMPTS, ANSWERS, kinds)
    assert cautious.reward.tolist() == pytest.approx((members.mean(1) - 2 * members.std(1, unbiased=False)).tolist(), abs=1e-5)
    assert worst.disagreement.tolist() == pytest.approx(members.std(1, unbiased=False).tolist(), abs=1e-5)


def test_principle_rewards_are_weighted_and_a_principle_counts_only_where_its_check_applies(tiny_config, tiny_model_dir, tmp_path):
    """Member k, principle p is output k * P + p; a principle whose check is for helpful prompts adds nothing
    to a red-team answer's reward."""
    from cai.policy_models import PPOReward

    constitution = tmp_path / "c.yaml"
    constitution.write_text(
        "name: two\nversion: 1\ncritiques:\n  - {id: x, critique: c, revision: r}\ncomparisons:\n"
        "  - {id: safe, question: q}\n"
        "  - id: helps\n    question: q\n    check: {when: {kind: helpful}, expect: {refuses: false}}\n")
    torch.manual_seed(0)
    w = torch.randn(2, hidden_size(tiny_model_dir))
    rows = torch.cat([w, 3 * w])  # member 0: (safe, helps) = w; member 1: 3w
    folder = tmp_path / "rm"
    folder.mkdir()
    scorer = hand_built_reward_model(folder, tiny_model_dir, rows, members=2, principles=["safe", "helps"])
    raw = torch.tensor(scorer.raw_outputs(PROMPTS, ANSWERS).tolist()).view(4, 2, 2)
    kinds = ["helpful", "helpful", "red_team", "red_team"]
    cfg = tiny_config(f"constitution={constitution}", "rl.principle_weights={safe: 0.25, helps: 2.0}")
    scored = PPOReward(cfg, scorer).score(PROMPTS, ANSWERS, kinds)
    applies = torch.tensor([1.0, 1.0, 0.0, 0.0])
    expected = (0.25 * raw[:, :, 0] + 2.0 * applies[:, None] * raw[:, :, 1]).mean(dim=1)
    assert scored.reward.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert torch.allclose(scored.principles, raw.mean(dim=1), atol=1e-5)


def test_eval_reports_the_ensembles_disagreement_on_each_models_answers(tmp_path, models, scripted):
    """With an ensemble reward model, eval measures how much its members disagree on each compared model's
    held-out answers, and the report's model table shows it."""
    from cai.records import mark_done
    from cai.stages import eval as eval_stage
    from cai.stages import stage_fingerprint
    from tests.test_eval_report import hand_made_run

    cfg = hand_made_run(tmp_path, models, "rm.ensemble=3", rm=True)
    folder = Path(cfg.output_dir) / "rm"
    torch.manual_seed(0)
    rows = torch.randn(3, hidden_size(models["initial"]))
    hand_built_reward_model(folder, models["initial"], rows, members=3, principles=None)
    mark_done(folder, stage_fingerprint(cfg, "rm"))
    out = eval_stage.run(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["reward_disagreement"]) == {"initial", "sft", "rl"}
    scorer = RewardModelScorer(folder, cfg.cache_dir)
    answers = [r for r in read_jsonl(out / "answers.jsonl") if r["model"] == "rl"]
    spread = scorer.outputs([r["prompt"] for r in answers], [r["answer"] for r in answers])[:, :, 0].std(dim=1, unbiased=False)
    assert metrics["reward_disagreement"]["rl"] == pytest.approx(float(spread.mean()), rel=1e-4)
    assert "reward-model members&#x27; disagreement (std)" in (out / "report.html").read_text()


def test_eval_scores_a_per_principle_reward_model_as_ppo_read_it(tmp_path, models, scripted):
    """eval's reward of an answer is what PPO optimised: each principle's output where its check applies to
    the prompt's kind, by rl.principle_weights; not the mean of every output."""
    from cai.constitution import load_constitution
    from cai.records import mark_done
    from cai.stages import eval as eval_stage
    from cai.stages import stage_fingerprint
    from tests.test_eval_report import hand_made_run

    cfg = hand_made_run(tmp_path, models, "constitution=constitutions/checkable.yaml", "eval.judge.backend=rules",
                        "eval.agreement_audit=false", "rm.per_principle=true",
                        "rl.principle_weights={declines_harm: 1.0, full_help: 2.0}", rm=True)
    principles = [p.id for p in load_constitution(cfg.constitution).comparisons]
    folder = Path(cfg.output_dir) / "rm"
    torch.manual_seed(0)
    hand_built_reward_model(folder, models["initial"], torch.randn(len(principles), hidden_size(models["initial"])),
                            members=1, principles=principles)
    mark_done(folder, stage_fingerprint(cfg, "rm"))
    out = eval_stage.run(cfg)
    answers = [r for r in read_jsonl(out / "answers.jsonl") if r["model"] == "rl"]
    scorer = RewardModelScorer(folder, cfg.cache_dir)
    outputs = scorer.outputs([r["prompt"] for r in answers], [r["answer"] for r in answers])[:, 0, :]  # [N, P]
    harm, helps = principles.index("declines_harm"), principles.index("full_help")
    expected = [float(o[harm]) if r["kind"] == "red_team" else 2.0 * float(o[helps]) for r, o in zip(answers, outputs)]
    reported = {s["id"]: s["reward"]["rl"] for s in read_jsonl(out / "samples.jsonl")}
    assert [reported[r["id"]] for r in answers] == pytest.approx(expected, abs=1e-4)
    assert {r["kind"] for r in answers} == {"red_team", "helpful"}
    assert [reported[r["id"]] for r in answers] != pytest.approx(scorer([r["prompt"] for r in answers], [r["answer"] for r in answers]), abs=1e-3)
