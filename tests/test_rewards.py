"""Reward functions for the RL stage: the reward-model scorer (normalised, re-tokenized as TRL tokenizes) and
the direct labeler reward (d-RLAIF: probability-weighted 1-10 rating scaled to [-1, 1])."""

from __future__ import annotations

import json

import pytest
import torch

from cai.constitution import load_constitution
from cai.chat import conversation
from cai.errors import CaiError
from cai.labelers.base import Choice
from cai.labelers.local import LocalGenerator
from cai.rewards import (
    SCORE_OPTIONS,
    SCORE_PREFIX,
    DirectLabelerReward,
    RewardModelScorer,
    chat_token_ids,
    expected_score,
)
from cai.templates import Templates
from tests.conftest import ROOT

TINY = load_constitution(ROOT / "constitutions/tiny.yaml")


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("rm")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "normalization.json").write_text(json.dumps({"mean": 0.25, "std": 2.0}))
    return folder


def test_scorer_normalises_and_matches_single_unpadded_passes(rm_dir, tmp_path):
    scorer = RewardModelScorer(rm_dir, tmp_path)
    prompts = ["How do I bake bread?", "Hi", "Tell me a story about a cat."]
    answers = ["Mix flour and water, then bake.", "Hello!", "Once upon a time a cat met a dog."]
    scores = scorer(prompts, answers)
    for prompt, answer, score in zip(prompts, answers, scores):
        ids = chat_token_ids(scorer.tokenizer, conversation(prompt, answer))
        with torch.no_grad():
            raw = scorer.model(torch.tensor([ids])).logits[0, 0].item()
        assert score == pytest.approx((raw - 0.25) / 2.0, abs=1e-5)


def test_scorer_tokenizes_as_trl_reward_trainer_does(rm_dir):
    from transformers import AutoTokenizer
    from trl.data_utils import _tokenize

    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    messages = conversation("How do I bake bread?", "Mix flour and water.")
    assert chat_token_ids(tokenizer, messages) == _tokenize(tokenizer, messages)["input_ids"]


def test_scorer_refuses_a_folder_without_normalisation(tmp_path):
    with pytest.raises(CaiError, match="normalization.json"):
        RewardModelScorer(tmp_path, tmp_path)


def test_expected_score_scale():
    one_hot = lambda n: [1.0 if i == n - 1 else 0.0 for i in range(10)]  # noqa: E731
    assert expected_score(one_hot(10)) == pytest.approx(1.0)
    assert expected_score(one_hot(1)) == pytest.approx(-1.0)
    assert expected_score([0.1] * 10) == pytest.approx(0.0)
    assert expected_score(one_hot(7)) == pytest.approx((7 - 5.5) / 4.5)


class RatingLabeler:
    id = "fake:rater"

    def __init__(self):
        from cai.labelers.base import Usage

        self.usage = Usage()
        self.requests = []

    def choose(self, requests, desc=None):
        self.requests += requests
        out = []
        for r in requests:
            text = r.messages[-1]["content"]
            if "UNREADABLE" in text:
                out.append(Choice(probs=None, status="unparseable", raw="great"))
            elif "polite" in text:
                out.append(Choice(probs=[0.0] * 8 + [0.5, 0.5], method="logits"))  # 9 and 10
            else:
                out.append(Choice(probs=[0.5, 0.5] + [0.0] * 8, method="logits"))  # 1 and 2
        return out


def test_direct_reward_weights_the_rating_and_counts_the_unrated(tiny_config):
    cfg = tiny_config()
    labeler = RatingLabeler()
    reward = DirectLabelerReward(labeler, TINY, Templates(), cfg)
    values = reward(["q1", "q2", "q3"], ["a polite answer", "rude", "UNREADABLE"])
    assert values == pytest.approx([(9.5 - 5.5) / 4.5, (1.5 - 5.5) / 4.5, 0.0])
    assert (reward.rated, reward.unrated) == (2, 1)
    request = labeler.requests[0]
    assert request.options == SCORE_OPTIONS and request.answer_prefix == SCORE_PREFIX
    text = request.messages[-1]["content"]
    assert "a polite answer" in text and all(p.question in text for p in TINY.comparisons)


def test_direct_reward_on_the_local_labeler(tiny_config):
    from tests.tiny import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    generator = LocalGenerator(make_tiny_model(tokenizer), tokenizer)

    class Local:
        id = "local:tiny"

        def choose(self, requests, desc=None):
            return generator.option_probs(requests)

    reward = DirectLabelerReward(Local(), TINY, Templates(), tiny_config())
    values = reward(["How do I bake bread?", "Hi"], ["Mix flour and water.", "Hello"])
    assert len(values) == 2 and all(-1.0 <= v <= 1.0 for v in values) and reward.unrated == 0
