"""Reward functions for the RL stage, all with one signature:

    reward_fn(prompts: list[str], answers: list[str]) -> list[float]

- `RewardModelScorer`: the trained reward model in `rm/` (a sequence-classification model with one
  output), its scores normalised with the offsets saved beside it (mean 0, standard deviation 1 on the
  SFT model's own samples). It re-tokenizes the text with its own tokenizer, so the policy may use any.
- `DirectLabelerReward` (d-RLAIF, Lee et al. 2023): no reward model; the labeler rates each answer
  on ten levels, 0 to 9, against the constitution (`prompts/score.jinja`), the reward is the
  probability-weighted rating scaled to [-1, 1]. The levels are single digits so that no label is the
  start of another: on "1".."10" a server whose tokenizer splits digits writes "(10)" as "(", "1",
  "0", ")", and the log-probabilities at the first digit would read a confident 10 as a 1. It goes through the labeler protocol, so the answer cache and request and
  cost budgets apply as for every labeler call.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from cai.chat import ANSWER_TEMPLATE, conversation, policy_input
from cai.errors import CaiError
from cai.labelers.base import ChoiceRequest, Labeler
from cai.templates import Templates

NORMALIZATION = "normalization.json"
# How the reward model reads text: {"system_prompt": str | None, "max_length": int, "answer_template": str},
# the last the text of the answer.jinja that built the policy's input it was trained on.
SCORING = "scoring.json"


def chat_token_ids(tokenizer, messages: list[dict], max_length: int | None = None) -> list[int]:
    """Token ids of a whole conversation, as TRL's RewardTrainer makes them (chat template, no extra
    special tokens). Too long: the start is cut, since the score is read at the last token."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_length:] if max_length else ids


def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8, max_length: int | None = None) -> list[float]:
    """Raw scalar rewards of a sequence-classification model with one output, in input order."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    encoded = [chat_token_ids(tokenizer, c, max_length) for c in conversations]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    scores: list[float] = [0.0] * len(encoded)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # right padding: the model reads its score at the last real token
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float()
            for row, i in enumerate(batch):
                scores[i] = float(logits[row])
    return scores


class RewardModelScorer:
    """Normalised scores from the reward model in `rm_dir` (the rm stage's output)."""

    def __init__(self, rm_dir: str | Path, cache_dir: str | Path, device=None, batch_size: int = 8):
        import torch
        from transformers import AutoModelForSequenceClassification

        from cai.models import default_device, load_tokenizer, resolve_model

        rm_dir = Path(rm_dir).expanduser()
        norm_path = rm_dir / NORMALIZATION
        if not norm_path.is_file():
            raise CaiError(f"{rm_dir} has no {NORMALIZATION}: it is not the output of a finished rm stage")
        norm = json.loads(norm_path.read_text())
        self.mean, self.std = float(norm["mean"]), float(norm["std"])
        if not math.isfinite(self.mean) or not (math.isfinite(self.std) and self.std > 0):
            raise CaiError(f"{norm_path}: needs a finite mean and a positive std, got {norm}")
        scoring = json.loads((rm_dir / SCORING).read_text()) if (rm_dir / SCORING).is_file() else {}
        self.system_prompt = scoring.get("system_prompt")
        self.max_length = scoring.get("max_length")
        template = scoring.get("answer_template")
        self.templates = Templates.from_sources({ANSWER_TEMPLATE: template}) if template is not None else None
        self.batch_size = batch_size
        resolved = resolve_model(str(rm_dir), cache_dir)
        self.tokenizer = load_tokenizer(resolved, cache_dir)
        self.device = torch.device(device) if device is not None else default_device()
        self.model = AutoModelForSequenceClassification.from_pretrained(resolved).to(self.device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def raw(self, prompts: list[str], answers: list[str]) -> list[float]:
        """Scores before normalisation."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        if self.templates is None:  # an rm/ made before the answer template was kept beside it
            conversations = [conversation(p, a, self.system_prompt) for p, a in zip(prompts, answers)]
        else:
            conversations = [policy_input(self.templates, p, self.system_prompt, a) for p, a in zip(prompts, answers)]
        return score_conversations(self.model, self.tokenizer, conversations, self.batch_size, self.max_length)

    def __call__(self, prompts: list[str], answers: list[str]) -> list[float]:
        return [(r - self.mean) / self.std for r in self.raw(prompts, answers)]


SCORE_OPTIONS = tuple(str(n) for n in range(10))  # "0".."9": prefix-free, one character each
SCORE_PREFIX = "Rating: ("


def expected_score(probs: list[float]) -> float:
    """The probability-weighted rating over the ten levels 0..9, scaled to [-1, 1] (0 -> -1, 9 -> 1)."""
    total = sum(probs)
    mean = sum(n * p for n, p in enumerate(probs)) / total
    return (mean - 4.5) / 4.5


class DirectLabelerReward:
    """d-RLAIF: the labeler's probability-weighted 0-9 rating of each answer, scaled to [-1, 1].

    The rating prompt lists the constitution's comparison questions as the criteria. An answer the
    labeler could not rate (failed or unreadable) gets 0, the middle of the scale, and is counted in
    `unrated`; `rated` counts the others.
    """

    def __init__(self, labeler: Labeler, constitution, templates, cfg):
        if not constitution.comparisons:
            raise CaiError(f"constitution '{constitution.name}' has no comparison principles to rate answers by")
        self.labeler = labeler
        self.templates = templates
        self.principles = [p.question for p in constitution.comparisons]
        self.system_prompt = cfg.policy.system_prompt
        self.rated = 0
        self.unrated = 0
        self.templates.render("score.jinja", conversation=conversation("x"), response="y", principles=self.principles)

    def requests(self, prompts: list[str], answers: list[str]) -> list[ChoiceRequest]:
        return [
            ChoiceRequest(
                [{"role": "user", "content": self.templates.render(
                    "score.jinja", conversation=conversation(p, None, self.system_prompt), response=a, principles=self.principles
                )}],
                options=SCORE_OPTIONS,
                answer_prefix=SCORE_PREFIX,
                subject={"job": "score", "prompt": p, "answers": [a]},
            )
            for p, a in zip(prompts, answers)
        ]

    def __call__(self, prompts: list[str], answers: list[str]) -> list[float]:
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        rewards = []
        for choice in self.labeler.choose(self.requests(prompts, answers), desc=None):
            probs = choice.probs
            if choice.status != "ok" or not probs or len(probs) != len(SCORE_OPTIONS) or sum(probs) <= 0:
                self.unrated += 1
                rewards.append(0.0)
            else:
                self.rated += 1
                rewards.append(expected_score(probs))
        return rewards
