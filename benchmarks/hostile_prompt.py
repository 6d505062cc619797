"""Does one oversized prompt stall the server? Starts `fp4serve serve` on the embedded default
model, posts a prompt of --megabytes of text (under the 16 MiB body limit) to /v1/completions,
and polls /health every 20 ms meanwhile. Prints how long the refusal took and the worst /health
latency while it was pending.
Run:  python benchmarks/hostile_prompt.py [--megabytes 15]
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=15.0)
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", "from fp4serve.cli import main; main()", "serve", "--port", str(port)],
        env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        text = "hello world " * int(args.megabytes * 2**20 / 12)
        result = {}

        def post():
            start = time.perf_counter()
            response = httpx.post(f"{base}/v1/completions", json={"prompt": text, "max_tokens": 1}, timeout=120)
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
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"prompt {len(text) / 2**20:.1f} MiB: HTTP {result['status']} after {result['seconds']:.2f} s; "
          f"worst /health latency meanwhile {worst * 1000:.0f} ms")


if __name__ == "__main__":
    main()
