"""Stage 2, SFT: fine-tune the policy on the SL-CAI dataset with TRL's SFTTrainer.

1. Load `sl/dataset/` (conversational `messages`).
2. Loss on the assistant's answer only: each conversation becomes a conversational prompt/completion
   pair (the answer is the completion), which SFTTrainer masks for any chat template — unlike
   `assistant_only_loss`, which needs `{% generation %}` markers that most templates lack.
3. Train: all weights, or a LoRA adapter (peft) when `sft.lora`, in float32 with bf16 compute
   where `policy.dtype` says so (auto: on a GPU that has bf16). Checkpoints go to
   `sft/checkpoints/`; a killed run resumes from the last one.
4. Save the model (LoRA merged into the base unless `sft.merge_lora=false`) and the tokenizer to `sft/`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cai.config import Config
from cai.errors import CaiError
from cai.records import atomic_write_json
from cai.stages import open_stage, require_done
from cai.training import last_checkpoint, lora_config, save_trained, trainer_arguments


def to_prompt_completion(example: dict) -> dict:
    messages = example["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def build_trainer(cfg: Config, model, tokenizer, dataset, output_dir: Path):
    """TRL's SFTTrainer set up from `cfg.sft` (LoRA through peft when asked)."""
    from trl import SFTConfig, SFTTrainer

    model.train()
    args = SFTConfig(**trainer_arguments(cfg.sft, output_dir, cfg.seed, lr_scheduler="cosine", dtype=cfg.policy.dtype))
    peft_config = lora_config(cfg.sft, "CAUSAL_LM")
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)


def run(cfg: Config) -> Path:
    sl_dir = require_done(cfg, "sl", "sft")
    stage = open_stage(cfg, "sft")
    if stage.done:
        return stage.path

    import datasets

    import torch

    from cai.models import load_causal_lm, load_tokenizer

    # 1. The SL-CAI dataset.
    dataset = datasets.load_from_disk(str(sl_dir / "dataset"))
    if len(dataset) == 0:
        raise CaiError(f"{sl_dir / 'dataset'} is empty: the sl stage kept no answers")

    # 2. Assistant-only loss through the prompt/completion form.
    if cfg.sft.assistant_only_loss:
        dataset = dataset.map(to_prompt_completion, remove_columns=dataset.column_names)
    else:
        dataset = dataset.select_columns(["messages"])

    # 3. Train: float32 master weights, bf16 compute where policy.dtype says so (TRL's bf16=True).
    model = load_causal_lm(cfg.policy.model, cfg.cache_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(cfg.policy.model, cfg.cache_dir)
    checkpoints = stage.path / "checkpoints"
    trainer = build_trainer(cfg, model, tokenizer, dataset, checkpoints)
    result = trainer.train(resume_from_checkpoint=last_checkpoint(checkpoints))

    # 4. Save the model and tokenizer to sft/.
    trained = trainer.model
    if cfg.sft.lora:
        trained.save_pretrained(str(stage.path / "adapter"))
        if cfg.sft.merge_lora:
            trained = trained.merge_and_unload()
    trained.eval()
    save_trained(trainer, trained, tokenizer, stage.path, lora=cfg.sft.lora)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics = {
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "steps": result.global_step,
        "examples": len(dataset),
        "lora": cfg.sft.lora,
    }
    atomic_write_json(stage.path / "metrics.json", metrics)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return stage.finish(f"{len(dataset)} examples, {result.global_step} steps, train loss {result.training_loss:.3f}")
