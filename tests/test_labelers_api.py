"""The OpenAI and Anthropic labelers, with the real `openai` and `anthropic` clients, against the fake
servers of tests/fake_servers.py on 127.0.0.1: answers, log-probabilities, votes, faults, parse
retries, rate limits, budgets, a run killed and resumed, and no API key in anything written."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cai.config import load_config
from cai.errors import CaiError
from cai.labelers import BudgetExceeded, ChoiceRequest, GenerateRequest, build_labeler
from cai.labelers.anthropic_api import AnthropicLabeler
from cai.labelers.api_common import RateLimiter, STRICT_TEXT_INSTRUCTION
from cai.labelers.cache import CachedLabeler, cache_stats
from cai.labelers.openai_api import OpenAILabeler
from tests.fake_servers import FakeLLMServer, ScriptedModel, last_user_text

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(backoff_base=0.01, backoff_max=0.05, start_interval=0.0, price=(0.0, 0.0))


@pytest.fixture
def server():
    with FakeLLMServer() as srv:
        yield srv


_made: list = []


@pytest.fixture(autouse=True)
def _close_labelers():
    yield
    while _made:
        _made.pop().close()


def openai_labeler(server, **kwargs) -> OpenAILabeler:
    _made.append(OpenAILabeler("gpt-test", base_url=server.openai_url, **{**FAST, **kwargs}))
    return _made[-1]


def anthropic_labeler(server, **kwargs) -> AnthropicLabeler:
    _made.append(AnthropicLabeler("claude-test", base_url=server.anthropic_url, **{**FAST, **kwargs}))
    return _made[-1]


def ask(text: str, **kwargs) -> GenerateRequest:
    return GenerateRequest([{"role": "user", "content": text}], **kwargs)


def pick(text: str, **kwargs) -> ChoiceRequest:
    return ChoiceRequest([{"role": "user", "content": text}], **kwargs)


# -- success paths ------------------------------------------------------------------------------


def test_openai_generate_sends_chat_completions_and_counts_usage(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-123")
    labeler = openai_labeler(server, system_prompt="Be terse.")
    results = labeler.generate([ask(f"question {i}", max_new_tokens=40, temperature=0.3) for i in range(12)])

    assert [r.text for r in results] == [f"Answer to: question {i}" for i in range(12)]
    assert all(r.status == "ok" and r.output_tokens > 0 for r in results)
    body = server.requests[0]["body"]
    assert server.requests[0]["path"] == "/v1/chat/completions"
    assert body["model"] == "gpt-test" and body["max_tokens"] == 40 and body["temperature"] == 0.3
    assert body["messages"][0] == {"role": "system", "content": "Be terse."}
    assert server.requests[0]["headers"]["authorization"] == "Bearer sk-test-123"
    assert labeler.usage.requests == 12 and labeler.usage.failed == 0
    assert labeler.usage.input_tokens == sum(r.input_tokens for r in results)
    assert labeler.id == f"openai:gpt-test@{server.openai_url}"


def test_anthropic_generate_sends_messages_with_system(server):
    labeler = anthropic_labeler(server)
    results = labeler.generate([GenerateRequest([{"role": "system", "content": "You critique."},
                                                 {"role": "user", "content": "hello"}], max_new_tokens=50)])
    assert results[0].text == "Answer to: hello" and results[0].status == "ok"
    request = server.requests[0]
    assert request["path"] == "/v1/messages"
    assert request["body"]["system"] == "You critique."
    assert request["body"]["messages"] == [{"role": "user", "content": "hello"}]
    assert request["body"]["max_tokens"] == 50
    assert labeler.usage.output_tokens == results[0].output_tokens > 0


def test_requests_in_flight_reach_but_never_pass_concurrency(server):
    server.latency = 0.05
    labeler = openai_labeler(server, concurrency=6)
    start = time.perf_counter()
    labeler.generate([ask(f"q{i}") for i in range(36)])
    elapsed = time.perf_counter() - start
    assert server.max_in_flight == 6
    assert elapsed < 36 * 0.05  # faster than one at a time


# -- choices --------------------------------------------------------------------------------------


def test_openai_choice_from_logprobs(server):
    # The model writes "(" then the label: the answer position is the second token.
    server.logprobs = lambda body: [{"(": -0.01, "The": -5.0}, {"B": -0.2, "A": -1.8, " B": -4.0, "C": -6.0}]
    labeler = openai_labeler(server)
    [choice] = labeler.choose([pick("Which is more harmless? (A) x (B) y")])

    assert choice.method == "logprobs" and choice.status == "ok"
    import math
    a, b = math.exp(-1.8), math.exp(-0.2) + math.exp(-4.0)
    assert choice.probs == pytest.approx([a / (a + b), b / (a + b)])
    # first a probe: does the server continue a prefilled answer? (It does not: the answer starts "(")
    probe, body = server.bodies("/chat/completions")
    assert probe["continue_final_message"] is True and probe["messages"][-1]["role"] == "assistant"
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["temperature"] == 0.0
    assert "Answer with only the label of your choice, one of (A), (B)." in last_user_text(body)


def test_openai_falls_back_to_votes_without_logprobs(server, caplog):
    votes = iter("(A) (B) (B) (B)".split() * 10)
    server.reply = lambda api, body: next(votes)
    labeler = openai_labeler(server, vote_samples=4, concurrency=1)
    with caplog.at_level(logging.WARNING):
        choices = labeler.choose([pick("first"), pick("second")])
    assert all(c.method == "votes" and c.status == "ok" for c in choices)
    assert choices[0].probs == [0.25, 0.75]
    assert "returns no log-probabilities" in caplog.text
    # one logprob probe, then 4 votes for each item; no more probes once the server showed it has none
    logprob_requests = [b for b in server.bodies() if b.get("logprobs")]
    assert len(logprob_requests) == 1 and len(server.requests) == 1 + 2 * 4
    assert all(b["temperature"] == 1.0 for b in server.bodies() if not b.get("logprobs"))


def test_server_rejecting_logprobs_gets_votes(server, caplog):
    server.fault_for = lambda api, body: "400" if body.get("logprobs") else None
    server.reply = lambda api, body: "(A)"
    labeler = openai_labeler(server, vote_samples=2, concurrency=1)
    with caplog.at_level(logging.WARNING):
        choices = labeler.choose([pick("one"), pick("two")])
    assert [(c.method, c.probs) for c in choices] == [("votes", [1.0, 0.0])] * 2
    assert "rejects log-probability requests" in caplog.text
    # the probe of a prefilled answer and one plain request are refused; none is sent after
    assert sum(bool(b.get("logprobs")) for b in server.bodies()) == 2


def test_forced_logprobs_without_them_is_a_failed_choice(server):
    labeler = openai_labeler(server, choice_method="logprobs")
    [choice] = labeler.choose([pick("q")])
    assert choice.status == "failed" and "choice_method=votes" in choice.error


def test_anthropic_votes_with_prefill(server):
    server.reply = lambda api, body: "B) because it declines"
    labeler = anthropic_labeler(server, vote_samples=3)
    [choice] = labeler.choose([pick("Which is better? (A) x (B) y")])
    assert choice.method == "votes" and choice.probs == [0.0, 1.0]
    assert choice.raw.startswith("The answer is: (B)")
    body = server.requests[0]["body"]
    assert body["messages"][-1] == {"role": "assistant", "content": "The answer is: ("}
    assert len(server.requests) == 3


def test_anthropic_bad_request_with_prefill_keeps_prefill(server):
    server.fault_for = lambda api, body: "400"  # not about the prefill: fails with or without it
    labeler = anthropic_labeler(server, vote_samples=1)
    [choice] = labeler.choose([pick("Which? (A) or (B)")])
    assert choice.status == "failed" and labeler._prefill_ok
    assert [b["messages"][-1]["role"] for b in server.bodies()] == ["assistant", "user"]


def test_anthropic_without_prefill_support_asks_without(server):
    server.fault_for = lambda api, body: "400" if body["messages"][-1]["role"] == "assistant" else None
    server.reply = lambda api, body: "(A)"
    labeler = anthropic_labeler(server, vote_samples=2, concurrency=1)
    [choice] = labeler.choose([pick("Which? (A) or (B)")])
    assert choice.status == "ok" and choice.probs == [1.0, 0.0]
    roles = [b["messages"][-1]["role"] for b in server.bodies()]
    # the votes already waiting to go out were refused too; every later request goes without prefill
    assert roles.count("user") == 2 and roles == sorted(roles)


def test_anthropic_cannot_do_logprobs_and_says_so():
    with pytest.raises(CaiError, match="returns no log-probabilities; set labeler.choice_method=votes"):
        AnthropicLabeler("claude-test", base_url="http://127.0.0.1:9", choice_method="logprobs", **FAST)


# -- faults ---------------------------------------------------------------------------------------


def test_429_waits_for_retry_after(server):
    server.retry_after = "0.4"
    server.plan("429")
    labeler = openai_labeler(server)
    start = time.perf_counter()
    [result] = labeler.generate([ask("q")])
    assert result.status == "ok"
    assert time.perf_counter() - start >= 0.4
    assert labeler.usage.retries == 1 and labeler.usage.requests == 2


@pytest.mark.parametrize("fault", ["500", "503", "malformed", "drop", "close"])
@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_transient_faults_are_retried(server, backend, fault):
    server.plan(fault, fault)
    labeler = (openai_labeler if backend == "openai" else anthropic_labeler)(server, concurrency=1)
    results = labeler.generate([ask("first"), ask("second")])
    assert [r.status for r in results] == ["ok", "ok"]
    assert results[0].text == "Answer to: first"
    assert labeler.usage.retries == 2 and labeler.usage.requests == 4


def test_slow_answer_past_the_timeout_is_retried(server):
    server.slow_seconds = 3.0
    server.plan("slow")
    labeler = openai_labeler(server, timeout=0.3)
    start = time.perf_counter()
    [result] = labeler.generate([ask("q")])
    assert result.status == "ok" and labeler.usage.retries == 1
    assert time.perf_counter() - start < 2.0


def test_gives_up_after_max_tries_and_goes_on(server):
    server.fault_for = lambda api, body: "500" if "doomed" in last_user_text(body) else None
    labeler = openai_labeler(server, max_tries=3)
    results = labeler.generate([ask("fine"), ask("doomed"), ask("also fine")])
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert "gave up after 3 tries" in results[1].error and results[1].text is None
    assert labeler.usage.failed == 1
    assert sum("doomed" in last_user_text(b) for b in server.bodies()) == 3


def test_bad_request_is_not_retried(server):
    server.plan("400")
    labeler = openai_labeler(server)
    [result] = labeler.generate([ask("q")])
    assert result.status == "failed" and "400" in result.error
    assert len(server.requests) == 1


def test_rejected_key_stops_with_one_clear_line(server, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-wrong-key-000")
    server.fault_for = lambda api, body: "401"
    labeler = openai_labeler(server, api_key_env="MY_KEY")
    with pytest.raises(CaiError) as err:
        labeler.generate([ask(f"q{i}") for i in range(20)])
    assert "rejected the API key" in str(err.value) and "$MY_KEY" in str(err.value)
    assert "sk-wrong-key-000" not in str(err.value)
    assert len(server.requests) < 20  # it stopped asking


def test_missing_key_for_the_hosted_api_names_the_variable(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(CaiError, match=r"labeler.backend=openai needs an API key in \$OPENAI_API_KEY"):
        OpenAILabeler("gpt-test", **FAST)
    with pytest.raises(CaiError, match=r"needs an API key in \$ANTHROPIC_API_KEY"):
        AnthropicLabeler("claude-test", base_url="https://api.anthropic.com", **FAST)


def test_local_server_needs_no_key(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    [result] = openai_labeler(server).generate([ask("q")])
    assert result.status == "ok"


# -- parse retries --------------------------------------------------------------------------------


def test_unreadable_vote_is_asked_again_more_strictly(server):
    server.reply = lambda api, body: "(B)" if "could not be read" in last_user_text(body) else "Both have merit."
    labeler = openai_labeler(server, choice_method="votes", vote_samples=2)
    [choice] = labeler.choose([pick("Which? (A) or (B)")])
    assert choice.status == "ok" and choice.probs == [0.0, 1.0]
    assert labeler.usage.extra["parse_retries"] == 2


def test_never_readable_choice_is_unparseable_with_raw_text(server):
    server.reply = lambda api, body: "I'm sorry, I can't judge this."
    labeler = openai_labeler(server, choice_method="votes", vote_samples=2, max_parse_retries=1)
    [choice] = labeler.choose([pick("Which? (A) or (B)")])
    assert choice.status == "unparseable" and choice.probs is None
    assert "I can't judge this" in choice.raw
    assert labeler.usage.unparseable == 1 and len(server.requests) == 4  # 2 votes x (1 + 1 retry)


def test_empty_answer_is_retried_then_unparseable(server):
    server.reply = lambda api, body: ""
    labeler = openai_labeler(server, max_parse_retries=2)
    [result] = labeler.generate([ask("q")])
    assert result.status == "unparseable" and result.text == "" and result.error == "empty answer"
    assert len(server.requests) == 3
    assert STRICT_TEXT_INSTRUCTION in last_user_text(server.bodies()[-1])


def test_refusal_is_retried_only_when_asked(server):
    server.reply = lambda api, body: ("The answer glorifies violence." if STRICT_TEXT_INSTRUCTION in last_user_text(body)
                                      else "I'm sorry, but I can't help with that.")
    labeler = openai_labeler(server)
    [kept] = labeler.generate([ask("critique this")])
    assert kept.text.startswith("I'm sorry")  # a revision may rightly be a refusal
    [critique] = labeler.generate([ask("critique this")], reject_refusals=True)
    assert critique.text == "The answer glorifies violence." and critique.status == "ok"


# -- rate limits and budgets ----------------------------------------------------------------------


def test_rate_limiter_spreads_requests():
    async def take(limiter, amounts):
        start = time.perf_counter()
        for amount in amounts:
            await limiter.acquire(amount)
        return time.perf_counter() - start

    # 1200/min = 20/s, a bucket of 20: 20 at once, 10 more take half a second
    assert 0.45 < asyncio.run(take(RateLimiter(1200), [1] * 30)) < 1.5
    # tokens, 100/s: a request bigger than the bucket takes a full bucket and leaves it 50 in debt,
    # so the next one waits 1.5 s for the bucket to be full again
    assert 1.4 < asyncio.run(take(RateLimiter(6000), [150, 150])) < 2.5


def test_requests_per_minute_limit(server):
    labeler = openai_labeler(server, requests_per_minute=1200, concurrency=16)
    start = time.perf_counter()
    labeler.generate([ask(f"q{i}") for i in range(30)])
    assert time.perf_counter() - start >= 0.4


def test_max_requests_stops_cleanly_and_a_rerun_continues(server, tmp_path):
    server.latency = 0.02
    requests = [ask(f"item {i}") for i in range(10)]
    capped = CachedLabeler(openai_labeler(server, max_requests=4, concurrency=2), tmp_path / "c.sqlite")
    with pytest.raises(BudgetExceeded, match=r"labeler.max_requests=4 reached after 4 requests; raise it and rerun"):
        capped.generate(requests)
    assert len(server.requests) == 4
    assert cache_stats(tmp_path / "c.sqlite")["entries"] == 4  # all received answers kept

    server.reset()
    more = CachedLabeler(openai_labeler(server, max_requests=100), tmp_path / "c.sqlite")
    results = more.generate(requests)
    assert [r.text for r in results] == [f"Answer to: item {i}" for i in range(10)]
    assert len(server.requests) == 6 and more.usage.cache_hits == 4


def test_max_cost_is_a_hard_cap(server):
    # $1 per thousand tokens in and out: each request here costs about 3 cents.
    labeler = openai_labeler(server, price=(1000.0, 1000.0), max_cost=0.1, concurrency=1)
    with pytest.raises(BudgetExceeded, match=r"labeler.max_cost=0.1 USD reached") as err:
        labeler.generate([ask(f"question number {i}", max_new_tokens=8) for i in range(20)])
    assert 0 < labeler.usage.cost <= 0.1
    assert 0 < len(server.requests) < 20
    assert sum(r is not None for r in err.value.results) == len(server.requests)


def test_max_cost_needs_a_price():
    with pytest.raises(CaiError, match="labeler.prices has no entry for 'gpt-test'"):
        OpenAILabeler("gpt-test", base_url="http://127.0.0.1:9", max_cost=1.0, price=None)


# -- config, cache, resume, keys ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_build_labeler_from_config_overrides(server, tmp_path, backend):
    url = server.openai_url if backend == "openai" else server.anthropic_url
    cfg = load_config(None, [f"labeler.backend={backend}", "labeler.model=m-1", f"labeler.base_url={url}",
                             f"cache_dir={tmp_path}", "labeler.prices={m-1: [0.5, 1.5]}"])
    labeler, second = build_labeler(cfg), build_labeler(cfg)
    _made.extend([labeler, second])
    assert isinstance(labeler, CachedLabeler)
    first = labeler.generate([ask("q")])
    again = second.generate([ask("q")])
    assert first[0].text == again[0].text == "Answer to: q" and again[0].cached
    assert len(server.requests) == 1
    assert labeler.usage.cost > 0 and (tmp_path / "labeler_cache.sqlite").exists()


@pytest.mark.parametrize("name", ["openai", "anthropic", "vllm"])
def test_shipped_configs_load_and_open_with_their_command(name):
    path = ROOT / "configs" / f"{name}.yaml"
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# cai ") and f"configs/{name}.yaml" in first_line
    cfg = load_config(path)
    assert cfg.labeler.backend in ("openai", "anthropic")
    assert cfg.labeler.model in cfg.labeler.prices or cfg.labeler.base_url


KILLABLE = textwrap.dedent("""
    import sys
    from cai.labelers.base import GenerateRequest
    from cai.labelers.cache import CachedLabeler
    from cai.labelers.openai_api import OpenAILabeler
    url, cache = sys.argv[1], sys.argv[2]
    labeler = CachedLabeler(OpenAILabeler("gpt-test", base_url=url, concurrency=2, price=(0.0, 0.0)), cache)
    requests = [GenerateRequest([{"role": "user", "content": f"item {i}"}]) for i in range(40)]
    results = labeler.generate(requests)
    print(sum(r.status == "ok" for r in results))
""")


def test_killed_run_resumes_without_repeating_a_request(server, tmp_path):
    server.latency = 0.1  # 40 requests, 2 at a time: about 2 s, killed after about half a second
    cache = tmp_path / "cache.sqlite"
    child = subprocess.Popen([sys.executable, "-c", KILLABLE, server.openai_url, str(cache)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 30
    while time.time() < deadline and server.answered < 10:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert server.answered < 40, "the run finished before it was killed"

    db = sqlite3.connect(cache)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    stored = [json.loads(r)["text"] for (r,) in db.execute("SELECT result FROM answers")]
    db.close()
    done = {text.removeprefix("Answer to: ") for text in stored}
    assert len(done) >= 8  # answers were stored as they came, not at the end

    server.reset()
    rerun = subprocess.run([sys.executable, "-c", KILLABLE, server.openai_url, str(cache)], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert rerun.stdout.strip() == "40", rerun.stderr
    asked = [last_user_text(b) for b in server.bodies()]
    assert not done & set(asked), "a request whose answer was already received was sent again"
    assert len(asked) == 40 - len(done)

    server.reset()
    again = CachedLabeler(openai_labeler(server), cache)
    assert all(r.cached for r in again.generate([ask(f"item {i}") for i in range(40)]))
    assert server.requests == []  # the second identical run asks nothing


def test_no_key_in_cache_records_logs_or_errors(server, tmp_path, monkeypatch, caplog, capsys):
    secret = "sk-cai-leak-test-7f3a9c1e5b2d4f6a8c0e"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    server.fault_for = lambda api, body: "echo-auth" if "echo" in last_user_text(body) else None
    server.plan("500", "429")
    server.logprobs = lambda body: [{"A": -0.1, "B": -2.5}] if body.get("logprobs") else None
    cfg = load_config(None, ["labeler.backend=openai", "labeler.model=gpt-test", f"labeler.base_url={server.openai_url}",
                             f"cache_dir={tmp_path / 'cache'}", "labeler.max_tries=2"])
    with caplog.at_level(logging.DEBUG):
        labeler = build_labeler(cfg)
        _made.append(labeler)
        generations = labeler.generate([ask("hello"), ask("please echo"), ask("more")])
        choices = labeler.choose([pick("which? (A) or (B)")])
        with pytest.raises(CaiError) as err:
            server.fault_for = lambda api, body: "401"
            labeler.generate([ask("after the key was revoked")])

    assert generations[1].status == "failed" and "Bearer ***" in generations[1].error
    assert server.requests[0]["headers"]["authorization"] == f"Bearer {secret}"  # it was sent, and used
    out = tmp_path / "out"
    out.mkdir()
    (out / "records.jsonl").write_text("\n".join(json.dumps(dataclasses.asdict(r)) for r in generations + choices))
    (out / "usage.json").write_text(json.dumps(labeler.usage.as_dict()))
    captured = capsys.readouterr()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name.startswith("labeler_cache.sqlite") for p in written)
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
    for text in (caplog.text, captured.out, captured.err, str(err.value)):
        assert secret not in text


# -- reading answers ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("A", 0), ("(B)", 1), ("B.", 1), ("A) because it is kinder", 0), ("**(B)**", 1),
    ("The answer is: (B) since", 1), ("Answer: A", 0), ("My verdict: (B)", 1),
    ("A good answer would be (B)", 1),  # "A" as an article is no vote
    ("(A) is better than (B)", 0), ("Comparing (A) and (B), I choose (B)", 1),
    ("Both have merit.", None), ("", None), (None, None), ("answer is a", None),
])
def test_parse_choice(text, expected):
    from cai.labelers.parsing import parse_choice

    assert parse_choice(text, ("A", "B")) == expected


def test_parse_choice_on_numbers_and_tokens():
    from cai.checks import refuses as is_refusal
    from cai.labelers.parsing import option_of_token, parse_choice

    scores = tuple(str(i) for i in range(1, 11))
    assert parse_choice("10", scores) == 9 and parse_choice("1", scores) == 0
    assert [option_of_token(t, ("A", "B")) for t in ["A", " A", "(A", "B)", "(", "Apple"]] == [0, 0, 0, 1, None, None]
    assert is_refusal("I'm sorry, but I can't help with that.") and is_refusal("  I cannot assist")
    assert not is_refusal("The response is harmful because it says I'm sorry too late.")


def test_retry_after_header_forms():
    from email.utils import format_datetime
    from datetime import datetime, timedelta, timezone

    class Fault(Exception):
        def __init__(self, headers):
            self.response = type("R", (), {"headers": headers})()

    read = OpenAILabeler._retry_after
    assert read(Fault({"retry-after": "2"})) == 2.0
    assert read(Fault({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 < read(Fault({"retry-after": later})) <= 30
    assert read(Fault({})) is None and read(ValueError()) is None


# -- servers as they really behave ------------------------------------------------------------------
# Open models behind vLLM or llama.cpp begin their answer with the words the comparison template taught
# them ("The answer is: (B)"), and servers differ in whether, and how, the answer can be prefilled.

LABEL_B = {"B": -0.2, "A": -1.8, "C": -4.0}


def answer_is_b() -> ScriptedModel:
    """A model that writes "The answer is: (B)" as SmolLM2's tokenizer splits it; the label is the
    sixth token, and "A" is among the unlikely alternatives of every earlier one (as on llama.cpp)."""
    return ScriptedModel(["The", " answer", " is", ":", " (", "B", ")"], {5: LABEL_B})


def p_label_b() -> list[float]:
    a, b = math.exp(LABEL_B["A"]), math.exp(LABEL_B["B"])
    return [a / (a + b), b / (a + b)]


def served_labeler(server, model: str = "smollm2", **kwargs) -> OpenAILabeler:
    _made.append(OpenAILabeler(model, base_url=server.openai_url, **{**FAST, **kwargs}))
    return _made[-1]


def test_label_read_after_the_models_preamble():
    # llama-cpp-python's server: chat ignores continue_final_message; /completions exists, but cai has
    # no template for a model it knows only as "smollm2"
    with FakeLLMServer(model=answer_is_b(), continue_final_message="ignore", completions=True) as server:
        labeler = served_labeler(server, concurrency=2)
        choices = labeler.choose([pick(f"Which is better? {i}") for i in range(4)])
        bodies = server.bodies("/chat/completions")
    assert [(c.method, c.status) for c in choices] == [("logprobs", "ok")] * 4
    assert all(c.probs == pytest.approx(p_label_b()) and c.raw == "The answer is: (B)" for c in choices)
    usage = labeler.usage.as_dict()
    assert usage["choices_by"] == {"logprobs": 4} and "no prefill" in usage["choice_asked"]
    # one probe of the prefill (ignored: the answer began "The"), then one request per question
    assert [bool(b.get("continue_final_message")) for b in bodies] == [True] + [False] * 4
    assert all(b["max_tokens"] >= 7 for b in bodies[1:])


def test_prefill_by_continue_final_message():
    # vLLM: the chat API continues a final assistant message
    with FakeLLMServer(model=answer_is_b(), continue_final_message="honour") as server:
        labeler = served_labeler(server, concurrency=2)
        choices = labeler.choose([pick(f"Which is better? {i}") for i in range(3)])
        bodies = server.bodies("/chat/completions")
    assert [(c.method, c.status) for c in choices] == [("logprobs+prefill", "ok")] * 3
    assert all(c.probs == pytest.approx(p_label_b()) and c.raw == "The answer is: (B)" for c in choices)
    assert len(bodies) == 3  # the probe's answer was used
    for body in bodies:
        assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
        assert body["messages"][-1] == {"role": "assistant", "content": "The answer is: ("}
        assert "Answer with only the label" not in last_user_text(body)  # the local backend's question
    assert "prefilled answer prefix (chat-continue)" in labeler.usage.as_dict()["choice_asked"]


def test_prefill_through_completions_with_the_servers_template():
    # llama.cpp's own server: chat refuses the unknown field; /completions and /apply-template exist
    with FakeLLMServer(model=answer_is_b(), continue_final_message="reject", completions=True,
                       apply_template=True) as server:
        labeler = served_labeler(server)
        choices = labeler.choose([pick(f"Which is better? {i}") for i in range(3)])
        prompts = [b["prompt"] for b in server.bodies("/v1/completions")]
    assert [(c.method, c.status) for c in choices] == [("logprobs+prefill", "ok")] * 3
    assert all(c.probs == pytest.approx(p_label_b()) for c in choices)
    assert len(prompts) == 3
    assert prompts[0] == "<|im_start|>user\nWhich is better? 0<|im_end|>\n<|im_start|>assistant\nThe answer is: ("
    assert "prefilled answer prefix (completions)" in labeler.usage.as_dict()["choice_asked"]


def test_prefill_through_completions_with_a_local_tokenizer(tmp_path):
    # a server with /completions but no template route: the chat template of the model's own tokenizer
    from tests.tiny import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    with FakeLLMServer(model=answer_is_b(), continue_final_message="ignore", completions=True) as server:
        labeler = served_labeler(server, model=str(tmp_path / "tok"))
        [choice] = labeler.choose([pick("Which is better?")])
        [body] = server.bodies("/v1/completions")
    assert choice.method == "logprobs+prefill" and choice.probs == pytest.approx(p_label_b())
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "Which is better?"}], tokenize=False,
                                             add_generation_prompt=True)
    assert body["prompt"] == expected + "The answer is: (" and body["logprobs"] == 20


def test_votes_from_a_server_without_logprobs():
    with FakeLLMServer(model=answer_is_b(), chat_logprobs=False) as server:
        labeler = served_labeler(server, vote_samples=3)
        choices = labeler.choose([pick("one"), pick("two")])
    assert [(c.method, c.probs) for c in choices] == [("votes", [0.0, 1.0])] * 2
    assert labeler.usage.as_dict()["choice_asked"].startswith("votes")
    assert sum(bool(b.get("logprobs")) for b in server.bodies()) == 1  # one probe only


def test_no_label_in_the_logprobs_falls_back_to_votes(server):
    server.logprobs = lambda body: [{"I": -0.1, "A": -4.0}, {" think": -0.1}, {" both": -0.2}, {" are": -0.1}]
    server.reply = lambda api, body: "(A)"
    labeler = openai_labeler(server, vote_samples=2, max_parse_retries=1)
    [choice] = labeler.choose([pick("Which?")])
    assert choice.status == "ok" and choice.method == "votes" and choice.probs == [1.0, 0.0]
    usage = labeler.usage.as_dict()
    assert usage["vote_fallbacks"] == 1 and usage["parse_retries"] == 1 and usage["unparseable"] == 0


def test_label_must_stand_alone_in_the_logprobs():
    from cai.labelers.parsing import probs_from_logprobs

    def positions(*tokens, dist=None):
        return [(t, list((dist or {t: -0.1}).items())) for t in tokens]

    digits = tuple(str(n) for n in range(10))
    # "(10)" on a 0..9 scale is not a 1; "(9)" is a 9
    assert probs_from_logprobs(positions("(", "1", "0", ")"), digits) is None
    nine = probs_from_logprobs(positions("(", "9", ")"), digits)
    assert nine.index(max(nine)) == 9
    # "A good answer is (B)": the article is not option A; the label after "(" is read
    read = probs_from_logprobs(positions("A", " good", " answer", " is", " (", "B", ")"), ("A", "B"))
    assert read == [0.0, 1.0]
    # after a prefilled "(", the alternatives at the first position are the options' probabilities
    read = probs_from_logprobs([("Response", [("Response", -0.1), ("A", -2.0), ("B", -3.0)])], ("A", "B"),
                               context="The answer is: (")
    assert read == pytest.approx([math.exp(-2.0) / (math.exp(-2.0) + math.exp(-3.0)),
                                  math.exp(-3.0) / (math.exp(-2.0) + math.exp(-3.0))])


class TopRater(ScriptedModel):
    """A labeler model that gives every answer the top rating of the scale the prompt states ("from 0
    (very poor) to 9 (excellent)"), written digit by digit as Llama, Mistral, Qwen or SmolLM2 tokenizers
    split numbers: "(10)" is "(", "1", "0", ")"."""

    def __init__(self):
        super().__init__([])

    def positions(self, prompt: str, max_tokens: int):
        import re

        top = re.findall(r"to (\d+) \(excellent\)", prompt)[-1]
        digits = list(top)
        self.tokens = ["Rating", ":", " (", *digits, ")"]
        # at the first digit, the top rating's first digit is sure; every other digit is unlikely
        first = {d: -8.0 for d in "0123456789"}
        first[digits[0]] = -0.01
        self.dists = {3: first}
        return super().positions(prompt, max_tokens)


def test_direct_reward_reads_a_top_rating_through_a_digit_splitting_server():
    # d-RLAIF through an API (issue 11.3): a confident top rating must be the top reward, not a 1
    from cai.constitution import load_constitution
    from cai.rewards import DirectLabelerReward
    from cai.templates import Templates

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [])
    with FakeLLMServer(model=TopRater(), continue_final_message="ignore") as server:
        labeler = served_labeler(server)
        reward = DirectLabelerReward(labeler, load_constitution(cfg.constitution), Templates(cfg.templates), cfg)
        rewards = reward(["How do I bake bread?", "Tell me a joke."], ["Knead, rise, bake.", "Why did..."])
    assert rewards == pytest.approx([1.0, 1.0], abs=0.01) and reward.rated == 2


# -- one definition of where the label is (issue 18.3) ---------------------------------------------
# What a judge writes can quote option letters from the answers it judges; each reader used to find
# the label its own way, and an answer could make them read it wrong. Every case is read from the
# text (votes) and from the log-probabilities token by token; both must land on the same option.

DIGITS = tuple(str(n) for n in range(10))
READ_CASES = [
    # (what the judge writes, token by token; options; distributions at chosen positions; the pick)
    (["B", " is", " better", " than", " A", "."], ("A", "B"), {0: {"B": -0.02, "A": -4.0}, 4: {" A": -0.01, " B": -5.0}}, "B"),
    (["7", " out", " of", " 9"], DIGITS, {0: {"7": -0.1, "6": -2.5}, 3: {" 9": -0.01, " 8": -5.0}}, "7"),
    (["Response", " (", "B", ")", " is", " harmful", ";", " the", " answer", " is", " (", "A", ")"], ("A", "B"),
     {2: {"B": -0.01, "A": -5.0}, 11: {"A": -0.05, "B": -3.0}}, "A"),
    (["A", " good", " answer", " would", " be", " (", "B", ")"], ("A", "B"), {0: {"A": -0.01}, 6: {"B": -0.2, "A": -1.8}}, "B"),
    (["The", " better", " response", " is", " (", "A", ")."], ("A", "B"), {5: {"A": -0.3, "B": -1.4}}, "A"),
    (["(", "A", ")", " and", " (", "B", ")", " differ", ";", " I", " choose", " (", "B", ")"], ("A", "B"),
     {1: {"A": -0.01}, 12: {"B": -0.4, "A": -1.1}}, "B"),
    (["Rating", ":", " (", "6", ")", " out", " of", " 9"], DIGITS, {3: {"6": -0.3, "7": -1.5}, 7: {" 9": -0.01}}, "6"),
    (["(", "B", ")"], ("A", "B"), {1: {"B": -0.2, "A": -1.8}}, "B"),
]


def _positions(tokens, dists):
    default = lambda token: {token: -0.05, " Both": -4.0, "You": -5.0, "A": -6.5}  # noqa: E731 - as ScriptedModel writes
    return [(t, sorted((dists.get(k) or default(t)).items(), key=lambda kv: -kv[1])) for k, t in enumerate(tokens)]


@pytest.mark.parametrize("tokens, options, dists, expected", READ_CASES, ids=[repr("".join(c[0])) for c in READ_CASES])
def test_both_readers_find_the_same_label(tokens, options, dists, expected):
    from cai.labelers.parsing import parse_choice, probs_from_logprobs

    index = options.index(expected)
    assert parse_choice("".join(tokens), options) == index
    probs = probs_from_logprobs(_positions(tokens, dists), options)
    assert probs is not None and max(range(len(options)), key=probs.__getitem__) == index
    at = next(k for k, t in enumerate(tokens) if k in dists and t.strip() == expected)  # the labelled position
    mass = {o: math.exp(lp) for o, lp in dists[at].items()}
    assert probs[index] == pytest.approx(mass[expected] / sum(mass.values()))


@pytest.mark.parametrize("tokens, options, dists, expected", READ_CASES[:3], ids=["B is better than A", "7 out of 9", "harmful; answer is A"])
def test_the_served_labeler_reads_the_same_label_by_logprobs_and_by_votes(tokens, options, dists, expected):
    """Through a server that writes the reply token by token: log-probabilities where it returns them,
    votes where it does not; the same pick either way."""
    prefix = "Rating: (" if options == DIGITS else "The answer is: ("
    request = pick("Which is better?", options=options, answer_prefix=prefix)
    picks = {}
    for logprobs in (True, False):
        with FakeLLMServer(model=ScriptedModel(tokens, dists), continue_final_message="reject", chat_logprobs=logprobs) as server:
            [choice] = served_labeler(server, vote_samples=2).choose([request])
        assert choice.status == "ok", choice.error
        assert choice.method == ("logprobs" if logprobs else "votes")
        picks[logprobs] = max(range(len(options)), key=choice.probs.__getitem__)
    assert picks[True] == picks[False] == options.index(expected)
