"""`fp4serve chat`: a terminal chat over one engine, tokens printed as they are generated.

Lines starting with / are commands (/help lists them; // sends a message that starts with /);
`/image PATH` attaches an image to the next message (image-text models). Ctrl-C
during a reply stops that reply: the request is aborted between engine steps (a SIGINT handler sets
a flag, so no step is cut in half) and the partial reply stays in the conversation, marked. Ctrl-C
or Ctrl-D at the prompt quits."""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
from collections.abc import Callable

from fp4serve.errors import InvalidRequestError
from fp4serve.multimodal.image_processor import decode_image
from fp4serve.sampling_params import SamplingParams

COMMANDS = {
    "/help": "list these commands",
    "/image": "PATH: attach an image (PNG, JPEG, WebP) to the next message",
    "/reset": "start the conversation over",
    "/exit": "leave (also /quit, Ctrl-D, or Ctrl-C at the prompt)",
    "/quit": "leave",
}
INTERRUPTED = "[interrupted]"


class TerminalChat:
    def __init__(
        self,
        llm,
        params: SamplingParams,
        system: str | None = None,
        read: Callable[[str], str] | None = None,
        out=None,
        err=None,
    ):
        self.llm = llm
        self.engine = llm.engine
        self.params = params
        self.system = [{"role": "system", "content": system}] if system else []
        self.history = list(self.system)
        self.images = []  # every image of the conversation, in order (each turn's prompt sends them all)
        self.pending = []  # attached with /image, sent with the next message
        self.read = read or input
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def run(self) -> None:
        self.note("fp4serve chat: type a message; /help lists the commands, Ctrl-D quits.")
        while True:
            try:
                line = self.read("> ")
            except (EOFError, KeyboardInterrupt):
                self.note("")
                return
            text = line.strip()
            if not text:
                continue
            if text.startswith("/") and not text.startswith("//"):
                name, _, argument = text.partition(" ")
                if not self.command(name.lower(), argument.strip()):
                    return
                continue
            self.say(line[line.index("/") + 1 :] if text.startswith("//") else line)

    def command(self, name: str, argument: str = "") -> bool:
        """Run one /command; False to leave."""
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history = list(self.system)
            self.images, self.pending = [], []
            self.note("(conversation reset)")
        elif name == "/image":
            self.attach(argument)
        elif name == "/help":
            for command, meaning in COMMANDS.items():
                self.note(f"  {command:<7} {meaning}")
            self.note("  //text  send a message that starts with /")
        else:
            self.note(f"unknown command {name}; /help lists the commands (start with // to send it as a message)")
        return True

    def attach(self, path: str) -> None:
        preprocess = self.engine.images.preprocessor
        if preprocess is None:
            self.note(f"this model takes no images: {self.engine.images.reason}")
            return
        if not path:
            self.note("usage: /image PATH")
            return
        try:
            with open(path, "rb") as file:
                self.pending.append(preprocess(decode_image(file.read())))
        except (OSError, InvalidRequestError) as e:
            self.note(f"error: {path}: {e}")
            return
        self.note(f"(image {path} attached to the next message)")

    def say(self, message: str) -> None:
        """One user turn (with the images attached since the last one) and the model's reply."""
        content = [{"type": "image"} for _ in self.pending] + [{"type": "text", "text": message}]
        self.history.append({"role": "user", "content": content if self.pending else message})
        images = self.images + self.pending
        try:
            prompt = {"prompt_token_ids": self.llm.apply_chat_template(self.history)}
            if images:
                prompt["multi_modal_data"] = {"image": images}
            request_id = self.engine.add_request(prompt, dataclasses.replace(self.params))
        except InvalidRequestError as e:
            self.history.pop()
            self.note(f"error: {e}")
            return
        self.images, self.pending = images, []
        reply, marker = self.stream(request_id)
        self.out.write("\n")
        self.out.flush()
        if marker:
            self.note(marker)
        content = f"{reply} {INTERRUPTED}" if marker == INTERRUPTED else reply
        self.history.append({"role": "assistant", "content": content})

    def stream(self, request_id: str) -> tuple[str, str | None]:
        """Print the reply as it comes; returns its text and the marker that ends it, if any."""
        interrupted = threading.Event()
        handler_installed = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set()) if handler_installed else None
        reply = ""
        try:
            while not interrupted.is_set():
                for output in self.engine.step():
                    if output.request_id != request_id:
                        continue
                    reply += output.delta_text
                    self.out.write(output.delta_text)
                    self.out.flush()
                    if output.finished:
                        return reply, self.end_marker(output.outputs[0])
        except KeyboardInterrupt:  # Ctrl-C outside the engine step (no handler in this thread)
            pass
        finally:
            if handler_installed:
                signal.signal(signal.SIGINT, previous)
        self.engine.abort_request(request_id)
        return reply, INTERRUPTED

    def end_marker(self, completion) -> str | None:
        if completion.finish_reason == "length":
            if len(completion.token_ids) >= (self.params.max_tokens or float("inf")):
                return f"[stopped: --max-tokens {self.params.max_tokens} reached]"
            return (
                f"[stopped: the conversation fills --max-model-len {self.engine.max_model_len}; /reset to start over]"
            )
        if completion.finish_reason == "error":
            return "[stopped: the engine failed on this reply; the log has the cause]"
        return None

    def note(self, text: str) -> None:
        print(text, file=self.err, flush=True)
