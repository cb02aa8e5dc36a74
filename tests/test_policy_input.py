"""One definition of each thing: the policy's input (answer.jinja) is built one way by every stage, so an
edited template reaches what SFT trains on and what RL samples from; one refusal test, one seed function,
two distinct-n measures with two names."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from cai.stages import sft, sl
from tests.fakes import ScriptedLabeler

PIRATE = "Answer as a pirate would: {{ prompt }}\n"


@pytest.fixture
def pirate_templates(tmp_path) -> Path:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "answer.jinja").write_text(PIRATE)
    return folder


def test_an_edited_answer_template_changes_what_sft_trains_on(tiny_config, pirate_templates, monkeypatch):
    monkeypatch.setattr(sl, "build_labeler", lambda cfg, shared_models=None, role=None: ScriptedLabeler())
    cfg = tiny_config(f"templates={pirate_templates}", "sl.helpful_ratio=0.5")
    sl.run(cfg)
    trained_on = {}

    def capture(cfg, model, tokenizer, dataset, output_dir):
        trained_on["dataset"] = dataset
        raise KeyboardInterrupt  # what SFT would train on is all this test needs

    monkeypatch.setattr(sft, "build_trainer", capture)
    with pytest.raises(KeyboardInterrupt):
        sft.run(cfg)
    rows = trained_on["dataset"]
    assert len(rows) > 0
    for row in rows:
        [user] = [m for m in row["prompt"] if m["role"] == "user"]
        assert user["content"].startswith("Answer as a pirate would: ")
    # the SL dataset holds the same turn the policy answered when SL sampled it
    saved = datasets.load_from_disk(str(Path(cfg.output_dir) / "sl" / "dataset"))
    assert all(m[0]["content"].startswith("Answer as a pirate would: ") for m in saved["messages"])


def test_an_edited_answer_template_changes_what_rl_samples_from(tiny_config, pirate_templates):
    from cai.models import load_tokenizer
    from cai.stages import rl, rl_trl

    plain, pirate = tiny_config(), tiny_config(f"templates={pirate_templates}")
    tokenizer = load_tokenizer(plain.policy.model, plain.cache_dir)
    before = rl.rl_prompts(plain, tokenizer)
    after = rl.rl_prompts(pirate, tokenizer)
    assert [text for text, _, _ in before] == [text for text, _, _ in after]  # the same user prompts...
    for (text, chat_before, _), (_, chat_after, _) in zip(before, after):
        assert "Answer as a pirate would" not in chat_before
        assert f"Answer as a pirate would: {text}" in chat_after  # ...asked through the edited template
    # TRL's trainers (dpo/grpo/rloo) get the same turn
    dataset = rl_trl.prompt_dataset(pirate)
    assert all(row[-1]["content"].startswith("Answer as a pirate would: ") for row in dataset["prompt"])


def test_the_reward_model_reads_the_policy_input_it_was_trained_on(tmp_path, tiny_config):
    import json

    from cai.chat import conversation
    from cai.rewards import RewardModelScorer, score_conversations
    from tests.test_rl_stage import save_tiny_reward_model

    rm_dir = save_tiny_reward_model(tiny_config())
    (rm_dir / "scoring.json").write_text(json.dumps({"system_prompt": None, "max_length": 128, "answer_template": PIRATE}))
    scorer = RewardModelScorer(rm_dir, tmp_path / "cache", device="cpu")
    asked = conversation("Answer as a pirate would: Where is the gold?", "Arr, buried.")
    [expected] = score_conversations(scorer.model, scorer.tokenizer, [asked])
    [raw_prompt] = score_conversations(scorer.model, scorer.tokenizer, [conversation("Where is the gold?", "Arr, buried.")])
    assert scorer.raw(["Where is the gold?"], ["Arr, buried."]) == [pytest.approx(expected)]
    assert expected != pytest.approx(raw_prompt)


def test_one_refusal_test_one_seed_function_two_distinct_measures():
    import cai.labelers.local as local
    import cai.rl as rl_maths
    import cai.winrates as winrates
    import cai.eval_metrics as eval_metrics
    import cai.labelers.api_common as api_common
    import cai.labelers.parsing as parsing
    import cai.labelers.rules as rules
    import cai.policy_models as policy_models
    from cai.checks import refuses
    from cai.seeding import stable_seed
    from cai.stages import rl

    # one refusal predicate, with the checks: the RL monitor counts what the evaluation, the policy
    # samplers, the rules judge and the labelers' own refusal test count
    assert rl.is_refusal is eval_metrics.refuses is policy_models.refuses is api_common.refuses is refuses
    from cai.checks import refusal_detector
    from cai.constitution import load_constitution

    assert rules.refusal_detector is refusal_detector  # the rules judge's over-refusal grade: the same predicate
    detector = refusal_detector(load_constitution("constitutions/checkable.yaml"))
    for answer in ("I apologise, but no.", "No.", "I'm sorry for any misunderstanding.", "I can't help with that."):
        assert detector("p", answer) == refuses(answer)
    assert not hasattr(parsing, "is_refusal") and not hasattr(parsing, "REFUSAL_OPENINGS")
    assert rl.stable_seed is local.stable_seed is stable_seed
    assert not hasattr(winrates, "distinct_n") and not hasattr(rl_maths, "distinct_n")
    assert rl_maths.distinct_token_ngrams([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)
    assert winrates.distinct_word_ngrams(["a b a b"], 2) == pytest.approx(2 / 3)
