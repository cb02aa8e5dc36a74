"""Training a reward model on preference labels: what the rm stage does, as a function any stage can call
(the rm stage once; the rl stage between rounds, to update the reward model on the labels so far).

`train_reward_model` takes a preference dataset (TRL's conversational `prompt`/`chosen`/`rejected`
plus the soft label `label_prob`), starts from the SFT model (a fresh scalar head) or from a finished
reward model (its weights and head, trained further), and writes a reward model in the rm/ layout that
`cai.rewards.RewardModelScorer` reads:

    config.json, model weights, tokenizer   the sequence-classification model
    normalization.json                      mean and std of the raw reward over the policy's own samples
    scoring.json                            how the reward model reads text (system prompt, max length,
                                            the answer template)
    metrics.json                            training and held-out metrics

The loss is the binary cross-entropy between sigma(r_chosen - r_rejected) and the soft label
(`soft_label_loss`), or TRL's hard Bradley-Terry loss with `rm.hard_labels`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import statistics
from pathlib import Path

import torch

from cai.chat import ANSWER_TEMPLATE, policy_input
from cai.config import Config
from cai.errors import CaiError
from cai.preferences import expected_calibration_error
from cai.records import atomic_write_json
from cai.rewards import NORMALIZATION, SCORING, score_conversations
from cai.templates import Templates
from cai.training import last_checkpoint, lora_config, save_trained, trainer_arguments


def soft_label_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, label_prob: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy between sigma(r_chosen - r_rejected) and `label_prob`, averaged over the batch.

    -[p log sigma(d) + (1 - p) log sigma(-d)] with d = r_chosen - r_rejected; with p = 1 it is the
    Bradley-Terry loss -log sigma(d). Shapes: [batch] each.
    """
    return torch.nn.functional.binary_cross_entropy_with_logits(rewards_chosen - rewards_rejected, label_prob.to(rewards_chosen.dtype))


def soft_label_trainer(*args, **kwargs):
    """TRL's RewardTrainer with the soft-label loss.

    RewardTrainer has no soft-label loss, so this is the smallest extension that works: keep the
    `label_prob` column through TRL's column filter and collator, and in `compute_loss` let TRL run the
    model and log its metrics, then replace its hard loss with `soft_label_loss`.
    """
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class SoftLabelCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            batch["label_prob"] = torch.tensor([e["label_prob"] for e in examples], dtype=torch.float)
            return batch

    class SoftLabelRewardTrainer(RewardTrainer):
        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "label_prob" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "label_prob"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            label_prob = inputs.pop("label_prob")
            _, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            loss = soft_label_loss(chosen, rejected, label_prob)
            if self.args.center_rewards_coefficient is not None:
                loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
            return (loss, outputs) if return_outputs else loss

    processing_class = kwargs["processing_class"]
    kwargs.setdefault("data_collator", SoftLabelCollator(pad_token_id=processing_class.pad_token_id))
    return SoftLabelRewardTrainer(*args, **kwargs)


def split_dataset(dataset, eval_fraction: float, seed: int):
    """(train, held-out), seeded and split by prompt: every pair of a prompt lands on the same side, so
    that held-out accuracy is measured on prompts the model never trained on (with several samples per
    prompt, a split by pair would let it see the same prompt, often the same answers, in training).
    About `eval_fraction` of the pairs are held out; none when the fraction or the data is too small."""
    prompts: dict[str, list[int]] = {}
    for index, prompt in enumerate(dataset["prompt"]):
        prompts.setdefault(json.dumps(prompt, sort_keys=True), []).append(index)
    groups = sorted(prompts.values())
    random.Random(f"{seed}:rm-split").shuffle(groups)
    target = min(int(round(eval_fraction * len(dataset))), len(dataset) - 1)
    held_out: list[int] = []
    for group in groups[:-1]:  # at least one prompt trains
        if len(held_out) >= target:
            break
        held_out += group
    if not held_out:
        return dataset, dataset.select([])
    kept = set(held_out)
    return dataset.select([i for i in range(len(dataset)) if i not in kept]), dataset.select(sorted(held_out))


def distribution(values: list[float]) -> dict:
    ordered = sorted(values)
    if not ordered:
        return {}

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "n": len(ordered),
        "mean": statistics.fmean(ordered),
        "std": statistics.pstdev(ordered),
        "min": ordered[0],
        "p10": quantile(0.1),
        "p50": quantile(0.5),
        "p90": quantile(0.9),
        "max": ordered[-1],
    }


def held_out_metrics(model, tokenizer, dataset, cfg: Config, mean: float, std: float) -> dict:
    """Accuracy, calibration and reward distribution of the reward model on held-out pairs."""
    if len(dataset) == 0:
        return {"pairs": 0}
    chosen = score_conversations(model, tokenizer, [r["prompt"] + r["chosen"] for r in dataset], cfg.rm.batch_size, cfg.rm.max_length)
    rejected = score_conversations(model, tokenizer, [r["prompt"] + r["rejected"] for r in dataset], cfg.rm.batch_size, cfg.rm.max_length)
    labels = list(dataset["label_prob"]) if "label_prob" in dataset.column_names else [1.0] * len(dataset)
    predicted = [1.0 / (1.0 + math.exp(-(c - r))) for c, r in zip(chosen, rejected)]
    eps = 1e-7
    return {
        "pairs": len(dataset),
        "accuracy": sum((c > r) + 0.5 * (c == r) for c, r in zip(chosen, rejected)) / len(dataset),
        "soft_label_loss": -statistics.fmean(
            p * math.log(max(q, eps)) + (1 - p) * math.log(max(1 - q, eps)) for p, q in zip(labels, predicted)
        ),
        "mean_abs_error_vs_label_prob": statistics.fmean(abs(q - p) for p, q in zip(labels, predicted)),
        # the model's confidence against the soft labels (outcome = the labeler's P(chosen better))
        "expected_calibration_error": expected_calibration_error(predicted, labels),
        # ... and against the labeler's hard choices (chosen always wins)
        "expected_calibration_error_hard": expected_calibration_error(predicted, [1.0] * len(predicted)),
        "rewards_chosen": distribution([(c - mean) / std for c in chosen]),
        "rewards_rejected": distribution([(r - mean) / std for r in rejected]),
    }


def train_reward_model(
    cfg: Config,
    dataset,
    out_dir: Path,
    *,
    start_from: Path,
    normalize_on: list[tuple[str, str]],
    records: list[dict] | None = None,
    checkpoints: Path | None = None,
) -> dict:
    """Train a reward model on `dataset` and write it to `out_dir` in the rm/ layout; return its metrics.

    Args:
        cfg: the run's config; `cfg.rm` says how to train (epochs, learning rate, batch size, hard or
            soft labels, LoRA, `rm.eval_fraction` of the pairs held out by prompt), `cfg.policy` and
            `cfg.templates` how the policy's input is rendered, `cfg.seed` the split and the trainer.
        dataset: a `datasets.Dataset` with the columns `prompt`, `chosen`, `rejected` (TRL's
            conversational preference format, as `prefs/dataset/` holds them) and `label_prob`
            (P(chosen better), needed unless `rm.hard_labels`); an `id` column names each pair's record.
        out_dir: where the reward model goes (created). It may be `start_from` itself: the model is
            loaded before anything is written.
        start_from: an SFT model folder (a fresh scalar head is put on it) or a finished reward-model
            folder (training continues from its weights and head).
        normalize_on: (user prompt text, answer) pairs, usually the policy's own samples: the reward is
            normalised to mean 0 and standard deviation 1 over them.
        records: the preference records (`prefs/records.jsonl` rows, `cai.preferences`) of the dataset's
            pairs, matched by `id`; they hold each principle's label, for reward models with one output
            per principle. None when the reward model has one output.
        checkpoints: the trainer's checkpoint folder (default `out_dir/checkpoints`); a killed call with
            the same arguments resumes from the last checkpoint there; it is removed at the end.

    Returns:
        the metrics written to `out_dir/metrics.json`: train_pairs, train_loss, steps, loss, held_out
        (accuracy, calibration, reward distribution on the held-out pairs), normalization,
        sft_samples_normalized.
    """
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from cai.models import default_device, load_tokenizer

    out_dir, start_from = Path(out_dir), Path(start_from)
    checkpoints = Path(checkpoints) if checkpoints is not None else out_dir / "checkpoints"
    templates = Templates(cfg.templates)

    # Held-out pairs, split by prompt.
    train, held_out = split_dataset(dataset, cfg.rm.eval_fraction, cfg.seed)
    columns = ["prompt", "chosen", "rejected"] + ([] if cfg.rm.hard_labels else ["label_prob"])
    train = train.select_columns(columns)

    # The model with a scalar head (a fresh one on the SFT model; the reward model's own when continuing).
    tokenizer = load_tokenizer(str(start_from), cfg.cache_dir)
    model = AutoModelForSequenceClassification.from_pretrained(str(start_from), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(default_device())
    args = RewardConfig(**trainer_arguments(cfg.rm, checkpoints, cfg.seed, lr_scheduler="linear", dtype=cfg.policy.dtype))
    peft_config = lora_config(cfg.rm, "SEQ_CLS")
    make = RewardTrainer if cfg.rm.hard_labels else soft_label_trainer
    trainer = make(model=model, args=args, train_dataset=train, processing_class=tokenizer, peft_config=peft_config)
    if len(trainer.train_dataset) == 0:
        raise CaiError(f"rm: every training pair is longer than rm.max_length={cfg.rm.max_length} tokens; raise it")
    result = trainer.train(resume_from_checkpoint=last_checkpoint(checkpoints))
    trained = trainer.model
    if cfg.rm.lora:
        trained = trained.merge_and_unload()
    trained.eval()

    # Normalisation on the policy's own samples.
    raw = score_conversations(
        trained, tokenizer, [policy_input(templates, p, cfg.policy.system_prompt, a) for p, a in normalize_on],
        cfg.rm.batch_size, cfg.rm.max_length,
    )
    mean = statistics.fmean(raw) if raw else 0.0
    std = statistics.pstdev(raw) if len(raw) > 1 else 1.0
    std = std if std > 1e-8 else 1.0

    # Held-out metrics; the model, tokenizer and offsets to out_dir.
    metrics = {
        "train_pairs": len(trainer.train_dataset),
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "loss": "hard Bradley-Terry" if cfg.rm.hard_labels else "soft-label cross-entropy",
        "started_from": str(start_from),
        "held_out": held_out_metrics(trained, tokenizer, held_out, cfg, mean, std),
        "normalization": {"samples": len(raw), "mean": mean, "std": std},
        "sft_samples_normalized": distribution([(r - mean) / std for r in raw]),
    }
    trained.config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    save_trained(trainer, trained, tokenizer, out_dir, lora=cfg.rm.lora)
    atomic_write_json(out_dir / NORMALIZATION, {"mean": mean, "std": std})
    atomic_write_json(
        out_dir / SCORING,
        {"system_prompt": cfg.policy.system_prompt, "max_length": cfg.rm.max_length, "answer_template": templates.source(ANSWER_TEMPLATE)},
    )
    atomic_write_json(out_dir / "metrics.json", metrics)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return metrics
