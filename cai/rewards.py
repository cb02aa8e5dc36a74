"""Reward functions for the RL stage, all with one signature:

    reward_fn(prompts: list[str], answers: list[str]) -> list[float]

- `RewardModelScorer`: the trained reward model in `rm/` (a sequence-classification model), its scores
  normalised with the offsets saved beside it (mean 0, standard deviation 1 on the SFT model's own
  samples). It re-tokenizes the text with its own tokenizer, so the policy may use any. A reward model
  may have several outputs (`rm/outputs.json`): K ensemble members times P principles, output
  k * P + p being member k's reward for principle p. Called, it gives the mean of its raw outputs,
  normalised (its score); `outputs` gives every output, each normalised on its own, for PPO to combine
  (cai.rl.combine_principles, combine_members).
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
# How the outputs are laid out: {"members": K, "principles": [ids] | null, "share": "heads" | "lora"}; absent: one output.
OUTPUTS = "outputs.json"


def chat_token_ids(tokenizer, messages: list[dict], max_length: int | None = None) -> list[int]:
    """Token ids of a whole conversation, as TRL's RewardTrainer makes them (chat template, no extra
    special tokens). Too long: the start is cut, since the score is read at the last token."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_length:] if max_length else ids


def score_outputs(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8, max_length: int | None = None):
    """Raw outputs of a sequence-classification model, in input order: a float tensor [N, num_labels]."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    encoded = [chat_token_ids(tokenizer, c, max_length) for c in conversations]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    scores = None
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # right padding: the model reads its score at the last real token
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
            if scores is None:
                scores = torch.zeros(len(encoded), logits.shape[1])
            scores[torch.tensor(batch)] = logits
    return scores if scores is not None else torch.zeros(0, 1)


def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8, max_length: int | None = None) -> list[float]:
    """Raw scalar rewards of a sequence-classification model (its first output), in input order."""
    return score_outputs(model, tokenizer, conversations, batch_size, max_length)[:, 0].tolist()


def read_outputs(rm_dir: Path) -> dict:
    """A reward model's output layout (`OUTPUTS`); one member and no principles when the file is absent."""
    path = Path(rm_dir) / OUTPUTS
    layout = json.loads(path.read_text()) if path.is_file() else {}
    return {"members": int(layout.get("members", 1)), "principles": layout.get("principles"), "share": layout.get("share", "heads")}


class RewardModelScorer:
    """Normalised scores from the reward model in `rm_dir` (the rm stage's output)."""

    def __init__(self, rm_dir: str | Path, cache_dir: str | Path, device=None, batch_size: int = 8):
        import torch

        from cai.models import default_device, load_tokenizer, resolve_model

        rm_dir = Path(rm_dir).expanduser()
        norm_path = rm_dir / NORMALIZATION
        if not norm_path.is_file():
            raise CaiError(f"{rm_dir} has no {NORMALIZATION}: it is not the output of a finished rm stage")
        norm = json.loads(norm_path.read_text())
        self.mean, self.std = float(norm["mean"]), float(norm["std"])
        if not math.isfinite(self.mean) or not (math.isfinite(self.std) and self.std > 0):
            raise CaiError(f"{norm_path}: needs a finite mean and a positive std, got {norm}")
        layout = read_outputs(rm_dir)
        self.members, self.principles, self.share = layout["members"], layout["principles"], layout["share"]
        per_output = norm.get("outputs") or {"mean": [self.mean], "std": [self.std]}
        self.output_mean = torch.tensor(per_output["mean"], dtype=torch.float32)
        self.output_std = torch.tensor(per_output["std"], dtype=torch.float32)
        # The members' disagreement on the SFT model's samples: what the rl stage's monitor compares to.
        self.baseline_disagreement = norm.get("disagreement")
        scoring = json.loads((rm_dir / SCORING).read_text()) if (rm_dir / SCORING).is_file() else {}
        self.system_prompt = scoring.get("system_prompt")
        self.max_length = scoring.get("max_length")
        template = scoring.get("answer_template")
        self.templates = Templates.from_sources({ANSWER_TEMPLATE: template}) if template is not None else None
        self.batch_size = batch_size
        resolved = resolve_model(str(rm_dir), cache_dir)
        self.tokenizer = load_tokenizer(resolved, cache_dir)
        self.device = torch.device(device) if device is not None else default_device()
        self.model = load_reward_model(resolved, layout).to(self.device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        n = self.members * len(self.principles or [None])
        if self.output_mean.numel() != n:
            raise CaiError(f"{norm_path}: {self.output_mean.numel()} output offsets for a reward model with {n} outputs")

    def raw_outputs(self, prompts: list[str], answers: list[str]):
        """Every output before normalisation: [N, members * principles]."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        if self.templates is None:  # an rm/ made before the answer template was kept beside it
            conversations = [conversation(p, a, self.system_prompt) for p, a in zip(prompts, answers)]
        else:
            conversations = [policy_input(self.templates, p, self.system_prompt, a) for p, a in zip(prompts, answers)]
        return score_outputs(self.model, self.tokenizer, conversations, self.batch_size, self.max_length)

    def outputs(self, prompts: list[str], answers: list[str]):
        """Every output, each normalised on the SFT model's samples: [N, K members, P principles] (P = 1 without)."""
        raw = self.raw_outputs(prompts, answers)
        return ((raw - self.output_mean) / self.output_std).view(len(answers), self.members, -1)

    def raw(self, prompts: list[str], answers: list[str]) -> list[float]:
        """Scores before normalisation: the mean of the raw outputs (the only output, for most reward models)."""
        return self.raw_outputs(prompts, answers).mean(dim=1).tolist()

    def __call__(self, prompts: list[str], answers: list[str]) -> list[float]:
        return [(r - self.mean) / self.std for r in self.raw(prompts, answers)]


def load_reward_model(folder: str | Path, layout: dict):
    """The sequence-classification model of a reward-model folder (its LoRA members, when it has them)."""
    from transformers import AutoModelForSequenceClassification

    if layout["share"] == "lora" and layout["members"] * len(layout["principles"] or [None]) > 1:
        members = Path(folder) / "members"
        return LoraMembers.load(folder, [members / f"m{k}" for k in range(layout["members"])], len(layout["principles"] or [None]))
    return AutoModelForSequenceClassification.from_pretrained(folder)


class LoraMembers:
    """K reward-model members that are LoRA adapters (each with its own P-output head) on one base model,
    read as one model with K * P outputs: each call runs the base once per adapter and puts the members'
    outputs side by side (member k's at k * P ... k * P + P - 1)."""

    def __init__(self, peft_model, names: list[str]):
        self.peft, self.names = peft_model, names
        self.config = peft_model.get_base_model().config  # the base's (pad token, num_labels = P per member)

    @classmethod
    def load(cls, base_folder: str | Path, adapter_dirs: list[Path], principles: int) -> "LoraMembers":
        """The base model in `base_folder` with the adapters in `adapter_dirs` as members m0, m1, ..., each with
        a `principles`-output head."""
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        base = AutoModelForSequenceClassification.from_pretrained(str(base_folder), num_labels=principles)
        model = PeftModel.from_pretrained(base, str(adapter_dirs[0]), adapter_name="m0")
        for k, folder in enumerate(adapter_dirs[1:], start=1):
            model.load_adapter(str(folder), adapter_name=f"m{k}")
        return cls(model, [f"m{k}" for k in range(len(adapter_dirs))])

    def __call__(self, input_ids, attention_mask):
        import torch
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = []
        for name in self.names:
            self.peft.set_adapter(name)
            logits.append(self.peft(input_ids=input_ids, attention_mask=attention_mask).logits)
        return SequenceClassifierOutput(logits=torch.cat(logits, dim=1))

    def parameters(self):
        return self.peft.parameters()

    def to(self, device) -> "LoraMembers":
        self.peft.to(device)
        return self

    def eval(self) -> "LoraMembers":
        self.peft.eval()
        return self

    def member(self, k: int):
        """Member k as a plain sequence-classification model (its adapter merged into a copy of the base)."""
        import copy

        model = copy.deepcopy(self.peft)
        model.set_adapter(self.names[k])
        return model.merge_and_unload()

    @staticmethod
    def save(folder: Path, base_folder: Path, principles: int, adapter_dirs: list[Path], tokenizer) -> None:
        """A LoRA-members reward model to `folder`: the base (from `base_folder`, with a `principles`-output
        head its members do not use) and tokenizer, each adapter in `folder/members/mK`."""
        import shutil

        from transformers import AutoModelForSequenceClassification

        folder, base_folder = Path(folder), Path(base_folder)
        if folder.resolve() != base_folder.resolve():  # continuing in place: the frozen base is there already
            base = AutoModelForSequenceClassification.from_pretrained(str(base_folder), num_labels=principles)
            base.config.pad_token_id = tokenizer.pad_token_id
            base.save_pretrained(str(folder))
            tokenizer.save_pretrained(str(folder))
        for k, source in enumerate(adapter_dirs):
            target = folder / "members" / f"m{k}"
            if source.resolve() != target.resolve():
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(source, target)


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
