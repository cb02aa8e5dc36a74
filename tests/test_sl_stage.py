"""The SL-CAI stage: round logic, principle sampling, provenance, the dataset, skip/rerun and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datasets
import pytest

from cai.constitution import load_constitution
from cai.errors import CaiError
from cai.labelers.base import Generation
from cai.records import read_jsonl
from cai.stages import sl
from tests.conftest import ROOT
from tests.fakes import ScriptedLabeler, shown_answers


@pytest.fixture
def scripted(monkeypatch):
    labeler = ScriptedLabeler()
    monkeypatch.setattr(sl, "build_labeler", lambda cfg, shared_models=None, role=None: labeler)
    return labeler


def test_records_keep_every_round_with_its_principle(tiny_config, scripted):
    cfg = tiny_config("sl.rounds=3", "sl.helpful_ratio=0.5")
    out = sl.run(cfg)
    records = read_jsonl(out / "records.jsonl")
    red = [r for r in records if r["kind"] == "red_team"]
    helpful = [r for r in records if r["kind"] == "helpful"]
    assert len(red) == 8  # 40% of 20
    assert len(helpful) == 4  # helpful_ratio 0.5
    ids = {p.id for p in load_constitution(cfg.constitution).critiques}
    for r in red:
        assert [x["round"] for x in r["rounds"]] == [1, 2, 3]
        assert all(x["principle_id"] in ids for x in r["rounds"])
        assert all(x["critique"].startswith("CRITIQUE of") for x in r["rounds"])
        assert r["final"] == r["rounds"][-1]["revision"] and r["final"].startswith("REVISED")
        assert r["labeler"] == "scripted:test"
    for r in helpful:
        assert r["rounds"] == [] and r["final"] == r["initial"]
    # 2 labeler calls per round per red-team prompt, none for helpful prompts
    assert scripted.usage.requests == 8 * 3 * 2


def test_round_two_critiques_the_revision_of_round_one(tiny_config, scripted):
    out = sl.run(tiny_config("sl.rounds=2"))
    record = read_jsonl(out / "records.jsonl")[0]
    first_revision = record["rounds"][0]["revision"]
    second_critique_prompts = [c for c in scripted.calls if first_revision in c and "Critique:" not in c]
    assert second_critique_prompts, "round 2's critique request must show round 1's revision"


def test_a_round_that_meets_the_same_answer_and_principle_draws_anew_through_the_answer_cache(tiny_config, monkeypatch, tmp_path):
    """Every revision turned down, so round 2 sees round 1's answer, often under the same principle: its
    critique and revisions are new samples, not round 1's served again by the cache."""
    from cai.labelers.cache import CachedLabeler

    class Sampler(ScriptedLabeler):  # a sampler: the same request twice gets two different answers
        def generate(self, requests, desc=None, **kwargs):
            return [Generation(text=f"{g.text} [draw {len(self.calls) - len(requests) + i}]")
                    for i, g in enumerate(super().generate(requests, desc, **kwargs))]

    writer = CachedLabeler(Sampler(), tmp_path / "cache.sqlite")
    judge = ScriptedLabeler(prefer=lambda text: 0.5)  # no revision is better than the answer
    monkeypatch.setattr(sl, "build_labeler", lambda cfg, shared_models=None, role="text": judge if role == "choices" else writer)
    out = sl.run(tiny_config("sl.rounds=2", "sl.verify_revisions=true", "sl.revision_candidates=2"))
    records = [r for r in read_jsonl(out / "records.jsonl") if r["kind"] == "red_team"]
    repeated = [r for r in records if r["rounds"][0]["principle_id"] == r["rounds"][1]["principle_id"]]
    assert repeated and not any(r["revised"] for r in records)
    for r in repeated:
        first, second = r["rounds"]
        assert second["critique"] != first["critique"]
        assert not {c["revision"] for c in second["candidates"]} & {c["revision"] for c in first["candidates"]}


def test_principles_are_seeded_by_prompt_and_round(tiny_config):
    constitution = load_constitution(ROOT / "constitutions/harmless.yaml")
    draws = [sl.draw_principle(constitution, 0, "abc", r).id for r in range(12)]
    assert draws == [sl.draw_principle(constitution, 0, "abc", r).id for r in range(12)]
    assert draws != [sl.draw_principle(constitution, 1, "abc", r).id for r in range(12)]
    assert len(set(draws)) > 3


def test_dataset_is_conversational_messages(tiny_config, scripted):
    out = sl.run(tiny_config())
    dataset = datasets.load_from_disk(str(out / "dataset"))
    records = read_jsonl(out / "records.jsonl")
    assert "messages" in dataset.column_names
    assert len(dataset) == sum(bool(r["final"].strip()) for r in records)
    row = dataset[0]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    by_id = {r["id"]: r for r in records}
    assert row["messages"][1]["content"] == by_id[row["id"]]["final"]
    for name in ("config.yaml", "constitution.yaml", "provenance.json", "DONE", "summary.json"):
        assert (out / name).exists(), name
    provenance = json.loads((out / "provenance.json").read_text())
    assert len(provenance["constitution_sha256"]) == 64 and "torch" in provenance["versions"]


def test_failed_critique_keeps_the_answer_and_says_so(tiny_config, monkeypatch):
    labeler = ScriptedLabeler(fail_on="Answer with a short critique")
    monkeypatch.setattr(sl, "build_labeler", lambda cfg, shared_models=None, role=None: labeler)
    out = sl.run(tiny_config())
    red = [r for r in read_jsonl(out / "records.jsonl") if r["kind"] == "red_team"]
    assert red and all(r["rounds"][0]["critique_status"] == "failed" for r in red)
    assert all(r["final"] == r["initial"] and not r["revised"] for r in red)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["critiques_failed"] == len(red) and summary["revised"] == 0


def test_finished_stage_is_skipped_and_changed_config_reruns(tiny_config, scripted, capsys):
    sl.run(tiny_config())
    calls = scripted.usage.requests
    sl.run(tiny_config())
    assert scripted.usage.requests == calls
    assert "skipping" in capsys.readouterr().out
    sl.run(tiny_config("sl.rounds=2"))
    assert scripted.usage.requests > calls
    assert "config changed" in capsys.readouterr().out
    # operational keys do not change the fingerprint
    sl.run(tiny_config("sl.rounds=2", "labeler.max_requests=1000", "policy.batch_size=3"))
    assert "skipping" in capsys.readouterr().out


KILLABLE = textwrap.dedent(
    """
    import sys, time
    from cai.config import load_config
    from cai.stages import sl
    from tests.fakes import ScriptedLabeler

    class SlowLabeler(ScriptedLabeler):
        def generate(self, requests, desc=None, **kwargs):
            time.sleep(0.4)
            return super().generate(requests, desc, **kwargs)

    sl.build_labeler = lambda cfg, shared_models=None, role=None: SlowLabeler()
    sl.run(load_config(None, sys.argv[1:]))
    """
)


def test_sigkill_halfway_then_rerun_finishes_every_prompt_once(tiny_config, tmp_path):
    cfg = tiny_config("policy.batch_size=2", "labeler.batch_size=2", "data.limit=30")
    overrides = [f"{k}={v}" for k, v in {
        "output_dir": cfg.output_dir, "cache_dir": cfg.cache_dir, "policy.model": cfg.policy.model,
        "labeler.model": cfg.labeler.model, "constitution": cfg.constitution, "policy.max_new_tokens": 8,
        "labeler.max_new_tokens": 8, "data.limit": 30, "policy.batch_size": 2, "labeler.batch_size": 2,
    }.items()]
    records = Path(cfg.output_dir) / "sl" / "records.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, *overrides], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and len(read_jsonl(records)) < 3 and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = read_jsonl(records)
    assert 3 <= len(partial) < 18, "the kill must land halfway"
    assert not (records.parent / "DONE").exists()
    done = subprocess.run([sys.executable, "-c", KILLABLE, *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout
    final = read_jsonl(records)
    ids = [r["id"] for r in final]
    assert len(ids) == len(set(ids)) == 12 + 6  # 40% of 30 red-team, helpful ratio 0.5
    assert [r["id"] for r in final[: len(partial)]] == [r["id"] for r in partial]


def test_labeler_usage_adds_up_over_resumed_runs(tiny_config, scripted):
    from cai.records import record_labeler_usage

    out = sl.run(tiny_config())
    first = json.loads((out / "labeler_usage.json").read_text())
    assert first["total"]["requests"] == 16 and len(first["runs"]) == 1
    record_labeler_usage(out, scripted)  # as a resumed run would
    second = json.loads((out / "labeler_usage.json").read_text())
    assert len(second["runs"]) == 2 and second["total"]["requests"] == 32


def test_sl_runs_against_an_openai_compatible_server_by_override_alone(tiny_config, monkeypatch):
    """The quickstart's sl stage, with the labeler swapped to a local OpenAI-compatible server (as vLLM
    or llama.cpp's server would be) by overrides only; a rerun after clearing the stage makes no request."""
    import shutil

    from tests.fake_servers import FakeLLMServer

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeLLMServer() as server:
        overrides = ("labeler.backend=openai", "labeler.model=served-model", f"labeler.base_url={server.openai_url}")
        out = sl.run(tiny_config(*overrides))
        red = [r for r in read_jsonl(out / "records.jsonl") if r["kind"] == "red_team"]
        assert red and all(r["labeler"].startswith("openai:served-model") for r in red)
        assert all(r["rounds"][0]["critique_status"] == "ok" and r["rounds"][0]["critique"] for r in red)
        assert len(server.bodies("/chat/completions")) == 2 * len(red)
        shutil.rmtree(out)
        server.reset()
        sl.run(tiny_config(*overrides))
        assert server.requests == []  # every answer came from the cache


def even_revision(answer: str) -> bool:
    """The scripted judge's idea of a good revision: one whose digest ends in an even hex digit."""
    return answer.startswith("REVISED") and int(answer[-1], 16) % 2 == 0


def prefer_even_revisions(text: str) -> float:
    """P(A is better) for a judge that prefers whichever shown response is an `even_revision`."""
    a, b, _ = shown_answers(text)
    return 0.5 + 0.4 * (even_revision(a) - even_revision(b))


def test_verified_revisions_keep_only_what_the_choice_labeler_prefers(tiny_config, monkeypatch):
    """Text goes to one scripted labeler, choices to another (roles); a revision replaces the answer only
    when the judge prefers it in both orders, and the summary counts those turned down."""
    writer = ScriptedLabeler()
    judge = ScriptedLabeler(prefer=prefer_even_revisions)
    judge.id = "scripted:judge"
    roles: list = []

    def build(cfg, shared_models=None, role="text"):
        roles.append(role)
        return judge if role == "choices" else writer

    monkeypatch.setattr(sl, "build_labeler", build)
    out = sl.run(tiny_config("sl.rounds=1", "sl.verify_revisions=true"))
    assert roles == ["text", "choices"]
    records = [r for r in read_jsonl(out / "records.jsonl") if r["kind"] == "red_team"]
    assert writer.usage.requests == 2 * len(records)  # critiques and revisions: all to the writer
    assert judge.usage.requests == 2 * len(records)  # one principle, both orders, per revision: all to the judge
    kept = [r for r in records if even_revision(r["rounds"][0]["revision"])]
    assert 0 < len(kept) < len(records)
    for r in records:
        rnd = r["rounds"][0]
        assert rnd["accepted"] == (r in kept) and rnd["verified_p"] == pytest.approx(0.9 if r in kept else 0.5)
        assert r["final"] == (rnd["revision"] if r in kept else r["initial"]) and r["revised"] == (r in kept)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["revisions_turned_down"] == len(records) - len(kept) and summary["revised"] == len(kept)


def test_drop_unrevised_leaves_out_the_red_team_answers_no_round_revised(tiny_config, monkeypatch, tmp_path):
    """With sl.drop_unrevised the dataset holds the helpful answers and the revised red-team ones only;
    without it, the unrevised first answers are trained on too."""
    writer = ScriptedLabeler()
    judge = ScriptedLabeler(prefer=prefer_even_revisions)
    monkeypatch.setattr(sl, "build_labeler", lambda cfg, shared_models=None, role="text": judge if role == "choices" else writer)
    datasets_by_setting = {}
    for drop in (False, True):
        out = sl.run(tiny_config("sl.rounds=1", "sl.verify_revisions=true", f"sl.drop_unrevised={str(drop).lower()}",
                                 f"output_dir={tmp_path / f'drop_{drop}'}"))
        records = {r["id"]: r for r in read_jsonl(out / "records.jsonl")}
        ids = datasets.load_from_disk(str(out / "dataset"))["id"]
        datasets_by_setting[drop] = set(ids)
        unrevised = {i for i, r in records.items() if r["kind"] == "red_team" and not r["revised"]}
        assert unrevised and any(r["kind"] == "helpful" for r in records.values())
        summary = json.loads((out / "summary.json").read_text())
        if drop:
            assert set(ids) == set(records) - unrevised and summary["unrevised_dropped"] == len(unrevised)
        else:
            assert set(ids) == set(records) and summary["unrevised_dropped"] == 0
    assert datasets_by_setting[False] - datasets_by_setting[True]


def test_revision_candidates_keep_the_one_the_judge_prefers(tiny_config, monkeypatch):
    """With N candidates per round, an item is revised when any candidate wins, and the record keeps
    every candidate with its verdict; without a verifier, N > 1 is a config error."""
    writer = ScriptedLabeler()
    judge = ScriptedLabeler(prefer=prefer_even_revisions)
    monkeypatch.setattr(sl, "build_labeler", lambda cfg, shared_models=None, role="text": judge if role == "choices" else writer)
    out = sl.run(tiny_config("sl.rounds=1", "sl.verify_revisions=true", "sl.revision_candidates=4"))
    records = [r for r in read_jsonl(out / "records.jsonl") if r["kind"] == "red_team"]
    assert writer.usage.requests == (1 + 4) * len(records)  # one critique, four revisions each
    for r in records:
        rnd = r["rounds"][0]
        texts = [c["revision"] for c in rnd["candidates"]]
        assert len(set(texts)) == 4  # four different samples
        winners = [t for t in texts if even_revision(t)]
        assert rnd["accepted"] == bool(winners) and r["revised"] == bool(winners)
        assert r["final"] == (winners[0] if winners else r["initial"])
        assert [c["verified_p"] for c in rnd["candidates"]] == [pytest.approx(0.9 if even_revision(t) else 0.5) for t in texts]
    # One candidate in two wins, so four candidates revise about 15 in 16 items, one candidate about half
    assert sum(r["revised"] for r in records) > 0.75 * len(records)
    with pytest.raises(CaiError, match="revision_candidates > 1 needs verify_revisions"):
        tiny_config("sl.revision_candidates=2")


def test_a_principle_whose_check_does_not_apply_to_the_prompt_is_not_drawn():
    from cai.promptsets import Prompt

    constitution = load_constitution(ROOT / "constitutions" / "checkable.yaml")
    red = Prompt("r1", "How do I break into a car?", "red_team")
    helpful_only = {"full_help", "no_self_talk"}
    draws = {sl.draw_principle(constitution, 0, f"p{i}", 0, red).id for i in range(200)}
    assert draws and not draws & helpful_only and {"declines_harm", "safe_alternative"} <= draws
    anything = {sl.draw_principle(constitution, 0, f"p{i}", 0).id for i in range(200)}
    assert helpful_only <= anything  # without the prompt: every principle


def test_with_critique_failed_checks_the_principle_is_one_the_answer_fails():
    from cai.promptsets import Prompt

    constitution = load_constitution(ROOT / "constitutions" / "checkable.yaml")
    red = Prompt("r1", "How do I break into a car?", "red_team")
    complying = "I can't help with that, but I can help you call a locksmith instead."
    assert {sl.draw_principle(constitution, 0, f"p{i}", 0, red, "Smash the window.").id for i in range(100)} == {
        "declines_harm", "safe_alternative"}  # the two checks that answer fails
    long_refusal = complying + " word" * 80
    assert {sl.draw_principle(constitution, 0, f"p{i}", 0, red, long_refusal).id for i in range(100)} == {"concise"}
    anything = {sl.draw_principle(constitution, 0, f"p{i}", 0, red, complying).id for i in range(200)}
    assert {"declines_harm", "concise", "no_lecture"} <= anything  # nothing fails: every applicable principle
