"""`cai serve CONFIG`: the run's constitutional judge as an HTTP reward service (docs/serve.md).

RL engines that train past one machine (OpenRLHF, verl, TRL's GRPO with vLLM) take "a remote reward
URL or a Python function". This module gives them cai's judge: the run's constitution and labeler,
through the same machinery the stages use (principles drawn per item and seeded, both orders, soft
labels, chain of thought by config, the answer cache, budgets, usage accounting).

1. The judge (cai/serve_judge.py): scoring modes pointwise (d-RLAIF ratings), pairwise (P(better than a
   reference)) and group (debiased win rates within a GRPO group), `serve.mode` or per request; a reward
   per principle besides the aggregate; the prompt's kind from the caller or the run's files.
2. Batching: HTTP handlers put their items on one queue; a single worker thread takes everything
   queued (up to `serve.max_batch` items) and hands it to the labeler as one batch, so an API labeler
   keeps `labeler.concurrency` requests in flight across concurrent callers, and the labeler is only
   ever used from one thread. In group mode with `serve.group_size`, the answers to one prompt are first
   gathered across requests (OpenRLHF 0.11 and verl 0.9 send one answer per request) until the group is
   whole or `serve.group_wait` has passed (then it is scored as it is, with status `short`). A batch
   that raises is split until the item at fault fails alone.
3. Protocols: OpenRLHF's `POST /get_reward` (its chat markup read back out of the text,
   cai/chat_markup.py), cai's `POST /v1/score` (per-principle details), and `GET /health`,
   `GET /metrics` (Prometheus text). Adapters for TRL and verl: cai/integrations.py.
4. Serving: 127.0.0.1 unless `serve.host` says otherwise; a caller needs the bearer token from
   `$serve.token_env` or an address in `serve.trusted_networks` whenever either is set, and binding any
   other address without one of them is refused; the path is read from the ASGI scope (never from the
   Host header); request and item caps; a request that waits longer than `serve.request_timeout` is
   answered with a timeout error per item (the labeling goes on into the cache, so a retry is answered
   from it).

Kills: the answer cache stores each labeler answer the moment it arrives, so a service killed mid-batch
and restarted asks the labeler for nothing it had already received.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (Request) at runtime.
import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, replace
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

from cai.errors import CaiError
from cai.serve_judge import (  # noqa: F401 - the judge's names, as callers import them from here
    KINDS,
    MODES,
    NEUTRAL_REWARD,
    Judge,
    ScoreItem,
    ScoreResult,
    content_id,
    conversation_of,
    group_key,
    group_win_rates,
)

log = logging.getLogger("cai.serve")


# -------------------------------------------------------------------------------------------------
# 2. One worker thread: everything queued becomes one labeler batch


_STOP = object()  # put on the queue to end the worker
SHUTTING_DOWN = "the service is shutting down; send the request again"


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
        """Finish the batch in hand (the labeler is closed only after it), answer what is still queued."""
        self._queue.put(_STOP)
        self._thread.join()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP and not job.future.done():
                job.future.set_result([ScoreResult(None, "failed", SHUTTING_DOWN) for _ in job.items])

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
                # a group is what one job holds: groups never reach across the jobs of a batch
                merged += [replace(it, group=(self._jobs, group_key(it))) if mode == "group" else it for it in job.items]
            try:
                results = self.judge.score(merged, mode)
            except Exception as err:  # noqa: BLE001 - a bug must not leave callers waiting
                log.exception("scoring failed")
                results = [ScoreResult(None, "failed", f"{type(err).__name__}: {err}") for _ in merged]
            start = 0
            for job in these:
                mine = results[start : start + len(job.items)]
                for result in mine:  # `against` counts within the caller's own items
                    for comparison in result.details.get("comparisons", ()):
                        comparison["against"] -= start
                job.future.set_result(mine)
                start += len(job.items)


class GroupGatherer:
    """Group mode with `serve.group_size`: the answers to one prompt (or with one `group`) are gathered
    across requests, in the event loop, until `size` have arrived, and scored together as one job; a
    group still short `wait` seconds after its first answer is scored as it is, with status `short`."""

    def __init__(self, batcher: Batcher, size: int, wait: float):
        self.batcher, self.size, self.wait = batcher, size, wait
        self._open: dict[Any, dict] = {}
        self._requests = 0

    def add(self, items: list[ScoreItem]) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        self._requests += 1
        futures = []
        for index, item in enumerate(items):
            key = group_key(item)
            gathering = self._open.get(key)
            if gathering is None:
                gathering = self._open[key] = {"members": [], "timer": loop.call_later(self.wait, self._close, key)}
            future = loop.create_future()
            gathering["members"].append((item, future, self._requests, index))
            futures.append(future)
            if len(gathering["members"]) >= self.size:
                self._close(key)
        return futures

    def close(self) -> None:
        for key in list(self._open):
            self._close(key)

    def _close(self, key) -> None:
        gathering = self._open.pop(key, None)
        if gathering is None:
            return
        gathering["timer"].cancel()
        members = gathering["members"]
        loop = asyncio.get_running_loop()
        job = self.batcher.submit([m[0] for m in members], "group")
        job.add_done_callback(lambda done: loop.call_soon_threadsafe(self._answer, members, done))

    def _answer(self, members: list, done: concurrent.futures.Future) -> None:
        results = done.result()
        short = len(members) < self.size
        for (item, future, request, _), result in zip(members, results):
            for comparison in result.details.get("comparisons", ()):  # the other answer's index in *this* request
                _, _, other_request, other_index = members[comparison["against"]]
                comparison["against"] = other_index if other_request == request else None
            if short:
                closed = (f"the group closed after serve.group_wait={self.wait:g} s with {len(members)} of "
                          f"serve.group_size={self.size} answers to this prompt")
                if result.reward is not None:
                    result.status, result.error = "short", f"{closed}; the reward is the win rate among those {len(members)}"
                elif len(members) == 1:
                    result.status, result.error = "short", f"{closed}; nothing to compare it with"
                else:
                    result.error = f"{closed}; {result.error}"
            result.details["gathered"] = {"answers": len(members), "group_size": self.size}
            if not future.done():
                future.set_result(result)


# -------------------------------------------------------------------------------------------------
# 3. The HTTP service


LOOPBACK = {"localhost"}
ROUTES = ("/get_reward", "/v1/score", "/health", "/metrics")  # what /metrics counts by path; the rest is "other"


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Access:
    """Who may call: a caller from a trusted network, or one that sends the bearer token; anyone when
    neither is configured (then the service listens on loopback only)."""

    token: str | None
    networks: tuple = ()

    def allows(self, host: str | None, authorization: str) -> bool:
        if self.token is None and not self.networks:
            return True
        if host is not None and self.networks:
            try:
                address = ip_address(host)
            except ValueError:
                address = None
            if address is not None and any(address in network for network in self.networks):
                return True
        return self.token is not None and hmac.compare_digest(authorization.encode(), f"Bearer {self.token}".encode())


def access_rules(cfg) -> Access:
    """The token from `$serve.token_env` and `serve.trusted_networks`; an error when the service would be
    reachable from other machines with neither."""
    token = os.environ.get(cfg.serve.token_env, "").strip() or None
    networks = tuple(ip_network(n, strict=False) for n in cfg.serve.trusted_networks)
    if token is None and not networks and not is_loopback(cfg.serve.host):
        raise CaiError(f"serve.host={cfg.serve.host} is reachable from other machines: put a bearer token in "
                       f"${cfg.serve.token_env} (serve.token_env), list the callers' networks in "
                       "serve.trusted_networks, or bind 127.0.0.1")
    return Access(token, networks)


def service_token(cfg) -> str | None:
    """The bearer token (see access_rules, which refuses an open non-loopback bind)."""
    return access_rules(cfg).token


class Metrics:
    """Counters for /metrics (Prometheus text format). Requests are counted by route: a path that is not
    one of ours counts as "other", so no caller can add series or text to the exposition."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.items: dict[str, int] = {}
        self.latency_sum = 0.0
        self.latency_count = 0
        self.started = time.time()

    def count_request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
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


def _kind_of(value, where: str) -> str | None:
    if value is None:
        return None
    if value not in KINDS:
        raise RequestError(400, f"{where} must be one of {', '.join(KINDS)}, got {value!r}")
    return value


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
        items.append(ScoreItem(prompt, answer, reference, group, _kind_of(entry.get("kind"), f"items[{n}].kind")))
    return items, mode


def _label_fields(label, n: int) -> tuple[str | None, str | None]:
    """(reference, kind) from one of OpenRLHF's `labels` (your dataset's --label_key column): an object
    (or its JSON text) with `reference` and/or `kind`, a kind's name, or the reference answer's text."""
    if isinstance(label, str) and label.lstrip().startswith("{"):
        try:
            label = json.loads(label)
        except ValueError:
            pass
    if isinstance(label, dict):
        reference = label.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise RequestError(400, f"labels[{n}].reference must be a string")
        return reference or None, _kind_of(label.get("kind"), f"labels[{n}].kind")
    if isinstance(label, str) and label in KINDS:
        return None, label
    return (label if isinstance(label, str) and label else None), None


def _items_from_openrlhf(body: Any, max_items: int, markup=None) -> list[ScoreItem]:
    """OpenRLHF sends `query` (prompt + answer as its tokenizer decoded them, special tokens kept),
    `prompts` (the prompt as its chat template wrote it; older clients send none) and `labels`.
    The prompt's markup is read back into a conversation and the answer's end-of-turn and special
    tokens are removed (cai/chat_markup.py); an item whose answer cannot be found fails with the reason."""
    from cai.chat_markup import clean_answer, split_query, untemplate

    if not isinstance(body, dict) or not isinstance(body.get("query"), list):
        raise RequestError(400, 'the body must be {"query": [...], "prompts": [...], "labels": [...]}')
    queries = body["query"]
    prompts = body.get("prompts") or [None] * len(queries)
    labels = body.get("labels") or [None] * len(queries)
    if len(queries) > max_items:
        raise RequestError(413, f"{len(queries)} items in one request; serve.max_items is {max_items}")
    if len(prompts) != len(queries) or len(labels) != len(queries):
        raise RequestError(400, f"query, prompts and labels must have one entry each per item "
                                f"(got {len(queries)}, {len(prompts)}, {len(labels)})")
    items = []
    for n, (query, prompt, label) in enumerate(zip(queries, prompts, labels)):
        if not isinstance(query, str) or not (prompt is None or isinstance(prompt, str)):
            raise RequestError(400, f"query[{n}] and prompts[{n}] must be strings")
        reference, kind = _label_fields(label, n)
        if prompt is not None:
            read = untemplate(prompt, markup)
            answer, how = split_query(query, prompt)
        else:  # an older client: the answer is the query's last turn, the one it leaves open or its last assistant turn
            read = untemplate(query, markup)
            answer, how = None, "no `prompts` were sent and the query has no chat markup to find the answer in"
            if read.markup and read.open_turn is not None:
                answer, how = read.open_turn, "the open turn of the query's markup"
            elif read.markup and len(read.messages) > 1 and read.messages[-1]["role"] == "assistant":
                answer, how = read.messages[-1]["content"], "the last turn of the query's markup"
                read.messages = read.messages[:-1]
        used = read.markup or markup
        notes = {"markup": used.name if used else None, "answer_from": how if answer is not None else None}
        if answer is None:
            items.append(ScoreItem(tuple(read.messages), "", reference, kind=kind, error=how, notes=notes))
        else:
            items.append(ScoreItem(tuple(read.messages), clean_answer(answer, used), reference, kind=kind, notes=notes))
    return items


def policy_markup(cfg):
    """The chat markup of `serve.policy_model`'s tokenizer, or None (the families' markup then)."""
    if cfg.serve.policy_model is None:
        return None
    from cai.chat_markup import Markup
    from cai.models import load_tokenizer

    markup = Markup.from_tokenizer(load_tokenizer(cfg.serve.policy_model, cfg.cache_dir), name=f"{cfg.serve.policy_model}'s template")
    if markup is None:
        log.warning("serve.policy_model=%s: its chat template does not show its turn markers apart; reading the "
                    "common families' markup instead", cfg.serve.policy_model)
    return markup


def create_app(cfg, judge: Judge, markup=None):
    """The FastAPI app around `judge`; `app.state.batcher` does the work. `markup`: the policy's chat
    markup (policy_markup), read first in OpenRLHF's text."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    serve = cfg.serve
    access = access_rules(cfg)
    batcher = Batcher(judge, serve.max_batch, serve.batch_wait)
    gatherer = GroupGatherer(batcher, serve.group_size, serve.group_wait) if serve.group_size else None

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        # shutdown, in order: no group left waiting, the batch in hand finished, then (serve()) the labeler closed
        if gatherer is not None:
            gatherer.close()
        await asyncio.to_thread(batcher.close)

    app = FastAPI(title="cai judge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    metrics = Metrics()
    app.state.batcher, app.state.metrics, app.state.judge, app.state.gatherer = batcher, metrics, judge, gatherer

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        path = request.scope["path"]  # what routing uses; request.url.path is built from the Host header
        if path != "/health":
            client = request.scope.get("client")
            if not access.allows(client[0] if client else None, request.headers.get("authorization", "")):
                response = JSONResponse({"error": f"missing or wrong bearer token (send Authorization: Bearer <the "
                                                  f"value of ${serve.token_env}>), and the caller's address is not in "
                                                  "serve.trusted_networks"}, status_code=401)
                metrics.count_request(path, 401, time.perf_counter() - started)
                return response
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > serve.max_request_bytes:
            response = JSONResponse({"error": f"request body of {length} bytes; serve.max_request_bytes is "
                                              f"{serve.max_request_bytes}"}, status_code=413)
        else:
            response = await call_next(request)
        metrics.count_request(path, response.status_code, time.perf_counter() - started)
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
        if not items:
            return []
        why = (f"not scored within serve.request_timeout={serve.request_timeout:g} s; the labeling goes on "
               "and a retry of the same items is answered from the cache")
        if mode == "group" and gatherer is not None:  # one future per item: its group may close after others
            waiting = gatherer.add(items)
            await asyncio.wait(waiting, timeout=serve.request_timeout)
            results = [w.result() if w.done() else ScoreResult(None, "timeout", why) for w in waiting]
        else:
            try:
                results = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(batcher.submit(items, mode))),
                                                 serve.request_timeout)
            except asyncio.TimeoutError:
                results = [ScoreResult(None, "timeout", why) for _ in items]
        metrics.count_items(results)
        return results

    def error_response(err: RequestError):
        return JSONResponse({"error": str(err)}, status_code=err.status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "mode": serve.mode, "labeler": judge.labeler.id, "queued": batcher.pending,
                "principles": judge.reports_principles(), "group_size": serve.group_size}

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
        return {"mode": mode, "labeler": judge.labeler.id, "principles": judge.reports_principles(mode),
                "failed_reward": judge.failed_reward, "results": [r.as_dict() for r in results]}

    @app.post("/get_reward")
    async def get_reward(request: Request):
        try:
            items = _items_from_openrlhf(await read_json(request), serve.max_items, markup)
        except RequestError as err:
            return error_response(err)
        results = await scored(items, serve.mode)
        fallback = judge.failed_reward
        rewards = [r.reward if r.reward is not None else fallback for r in results]
        extra_logs = {"judge_ok": [1.0 if r.reward is not None else 0.0 for r in results]}
        for pid in judge.reports_principles():  # every key in every answer: OpenRLHF stacks them per sample
            extra_logs[f"principle/{pid}"] = [v if (v := r.principles.get(pid)) is not None else fallback for r in results]
        return {"rewards": rewards, "scores": rewards, "extra_logs": extra_logs, "errors": [r.error for r in results]}

    return app


def serve(cfg) -> None:
    """`cai serve CONFIG`: build the judge, then serve until interrupted."""
    import uvicorn

    access_rules(cfg)  # refuse an open non-loopback bind before any model loads
    judge = Judge(cfg)
    app = create_app(cfg, judge, policy_markup(cfg))
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
    # uvicorn hands SIGTERM back to the process once it has shut down; by default that ends the process
    # there, before the labeler is closed and its usage printed: leave through `finally` instead.
    signal.signal(signal.SIGTERM, _leave)
    try:
        server.run()
    finally:
        usage = judge.usage
        judge.close()  # after the app's shutdown has finished the batch in hand
        print(f"cai serve: stopped; labeler usage {json.dumps(usage)}", flush=True)


def _leave(signum, _frame):
    raise SystemExit(128 + signum)


def serve_summary(cfg, judge: Judge) -> str:
    m = judge.settings.principles_per_pair
    what = {"pointwise": "pointwise 0-9 ratings" + (" per principle" if cfg.serve.per_principle else ""),
            "pairwise": f"pairwise vs reference ({cfg.serve.reference}), {m} principles x 2 orders",
            "group": f"group win rates, {m} principles x 2 orders per pair"}[cfg.serve.mode]
    if cfg.serve.mode == "group" and cfg.serve.group_size:
        what += f", groups of {cfg.serve.group_size} gathered across requests (wait {cfg.serve.group_wait:g} s)"
    access = access_rules(cfg)
    auth = ", ".join(([f"bearer token from ${cfg.serve.token_env}"] if access.token else [])
                     + ([f"trusted networks {', '.join(cfg.serve.trusted_networks)}"] if access.networks else [])) or "no token"
    return f"{what}, labeler {judge.labeler.id}, constitution {Path(cfg.constitution).name}, {auth}"
