"""`cai serve`: the judge's three modes, both protocols, the TRL and verl adapters, and serving rules
(auth, caps, per-item errors and timeouts, cache, no key in any answer or log, kill and restart).

The service runs on 127.0.0.1 in every test: in a thread (uvicorn) around a scripted labeler, or as a
`cai serve` subprocess whose labeler is the real `openai` client talking to tests/fake_servers.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cai.config import load_config
from cai.errors import CaiError
from cai.labelers.base import Choice, Generation, Usage
from cai.serve import Judge, ScoreItem, create_app, group_win_rates, service_token
from tests.fake_servers import FakeLLMServer
from tests.fakes import shown_answer, shown_answers

ROOT = Path(__file__).resolve().parents[1]

# Answer qualities the scripted labelers read: an answer's text names its quality.
QUALITY = {"great answer": 3.0, "fine answer": 2.0, "poor answer": 1.0, "reference answer": 2.0}
BIAS = 0.1  # the scripted labeler prefers option (A) by this much: debiasing must cancel it


def shown(text: str) -> tuple[str, str]:
    a, b, _ = shown_answers(text)
    return a.strip(), b.strip()


def p_option_a(text: str) -> float:
    """P((A)) = q_a / (q_a + q_b) + BIAS: the un-flipped mean of both orders is q_a / (q_a + q_b)."""
    a, b = shown(text)
    return QUALITY[a] / (QUALITY[a] + QUALITY[b]) + BIAS


def rating_of(text: str) -> int:
    answer = shown_answer(text).strip()
    return {"great answer": 9, "fine answer": 6, "poor answer": 0}.get(answer, 4)


class JudgeLabeler:
    """Scripted choices: A/B comparisons by QUALITY (with a position bias), 0-9 ratings by rating_of.
    An item whose text contains FAIL fails, like an API that gave up; `delay` makes each call slow."""

    def __init__(self, delay: float = 0.0):
        self.id = "scripted:judge"
        self.usage = Usage()
        self.choose_calls: list[int] = []
        self.delay = delay

    def generate(self, requests, desc=None, **kwargs):
        self.usage.requests += len(requests)
        return [Generation("reference answer") for _ in requests]

    def choose(self, requests, desc=None, **kwargs):
        time.sleep(self.delay)
        self.choose_calls.append(len(requests))
        out = []
        for r in requests:
            self.usage.requests += 1
            text = r.messages[-1]["content"]
            if "FAIL" in text:
                self.usage.failed += 1
                out.append(Choice(None, status="failed", error="scripted failure: the API gave up"))
            elif len(r.options) == 10:
                probs = [0.0] * 10
                probs[rating_of(text)] = 1.0
                out.append(Choice(probs, method="logprobs"))
            else:
                p = p_option_a(text)
                out.append(Choice([p, 1.0 - p], method="logprobs"))
        return out

    def close(self):
        pass


def config(tmp_path, *extra):
    return load_config(None, [f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
                              "constitution=constitutions/tiny.yaml", "prefs.principles_per_pair=2", *extra])


class Service:
    """uvicorn serving `app` on 127.0.0.1 from a thread; `.url`."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the service did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def post(url: str, payload, token: str | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def served(tmp_path, *extra, labeler=None):
    cfg = config(tmp_path, *extra)
    return Service(create_app(cfg, Judge(cfg, labeler=labeler or JudgeLabeler())))


# -------------------------------------------------------------------------------------------------
# The maths and the three modes


def test_group_win_rates_by_hand():
    rates = group_win_rates(3, {(0, 1): 0.8, (0, 2): 0.6, (1, 2): 0.5})
    assert rates == pytest.approx([0.7, (0.2 + 0.5) / 2, (0.4 + 0.5) / 2])
    assert sum(rates) / 3 == pytest.approx(0.5)
    # a pair without a verdict is left out; an answer with none left has no rate
    first, middle, last = group_win_rates(3, {(0, 1): None, (0, 2): 0.9, (1, 2): None})
    assert (first, middle, last) == (pytest.approx(0.9), None, pytest.approx(0.1))


def test_pointwise_mode_is_the_scaled_rating(tmp_path):
    judge = Judge(config(tmp_path), labeler=JudgeLabeler())
    results = judge.score([ScoreItem("q", "great answer"), ScoreItem("q", "poor answer"), ScoreItem("q", "fine answer")],
                          "pointwise")
    assert [r.reward for r in results] == pytest.approx([1.0, -1.0, (6 - 4.5) / 4.5])
    assert results[0].details["expected_rating"] == pytest.approx(9)


def test_pairwise_mode_is_the_debiased_probability_of_beating_the_reference(tmp_path):
    judge = Judge(config(tmp_path), labeler=JudgeLabeler())
    results = judge.score([ScoreItem("q", "great answer", "reference answer"),
                           ScoreItem("q", "poor answer", "reference answer")], "pairwise")
    # the labeler's +0.1 for option (A) cancels between the two orders
    assert results[0].reward == pytest.approx(3 / 5)
    assert results[1].reward == pytest.approx(1 / 3)
    principles = results[0].details["principles"]
    assert len(principles) == 2 and all(set(p["orders"]) == {"ab", "ba"} for p in principles)
    assert principles[0]["orders"]["ab"]["p_first"] == pytest.approx(3 / 5 + BIAS)
    missing = judge.score([ScoreItem("q", "great answer")], "pairwise")[0]
    assert missing.reward is None and "reference" in missing.error


def test_pairwise_mode_samples_the_reference_when_configured(tmp_path):
    sampler = JudgeLabeler()
    judge = Judge(config(tmp_path, "serve.reference=sample"), labeler=JudgeLabeler(), reference_sampler=sampler)
    result = judge.score([ScoreItem("q", "great answer")], "pairwise")[0]
    assert sampler.usage.requests == 1 and result.details["reference"] == "reference answer"
    assert result.reward == pytest.approx(3 / 5)


# -------------------------------------------------------------------------------------------------
# Protocols, end to end over HTTP


def test_group_mode_over_cai_protocol_equals_win_rates_computed_by_hand(tmp_path):
    answers = ["great answer", "fine answer", "poor answer"]
    q = [QUALITY[a] for a in answers]
    by_hand = [sum(q[i] / (q[i] + q[j]) for j in range(3) if j != i) / 2 for i in range(3)]
    items = [{"prompt": "How do I bake bread?", "answer": a} for a in answers]
    items += [{"prompt": [{"role": "user", "content": "Other prompt"}], "answer": a} for a in answers[:2]]
    with served(tmp_path) as service:
        status, body = post(service.url + "/v1/score", {"items": items, "mode": "group"})
    assert status == 200 and body["mode"] == "group"
    rewards = [r["reward"] for r in body["results"]]
    assert rewards[:3] == pytest.approx(by_hand)
    assert rewards[3:] == pytest.approx([3 / 5, 2 / 5])  # its own group of two
    first = body["results"][0]["details"]
    assert first["group_size"] == 3 and len(first["comparisons"]) == 2
    assert all(set(p["orders"]) == {"ab", "ba"} for c in first["comparisons"] for p in c["principles"])


def test_openrlhf_get_reward_shapes(tmp_path):
    prompts = ["<|user|>Q1<|assistant|>", "<|user|>Q2<|assistant|>"]
    queries = [prompts[0] + "great answer", prompts[1] + "poor answer"]
    with served(tmp_path, "serve.mode=pointwise") as service:
        status, body = post(service.url + "/get_reward", {"query": queries, "prompts": prompts, "labels": ["", ""]})
    assert status == 200
    assert body["rewards"] == pytest.approx([1.0, -1.0]) and body["scores"] == body["rewards"]
    assert body["extra_logs"] == {"judge_ok": [1.0, 1.0]}


def test_openrlhf_labels_are_the_pairwise_reference(tmp_path):
    with served(tmp_path, "serve.mode=pairwise") as service:
        status, body = post(service.url + "/get_reward", {
            "query": ["Qgreat answer", "Qpoor answer"], "prompts": ["Q", "Q"],
            "labels": ["reference answer", "reference answer"]})
    assert status == 200 and body["rewards"] == pytest.approx([3 / 5, 1 / 3])


def test_trl_and_verl_adapters_call_the_service(tmp_path):
    from trl.trainer.utils import is_async_callable

    from cai.integrations import TRLReward, compute_score, compute_score_batch

    with served(tmp_path, "serve.mode=group") as service:
        reward = TRLReward(service.url)
        assert is_async_callable(reward)  # TRL awaits it concurrently with its other async reward functions
        prompt = [{"role": "user", "content": "How do I bake bread?"}]
        completions = [[{"role": "assistant", "content": a}] for a in ("great answer", "poor answer")]
        rewards = asyncio.run(reward(prompts=[prompt, prompt], completions=completions, trainer_state=None))
        assert rewards == pytest.approx([3 / 4, 1 / 4])

        info = {"prompt": "How do I bake bread?"}
        batch = compute_score_batch(["cai"] * 2, ["great answer", "fine answer"], [None, None], [info, info],
                                    url=service.url)
        assert batch == pytest.approx([3 / 5, 2 / 5])
        one = compute_score("cai", "great answer", "reference answer", info, url=service.url, mode="pairwise")
        assert one == pytest.approx(3 / 5)


def test_trl_adapter_in_process(tmp_path):
    from cai.integrations import TRLReward

    cfg = config(tmp_path, "serve.mode=pointwise")
    reward = TRLReward(judge=Judge(cfg, labeler=JudgeLabeler()))
    assert asyncio.run(reward(prompts=["q", "q"], completions=["great answer", "FAIL poor answer"])) == [
        pytest.approx(1.0), None]  # None: TRL's NaN, left out of its mean


# -------------------------------------------------------------------------------------------------
# Serving rules


def test_auth_refused_without_the_token(tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_SERVE_TOKEN", "tok-123456")
    payload = {"items": [{"prompt": "q", "answer": "great answer"}]}
    with served(tmp_path) as service:
        assert post(service.url + "/v1/score", payload)[0] == 401
        status, body = post(service.url + "/v1/score", payload, token="wrong")
        assert status == 401 and "tok-123456" not in json.dumps(body)
        assert get(service.url + "/metrics")[0] == 401
        assert post(service.url + "/v1/score", payload, token="tok-123456")[0] == 200
        assert get(service.url + "/health")[0] == 200  # for load balancers; says nothing secret


def test_binding_beyond_loopback_needs_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv("CAI_SERVE_TOKEN", raising=False)
    with pytest.raises(CaiError, match=r"serve.host=0.0.0.0 .*\$CAI_SERVE_TOKEN"):
        service_token(config(tmp_path, "serve.host=0.0.0.0"))
    monkeypatch.setenv("CAI_SERVE_TOKEN", "tok")
    assert service_token(config(tmp_path, "serve.host=0.0.0.0")) == "tok"
    # and the command refuses before any model loads
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CAI_SERVE_TOKEN", None)
    done = subprocess.run([sys.executable, "-m", "cai", "serve", "configs/quickstart.yaml", "serve.host=0.0.0.0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "serve.host=0.0.0.0 is reachable from other machines" in done.stderr


def test_oversized_requests_are_refused(tmp_path):
    labeler = JudgeLabeler()
    with served(tmp_path, "serve.max_items=3", "serve.max_request_bytes=2048", labeler=labeler) as service:
        items = [{"prompt": "q", "answer": "great answer"}] * 4
        status, body = post(service.url + "/v1/score", {"items": items})
        assert status == 413 and "serve.max_items is 3" in body["error"]
        status, body = post(service.url + "/get_reward", {"query": ["x" * 3000], "prompts": [""]})
        assert status == 413 and "max_request_bytes" in body["error"]
        status, body = post(service.url + "/v1/score", None, raw=b"{not json")
        assert status == 400 and "not valid JSON" in body["error"]
    assert labeler.choose_calls == []


def test_batches_are_capped(tmp_path):
    labeler = JudgeLabeler(delay=0.3)
    with served(tmp_path, "serve.mode=pointwise", "serve.max_batch=4", labeler=labeler) as service:
        threads = [threading.Thread(target=post, args=(service.url + "/v1/score", {"items": [
            {"prompt": f"q{k}", "answer": "great answer"}] * 3})) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sum(labeler.choose_calls) == 12 and max(labeler.choose_calls) <= 4


def test_a_labeler_failure_is_answered_per_item(tmp_path):
    with served(tmp_path, "serve.mode=pointwise") as service:
        status, body = post(service.url + "/v1/score", {"items": [
            {"prompt": "q", "answer": "great answer"}, {"prompt": "q", "answer": "FAIL"}]})
        assert status == 200
        ok, failed = body["results"]
        assert ok["status"] == "ok" and ok["reward"] == pytest.approx(1.0)
        assert failed["status"] == "failed" and failed["reward"] is None and "gave up" in failed["error"]
        status, body = post(service.url + "/get_reward", {"query": ["great answer", "FAIL"], "prompts": ["", ""]})
        assert body["rewards"] == [pytest.approx(1.0), 0.0] and body["extra_logs"]["judge_ok"] == [1.0, 0.0]
        assert "gave up" in body["errors"][1]


def test_a_slow_labeler_times_out_per_item_instead_of_hanging(tmp_path):
    with served(tmp_path, "serve.request_timeout=0.3", labeler=JudgeLabeler(delay=2.0)) as service:
        started = time.time()
        status, body = post(service.url + "/v1/score", {"items": [{"prompt": "q", "answer": "great answer"}] * 2})
        assert time.time() - started < 1.8
    assert status == 200
    assert [r["status"] for r in body["results"]] == ["timeout", "timeout"]
    assert "serve.request_timeout=0.3" in body["results"][0]["error"]


def test_a_second_identical_request_is_served_from_the_cache(tmp_path):
    from cai.labelers.cache import CachedLabeler

    inner = JudgeLabeler()
    labeler = CachedLabeler(inner, tmp_path / "cache" / "labeler_cache.sqlite")
    payload = {"items": [{"prompt": "q", "answer": a} for a in ("great answer", "fine answer", "poor answer")],
               "mode": "group"}
    with served(tmp_path, labeler=labeler) as service:
        first = post(service.url + "/v1/score", payload)[1]
        asked = inner.usage.requests
        second = post(service.url + "/v1/score", payload)[1]
        metrics = get(service.url + "/metrics")[1]
    assert asked == 3 * 2 * 2  # 3 pairs x 2 principles x 2 orders
    assert inner.usage.requests == asked  # nothing asked again
    assert [r["reward"] for r in second["results"]] == [r["reward"] for r in first["results"]]
    assert "cai_labeler_cache_hits_total 12" in metrics
    assert 'cai_serve_requests_total{path="/v1/score",code="200"} 2' in metrics
    assert "cai_serve_request_seconds_count" in metrics


# -------------------------------------------------------------------------------------------------
# With the real openai client: keys and kills

SECRET = "sk-test-SECRET-never-shown-0123456789"


def fake_logprobs(body: dict):
    """The fake server's token distribution for a choice: the same scripted judge as JudgeLabeler."""
    text = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
    if "Rate the assistant" in text:
        return [{"(": 0.0}, {str(rating_of(text)): 0.0}]
    p = p_option_a(text)
    return [{"(": 0.0}, {"A": math.log(p), "B": math.log(1 - p)}]


def test_the_key_is_in_no_response_and_no_log(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("JUDGE_KEY", SECRET)
    with FakeLLMServer(logprobs=fake_logprobs) as fake:
        # every request to the labeler fails with a server error that quotes the key back
        fake.fault_for = lambda api, body: "echo-auth"
        cfg = config(tmp_path, "labeler.backend=openai", "labeler.model=judge", f"labeler.base_url={fake.openai_url}",
                     "labeler.api_key_env=JUDGE_KEY", "labeler.max_tries=1", "serve.mode=pointwise")
        with caplog.at_level("DEBUG"), Service(create_app(cfg, Judge(cfg))) as service:
            texts = [json.dumps(post(service.url + "/v1/score", {"items": [{"prompt": "q", "answer": "a"}]})[1]),
                     json.dumps(post(service.url + "/get_reward", {"query": ["a"], "prompts": [""]})[1]),
                     get(service.url + "/metrics")[1], get(service.url + "/health")[1]]
        assert any(SECRET in r["headers"].get("authorization", "") for r in fake.requests)  # it was sent...
    assert "failed" in texts[0] and "***" in texts[0]  # ...the error came back, scrubbed
    captured = capsys.readouterr()
    for text in texts + [caplog.text, captured.out, captured.err]:
        assert SECRET not in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_cli(cfg_path: Path, port: int, env: dict) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "cai", "serve", str(cfg_path), f"serve.port={port}"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if get(f"http://127.0.0.1:{port}/health")[0] == 200:
                return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError(f"cai serve did not start: {process.stdout.read()}")


def test_killed_mid_batch_and_restarted_asks_nothing_it_had_received(tmp_path):
    """`cai serve` (a subprocess) is SIGKILLed while a batch is half answered; after a restart the same
    request is answered in full, and no labeler request that had been answered is sent again."""
    import yaml

    answered: list[str] = []

    class Recording(FakeLLMServer):
        def _answer(self, api, body):
            answered.append(json.dumps(body["messages"], sort_keys=True))
            return super()._answer(api, body)

    with Recording(latency=0.05, logprobs=fake_logprobs) as fake:
        cfg_path = tmp_path / "serve.yaml"
        cfg_path.write_text(yaml.safe_dump({
            "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"),
            "constitution": "constitutions/tiny.yaml",
            "labeler": {"backend": "openai", "model": "judge", "base_url": fake.openai_url, "concurrency": 4,
                        "timeout": 30},
            "serve": {"mode": "pointwise"}}))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": "x"}
        env.pop("CAI_SERVE_TOKEN", None)
        items = [{"prompt": f"question {k}", "answer": "great answer"} for k in range(40)]

        # Hold every request after the 12th, so that the kill comes with 12 answers in and more in flight.
        arrivals = iter(range(10**6))
        fake.fault_for = lambda api, body: "slow" if next(arrivals) >= 12 else None
        fake.slow_seconds = 60
        port = _free_port()
        first = _start_cli(cfg_path, port, env)
        sender = threading.Thread(target=lambda: post_quietly(f"http://127.0.0.1:{port}/v1/score", {"items": items}),
                                  daemon=True)
        sender.start()
        deadline = time.time() + 60
        while len(answered) < 12 or len(fake.requests) < 16:
            assert time.time() < deadline, (len(answered), len(fake.requests))
            time.sleep(0.05)
        time.sleep(0.5)  # the answers reach the service and its cache
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        before = set(answered)
        # the items whose answers had arrived (the first may have been asked more than once while the
        # labeler found out how this server takes an answer prefix)
        items_in = {re.search(r"User: (question \d+)", a).group(1) for a in before}
        assert len(items_in) >= 8

        fake.fault_for = None
        port = _free_port()
        second = _start_cli(cfg_path, port, env)
        try:
            sent_before = len(fake.requests)
            status, body = post(f"http://127.0.0.1:{port}/v1/score", {"items": items})
            asked_again = [json.dumps(r["body"]["messages"], sort_keys=True) for r in fake.requests[sent_before:]]
        finally:
            second.send_signal(signal.SIGINT)
            out, _ = second.communicate(timeout=30)
    assert status == 200 and all(r["reward"] == pytest.approx(1.0) for r in body["results"])
    # every item not answered before the kill is asked (the restarted labeler probes the server's
    # prefill support once more, so an item may be asked twice), and no item that was answered
    items_again = {m.group(1) for m in (re.search(r"User: (question \d+)", a) for a in asked_again) if m}
    assert len(items_again) == 40 - len(items_in) and not items_in & items_again and not before & set(asked_again)
    assert "cai serve: stopped" in out


def post_quietly(url, payload):
    try:
        post(url, payload)
    except OSError:
        pass  # the service was killed under it


class ShorterIsBetter(JudgeLabeler):
    """Prefers the shorter of two answers (any text), so that a policy's random samples can be judged."""

    def choose(self, requests, desc=None, **kwargs):
        self.choose_calls.append(len(requests))
        out = []
        for r in requests:
            self.usage.requests += 1
            a, b = shown(r.messages[-1]["content"] + "\n")
            p = 1 / (1 + math.exp((len(a) - len(b)) / 10))
            out.append(Choice([p, 1 - p], method="logprobs"))
        return out


def test_trl_grpo_trainer_trains_on_the_service_reward(tmp_path, tiny_model_dir):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from cai.integrations import TRLReward

    labeler = ShorterIsBetter()
    with served(tmp_path, "serve.mode=group", "prefs.principles_per_pair=1", labeler=labeler) as service:
        prompts = [[{"role": "user", "content": p}] for p in ("How do I bake bread?", "Explain why this is wrong.")]
        args = GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=2, per_device_train_batch_size=4,
                          num_generations=4, max_completion_length=8, logging_steps=1, report_to="none",
                          bf16=False, use_cpu=True, save_strategy="no")
        trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                              reward_funcs=[TRLReward(service.url)], args=args,
                              train_dataset=datasets.Dataset.from_dict({"prompt": prompts * 4}),
                              processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
        trainer.train()
    logged = [e for e in trainer.state.log_history if "rewards/cai_judge/mean" in e]
    assert len(logged) == 2
    # group win rates: every group of 4 answers to one prompt averages 0.5, and they differ within it
    assert all(e["rewards/cai_judge/mean"] == pytest.approx(0.5) and e["rewards/cai_judge/std"] > 0 for e in logged)
    assert sum(labeler.choose_calls) == 2 * 6 * 1 * 2  # per step: 6 pairs x 1 principle x 2 orders
