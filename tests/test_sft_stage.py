"""The SFT stage on a tiny model: weights change, the answer alone carries the loss, LoRA merges."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from cai.models import load_model_and_tokenizer
from cai.stages import sft, sl
from tests.fakes import ScriptedLabeler


@pytest.fixture
def sl_done(monkeypatch):
    monkeypatch.setattr(sl, "build_labeler", lambda cfg, shared_models=None, role=None: ScriptedLabeler())

    def make(cfg):
        sl.run(cfg)
        return cfg

    return make


def test_full_fine_tune_changes_weights_and_saves_a_loadable_model(tiny_config, tiny_model_dir, sl_done):
    cfg = sl_done(tiny_config("sft.learning_rate=1e-2", "sft.epochs=2", "sft.logging_steps=1"))
    out = sft.run(cfg)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    after = AutoModelForCausalLM.from_pretrained(out)
    changed = [n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters()) if not torch.equal(a, b)]
    assert len(changed) > 5
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] >= 2 and metrics["last_logged_loss"] < metrics["first_logged_loss"]
    assert (out / "DONE").exists() and not (out / "checkpoints").exists()
    assert (out / "tokenizer_config.json").exists()


def test_loss_is_on_the_answer_only(tiny_config, sl_done):
    cfg = sl_done(tiny_config())
    dataset = datasets.load_from_disk(str(cfg.output_dir) + "/sl/dataset").map(sft.to_prompt_completion, remove_columns=["messages", "kind", "id"])
    model, tokenizer = load_model_and_tokenizer(cfg.policy.model, cfg)
    trainer = sft.build_trainer(cfg, model, tokenizer, dataset, __import__("pathlib").Path(cfg.output_dir) / "t")
    row = trainer.train_dataset[0]
    mask = [label != -100 for label in row["labels"]]
    answer = dataset[0]["completion"][0]["content"]
    trained_text = tokenizer.decode([t for t, m in zip(row["input_ids"], mask) if m])
    assert 0 < sum(mask) < len(mask)
    assert answer in trained_text and dataset[0]["prompt"][0]["content"] not in trained_text


def test_lora_trains_an_adapter_and_saves_it_merged(tiny_config, sl_done):
    cfg = sl_done(tiny_config("sft.lora=true", "sft.lora_r=4", "sft.learning_rate=1e-2"))
    out = sft.run(cfg)
    assert (out / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert json.loads((out / "metrics.json").read_text())["lora"] is True


def test_gpu_precision_trains_float32_master_weights_with_bf16_compute(tiny_config, tiny_model_dir, sl_done, monkeypatch):
    """policy.dtype=bfloat16 is what `auto` resolves to on a bf16 GPU (bf16 works on the CPU): the model
    is loaded float32 and TRL computes in bf16 (bf16=True); a small update (learning rate 1e-5, below bf16's
    resolution for most weights) moves nearly every weight, and the saved model is float32."""
    from safetensors.torch import load_file

    cfg = sl_done(tiny_config("policy.dtype=bfloat16", "sft.learning_rate=1e-5", "sft.epochs=1"))
    trainers = []
    real_build = sft.build_trainer

    def build_and_keep(*args, **kwargs):
        trainers.append(real_build(*args, **kwargs))
        return trainers[-1]

    monkeypatch.setattr(sft, "build_trainer", build_and_keep)
    out = sft.run(cfg)
    assert {p.dtype for p in trainers[0].model.parameters()} == {torch.float32}
    assert trainers[0].args.bf16 is True
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert {t.dtype for t in after.values()} == {torch.float32}
    names = [k for k in before if ".layers." in k]
    moved = sum(int((after[k] != before[k].to(after[k].dtype)).sum()) for k in names)
    assert moved / sum(before[k].numel() for k in names) > 0.9
