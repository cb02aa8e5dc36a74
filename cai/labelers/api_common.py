"""The engine behind the API labelers (OpenAI-compatible and Anthropic): many requests in flight,
rate limits, retries, parse retries, log-probability or vote choices, and budgets.

A backend subclass only says how to send one chat request (`_send`) and how to make its client;
everything else is here:

- concurrency: at most `concurrency` requests in flight (an asyncio semaphore), and token buckets
  for `requests_per_minute` and `tokens_per_minute`;
- faults: 429, 408, 409, 5xx, timeouts, dropped connections and malformed answers are retried with
  exponential backoff and jitter, waiting at least what `Retry-After` asks; after `max_tries` the item
  is recorded as failed (the run goes on). A rejected key (401/403) or unknown model (404) stops the
  batch with a CaiError: every other request would fail the same way;
- parsing: an empty answer, an unreadable choice, or (when asked) a refusal is asked again with a
  stricter instruction up to `max_parse_retries` times, then recorded as unparseable with its raw text;
- choices: from the server's log-probabilities where it returns them, else from `vote_samples`
  sampled answers; each Choice records which method produced it. Models write a preamble before the
  label ("The answer is: (B)"), so the log-probabilities of up to `LOGPROB_MAX_TOKENS` tokens are read
  and the label is taken where `parsing.label_at` finds it in the text — the place the vote reader
  reads too (an explicit statement first, "the answer is (A)", "B is better than A"; otherwise the
  last label standing). Where the server lets the answer be prefilled (a
  backend's `prefill_ways`, tried once per labeler), the answer prefix is put in place and the next
  token is the label, as the local backend asks. A question whose log-probabilities show no label
  after the parse retries is asked by votes (`vote_fallbacks` in the usage);
- budgets: before each request, `max_requests` and `max_cost` (with the worst case of the requests in
  flight) are checked; when one would be exceeded nothing more is sent, the requests in flight finish
  (and reach `on_result`, so the cache keeps them) and BudgetExceeded is raised.

API keys live only in the client; every error text is scrubbed of the key before it is kept.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from tqdm.auto import tqdm

from cai.errors import CaiError
from cai.labelers.base import CHOICE_METHODS, BudgetExceeded, Choice, ChoiceRequest, GenerateRequest, Generation, Usage
from cai.checks import refuses
from cai.labelers.parsing import option_of_token, parse_choice, probs_from_logprobs
from cai.labelers.pool import POOL_CACHE_URL

log = logging.getLogger(__name__)


def aiohttp_transport(sdk):
    """The SDK's aiohttp transport where aiohttp is installed (`pip install openai[aiohttp]`): about
    half the CPU per request of its default httpx transport. None (the default transport) otherwise."""
    factory = getattr(sdk, "DefaultAioHttpClient", None)
    if factory is None:
        return None
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return None
    return factory()


NO_KEY = "no-key"  # sent to servers that need none (the SDKs insist on some key)

TOP_LOGPROBS = 20  # alternatives per position asked for (OpenAI's maximum)
LOGPROB_MAX_TOKENS = 16  # room for a preamble such as "The answer is: (" before the label
PREFILL_LOGPROB_MAX_TOKENS = 2  # after a prefilled prefix: the label, and what follows it ("1" then "0" is 10)
VOTE_MAX_TOKENS = 16  # a vote without prefill may say "The answer is (A)"
PREFILL_VOTE_MAX_TOKENS = 4  # after "The answer is: (" the label comes next

CHOICE_READER = 3  # 2: the label found past a preamble, prefill ways, votes when no label shows; 3: one
#                    definition of where the label is for both readers (parsing.label_at)

RETRYABLE_STATUS = {408, 409, 425, 429}
MAX_RETRY_AFTER = 300.0  # seconds: a server asking for longer (a spent daily quota) gets the item failed sooner
FATAL_STATUS = {401: "rejected the API key", 403: "refused access", 404: "does not know the model or endpoint"}


def choice_instruction(options: tuple[str, ...]) -> str:
    labels = ", ".join(f"({o})" for o in options)
    return f"Answer with only the label of your choice, one of {labels}."


def strict_choice_instruction(options: tuple[str, ...]) -> str:
    labels = " or ".join(f"({o})" for o in options)
    return (f"Your previous reply could not be read. Reply with exactly one of {labels} "
            "and nothing else: no explanation, no other words.")


STRICT_TEXT_INSTRUCTION = (
    "Your previous reply was empty or declined the task. This is a text-evaluation task for AI-safety "
    "research: write the requested text itself, directly, without refusing and without commentary."
)


def with_instruction(messages: list[dict], instruction: str) -> list[dict]:
    """A copy of `messages` with `instruction` appended to the last user message."""
    out = [dict(m) for m in messages]
    for message in reversed(out):
        if message["role"] == "user":
            message["content"] = f"{message['content']}\n\n{instruction}"
            return out
    return out + [{"role": "user", "content": instruction}]


def resolve_api_key(backend: str, env_name: str, base_url: str | list[str] | None, hosted_hosts: set[str],
                    config_key: str = "labeler") -> str:
    """The key from `$env_name`. A missing key is an error for the hosted API; any other server
    (a local vLLM, llama.cpp or Ollama; or a pool of them, `base_url` a list) gets a placeholder, and says
    so itself if it wanted one."""
    key = os.environ.get(env_name, "").strip()
    if key:
        return key
    urls = base_url if isinstance(base_url, (list, tuple)) else [base_url]
    if any(url is None or urlsplit(url).hostname in hosted_hosts for url in urls):
        raise CaiError(f"{config_key}.backend={backend} needs an API key in ${env_name} "
                       f"(or set {config_key}.api_key_env to the variable that holds it)")
    return NO_KEY


def public_url(url: str | None) -> str | None:
    """The URL without any user:password part, for ids and messages."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.username or parts.password:
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    return parts.geturl()


async def _within(seconds: float, coro):
    """Await `coro`, raising asyncio.TimeoutError after `seconds` (without a task per call on 3.11+)."""
    if not hasattr(asyncio, "timeout"):  # Python 3.10
        return await asyncio.wait_for(coro, seconds)
    async with asyncio.timeout(seconds):
        return await coro


class RateLimiter:
    """A token bucket refilled at `per_minute / 60` per second, holding one second's worth.

    A request larger than the bucket waits for a full bucket and then leaves it in debt, so that
    large requests still go through at the configured average rate."""

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def acquire(self, amount: float = 1.0) -> None:
        need = min(amount, self.capacity)
        while True:
            self._refill()
            if self.level >= need:
                self.level -= amount
                return
            await asyncio.sleep((need - self.level) / self.rate)

    def refund(self, amount: float) -> None:
        """Give back (or, negative, charge) the difference between the estimate and the truth."""
        self._refill()
        self.level = min(self.capacity, self.level + amount)


@dataclass
class Reply:
    """One chat answer, whatever the API."""

    text: str
    input_tokens: int
    output_tokens: int
    refusal: bool = False
    # per generated token: (token, [(alternative, logprob), ...]); None when the server gave none
    logprobs: list[tuple[str, list[tuple[str, float]]]] | None = None


class _Stop(Exception):
    """Nothing more is sent in this batch (a budget is reached or the server refuses us)."""


_REJECTED = object()  # a log-probability request answered with a 400
_UNKNOWN = "unknown"  # the prefill way before the first choice has tried them


class _ItemFailed(Exception):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ApiLabeler:
    """The shared engine; subclasses set `backend`, `default_key_env`, `hosted_hosts`,
    `supports_logprobs`, `supports_prefill` (votes are prefilled), `prefill_ways` (how a log-probability
    request can be prefilled, tried in order), and implement `_client()` and `_send()`."""

    backend = "api"
    default_key_env = ""
    hosted_hosts: set[str] = set()
    supports_logprobs = False
    supports_prefill = False
    prefill_ways: tuple[str, ...] = ()

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str | None = None,
        system_prompt: str | None = None,
        concurrency: int = 8,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        timeout: float = 60.0,
        max_tries: int = 6,
        max_parse_retries: int = 2,
        vote_samples: int = 8,
        choice_method: str = "auto",
        max_requests: int | None = None,
        max_cost: float | None = None,
        price: tuple[float, float] | None = None,
        backoff_base: float = 0.5,
        backoff_max: float = 60.0,
        start_interval: float = 0.002,
        cache_dir: str | None = None,
        server_concurrency: list[int] | None = None,
        server_failures: int = 3,
        server_bench_seconds: float = 30.0,
        batch_api: bool = False,
        batch_poll_seconds: float = 60.0,
        batch_discount: float = 0.5,
        batch_folder: str | None = None,
    ):
        # -- server pool hook (pool.py): a list of URLs is a pool; the first stands for them all here --
        self._pool = None
        if isinstance(base_url, (list, tuple)):
            from cai.labelers.pool import ServerPool

            self._pool = ServerPool.from_urls(list(base_url), server_concurrency or concurrency,
                                              server_failures, server_bench_seconds, backoff_base, backoff_max, timeout)
            base_url, concurrency = base_url[0], self._pool.slots
        # -- end of the pool hook --
        # -- batch API hook (batch.py): every request of a call is in flight at once, at the batch price --
        self._batch_api = batch_api
        if batch_api:
            from cai.labelers.batch import MAX_REQUESTS

            if self._pool is not None:
                raise CaiError("labeler.batch_api=true takes one labeler.base_url (the provider's), not a pool")
            concurrency, start_interval = MAX_REQUESTS[self.backend], 0.0
            if price is not None:
                price = (price[0] * batch_discount, price[1] * batch_discount)
            self._batch_poll_seconds = batch_poll_seconds
            self._batch_folder = batch_folder or str(Path("~/.cache/cai/labeler_batches").expanduser())
        # -- end of the batch hook --
        self.model = model
        self.base_url = base_url.rstrip("/") if base_url else None
        self.api_key_env = api_key_env or self.default_key_env
        self._api_key = resolve_api_key(self.backend, self.api_key_env, self.base_url, self.hosted_hosts)
        where = ",".join(public_url(u) for u in self._pool.urls) if self._pool else public_url(self.base_url)
        self.id = f"{self.backend}:{model}" + (f"@{where}" if self.base_url else "")
        self.system_prompt = system_prompt
        self.concurrency = concurrency
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.timeout = timeout
        self.max_tries = max_tries
        self.max_parse_retries = max_parse_retries
        self.vote_samples = vote_samples
        self.choice_method = choice_method
        self.max_requests = max_requests
        self.max_cost = max_cost
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.start_interval = start_interval
        self.cache_dir = cache_dir  # where a backend may find a local copy of the model's tokenizer
        if choice_method == "logprobs" and not self.supports_logprobs:
            raise CaiError(f"labeler.backend={self.backend} returns no log-probabilities; "
                           "set labeler.choice_method=votes (or auto)")
        if price is None:
            if max_cost is not None:
                raise CaiError(f"labeler.max_cost is set but labeler.prices has no entry for {model!r}, "
                               "so the cost cannot be counted")
            log.warning("labeler.prices has no entry for %r: its cost is counted as 0", model)
        self.price = price or (0.0, 0.0)
        self.usage = Usage()
        self._logprobs_ok = self.supports_logprobs and choice_method != "votes"
        self._prefill_ok = self.supports_prefill
        self._logprobs_known = False  # whether an answer has shown if the server returns log-probabilities
        self._prefill_way = _UNKNOWN if self.prefill_ways else None  # a way from prefill_ways that works, or None
        if batch_api:  # no probe: it would cost a whole batch round; the hosted API returns them
            self._logprobs_known, self._prefill_way = True, None
        self._probing: asyncio.Event | None = None
        self._rpm = RateLimiter(requests_per_minute) if requests_per_minute else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http = None  # the SDK client, bound to self._loop
        self._tpm = RateLimiter(tokens_per_minute) if tokens_per_minute else None

    @classmethod
    def from_config(cls, cfg, **engine_overrides) -> "ApiLabeler":
        """From the whole cai Config (its `labeler` section)."""
        lab = cfg.labeler
        kwargs: dict[str, Any] = dict(
            base_url=lab.base_url, api_key_env=lab.api_key_env, system_prompt=lab.system_prompt,
            concurrency=lab.concurrency, requests_per_minute=lab.requests_per_minute,
            tokens_per_minute=lab.tokens_per_minute, timeout=lab.timeout, max_tries=lab.max_tries,
            max_parse_retries=lab.max_parse_retries, vote_samples=lab.vote_samples,
            choice_method=lab.choice_method, max_requests=lab.max_requests, max_cost=lab.max_cost,
            price=tuple(lab.prices[lab.model]) if lab.model in lab.prices else None,
            cache_dir=str(cfg.cache_dir),
            server_concurrency=lab.server_concurrency, server_failures=lab.server_failures,
            server_bench_seconds=lab.server_bench_seconds,
            batch_api=lab.batch_api, batch_poll_seconds=lab.batch_poll_seconds, batch_discount=lab.batch_discount,
        )
        if lab.batch_api:  # batch ids go to the stage folder (cai.stages.open_stage names it)
            from cai.labelers.batch import stage_folder

            kwargs["batch_folder"] = str(stage_folder.get() or Path(cfg.cache_dir).expanduser() / "labeler_batches")
        kwargs.update(engine_overrides)
        return cls(lab.model, **kwargs)

    # -- to implement --------------------------------------------------------------------------

    def _client(self):
        """A new async SDK client with max_retries=0 (made inside the labeler's event loop)."""
        raise NotImplementedError

    async def _send(self, client, messages: list[dict], *, max_tokens: int, temperature: float, top_p: float,
                    top_logprobs: int | None = None, prefill: str | None = None, prefill_way: str | None = None) -> Reply:
        """One request. `prefill` starts the assistant's answer; `prefill_way` (one of `prefill_ways`)
        says how, for a log-probability request."""
        raise NotImplementedError

    # -- the protocol --------------------------------------------------------------------------

    def cache_params(self, kind: str) -> dict:
        """What, besides the request, determines an answer (the cache key; never the API key)."""
        params = {"backend": self.backend, "model": self.model, "system_prompt": self.system_prompt,
                  "base_url": POOL_CACHE_URL if self._pool else self.base_url}  # which pool server answered: not in the key
        if kind == "choose":
            # `reader`: how choices are read (prefill, where the label is found); a change makes the
            # choices of earlier versions, unreadable ones among them, misses instead of answers
            params.update(choice_method=self.choice_method, vote_samples=self.vote_samples, reader=CHOICE_READER)
        return params

    def generate(
        self,
        requests: list[GenerateRequest],
        desc: str | None = None,
        on_result: Callable[[int, Generation], None] | None = None,
        reject_refusals: bool = False,
    ) -> list[Generation]:
        """Text for each request. `reject_refusals=True` (for critiques) treats an answer that opens
        with a refusal like an empty one: asked again more strictly, then recorded as unparseable."""
        return self._run(self._batch(
            lambda client, request: self._generate_one(client, request, reject_refusals), requests, desc, on_result))

    def choose(
        self,
        requests: list[ChoiceRequest],
        desc: str | None = None,
        on_result: Callable[[int, Choice], None] | None = None,
    ) -> list[Choice]:
        return self._run(self._batch(self._choose_one, requests, desc, on_result))

    def close(self) -> None:
        """Close the client and the private event loop (a later call opens new ones)."""
        if self._loop is None:
            return
        if self._http is not None:
            self._run(self._http.close())
            self._http = None
            if self._pool:
                self._pool.unbind()
        self._loop.close()
        self._loop = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit, anything may already be gone
            pass

    def _run(self, coro):
        """Run `coro` on this labeler's own event loop, kept between calls so that its client (and
        open connections) are reused; from a thread of its own where a loop is already running (a
        notebook). Whatever the coroutine left running (after an error or Ctrl-C) is cancelled."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        loop = self._loop

        def run():
            try:
                return loop.run_until_complete(coro)
            finally:
                leftovers = [task for task in asyncio.all_tasks(loop) if not task.done()]
                for task in leftovers:
                    task.cancel()
                if leftovers:
                    loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return run()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(run).result()

    # -- batches -------------------------------------------------------------------------------

    async def _batch(self, one, requests: list, desc: str | None, on_result) -> list:
        if not requests:
            return []
        self._stop_reason: str | None = None
        self._fatal: CaiError | None = None
        self._sem = asyncio.Semaphore(self.concurrency)
        self._reserved_cost = 0.0  # worst-case cost of the requests in flight
        self._probing = None
        results: list = [None] * len(requests)
        queue = list(range(len(requests)))[::-1]
        bar = tqdm(total=len(requests), desc=desc, disable=None, leave=False)

        async def worker(k: int) -> None:
            # The first wave is spread out a little: requests launched together come back together and
            # then queue behind each other in this one thread, wave after wave.
            await asyncio.sleep(min(k, self.concurrency) * self.start_interval)
            while queue and self._stop_reason is None and self._fatal is None:
                i = queue.pop()
                try:
                    result = await one(client, requests[i])
                except _Stop:
                    return
                results[i] = result
                if result.status == "failed":
                    self.usage.failed += 1
                elif result.status == "unparseable":
                    self.usage.unparseable += 1
                if on_result is not None:
                    on_result(i, result)
                bar.update(1)

        if self._http is None:  # made once (it costs tens of ms) and kept with the loop
            self._http = self._client()
            if self._pool:  # pool hook: one client per server, sharing the connection pool
                self._pool.bind(lambda url: self._http.with_options(base_url=url))
            if self._batch_api:  # batch hook: requests are queued into batches instead of sent
                from cai.labelers.batch import BatchTransport

                self._http = BatchTransport(self._http, self.backend, Path(self._batch_folder),
                                            self._batch_poll_seconds, self.usage)
        client = self._http
        try:
            # Twice as many workers as slots, so that items sleeping in backoff leave none idle.
            workers = min(len(requests), 2 * self.concurrency)
            await asyncio.gather(*(worker(k) for k in range(workers)))
        finally:
            bar.close()
        if self._fatal is not None:
            raise self._fatal
        if self._stop_reason is not None:
            err = BudgetExceeded(self._stop_reason)
            err.results = results
            raise err
        return results

    # -- one request, with retries -------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        if self._api_key and self._api_key != NO_KEY:
            text = text.replace(self._api_key, "***")
        return text

    def _estimate_tokens(self, messages: list[dict], max_tokens: int) -> tuple[int, int]:
        chars = sum(len(m["content"]) for m in messages)
        return math.ceil(chars / 4) + 8, max_tokens

    def _cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.price[0] + output_tokens * self.price[1]) / 1e6

    def _admit(self, estimated_cost: float) -> None:
        """Count one more request, or stop the batch if it would break a budget."""
        if self._stop_reason is not None or self._fatal is not None:
            raise _Stop
        used = self.usage.requests
        if self.max_requests is not None and used >= self.max_requests:
            self._stop_reason = (f"labeler.max_requests={self.max_requests} reached after {used} requests; "
                                 "raise it and rerun to continue")
            raise _Stop
        if self.max_cost is not None and self.usage.cost + self._reserved_cost + estimated_cost > self.max_cost:
            self._stop_reason = (f"labeler.max_cost={self.max_cost:g} USD reached: about "
                                 f"{self.usage.cost:.4f} USD spent in {used} requests, and the next one could "
                                 "cost more than is left; raise it and rerun to continue")
            raise _Stop
        self.usage.requests += 1
        self._reserved_cost += estimated_cost

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        delay = delay / 2 + random.uniform(0, delay / 2)  # jitter keeps retries from arriving together
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
        return delay

    @staticmethod
    def _retry_after(exc: BaseException) -> float | None:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
        if not headers:
            return None
        value = headers.get("retry-after-ms")
        if value:
            try:
                return float(value) / 1000
            except ValueError:
                pass
        value = headers.get("retry-after")
        if not value:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                return max(0.0, when.timestamp() - time.time())
            except (TypeError, ValueError):
                return None

    async def _call(self, client, messages: list[dict], *, max_tokens: int, temperature: float, top_p: float,
                    top_logprobs: int | None = None, prefill: str | None = None, prefill_way: str | None = None,
                    probe: bool = False) -> Reply:
        """One logical request: retried on transient faults; raises _ItemFailed when it gives up.
        A `probe` (trying whether the server supports something) fails on 404 instead of stopping."""
        input_est, output_est = self._estimate_tokens(messages, max_tokens)
        cost_est = self._cost(input_est, output_est)
        last_error = ""
        for attempt in range(1, self.max_tries + 1):
            async with self._sem:
                if self._rpm:
                    await self._rpm.acquire()
                if self._tpm:
                    await self._tpm.acquire(input_est + output_est)
                self._admit(cost_est)
                server = await self._pool_acquire()  # pool hook: None without a pool
                try:
                    reply = await _within(None if self._batch_api else self.timeout, self._send(
                        server.client if server else client, messages, max_tokens=max_tokens,
                        temperature=temperature, top_p=top_p, top_logprobs=top_logprobs, prefill=prefill,
                        prefill_way=prefill_way))
                    error = None
                except asyncio.TimeoutError:
                    error, status, retry_after = f"timed out after {self.timeout:g} s", None, None
                except asyncio.CancelledError:
                    if server is not None:  # pool hook: a cancelled request gives its server's slot back
                        self._pool.cancel(server)
                    raise
                except Exception as exc:  # noqa: BLE001 - every fault is classified below
                    status = getattr(exc, "status_code", None)
                    error = self._scrub(f"{type(exc).__name__}: {exc}")[:500]
                    retry_after = self._retry_after(exc)
                finally:
                    self._reserved_cost -= cost_est
            failover = server is not None and self._pool_release(server, error, status if error else None)
            if error is None:
                self.usage.input_tokens += reply.input_tokens
                self.usage.output_tokens += reply.output_tokens
                self.usage.cost += self._cost(reply.input_tokens, reply.output_tokens)
                if self._tpm:
                    self._tpm.refund(input_est + output_est - reply.input_tokens - reply.output_tokens)
                return reply
            last_error = error
            if status in FATAL_STATUS and not (probe and status == 404):
                where = public_url(self.base_url) or f"the {self.backend} API"
                hint = f" (key from ${self.api_key_env})" if status in (401, 403) else f" (labeler.model={self.model})"
                self._fatal = CaiError(f"labeler: {where} {FATAL_STATUS[status]}: HTTP {status}{hint}")
                raise _Stop
            if status is not None and status < 500 and status not in RETRYABLE_STATUS:
                raise _ItemFailed(error, status)  # a bad request stays bad
            if attempt < self.max_tries:
                self.usage.retries += 1
                if not failover:  # a pool server's fault is retried on another server at once
                    await asyncio.sleep(self._backoff(attempt, retry_after))
        raise _ItemFailed(f"gave up after {self.max_tries} tries: {last_error}")

    # -- server pool hooks (pool.py) -----------------------------------------------------------

    async def _pool_acquire(self):
        if self._pool is None:
            return None
        try:
            return await self._pool.acquire()
        except CaiError as err:
            self._fatal = CaiError(self._scrub(str(err)))
            raise _Stop from None

    def _pool_release(self, server, error: str | None, status: int | None) -> bool:
        failover = self._pool.release(server, error, status)
        if error is None:
            self.usage.extra["server_requests"] = self._pool.answered()
        return failover

    def _count_parse_retry(self) -> None:
        self.usage.extra["parse_retries"] = self.usage.extra.get("parse_retries", 0) + 1

    def _render(self, messages: list[dict]) -> list[dict]:
        messages = [dict(m) for m in messages]
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    # -- generate ------------------------------------------------------------------------------

    async def _generate_one(self, client, request: GenerateRequest, reject_refusals: bool) -> Generation:
        base = self._render(request.messages)
        messages = base
        spent = [0, 0]
        text = ""
        for parse_try in range(self.max_parse_retries + 1):
            if parse_try:
                self._count_parse_retry()
                messages = with_instruction(base, STRICT_TEXT_INSTRUCTION)
            try:
                reply = await self._call(client, messages, max_tokens=request.max_new_tokens,
                                         temperature=request.temperature, top_p=request.top_p)
            except _ItemFailed as err:
                return Generation(None, status="failed", error=str(err), input_tokens=spent[0], output_tokens=spent[1])
            spent[0] += reply.input_tokens
            spent[1] += reply.output_tokens
            text = reply.text
            refused = reject_refusals and (reply.refusal or refuses(text))
            if text.strip() and not refused:
                return Generation(text, input_tokens=spent[0], output_tokens=spent[1])
        why = "empty answer" if not text.strip() else "the labeler refused the task"
        return Generation(text, status="unparseable", error=why, input_tokens=spent[0], output_tokens=spent[1])

    # -- choose --------------------------------------------------------------------------------

    def _must_probe(self) -> bool:
        return self._logprobs_ok and (not self._logprobs_known or self._prefill_way == _UNKNOWN)

    async def _choose_one(self, client, request: ChoiceRequest) -> Choice:
        # Until one answer shows whether the server has log-probabilities (and which way, if any, it
        # lets the answer be prefilled), one request asks and the others wait, so that a server without
        # them is not sent a useless request per item.
        while self._must_probe() and self._probing is not None:
            await self._probing.wait()
        choice = None
        if self._logprobs_ok:
            probe = self._must_probe()
            if probe:
                self._probing = asyncio.Event()
            try:
                choice = await self._choose_by_logprobs(client, request)
                if choice is _REJECTED:  # a 400: for the log-probabilities, or for this request?
                    choice = await self._choose_by_votes(client, request)
                    if choice.status != "failed":
                        self._no_logprobs("the server rejects log-probability requests")
                    return self._counted(choice)
            finally:
                if probe:
                    self._probing.set()
                    self._probing = None
            if choice is not None and (choice.status != "unparseable" or self.choice_method == "logprobs"):
                return self._counted(choice)
        votes = await self._choose_by_votes(client, request)
        if choice is not None:  # the log-probabilities showed no label: votes instead, counted
            self.usage.extra["vote_fallbacks"] = self.usage.extra.get("vote_fallbacks", 0) + 1
            if votes.status != "ok":
                votes.raw = "\n---\n".join(r for r in (choice.raw, votes.raw) if r) or None
                votes.error = f"{choice.error}; then {votes.error}"
        return self._counted(votes)

    def _counted(self, choice: Choice) -> Choice:
        """Count how the choice was read (`choices_by` in the usage) and say how the labeler asks."""
        if choice.status == "ok":
            by = self.usage.extra.setdefault("choices_by", {})
            by[choice.method] = by.get(choice.method, 0) + 1
        self.usage.extra["choice_asked"] = self.asked()
        return choice

    def asked(self) -> str:
        """How this labeler asks its choices, in words (for labeler_usage.json and the audit)."""
        if not self._logprobs_ok:
            return CHOICE_METHODS["votes"] + (" after the prefilled answer prefix" if self._prefill_ok else "")
        if self._prefill_way in (None, _UNKNOWN):
            return CHOICE_METHODS["logprobs"]
        return f"{CHOICE_METHODS['logprobs+prefill']} ({self._prefill_way})"

    async def _can_prefill(self, client, way: str) -> bool:
        """Whether `way` can be tried at all (a backend may need something first, such as a template)."""
        return True

    async def _find_prefill_way(self, client, base: list[dict], request: ChoiceRequest):
        """Once per labeler: try each of `prefill_ways` on this request, keep the first the server honours,
        and return its Choice. A way is honoured when the first token of the answer is an option label:
        a server that ignores the prefill starts a new answer ("The answer is...") instead. A refusal
        (4xx) or a dishonoured prefill moves on to the next way; None when none works."""
        for way in self.prefill_ways:
            if not await self._can_prefill(client, way):
                continue
            try:
                reply = await self._call(client, base, max_tokens=PREFILL_LOGPROB_MAX_TOKENS, temperature=0.0,
                                         top_p=1.0, top_logprobs=TOP_LOGPROBS, prefill=request.answer_prefix,
                                         prefill_way=way, probe=True)
            except _ItemFailed as err:
                log.info("labeler %s: prefilling by %s refused (%s)", self.id, way, err)
                continue
            if reply.logprobs is None and self.choice_method == "auto":  # none at all: votes, no more probes
                self._prefill_way, self._logprobs_known = None, True
                self._no_logprobs("the server returns no log-probabilities")
                return None
            if not reply.logprobs or option_of_token(reply.logprobs[0][0], request.options) is None:
                log.info("labeler %s: the server ignores a prefill by %s (answer %r)", self.id, way, reply.text[:40])
                continue
            probs = probs_from_logprobs(reply.logprobs, request.options, context=request.answer_prefix)
            if probs is None:
                continue
            self._prefill_way = way
            self._logprobs_known = True
            log.warning("labeler %s: choices from log-probabilities after the prefilled answer (%s)", self.id, way)
            return Choice(probs, method="logprobs+prefill", raw=request.answer_prefix + reply.text)
        self._prefill_way = None
        log.warning("labeler %s: the server lets no answer be prefilled; the label is read from the model's "
                    "own answer (up to %d tokens)", self.id, LOGPROB_MAX_TOKENS)
        return None

    async def _choose_by_logprobs(self, client, request: ChoiceRequest):
        """A Choice; None when the server turns out to return no log-probabilities (votes are used
        from then on); _REJECTED when it answered the request with a 400."""
        base = self._render(request.messages)
        if self._prefill_way == _UNKNOWN and request.answer_prefix:
            found = await self._find_prefill_way(client, base, request)
            if found is not None or not self._logprobs_ok:
                return found
        prefix = request.answer_prefix if self._prefill_way not in (None, _UNKNOWN) else ""
        way = self._prefill_way if prefix else None
        method = "logprobs+prefill" if prefix else "logprobs"
        raw = ""
        for parse_try in range(self.max_parse_retries + 1):
            if parse_try:
                self._count_parse_retry()
                messages = with_instruction(base, strict_choice_instruction(request.options))
            else:  # prefilled, the question is the local backend's; otherwise the label is asked for
                messages = base if prefix else with_instruction(base, choice_instruction(request.options))
            try:
                reply = await self._call(client, messages,
                                         max_tokens=PREFILL_LOGPROB_MAX_TOKENS if prefix else LOGPROB_MAX_TOKENS,
                                         temperature=0.0, top_p=1.0, top_logprobs=TOP_LOGPROBS,
                                         prefill=prefix or None, prefill_way=way)
            except _ItemFailed as err:
                if err.status == 400 and self.choice_method == "auto" and not prefix:
                    return _REJECTED
                return Choice(None, method=method, status="failed", error=str(err))
            self._logprobs_known = True
            if reply.logprobs is None:
                if self.choice_method == "logprobs":
                    return Choice(None, method=method, status="failed",
                                  error="the server returned no log-probabilities; set labeler.choice_method=votes")
                self._no_logprobs("the server returns no log-probabilities")
                return None
            raw = prefix + reply.text
            probs = probs_from_logprobs(reply.logprobs, request.options, context=prefix)
            if probs is not None:
                return Choice(probs, method=method, raw=raw)
        where = "after the prefilled prefix" if prefix else f"in the answer's first {LOGPROB_MAX_TOKENS} tokens"
        return Choice(None, method=method, status="unparseable", raw=raw, error=f"no option label {where}")

    def _no_logprobs(self, why: str) -> None:
        if self._logprobs_ok:
            log.warning("labeler %s: %s; choosing by %d votes instead", self.id, why, self.vote_samples)
            self._logprobs_ok = False

    async def _vote(self, client, base: list[dict], request: ChoiceRequest) -> tuple[int | None, str | None, str | None]:
        """(option index or None, raw text, error if the request failed for good)."""
        parse_try, text, without_prefill = 0, None, False
        while True:
            instruction = (strict_choice_instruction if parse_try else choice_instruction)(request.options)
            use_prefill = self._prefill_ok and not without_prefill and request.answer_prefix
            prefill = request.answer_prefix.rstrip() if use_prefill else None
            try:
                reply = await self._call(client, with_instruction(base, instruction),
                                         max_tokens=PREFILL_VOTE_MAX_TOKENS if prefill else VOTE_MAX_TOKENS,
                                         temperature=1.0, top_p=1.0, prefill=prefill)
            except _ItemFailed as err:
                if prefill and err.status == 400:  # some models refuse a prefilled answer: try without
                    without_prefill = True
                    continue
                return None, text, str(err)
            if without_prefill and self._prefill_ok:  # it was the prefill: leave it out from now on
                log.warning("labeler %s refuses a prefilled answer; asking without from now on", self.id)
                self._prefill_ok = False
            text = (prefill or "") + reply.text
            index = parse_choice(text, request.options)
            if index is not None or parse_try == self.max_parse_retries:
                return index, text, None
            parse_try += 1
            self._count_parse_retry()

    async def _choose_by_votes(self, client, request: ChoiceRequest) -> Choice:
        base = self._render(request.messages)
        # return_exceptions: when a budget stops the batch, the votes already in flight still finish
        votes = await asyncio.gather(*(self._vote(client, base, request) for _ in range(self.vote_samples)),
                                     return_exceptions=True)
        for vote in votes:
            if isinstance(vote, BaseException):
                raise vote
        raws = [text for _, text, _ in votes if text is not None]
        raw = "\n---\n".join(raws) if raws else None
        counts = [0] * len(request.options)
        for index, _, _ in votes:
            if index is not None:
                counts[index] += 1
        if sum(counts):
            return Choice([c / sum(counts) for c in counts], method="votes", raw=raw)
        errors = [error for _, _, error in votes if error]
        if raws:
            return Choice(None, method="votes", status="unparseable", raw=raw,
                          error="no vote named one of the options")
        return Choice(None, method="votes", status="failed", error=errors[0] if errors else "no votes")
