"""Rounds of AI feedback (rl.rounds) and the snapshot kept by an independent judge (rl.select_by), on tiny
models with a scripted labeler.

A round labels only the current policy's own pairs and the reward model's training set grows by them; a
round killed while labeling resumes without asking for a label twice, and loses no finished round; DPO
rounds train each round on the current policy's pairs; the snapshot kept is the one the judge prefers on
the validation split, and the eval split is never read while choosing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import cai.labelers.local as local
from cai.cli import run_stage
from cai.errors import CaiError
from cai.labelers.local import LocalGenerator
from cai.promptsets import split_prompts
from cai.records import mark_done, read_jsonl
from cai.rounds import round_at, round_bounds, round_ends
from cai.stages import stage_fingerprint
from tests.fakes import ScriptedLabeler, shown_answers
from tests.test_eval_report import hand_made_run, models, scripted  # noqa: F401 (fixtures)
from tests.test_rl_stage import one_thread, save_tiny_reward_model  # noqa: F401 (one_thread: an autouse fixture)


def longer_first(text: str) -> float:
    """P(A): the longer of the two answers shown is better; grading questions get 0.7."""
    if "\nResponse (A):\n" not in text:
        return 0.7
    a, b, _ = shown_answers(text)
    return 0.5 + 0.3 * ((len(a) > len(b)) - (len(a) < len(b)))


@pytest.fixture
def labeler(monkeypatch):
    """The scripted choice labeler behind the real build_labeler; `labeler.current` counts its requests."""

    class Holder:
        current = ScriptedLabeler(prefer=longer_first)

    monkeypatch.setattr(local.LocalLabeler, "from_config", classmethod(lambda cls, cfg, shared_models=None: Holder.current))
    return Holder


def hand_made_prefs(cfg) -> list[dict]:
    """prefs/ as a finished prefs stage leaves it, without running one: two answers per prefs-split prompt,
    the longer preferred."""
    import datasets

    from cai.pairs import preference_rows
    from cai.records import save_dataset
    from cai.templates import Templates

    folder = Path(cfg.output_dir) / "prefs"
    folder.mkdir(parents=True)
    split = split_prompts(cfg.data, cfg.seed)["prefs"]
    prompts = split["red_team"] + split["helpful"]
    samples = [{"id": p.id, "kind": p.kind, "prompt": p.text, "answers": [f"Sure, here is help with {p.text[:12]}.", "No."]} for p in prompts]
    records = [{"id": f"{s['id']}:0-1", "prompt_id": s["id"], "kind": s["kind"], "prompt": s["prompt"], "answers": s["answers"],
                "label_prob": 0.8, "status": "ok", "principles": []} for s in samples]
    (folder / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    save_dataset(datasets.Dataset.from_list(preference_rows(records, Templates(cfg.templates), cfg.policy.system_prompt)), folder / "dataset")
    mark_done(folder, stage_fingerprint(cfg, "prefs"))
    return records


ROUNDS = ("rl.reward=rm", "rl.steps=3", "rl.rounds=3", "rl.batch_size=4", "rl.minibatch_size=2", "rl.learning_rate=1e-2",
          "rl.samples=0", "rl.unfinished_score=null", "labeler.cache=false", "labeler.batch_size=4", "rm.batch_size=4",
          "rm.eval_fraction=0", "rm.learning_rate=1e-3", "rm.grad_accum=2")


@pytest.fixture
def rounds_config(tiny_config, tiny_model_dir):
    """tiny_config with sft/ (the tiny model), prefs/ (hand-made) and rm/ (a random tiny reward model) finished."""

    def make(*overrides: str):
        cfg = tiny_config(*ROUNDS, *overrides)
        run = Path(cfg.output_dir)
        if not (run / "sft" / "DONE").exists():
            shutil.copytree(tiny_model_dir, run / "sft")
            mark_done(run / "sft", stage_fingerprint(cfg, "sft"))
            hand_made_prefs(cfg)
            save_tiny_reward_model(cfg)
        return cfg

    return make


def test_round_bounds_cut_the_steps_evenly_and_earlier_rounds_take_the_extra_step():
    assert round_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert round_bounds(4, 1) == [(0, 4)]
    assert round_bounds(3, 3) == [(0, 1), (1, 2), (2, 3)]
    assert [round_at(round_bounds(10, 3), s) for s in range(10)] == [1] * 4 + [2] * 3 + [3] * 3
    assert round_ends(round_bounds(10, 3)) == {4, 7}
    with pytest.raises(ValueError):
        round_bounds(2, 3)


def redraw(cfg, source: Path, k: int, samples: list[dict], tmp_path: Path) -> list[list[str]]:
    """The answers the policy in `source` draws for round `k`'s prompts, sampled as a round samples them."""
    from cai.models import load_causal_lm, load_tokenizer
    from cai.pairs import prefs_prompts, sample_answers
    from cai.seeding import stable_seed
    from cai.templates import Templates

    generator = LocalGenerator(load_causal_lm(str(source), cfg.cache_dir), load_tokenizer(str(source), cfg.cache_dir),
                               cfg.policy.batch_size, stable_seed(cfg.seed, "rl-round", k), None)
    path = tmp_path / f"redrawn-{source.name}-{k}.jsonl"
    path.unlink(missing_ok=True)
    again = sample_answers(cfg, generator, prefs_prompts(cfg), Templates(None), path, str(source))
    return [again[s["id"]]["answers"] for s in samples]


def test_reward_accuracy_counts_the_pairs_whose_label_picks_a_side():
    from cai.rounds import reward_accuracy

    def record(first, second, label, status="ok"):
        return {"prompt": "p", "answers": [first, second], "label_prob": label, "status": status}

    length = lambda prompts, answers: [float(len(a)) for a in answers]  # noqa: E731
    records = [record("long answer", "no", 0.8),  # right
               record("long answer", "no", 0.3),  # wrong
               record("same", "size", 0.9),  # a tie of the scores: half
               record("long answer", "no", 0.5),  # the label picks no side: left out
               record("long answer", "no", None, status="unparseable")]  # no label: left out
    out = reward_accuracy(length, records)
    assert out["pairs"] == 3 and out["accuracy"] == pytest.approx(1.5 / 3)
    assert out["ci"][0] <= out["accuracy"] <= out["ci"][1]
    assert reward_accuracy(length, records[3:]) == {"pairs": 0, "accuracy": None, "ci": None}


def test_each_round_labels_only_the_current_policys_pairs_and_the_reward_model_grows_by_them(rounds_config, labeler, tmp_path,
                                                                                            monkeypatch):
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification

    # PPO's backward passes, with accelerate's process-wide state as each finds it. The reward model's
    # trainer resets that state to its own (here float32 compute, rm.bf16=false, where PPO computes in bf16
    # under autocast, the GPU setting forced onto the CPU); PPO's must be set back after each update.
    states, real_backward = [], Accelerator.backward

    def backward(self, loss, **kwargs):
        if self.project_dir and Path(self.project_dir).name == "rl":  # PPO's accelerator, not the trainer's
            states.append((self.gradient_accumulation_steps, self.sync_gradients, self.mixed_precision))
        return real_backward(self, loss, **kwargs)

    monkeypatch.setattr(Accelerator, "backward", backward)
    cfg = rounds_config("policy.dtype=bfloat16", "rm.bf16=false")
    prefs_records = read_jsonl(Path(cfg.output_dir) / "prefs" / "records.jsonl")
    out = run_stage("rl", cfg)
    assert (out / "DONE").exists() and [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step-1", "step-2"]  # each round's end

    asked, labels = 0, len(prefs_records)
    for k, end_of_last_round in ((2, 1), (3, 2)):
        folder = out / "rounds" / f"round-{k}"
        samples, records = read_jsonl(folder / "samples.jsonl"), read_jsonl(folder / "records.jsonl")
        assert records and all(r["id"].startswith(f"round-{k}:") and r["round"] == k for r in records)
        # The pairs are the current policy's answers: the snapshot at the end of the previous round draws
        # exactly them again with the round's seed, and the SL-CAI model does not.
        assert all(s["policy"] == f"rl@round-{k}" for s in samples)
        drawn = [s["answers"] for s in samples]
        assert redraw(cfg, out / "snapshots" / f"step-{end_of_last_round}", k, samples, tmp_path) == drawn
        assert redraw(cfg, Path(cfg.output_dir) / "sft", k, samples, tmp_path) != drawn
        assert {tuple(r["answers"]) for r in records} <= {tuple(s["answers"]) for s in samples}
        # The reward model of round k trained on every label so far: the prefs stage's and rounds 2..k's.
        labels += sum(r["status"] == "ok" for r in records)
        rm_metrics = json.loads((folder / "rm" / "metrics.json").read_text())
        assert rm_metrics["train_pairs"] == labels
        found = json.loads((folder / "metrics.json").read_text())
        assert found["rm_accuracy_before_update"]["pairs"] == sum(r["label_prob"] != 0.5 for r in records)
        assert found["rm_accuracy_before_update"]["accuracy"] is not None
        asked += 2 * 2 * len(records)  # two principles, both orders
    assert labeler.current.usage.requests == asked  # nothing but the new pairs was asked
    # round 3's reward model continued from round 2's and moved away from it
    round2 = AutoModelForSequenceClassification.from_pretrained(out / "rounds" / "round-2" / "rm").score.weight
    round3 = AutoModelForSequenceClassification.from_pretrained(out / "rounds" / "round-3" / "rm").score.weight
    assert not torch.allclose(round2, round3)
    # PPO went on updating the policy after each reward-model update, with its own accelerate state.
    from safetensors.torch import load_file

    assert len(states) == 3 * 2 * 2 and set(states) == {(1, True, "bf16")}  # steps x epochs x minibatches

    weights = [load_file(out / "snapshots" / "step-1" / "model.safetensors"), load_file(out / "snapshots" / "step-2" / "model.safetensors"),
               load_file(out / "model.safetensors")]
    for before, after in zip(weights, weights[1:]):
        assert any(not torch.equal(before[k], after[k]) for k in before)
    summary = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [(r["round"], r["first_step"], r["last_step"]) for r in summary] == [(1, 1, 1), (2, 2, 2), (3, 3, 3)]
    assert summary[0]["labeler"]["requests"] == 0 and summary[1]["labeler"]["requests"] == 4 * summary[1]["pairs"]


def test_a_round_killed_while_labeling_resumes_without_asking_a_label_twice(rounds_config, labeler):
    cfg = rounds_config()

    class Dies(ScriptedLabeler):
        def choose(self, requests, desc=None):
            if self.usage.requests >= 2 * 4 * 4:  # two batches of 4 pairs (2 principles x 2 orders each), then "killed"
                raise KeyboardInterrupt
            return super().choose(requests, desc)

    labeler.current = Dies(prefer=longer_first)
    with pytest.raises(KeyboardInterrupt):
        run_stage("rl", cfg)
    out = Path(cfg.output_dir) / "rl"
    folder = out / "rounds" / "round-2"
    partial = read_jsonl(folder / "records.jsonl")
    samples_before = (folder / "samples.jsonl").read_text()
    assert len(partial) == 8 and not (folder / "DONE").exists() and not (out / "DONE").exists()
    assert (out / "checkpoints" / "step-1").exists()  # the round starts from the end of the one before

    labeler.current = ScriptedLabeler(prefer=longer_first)
    run_stage("rl", cfg)
    records = read_jsonl(folder / "records.jsonl")
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) and ids[:8] == [r["id"] for r in partial]
    assert (folder / "samples.jsonl").read_text() == samples_before  # nothing sampled twice
    round3 = read_jsonl(out / "rounds" / "round-3" / "records.jsonl")
    assert labeler.current.usage.requests == 4 * (len(records) - 8) + 4 * len(round3)
    usage = json.loads((folder / "labeler_usage.json").read_text())
    assert len(usage["runs"]) == 2 and usage["total"]["requests"] == 4 * len(records)  # both runs' spending

    # A finished round is never redone: the whole stage again, from a kill after its last round.
    (out / "DONE").unlink()
    labeler.current = ScriptedLabeler(prefer=longer_first)
    run_stage("rl", cfg)
    assert labeler.current.usage.requests == 0


def test_dpo_rounds_train_each_round_on_the_current_policys_pairs(rounds_config, labeler, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = rounds_config("rl.algorithm=dpo", "rl.steps=4", "rl.rounds=2", "rl.batch_size=2", "rl.learning_rate=1e-2")
    out = run_stage("rl", cfg)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == 4 and [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["rounds"][0]["dpo_pairs"] == len(read_jsonl(Path(cfg.output_dir) / "prefs" / "records.jsonl"))
    records = read_jsonl(out / "rounds" / "round-2" / "records.jsonl")
    assert records and all(r["id"].startswith("round-2:") for r in records)
    assert summary["rounds"][1]["dpo_pairs"] == sum(r["status"] == "ok" for r in records)
    assert labeler.current.usage.requests == 4 * len(records)
    # round 2 sampled the policy DPO made in round 1 (its snapshot), and training went on from it
    first = AutoModelForCausalLM.from_pretrained(out / "snapshots" / "step-2").state_dict()
    sft = AutoModelForCausalLM.from_pretrained(Path(cfg.output_dir) / "sft").state_dict()
    final = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert any(not torch.equal(first[k], sft[k]) for k in sft) and any(not torch.equal(first[k], final[k]) for k in sft)
    samples = read_jsonl(out / "rounds" / "round-2" / "samples.jsonl")
    assert redraw(cfg, out / "snapshots" / "step-2", 2, samples, tmp_path) == [s["answers"] for s in samples]


def test_a_dpo_round_with_no_pair_above_the_threshold_is_not_trained_and_the_next_one_is(rounds_config, labeler):
    """The prefs stage's labels (0.8) are all below rl.dpo_min_label_prob=0.85: round 1 keeps the SL-CAI
    model as it is (with rl.rounds=1 that is an error); round 2's labels (0.95) train it."""
    from transformers import AutoModelForCausalLM

    labeler.current = ScriptedLabeler(prefer=lambda text: 0.5 + 1.5 * (longer_first(text) - 0.5))
    cfg = rounds_config("rl.algorithm=dpo", "rl.steps=2", "rl.rounds=2", "rl.batch_size=2", "rl.learning_rate=1e-2",
                        "rl.dpo_min_label_prob=0.85")
    with pytest.raises(CaiError, match="no preference pair has label_prob >= rl.dpo_min_label_prob"):
        run_stage("rl", cfg.model_copy(update={"rl": cfg.rl.model_copy(update={"rounds": 1})}))
    out = run_stage("rl", cfg)
    rounds = json.loads((out / "rounds.json").read_text())
    assert [(r["dpo_pairs"], r["train_loss"] is None) for r in rounds] == [(0, True), (rounds[1]["dpo_pairs"], False)]
    assert rounds[1]["dpo_pairs"] > 0
    sft = AutoModelForCausalLM.from_pretrained(Path(cfg.output_dir) / "sft").state_dict()
    first = AutoModelForCausalLM.from_pretrained(out / "snapshots" / "step-1").state_dict()
    final = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(first[k], sft[k]) for k in sft) and any(not torch.equal(final[k], sft[k]) for k in sft)


# --------------------------------------------------------------------------------------------------
# Keeping the best snapshot by an independent judge


SELECT = ("rl.rounds=1", "rl.keep_snapshots=true", "rl.checkpoint_every=1", "rl.select_by=validation",
          "data.fractions={sl: 0.3, prefs: 0.3, rl: 0.2, val: 0.1, eval: 0.1}", "eval.judge.backend=local", "eval.principles_per_pair=2",
          "eval.judge.cache=false")


def test_the_snapshot_kept_is_the_best_on_the_validation_split_and_the_eval_split_is_never_read(rounds_config, monkeypatch, capsys):
    """The judge likes one snapshot's answers (step 2 of 3) and refuses to look at an eval-split prompt. A
    kill while it judges resumes without training again; another judge later chooses again, still without."""
    import cai.selection

    cfg = rounds_config(*SELECT, "eval.judge.model=judge-model")
    splits = split_prompts(cfg.data, cfg.seed)
    eval_texts = {p.text for kind in splits["eval"].values() for p in kind}
    val_texts = {p.text for kind in splits["val"].values() for p in kind}
    assert val_texts and eval_texts and not val_texts & eval_texts
    favourite: dict[str, set] = {}  # the answers of the snapshot the judge prefers, filled once they exist

    class Judge(ScriptedLabeler):
        dies = False

        def choose(self, requests, desc=None):
            for r in requests:
                if r.subject["prompt"] in eval_texts:
                    raise AssertionError(f"the judge was shown an eval-split prompt: {r.subject['prompt']!r}")
                assert r.subject["prompt"] in val_texts
            if self.dies:
                raise KeyboardInterrupt
            return super().choose(requests, desc)

    def prefer(text: str) -> float:
        a, b, _ = shown_answers(text)
        return 0.5 + 0.4 * ((a in favourite["answers"]) - (b in favourite["answers"]))

    real_write_answers = cai.selection.write_answers

    def write_answers_then_pick(cfg, sources, prompts, path):
        answers = real_write_answers(cfg, sources, prompts, path)
        favourite["answers"] = {a for (model, _), a in answers.items() if model == "rl@step-2"} - {
            a for (model, _), a in answers.items() if model != "rl@step-2"}
        assert {p.text for p in prompts} == val_texts
        return answers

    judges = [Judge(prefer=prefer)]
    monkeypatch.setattr(cai.selection, "write_answers", write_answers_then_pick)
    monkeypatch.setattr(local.LocalLabeler, "from_config", classmethod(lambda cls, cfg, shared_models=None: judges[-1]))

    judges[-1].dies = True  # killed while judging
    with pytest.raises(KeyboardInterrupt):
        run_stage("rl", cfg)
    out = Path(cfg.output_dir) / "rl"
    assert (out / "checkpoints" / "step-3").exists() and not (out / "DONE").exists()
    trained = (out / "metrics.jsonl").read_text()
    judges.append(Judge(prefer=prefer))
    run_stage("rl", cfg)
    assert "resumed from step-3: step 3" in capsys.readouterr().out and (out / "metrics.jsonl").read_text() == trained
    selection = json.loads((out / "selection.json").read_text())
    assert [c["step"] for c in selection["candidates"]] == [1, 2, 3]
    assert selection["kept"] == "rl@step-2" and selection["step"] == 2 and selection["final_step"] == 3
    scores = {c["step"]: c["score"] for c in selection["candidates"]}
    assert scores[2] == max(scores.values()) > scores[1] and scores[2] > scores[3]
    assert all(c["n"] == len(val_texts) and c["ci"][0] <= c["score"] <= c["ci"][1] for c in selection["candidates"])
    kept = (out / "snapshots" / "step-2" / "model.safetensors").read_bytes()
    assert (out / "model.safetensors").read_bytes() == kept and not (out / "checkpoints").exists()
    asked = judges[-1].usage.requests
    assert asked == 3 * len(val_texts) * 2 * 2 - 2 * 2 * sum(  # candidates x prompts x principles x orders, less identical pairs
        1 for r in read_jsonl(out / "selection" / "judgements.jsonl") if r["status"] == "identical")
    answered = read_jsonl(out / "selection" / "answers.jsonl")
    assert len(answered) == 4 * len(val_texts) and {r["prompt"] for r in answered} == val_texts  # sampled once

    # Another judge: the stage is finished, so it chooses again (asking the new judge) and trains nothing.
    judges.append(Judge(prefer=prefer))
    run_stage("rl", rounds_config(*SELECT, "eval.judge.model=another-judge-model"))
    assert "choosing again" in capsys.readouterr().out and judges[-1].usage.requests == asked
    assert (out / "metrics.jsonl").read_text() == trained


@pytest.mark.parametrize("overrides, message", [
    (("rl.select_by=validation", "rl.keep_snapshots=true", "eval.judge.backend=rules"), "needs a validation split"),
    (("rl.select_by=validation", "rl.keep_snapshots=true", "data.fractions={sl: 0.3, prefs: 0.3, rl: 0.2, val: 0.1, eval: 0.1}"),
     "needs an eval.judge that training never used"),
    (("rl.select_by=validation", "rl.rounds=1", "eval.judge.backend=rules",
      "data.fractions={sl: 0.3, prefs: 0.3, rl: 0.2, val: 0.1, eval: 0.1}"), "set rl.keep_snapshots=true"),
    (("rl.reward=tests.test_rl_stage:letter_e_reward",), "needs rl.reward=rm"),
])
def test_rounds_and_selection_refuse_what_they_cannot_do_before_writing(rounds_config, overrides, message):
    cfg = rounds_config(*overrides)
    with pytest.raises(CaiError, match=message):
        run_stage("rl", cfg)
    assert not (Path(cfg.output_dir) / "rl").exists()


def test_a_val_share_leaves_the_other_splits_alone_when_absent():
    from cai.config import load_config

    plain = split_prompts(load_config(None, []).data, 0)
    with_zero = split_prompts(load_config(None, ["data.fractions={sl: 0.4, prefs: 0.3, rl: 0.2, val: 0.0, eval: 0.1}"]).data, 0)
    assert plain == with_zero and plain["val"] == {"red_team": [], "helpful": []}
    carved = split_prompts(load_config(None, ["data.fractions={sl: 0.4, prefs: 0.3, rl: 0.15, val: 0.05, eval: 0.1}"]).data, 0)
    assert carved["sl"] == plain["sl"] and carved["prefs"] == plain["prefs"] and carved["val"]["red_team"]
    ids = [p.id for s in carved for kind in carved[s].values() for p in kind]
    assert len(ids) == len(set(ids))


# --------------------------------------------------------------------------------------------------
# The eval stage and the report


def test_eval_scores_each_round_and_the_report_shows_rounds_and_the_snapshot_kept(tmp_path, models, scripted):
    """A DPO run with rounds (no reward model: the curve has gold only) whose selection kept step 2 of 4:
    the curve drops the final policy's duplicate point and marks the kept one; the report shows each
    round's numbers beside its snapshot's gold, and every candidate's validation score."""
    from cai.stages import eval as eval_stage

    cfg = hand_made_run(tmp_path, models, "constitution=constitutions/checkable.yaml", "eval.judge.backend=rules",
                        "eval.agreement_audit=false", "rl.algorithm=dpo", "rl.steps=4", "rl.rounds=2")
    rl_dir = Path(cfg.output_dir) / "rl"
    for step, source in ((2, "initial"), (4, "rl")):
        shutil.copytree(models[source], rl_dir / "snapshots" / f"step-{step}")
    rounds = [{"round": 1, "first_step": 1, "last_step": 2, "pairs": 12, "labeled": 12, "decisive": 5, "dpo_pairs": 12,
               "train_loss": 0.61, "rm_accuracy_before_update": None, "labeler": {"requests": 0}},
              {"round": 2, "first_step": 3, "last_step": 4, "pairs": 11, "labeled": 11, "decisive": 4, "dpo_pairs": 11,
               "train_loss": 0.52, "rm_accuracy_before_update": None,
               "labeler": {"requests": 88, "cache_hits": 8, "input_tokens": 5000, "output_tokens": 88}}]
    (rl_dir / "rounds.json").write_text(json.dumps(rounds))
    candidates = [{"model": "rl@step-2", "step": 2, "n": 4, "score": 0.75, "ci": [0.5, 1.0], "win_rate": 0.75},
                  {"model": "rl@step-4", "step": 4, "n": 4, "score": 0.5, "ci": [0.25, 0.75], "win_rate": 0.5}]
    (rl_dir / "selection.json").write_text(json.dumps({
        "kept": "rl@step-2", "step": 2, "final_step": 4, "reason": "highest soft win rate against the SL-CAI model on 4 validation "
        "prompts, judged by rules:checkable", "judge": "rules:checkable", "prompts": 4, "candidates": candidates}))
    out = eval_stage.run(cfg)
    curve = json.loads((out / "metrics.json").read_text())["overoptimization"]
    assert [(p["model"], p["step"], p.get("kept")) for p in curve] == [("sft", 0, False), ("rl@step-2", 2, True), ("rl@step-4", 4, False)]
    assert all(p["proxy"] is None and 0 <= p["gold"] <= 1 for p in curve)
    md = (out / "report.md").read_text()
    assert "## Rounds of AI feedback" in md and "## The RL policy kept: the judge's choice on the validation split" in md
    round2 = next(line for line in md.splitlines() if line.startswith("| 2 | 3-4 |"))
    assert "11 (4 decisive)" in round2 and "88 (8 cached), 5088 tokens" in round2 and f"{100 * curve[2]['gold']:.0f}%" in round2
    assert "| rl@step-2 (kept) | 2 | 75.0% [50%, 100%] | 4 |" in md and "| rl@step-4 | 4 | 50.0% [25%, 75%] | 4 |" in md
    assert (out / "plots" / "overoptimization.png").stat().st_size > 1000
