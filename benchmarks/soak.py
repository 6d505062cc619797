"""Soak and stress: minutes of multi-turn agent traffic (shared system prompts, mixed lengths,
random aborts and client disconnects, half at T=0) at high concurrency against `fp4serve serve`
with prefix caching and drafting on, loopback only. Prints the report fp4serve.bench.soak builds:
requests, errors and 5xx (both must be 0), per-minute prefix-cache hit rate and draft acceptance
(must stay flat), the KV cache after the load drains (must be idle: nothing leaked), the server's
peak RSS, and T=0 turns replayed alone (must equal the replies given under load).
Run:
  python benchmarks/soak.py --minutes 10 --concurrency 64      # the embedded default model, n-gram drafting
  python benchmarks/soak.py --minutes 10 --serve-args "DIR --speculative-config '{\"method\": \"mtp\", \"num_speculative_tokens\": 2}'"
  python benchmarks/soak.py --base-url http://127.0.0.1:8000/v1 --model NAME   # a server already running
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform

from fp4serve.bench.local_server import LocalServer
from fp4serve.bench.soak import SoakConfig, format_report, run_soak

NGRAM = '--speculative-config \'{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}\''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--window-s", type=float, default=60.0)
    parser.add_argument("--serve-args", default=NGRAM, help="`fp4serve serve` words (default: default model, n-gram)")
    parser.add_argument("--base-url", default=None, help="soak a running server instead of starting one")
    parser.add_argument("--model", default=None, help="served model name (default: the server's first)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = SoakConfig(duration_s=60 * args.minutes, concurrency=args.concurrency, window_s=args.window_s,
                        seed=args.seed)  # fmt: skip
    title = f"{args.minutes:g} min at c={args.concurrency}: {args.base_url or 'fp4serve serve ' + args.serve_args}"
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs")
    if args.base_url:
        report = asyncio.run(run_soak(args.base_url, args.model, config))
    else:
        with LocalServer(args.serve_args + " --enable-prefix-caching") as server:
            report = asyncio.run(run_soak(server.url, args.model, config, server_pid=server.pid))
    print(format_report(report, title))
    if report.errors or report.server_errors or report.leaked or report.replay_mismatches:
        raise SystemExit("the soak failed: see errors, leaks or replay mismatches above")


if __name__ == "__main__":
    main()
