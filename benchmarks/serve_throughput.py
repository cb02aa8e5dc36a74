"""Rewards per second of `cai serve` beside the same labeling in process, against an API labeler that
answers every request after a fixed latency.

    .venv/bin/python benchmarks/serve_throughput.py [--latency 0.2] [--concurrency 32] [--rounds 10]

The labeler is the real `openai` client talking to tests/fake_servers.py in its own process, with
log-probabilities (one request per choice). The ideal is the labeler's concurrency over the latency,
divided by the labeler requests one reward needs: 1 in pointwise mode; in group mode, for a group of G
answers, G(G-1)/2 pairs x M principles x 2 orders for G rewards. In process, one `Judge.score` call
gets every item; through the service, `--clients` threads each post requests of `--request-items`
items at once, and the service merges what is queued into labeler batches. Each case uses distinct
prompts and a fresh answer cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cai.config import load_config  # noqa: E402
from cai.serve import Judge, ScoreItem  # noqa: E402

FAKE_SERVER = """
import asyncio, math, re, sys
sys.path.insert(0, {root!r})
from tests.fake_servers import FakeLLMServer

def logprobs(body):
    text = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
    if "Rate the assistant" in text:
        return [{{"(": 0.0}}, {{"7": -0.2, "8": -1.8}}]
    return [{{"(": 0.0}}, {{"A": math.log(0.6), "B": math.log(0.4)}}]

async def main():
    server = FakeLLMServer(latency={latency}, logprobs=logprobs)
    await server.start_async()
    print(server.port, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def overrides(url: str, cache: Path, args, mode: str) -> list[str]:
    return [f"cache_dir={cache}", f"output_dir={cache}/run", "constitution=constitutions/tiny.yaml",
            "labeler.backend=openai", "labeler.model=bench", f"labeler.base_url={url}",
            f"labeler.concurrency={args.concurrency}", "prefs.principles_per_pair=2", f"serve.mode={mode}",
            "serve.max_items=100000"]


def make_items(tag: str, n: int, group_size: int) -> list[dict]:
    return [{"prompt": f"{tag} question {k // group_size}", "answer": f"answer {k % group_size} to {k // group_size}"}
            for k in range(n)]


def in_process(url: str, args, mode: str, items: list[dict]) -> float:
    cfg = load_config(None, overrides(url, Path(tempfile.mkdtemp(prefix="cai-serve-bench-")), args, mode))
    judge = Judge(cfg)
    judge.score([ScoreItem("warm-up", "a"), ScoreItem("warm-up", "b")], mode)
    start = time.perf_counter()
    results = judge.score([ScoreItem(i["prompt"], i["answer"]) for i in items], mode)
    elapsed = time.perf_counter() - start
    assert all(r.status == "ok" for r in results), [r.error for r in results if r.status != "ok"][:3]
    judge.close()
    return elapsed


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def through_service(url: str, args, mode: str, items: list[dict]) -> float:
    cache = Path(tempfile.mkdtemp(prefix="cai-serve-bench-"))
    cfg_path = cache / "serve.yaml"
    import yaml

    tree: dict = {}
    for text in overrides(url, cache, args, mode) + ["serve.port=0"]:
        key, value = text.split("=", 1)
        node = tree
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    cfg_path.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": "x"}
    server = subprocess.Popen([sys.executable, "-m", "cai", "serve", str(cfg_path)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in server.stdout:
            if line.startswith("cai serve:"):
                base = line.rsplit(" on ", 1)[1].strip()
                break
        threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()  # drain its log
        post(base + "/v1/score", {"items": [{"prompt": "warm-up", "answer": "a"}, {"prompt": "warm-up", "answer": "b"}]})
        chunks = [items[k : k + args.request_items] for k in range(0, len(items), args.request_items)]
        failures: list[str] = []

        def client(mine):
            for chunk in mine:
                body = post(base + "/v1/score", {"items": chunk})
                failures.extend(r["error"] for r in body["results"] if r["status"] != "ok")

        threads = [threading.Thread(target=client, args=(chunks[c :: args.clients],)) for c in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        assert not failures, failures[:3]
        return elapsed
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the fake labeler takes per answer")
    parser.add_argument("--concurrency", type=int, default=32, help="labeler.concurrency")
    parser.add_argument("--rounds", type=int, default=10, help="labeler requests per slot in flight, per case")
    parser.add_argument("--clients", type=int, default=8, help="concurrent callers of the service")
    parser.add_argument("--request-items", type=int, default=16, help="items per request to the service")
    parser.add_argument("--group-size", type=int, default=4)
    args = parser.parse_args()

    fake = subprocess.Popen([sys.executable, "-c", FAKE_SERVER.format(root=str(ROOT), latency=args.latency)],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{int(fake.stdout.readline())}/v1"
        load_before = os.getloadavg()[0]
        print(f"labeler latency {args.latency * 1000:.0f} ms, concurrency {args.concurrency}, {os.cpu_count()} CPUs, "
              f"{args.clients} clients x {args.request_items} items per request", flush=True)
        g, m = args.group_size, 2
        per_reward = {"pointwise": 1.0, "group": (g * (g - 1) / 2 * m * 2) / g}
        rows = []
        for mode in ("pointwise", "group"):
            n = int(args.concurrency * args.rounds / per_reward[mode]) // g * g
            ideal = args.concurrency / args.latency / per_reward[mode]
            for where, run in (("in process", in_process), ("cai serve", through_service)):
                items = make_items(f"{mode} {where}", n, g)
                elapsed = run(url, args, mode, items)
                rate = n / elapsed
                rows.append((mode, where, n, elapsed, rate, ideal))
                print(f"{mode:9s} {where:10s}: {n:4d} rewards in {elapsed:6.2f} s = {rate:7.1f}/s, "
                      f"{rate / ideal:.3f} of ideal ({ideal:.1f}/s)", flush=True)
        print(f"\nload average before: {load_before:.2f}, after: {os.getloadavg()[0]:.2f}")
        print("\n| mode | where | rewards | seconds | rewards/s | ideal rewards/s | fraction of ideal |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for mode, where, n, elapsed, rate, ideal in rows:
            print(f"| {mode} | {where} | {n} | {elapsed:.2f} | {rate:.1f} | {ideal:.1f} | {rate / ideal:.3f} |")
    finally:
        fake.terminate()
        fake.wait(10)


if __name__ == "__main__":
    main()
