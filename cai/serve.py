"""`cai serve CONFIG`: the run's constitutional judge as an HTTP reward service (docs/serve.md).

RL engines that train past one machine (OpenRLHF, verl, TRL's GRPO with vLLM) take "a remote reward
URL or a Python function". This module gives them cai's judge: the run's constitution and labeler,
through the same machinery the stages use (principles drawn per item and seeded, both orders, soft
labels, chain of thought by config, the answer cache, budgets, usage accounting).

1. Scoring modes (`serve.mode`, or per request in cai's protocol):
   - pointwise (d-RLAIF, Lee et al. 2023): the labeler's probability-weighted 0-9 rating of each answer
     under the constitution, scaled to [-1, 1] (cai/rewards.py);
   - pairwise: P(answer better than a reference answer), the prefs stage's debiased soft label
     (cai/preferences.py: M principles, both orders); the caller sends the reference, or the service
     samples one from `serve.reference_model`;
   - group: for GRPO-style groups of answers to one prompt, every pair of the group is judged as in
     pairwise, and an answer's reward is its win rate against the others (`group_win_rates`).
2. Batching: HTTP handlers put their items on one queue; a single worker thread takes everything
   queued (up to `serve.max_batch` items) and hands it to the labeler as one batch, so an API labeler
   keeps `labeler.concurrency` requests in flight across concurrent callers, and the labeler is only
   ever used from one thread.
3. Protocols: OpenRLHF's `POST /get_reward`, cai's `POST /v1/score` (per-principle details), and
   `GET /health`, `GET /metrics` (Prometheus text). Adapters for TRL and verl: cai/integrations.py.
4. Serving: 127.0.0.1 unless `serve.host` says otherwise; a bearer token from `$serve.token_env` is
   required whenever it is set, and refusing to start without one on any other address; request and
   item caps; a request that waits longer than `serve.request_timeout` is answered with a timeout error
   per item (the labeling goes on and lands in the cache, so a retry is answered from it).

Kills: the answer cache stores each labeler answer the moment it arrives, so a service killed mid-batch
and restarted asks the labeler for nothing it had already received.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (Request) at runtime.
import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from cai.errors import CaiError
from cai.labelers.base import BudgetExceeded, GenerateRequest, Message

log = logging.getLogger("cai.serve")

MODES = ("pointwise", "pairwise", "group")
NEUTRAL_REWARD = {"pointwise": 0.0, "pairwise": 0.5, "group": 0.5}  # the middle of each mode's scale


# -------------------------------------------------------------------------------------------------
# Items and results


@dataclass(frozen=True)
class ScoreItem:
    """One answer to score. `prompt` is the user's text or a conversation ending with the user's turn;
    `reference` is the answer a pairwise score compares against; `group` names the GRPO group (by
    default, answers to the same prompt in one request form a group)."""

    prompt: str | tuple | list
    answer: str
    reference: str | None = None
    group: Any = None


@dataclass
class ScoreResult:
    """`reward` is None when the item could not be scored; `status` and `error` say why."""

    reward: float | None
    status: str = "ok"  # ok | failed | unparseable | timeout
    error: str | None = None
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"reward": self.reward, "status": self.status, "error": self.error, "details": self.details}


def conversation_of(prompt) -> list[Message]:
    """The prompt as chat messages (a plain string is one user turn)."""
    from cai.chat import conversation

    if isinstance(prompt, str):
        return conversation(prompt)
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def group_key(item: ScoreItem):
    return item.group if item.group is not None else json.dumps(conversation_of(item.prompt), sort_keys=True)


def content_id(*parts) -> str:
    """An id made from the content, so that the principles drawn for it (seeded by id) and therefore the
    labeler's questions, and their cache keys, are the same in every request and after a restart."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


def group_win_rates(size: int, p_first: dict[tuple[int, int], float | None]) -> list[float | None]:
    """Each answer's debiased win rate within its group.

    `p_first[(i, j)]` (i < j) is P(answer i is better than answer j), already averaged over both
    presentation orders and the principles (preferences.judge_pairs), or None when the labeler gave no
    readable verdict. Answer i's win rate is the mean over the others j of P(i beats j), where
    P(j beats i) = 1 - P(i beats j); pairs without a verdict are left out; None when none is left.
    The rates of a group with every verdict known average to exactly 0.5.
    """
    wins: list[list[float]] = [[] for _ in range(size)]
    for (i, j), p in p_first.items():
        if p is None:
            continue
        wins[i].append(p)
        wins[j].append(1.0 - p)
    return [sum(w) / len(w) if w else None for w in wins]


# -------------------------------------------------------------------------------------------------
# 1. The judge (in process)


class Judge:
    """The constitution and labeler of a run, scoring answers in one of the three modes.

    `labeler` replaces the configured one (tests pass a scripted labeler); `reference_sampler` is a
    labeler whose `generate` writes references in pairwise mode with `serve.reference=sample`.
    """

    def __init__(self, cfg, labeler=None, reference_sampler=None):
        from cai.constitution import load_constitution
        from cai.preferences import JudgeSettings
        from cai.rewards import DirectLabelerReward
        from cai.templates import Templates

        self.cfg = cfg
        self.mode = cfg.serve.mode
        self.constitution = load_constitution(cfg.constitution)
        self.templates = Templates(cfg.templates)
        if not self.constitution.comparisons:
            raise CaiError(f"{cfg.constitution}: constitution '{self.constitution.name}' has no comparison "
                           "principles; the judge needs at least one")
        m = cfg.serve.principles_per_pair or cfg.prefs.principles_per_pair
        self.settings = JudgeSettings.from_config(cfg, principles_per_pair=m)
        if labeler is None:
            from cai.labelers import build_labeler

            labeler = build_labeler(cfg, role="choices")
        self.labeler = labeler
        self.direct = DirectLabelerReward(labeler, self.constitution, self.templates, cfg)
        self._reference_sampler = reference_sampler

    @property
    def usage(self) -> dict:
        return self.labeler.usage.as_dict()

    def close(self) -> None:
        self.labeler.close()
        if self._reference_sampler is not None:
            self._reference_sampler.close()

    def score(self, items: list[ScoreItem], mode: str | None = None) -> list[ScoreResult]:
        """Scores in input order. Never raises for the labeler's faults: a failed or unreadable item, a
        budget reached or a refused key is an error on each item concerned."""
        mode = mode or self.mode
        if mode not in MODES:
            raise CaiError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not items:
            return []
        try:
            return {"pointwise": self._pointwise, "pairwise": self._pairwise, "group": self._group}[mode](items)
        except (BudgetExceeded, CaiError) as err:
            why = f"{'budget reached' if isinstance(err, BudgetExceeded) else 'labeler error'}: {err}"
            log.error(why)
            return [ScoreResult(None, "failed", why) for _ in items]

    # -- pointwise: d-RLAIF --------------------------------------------------------------------

    def _pointwise(self, items: list[ScoreItem]) -> list[ScoreResult]:
        from cai.rewards import SCORE_OPTIONS, expected_score
        from cai.preferences import user_text

        requests = self.direct.requests([user_text(conversation_of(it.prompt)) for it in items], [it.answer for it in items])
        results = []
        for choice in self.labeler.choose(requests, desc=None):
            probs = choice.probs
            if choice.status != "ok" or not probs or len(probs) != len(SCORE_OPTIONS) or sum(probs) <= 0:
                error = choice.error or f"no usable rating probabilities ({choice.status})"
                results.append(ScoreResult(None, "failed" if choice.status == "failed" else "unparseable", error,
                                           {"raw": choice.raw}))
                continue
            total = sum(probs)
            rating = sum(n * p for n, p in enumerate(probs)) / total
            results.append(ScoreResult(expected_score(probs), details={
                "expected_rating": rating, "rating_probs": [p / total for p in probs], "method": choice.method}))
        return results

    # -- pairwise: against a reference ---------------------------------------------------------

    def _references(self, items: list[ScoreItem]) -> list[str | None]:
        refs = [it.reference for it in items]
        if self.cfg.serve.reference != "sample":
            return refs
        missing = [k for k, r in enumerate(refs) if r is None]
        if missing:
            sampler = self._sampler()
            policy = self.cfg.policy
            asks = [GenerateRequest(conversation_of(items[k].prompt), max_new_tokens=policy.max_new_tokens,
                                    temperature=policy.temperature, top_p=policy.top_p) for k in missing]
            for k, generation in zip(missing, sampler.generate(asks, desc=None)):
                refs[k] = generation.text if generation.status == "ok" else None
        return refs

    def _sampler(self):
        if self._reference_sampler is None:
            from cai.labelers import build_labeler
            from cai.stages import stage_dir

            model = self.cfg.serve.reference_model
            if model is None:
                sft = stage_dir(self.cfg, "sft")
                model = str(sft) if (sft / "config.json").is_file() else self.cfg.policy.model
            sampler_cfg = self.cfg.model_copy(deep=True)
            sampler_cfg.labeler.backend = "local"
            sampler_cfg.labeler.model = model
            sampler_cfg.labeler.system_prompt = self.cfg.policy.system_prompt
            self._reference_sampler = build_labeler(sampler_cfg)
        return self._reference_sampler

    def _pairwise(self, items: list[ScoreItem]) -> list[ScoreResult]:
        from cai.preferences import PairItem, judge_pairs

        refs = self._references(items)
        asked = [k for k, ref in enumerate(refs) if ref is not None and ref.strip()]
        pairs = [PairItem(content_id("pair", conversation_of(items[k].prompt), items[k].answer, refs[k]),
                          conversation_of(items[k].prompt), items[k].answer, refs[k]) for k in asked]
        results = [ScoreResult(None, "failed", "pairwise mode needs a reference answer (serve.reference=caller: "
                               "send one with each item)") for _ in items]
        for k, verdict in zip(asked, judge_pairs(self.labeler, pairs, self.constitution, self.templates,
                                                 settings=self.settings)):
            details = {"reference": refs[k], "principles": verdict.principles}
            if verdict.label is None:
                results[k] = ScoreResult(None, verdict.status, "no principle got a readable verdict in both orders",
                                         details)
            else:
                results[k] = ScoreResult(verdict.label, details=details)
        return results

    # -- group: debiased win rates -------------------------------------------------------------

    def _group(self, items: list[ScoreItem]) -> list[ScoreResult]:
        from cai.preferences import PairItem, judge_pairs

        groups: dict[Any, list[int]] = {}
        for k, item in enumerate(items):
            groups.setdefault(group_key(item), []).append(k)
        pairs, where = [], []  # where[n] = (group members, i, j) of pairs[n]
        for members in groups.values():
            for i in range(len(members)):
                for j in range(i + 1, len(members)):
                    a, b = items[members[i]], items[members[j]]
                    conv = conversation_of(a.prompt)
                    pairs.append(PairItem(content_id("pair", conv, a.answer, b.answer), conv, a.answer, b.answer))
                    where.append((members, i, j))
        verdicts = judge_pairs(self.labeler, pairs, self.constitution, self.templates, settings=self.settings)
        p_first: dict[int, dict[tuple[int, int], float | None]] = {}
        comparisons: dict[int, list[dict]] = {k: [] for k in range(len(items))}
        for (members, i, j), verdict in zip(where, verdicts):
            p_first.setdefault(id(members), {})[(i, j)] = verdict.label
            for me, other, p in ((i, j, verdict.label), (j, i, None if verdict.label is None else 1 - verdict.label)):
                comparisons[members[me]].append({"against": members[other], "p_better": p, "status": verdict.status,
                                                 "principles": verdict.principles})
        results: list[ScoreResult] = [None] * len(items)  # type: ignore[list-item]
        for members in groups.values():
            if len(members) < 2:
                results[members[0]] = ScoreResult(None, "failed", "group mode needs at least two answers per group "
                                                  "(answers to the same prompt, or the same `group`)")
                continue
            rates = group_win_rates(len(members), p_first.get(id(members), {}))
            for member, rate in zip(members, rates):
                details = {"group_size": len(members), "comparisons": comparisons[member]}
                if rate is None:
                    results[member] = ScoreResult(None, "failed", "no comparison of this answer got a readable verdict",
                                                  details)
                else:
                    results[member] = ScoreResult(rate, details={"win_rate": rate, **details})
        return results


# -------------------------------------------------------------------------------------------------
# 2. One worker thread: everything queued becomes one labeler batch


_STOP = object()  # put on the queue to end the worker


@dataclass
class _Job:
    items: list[ScoreItem]
    mode: str
    future: concurrent.futures.Future


class Batcher:
    """Merges the items of concurrent requests into labeler batches of at most `max_batch` items. After
    the first request of a batch, it waits up to `wait` seconds for others: callers that were answered
    together send their next requests together, and a batch that started without them would leave the
    labeler's concurrency idle until it ends."""

    def __init__(self, judge: Judge, max_batch: int, wait: float = 0.0):
        self.judge = judge
        self.max_batch = max_batch
        self.wait = wait
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="cai-serve-judge", daemon=True)
        self._thread.start()
        self._jobs = 0

    def submit(self, items: list[ScoreItem], mode: str) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Job(items, mode, future))
        return future

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=5)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _work(self) -> None:
        carried = None
        while True:
            job = carried if carried is not None else self._queue.get()
            carried = None
            if job is _STOP:
                return
            jobs, size = [job], len(job.items)
            deadline = time.monotonic() + self.wait
            while size < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is _STOP or size + len(nxt.items) > self.max_batch:
                    carried = nxt
                    break
                jobs.append(nxt)
                size += len(nxt.items)
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        for mode in dict.fromkeys(j.mode for j in jobs):
            these = [j for j in jobs if j.mode == mode]
            merged: list[ScoreItem] = []
            for job in these:
                self._jobs += 1
                # groups never reach across requests
                merged += [replace(it, group=(self._jobs, group_key(it))) if mode == "group" else it for it in job.items]
            try:
                results = self.judge.score(merged, mode)
            except Exception as err:  # noqa: BLE001 - a bug must not leave callers waiting
                log.exception("scoring failed")
                results = [ScoreResult(None, "failed", f"{type(err).__name__}: {err}") for _ in merged]
            start = 0
            for job in these:
                job.future.set_result(results[start : start + len(job.items)])
                start += len(job.items)


# -------------------------------------------------------------------------------------------------
# 3. The HTTP service


LOOPBACK = {"localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def service_token(cfg) -> str | None:
    """The bearer token from `$serve.token_env`; an error when the service would be reachable from other
    machines without one."""
    token = os.environ.get(cfg.serve.token_env, "").strip() or None
    if token is None and not is_loopback(cfg.serve.host):
        raise CaiError(f"serve.host={cfg.serve.host} is reachable from other machines: put a bearer token in "
                       f"${cfg.serve.token_env} (serve.token_env), or bind 127.0.0.1")
    return token


class Metrics:
    """Counters for /metrics (Prometheus text format)."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.items: dict[str, int] = {}
        self.latency_sum = 0.0
        self.latency_count = 0
        self.started = time.time()

    def count_request(self, path: str, status: int, seconds: float) -> None:
        self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
        self.latency_sum += seconds
        self.latency_count += 1

    def count_items(self, results: list[ScoreResult]) -> None:
        for r in results:
            self.items[r.status] = self.items.get(r.status, 0) + 1

    def render(self, usage: dict, pending: int) -> str:
        lines = ["# TYPE cai_serve_requests_total counter"]
        lines += [f'cai_serve_requests_total{{path="{p}",code="{c}"}} {n}' for (p, c), n in sorted(self.requests.items())]
        lines.append("# TYPE cai_serve_items_total counter")
        lines += [f'cai_serve_items_total{{status="{s}"}} {n}' for s, n in sorted(self.items.items())]
        lines += ["# TYPE cai_serve_request_seconds summary",
                  f"cai_serve_request_seconds_sum {self.latency_sum:.6f}",
                  f"cai_serve_request_seconds_count {self.latency_count}",
                  "# TYPE cai_serve_queued_requests gauge", f"cai_serve_queued_requests {pending}",
                  f"cai_serve_uptime_seconds {time.time() - self.started:.1f}"]
        names = {"requests": "requests_total", "cache_hits": "cache_hits_total", "cost": "cost_usd_total",
                 "input_tokens": "input_tokens_total", "output_tokens": "output_tokens_total",
                 "failed": "failed_total", "unparseable": "unparseable_total", "retries": "retries_total"}
        for key, name in names.items():
            if isinstance(usage.get(key), (int, float)):
                lines.append(f"cai_labeler_{name} {usage[key]}")
        return "\n".join(lines) + "\n"


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _items_from_cai(body: Any, max_items: int, modes: tuple[str, ...] = MODES) -> tuple[list[ScoreItem], str | None]:
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        raise RequestError(400, 'the body must be {"items": [{"prompt": ..., "answer": ...}, ...]}')
    mode = body.get("mode")
    if mode is not None and mode not in modes:
        raise RequestError(400, f"mode must be one of {', '.join(modes)}, got {mode!r}")
    raw = body["items"]
    if len(raw) > max_items:
        raise RequestError(413, f"{len(raw)} items in one request; serve.max_items is {max_items}")
    items = []
    for n, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise RequestError(400, f"items[{n}] must be an object")
        prompt, answer = entry.get("prompt"), entry.get("answer")
        if not isinstance(answer, str):
            raise RequestError(400, f"items[{n}].answer must be a string")
        if isinstance(prompt, list):
            if not prompt or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                     and isinstance(m.get("content"), str) for m in prompt):
                raise RequestError(400, f"items[{n}].prompt must be a string or a list of "
                                        '{"role": ..., "content": ...} messages')
            prompt = tuple({"role": m["role"], "content": m["content"]} for m in prompt)
        elif not isinstance(prompt, str):
            raise RequestError(400, f"items[{n}].prompt must be a string or a list of messages")
        reference = entry.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise RequestError(400, f"items[{n}].reference must be a string")
        group = entry.get("group")
        if group is not None and not isinstance(group, (str, int)):
            raise RequestError(400, f"items[{n}].group must be a string or an integer")
        items.append(ScoreItem(prompt, answer, reference, group))
    return items, mode


def _items_from_openrlhf(body: Any, max_items: int) -> list[ScoreItem]:
    """OpenRLHF sends `query` (prompt + answer, its chat template applied), `prompts` (the prompt part)
    and `labels` (the dataset's `--label_key` column: here, the reference answer in pairwise mode)."""
    if not isinstance(body, dict) or not isinstance(body.get("query"), list):
        raise RequestError(400, 'the body must be {"query": [...], "prompts": [...], "labels": [...]}')
    queries = body["query"]
    prompts = body.get("prompts") or [""] * len(queries)
    labels = body.get("labels") or [None] * len(queries)
    if len(queries) > max_items:
        raise RequestError(413, f"{len(queries)} items in one request; serve.max_items is {max_items}")
    if len(prompts) != len(queries) or len(labels) != len(queries):
        raise RequestError(400, f"query, prompts and labels must have one entry each per item "
                                f"(got {len(queries)}, {len(prompts)}, {len(labels)})")
    items = []
    for n, (query, prompt, label) in enumerate(zip(queries, prompts, labels)):
        if not isinstance(query, str) or not isinstance(prompt, str):
            raise RequestError(400, f"query[{n}] and prompts[{n}] must be strings")
        answer = query[len(prompt):] if query.startswith(prompt) else query
        items.append(ScoreItem(prompt, answer, label if isinstance(label, str) and label else None))
    return items


def create_app(cfg, judge: Judge):
    """The FastAPI app around `judge`; `app.state.batcher` does the work."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    serve = cfg.serve
    token = service_token(cfg)
    batcher = Batcher(judge, serve.max_batch, serve.batch_wait)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="cai judge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    metrics = Metrics()
    app.state.batcher, app.state.metrics, app.state.judge = batcher, metrics, judge
    failed_reward = serve.failed_reward

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        if token is not None and request.url.path != "/health":
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                response = JSONResponse({"error": f"missing or wrong bearer token (send Authorization: Bearer "
                                                  f"<the value of ${serve.token_env}>)"}, status_code=401)
                metrics.count_request(request.url.path, 401, time.perf_counter() - started)
                return response
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > serve.max_request_bytes:
            response = JSONResponse({"error": f"request body of {length} bytes; serve.max_request_bytes is "
                                              f"{serve.max_request_bytes}"}, status_code=413)
        else:
            response = await call_next(request)
        metrics.count_request(request.url.path, response.status_code, time.perf_counter() - started)
        return response

    async def read_json(request: Request) -> Any:
        body = b""
        async for chunk in request.stream():  # a chunked body has no Content-Length to check up front
            body += chunk
            if len(body) > serve.max_request_bytes:
                raise RequestError(413, f"request body over serve.max_request_bytes ({serve.max_request_bytes})")
        try:
            return json.loads(body)
        except ValueError as err:
            raise RequestError(400, f"the body is not valid JSON: {err}") from None

    async def scored(items: list[ScoreItem], mode: str) -> list[ScoreResult]:
        future = batcher.submit(items, mode)
        try:
            results = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), serve.request_timeout)
        except asyncio.TimeoutError:
            why = (f"not scored within serve.request_timeout={serve.request_timeout:g} s; the labeling goes on "
                   "and a retry of the same items is answered from the cache")
            results = [ScoreResult(None, "timeout", why) for _ in items]
        metrics.count_items(results)
        return results

    def error_response(err: RequestError):
        return JSONResponse({"error": str(err)}, status_code=err.status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "mode": serve.mode, "labeler": judge.labeler.id, "queued": batcher.pending}

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(judge.usage, batcher.pending))

    @app.post("/v1/score")
    async def score(request: Request):
        try:
            items, mode = _items_from_cai(await read_json(request), serve.max_items)
        except RequestError as err:
            return error_response(err)
        mode = mode or serve.mode
        results = await scored(items, mode)
        return {"mode": mode, "labeler": judge.labeler.id, "results": [r.as_dict() for r in results]}

    @app.post("/get_reward")
    async def get_reward(request: Request):
        try:
            items = _items_from_openrlhf(await read_json(request), serve.max_items)
        except RequestError as err:
            return error_response(err)
        results = await scored(items, serve.mode)
        fallback = NEUTRAL_REWARD[serve.mode] if failed_reward is None else failed_reward
        rewards = [r.reward if r.reward is not None else fallback for r in results]
        return {"rewards": rewards, "scores": rewards,
                "extra_logs": {"judge_ok": [1.0 if r.reward is not None else 0.0 for r in results]},
                "errors": [r.error for r in results]}

    return app


def serve(cfg) -> None:
    """`cai serve CONFIG`: build the judge, then serve until interrupted."""
    import uvicorn

    service_token(cfg)  # refuse an open non-loopback bind before any model loads
    judge = Judge(cfg)
    app = create_app(cfg, judge)
    config = uvicorn.Config(app, host=cfg.serve.host, port=cfg.serve.port, log_level="info", access_log=True)
    server = uvicorn.Server(config)

    original_startup = server.startup

    async def startup(sockets=None):
        await original_startup(sockets=sockets)
        for s in server.servers:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                print(f"cai serve: {serve_summary(cfg, judge)} on http://{host}:{port}", flush=True)

    server.startup = startup
    try:
        server.run()
    finally:
        usage = judge.usage
        judge.close()
        print(f"cai serve: stopped; labeler usage {json.dumps(usage)}", flush=True)


def serve_summary(cfg, judge: Judge) -> str:
    m = judge.settings.principles_per_pair
    what = {"pointwise": "pointwise 0-9 ratings",
            "pairwise": f"pairwise vs reference ({cfg.serve.reference}), {m} principles x 2 orders",
            "group": f"group win rates, {m} principles x 2 orders per pair"}[cfg.serve.mode]
    auth = f"bearer token from ${cfg.serve.token_env}" if os.environ.get(cfg.serve.token_env) else "no token"
    return f"{what}, labeler {judge.labeler.id}, constitution {Path(cfg.constitution).name}, {auth}"
