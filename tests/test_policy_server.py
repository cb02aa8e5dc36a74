"""Policy sampling on an OpenAI-compatible server (`policy.base_url`, cai/policy_server.py), against
the fake server of tests/fake_servers.py: answers in the records, a resumed stage samples nothing
twice, the served model's name checked before anything is sampled."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from cai.errors import CaiError
from cai.labelers import BudgetExceeded
from cai.records import read_jsonl
from cai.stages import prefs, sl
from tests.fake_servers import FakeLLMServer
from tests.fakes import ScriptedLabeler


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
