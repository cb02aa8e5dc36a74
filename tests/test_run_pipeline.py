"""`cai run` through every stage on the tiny model with a scripted labeler behind the real answer cache:
killed at each stage boundary and by SIGKILL in the middle of prefs, rerun, it finishes with nothing
lost and no labeler request answered twice; a changed config reruns that stage and those after it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cai.cli as cli
import cai.labelers.local as local
from cai.records import DONE, read_jsonl
from cai.stages import STAGES
from tests.conftest import ROOT
from tests.fakes import ScriptedLabeler

CONFIG = str(ROOT / "configs" / "quickstart.yaml")


def request_key(kind: str, request) -> str:
    fields = {"kind": kind, **{k: v for k, v in vars(request).items()}}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RecordingLabeler(ScriptedLabeler):
    """A scripted labeler that logs every request it answers (one fsynced line each, so the log survives
    a SIGKILL) and, with `kill_after`, SIGKILLs its own process when asked its Nth choice batch."""

    def __init__(self, log: str | Path, kill_after: int | None = None):
        super().__init__(prefer=lambda text: 0.5 + (len(text) % 7) / 20)
        self.log = Path(log)
        self.kill_after = kill_after
        self.choice_batches = 0

    def _record(self, kind: str, requests) -> None:
        with open(self.log, "a") as f:
            f.write("".join(request_key(kind, r) + "\n" for r in requests))
            f.flush()
            os.fsync(f.fileno())

    def generate(self, requests, desc=None):
        out = super().generate(requests, desc)
        self._record("generate", requests)
        return out

    def choose(self, requests, desc=None):
        self.choice_batches += 1
        if self.kill_after is not None and self.choice_batches > self.kill_after:
            os.kill(os.getpid(), 9)  # mid-batch: these answers are never given back
        out = super().choose(requests, desc)
        self._record("choose", requests)
        return out


def install(log: Path, kill_after: int | None = None, monkeypatch=None) -> RecordingLabeler:
    """Put the recording labeler behind `cai.labelers.build_labeler` (which wraps it in the cache)."""
    labeler = RecordingLabeler(log, kill_after)
    factory = classmethod(lambda cls, cfg, shared_models=None: labeler)
    if monkeypatch is not None:
        monkeypatch.setattr(local.LocalLabeler, "from_config", factory)
    else:  # in a child process that is about to be killed
        local.LocalLabeler.from_config = factory
    return labeler


def run_overrides(tmp_path: Path, model: Path, *extra: str) -> list[str]:
    """The quickstart on the tiny model and constitution, with the labeler doing every job (so that every
    request goes through the recording labeler) and no part of the demo that needs checkable.yaml."""
    return [
        "choice_labeler=null", "sl.rounds=1", "sl.few_shot=false", "sl.critique_failed_checks=false", "sl.verify_revisions=false",
        "sl.revision_candidates=1",
        "prefs.principles_per_pair=2", "rl.constraints=[]", "rl.keep_snapshots=false", "eval.prompts=[]", "eval.principles_per_pair=2",
        f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", f"policy.model={model}", f"labeler.model={model}",
        "constitution=constitutions/tiny.yaml", "eval.judge=null", "policy.max_new_tokens=8", "labeler.max_new_tokens=8", "data.limit=20",
        "sft.max_length=128", "sft.batch_size=4", "sft.epochs=1", "rm.batch_size=4", "rl.steps=2", "rl.batch_size=4",
        "rl.minibatch_size=2", "rl.samples=2", "eval.bootstrap=200", "eval.examples=2", "labeler.batch_size=2", *extra,
    ]


def answered(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def finished(run: Path) -> list[str]:
    return [s for s in STAGES if (run / s / DONE).exists()]


def test_run_killed_at_every_stage_boundary_finishes_and_asks_nothing_twice(tmp_path, tiny_model_dir, monkeypatch, capsys):
    log = tmp_path / "answered.log"
    install(log, monkeypatch=monkeypatch)
    args = ["run", CONFIG, *run_overrides(tmp_path, tiny_model_dir)]
    run = tmp_path / "run"
    real_run_stage = cli.run_stage

    # Killed as each stage is about to start: every earlier stage is kept and skipped by the next run.
    for k, killed_at in enumerate(STAGES[1:], start=1):
        def run_stage(name, cfg, killed_at=killed_at):
            if name == killed_at:
                raise KeyboardInterrupt
            return real_run_stage(name, cfg)

        monkeypatch.setattr(cli, "run_stage", run_stage)
        assert cli.main(args) == 130
        assert finished(run) == list(STAGES[:k])
        out = capsys.readouterr().out
        for done in STAGES[: k - 1]:
            assert f"[{done}] already complete with this config, skipping" in out
    monkeypatch.setattr(cli, "run_stage", real_run_stage)
    assert cli.main(args) == 0
    assert finished(run) == list(STAGES)
    out = capsys.readouterr().out
    assert f"Report: {run / 'eval' / 'report.html'}" in out
    summary = out.split("Report: ", 1)[1].splitlines()[1:4]
    assert summary[0].strip().startswith("Win rate, RL policy vs initial model: ")
    assert summary[1].strip().startswith("Harmlessness on red-team prompts: ")
    assert summary[2].strip().startswith("Over-refusal on helpful prompts: ")
    keys = answered(log)
    assert keys and len(keys) == len(set(keys))

    # Everything done: nothing runs, the labeler is asked nothing.
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert all(f"[{s}] already complete" in out for s in STAGES) and answered(log) == keys

    # A changed rl key reruns rl and eval (and says so), nothing before them; no answer is asked for again.
    assert cli.main(["run", CONFIG, *run_overrides(tmp_path, tiny_model_dir, "rl.steps=3")]) == 0
    out = capsys.readouterr().out
    assert all(f"[{s}] already complete" in out for s in ("sl", "sft", "prefs", "rm"))
    assert "[rl] config changed since the last run" in out and "[eval] config changed since the last run" in out
    assert len(read_jsonl(run / "rl" / "metrics.jsonl")) == 3
    keys = answered(log)
    assert len(keys) == len(set(keys))

    # --only and --from
    assert cli.main(["run", CONFIG, *run_overrides(tmp_path, tiny_model_dir, "rl.steps=3"), "--only", "eval"]) == 0
    assert "[eval] already complete" in capsys.readouterr().out
    assert cli.main(["run", CONFIG, *run_overrides(tmp_path, tiny_model_dir, "rl.steps=3"), "--from", "rm"]) == 0
    out = capsys.readouterr().out
    assert "[sl]" not in out and all(f"[{s}] already complete" in out for s in ("rm", "rl", "eval"))


def test_run_sigkilled_in_the_middle_of_prefs_resumes(tmp_path, tiny_model_dir, monkeypatch, capsys):
    log = tmp_path / "answered.log"
    args = ["run", CONFIG, *run_overrides(tmp_path, tiny_model_dir)]
    script = (
        "import sys; from tests.test_run_pipeline import install; from cai.cli import main; "
        f"install({str(log)!r}, kill_after=3); sys.exit(main({args!r}))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = tmp_path / "run"
    assert finished(run) == ["sl", "sft"]
    records = read_jsonl(run / "prefs" / "records.jsonl")
    assert len(records) == 3 * 2  # three batches of two pairs were labeled before the kill
    before = answered(log)

    install(log, monkeypatch=monkeypatch)
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "[prefs] resuming the unfinished run" in out and "[sl] already complete" in out
    assert finished(run) == list(STAGES)
    records = read_jsonl(run / "prefs" / "records.jsonl")
    assert len(records) == len({r["id"] for r in records}) == json.loads((run / "prefs" / "summary.json").read_text())["pairs"]
    assert records[:6] == read_jsonl(run / "prefs" / "records.jsonl")[:6]
    keys = answered(log)
    assert len(keys) > len(before) and len(keys) == len(set(keys))  # nothing answered twice, across the kill


@pytest.mark.parametrize("stage, missing", [("sft", "sl"), ("prefs", "sft"), ("rm", "sft"), ("rl", "sft"), ("eval", "sft")])
def test_a_stage_whose_input_is_missing_names_the_stage(tmp_path, tiny_model_dir, capsys, stage, missing):
    (tmp_path / "run" / missing).mkdir(parents=True)  # started, never finished (no DONE)
    code = cli.main(["run", CONFIG, *run_overrides(tmp_path, tiny_model_dir), "--only", stage])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and f"the {missing} stage" in err[0] and f"cai {missing} CONFIG" in err[0]
