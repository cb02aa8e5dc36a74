"""End to end on the embedded default (SmolLM2-135M-Instruct): what `make demo` runs, made smaller."""

from __future__ import annotations

import os
import subprocess
import sys

import datasets
import pytest

from cai.records import read_jsonl
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_quickstart_pipeline_on_the_embedded_default(tmp_path):
    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}", "data.limit=10", "sl.rounds=1", "sl.revision_candidates=2", "policy.max_new_tokens=24", "labeler.max_new_tokens=24", "sft.epochs=1",
        "prefs.principles_per_pair=2", "rl.steps=2", "rl.batch_size=4", "rl.minibatch_size=2", "rl.samples=2",
        "eval.limit=2", "eval.bootstrap=100", "eval.audit_pairs=4", "eval.examples=2",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "cai", "run", "configs/quickstart.yaml", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("sl", "sft", "prefs", "rm", "rl", "eval"):
        assert f"[{stage}] done" in result.stdout, stage
    assert (out / "eval" / "report.html").exists()
    # The headline is measured by checks no stage trained against, and says which labeler did what.
    assert "Harmful requests declined | helpful ones refused: " in result.stdout
    assert "the preference labels came from the constitution's checks" in result.stdout
    assert "evaluation by eval.judge (rules:checkable-independent): independent of training" in result.stdout
    records = read_jsonl(out / "sl" / "records.jsonl")
    red = [r for r in records if r["kind"] == "red_team"]
    assert red and all(len(r["rounds"]) == 1 and r["rounds"][0]["critique"] for r in red)
    dataset = datasets.load_from_disk(str(out / "sl" / "dataset"))
    # the quickstart leaves out of SFT the red-team answers no round revised (sl.drop_unrevised)
    kept = [r for r in records if r["final"].strip() and (r["kind"] == "helpful" or r["revised"])]
    assert "messages" in dataset.column_names and sorted(dataset["id"]) == sorted(r["id"] for r in kept)
    assert (out / "sft" / "model.safetensors").exists() and (out / "sft" / "DONE").exists()
    # A second run skips every finished stage.
    again = subprocess.run(
        [sys.executable, "-m", "cai", "run", "configs/quickstart.yaml", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert again.returncode == 0 and again.stdout.count("skipping") == 6
