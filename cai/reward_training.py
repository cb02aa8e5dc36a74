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
    outputs.json                            with several outputs: how they are laid out

The loss is the binary cross-entropy between sigma(r_chosen - r_rejected) and the soft label
(`soft_label_loss`), or TRL's hard Bradley-Terry loss with `rm.hard_labels`.

Several outputs (`rm.ensemble` members K, `rm.per_principle`: one per comparison principle, P):
- with `rm.ensemble_share=heads` the model has K * P score outputs on one backbone (output k * P + p is
  member k's reward for principle p), trained together: each member on its own bootstrap resample of
  the pairs (Poisson(1) weights per pair, seeded by the pair's id), each principle on that principle's
  label (`principle_labels`), masked where the principle was not asked (`ensemble_soft_label_loss`);
- with `rm.ensemble_share=lora` each member is a LoRA adapter with its own P-output head on the frozen
  SFT model, trained one after another on its bootstrap resample; the folder holds the base model and
  `members/m0`, `members/m1`, ... (the adapters).
Each output is normalised on the policy's samples on its own (normalization.json "outputs"); the
reward model's score is the mean of its raw outputs, normalised too ("mean", "std"), and the members'
disagreement on those samples is kept ("disagreement") for the rl stage's monitor.
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
from cai.rewards import NORMALIZATION, OUTPUTS, SCORING, LoraMembers, read_outputs, score_outputs
from cai.rl import member_disagreement
from cai.seeding import stable_seed
from cai.templates import Templates
from cai.training import last_checkpoint, lora_config, save_trained, trainer_arguments


def soft_label_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, label_prob: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy between sigma(r_chosen - r_rejected) and `label_prob`, averaged over the batch.

    -[p log sigma(d) + (1 - p) log sigma(-d)] with d = r_chosen - r_rejected; with p = 1 it is the
    Bradley-Terry loss -log sigma(d). Shapes: [batch] each.
    """
    return torch.nn.functional.binary_cross_entropy_with_logits(rewards_chosen - rewards_rejected, label_prob.to(rewards_chosen.dtype))


def ensemble_soft_label_loss(chosen: torch.Tensor, rejected: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor,
                             member_weights: torch.Tensor) -> torch.Tensor:
    """The soft-label loss of K members with P outputs each, averaged so that one member with one output
    and weight 1 is `soft_label_loss`.

    loss = 1/K sum_k 1/B sum_b w[b, k] * mean_{p: mask[b, p]} BCE(chosen[b, k, p] - rejected[b, k, p], labels[b, p])
    (a pair with no labelled principle adds nothing).

    Args:
        chosen, rejected: [B, K, P] rewards of the chosen and the rejected answer.
        labels: [B, P] P(chosen better) under each principle.
        label_mask: [B, P] bool, where a principle has a label.
        member_weights: [B, K] each member's bootstrap weight of each pair.
    Returns:
        a scalar.
    """
    targets = labels.to(chosen.dtype).unsqueeze(1).expand_as(chosen)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(chosen - rejected, targets, reduction="none")  # [B, K, P]
    mask = label_mask.to(chosen.dtype).unsqueeze(1)  # [B, 1, P]
    per_pair = (bce * mask).sum(dim=2) / mask.sum(dim=2).clamp(min=1)  # [B, K]
    return (per_pair * member_weights.to(chosen.dtype)).mean(dim=0).mean()


ENSEMBLE_COLUMNS = ("label_probs", "label_mask", "member_weights")


def soft_label_trainer(*args, members: int = 1, **kwargs):
    """TRL's RewardTrainer with the soft-label loss.

    RewardTrainer has no soft-label loss, so this is the smallest extension that works: keep the
    `label_prob` column through TRL's column filter and collator, and in `compute_loss` let TRL run the
    model and log its metrics, then replace its hard loss with `soft_label_loss`. With the columns
    `label_probs` [P], `label_mask` [P] and `member_weights` [K] (several outputs, `members` = K), the
    loss is `ensemble_soft_label_loss` over the model's K * P outputs.
    """
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class SoftLabelCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            for key in ("label_prob", *ENSEMBLE_COLUMNS):
                if key in examples[0]:
                    batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.bool if key == "label_mask" else torch.float)
            return batch

    class SoftLabelRewardTrainer(RewardTrainer):
        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            extra = [c for c in ("label_prob", *ENSEMBLE_COLUMNS) if c not in self._signature_columns]
            self._signature_columns = [*self._signature_columns, *extra]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            label_prob = inputs.pop("label_prob", None)
            ensemble = {key: inputs.pop(key) for key in ENSEMBLE_COLUMNS if key in inputs}
            _, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            chosen, rejected = torch.chunk(outputs.logits, chunks=2)  # [B, outputs] each
            if ensemble:
                shape = (chosen.shape[0], members, -1)
                loss = ensemble_soft_label_loss(chosen.view(shape), rejected.view(shape), ensemble["label_probs"],
                                                ensemble["label_mask"], ensemble["member_weights"])
            else:
                chosen, rejected = chosen.squeeze(-1), rejected.squeeze(-1)
                loss = soft_label_loss(chosen, rejected, label_prob)
            if self.args.center_rewards_coefficient is not None:
                loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
            return (loss, outputs) if return_outputs else loss

    processing_class = kwargs["processing_class"]
    kwargs.setdefault("data_collator", SoftLabelCollator(pad_token_id=processing_class.pad_token_id))
    model = kwargs["model"]
    outputs = model.config.num_labels
    if outputs > 1:  # TRL refuses a model whose config says it has several outputs; this loss reads them all
        model.config.num_labels = 1
    try:
        return SoftLabelRewardTrainer(*args, **kwargs)
    finally:
        model.config.num_labels = outputs


# --------------------------------------------------------------------------------------------------
# Several outputs: the layout, each principle's labels, each member's bootstrap weights


def output_layout(cfg: Config) -> dict:
    """The reward model's outputs as `cfg.rm` asks for them: {"members", "principles", "share"}."""
    principles = None
    if cfg.rm.per_principle:
        from cai.constitution import load_constitution

        principles = [c.id for c in load_constitution(cfg.constitution).comparisons]
        if not principles:
            raise CaiError(f"rm.per_principle: the constitution {cfg.constitution} has no comparison principles")
    return {"members": cfg.rm.ensemble, "principles": principles, "share": cfg.rm.ensemble_share}


def principle_labels(dataset, records: list[dict], principles: list[str], hard: bool = False) -> tuple[list[list[float]], list[list[bool]]]:
    """Each pair's label under each principle, P(chosen better), and whether it has one.

    A principle's label is its probability in the pair's record (both orders averaged), turned around
    when the record's second answer is the dataset's `chosen`. A principle not asked of the pair, or
    unreadable there, has no label (0.5, masked). With `hard`, labels are rounded (a tie stays 0.5).
    """
    by_id = {r["id"]: r for r in records}
    if "id" not in dataset.column_names:
        raise CaiError("rm.per_principle needs the preference dataset's `id` column to find each pair's record")
    labels, masks = [], []
    for row in dataset:
        record = by_id.get(row["id"])
        if record is None:
            raise CaiError(f"rm.per_principle: pair {row['id']!r} has no preference record (prefs/records.jsonl)")
        chosen = row["chosen"][-1]["content"] if isinstance(row["chosen"], list) else row["chosen"]
        first, second = record["answers"]
        if chosen not in (first, second):
            raise CaiError(f"rm.per_principle: pair {row['id']!r}: its chosen answer is neither answer of its record")
        flipped = chosen != first
        asked = {e["id"]: e.get("p_first") for e in record.get("principles") or []}
        row_labels, row_mask = [], []
        for principle in principles:
            p = asked.get(principle)
            if p is None:
                row_labels.append(0.5)
                row_mask.append(False)
                continue
            p = 1.0 - p if flipped else p
            row_labels.append((1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5) if hard else p)
            row_mask.append(True)
        labels.append(row_labels)
        masks.append(row_mask)
    return labels, masks


def poisson_one(rng: random.Random) -> int:
    """A draw from Poisson(1) (Knuth): the online bootstrap's weight of one example."""
    limit, k, product = math.exp(-1.0), 0, rng.random()
    while product > limit:
        k += 1
        product *= rng.random()
    return k


def bootstrap_weights(ids: list[str], members: int, seed: int, bootstrap: bool) -> list[list[float]]:
    """Each pair's weight for each member [N][K]: seeded Poisson(1) draws per (member, pair id), so a pair keeps
    its weights when others are added; all 1 without bootstrap or with one member."""
    if not bootstrap or members == 1:
        return [[1.0] * members for _ in ids]
    return [[float(poisson_one(random.Random(f"{seed}:rm-bootstrap:{k}:{pair}"))) for k in range(members)] for pair in ids]


def with_output_columns(dataset, layout: dict, cfg: Config, records: list[dict] | None):
    """The training pairs with `label_probs`, `label_mask` and `member_weights` (several outputs)."""
    principles = layout["principles"]
    if principles:
        if records is None:
            raise CaiError("rm.per_principle needs the preference records (prefs/records.jsonl) of the pairs")
        labels, masks = principle_labels(dataset, records, principles, hard=cfg.rm.hard_labels)
    else:
        probs = [1.0] * len(dataset) if cfg.rm.hard_labels else [float(p) for p in dataset["label_prob"]]
        labels, masks = [[p] for p in probs], [[True] for _ in probs]
    ids = list(dataset["id"]) if "id" in dataset.column_names else [str(i) for i in range(len(dataset))]
    weights = bootstrap_weights(ids, layout["members"], cfg.seed, cfg.rm.ensemble_bootstrap)
    return dataset.add_column("label_probs", labels).add_column("label_mask", masks).add_column("member_weights", weights)


def decisive_pairs(dataset, min_margin: float):
    """The pairs whose label P(chosen better) is at least `min_margin` from 0.5, exact ties left out too when
    `min_margin` > 0; every pair when it is 0. Refused, in one line, when no pair is left (or there is no
    `label_prob` column to read)."""
    if min_margin <= 0:
        return dataset
    if "label_prob" not in dataset.column_names:
        raise CaiError("rm.min_label_margin reads each pair's label_prob, and the preference dataset has none")
    kept = [i for i, p in enumerate(dataset["label_prob"]) if p != 0.5 and abs(p - 0.5) >= min_margin]
    if not kept:
        raise CaiError(f"rm.min_label_margin={min_margin}: none of the {len(dataset)} preference pairs has a label that "
                       "far from 0.5; lower it, or label more pairs")
    return dataset.select(kept)


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


def held_out_metrics(model, tokenizer, dataset, cfg: Config, mean: float, std: float, layout: dict | None = None,
                     output_offsets: tuple | None = None) -> dict:
    """Accuracy, calibration and reward distribution of the reward model on held-out pairs, by its score (the
    mean of its outputs, normalised with `mean` and `std`). With several outputs (`layout`, and
    `output_offsets` = (mean [O], std [O]) of each output): each member's accuracy, each principle's
    accuracy on the pairs its label separates, and the members' disagreement on these answers."""
    if len(dataset) == 0:
        return {"pairs": 0}
    chosen_out = score_outputs(model, tokenizer, [r["prompt"] + r["chosen"] for r in dataset], cfg.rm.batch_size, cfg.rm.max_length)
    rejected_out = score_outputs(model, tokenizer, [r["prompt"] + r["rejected"] for r in dataset], cfg.rm.batch_size, cfg.rm.max_length)
    chosen, rejected = chosen_out.mean(dim=1).tolist(), rejected_out.mean(dim=1).tolist()
    labels = list(dataset["label_prob"]) if "label_prob" in dataset.column_names else [1.0] * len(dataset)
    predicted = [1.0 / (1.0 + math.exp(-(c - r))) for c, r in zip(chosen, rejected)]
    eps = 1e-7
    metrics = {
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
    if layout is None or chosen_out.shape[1] == 1:
        return metrics
    members = layout["members"]
    out_mean, out_std = (torch.tensor(x) for x in output_offsets)
    chosen_n = ((chosen_out - out_mean) / out_std).view(len(dataset), members, -1)  # [N, K, P]
    rejected_n = ((rejected_out - out_mean) / out_std).view(len(dataset), members, -1)
    margin = chosen_n.mean(dim=2) - rejected_n.mean(dim=2)  # [N, K]: each member's score margin
    metrics["member_accuracy"] = [float(((margin[:, k] > 0).float() + 0.5 * (margin[:, k] == 0).float()).mean()) for k in range(members)]
    metrics["disagreement"] = float(torch.cat([member_disagreement(chosen_n.mean(dim=2)), member_disagreement(rejected_n.mean(dim=2))]).mean())
    if layout["principles"] and "label_probs" in dataset.column_names:
        labels_p, mask_p = torch.tensor(dataset["label_probs"]), torch.tensor(dataset["label_mask"])
        per_principle = (chosen_n - rejected_n).mean(dim=1)  # [N, P], the members' mean margin
        decisive = mask_p & (labels_p != 0.5)
        metrics["principle_accuracy"] = {
            principle: ({"pairs": int(decisive[:, p].sum()),
                         "accuracy": float(((per_principle[:, p] > 0) == (labels_p[:, p] > 0.5))[decisive[:, p]].float().mean())}
                        if decisive[:, p].any() else {"pairs": 0})
            for p, principle in enumerate(layout["principles"])
        }
    return metrics


def normalization(raw, layout: dict) -> dict:
    """normalization.json from the raw outputs [N, O] on the policy's samples: the score's mean and std (the
    score is the mean of the outputs), each output's, and the members' disagreement (mean over samples of
    the std over members of each member's normalised outputs averaged over principles)."""

    def offsets(values):
        mean = float(values.mean()) if values.numel() else 0.0
        std = float(values.std(unbiased=False)) if values.numel() > 1 else 1.0
        return mean, (std if std > 1e-8 else 1.0)

    mean, std = offsets(raw.mean(dim=1))
    out = {"mean": mean, "std": std}
    if raw.shape[1] > 1:
        columns = [offsets(raw[:, o]) for o in range(raw.shape[1])]
        out["outputs"] = {"mean": [m for m, _ in columns], "std": [s for _, s in columns]}
        if layout["members"] > 1 and raw.shape[0]:
            normalised = (raw - torch.tensor(out["outputs"]["mean"])) / torch.tensor(out["outputs"]["std"])
            out["disagreement"] = float(member_disagreement(normalised.view(raw.shape[0], layout["members"], -1).mean(dim=2)).mean())
    return out


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
            soft labels, LoRA, `rm.eval_fraction` of the pairs held out by prompt, the outputs:
            `rm.ensemble`, `rm.ensemble_share`, `rm.per_principle`), `cfg.policy` and `cfg.templates`
            how the policy's input is rendered, `cfg.seed` the split, the bootstrap and the trainer.
        dataset: a `datasets.Dataset` with the columns `prompt`, `chosen`, `rejected` (TRL's
            conversational preference format, as `prefs/dataset/` holds them) and `label_prob`
            (P(chosen better), needed unless `rm.hard_labels`); an `id` column names each pair's record
            (needed with `rm.per_principle`; it also seeds each pair's bootstrap weights).
        out_dir: where the reward model goes (created). It may be `start_from` itself: the model is
            loaded before anything is written.
        start_from: an SFT model folder (fresh score heads are put on it) or a finished reward-model
            folder with the same outputs (training continues from its weights and heads).
        normalize_on: (user prompt text, answer) pairs, usually the policy's own samples: the reward is
            normalised to mean 0 and standard deviation 1 over them.
        records: the preference records (`prefs/records.jsonl` rows, `cai.preferences`) of the dataset's
            pairs, matched by `id`; they hold each principle's label, which `rm.per_principle` trains
            on. Not read otherwise.
        checkpoints: the trainer's checkpoint folder (default `out_dir/checkpoints`); a killed call with
            the same arguments resumes from the last checkpoint there; it is removed at the end.

    Returns:
        the metrics written to `out_dir/metrics.json`: train_pairs, below_label_margin, train_loss, steps, loss, started_from,
        outputs (the layout), held_out (accuracy, calibration, reward distribution on the held-out pairs;
        with several outputs each member's and each principle's accuracy and the members'
        disagreement), normalization, sft_samples_normalized.
    """
    from cai.models import load_tokenizer

    out_dir, start_from = Path(out_dir), Path(start_from)
    checkpoints = Path(checkpoints) if checkpoints is not None else out_dir / "checkpoints"
    templates = Templates(cfg.templates)
    layout = output_layout(cfg)
    n_outputs = layout["members"] * len(layout["principles"] or [None])
    continuing = (start_from / NORMALIZATION).is_file()
    if continuing:
        have = read_outputs(start_from)
        if (have["members"], have["principles"]) != (layout["members"], layout["principles"]) or (n_outputs > 1 and have["share"] != layout["share"]):
            raise CaiError(f"{start_from}: its outputs {have} are not the ones rm.* asks for {layout}; train from the SFT model instead")

    # Decisive pairs only (rm.min_label_margin); held-out pairs, split by prompt; with several outputs, each
    # pair's labels and bootstrap weights.
    labeled = len(dataset)
    dataset = decisive_pairs(dataset, cfg.rm.min_label_margin)
    train, held_out = split_dataset(dataset, cfg.rm.eval_fraction, cfg.seed)
    several = n_outputs > 1
    if several:
        train = with_output_columns(train, layout, cfg, records)
        held_out = with_output_columns(held_out, layout, cfg, records) if len(held_out) else held_out
    columns = ["prompt", "chosen", "rejected"] + (list(ENSEMBLE_COLUMNS) if several else [] if cfg.rm.hard_labels else ["label_prob"])
    train = train.select_columns(columns)

    tokenizer = load_tokenizer(str(start_from), cfg.cache_dir)
    if several and layout["share"] == "lora":
        trained, result, adapter_dirs = _train_lora_members(cfg, train, start_from, checkpoints, tokenizer, layout, continuing)
        trainer = None
    else:
        trained, result, trainer = _train_heads(cfg, train, start_from, checkpoints, tokenizer, n_outputs, layout["members"])

    # Normalisation on the policy's own samples.
    raw = score_outputs(
        trained, tokenizer, [policy_input(templates, p, cfg.policy.system_prompt, a) for p, a in normalize_on],
        cfg.rm.batch_size, cfg.rm.max_length,
    )
    norm = normalization(raw, layout)
    mean, std = norm["mean"], norm["std"]
    offsets = (norm["outputs"]["mean"], norm["outputs"]["std"]) if "outputs" in norm else None

    # Held-out metrics; the model, tokenizer and offsets to out_dir.
    metrics = {
        "train_pairs": len(trainer.train_dataset) if trainer is not None else len(train),  # less pairs over rm.max_length
        "below_label_margin": labeled - len(dataset),  # pairs left out by rm.min_label_margin
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "loss": "hard Bradley-Terry" if cfg.rm.hard_labels else "soft-label cross-entropy",
        "started_from": str(start_from),
        "outputs": layout,
        "held_out": held_out_metrics(trained, tokenizer, held_out, cfg, mean, std, layout if several else None, offsets),
        "normalization": {"samples": raw.shape[0], "mean": mean, "std": std},
        "sft_samples_normalized": distribution([(r - mean) / std for r in raw.mean(dim=1).tolist()]),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if several and layout["share"] == "lora":
        LoraMembers.save(out_dir, start_from, len(layout["principles"] or [None]), adapter_dirs, tokenizer)
    else:
        trained.config.pad_token_id = tokenizer.pad_token_id
        save_trained(trainer, trained, tokenizer, out_dir, lora=cfg.rm.lora)
    if several:
        atomic_write_json(out_dir / OUTPUTS, layout)
    atomic_write_json(out_dir / NORMALIZATION, norm)
    atomic_write_json(
        out_dir / SCORING,
        {"system_prompt": cfg.policy.system_prompt, "max_length": cfg.rm.max_length, "answer_template": templates.source(ANSWER_TEMPLATE)},
    )
    atomic_write_json(out_dir / "metrics.json", metrics)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return metrics


def _train_heads(cfg: Config, train, start_from: Path, checkpoints: Path, tokenizer, n_outputs: int, members: int):
    """One model with `n_outputs` score outputs (fresh on the SFT model, or the reward model's own), trained
    with TRL's RewardTrainer: (the trained model, in eval mode; the train result; the trainer)."""
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from cai.models import default_device

    torch.manual_seed(stable_seed(cfg.seed, "rm-heads"))  # the fresh heads' initialisation
    model = AutoModelForSequenceClassification.from_pretrained(str(start_from), num_labels=n_outputs, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(default_device())
    args = RewardConfig(**trainer_arguments(cfg.rm, checkpoints, cfg.seed, lr_scheduler="linear", dtype=cfg.policy.dtype))
    peft_config = lora_config(cfg.rm, "SEQ_CLS")
    if cfg.rm.hard_labels and n_outputs == 1:
        trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, peft_config=peft_config)
    else:
        trainer = soft_label_trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                                     peft_config=peft_config, members=members)
    if len(trainer.train_dataset) == 0:
        raise CaiError(f"rm: every training pair is longer than rm.max_length={cfg.rm.max_length} tokens; raise it")
    result = trainer.train(resume_from_checkpoint=last_checkpoint(checkpoints))
    trained = trainer.model
    if cfg.rm.lora:
        trained = trained.merge_and_unload()
    return trained.eval(), result, trainer


def _train_lora_members(cfg: Config, train, start_from: Path, checkpoints: Path, tokenizer, layout: dict, continuing: bool):
    """K LoRA adapters, each with its own P-output head, on one frozen base, trained one after another, each
    on its own bootstrap weights; each finished adapter is kept in `checkpoints/members/mK`, so a killed run
    trains only the members it had not finished. Returns (the members as one model, `cai.rewards.LoraMembers`;
    a train result with the members' steps summed and their mean loss; the adapters' folders)."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForSequenceClassification
    from transformers.trainer_utils import TrainOutput
    from trl import RewardConfig

    from cai.models import default_device

    members, n_principles = layout["members"], len(layout["principles"] or [None])
    folders, losses, steps = [], [], 0
    for k in range(members):
        done = checkpoints / "members" / f"m{k}"
        folders.append(done)
        progress = done / "train_result.json"
        if progress.is_file():
            finished = json.loads(progress.read_text())
            losses.append(finished["loss"])
            steps += finished["steps"]
            continue
        torch.manual_seed(stable_seed(cfg.seed, "rm-member", k))  # each member's own head and adapter
        base = AutoModelForSequenceClassification.from_pretrained(str(start_from), num_labels=n_principles, dtype=torch.float32)
        base.config.pad_token_id = tokenizer.pad_token_id
        if continuing:
            model = PeftModel.from_pretrained(base, str(start_from / "members" / f"m{k}"), is_trainable=True)
            peft_config = None
        else:
            model, peft_config = base, LoraConfig(r=cfg.rm.lora_r, lora_alpha=cfg.rm.lora_alpha, lora_dropout=0.0,
                                                  target_modules="all-linear", task_type="SEQ_CLS")
        model.to(default_device())
        own = train.map(lambda row: {"member_weights": [row["member_weights"][k]]})
        seed = stable_seed(cfg.seed, "rm-member", k) % 2**31
        args = RewardConfig(**trainer_arguments(cfg.rm, checkpoints / f"m{k}", seed, lr_scheduler="linear", dtype=cfg.policy.dtype))
        trainer = soft_label_trainer(model=model, args=args, train_dataset=own, processing_class=tokenizer, peft_config=peft_config, members=1)
        if len(trainer.train_dataset) == 0:
            raise CaiError(f"rm: every training pair is longer than rm.max_length={cfg.rm.max_length} tokens; raise it")
        result = trainer.train(resume_from_checkpoint=last_checkpoint(checkpoints / f"m{k}"))
        trainer.model.save_pretrained(str(done))
        atomic_write_json(progress, {"loss": result.training_loss, "steps": result.global_step})
        shutil.rmtree(checkpoints / f"m{k}", ignore_errors=True)
        losses.append(result.training_loss)
        steps += result.global_step
        del trainer, model, base
    ensemble = LoraMembers.load(start_from, folders, n_principles)
    ensemble.config.pad_token_id = tokenizer.pad_token_id
    return ensemble.to(default_device()).eval(), TrainOutput(steps, statistics.fmean(losses), {}), folders
