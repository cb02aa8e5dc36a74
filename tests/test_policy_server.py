"""Policy sampling on an OpenAI-compatible server (`policy.base_url`, cai/policy_server.py), against
the fake server of tests/fake_servers.py, in sl, prefs and eval: answers in the records, a resumed
stage samples nothing twice, the served model's name checked before anything is written, the
server's usage in the stage folder."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest

from cai.errors import CaiError
from cai.labelers import BudgetExceeded
from cai.records import DONE, read_jsonl
from cai.stages import eval as eval_stage
from cai.stages import prefs, sl
from tests.fake_servers import FakeLLMServer
from tests.fakes import ScriptedLabeler
from tests.test_eval_report import hand_made_run, models, overrides, scripted  # noqa: F401 (fixtures)


@pytest.fixture
def server():
    with FakeLLMServer() as srv:
        yield srv


def policy_bodies(server, model: str) -> list[dict]:
    return [b for b in server.bodies("/chat/completions") if b.get("model") == model]


class StopsOnCall(ScriptedLabeler):
    """Scripted, until its `stop_on`-th generate call: then a budget stop, as `labeler.max_requests` makes."""

    def __init__(self, stop_on: int):
        super().__init__()
        self.generate_calls, self.stop_on = 0, stop_on

    def generate(self, requests, desc=None, **kwargs):
        self.generate_calls += 1
        if self.generate_calls == self.stop_on:
            raise BudgetExceeded("labeler.max_requests reached")
        return super().generate(requests, desc, **kwargs)


def test_sl_samples_the_policy_on_the_server_and_a_resumed_run_samples_nothing_twice(
        tiny_config, server, monkeypatch):
    server.served_models = ["served-policy"]
    cfg = tiny_config(f"policy.base_url={server.openai_url}", "policy.served_model=served-policy",
                      "policy.model=org/not-downloaded", "data.limit=30")
    monkeypatch.setattr(sl, "build_labeler", lambda cfg, shared_models=None, role=None: StopsOnCall(stop_on=3))
    with pytest.raises(BudgetExceeded):
        sl.run(cfg)  # stops in the second batch, after its policy answers were received
    partial = read_jsonl(Path(cfg.output_dir) / "sl" / "records.jsonl")
    assert len(partial) == 8
    first_run = len(policy_bodies(server, "served-policy"))
    assert first_run == 16

    monkeypatch.setattr(sl, "build_labeler", lambda cfg, shared_models=None, role=None: ScriptedLabeler())
    out = sl.run(cfg)
    records = read_jsonl(out / "records.jsonl")
    assert len(records) == len({r["id"] for r in records}) == 18
    sent = policy_bodies(server, "served-policy")
    assert len(sent) == 18  # the second batch's answers came from the cache; only the last 2 were asked
    asked = {b["messages"][-1]["content"] for b in sent}
    assert len(asked) == 18
    for record in records:
        assert record["initial"].startswith("Answer to: ") and record["initial"][len("Answer to: "):] in asked
        assert record["initial_status"] == "ok"


def test_served_model_is_checked_by_name_in_one_line(tiny_config, server, tiny_model_dir):
    server.served_models = ["someone-else"]
    cfg = tiny_config(f"policy.base_url={server.openai_url}")
    with pytest.raises(CaiError) as err:
        sl.run(cfg)
    message = str(err.value)
    assert "\n" not in message and "someone-else" in message and str(tiny_model_dir) in message
    assert not server.bodies("/chat/completions")
    assert not (Path(cfg.output_dir) / "sl").exists()  # checked before anything is written
    # vLLM names a model by the path it was started with: the same folder under another spelling matches
    server.served_models = [str(tiny_model_dir) + "/"]
    from cai.policy_server import open_policy

    open_policy(cfg, str(tiny_model_dir)).close()


def test_no_server_at_policy_base_url_is_one_line(tiny_config):
    cfg = tiny_config("policy.base_url=http://127.0.0.1:9/v1")
    with pytest.raises(CaiError, match="no server answers at http://127.0.0.1:9/v1"):
        sl.run(cfg)


def test_prefs_samples_the_sft_model_on_the_server(tiny_config, server, monkeypatch):
    from cai.records import mark_done
    from cai.stages import stage_fingerprint

    cfg = tiny_config("data.limit=10")
    sft_dir = Path(cfg.output_dir) / "sft"
    sft_dir.mkdir(parents=True)
    mark_done(sft_dir, stage_fingerprint(cfg, "sft"))  # the folder vLLM would be serving, made under cfg
    counter = itertools.count()
    with FakeLLMServer() as second:  # a pool of two servers of the sft model
        for srv in (server, second):
            srv.served_models = [str(sft_dir)]
            srv.reply = lambda api, body: f"sampled answer number {next(counter)}"
        cfg = tiny_config("data.limit=10", f"policy.base_url={json.dumps([server.openai_url, second.openai_url])}",
                          "policy.concurrency=1")
        monkeypatch.setattr(prefs, "build_labeler", lambda cfg, shared_models=None, role=None: ScriptedLabeler())
        out = prefs.run(cfg)
        samples = read_jsonl(out / "samples.jsonl")
        assert samples and all(s["answers"][0].startswith("sampled answer number") for s in samples)
        sent = [len(policy_bodies(srv, str(sft_dir))) for srv in (server, second)]
    assert sum(sent) == sum(len(s["answers"]) for s in samples) and min(sent) > 0


def test_prefs_checks_its_policy_server_before_its_stage_folder_exists(tiny_config, server):
    from cai.records import mark_done
    from cai.stages import stage_fingerprint

    server.served_models = ["last-weeks-model"]
    cfg = tiny_config("data.limit=10", f"policy.base_url={server.openai_url}")
    sft_dir = Path(cfg.output_dir) / "sft"
    sft_dir.mkdir(parents=True)
    mark_done(sft_dir, stage_fingerprint(cfg, "sft"))
    with pytest.raises(CaiError) as err:
        prefs.run(cfg)
    assert "\n" not in str(err.value) and "last-weeks-model" in str(err.value) and str(sft_dir) in str(err.value)
    assert not (Path(cfg.output_dir) / "prefs").exists()
    assert not server.bodies("/chat/completions")


def test_the_policy_servers_usage_is_written_to_the_stage_folder(tiny_config, server, monkeypatch):
    """policy_usage.json: the policy's requests, tokens and requests per server of a pool, added up over
    a resumed run (the second run's answers come from the cache)."""
    with FakeLLMServer() as second:
        for srv in (server, second):
            srv.served_models = ["served-policy"]
        urls = [server.openai_url, second.openai_url]
        cfg = tiny_config(f"policy.base_url={json.dumps(urls)}", "policy.served_model=served-policy",
                          "policy.model=org/not-downloaded", "policy.concurrency=1", "data.limit=30")
        monkeypatch.setattr(sl, "build_labeler", lambda cfg, shared_models=None, role=None: StopsOnCall(stop_on=3))
        with pytest.raises(BudgetExceeded):
            sl.run(cfg)
        monkeypatch.setattr(sl, "build_labeler", lambda cfg, shared_models=None, role=None: ScriptedLabeler())
        out = sl.run(cfg)
        sent = {srv.openai_url: len(policy_bodies(srv, "served-policy")) for srv in (server, second)}
    usage = json.loads((out / "policy_usage.json").read_text())
    assert usage["policy"].startswith("policy-server:served-policy@") and len(usage["runs"]) == 2
    assert usage["total"]["requests"] == sum(sent.values()) == 18
    assert usage["total"]["cache_hits"] == 8  # the first run's second batch, sampled but not recorded
    assert usage["total"]["server_requests"] == sent and min(sent.values()) > 0
    assert usage["total"]["output_tokens"] > 0
    labeler_usage = json.loads((out / "labeler_usage.json").read_text())
    assert "policy" not in labeler_usage and labeler_usage["labeler"].startswith("scripted")


# -------------------------------------------------------------------------------------------------
# eval: every compared model sampled on the server under its own name, scored here


def serving(server, run: Path, **names: str) -> None:
    """The fake server serves the eval models (the sft and rl folders, and `names`) and answers as the model
    it was asked for, so that each answer says which name sampled it."""
    server.served_models = [str(run / "sft"), str(run / "rl"), *names.values()]
    server.reply = lambda api, body: f"{Path(body['model']).name} says no to: {body['messages'][-1]['content'][-40:]}"


def test_eval_samples_every_model_on_the_server_and_a_rerun_sends_nothing(tmp_path, models, scripted, server):
    cfg = hand_made_run(tmp_path, models, f"policy.base_url={server.openai_url}", "policy.served_model=served-initial",
                        "eval.served_models={rl: my-rl}")
    run = Path(cfg.output_dir)
    serving(server, run, initial="served-initial", rl="my-rl")
    server.served_models.remove(str(run / "rl"))  # served under its override only
    out = eval_stage.run(cfg)
    answers = read_jsonl(out / "answers.jsonl")
    assert len(answers) == 3 * 6
    served = {"initial": "served-initial", "sft": "sft", "rl": "my-rl"}
    for a in answers:
        assert a["answer"].startswith(f"{served[a['model']]} says no to: ")
        assert a["logp"] is not None and a["logp_ref"] is not None and a["tokens"] > 0  # weights here: scored here
    sent = server.bodies("/chat/completions")
    assert sorted({b["model"] for b in sent}) == sorted(["served-initial", str(run / "sft"), "my-rl"])
    assert len(sent) == 3 * 6 + 2  # and the final policy's answers to the 2 examples
    examples = read_jsonl(out / "examples.jsonl")
    assert [e["policy_answer"].split(" says")[0] for e in examples] == ["my-rl", "my-rl"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kl_to_sft"]["sft"]["mean"] == pytest.approx(0.0, abs=1e-4)
    usage = json.loads((out / "policy_usage.json").read_text())
    assert usage["total"]["requests"] == 20 and [r["policy"].split("@")[0] for r in usage["runs"]] == [
        "policy-server:served-initial", f"policy-server:{run / 'sft'}", "policy-server:my-rl"]

    # Killed after the answers were sampled but before the last three were recorded: the rerun sends nothing.
    lines = (out / "answers.jsonl").read_text().splitlines(keepends=True)
    (out / "answers.jsonl").write_text("".join(lines[:-3]))
    (out / DONE).unlink()
    eval_stage.run(cfg)
    assert len(server.bodies("/chat/completions")) == 20
    again = read_jsonl(out / "answers.jsonl")
    assert sorted((a["model"], a["id"], a["answer"]) for a in again) == sorted((a["model"], a["id"], a["answer"]) for a in answers)
    usage = json.loads((out / "policy_usage.json").read_text())
    assert usage["total"]["requests"] == 20 and usage["total"]["cache_hits"] == 3

    # Finished: it samples nothing, so it needs no server (policy.base_url changes no result).
    from cai.config import load_config

    gone = load_config(None, [*overrides(tmp_path, models), "policy.base_url=http://127.0.0.1:9/v1",
                              "policy.served_model=served-initial", "eval.served_models={rl: my-rl}"])
    assert eval_stage.run(gone) == out


def test_eval_of_a_hub_model_served_remotely_records_null_logp(tmp_path, models, scripted, server):
    """initial is a hub id whose weights are not here: sampled on the server, no weights loaded for it,
    its log-probabilities null and its KL n/a in the report; the folders' models are still scored here."""
    cfg = hand_made_run(tmp_path, models, f"policy.base_url={server.openai_url}", "policy.model=org/not-downloaded",
                        "eval.examples=0")
    serving(server, Path(cfg.output_dir), initial="org/not-downloaded")
    out = eval_stage.run(cfg)
    answers = read_jsonl(out / "answers.jsonl")
    initial = [a for a in answers if a["model"] == "initial"]
    assert len(initial) == 6 and all(a["logp"] is None and a["answer"].startswith("not-downloaded says") for a in initial)
    assert all(a["tokens"] > 0 for a in initial)  # the server's count
    assert all(a["logp"] is not None for a in answers if a["model"] != "initial")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kl_to_sft"]["initial"] is None and metrics["kl_to_sft"]["rl"]["mean"] is not None
    assert (out / "report.html").exists()


def test_eval_checks_every_model_is_served_before_writing_anything(tmp_path, models, scripted, server):
    cfg = hand_made_run(tmp_path, models, f"policy.base_url={server.openai_url}")
    run = Path(cfg.output_dir)
    serving(server, run, initial=str(models["initial"]))
    server.served_models.remove(str(run / "rl"))
    with pytest.raises(CaiError) as err:
        eval_stage.run(cfg)
    message = str(err.value)
    assert "\n" not in message and str(run / "rl") in message and server.openai_url in message
    assert "eval.served_models.rl" in message
    assert not (run / "eval").exists() and not server.bodies("/chat/completions")


def test_eval_checks_the_rl_snapshots_it_will_sample_too(tmp_path, models, scripted, server):
    """The over-optimisation curve samples the kept RL snapshots: each must be served (under its folder, or
    eval.served_models.rl@step-N) before eval writes anything."""
    cfg = hand_made_run(tmp_path, models, f"policy.base_url={server.openai_url}", "constitution=constitutions/checkable.yaml",
                        "eval.judge.backend=rules", "eval.agreement_audit=false", rm=True)
    run = Path(cfg.output_dir)
    snapshot = run / "rl" / "snapshots" / "step-2"
    shutil.copytree(models["initial"], snapshot)
    serving(server, run, initial=str(models["initial"]))
    with pytest.raises(CaiError) as err:
        eval_stage.run(cfg)
    assert str(snapshot) in str(err.value) and "eval.served_models.rl@step-2" in str(err.value)
    assert not (run / "eval").exists()


def test_eval_served_models_names_only_models_eval_samples():
    from cai.config import load_config

    with pytest.raises(CaiError) as err:
        load_config(None, ["eval.served_models={final: x}"])
    assert "\n" not in str(err.value) and "eval.served_models" in str(err.value) and "'final'" in str(err.value)
    assert load_config(None, ["eval.served_models={rl@step-40: snap}"]).eval.served_models == {"rl@step-40": "snap"}
