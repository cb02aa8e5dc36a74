"""Labeler throughput on a pool of servers, and what happens when one of them dies halfway.

    .venv/bin/python benchmarks/pool_throughput.py [--requests 3000]

Four fake OpenAI-compatible servers (tests/fake_servers.py), each in its own process, each with a
fixed latency and a fixed number of slots (requests beyond them queue in the server): the ideal
throughput of server i is slots_i / latency_i, and of the pool the sum. One labeler with
`base_url` = the four URLs and `server_concurrency` = their slots sends distinct requests (the engine
alone, without the on-disk cache, so that each answer's arrival time can be taken).

1. All four servers: throughput over the whole batch, as a fraction of the sum of the ideals.
2. The same again (new requests), with one server killed (SIGKILL) when half the answers are in:
   every request must still be answered; the throughput before and after the kill is compared with
   the ideal of the servers alive in each half.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cai.labelers.base import GenerateRequest  # noqa: E402
from cai.labelers.openai_api import OpenAILabeler  # noqa: E402

SERVERS = [(0.10, 8), (0.20, 16), (0.30, 12), (0.40, 24)]  # (latency s, slots)


def start_server(latency: float, slots: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.fake_servers", "--latency", str(latency),
                             "--concurrency", str(slots)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return proc, f"http://127.0.0.1:{int(proc.stdout.readline())}/v1"


def run_batch(labeler, requests, kill=None) -> tuple[float, list[float]]:
    """(seconds, the time each answer arrived); `kill()` is called when half the answers are in."""
    arrivals: list[float] = []
    half = len(requests) // 2
    start = time.perf_counter()

    def on_result(i, result):
        assert result.status == "ok", result.error
        arrivals.append(time.perf_counter() - start)
        if kill is not None and len(arrivals) == half:
            threading.Thread(target=kill).start()

    results = labeler.generate(requests, on_result=on_result)
    assert all(r is not None and r.status == "ok" for r in results)
    return time.perf_counter() - start, arrivals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per batch")
    args = parser.parse_args()
    procs = [start_server(latency, slots) for latency, slots in SERVERS]
    ideals = [slots / latency for latency, slots in SERVERS]
    try:
        urls = [url for _, url in procs]
        inner = OpenAILabeler("bench-model", base_url=urls, server_concurrency=[s for _, s in SERVERS],
                              price=(0.0, 0.0), server_failures=3, server_bench_seconds=600)
        labeler = inner
        labeler.generate([GenerateRequest([{"role": "user", "content": "warm-up"}])])
        load_before = os.getloadavg()[0]
        print(f"{len(SERVERS)} servers (latency s, slots): {SERVERS}; ideal {sum(ideals):.1f} req/s; "
              f"{os.cpu_count()} CPUs, load average {load_before:.2f}", flush=True)

        def batch(tag):
            return [GenerateRequest([{"role": "user", "content": f"{tag} {i}"}], max_new_tokens=16)
                    for i in range(args.requests)]

        # 1. all four
        before = dict(inner.usage.extra.get("server_requests", {}))
        elapsed, _ = run_batch(labeler, batch("all"))
        share = {u: inner.usage.extra["server_requests"][u] - before.get(u, 0) for u in urls}
        rate = args.requests / elapsed
        print(f"all servers: {args.requests} requests in {elapsed:.2f} s = {rate:.1f} req/s, "
              f"{rate / sum(ideals):.3f} of the ideal {sum(ideals):.1f}", flush=True)
        print("  per server (answered, ideal share): " + ", ".join(
            f"{share[u]} ({ideals[k] / sum(ideals) * args.requests:.0f})" for k, u in enumerate(urls)), flush=True)

        # 2. one killed halfway: the fastest (the largest share of the ideal)
        victim = max(range(len(SERVERS)), key=lambda k: ideals[k])
        killed_at: list[float] = []
        t0 = time.perf_counter()

        def kill():
            procs[victim][0].send_signal(signal.SIGKILL)
            killed_at.append(time.perf_counter() - t0)

        elapsed, arrivals = run_batch(labeler, batch("kill"), kill)
        cut = killed_at[0]
        first = [t for t in arrivals if t <= cut]
        after = [t for t in arrivals if t > cut + 1.0]  # one second for the bench to settle
        rate_before = len(first) / cut
        rate_after = len(after) / (arrivals[-1] - cut - 1.0)
        remaining = sum(ideals) - ideals[victim]
        load_after = os.getloadavg()[0]
        print(f"one killed: server {victim + 1} (ideal {ideals[victim]:.0f} req/s) SIGKILLed at {cut:.2f} s; "
              f"all {len(arrivals)} requests answered in {elapsed:.2f} s", flush=True)
        print(f"  before the kill {rate_before:.1f} req/s ({rate_before / sum(ideals):.3f} of {sum(ideals):.1f}); "
              f"after {rate_after:.1f} req/s ({rate_after / remaining:.3f} of the remaining {remaining:.1f})")
        print(f"load average before {load_before:.2f}, after {load_after:.2f}")
        print("\n| case | requests | seconds | throughput (req/s) | ideal (req/s) | fraction |")
        print("|---|---:|---:|---:|---:|---:|")
        print(f"| 4 servers | {args.requests} | {args.requests / rate:.2f} | {rate:.1f} | {sum(ideals):.1f} "
              f"| {rate / sum(ideals):.3f} |")
        print(f"| 4 servers, before the kill | {len(first)} | {cut:.2f} | {rate_before:.1f} | {sum(ideals):.1f} "
              f"| {rate_before / sum(ideals):.3f} |")
        print(f"| 3 servers, after the kill | {len(after)} | {arrivals[-1] - cut - 1.0:.2f} | {rate_after:.1f} "
              f"| {remaining:.1f} | {rate_after / remaining:.3f} |")
        labeler.close()
    finally:
        for proc, _ in procs:
            proc.kill()
            proc.wait(10)


if __name__ == "__main__":
    main()
