"""The `fp4serve bench` subcommands: serve (HTTP sweep), compare (two runs), offline (engine in-process)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import platform
import shlex
import sys
from contextlib import nullcontext
from pathlib import Path

import httpx

from fp4serve.engine_args import add_engine_args, engine_config
from fp4serve.errors import BenchError


def add_bench_parser(sub, common: argparse.ArgumentParser) -> None:
    bench = sub.add_parser("bench", help="benchmark an OpenAI-compatible server or the engine", parents=[common])
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    add_serve_parser(kinds, common)
    add_compare_parser(kinds, common)
    add_offline_parser(kinds, common)


def add_serve_parser(kinds, common: argparse.ArgumentParser) -> None:
    serve = kinds.add_parser(
        "serve", help="sweep categories x concurrency over HTTP; writes a report", parents=[common]
    )
    _server_args(serve)
    _workload_args(serve)
    _sweep_args(serve)
    serve.set_defaults(func=cmd_bench_serve)


def _server_args(p: argparse.ArgumentParser) -> None:
    """Which server to measure (default: one bench starts) and what the run is called."""
    p.add_argument(
        "--base-url", default=None, help="OpenAI root, e.g. http://127.0.0.1:8000/v1 (default: start fp4serve)"
    )
    p.add_argument("--model", default=None, help="model name to request (default: the first of GET /v1/models)")
    p.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer token (default: $OPENAI_API_KEY)"
    )
    p.add_argument(
        "--serve-args",
        default="",
        help='arguments for the fp4serve started without --base-url, e.g. "model_dir --dtype bfloat16"',
    )
    p.add_argument("--label", default=None, help="name of this run in reports and compare (default: model @ server)")


def _workload_args(p: argparse.ArgumentParser) -> None:
    """The prompts, and the tokenizer that counts tokens for the sized ones."""
    p.add_argument("--workload", default="categories", help="categories | random | PATH.jsonl")
    p.add_argument("--categories", default=None, help="comma list (default: all six)")
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument(
        "--long-context", default=None, help="comma list of prompt sizes in tokens, e.g. 16k,32k (run at c=1)"
    )
    p.add_argument("--long-context-prompts", type=int, default=2, help="prompts per long-context tier")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="local tokenizer directory for counting tokens when the server has no /tokenize",
    )


def _sweep_args(p: argparse.ArgumentParser) -> None:
    """The levels, the requests sent at each, and where the results go."""
    p.add_argument("--concurrency", default="1,4,16", help="comma list of levels")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--num-prompts", type=int, default=None, help="requests per level (default: 2 x concurrency, at least 8)"
    )
    size.add_argument("--duration", type=float, default=None, help="seconds per level instead of a request count")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", default="0", help="comma list, e.g. 0,0.7 runs the sweep greedy and sampled")
    endpoint = p.add_mutually_exclusive_group()
    endpoint.add_argument(
        "--chat", dest="chat", action="store_true", default=True, help="/v1/chat/completions (default)"
    )
    endpoint.add_argument(
        "--completions", dest="chat", action="store_false", help="/v1/completions with the raw prompt"
    )
    p.add_argument(
        "--ignore-eos", action="store_true", help="generate max_tokens for every request (vLLM/llama.cpp extension)"
    )
    p.add_argument("--warmup", type=int, default=2, help="unrecorded requests before the sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--out", default=None, help="result directory (default: bench_results/<UTC time>)")


def add_compare_parser(kinds, common: argparse.ArgumentParser) -> None:
    comp = kinds.add_parser("compare", help="two runs side by side with ratios", parents=[common])
    comp.add_argument("a", help="summary.json (or its directory) of run A")
    comp.add_argument("b", help="summary.json (or its directory) of run B")
    comp.set_defaults(func=cmd_bench_compare)


def add_offline_parser(kinds, common: argparse.ArgumentParser) -> None:
    offline = kinds.add_parser("offline", help="engine throughput in-process, no HTTP", parents=[common])
    add_engine_args(offline)
    offline.add_argument("--num-prompts", type=int, default=64)
    offline.add_argument("--input-len", default="16:256", help="token count or min:max range")
    offline.add_argument("--output-len", default="16:256", help="token count or min:max range")
    offline.add_argument("--temperature", type=float, default=0.6)
    offline.add_argument("--out", default=None, help="also write offline.json here")
    offline.set_defaults(func=cmd_bench_offline)


def _float_list(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise BenchError(f"--{what} must be a comma list of numbers, not {text!r}") from None


def _concurrency(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1:
        raise BenchError(f"--concurrency must be a comma list of positive integers, not {text!r}")
    return levels


def discover_model(base_url: str, headers: dict) -> tuple[str, str | None]:
    """(id, root) of the first model GET /v1/models lists; root is where vLLM and fp4serve loaded it."""
    try:
        response = httpx.get(f"{base_url.rstrip('/')}/models", headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach {base_url}: {e}") from None
    if response.status_code != 200:
        raise BenchError(f"GET {base_url}/models answered {response.status_code}; pass --model (and --api-key?)")
    data = response.json().get("data") or []
    if not data:
        raise BenchError(f"{base_url}/models lists no model; pass --model")
    return data[0]["id"], data[0].get("root")


def cmd_bench_serve(args) -> None:
    from fp4serve.bench.charts import write_charts
    from fp4serve.bench.local_server import LocalServer
    from fp4serve.bench.report import markdown, single_stream_section, write_results
    from fp4serve.bench.sweep import SweepConfig, run_sweep

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request drowns the progress bars
    concurrency = _concurrency(args.concurrency)
    temperatures = _float_list(args.temperature, "temperature")
    if not temperatures:
        raise BenchError("--temperature names no value")
    for flag, value, low in (
        ("--num-prompts", args.num_prompts, 1),
        ("--duration", args.duration, 1e-9),
        ("--max-tokens", args.max_tokens, 1),
        ("--warmup", args.warmup, 0),
    ):
        if value is not None and value < low:
            raise BenchError(f"{flag} must be at least {low:g}, not {value}")
    load_before = os.getloadavg()[0]
    out = Path(args.out or f"bench_results/{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    local = None if args.base_url else LocalServer(args.serve_args, log_path=out / "server.log")
    with local or nullcontext():
        base_url = args.base_url or local.url
        api_key = args.api_key if args.base_url else local.api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        model, model_root = (args.model, None) if args.model else discover_model(base_url, headers)
        config = SweepConfig(
            base_url=base_url,
            model=model,
            chat=args.chat,
            api_key=api_key,
            concurrency=concurrency,
            num_prompts=args.num_prompts,
            duration=args.duration,
            max_tokens=args.max_tokens,
            temperatures=temperatures,
            warmup=args.warmup,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
            request_timeout=args.request_timeout,
            progress=args.progress,
        )
        workload, long_context, counter_method = build_workloads(args, config, model_root, headers)
        levels = asyncio.run(run_sweep(config, workload, long_context))
    meta = {
        "label": args.label or f"{model} @ {'fp4serve (started by bench)' if local else base_url}",
        "base_url": base_url,
        "server": f"fp4serve started by bench, serve args: {args.serve_args or 'none'}" if local else "external",
        "model": model,
        "endpoint": "chat" if args.chat else "completions",
        "max_tokens": args.max_tokens,
        "ignore_eos": args.ignore_eos,
        "workload": args.workload,
        "concurrency": list(concurrency),
        "temperatures": list(temperatures),
        "level_size": f"{args.duration:g} s"
        if args.duration
        else (f"{args.num_prompts} requests" if args.num_prompts else "max(8, 2c) requests"),
        "warmup": args.warmup,
        "seed": args.seed,
        "token_count_method": counter_method,
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "client_machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, Python {platform.python_version()}",
        # A shared machine's other work skews every figure; the 1-minute load average says how much.
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "command": "fp4serve " + shlex.join(sys.argv[1:])
        if sys.argv and "bench" in sys.argv
        else "fp4serve bench serve",
    }
    summary = write_results(out, meta, levels)
    charts = write_charts(summary, out)
    (out / "report.md").write_text(markdown(summary, charts))
    for temperature in temperatures:
        at_t = [lv for lv in summary["levels"] if lv["temperature"] == temperature]
        print(f"\nT = {temperature:g}" + "\n".join(single_stream_section(at_t)))
    errors = sum(lv["errors"] for lv in summary["levels"])
    total = sum(lv["requests"] for lv in summary["levels"])
    print(f"\n{errors} of {total} requests failed. Report: {out / 'report.md'}")


def build_workloads(args, config, model_root: str | None, headers: dict):
    """(prompts by category, long-context prompts by tier, how tokens were counted)."""
    from fp4serve.bench.token_count import make_counter

    counter = None
    # open for as long as a counter may call the server's /tokenize
    client = httpx.Client(headers=headers)

    def get_counter():
        nonlocal counter
        if counter is None:
            counter = make_counter(client, config.root_url, config.model, args.tokenizer, model_root)
            print(f"counting prompt tokens with: {counter.method}", file=sys.stderr)
        return counter

    try:
        return _build_workloads(args, config, get_counter)
    finally:
        client.close()


def _build_workloads(args, config, get_counter):
    """build_workloads' body; get_counter() makes the token counter on first use."""
    from fp4serve.bench import workloads

    counter = None

    if args.workload == "categories":
        names = args.categories.split(",") if args.categories else list(workloads.CATEGORIES)
        workload = workloads.category_prompts([n.strip() for n in names if n.strip()])
    elif args.workload == "random":
        count = min(max(config.level_size(max(config.concurrency)), 16), 256)
        counter = get_counter()
        workload = {
            "random": workloads.random_prompts(
                counter, count, args.random_input_len, args.random_output_len, args.random_range_ratio, args.seed
            )
        }
    else:
        workload = workloads.read_jsonl(args.workload)
        if args.categories:
            wanted = [n.strip() for n in args.categories.split(",")]
            workload = {c: p for c, p in workload.items() if c in wanted}
            if not workload:
                raise BenchError(f"{args.workload} has none of the categories {wanted}")
    long_context = {}
    if args.long_context:
        questions = [p for prompts in workload.values() for p in prompts]
        for tier in args.long_context.split(","):
            tokens = workloads.parse_token_count(tier)
            count = args.long_context_prompts * len(config.temperatures)
            counter = get_counter()
            padded = workloads.long_context_prompts(counter, tokens, questions, count, args.seed)
            long_context[f"~{tier.strip()}"] = [prompt for prompt, _ in padded]
    return workload, long_context, counter.method if counter else "not needed (no padded prompts)"


def cmd_bench_compare(args) -> None:
    from fp4serve.bench.compare import compare, load_summary

    print(compare(load_summary(args.a), load_summary(args.b)), end="")


def cmd_bench_offline(args) -> None:
    from fp4serve.bench.offline import parse_range, print_table, run_offline, write_result
    from fp4serve.llm import LLM

    input_len, output_len = parse_range(args.input_len), parse_range(args.output_len)
    if args.num_prompts < 1:
        raise BenchError("--num-prompts must be at least 1")
    llm = LLM.from_config(engine_config(args))
    result = run_offline(llm, args.num_prompts, input_len, output_len, args.temperature, args.seed)
    print_table(result, llm.engine.model_path.name)
    if args.out:
        meta = {
            "model": str(llm.engine.model_path),
            "input_len": args.input_len,
            "output_len": args.output_len,
            "temperature": args.temperature,
            "seed": args.seed,
            "command": "fp4serve " + shlex.join(sys.argv[1:]),
        }
        write_result(result, meta, Path(args.out))
