"""fp4serve command line: serve | generate | chat | bench | convert-gguf | graft-mtp | strip-vision | rename-tensors |
doctor | quantize | eval. Engine flags keep vLLM's names."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from fp4serve.bench.cli import add_bench_parser
from fp4serve.engine_args import add_engine_args, engine_config
from fp4serve.errors import Fp4ServeError
from fp4serve.quantize.cli import add_quantize_parsers
from fp4serve.toolkit.cli import add_toolkit_parsers


def sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None, help="default: the model's generation config")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed-request", type=int, default=None, dest="request_seed", help="per-request sampling seed")


def sampling_params(engine, args):
    from fp4serve.sampling_params import SamplingParams

    return SamplingParams.from_defaults(
        engine.default_sampling,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.request_seed,
    )


def cmd_serve(args) -> None:
    from fp4serve.server.app import run_server
    from fp4serve.server.options import ServerOptions

    options = ServerOptions(
        reasoning_parser=args.reasoning_parser,
        tool_call_parser=args.tool_call_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        max_queue=args.max_queue,
        max_request_body_size=args.max_request_body_size,
        enable_tokenizer_info_endpoint=args.enable_tokenizer_info_endpoint,
        allowed_media_domains=tuple(args.allowed_media_domains or ()),
    )
    api_key = args.api_key or os.environ.get("FP4SERVE_API_KEY") or None
    run_server(
        engine_config(args),
        host=args.host,
        port=args.port,
        api_key=api_key,
        served_model_names=args.served_model_name,
        options=options,
        started=args.started,
    )


def add_server_args(p: argparse.ArgumentParser) -> None:
    """`serve` flags that are not engine flags (vLLM's names where vLLM has them)."""
    from fp4serve.server.options import DEFAULT_MAX_REQUEST_BODY_SIZE

    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: env FP4SERVE_API_KEY)"
    )
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="names clients may use; the first is the canonical one (default: the model argument)",
    )
    # No argparse `choices`: ServerOptions refuses an unknown parser naming the ones fp4serve has.
    p.add_argument("--reasoning-parser", default=None, help="qwen3: move <think>...</think> text to reasoning_content")
    p.add_argument(
        "--tool-call-parser",
        default=None,
        help="the model's tool-call format: hermes, qwen3_coder or qwen3_xml",
    )
    p.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='return the model\'s tool calls as tool_calls for tool_choice "auto" (needs --tool-call-parser)',
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="waiting requests beyond which new requests get 503 with Retry-After (default: no limit)",
    )
    p.add_argument(
        "--max-request-body-size",
        default=str(DEFAULT_MAX_REQUEST_BODY_SIZE),
        help="largest request body, e.g. 16MiB; larger ones get 413",
    )
    p.add_argument(
        "--enable-tokenizer-info-endpoint",
        action="store_true",
        help="serve GET /tokenizer_info (the tokenizer's settings and chat template; off by default, as in vLLM)",
    )
    p.add_argument(
        "--allowed-media-domains",
        nargs="+",
        default=None,
        help="hosts whose http(s) image URLs the server fetches (default: none; data: URLs always work)",
    )
    # vLLM flags whose request fp4serve always fulfils: accepted, and listed in docs/serving.md.
    p.add_argument("--disable-log-requests", action="store_true", help="accepted: fp4serve does not log requests")
    p.add_argument("--disable-log-stats", action="store_true", help="accepted: statistics are only on /metrics")
    for flags, advice in UNSUPPORTED_VLLM_FLAGS.items():
        p.add_argument(
            *flags, nargs="?", action=UnsupportedFlag, advice=advice, default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )


# vLLM flags that users type and fp4serve does not support (yet): refused with a message, never
# silently ignored. docs/serving.md lists them. The vLLM flags fp4serve accepts are engine flags
# (config.py) or server flags (add_server_args).
UNSUPPORTED_VLLM_FLAGS = {
    ("--pipeline-parallel-size", "-pp"): "fp4serve runs one model on one device",
    ("--data-parallel-size", "-dp"): "run several fp4serve servers behind a load balancer instead",
    ("--enable-expert-parallel",): "fp4serve runs one model on one device",
    ("--kv-cache-memory-bytes",): "use --kv-cache-memory (e.g. 8GiB)",
    ("--cpu-offload-gb",): "weights are not offloaded",
    ("--swap-space",): "preempted requests are recomputed, never swapped",
    ("--enable-lora", "--lora-modules"): "LoRA adapters are not supported",
    ("--structured-outputs-config", "--guided-decoding-backend"): "constrained decoding is not supported",
    ("--mm-processor-kwargs",): "images are preprocessed as the checkpoint's preprocessor_config.json says",
    ("--load-format",): "fp4serve loads safetensors directories",
    ("--download-dir",): "fp4serve downloads nothing: it reads local directories and the Hugging Face cache",
    ("--tokenizer-mode",): "transformers' tokenizer is always used",
    ("--rope-scaling", "--hf-overrides"): "edit the model's config.json instead",
    ("--compilation-config", "-O"): "fp4serve does not compile the model",
    ("--ssl-keyfile", "--ssl-certfile"): "put a TLS-terminating proxy in front of fp4serve",
    ("--allowed-origins",): "CORS is not configurable; use a proxy",
    ("--root-path",): "serve behind a proxy that strips the prefix",
    ("--max-logprobs",): "the limit is fixed at 20",
    ("--return-tokens-as-token-ids",): "tokens are returned as text",
    ("--uvicorn-log-level",): "use --log-level",
    ("--speculative-model", "--num-speculative-tokens"): "use --speculative-config JSON",
}
# Where UnsupportedFlag collects its refusals, for FlagParser to report them all at once.
_REFUSED = "_refused_flags"


class UnsupportedFlag(argparse.Action):
    def __init__(self, option_strings, dest, advice: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.advice = advice

    def __call__(self, parser, namespace, values, option_string=None):
        refusal = f"{option_string}: fp4serve does not support this vLLM flag yet ({self.advice})"
        setattr(namespace, _REFUSED, [*getattr(namespace, _REFUSED, []), refusal])


class FlagParser(argparse.ArgumentParser):
    """Reports every flag it cannot take in one message, each with its reason, and exits 2: a
    `vllm serve` line then shows all its changes at once, not one argparse error per try."""

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        refused = getattr(namespace, _REFUSED, [])
        unknown = [arg.split("=", 1)[0] for arg in extras if arg.startswith("-")]
        refused += [f"{flag}: fp4serve does not support vLLM's {flag} (unknown flag; see --help)" for flag in unknown]
        # A word after an unknown flag is that flag's value; words alone are stray arguments.
        if not refused and extras:
            refused = [f"unexpected argument {arg!r}" for arg in extras]
        if refused:
            command = " ".join(filter(None, [self.prog, getattr(namespace, "command", None)]))
            self.exit(2, f"{command}: error: cannot start with these flags:\n  " + "\n  ".join(refused) + "\n")
        return namespace


def cmd_generate(args) -> None:
    from fp4serve.llm import LLM

    llm = LLM.from_config(engine_config(args))
    params = sampling_params(llm.engine, args)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    outputs = (
        llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        if args.chat
        else llm.generate(prompts, params)
    )
    for output in outputs:
        print(output.outputs[0].text)


def cmd_chat(args) -> None:
    """Interactive terminal chat (fp4serve/chat_cli.py)."""
    from fp4serve.chat_cli import TerminalChat
    from fp4serve.llm import LLM

    llm = LLM.from_config(engine_config(args))
    TerminalChat(llm, sampling_params(llm.engine, args), args.system).run()


def cmd_convert_gguf(args) -> None:
    from fp4serve.formats.gguf import convert_gguf

    out = convert_gguf(args.gguf_file, args.out_dir)
    print(out)


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="fp4serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server", parents=[common])
    add_engine_args(serve)
    add_server_args(serve)
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="complete prompts given as arguments or lines on stdin", parents=[common])
    add_engine_args(gen)
    sampling_args(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable); default: read lines from stdin")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat in the terminal", parents=[common])
    add_engine_args(chat)
    sampling_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(func=cmd_chat)

    add_bench_parser(sub, common)

    conv = sub.add_parser(
        "convert-gguf", help="convert a GGUF file into a Hugging Face model directory", parents=[common]
    )
    conv.add_argument("gguf_file")
    conv.add_argument("out_dir")
    conv.set_defaults(func=cmd_convert_gguf)

    add_toolkit_parsers(sub, common)
    add_quantize_parsers(sub, common)
    return parser


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    args.started = started
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except Fp4ServeError as e:
        print(f"fp4serve: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
