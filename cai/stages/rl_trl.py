"""The rl stage's other algorithms, each TRL's own trainer set up from `cfg.rl` (cai's PPO is rl.py;
`cai rl` runs this module when `rl.algorithm` is not ppo).

- `dpo`: DPOTrainer on `prefs/dataset` (the open CAI recipe: the AI preferences, no reward model).
  `label_prob`, the labeler's probability that `chosen` is better, is used twice: pairs below
  `rl.dpo_min_label_prob` are dropped (a weight of 0 or 1), and the labeler's mean doubt,
  mean(1 - label_prob), becomes the label smoothing ε (`rl.dpo_label_smoothing` overrides it; 0 gives
  the plain sigmoid loss) of TRL's exo_pair loss, or of its robust loss (`rl.dpo_soft_loss`).
- `grpo` and `rloo`: GRPOTrainer / RLOOTrainer with the rl-split prompts, `rl.group_size` answers per
  prompt, and the reward of `rl.reward` (rm/, the labeler's direct score or a callable). The KL
  coefficient is `rl.kl_coef`, non-zero by default (GRPO's own default is none).

Steps: 1. data; 2. the trainer's config from cfg.rl; 3. train, checkpoints in rl/checkpoints/ (a killed
run resumes from the last one); 4. save the policy (LoRA merged, adapter too), sample, metrics.json.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cai.config import Config
from cai.errors import CaiError
from cai.policy_models import check_reward, load_reward_fn, sample_for_report
from cai.records import atomic_write_json
from cai.rounds import check_rounds, label_policy, open_round, round_bounds, round_metrics, summarize_rounds
from cai.selection import check_selection, select_snapshot, selection_stale
from cai.stages import open_stage, require_done
from cai.training import check_tracker, device_arguments, last_checkpoint, lora_config


def trl_reward(reward_fn):
    """cai's reward(prompts, answers) as a TRL reward function(prompts, completions, **columns).

    TRL hands the reward the prompt as the policy read it, whose user turn is what answer.jinja made of
    the request. A reward reads the request itself, as PPO's does (a reward model renders answer.jinja
    again, the checks look up the prompt's kind by it), so it gets the dataset's `prompt_text` column,
    which TRL passes along per completion; an edited answer.jinja would otherwise change every reward."""

    def cai_reward(prompts, completions, prompt_text, **_):
        def text(x):
            return x[-1]["content"] if isinstance(x, list) else x

        return [float(v) for v in reward_fn(list(prompt_text), [text(c) for c in completions])]

    return cai_reward


def vllm_arguments(rl) -> dict:
    """`rl.vllm` as TRL's GRPOConfig/RLOOConfig arguments (generation on vLLM; GPU only)."""
    if rl.vllm == "off":
        return {}
    args = {"use_vllm": True, "vllm_mode": rl.vllm}
    if rl.vllm == "server" and rl.vllm_server_url:
        args["vllm_server_base_url"] = rl.vllm_server_url
    return args


def dpo_dataset(cfg: Config):
    """prefs/dataset, oriented so that chosen is the preferred answer, low-confidence pairs dropped."""
    import datasets

    prefs_dir = require_done(cfg, "prefs", "rl with rl.algorithm=dpo")
    dataset = datasets.load_from_disk(str(prefs_dir / "dataset"))
    missing = {"prompt", "chosen", "rejected"} - set(dataset.column_names)
    if missing:
        raise CaiError(f"{prefs_dir / 'dataset'} lacks the columns {sorted(missing)}")
    return dpo_pairs(cfg, dataset)


def dpo_pairs(cfg: Config, dataset):
    """(the pairs DPO trains on, label smoothing): `dataset` oriented so that chosen is the preferred
    answer, pairs below rl.dpo_min_label_prob dropped; (None, None) when none is left."""
    if "label_prob" not in dataset.column_names:
        dataset = dataset.add_column("label_prob", [1.0] * len(dataset))

    def orient(row):
        if row["label_prob"] < 0.5:
            row["chosen"], row["rejected"], row["label_prob"] = row["rejected"], row["chosen"], 1 - row["label_prob"]
        return row

    dataset = dataset.map(orient).filter(lambda row: row["label_prob"] >= cfg.rl.dpo_min_label_prob)
    if len(dataset) == 0:
        return None, None
    smoothing = cfg.rl.dpo_label_smoothing
    if smoothing is None:
        smoothing = min(max(1.0 - sum(dataset["label_prob"]) / len(dataset), 0.0), 0.49)
    return dataset.select_columns(["prompt", "chosen", "rejected"]), smoothing


def prompt_dataset(cfg: Config):
    import datasets

    from cai.promptsets import split_prompts

    split = split_prompts(cfg.data, cfg.seed)["rl"]
    prompts = split["red_team"] + split["helpful"]
    if not prompts:
        raise CaiError("data: the rl split has no prompts; add prompts or raise data.fractions.rl")
    from cai.chat import policy_input
    from cai.templates import Templates

    templates = Templates(cfg.templates)
    return datasets.Dataset.from_dict({
        "prompt": [policy_input(templates, p.text, cfg.policy.system_prompt) for p in prompts],  # what the policy reads
        "prompt_text": [p.text for p in prompts],  # what the reward reads (trl_reward)
    })


def common_args(cfg: Config, output_dir: Path) -> dict:
    rl = cfg.rl
    return dict(
        output_dir=str(output_dir),
        max_steps=rl.steps,
        per_device_train_batch_size=rl.batch_size,
        gradient_accumulation_steps=rl.grad_accum,
        learning_rate=rl.learning_rate,
        lr_scheduler_type="constant",
        max_grad_norm=rl.max_grad_norm if rl.max_grad_norm is not None else 0.0,
        seed=cfg.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=rl.checkpoint_every,
        save_total_limit=1,
        report_to=rl.log_with,
        **device_arguments(dtype=cfg.policy.dtype),
    )


def run(cfg: Config) -> Path:
    rl = cfg.rl
    if rl.vllm != "off":  # TRL's vLLM generation (GPU only)
        import torch

        if not torch.cuda.is_available():
            raise CaiError(f"rl.vllm={rl.vllm} needs CUDA GPUs and `pip install vllm`; set rl.vllm=off on this machine")
    sft_dir = require_done(cfg, "sft", "rl")
    check_tracker(rl.log_with)
    if rl.algorithm in ("grpo", "rloo") and rl.batch_size % rl.group_size:
        raise CaiError(f"rl.batch_size ({rl.batch_size}) must be a multiple of rl.group_size ({rl.group_size}) for {rl.algorithm}")
    if rl.algorithm in ("grpo", "rloo"):
        check_reward(cfg)

    check_rounds(cfg)
    check_selection(cfg)
    if rl.rounds > 1 and rl.lora:
        raise CaiError("rl.rounds > 1 with rl.algorithm=dpo trains all weights: set rl.lora=false")
    if rl.select_by == "validation" and rl.rounds == 1:
        raise CaiError("rl.select_by=validation chooses among snapshots: dpo keeps one at the end of each round (set rl.rounds > 1)")

    # 1. Data.
    if rl.algorithm == "dpo":
        dataset, smoothing = dpo_dataset(cfg)
        if dataset is None and rl.rounds == 1:  # with rounds, the next round's pairs may separate
            raise CaiError(f"no preference pair has label_prob >= rl.dpo_min_label_prob ({rl.dpo_min_label_prob})")
    else:
        dataset = prompt_dataset(cfg)
    labelers = (("choices",) if cfg.rl.reward == "direct" or rl.rounds > 1 else ()) + (("judge",) if rl.select_by == "validation" else ())
    stage = open_stage(cfg, "rl", uses_labeler=labelers)
    if stage.done:
        if selection_stale(cfg, stage.path):  # eval.judge changed since it chose
            print("[rl] eval.judge changed since the snapshot was chosen: choosing again")
            select_snapshot(cfg, stage.path)
        return stage.path

    # 2. The trainer, configured from cfg.rl; float32 master weights, bf16 compute where policy.dtype
    #    says so (TRL's bf16=True).
    import torch

    from cai.models import load_causal_lm, load_tokenizer, sampling_kwargs

    tokenizer = load_tokenizer(str(sft_dir), cfg.cache_dir)
    if rl.rounds > 1:
        return dpo_rounds(cfg, stage, sft_dir, tokenizer)
    model = load_causal_lm(str(sft_dir), cfg.cache_dir, dtype=torch.float32)
    model.train()
    checkpoints = stage.path / "checkpoints"
    peft_config = lora_config(rl, "CAUSAL_LM")
    reward_fn = None
    if rl.algorithm == "dpo":
        from trl import DPOConfig, DPOTrainer

        # With smoothing ε > 0 the labels are soft. TRL's sigmoid loss no longer takes label smoothing
        # (conservative DPO); exo_pair is its bounded soft-target form: the policy's implicit preference
        # σ(β·h) is pulled toward 1 - ε. The robust loss is unbiased for a flip rate ε, but its
        # 1/(1 - 2ε) factor is 50 when a weak labeler's mean doubt is 0.49.
        loss = rl.dpo_soft_loss if smoothing > 0 else "sigmoid"
        args = DPOConfig(**common_args(cfg, checkpoints), beta=rl.dpo_beta, label_smoothing=smoothing, loss_type=[loss])
        # The frozen reference is stored in the compute dtype (bf16 on a GPU); with LoRA it is the base.
        reference = None if rl.lora else load_causal_lm(str(sft_dir), cfg.cache_dir, dtype=cfg.policy.dtype).requires_grad_(False)
        trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config)
        print(f"[rl] dpo ({loss} loss) on {len(dataset)} pairs, beta {rl.dpo_beta}, label smoothing {smoothing:.3f}")
    else:
        from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

        config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if rl.algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
        args = config_cls(
            **common_args(cfg, checkpoints), num_generations=rl.group_size, beta=rl.kl_coef,
            max_completion_length=rl.max_new_tokens or cfg.policy.max_new_tokens, temperature=rl.temperature,
            num_iterations=rl.ppo_epochs, epsilon=rl.clip_eps, **vllm_arguments(rl),
            # exactly softmax(logits / T): none of the model's shipped penalties, top-k or min-p. These are
            # transformers' generate() names; under rl.vllm TRL hands generation_kwargs to vLLM, whose
            # sampling parameters differ, so there the vLLM defaults apply (see docs/scale.md).
            generation_kwargs=sampling_kwargs(rl.temperature) if rl.vllm == "off" else None,
        )
        reward_fn, _ = load_reward_fn(cfg, model.device)
        trainer = trainer_cls(model=model, reward_funcs=trl_reward(reward_fn), args=args, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=peft_config)

    # 3. Train; a killed run resumes from the last checkpoint.
    result = trainer.train(resume_from_checkpoint=last_checkpoint(checkpoints))

    # 4. Save the policy (LoRA merged, adapter too), sample from it, write the metrics.
    trained = trainer.model
    if rl.lora:
        trained.save_pretrained(str(stage.path / "adapter"))
        trained = trained.merge_and_unload()
    trained.eval()
    trained.save_pretrained(str(stage.path))
    tokenizer.save_pretrained(str(stage.path))
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    metrics = {
        "algorithm": rl.algorithm,
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "log": logs,
        "samples": sample_for_report(cfg, trained, tokenizer, reward_fn, stage.path),
    }
    if rl.algorithm == "dpo":
        metrics.update(pairs=len(dataset), label_smoothing=smoothing, loss=loss)
    atomic_write_json(stage.path / "metrics.json", metrics)
    shutil.rmtree(checkpoints, ignore_errors=True)
    rewards = [e.get("reward") for e in logs if e.get("reward") is not None]
    trend = f", reward {rewards[0]:+.3f} -> {rewards[-1]:+.3f}" if rewards else ""
    return stage.finish(f"{rl.algorithm}, {result.global_step} steps, loss {result.training_loss:.3f}{trend}")


# --------------------------------------------------------------------------------------------------
# Iterated DPO (rl.rounds > 1; cai/rounds.py)


def dpo_rounds(cfg: Config, stage, sft_dir: Path, tokenizer) -> Path:
    """DPO in rounds, each against the SL-CAI reference: round 1 on prefs/dataset (the SL-CAI model's
    pairs), each later round on the current policy's own pairs, labeled by the choice labeler. A round
    trains for its share of rl.steps with a fresh optimizer; its policy is kept as rl/snapshots/step-N,
    the next round samples from it, and a killed run resumes from the last finished round (a round in
    progress from its trainer checkpoint, its labels from disk)."""
    import time

    import datasets
    import torch
    from trl import DPOConfig, DPOTrainer

    from cai.constitution import load_constitution
    from cai.models import load_causal_lm
    from cai.pairs import preference_rows
    from cai.records import mark_done, read_jsonl
    from cai.templates import Templates

    rl = cfg.rl
    bounds = round_bounds(rl.steps, rl.rounds)
    reference = load_causal_lm(str(sft_dir), cfg.cache_dir, dtype=cfg.policy.dtype).requires_grad_(False)
    model, logs = None, []
    for k, (start, end) in enumerate(bounds, 1):
        folder, fingerprint, done = open_round(stage.path, k, stage.fingerprint)
        snapshot = stage.path / "snapshots" / f"step-{end}"
        if done:
            continue
        if model is None:  # the policy the round starts from: the SL-CAI model, or the last finished round's
            model = load_causal_lm(str(sft_dir if k == 1 else stage.path / "snapshots" / f"step-{start}"), cfg.cache_dir,
                                   dtype=torch.float32)
        started = time.time()
        if k == 1:
            records, skipped = read_jsonl(require_done(cfg, "prefs", "rl") / "records.jsonl"), {}
            dataset, smoothing = dpo_dataset(cfg)
        else:
            print(f"[rl] round {k}: the policy's own answers, labeled by the choice labeler")
            records, skipped = label_policy(cfg, k, folder, model, tokenizer, load_constitution(cfg.constitution))
            rows = preference_rows(records, Templates(cfg.templates), cfg.policy.system_prompt)
            dataset, smoothing = dpo_pairs(cfg, datasets.Dataset.from_list(rows)) if rows else (None, None)
        trained = {"dpo_pairs": 0, "train_loss": None, "steps": 0}
        if dataset is None:  # nothing to learn from: the policy goes on to the next round as it is
            print(f"[rl] round {k}: no pair with label_prob >= rl.dpo_min_label_prob ({rl.dpo_min_label_prob}); not trained")
        else:
            model.train()
            loss = rl.dpo_soft_loss if smoothing > 0 else "sigmoid"
            args = DPOConfig(**{**common_args(cfg, folder / "checkpoints"), "max_steps": end - start}, beta=rl.dpo_beta,
                             label_smoothing=smoothing, loss_type=[loss])
            trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer)
            print(f"[rl] round {k}: dpo ({loss} loss) on {len(dataset)} pairs for steps {start + 1}-{end}, label smoothing {smoothing:.3f}")
            result = trainer.train(resume_from_checkpoint=last_checkpoint(folder / "checkpoints"))
            model = trainer.model
            logs += [{**entry, "round": k} for entry in trainer.state.log_history if "loss" in entry]
            trained = {"dpo_pairs": len(dataset), "label_smoothing": smoothing, "train_loss": result.training_loss,
                       "steps": result.global_step}
        model.eval()
        tmp = snapshot.with_name(f".tmp-{snapshot.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(snapshot, ignore_errors=True)
        tmp.rename(snapshot)
        atomic_write_json(folder / "metrics.json", round_metrics(k, records, skipped, None, None, None, time.time() - started, **trained))
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        mark_done(folder, fingerprint)

    # The final policy (the last round's), its answers for the report, the metrics; a snapshot, if asked.
    final = load_causal_lm(str(stage.path / "snapshots" / f"step-{rl.steps}"), cfg.cache_dir, dtype=torch.float32)
    final.save_pretrained(str(stage.path))
    tokenizer.save_pretrained(str(stage.path))
    metrics = {"algorithm": "dpo", "steps": rl.steps, "log": logs, "rounds": summarize_rounds(stage.path, bounds, [])}
    kept = ""
    if rl.select_by == "validation":
        selection = select_snapshot(cfg, stage.path)
        kept = f", kept {selection['kept']}"
        final = load_causal_lm(str(stage.path), cfg.cache_dir, dtype=torch.float32)
    metrics["samples"] = sample_for_report(cfg, final, tokenizer, None, stage.path)
    atomic_write_json(stage.path / "rounds.json", metrics["rounds"])
    atomic_write_json(stage.path / "metrics.json", metrics)
    losses = [r.get("train_loss") for r in metrics["rounds"]]
    return stage.finish(f"dpo, {rl.rounds} rounds of {rl.steps} steps, loss by round "
                        + " ".join("n/a" if x is None else f"{x:.3f}" for x in losses) + kept)
