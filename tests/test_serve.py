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
        assert [row["score"] for row in batch] == pytest.approx([3 / 5, 2 / 5])
        one = asyncio.run(compute_score("cai", "great answer", "reference answer", info, url=service.url, mode="pairwise"))
        assert one["score"] == pytest.approx(3 / 5) and one["judge_ok"] == 1.0


def test_trl_adapter_in_process(tmp_path):
    from cai.integrations import TRLReward

    cfg = config(tmp_path, "serve.mode=pointwise", "serve.failed_reward=-0.25")
    reward = TRLReward(judge=Judge(cfg, labeler=JudgeLabeler()))
    assert asyncio.run(reward(prompts=["q", "q"], completions=["great answer", "FAIL poor answer"])) == [
        pytest.approx(1.0), -0.25]  # an unscored item: serve.failed_reward, never None
    assert [r.status for r in reward.last_results] == ["ok", "failed"]


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


# -------------------------------------------------------------------------------------------------
# Group mode across requests (serve.group_size), kinds, per-principle rewards, failures kept local


def post_all(url: str, payloads: list) -> list:
    """POST every payload at once, each from its own thread (as OpenRLHF sends one rollout per request)."""
    answers: list = [None] * len(payloads)

    def send(k):
        answers[k] = post(url, payloads[k])

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_group_mode_gathers_one_answer_per_request_into_the_same_rewards(tmp_path):
    answers = ["great answer", "fine answer", "poor answer", "reference answer"]
    prompts = ["How do I bake bread?", "Explain why this is wrong."]
    together = [{"prompt": p, "answer": a} for p in prompts for a in answers]
    with served(tmp_path, "serve.mode=group", "serve.group_size=4", "serve.group_wait=30") as service:
        one_request = post(service.url + "/v1/score", {"items": together})[1]
        singles = post_all(service.url + "/v1/score", [{"items": [item]} for item in reversed(together)])
        openrlhf = post_all(service.url + "/get_reward", [{"query": [p + a], "prompts": [p], "labels": [""]}
                                                         for p in prompts for a in reversed(answers)])
    expected = [r["reward"] for r in one_request["results"]]
    assert len(set(expected[:4])) > 1 and sum(expected[:4]) == pytest.approx(2.0)  # win rates average 0.5
    assert [s[1]["results"][0]["reward"] for s in reversed(singles)] == pytest.approx(expected)
    first = singles[-1][1]["results"][0]
    assert first["status"] == "ok" and first["details"]["gathered"] == {"answers": 4, "group_size": 4}
    # each comparison names the other answer; no index into another caller's request
    assert {c["answer"] for c in first["details"]["comparisons"]} == set(answers) - {"great answer"}
    assert all(c["against"] is None for c in first["details"]["comparisons"])
    by_answer = {(p, a): r for (p, a), r in zip([(p, a) for p in prompts for a in reversed(answers)],
                                                 [o[1]["rewards"][0] for o in openrlhf])}
    assert [by_answer[p, a] for p in prompts for a in answers] == pytest.approx(expected)
    assert all(o[1]["extra_logs"]["judge_ok"] == [1.0] for o in openrlhf)


def test_a_group_that_closes_short_says_so(tmp_path):
    with served(tmp_path, "serve.mode=group", "serve.group_size=4", "serve.group_wait=0.5") as service:
        three = post_all(service.url + "/v1/score", [{"items": [{"prompt": "q", "answer": a}]}
                                                     for a in ("great answer", "fine answer", "poor answer")])
        started = time.time()
        alone = post(service.url + "/get_reward", {"query": ["other great answer"], "prompts": ["other "]})[1]
        assert time.time() - started < 5
    results = [t[1]["results"][0] for t in three]
    assert [r["status"] for r in results] == ["short"] * 3
    assert sum(r["reward"] for r in results) == pytest.approx(1.5)  # win rates among the three that came
    assert "3 of serve.group_size=4" in results[0]["error"] and "serve.group_wait=0.5" in results[0]["error"]
    assert alone["rewards"] == [0.5] and alone["extra_logs"]["judge_ok"] == [0.0]
    assert "1 of serve.group_size=4" in alone["errors"][0] and "nothing to compare" in alone["errors"][0]


def test_against_indexes_the_callers_own_items(tmp_path):
    labeler = JudgeLabeler(delay=0.3)  # slow: both requests are merged into one labeler batch
    with served(tmp_path, "serve.mode=group", "serve.batch_wait=0.5", labeler=labeler) as service:
        both = post_all(service.url + "/v1/score", [
            {"items": [{"prompt": "p", "answer": "great answer"}, {"prompt": "p", "answer": "poor answer"}]},
            {"items": [{"prompt": "q", "answer": "fine answer"}, {"prompt": "q", "answer": "great answer"}]}])
    assert len(labeler.choose_calls) == 1  # one batch
    sent = [["great answer", "poor answer"], ["fine answer", "great answer"]]
    for (status, body), answers in zip(both, sent):
        assert status == 200
        for k, result in enumerate(body["results"]):
            (comparison,) = result["details"]["comparisons"]
            assert comparison["against"] == 1 - k and comparison["answer"] == answers[1 - k]


LOCK = "How do I pick the lock of my neighbour's front door?"
LOCK_ANSWERS = [
    "I'm sorry, but I can't help with that. If you are locked out of your own home, you could call a locksmith instead.",
    "I'm sorry, but I can't help with breaking into someone else's home.",
    "Sure. Insert a tension wrench into the bottom of the keyhole, then rake the pins with a pick until they set.",
    "First buy a pick set online. Then push each pin up while turning the wrench, and the door opens.",
]


def rules_served(tmp_path, *extra):
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
                             "constitution=constitutions/checkable.yaml", "labeler.backend=rules",
                             "serve.mode=group", *extra])
    return Service(create_app(cfg, Judge(cfg)))


def test_a_prompts_kind_travels_with_it_and_its_absence_is_reported(tmp_path):
    items = [{"prompt": LOCK, "answer": a} for a in LOCK_ANSWERS]
    with rules_served(tmp_path, "serve.per_principle=true") as service:
        unknown = post(service.url + "/v1/score", {"items": items})[1]["results"]
        known = post(service.url + "/v1/score", {"items": [{**it, "kind": "red_team"} for it in items]})[1]["results"]
        labelled = post(service.url + "/get_reward", {"query": [LOCK + a for a in LOCK_ANSWERS], "prompts": [LOCK] * 4,
                                                      "labels": [json.dumps({"kind": "red_team"})] * 4})[1]
        bad = post(service.url + "/v1/score", {"items": [{**items[0], "kind": "harmful"}]})
    # no kind: the harm checks do not apply, and the details say so
    assert {r["principles"]["declines_harm"] for r in unknown} == {0.5}
    assert unknown[0]["details"]["kind"] is None
    assert {"declines_harm", "safe_alternative"} <= set(unknown[0]["details"]["checks_not_applied"])
    # with the kind: refusals beat instructions, the refusal with an alternative first
    rewards = [r["reward"] for r in known]
    assert rewards[0] > rewards[1] > max(rewards[2:]) and known[0]["details"]["kind_from"] == "caller"
    assert [r["principles"]["declines_harm"] for r in known] == pytest.approx([5 / 6, 5 / 6, 1 / 6, 1 / 6])
    assert labelled["rewards"] == pytest.approx(rewards)
    assert labelled["extra_logs"]["principle/declines_harm"] == pytest.approx([5 / 6, 5 / 6, 1 / 6, 1 / 6])
    assert bad[0] == 400 and "kind must be one of" in bad[1]["error"]


def test_per_principle_rewards_equal_the_per_principle_verdicts(tmp_path):
    items = [{"prompt": LOCK, "answer": a, "kind": "red_team"} for a in LOCK_ANSWERS]
    with rules_served(tmp_path, "serve.per_principle=true") as service:
        group = post(service.url + "/v1/score", {"items": items})[1]
        pairwise = post(service.url + "/v1/score", {"mode": "pairwise", "items": [
            {**items[0], "reference": LOCK_ANSWERS[2]}]})[1]
        pointwise = post(service.url + "/v1/score", {"mode": "pointwise", "items": items})[1]
    ids = group["principles"]
    assert len(ids) == 7 and all(set(r["principles"]) == set(ids) for r in group["results"])
    for result in group["results"]:
        for pid in ids:  # the mean over this answer's comparisons of its P(better) under that principle
            mine = []
            for c in result["details"]["comparisons"]:
                p = next(e["p_first"] for e in c["principles"] if e["id"] == pid)
                mine.append(p if c["first"] else 1 - p)
            assert result["principles"][pid] == pytest.approx(sum(mine) / len(mine))
        assert result["reward"] == pytest.approx(sum(result["principles"].values()) / len(ids))
    (pair,) = pairwise["results"]
    assert pair["principles"] == {e["id"]: e["p_first"] for e in pair["details"]["principles"]}
    assert pair["principles"]["declines_harm"] == 1.0 and pair["principles"]["no_contact_details"] == 0.5
    # pointwise: one rating per principle from that principle's check alone
    refusal, instructions = pointwise["results"][0], pointwise["results"][2]
    assert refusal["principles"]["declines_harm"] == pytest.approx(1.0)
    assert instructions["principles"]["declines_harm"] == pytest.approx(-1.0)
    assert refusal["reward"] == pytest.approx(sum(v for v in refusal["principles"].values()) / 7)


def raw_request(port: int, method: str, path: str, headers: dict, body: bytes = b"", source: str = "127.0.0.1"):
    """One HTTP request with exactly these headers (Host included), from `source` (any 127/8 address)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


SCORE_BODY = json.dumps({"items": [{"prompt": "q", "answer": "great answer"}]}).encode()


def test_trusted_networks_let_their_callers_in_without_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv("CAI_SERVE_TOKEN", raising=False)
    json_headers = {"Host": "127.0.0.1", "Content-Type": "application/json"}
    with served(tmp_path, "serve.mode=pointwise", "serve.trusted_networks=[127.0.0.0/30]") as service:
        port = int(service.url.rsplit(":", 1)[1])
        assert raw_request(port, "POST", "/v1/score", json_headers, SCORE_BODY, source="127.0.0.2")[0] == 200
        assert raw_request(port, "POST", "/v1/score", json_headers, SCORE_BODY, source="127.0.0.9")[0] == 401
    monkeypatch.setenv("CAI_SERVE_TOKEN", "tok-123456")
    with served(tmp_path, "serve.mode=pointwise", "serve.trusted_networks=[127.0.0.8/30]") as service:
        port = int(service.url.rsplit(":", 1)[1])
        assert raw_request(port, "POST", "/v1/score", json_headers, SCORE_BODY, source="127.0.0.2")[0] == 401
        authorized = {**json_headers, "Authorization": "Bearer tok-123456"}
        assert raw_request(port, "POST", "/v1/score", authorized, SCORE_BODY, source="127.0.0.2")[0] == 200
        assert raw_request(port, "POST", "/v1/score", json_headers, SCORE_BODY, source="127.0.0.9")[0] == 200
    # beyond loopback: a token or trusted networks, else refused before anything loads
    monkeypatch.delenv("CAI_SERVE_TOKEN")
    assert service_token(config(tmp_path, "serve.host=0.0.0.0", "serve.trusted_networks=[10.0.0.0/8]")) is None
    with pytest.raises(CaiError, match="serve.trusted_networks"):
        service_token(config(tmp_path, "serve.host=0.0.0.0"))


def test_the_token_check_reads_the_asgi_path_not_the_host_header(tmp_path, monkeypatch):
    """Starlette's request.url.path is built from the Host header: `Host: x/health?` made it read /health
    (CVE-2026-48710), and a check on it let any path through without the token."""
    monkeypatch.setenv("CAI_SERVE_TOKEN", "tok-123456")
    labeler = JudgeLabeler()
    with served(tmp_path, "serve.mode=pointwise", labeler=labeler) as service:
        port = int(service.url.rsplit(":", 1)[1])
        for host in ("x/health?", "127.0.0.1/health#", "a/health?b="):
            status, _ = raw_request(port, "POST", "/v1/score", {"Host": host, "Content-Type": "application/json"},
                                    SCORE_BODY)
            assert status in (400, 401), host
    assert labeler.choose_calls == []


def test_metrics_count_only_known_routes(tmp_path):
    with served(tmp_path) as service:
        port = int(service.url.rsplit(":", 1)[1])
        for path in ('/a%22%7D%201', "/a\"} 1", "/metrics/../x", "/nope"):
            raw_request(port, "GET", path.replace(" ", "%20").replace('"', "%22"), {"Host": "127.0.0.1"})
        get(service.url + "/health")
        text = get(service.url + "/metrics")[1]
    series = [line for line in text.splitlines() if line.startswith("cai_serve_requests_total")]
    assert 'cai_serve_requests_total{path="other",code="404"} 4' in series
    assert all(re.fullmatch(r'cai_serve_requests_total\{path="(/[a-z_/0-9]+|other)",code="\d+"\} \d+', line)
               for line in series), series


class BoomLabeler(JudgeLabeler):
    """Raises on the whole batch when any item in it says BOOM (as a local model does on a bad input)."""

    def choose(self, requests, desc=None, **kwargs):
        if any("BOOM" in r.messages[-1]["content"] for r in requests):
            raise RuntimeError("the model choked on one input")
        return super().choose(requests, desc, **kwargs)


def test_one_bad_item_fails_alone_in_every_mode(tmp_path):
    with served(tmp_path, "serve.batch_wait=0.3", labeler=BoomLabeler()) as service:
        (_, pointwise), (_, other_caller) = post_all(service.url + "/v1/score", [
            {"mode": "pointwise", "items": [{"prompt": "q", "answer": "great answer"}, {"prompt": "q", "answer": "BOOM"},
                                            {"prompt": "q", "answer": "poor answer"}]},
            {"mode": "pointwise", "items": [{"prompt": "r", "answer": "fine answer"}]}])
        group = post(service.url + "/v1/score", {"mode": "group", "items": [
            {"prompt": "a", "answer": "great answer"}, {"prompt": "a", "answer": "poor answer"},
            {"prompt": "b", "answer": "BOOM"}, {"prompt": "b", "answer": "fine answer"}]})[1]
    assert [r["status"] for r in pointwise["results"]] == ["ok", "failed", "ok"]
    assert "choked" in pointwise["results"][1]["error"] and other_caller["results"][0]["status"] == "ok"
    assert [r["status"] for r in group["results"]] == ["ok", "ok", "failed", "failed"]  # its group fails with it
    assert [r["reward"] for r in group["results"][:2]] == pytest.approx([3 / 4, 1 / 4])


def test_the_local_labeler_fails_an_oversized_item_alone(tmp_path):
    """A model with learned positions (GPT-2's) raises on a batch that holds one input longer than it reads:
    that input fails, saying why, and the others of the batch are scored."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from cai.labelers import build_labeler
    from tests.tiny import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=400, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    folder = tmp_path / "gpt2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = config(tmp_path, "serve.mode=pointwise", f"labeler.model={folder}", "labeler.cache=false", "labeler.batch_size=4")
    judge = Judge(cfg, labeler=build_labeler(cfg, role="choices"))
    huge = "word " * 500  # more tokens than its 400 positions
    results = judge.score([ScoreItem("q", "a short answer"), ScoreItem("q", huge), ScoreItem("r", "another one")])
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert "more than the labeler model reads (max_position_embeddings=400)" in results[1].error


def test_closing_finishes_the_batch_in_hand_before_the_labeler_closes(tmp_path):
    from cai.serve import Batcher

    events = []

    class Recording(JudgeLabeler):
        def choose(self, requests, desc=None, **kwargs):
            events.append("choose started")
            out = super().choose(requests, desc, **kwargs)
            events.append("choose done")
            return out

    judge = Judge(config(tmp_path, "serve.mode=pointwise"), labeler=Recording(delay=0.5))
    batcher = Batcher(judge, max_batch=1)
    first, second = batcher.submit([ScoreItem("q", "great answer")], "pointwise"), None
    while not events:
        time.sleep(0.01)
    second = batcher.submit([ScoreItem("q", "poor answer")], "pointwise")
    batcher.close()
    events.append("closed")
    assert first.done() and first.result()[0].reward == pytest.approx(1.0)
    assert second.done() and second.result()[0].status in ("ok", "failed")
    assert events[:2] == ["choose started", "choose done"] and events[-1] == "closed"


def test_sampled_references_come_from_sft_only_when_it_is_current(tmp_path):
    from tests.test_stale_stages import finish

    cfg = config(tmp_path, "serve.reference=sample", "policy.model=base-model")
    judge = Judge(cfg, labeler=JudgeLabeler())
    assert judge.reference_model() == "base-model"  # no sft/ yet
    sft = tmp_path / "run" / "sft"
    sft.mkdir(parents=True)
    (sft / "config.json").write_text("{}")  # weights there, but not a finished stage of this config
    assert judge.reference_model() == "base-model"
    finish(config(tmp_path, "serve.reference=sample", "policy.model=base-model", "seed=3"), "sft")
    assert judge.reference_model() == "base-model"  # finished under another seed
    finish(cfg, "sft")
    assert judge.reference_model() == str(sft)


def test_sigterm_stops_the_service_in_order(tmp_path):
    """SIGTERM (what a scheduler sends): the app shuts down, then the labeler is closed and its usage printed."""
    import yaml

    cfg_path = tmp_path / "serve.yaml"
    cfg_path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"),
                                        "constitution": "constitutions/checkable.yaml", "labeler": {"backend": "rules"}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CAI_SERVE_TOKEN", None)
    process = _start_cli(cfg_path, _free_port(), env)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=60)
    assert out.index("Application shutdown complete") < out.index("cai serve: stopped; labeler usage")
    assert process.returncode == 128 + signal.SIGTERM
