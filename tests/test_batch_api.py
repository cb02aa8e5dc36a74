"""The batch APIs (`labeler.batch_api`, cai/labelers/batch.py) with the real `openai` and `anthropic`
clients against the fake batch endpoint of tests/fake_batches.py: upload, in progress, completed with
errored lines, expired; a stage SIGKILLed while its batch runs and a rerun that resumes that batch
without submitting it again; `cai batches`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai.config import to_yaml
from cai.labelers import GenerateRequest
from cai.labelers.anthropic_api import AnthropicLabeler
from cai.labelers.batch import RESULTS_DIR, STATE_FILE, load_state
from cai.labelers.openai_api import OpenAILabeler
from cai.records import read_jsonl
from tests.fake_batches import FakeBatchServer

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(backoff_base=0.01, backoff_max=0.02, batch_api=True, batch_poll_seconds=0.02)


@pytest.fixture
def server():
    with FakeBatchServer(polls_until_done=3) as srv:
        yield srv


def labeler(cls, server, folder, **kwargs):
    url = server.openai_url if cls is OpenAILabeler else server.anthropic_url
    return cls("batch-model", base_url=url, batch_folder=str(folder), **{**FAST, "price": (2.0, 4.0), **kwargs})


def questions(n: int) -> list[GenerateRequest]:
    return [GenerateRequest([{"role": "user", "content": f"question {i}"}], max_new_tokens=8) for i in range(n)]


def asked(body: dict) -> str:
    return body["messages"][-1]["content"]


@pytest.mark.parametrize("cls", [OpenAILabeler, AnthropicLabeler])
def test_lifecycle_errored_and_expired_lines_are_retried_or_recorded_failed(cls, server, tmp_path):
    # batch 1: 6 lines, the first 4 run (question 1 errors with a 500, question 2 with a 400), 2 expire;
    # batch 2: the 500 and the two expired lines again, all answered.
    server.expire_after = 4
    server.line_error = lambda cid, body: (
        500 if asked(body) == "question 1" and len(server.batches) == 1 else 400 if asked(body) == "question 2" else None)
    lab = labeler(cls, server, tmp_path)
    got = {}
    try:
        results = lab.generate(questions(6), on_result=lambda i, r: got.setdefault(i, r))
    finally:
        lab.close()
    assert sorted(got) == list(range(6))  # every item reported, once
    assert [r.status for r in results] == ["ok", "ok", "failed", "ok", "ok", "ok"]
    assert "400" in results[2].error
    assert [r.text for r in results if r.status == "ok"] == [f"Answer to: question {i}" for i in (0, 1, 3, 4, 5)]
    batches = list(server.batches.values())
    assert [len(b["lines"]) for b in batches] == [6, 3]
    assert sorted(asked(body) for _, body in batches[1]["lines"]) == ["question 1", "question 4", "question 5"]
    assert all(b["polls"] >= 3 for b in batches)  # it waited while they were in progress
    state = load_state(tmp_path)
    assert [b["id"] for b in state["batches"]] == [b["id"] for b in batches]
    assert all((tmp_path / RESULTS_DIR / f"{b['id']}.jsonl").exists() for b in batches)
    # the batch price: half of labeler.prices, for the answered lines
    assert lab.usage.extra["batches"] == 2
    expected = sum(0.5 * (2.0 * r.input_tokens + 4.0 * r.output_tokens) / 1e6 for r in results if r.status == "ok")
    assert lab.usage.cost == pytest.approx(expected)


def test_a_line_that_keeps_failing_is_recorded_failed_after_max_tries(server, tmp_path):
    server.line_error = lambda cid, body: 503 if asked(body) == "question 0" else None
    lab = labeler(OpenAILabeler, server, tmp_path, max_tries=3)
    try:
        results = lab.generate(questions(2))
    finally:
        lab.close()
    assert results[0].status == "failed" and "gave up after 3 tries" in results[0].error
    assert results[1].status == "ok"
    assert [len(b["lines"]) for b in server.batches.values()] == [2, 1, 1]


KILLABLE = "import sys; from cai.cli import main; sys.exit(main(sys.argv[1:]))"


def test_sigkill_while_the_batch_runs_then_rerun_resumes_it_without_resubmitting(tiny_config, server, tmp_path):
    server.polls_until_done = 10**9  # in progress until the test lets it end
    cfg = tiny_config("labeler.backend=openai", "labeler.model=batch-model", f"labeler.base_url={server.openai_url}",
                      "labeler.batch_api=true", "labeler.batch_poll_seconds=0.05", "data.limit=30")
    config = tmp_path / "config.yaml"
    config.write_text(to_yaml(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    state = Path(cfg.output_dir) / "sl" / STATE_FILE
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, "sl", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (state.exists() and
                                                                 next(iter(server.batches.values()))["polls"] >= 2):
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = load_state(state.parent)["batches"]
    assert len(first) == 1 and first[0]["status"] == "in_progress" and len(server.batches) == 1

    listed = subprocess.run([sys.executable, "-c", KILLABLE, "batches", str(config)], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert listed.returncode == 0 and first[0]["id"] in listed.stdout and "in_progress" in listed.stdout

    server.polls_until_done = 1
    done = subprocess.run([sys.executable, "-c", KILLABLE, "sl", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming" in done.stdout
    batches = list(server.batches.values())
    assert batches[0]["id"] == first[0]["id"] and batches[0]["outputs"] is not None  # the same batch, resumed
    ids = [cid for b in batches for cid, _ in b["lines"]]
    assert len(ids) == len(set(ids))  # no request submitted twice
    records = read_jsonl(Path(cfg.output_dir) / "sl" / "records.jsonl")
    red = [r for r in records if r["kind"] == "red_team"]
    assert len(red) == 12 and all(rnd["critique_status"] == "ok" for r in red for rnd in r["rounds"])
    lines = sum(len(b["lines"]) for b in batches)
    assert lines == 2 * len(red)  # one critique and one revision per red-team prompt, each asked once
    usage = json.loads((Path(cfg.output_dir) / "sl" / "labeler_usage.json").read_text())
    assert usage["total"]["batches"] == len(batches) - 1  # the rerun submitted all but the resumed one
    after = subprocess.run([sys.executable, "-c", KILLABLE, "batches", str(config)], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    assert "no open labeler batches" in after.stdout


def test_choices_in_batches_logprobs_in_one_batch_votes_in_the_next(server, tmp_path):
    from cai.labelers import ChoiceRequest

    def pick(text):
        return ChoiceRequest([{"role": "user", "content": text}])

    server.logprobs = lambda body: [{"(": -0.01}, {"B": -0.2, "A": -1.8}]
    lab = labeler(OpenAILabeler, server, tmp_path / "logprobs")
    try:
        choices = lab.choose([pick("first"), pick("second")])
    finally:
        lab.close()
    assert all(c.method == "logprobs" and c.status == "ok" and c.probs[1] > 0.7 for c in choices)
    assert [len(b["lines"]) for b in server.batches.values()] == [2]  # no probe batch before them

    # Anthropic has no log-probabilities: the votes of both items go out together, prefilled
    server.batches.clear()
    votes = iter("A) B) B) B) A) A) A) B)".split())
    server.reply = lambda api, body: next(votes)
    lab = labeler(AnthropicLabeler, server, tmp_path / "votes", vote_samples=4)
    try:
        choices = lab.choose([pick("first"), pick("second")])
    finally:
        lab.close()
    assert [len(b["lines"]) for b in server.batches.values()] == [8]
    assert all(c.method == "votes" and c.status == "ok" for c in choices)
    assert sorted(sum(c.probs) for c in choices) == [1.0, 1.0]
    lines = next(iter(server.batches.values()))["lines"]
    assert len({cid for cid, _ in lines}) == 8  # identical vote requests get distinct custom ids
    assert all(body["messages"][-1] == {"role": "assistant", "content": "The answer is: ("} for _, body in lines)


def test_a_batch_stays_under_the_providers_size_limit(server, tmp_path, monkeypatch):
    from cai.labelers import batch

    monkeypatch.setitem(batch.MAX_BYTES, "openai", 1000)  # about three of these requests per batch
    lab = labeler(OpenAILabeler, server, tmp_path)
    try:
        results = lab.generate([GenerateRequest([{"role": "user", "content": f"{i} " + "x" * 100}]) for i in range(7)])
    finally:
        lab.close()
    assert all(r.status == "ok" for r in results)
    sizes = [len(b["lines"]) for b in server.batches.values()]
    assert sum(sizes) == 7 and len(sizes) >= 3 and max(sizes) <= 3


def test_a_failed_look_at_a_running_batch_is_tried_again_not_resubmitted(server, tmp_path, caplog):
    server.poll_faults = 2
    lab = labeler(OpenAILabeler, server, tmp_path)
    try:
        results = lab.generate(questions(3))
    finally:
        lab.close()
    assert all(r.status == "ok" for r in results) and len(server.batches) == 1
    assert "looking at it failed" in caplog.text and server.poll_faults == 0
