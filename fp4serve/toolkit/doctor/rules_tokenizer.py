"""Tokenizer files and chat template.

T01 tokenizer_config.json written by transformers 5 in ways transformers 4.x (still pinned by many
vLLM images) rejects; T02 a chat template that fails on, or drops part of, a system + user +
assistant tool call + tool result conversation (rendered with transformers' own jinja2 renderer);
T03 no chat template."""

from __future__ import annotations

import json
from collections.abc import Iterator

from fp4serve.toolkit.doctor.findings import ERROR, WARNING, Context, Finding

TOOL_NAME = "get_weather"
TOOL_RESULT = "sunny, 21 C"
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_0", "type": "function",
     "function": {"name": TOOL_NAME, "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_0", "name": TOOL_NAME, "content": TOOL_RESULT},
]  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": TOOL_NAME, "description": "Current weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip


def _compat(config: dict) -> list[str]:
    """What transformers 4.x does with keys transformers 5 writes (docs/toolkit.md has the sources)."""
    problems = []
    if "backend" in config:
        problems.append('"backend" key (unknown to transformers 4.x; delete it)')
    if isinstance(config.get("extra_special_tokens"), list):
        problems.append(
            '"extra_special_tokens" is a list (transformers 4.x expects a dict and fails with '
            "\"'list' object has no attribute 'keys'\"; rename it to additional_special_tokens)"
        )
    if config.get("tokenizer_class") == "TokenizersBackend":
        problems.append(
            '"tokenizer_class": "TokenizersBackend" (transformers 4.x: "Tokenizer class TokenizersBackend does '
            'not exist"; set it to PreTrainedTokenizerFast)'
        )
    return problems


def chat_template(ctx: Context, config: dict | None) -> str | None:
    file = ctx.path / "chat_template.jinja"
    if file.is_file():
        return file.read_text()
    data = ctx.read_json("chat_template.json")
    if data and isinstance(data.get("chat_template"), str):
        return data["chat_template"]
    template = (config or {}).get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def check(ctx: Context) -> Iterator[Finding]:
    config = ctx.read_json("tokenizer_config.json")
    severity = ctx.severity(vllm=WARNING)
    if config is not None and severity:
        problems = _compat(config)
        if problems:
            yield Finding(severity, "T01", "tokenizer_config.json: " + "; ".join(problems),
                          "edit tokenizer_config.json as each item says (or serve with transformers >= 5)")  # fmt: skip
    if not (ctx.path / "tokenizer_config.json").exists() and not (ctx.path / "tokenizer.json").exists():
        return  # no tokenizer in the directory: --tokenizer points elsewhere
    template = chat_template(ctx, config)
    if template is None:
        yield Finding(WARNING, "T03", "no chat template (chat_template.jinja or tokenizer_config.json)",
                      "add the model's chat_template.jinja; /v1/chat/completions needs it")  # fmt: skip
        return
    from transformers.utils.chat_template_utils import render_jinja_template

    special = {k: v for k, v in (config or {}).items() if k.endswith("_token") and isinstance(v, str)}
    try:
        rendered = render_jinja_template(
            [json.loads(json.dumps(CONVERSATION))], tools=TOOLS, chat_template=template, add_generation_prompt=True,
            **special,
        )[0][0]  # fmt: skip
    except Exception as e:  # noqa: BLE001 - any failure of a user template is the finding
        yield Finding(ERROR, "T02", f"the chat template fails on a system + user + tool call + tool result conversation: "
                      f"{type(e).__name__}: {e}", "fix or replace chat_template.jinja")  # fmt: skip
        return
    dropped = [
        what for what, text in (("the tool call", TOOL_NAME), ("the tool result", TOOL_RESULT)) if text not in rendered
    ]
    if dropped:
        yield Finding(WARNING, "T02", f"the chat template renders a tool conversation without {' and '.join(dropped)}",
                      "use a template that renders assistant tool_calls and tool messages")  # fmt: skip
