"""Shared fixtures: a tiny local model folder and configs that point every stage at it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tests.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir):
    """A factory: `tiny_config(**dotted_overrides)` -> Config for a fast run on the tiny model."""
    from cai.config import load_config

    def make(*extra: str):
        overrides = [
            f"output_dir={tmp_path / 'run'}",
            f"cache_dir={tmp_path / 'cache'}",
            f"policy.model={tiny_model_dir}",
            f"labeler.model={tiny_model_dir}",
            "constitution=constitutions/tiny.yaml",
            "policy.max_new_tokens=8",
            "labeler.max_new_tokens=8",
            "data.limit=20",
            "sft.max_length=128",
            "sft.batch_size=4",
            *extra,
        ]
        return load_config(None, overrides)

    return make
