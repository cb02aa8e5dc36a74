"""A pool of OpenAI-compatible (or Anthropic-compatible) servers behind one API labeler.

`labeler.base_url` given as a list makes one: several vLLM or llama.cpp servers serving the same
model, used as one. The engine (api_common.py) asks the pool for a server before each request and
tells it afterwards how the request went:

- choice: among the servers in service with a free slot, the least loaded one (fewest requests in
  flight for its slots; with equal slots, simply the fewest in flight). A request waits while every
  server in service is full;
- backoff: a server whose request failed (connection refused or dropped, 5xx, timeouts, malformed
  bodies) rests for a jittered, bounded backoff before it is sent anything again (the labeler's
  `backoff_base` doubled per failure in a row, at most `backoff_max`, a random half of it taken off so
  that the servers' callers do not come back together); its items are retried on the others at once;
- failover: one that fails `failures` times in a row is benched for `bench_seconds`. After the bench
  it is tried again, and one more failure benches it again;
- every server out (resting or benched): a request waits for the first to return, as long as that is
  within `wait_seconds` (the labeler's request timeout), so a blip across the whole pool is ridden out
  as a single server with backoff would be. Only when none returns within it does the stage stop, with
  one line naming each server and its last error (a rerun resumes from the cache);
- a request cancelled while it holds a slot (`cancel`) gives the slot back and counts nothing.

Which server answered is not part of the cache key: every server of a pool serves the same model.
The usage file counts the requests each server answered (`server_requests`).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from cai.errors import CaiError

POOL_CACHE_URL = "pool"  # what a pool puts in the cache key in place of a server's URL


@dataclass
class Server:
    url: str
    slots: int
    client: object | None = None  # the SDK client for this URL, made in the engine's event loop
    in_flight: int = 0
    failures: int = 0  # consecutive
    benched_until: float = 0.0  # out after `failures` in a row
    resting_until: float = 0.0  # out for a backoff after one failure
    answered: int = 0
    last_error: str = ""

    def in_service(self, now: float) -> bool:
        return self.benched_until <= now and self.resting_until <= now

    def back_at(self) -> float:
        return max(self.benched_until, self.resting_until)


@dataclass
class ServerPool:
    servers: list[Server]
    failures: int = 3
    bench_seconds: float = 30.0
    backoff_base: float = 0.5
    backoff_max: float = 60.0
    wait_seconds: float = 60.0
    _freed: asyncio.Event | None = field(default=None, repr=False)

    @classmethod
    def from_urls(cls, urls: list[str], slots: list[int] | int, failures: int = 3, bench_seconds: float = 30.0,
                  backoff_base: float = 0.5, backoff_max: float = 60.0, wait_seconds: float = 60.0) -> "ServerPool":
        if isinstance(slots, int):
            slots = [slots] * len(urls)
        if len(slots) != len(urls):
            raise CaiError(f"labeler.server_concurrency has {len(slots)} entries but labeler.base_url names "
                           f"{len(urls)} servers; give one per server, in the same order")
        if any(n < 1 for n in slots):
            raise CaiError(f"labeler.server_concurrency={slots}: every server needs at least 1 slot")
        return cls([Server(url.rstrip("/"), n) for url, n in zip(urls, slots)], failures, bench_seconds,
                   backoff_base, backoff_max, wait_seconds)

    @property
    def slots(self) -> int:
        return sum(s.slots for s in self.servers)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def bind(self, make_client) -> None:
        """Give each server its SDK client (`make_client(url)`), in the engine's event loop."""
        for server in self.servers:
            server.client = make_client(server.url)
        self._freed = asyncio.Event()

    def unbind(self) -> None:
        for server in self.servers:
            server.client = None
        self._freed = None

    def _pick(self, now: float) -> Server | None:
        free = [s for s in self.servers if s.in_service(now) and s.in_flight < s.slots]
        return min(free, key=lambda s: (s.in_flight / s.slots, s.in_flight)) if free else None

    async def acquire(self) -> Server:
        """The server for the next request (its slot taken). With every server out, it waits for the first
        to return; CaiError when none returns within `wait_seconds`."""
        deadline = time.monotonic() + self.wait_seconds
        while True:
            now = time.monotonic()
            server = self._pick(now)
            if server is not None:
                server.in_flight += 1
                return server
            out = [s for s in self.servers if not s.in_service(now)]
            if len(out) == len(self.servers) and min(s.back_at() for s in out) > deadline:
                raise CaiError(self.none_left())
            # Every server in service is full, or none is in service yet: wait for a slot, or for a return.
            self._freed.clear()
            wake = min((s.back_at() for s in out), default=now + 1.0)
            try:
                await asyncio.wait_for(self._freed.wait(), max(0.01, min(1.0, wake - now)))
            except asyncio.TimeoutError:
                pass

    def cancel(self, server: Server) -> None:
        """Give back the slot of a request that was cancelled before it was answered (counts nothing)."""
        server.in_flight -= 1
        if self._freed is not None:
            self._freed.set()

    def backoff(self, failures: int) -> float:
        """Seconds a server rests after `failures` in a row: doubled per failure, bounded, half of it jittered."""
        delay = min(self.backoff_max, self.bench_seconds, self.backoff_base * 2 ** (failures - 1))
        return delay / 2 + random.uniform(0, delay / 2)

    def release(self, server: Server, error: str | None, status: int | None) -> bool:
        """Record how a request on `server` went; True when the fault was the server's (retry elsewhere)."""
        self.cancel(server)
        if error is None:
            server.failures = 0
            server.answered += 1
            return False
        if status is not None and status < 500:
            return False  # 4xx: about the request (or a rate limit), not a dead server
        server.failures += 1
        server.last_error = error
        if server.failures >= self.failures:
            server.benched_until = time.monotonic() + self.bench_seconds
            server.failures = self.failures - 1  # back from the bench, one more failure benches it again
        else:
            server.resting_until = time.monotonic() + self.backoff(server.failures)
        return True

    def none_left(self) -> str:
        why = "; ".join(f"{s.url} ({s.last_error[:120] or 'benched'})" for s in self.servers)
        return (f"labeler: no server of labeler.base_url is left: all {len(self.servers)} failed "
                f"{self.failures} times in a row and none returns within {self.wait_seconds:g} s "
                f"(labeler.timeout): {why}")

    def answered(self) -> dict[str, int]:
        return {s.url: s.answered for s in self.servers}
