"""The on-disk labeler cache over any labeler: keys, hits and misses, what is (not) stored, stats and
clearing, WAL mode, and a second process reading while the first writes."""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import sys

import pytest

from cai.labelers.base import BudgetExceeded, Choice, ChoiceRequest, GenerateRequest, Generation, Usage
from cai.labelers.cache import CachedLabeler, cache_clear, cache_stats, default_cache_path


class Scripted:
    """A labeler that answers from the request text and remembers what it was asked."""

    def __init__(self, model: str = "scripted-1", stream: bool = True):
        self.id = f"scripted:{model}"
        self.model = model
        self.usage = Usage()
        self.asked: list = []
        if not stream:  # a labeler without the on_result callback (like the local one)
            self.generate = self._generate_plain

    def _answer(self, request: GenerateRequest) -> Generation:
        text = request.messages[-1]["content"]
        if "fail" in text:
            return Generation(None, status="failed", error="boom")
        if "garbled" in text:
            return Generation("???", status="unparseable", error="empty answer")
        return Generation(f"re: {text} #{request.sample_index}", input_tokens=3, output_tokens=2)

    def generate(self, requests, desc=None, on_result=None, reject_refusals=False):
        out = []
        for i, request in enumerate(requests):
            self.asked.append(request)
            self.usage.requests += 1
            out.append(self._answer(request))
            if on_result:
                on_result(i, out[-1])
        return out

    def _generate_plain(self, requests, desc=None):
        self.asked.extend(requests)
        return [self._answer(r) for r in requests]

    def choose(self, requests, desc=None, on_result=None):
        out = []
        for i, request in enumerate(requests):
            self.asked.append(request)
            out.append(Choice([0.25, 0.75], method="votes", raw="(B)"))
            if on_result:
                on_result(i, out[-1])
        return out

    def close(self):
        pass


def ask(text: str, **kwargs) -> GenerateRequest:
    return GenerateRequest([{"role": "user", "content": text}], **kwargs)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "labeler_cache.sqlite"


def test_hits_come_back_in_order_and_misses_go_to_the_inner_labeler(path):
    inner = Scripted()
    cached = CachedLabeler(inner, path)
    first = cached.generate([ask("a"), ask("b")])
    second = cached.generate([ask("b"), ask("c"), ask("a")])
    assert [r.text for r in second] == ["re: b #0", "re: c #0", "re: a #0"]
    assert [r.cached for r in second] == [True, False, True]
    assert not any(r.cached for r in first)
    assert [r.messages[0]["content"] for r in inner.asked] == ["a", "b", "c"]
    assert cached.usage.cache_hits == 2 and cached.usage.requests == 3


def test_identical_requests_in_one_batch_are_asked_once(path):
    inner = Scripted()
    results = CachedLabeler(inner, path).generate([ask("same"), ask("same"), ask("same", sample_index=1)])
    assert [r.text for r in results] == ["re: same #0", "re: same #0", "re: same #1"]
    assert len(inner.asked) == 2


@pytest.mark.parametrize("change", [
    dict(temperature=0.1), dict(top_p=0.5), dict(max_new_tokens=7), dict(sample_index=3),
])
def test_every_sampling_parameter_is_in_the_key(path, change):
    inner = Scripted()
    cached = CachedLabeler(inner, path)
    cached.generate([ask("q")])
    cached.generate([ask("q", **change)])
    assert len(inner.asked) == 2


def test_model_options_and_prefix_are_in_the_key(path):
    cached = CachedLabeler(Scripted("model-a"), path)
    cached.generate([ask("q")])
    other = Scripted("model-b")
    CachedLabeler(other, path).generate([ask("q")])
    assert len(other.asked) == 1  # another model's answer is not this one's

    chooser = Scripted()
    cached = CachedLabeler(chooser, path)
    base = ChoiceRequest([{"role": "user", "content": "which?"}])
    for request in [base, base, dataclasses.replace(base, options=("1", "2", "3")),
                    dataclasses.replace(base, answer_prefix="Answer: (")]:
        cached.choose([request])
    assert len(chooser.asked) == 3
    assert cached.choose([base])[0].probs == [0.25, 0.75]


def test_labeler_params_and_call_options_are_in_the_key(path):
    class WithParams(Scripted):
        system_prompt = "one"

        def cache_params(self, kind):
            return {"model": self.model, "system_prompt": self.system_prompt}

    inner = WithParams()
    cached = CachedLabeler(inner, path)
    cached.generate([ask("q")])
    inner.system_prompt = "two"
    cached.generate([ask("q")])
    cached.generate([ask("q")], reject_refusals=True)
    cached.generate([ask("q")], reject_refusals=True)
    assert len(inner.asked) == 3


def test_failed_answers_are_not_kept_and_unparseable_ones_are(path):
    inner = Scripted()
    cached = CachedLabeler(inner, path)
    cached.generate([ask("fail"), ask("garbled")])
    again = cached.generate([ask("fail"), ask("garbled")])
    assert again[0].status == "failed" and not again[0].cached  # retried
    assert again[1].status == "unparseable" and again[1].cached and again[1].text == "???"
    assert cached.usage.unparseable == 1  # the cached one is counted in the summary too
    assert cache_stats(path)["unparseable"] == 1


def test_a_labeler_without_on_result_is_stored_when_its_batch_returns(path):
    inner = Scripted(stream=False)
    CachedLabeler(inner, path).generate([ask("x"), ask("y")])
    assert cache_stats(path)["entries"] == 2


def test_budget_exceeded_carries_everything_received(path):
    class Capped(Scripted):
        def generate(self, requests, desc=None, on_result=None):
            on_result(0, Generation("first"))
            raise BudgetExceeded("labeler.max_requests=1 reached after 1 requests; raise it and rerun to continue")

    CachedLabeler(Scripted(), path).generate([ask("known")])
    with pytest.raises(BudgetExceeded) as err:
        CachedLabeler(Capped(), path).generate([ask("new"), ask("known"), ask("other")])
    assert [r and r.text for r in err.value.results] == ["first", "re: known #0", None]
    assert cache_stats(path)["entries"] == 2


def test_stats_and_clear_by_model(path):
    CachedLabeler(Scripted("m1"), path).generate([ask("a"), ask("b")])
    CachedLabeler(Scripted("m2"), path).generate([ask("a")])
    CachedLabeler(Scripted("m2"), path).choose([ChoiceRequest([{"role": "user", "content": "?"}])])
    stats = cache_stats(path)
    assert stats["entries"] == 4 and stats["exists"] and stats["size_bytes"] > 0
    assert stats["by_model"] == {"m1": {"generate": 2, "choose": 0}, "m2": {"generate": 1, "choose": 1}}
    assert cache_clear(path, model="m2") == 2
    assert cache_stats(path)["by_model"] == {"m1": {"generate": 2, "choose": 0}}
    assert cache_clear(path) == 2 and cache_stats(path)["entries"] == 0


def test_stats_of_a_missing_cache_creates_nothing(tmp_path):
    missing = tmp_path / "none" / "labeler_cache.sqlite"
    assert cache_stats(missing)["exists"] is False and cache_clear(missing) == 0
    assert not missing.parent.exists()


def test_default_path_and_wal_mode(tmp_path):
    from cai.config import load_config

    cfg = load_config(None, [f"cache_dir={tmp_path}/c"])
    path = default_cache_path(cfg)
    assert path == tmp_path / "c" / "labeler_cache.sqlite"
    CachedLabeler(Scripted(), path).generate([ask("q")])
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert default_cache_path(load_config(None, ["cache_dir=~/x"])).parts[-2] == "x"
    assert "~" not in str(default_cache_path(load_config(None, ["cache_dir=~/x"])))


def test_another_process_reads_while_this_one_writes(path):
    cached = CachedLabeler(Scripted(), path)
    cached.generate([ask(f"q{i}") for i in range(5)])
    reader = (
        "import sys; from cai.labelers.cache import cache_stats; "
        "print(cache_stats(sys.argv[1])['entries'])"
    )
    out = subprocess.run([sys.executable, "-c", reader, str(path)], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "5", out.stderr
    cached.generate([ask("after")])  # this process's connection still writes
    assert cache_stats(path)["entries"] == 6


def test_attributes_of_the_inner_labeler_show_through(path):
    cached = CachedLabeler(Scripted("m9"), path)
    assert cached.model == "m9" and cached.id == "scripted:m9"
