"""What the training stages set the same way: the arguments that follow the device and the compute
precision, the TrainingArguments sft (SFTTrainer) and rm (RewardTrainer) read from their config section,
the LoRA config, where a run resumes, and the experiment tracker check.

Precision: every model that trains is loaded in float32 (its master weights) and the trainer computes
in bf16 (or fp16) under autocast when `policy.dtype` names it (auto: bf16 on a GPU that has it), as
TRL's `bf16=True` and accelerate's `mixed_precision` do. Stepping bf16 weights directly loses most
small updates."""

from __future__ import annotations

import os
from pathlib import Path


def device_arguments(bf16: bool | None = None, activation_checkpointing: bool | None = None, dtype: str = "auto") -> dict:
    """The TrainingArguments that follow the device, for every stage that trains with a TRL trainer
    (sft, rm, and rl's dpo/grpo/rloo); None leaves a setting to the device. The mixed precision
    (bf16/fp16 compute on float32 weights) follows `dtype`, the config's `policy.dtype`, unless `bf16`
    says otherwise."""
    import torch

    from cai.models import default_device, mixed_precision

    gpu = torch.cuda.is_available()
    precision = mixed_precision(dtype, default_device())
    bf16 = bf16 if bf16 is not None else precision == "bf16"
    fp16 = not bf16 and precision == "fp16"
    on_cpu = not gpu and not torch.backends.mps.is_available()
    return dict(
        bf16=bf16,
        fp16=fp16,
        # transformers refuses bf16/fp16 without an accelerator unless told it is the CPU; and several
        # processes without CUDA (`accelerate launch --num_processes N` on CPUs) would otherwise each run
        # alone instead of as one gloo group.
        use_cpu=on_cpu and (bf16 or fp16 or int(os.environ.get("WORLD_SIZE", "1")) > 1),
        # TRL turns activation checkpointing on by default; on a CPU, where memory is rarely what
        # runs out, recomputing every layer's activations only costs time.
        activation_checkpointing=activation_checkpointing if activation_checkpointing is not None else gpu,
        dataloader_pin_memory=gpu,
        dataloader_num_workers=0,
    )


def trainer_arguments(section, output_dir: Path, seed: int, lr_scheduler: str, dtype: str = "auto") -> dict:
    """Keyword arguments for a TRL config (SFTConfig, RewardConfig) from a config section with the
    keys epochs, learning_rate, batch_size, grad_accum, max_length, bf16, activation_checkpointing,
    logging_steps, save_steps and report_to."""
    return dict(
        output_dir=str(output_dir),
        num_train_epochs=section.epochs,
        learning_rate=section.learning_rate,
        per_device_train_batch_size=section.batch_size,
        gradient_accumulation_steps=section.grad_accum,
        max_length=section.max_length,
        seed=seed,
        logging_steps=section.logging_steps,
        save_strategy="steps",
        save_steps=section.save_steps,
        save_total_limit=1,  # one checkpoint to resume from is enough
        report_to=section.report_to,
        lr_scheduler_type=lr_scheduler,
        warmup_steps=0.03,
        **device_arguments(section.bf16, section.activation_checkpointing, dtype),
    )


def lora_config(section, task_type: str):
    """peft's LoraConfig on every linear layer from the section's lora_r and lora_alpha, or None
    when the section does not ask for LoRA."""
    if not section.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(r=section.lora_r, lora_alpha=section.lora_alpha, lora_dropout=0.0, target_modules="all-linear", task_type=task_type)



def last_checkpoint(folder: Path) -> str | None:
    """The newest `checkpoint-N` folder a Trainer wrote under `folder`, to resume from; None if none."""
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(checkpoints[-1]) if checkpoints else None


def check_tracker(log_with: str) -> None:
    """One line when the experiment tracker a config names is not installed."""
    from cai.errors import CaiError
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"none": True, "tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    if not available[log_with]:
        raise CaiError(f"rl.log_with={log_with} needs the {log_with} package: pip install {log_with}")


def save_trained(trainer, trained, tokenizer, path: Path, lora: bool) -> None:
    """A stage's trained model and tokenizer to `path`, written by the main process only (under
    `accelerate launch` every process gets here). A full fine-tune is saved through the trainer, which
    first gathers FSDP or ZeRO-3 shards; a merged LoRA model is whole on every process."""
    if not lora:
        trainer.save_model(str(path))
    elif trainer.is_world_process_zero():
        trained.save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))
