"""The offline API, shaped like vLLM's: LLM(model, **engine_args).generate(...) / .chat(...)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from fp4serve.config import EngineConfig
from fp4serve.engine.engine import LLMEngine
from fp4serve.errors import InvalidRequestError
from fp4serve.outputs import RequestOutput
from fp4serve.sampling_params import SamplingParams
from fp4serve.spec_decode.metrics import spec_decode_metrics
from fp4serve.tokenizer import chat_prompt_ids


class LLM:
    def __init__(self, model: str | None = None, **engine_args):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_args))

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(config)
        return llm

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_metrics(self) -> list:
        """vLLM's offline metrics call. Holds the speculative-decoding counters when drafting is on,
        in vLLM's shapes and names (metric_names.SPEC_DECODE_*): a Counter each for drafts, draft
        tokens and accepted tokens, a Vector of accepted tokens per position; then fp4serve's recent
        and running acceptance rates, a Gauge each labelled {"method": ...}."""
        engine = self.engine
        return spec_decode_metrics(engine.spec_stats, engine.acceptance_watch) if engine.spec_stats is not None else []

    def get_default_sampling_params(self) -> SamplingParams:
        return self.engine.default_sampling_params()

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """prompts: a string, {"prompt_token_ids": [...]}, or a list of those. Outputs keep the
        order of the prompts."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or self.get_default_sampling_params()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(sampling_params)} sampling params")
        groups: list[list[str]] = []  # per prompt, its n engine requests (vLLM V1's parallel sampling)
        try:
            for prompt, params in zip(prompts, sampling_params):
                params.validate()  # n among the rest, before it says how many children to add
                groups.append([])
                for j in range(params.n):
                    groups[-1].append(self.engine.add_request(prompt, params.child(j) if params.n > 1 else params))
        except Exception:
            for request_id in (i for group in groups for i in group):  # a bad prompt fails the whole call
                self.engine.abort_request(request_id)
            raise
        ids = [request_id for group in groups for request_id in group]
        final = dict(zip(ids, self._run(ids, use_tqdm)))
        return [_merge_choices([final[i] for i in group]) for group in groups]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template_kwargs: dict | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or several (a list of lists)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            {"prompt_token_ids": ids, "prompt": None}
            for ids in (self.apply_chat_template(c, chat_template_kwargs, add_generation_prompt, tools) for c in conversations)
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, messages, chat_template_kwargs=None, add_generation_prompt=True, tools=None) -> list[int]:
        return chat_prompt_ids(self.engine.tokenizer, messages, add_generation_prompt, chat_template_kwargs, tools)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(request_ids), desc="generate", unit="req")
        while len(final) < len(request_ids):
            for output in self.engine.step():
                if output.finished:
                    final[output.request_id] = output
                    if progress:
                        progress.update(1)
        if progress:
            progress.close()
        return [final[i] for i in request_ids]


def _merge_choices(children: list[RequestOutput]) -> RequestOutput:
    """One RequestOutput whose outputs are the children's, output i from child i (vLLM's shape for n > 1)."""
    if len(children) == 1:
        return children[0]
    outputs = [replace(child.outputs[0], index=j) for j, child in enumerate(children)]
    return replace(children[0], outputs=outputs, finished=all(c.finished for c in children))
