"""Labeler server pools (cai/labelers/pool.py): requests spread over several fake servers on
127.0.0.1, a server killed mid-run, a one-second outage of every server ridden out, a stage that stops
with one line when no server returns in time, a cancelled request's slot given back."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from cai.errors import CaiError
from cai.labelers import GenerateRequest, build_labeler
from cai.labelers.cache import CachedLabeler
from cai.labelers.openai_api import OpenAILabeler
from tests.fake_servers import FakeLLMServer

FAST = dict(backoff_base=0.01, backoff_max=0.05, start_interval=0.0, price=(0.0, 0.0))


@pytest.fixture
def servers():
    made = [FakeLLMServer(latency=0.02).start() for _ in range(3)]
    yield made
    for server in made:
        server.stop()


def requests(n: int, tag: str = "q") -> list[GenerateRequest]:
    return [GenerateRequest([{"role": "user", "content": f"{tag} {i}"}], max_new_tokens=8) for i in range(n)]


def pool_labeler(servers, **kwargs) -> OpenAILabeler:
    return OpenAILabeler("pool-model", base_url=[s.openai_url for s in servers], **{**FAST, **kwargs})


def test_requests_spread_over_the_pool_and_usage_counts_each_server(servers):
    labeler = pool_labeler(servers, concurrency=2)
    try:
        results = labeler.generate(requests(60))
    finally:
        labeler.close()
    assert [r.text for r in results] == [f"Answer to: q {i}" for i in range(60)]
    counts = labeler.usage.extra["server_requests"]
    assert counts == {s.openai_url: s.answered for s in servers}
    assert sum(counts.values()) == 60
    assert all(s.answered >= 10 for s in servers)  # least in flight first: no server left idle
    assert all(s.max_in_flight <= 2 for s in servers)  # labeler.concurrency is per server in a pool
    assert labeler.concurrency == 6


def test_cache_key_does_not_depend_on_which_server_answered(servers, tmp_path):
    first = CachedLabeler(pool_labeler(servers[:2]), tmp_path / "cache.sqlite")
    first.generate(requests(10))
    first.close()
    # the same model on another pool (a server replaced, the order changed): every answer is cached
    second = CachedLabeler(pool_labeler([servers[2], servers[1]]), tmp_path / "cache.sqlite")
    results = second.generate(requests(10))
    second.close()
    assert all(r.cached for r in results)
    assert servers[2].answered == 0
    assert sum(s.answered for s in servers) == 10


def test_a_server_killed_mid_run_is_benched_and_the_others_answer_everything(servers):
    dead = servers[0]
    urls = [s.openai_url for s in servers]
    killed = threading.Event()

    def kill_after_some(api, body):
        if dead.answered >= 5 and not killed.is_set():
            killed.set()
            threading.Thread(target=dead.stop).start()  # stops while requests are in flight
        return None

    dead.fault_for = kill_after_some
    labeler = pool_labeler(servers, concurrency=3, server_failures=2, server_bench_seconds=60)
    answered = []
    try:
        results = labeler.generate(requests(120), on_result=lambda i, r: answered.append(i))
    finally:
        labeler.close()
    assert killed.is_set()
    assert sorted(answered) == list(range(120))  # every item reported once
    assert all(r.status == "ok" for r in results), [r.error for r in results if r.status != "ok"][:3]
    counts = labeler.usage.extra["server_requests"]
    assert sum(counts.values()) == 120
    assert counts[urls[0]] < 20  # it answered a few, then the others took its share
    assert counts[urls[1]] + counts[urls[2]] > 100


def test_no_server_left_stops_with_one_line_naming_them(servers):
    urls = [s.openai_url for s in servers]
    for server in servers[:2]:
        server.stop()
    servers[2].fault_for = lambda api, body: "503" if servers[2].answered >= 3 else None
    # benched for 60 s, longer than a request waits for a server (labeler.timeout=2): the stage stops
    labeler = pool_labeler(servers, concurrency=1, server_failures=2, server_bench_seconds=60, timeout=2)
    got = []
    try:
        with pytest.raises(CaiError) as err:
            labeler.generate(requests(40), on_result=lambda i, r: got.append(r))
    finally:
        labeler.close()
    message = str(err.value)
    assert "\n" not in message and "no server of labeler.base_url is left" in message
    assert all(url in message for url in urls)
    assert [r.status for r in got].count("ok") == 3  # what was answered reached the cache callback


def test_pool_config_keys(tiny_config, servers):
    urls = [s.openai_url for s in servers]
    cfg = tiny_config("labeler.backend=openai", "labeler.model=m", f"labeler.base_url={json.dumps(urls)}",
                      "labeler.server_concurrency=[1,2,3]")
    labeler = build_labeler(cfg)
    try:
        assert labeler.concurrency == 6 and labeler.id == "openai:m@" + ",".join(urls)
        assert labeler.cache_params("generate")["base_url"] == "pool"
    finally:
        labeler.close()
    with pytest.raises(CaiError, match="server_concurrency has 2 entries"):
        build_labeler(tiny_config("labeler.backend=openai", f"labeler.base_url={json.dumps(urls)}",
                                  "labeler.server_concurrency=[1,2]"))
    single = tiny_config("labeler.backend=openai", f"labeler.base_url=[{urls[0]}]")
    assert single.labeler.base_url == urls[0]  # a list of one is a plain URL
    with pytest.raises(CaiError, match="base_url"):
        tiny_config("labeler.backend=openai", "labeler.base_url=[]")


def test_sl_stage_on_a_pool_with_a_server_killed_midway(tiny_config, servers):
    from cai.records import read_jsonl
    from cai.stages import sl

    urls = [s.openai_url for s in servers]
    dead = servers[1]
    dead.fault_for = lambda api, body: (threading.Thread(target=dead.stop).start() if dead.answered == 4 else None)
    cfg = tiny_config("labeler.backend=openai", "labeler.model=pool-model", f"labeler.base_url={json.dumps(urls)}",
                      "labeler.concurrency=2", "labeler.server_failures=2", "sl.rounds=2", "data.limit=30")
    out = sl.run(cfg)
    records = read_jsonl(out / "records.jsonl")
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))  # none twice
    red = [r for r in records if r["kind"] == "red_team"]
    statuses = [rnd[key] for r in red for rnd in r["rounds"] for key in ("critique_status", "revision_status")]
    assert statuses and set(statuses) <= {"ok", "failed"} and statuses.count("ok") == len(statuses)
    usage = json.loads((out / "labeler_usage.json").read_text())
    counts = usage["total"]["server_requests"]
    assert sum(counts.values()) == len(statuses) and 4 <= counts[urls[1]] < len(statuses) / 3
    assert counts[urls[0]] > 0 and counts[urls[2]] > 0


def test_anthropic_backend_spreads_over_a_pool_too(servers):
    from cai.labelers.anthropic_api import AnthropicLabeler

    labeler = AnthropicLabeler("pool-model", base_url=[s.anthropic_url for s in servers], concurrency=2, **FAST)
    try:
        results = labeler.generate(requests(30))
    finally:
        labeler.close()
    assert [r.text for r in results] == [f"Answer to: q {i}" for i in range(30)]
    assert all(s.bodies("/v1/messages") for s in servers)
    assert sum(labeler.usage.extra["server_requests"].values()) == 30


def test_pool_picks_the_least_loaded_server_waits_when_full_and_benches_a_failing_one():
    from cai.labelers.pool import ServerPool

    async def scenario():
        pool = ServerPool.from_urls(["http://a", "http://b"], [1, 3], failures=2, bench_seconds=60,
                                    backoff_base=0.2, wait_seconds=1)
        pool.bind(lambda url: url)
        taken = [await pool.acquire() for _ in range(4)]
        assert [s.url for s in taken] == ["http://a", "http://b", "http://b", "http://b"]
        waiter = asyncio.ensure_future(pool.acquire())  # every slot is taken: it waits
        await asyncio.sleep(0.05)
        assert not waiter.done()
        assert pool.release(taken[0], "APIConnectionError: refused", None) is True  # the server's fault
        assert not pool.servers[0].in_service(time.monotonic())  # a rests 0.1-0.2 s before it is tried again
        assert (await asyncio.wait_for(waiter, 1)).url == "http://a"
        assert pool.release(taken[1], "fake 400", 400) is False  # the request's fault: benches nothing
        assert pool.release(waiter.result(), "timed out", None) is True  # a's second failure in a row
        assert [s.url for s in [await pool.acquire()]] == ["http://b"]  # a is benched
        for server in taken[2:]:
            pool.release(server, "HTTP 503", 503)
        with pytest.raises(CaiError, match="no server of labeler.base_url is left"):
            await pool.acquire()
        assert pool.answered() == {"http://a": 0, "http://b": 0}

    asyncio.run(scenario())


def test_backoff_before_the_bench_is_jittered_and_bounded():
    from cai.labelers.pool import ServerPool

    pool = ServerPool.from_urls(["http://a"], 1, failures=10, bench_seconds=5, backoff_base=0.5, backoff_max=3)
    for failures, (low, high) in {1: (0.25, 0.5), 2: (0.5, 1.0), 3: (1.0, 2.0), 4: (1.5, 3.0), 9: (1.5, 3.0)}.items():
        delays = [pool.backoff(failures) for _ in range(200)]
        assert low <= min(delays) and max(delays) <= high and max(delays) - min(delays) > (high - low) / 2


def test_a_one_second_outage_of_every_server_is_ridden_out(servers):
    """Every server of the pool answers 503 for one second mid-run. Without backoff, three failures in a
    row came within milliseconds, every server was benched at once and the stage stopped."""
    outage = {"from": None}

    def down_for_a_second(api, body):
        if outage["from"] is None and sum(s.answered for s in servers) >= 20:
            outage["from"] = time.monotonic()
        if outage["from"] is not None and time.monotonic() - outage["from"] < 1.0:
            return "503"
        return None

    for server in servers:
        server.fault_for = down_for_a_second
    labeler = pool_labeler(servers, concurrency=2, server_failures=3, server_bench_seconds=2, timeout=10,
                           backoff_base=0.2, backoff_max=2, max_tries=20)
    try:
        results = labeler.generate(requests(80))
    finally:
        labeler.close()
    assert outage["from"] is not None
    assert all(r.status == "ok" for r in results), [r.error for r in results if r.status != "ok"][:3]
    assert sum(s.answered for s in servers) == 80 and labeler.usage.retries > 0


def test_a_cancelled_request_gives_its_slot_back(servers):
    """A call that stops with requests still in flight (an error in a callback, Ctrl-C) has them cancelled;
    their servers' slots come back, so that the next call on the same labeler has the whole pool."""
    arrivals = iter(range(10**6))
    servers[0].fault_for = lambda api, body: "slow" if next(arrivals) > 0 else None
    servers[0].slow_seconds = 30

    def stop(i, result):
        raise RuntimeError("the caller went away")

    labeler = pool_labeler(servers[:1], concurrency=3, timeout=60)
    try:
        with pytest.raises(RuntimeError, match="went away"):
            labeler.generate(requests(3), on_result=stop)
        assert [s.in_flight for s in labeler._pool.servers] == [0]
        servers[0].fault_for = None
        assert [r.status for r in labeler.generate(requests(3, "again"))] == ["ok"] * 3
    finally:
        labeler.close()
