"""A pool of OpenAI-compatible (or Anthropic-compatible) servers behind one API labeler.

`labeler.base_url` given as a list makes one: several vLLM or llama.cpp servers serving the same
model, used as one. The engine (api_common.py) asks the pool for a server before each request and
tells it afterwards how the request went:

- choice: among the servers in service with a free slot, the least loaded one (fewest requests in
  flight for its slots; with equal slots, simply the fewest in flight). A request waits while every
  server in service is full;
- failover: a server whose requests fail `failures` times in a row (connection refused or dropped,
  5xx, timeouts, malformed bodies) is benched for `bench_seconds`; its items are retried on the others.
  After the bench it is tried again, and one more failure benches it again;
- the end: when every server is benched at once, nothing is left to send to, and the stage stops with
  one line naming each server and its last error (a rerun resumes from the cache).

Which server answered is not part of the cache key: every server of a pool serves the same model.
The usage file counts the requests each server answered (`server_requests`).
"""

from __future__ import annotations

import asyncio
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
    benched_until: float = 0.0
    answered: int = 0
    last_error: str = ""

    def in_service(self, now: float) -> bool:
        return self.benched_until <= now


@dataclass
class ServerPool:
    servers: list[Server]
    failures: int = 3
    bench_seconds: float = 30.0
    _freed: asyncio.Event | None = field(default=None, repr=False)

    @classmethod
    def from_urls(cls, urls: list[str], slots: list[int] | int, failures: int = 3,
                  bench_seconds: float = 30.0) -> "ServerPool":
        if isinstance(slots, int):
            slots = [slots] * len(urls)
        if len(slots) != len(urls):
            raise CaiError(f"labeler.server_concurrency has {len(slots)} entries but labeler.base_url names "
                           f"{len(urls)} servers; give one per server, in the same order")
        if any(n < 1 for n in slots):
            raise CaiError(f"labeler.server_concurrency={slots}: every server needs at least 1 slot")
        return cls([Server(url.rstrip("/"), n) for url, n in zip(urls, slots)], failures, bench_seconds)

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
        """The server for the next request (its slot taken); raises CaiError when none is left."""
        while True:
            now = time.monotonic()
            server = self._pick(now)
            if server is not None:
                server.in_flight += 1
                return server
            if not any(s.in_service(now) for s in self.servers):
                raise CaiError(self.none_left())
            # Every server in service is full: wait for a slot, or for a bench to end.
            self._freed.clear()
            wake = min((s.benched_until for s in self.servers if not s.in_service(now)), default=now + 1.0)
            try:
                await asyncio.wait_for(self._freed.wait(), max(0.01, min(1.0, wake - now)))
            except asyncio.TimeoutError:
                pass

    def release(self, server: Server, error: str | None, status: int | None) -> bool:
        """Record how a request on `server` went; True when the fault was the server's (retry elsewhere)."""
        server.in_flight -= 1
        if self._freed is not None:
            self._freed.set()
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
        return True

    def none_left(self) -> str:
        why = "; ".join(f"{s.url} ({s.last_error[:120] or 'benched'})" for s in self.servers)
        return (f"labeler: no server of labeler.base_url is left: all {len(self.servers)} failed "
                f"{self.failures} times in a row: {why}")

    def answered(self) -> dict[str, int]:
        return {s.url: s.answered for s in self.servers}
