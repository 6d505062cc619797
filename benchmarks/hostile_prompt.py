"""Does one oversized prompt stall the server? Starts `fp4serve serve` on the embedded default
model, posts a prompt of --megabytes of text (under the 16 MiB body limit) to /v1/completions,
and polls /health every 20 ms meanwhile. Prints how long the refusal took and the worst /health
latency while it was pending.
Run:  python benchmarks/hostile_prompt.py [--megabytes 15]
"""
from __future__ import annotations

import argparse
import threading
import time

import httpx

from fp4serve.bench.local_server import LocalServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=15.0)
    args = parser.parse_args()
    text = "hello world " * int(args.megabytes * 2**20 / 12)
    result = {}
    with LocalServer() as server:
        base = server.url.removesuffix("/v1")

        def post():
            start = time.perf_counter()
            response = httpx.post(f"{server.url}/completions", json={"prompt": text, "max_tokens": 1}, timeout=120)
            result["status"], result["seconds"] = response.status_code, time.perf_counter() - start

        sender = threading.Thread(target=post)
        sender.start()
        worst = 0.0
        while sender.is_alive():
            start = time.perf_counter()
            httpx.get(f"{base}/health", timeout=60)
            worst = max(worst, time.perf_counter() - start)
            time.sleep(0.02)
        sender.join()
    print(
        f"prompt {len(text) / 2**20:.1f} MiB: HTTP {result['status']} after {result['seconds']:.2f} s; "
        f"worst /health latency meanwhile {worst * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
