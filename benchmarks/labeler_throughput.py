"""Labeler throughput against a local server that answers every request after a fixed latency.

    .venv/bin/python benchmarks/labeler_throughput.py [--latency 0.2] [--rounds 20]

The server (tests/fake_servers.py) runs in its own process, so it competes for the CPU as a real
co-located server would not; the labeler runs as a stage runs it, through the on-disk cache. For each
number of requests in flight C, it sends C x rounds distinct requests and reports the throughput as a
fraction of the ideal C / latency (one untimed request first: imports, the client). Then the largest
batch is run again: every answer is in the cache, so the server must see zero requests; its time is
reported. The CPU each process spent per request is reported too: unlike the throughput, it does not
depend on what else the machine is running.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import anthropic  # noqa: E402
import openai  # noqa: E402

from cai.labelers.anthropic_api import AnthropicLabeler  # noqa: E402
from cai.labelers.api_common import aiohttp_transport  # noqa: E402
from cai.labelers.base import GenerateRequest  # noqa: E402
from cai.labelers.cache import CachedLabeler  # noqa: E402
from cai.labelers.openai_api import OpenAILabeler  # noqa: E402


def server_requests(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as response:
        return json.load(response)["requests"]


def server_cpu(pid: int) -> float:
    """CPU seconds the server process has used (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_batch(labeler, requests, port: int, pid: int) -> tuple[float, int, float, float]:
    """(seconds, requests the server saw, client CPU seconds, server CPU seconds)"""
    before, server_before, cpu_before = server_requests(port), server_cpu(pid), time.process_time()
    start = time.perf_counter()
    results = labeler.generate(requests)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_before
    assert all(r.status == "ok" for r in results), [r.error for r in results if r.status != "ok"][:3]
    return elapsed, server_requests(port) - before, cpu, server_cpu(pid) - server_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the server takes per answer")
    parser.add_argument("--rounds", type=int, default=20, help="requests per slot in flight")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 8, 32, 64])
    args = parser.parse_args()

    server = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_servers", "--latency", str(args.latency)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        port = int(server.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        cache_dir = Path(tempfile.mkdtemp(prefix="cai-bench-"))
        rows = []
        load_before = f"{os.getloadavg()[0]:.2f}"
        transport = "aiohttp" if aiohttp_transport(openai) is not None else "httpx"
        print(f"server latency {args.latency * 1000:.0f} ms, {args.rounds} requests per slot, "
              f"{os.cpu_count()} CPUs, {transport} transport, Python {sys.version.split()[0]}, "
              f"openai {openai.__version__}, anthropic {anthropic.__version__}", flush=True)
        cases = [("openai", c) for c in args.in_flight] + [("anthropic", max(args.in_flight))]
        for backend, in_flight in cases:
            cls, base_url = (OpenAILabeler, url + "/v1") if backend == "openai" else (AnthropicLabeler, url)
            inner = cls("bench-model", base_url=base_url, concurrency=in_flight, price=(0.0, 0.0))
            labeler = CachedLabeler(inner, cache_dir / "labeler_cache.sqlite")
            # warm-up (imports, first connection), not timed
            labeler.generate([GenerateRequest([{"role": "user", "content": f"warm-up {backend} {in_flight}"}])])
            n = in_flight * args.rounds
            requests = [GenerateRequest([{"role": "user", "content": f"{backend} {in_flight} question {i}"}],
                                        max_new_tokens=32) for i in range(n)]
            elapsed, sent, cpu, srv_cpu = timed_batch(labeler, requests, port, server.pid)
            assert sent == n, (sent, n)
            ideal = in_flight / args.latency
            rows.append((backend, in_flight, n, n / elapsed, ideal, cpu / n, srv_cpu / n))
            print(f"{backend:9s} in flight {in_flight:3d}: {n:4d} requests in {elapsed:6.2f} s = "
                  f"{n / elapsed:7.1f}/s, {n / elapsed / ideal:.3f} of ideal; CPU per request "
                  f"{cpu / n * 1000:.2f} ms here, {srv_cpu / n * 1000:.2f} ms in the server", flush=True)
            last = (labeler, requests)

        # The same batch again: everything comes from the cache.
        labeler, requests = last
        again = CachedLabeler(labeler.inner, cache_dir / "labeler_cache.sqlite")
        cached_elapsed, cached_sent, _, _ = timed_batch(again, requests, port, server.pid)
        print(f"cached rerun: {len(requests)} answers, {cached_sent} requests, {cached_elapsed:.3f} s", flush=True)

        print(f"\nload average before: {load_before}, after: {os.getloadavg()[0]:.2f}")
        print("\n| backend | in flight | requests | throughput (req/s) | ideal (req/s) | fraction of ideal "
              "| client CPU per request (ms) | server CPU per request (ms) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for backend, in_flight, n, rate, ideal, cpu, srv_cpu in rows:
            print(f"| {backend} | {in_flight} | {n} | {rate:.1f} | {ideal:.1f} | {rate / ideal:.3f} "
                  f"| {cpu * 1000:.2f} | {srv_cpu * 1000:.2f} |")
        print(f"\nCached rerun of the last batch: {len(requests)} answers, {cached_sent} requests to the server, "
              f"{cached_elapsed:.3f} s.")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
