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
