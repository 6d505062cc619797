"""LLMEngine: the synchronous step loop. schedule -> run -> sample -> commit -> detokenize."""
from __future__ import annotations

import itertools
import logging
from pathlib import Path

import torch

from fp4serve.config import EngineConfig, ModelInfo
from fp4serve.engine.cache_setup import build_caches
from fp4serve.engine.decode_graphs import DecodeGraphs, graphs_unsupported, parse_sizes
from fp4serve.engine.detokenizer import IncrementalDetokenizer
from fp4serve.engine.memory import device_memory
from fp4serve.engine.request import Request, RequestStatus
from fp4serve.engine.runner import ModelRunner, StepOutput
from fp4serve.engine.scheduler import SchedulerPlan
from fp4serve.engine.stats import EngineStats, PhaseTimer
from fp4serve.errors import ConfigError, InvalidRequestError
from fp4serve.formats.checkpoint import resolve_quantization
from fp4serve.formats.kv_codec import resolve_kv_cache_format
from fp4serve.kernels.cpu_features import cpu_features
from fp4serve.kernels.triton_support import triton_reason
from fp4serve.max_model_len import check_max_model_len
from fp4serve.model_path import resolve_model_dir
from fp4serve.models.loader import load_model
from fp4serve.multimodal.encoder_cache import EncoderCache
from fp4serve.multimodal.support import ImageSupport
from fp4serve.outputs import CompletionOutput, RequestOutput
from fp4serve.sample.prompt_logprobs import record_prompt_logprobs
from fp4serve.sample.sampler import SamplingRow, sample
from fp4serve.sample.verify import verify
from fp4serve.sampling_params import SamplingParams, is_int
from fp4serve.spec_decode.acceptance_watch import AcceptanceWatch
from fp4serve.spec_decode.config import SpeculativeConfig, parse_speculative_config
from fp4serve.spec_decode.metrics import SpecDecodingLogger, SpecDecodingStats
from fp4serve.spec_decode.proposer import CommittedStep, Proposer, make_proposer
from fp4serve.tokenizer import NoTokenizer, eos_token_ids, load_tokenizer, read_generation_config, sampling_defaults
from fp4serve.vllm_compat import vllm_flag_notes

log = logging.getLogger(__name__)


def resolve_model_path(model: str | None, revision: str | None = None) -> Path:
    if model is None:
        from fp4serve.default_model import default_model_path

        return default_model_path()
    return resolve_model_dir(model, revision)


def describe_device(device: torch.device) -> str:
    """The device and the fast paths chosen for it, for the start log."""
    uses_triton, why = triton_reason(device)
    kernels = f"Triton kernels ({why})" if uses_triton else f"no Triton kernels ({why})"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"CUDA {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}); {kernels}"
    described = f"{cpu_features().describe()}; {torch.get_num_threads()} threads"
    return f"{described}; {kernels}" if uses_triton else described


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        phases = PhaseTimer()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)
        for note in vllm_flag_notes(config):
            log.info("%s", note)
        self.model_path = resolve_model_path(config.model, config.revision)
        # before the weights load, so a missing tokenizer fails fast
        tokenizer_path = (
            resolve_model_dir(config.tokenizer, config.tokenizer_revision, "--tokenizer")
            if config.tokenizer and not config.skip_tokenizer_init
            else self.model_path
        )
        self.info = ModelInfo.load(self.model_path)
        self.max_model_len = check_max_model_len(config.max_model_len, self.info.text_config)
        self.spec_config: SpeculativeConfig | None = parse_speculative_config(
            config.speculative_config, self.model_path, self.info.text_config
        )
        phases.done("config")
        self.device = config.torch_device()
        self.dtype, why = self.info.torch_dtype(config.dtype, self.device)
        log.info("%s; dtype %s (%s)", describe_device(self.device), str(self.dtype).removeprefix("torch."), why)
        self.quant = resolve_quantization(config.quantization, self.info.quant, self.model_path)
        # Read only when --gpu-memory-utilization sizes the cache, and before the weights take their share.
        sized_by_device = config.kv_cache_memory is None and config.gpu_memory_utilization is not None
        device_total = device_memory(self.device) if sized_by_device else None
        compute = "w4a16" if config.nvfp4_compute == "auto" else config.nvfp4_compute
        spec = self.spec_config
        mtp_drafting = spec is not None and spec.method == "mtp" and spec.model == self.model_path
        self.images = ImageSupport(self.info, self.model_path, config, spec.method if spec else None)
        self.model = load_model(
            self.info, self.dtype, self.device, self.quant, compute, config.nvfp4_lm_head, mtp_drafting,
            vision=self.images.enabled,
        )  # fmt: skip
        phases.done("weights")
        self.tokenizer = load_tokenizer(
            tokenizer_path, config.chat_template, config.skip_tokenizer_init, bool(config.tokenizer)
        )
        generation_config = read_generation_config(self.model_path)
        self.default_sampling = sampling_defaults(generation_config) if config.generation_config == "auto" else {}
        self.eos_token_ids = eos_token_ids(self.tokenizer, generation_config)
        phases.done("tokenizer")
        self.vocab_size = self.info.text_config.vocab_size
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(
                f"with chunked prefill disabled, --max-num-batched-tokens ({config.max_num_batched_tokens}) must be "
                f">= --max-model-len ({self.max_model_len}), or a long prompt could never be scheduled"
            )
        self.kv_format = resolve_kv_cache_format(config.kv_cache_dtype, self.dtype)
        calibrate_kv_scales = config.calculate_kv_scales and self.kv_format.quantized
        # Speculative decoding: counters and the acceptance watch, read by the server's /metrics and
        # LLM.get_metrics(); both None when drafting is off.
        self.spec_stats: SpecDecodingStats | None = None
        self.acceptance_watch: AcceptanceWatch | None = None
        self.proposer: Proposer | None = None
        if self.spec_config is not None:
            # before the caches: drafters have KV too
            self.proposer = make_proposer(self.spec_config, self.model, calibrate_kv_scales)
            self.spec_stats = SpecDecodingStats(self.spec_config.num_speculative_tokens)
            self.acceptance_watch = AcceptanceWatch(self.spec_config.method)
            self._spec_logger = SpecDecodingLogger(self.spec_stats)
            log.info("speculative decoding: %s", self.spec_config)
            phases.done("drafter")
        graph_sizes = parse_sizes(config.cuda_graph_sizes, config.max_num_seqs)  # checked on every device
        no_graphs = "--enforce-eager" if config.enforce_eager else graphs_unsupported(self.model, self.device)
        caches = build_caches(
            config, self.model, self.proposer, self.spec_config.num_speculative_tokens if self.spec_config else 0,
            self.kv_format, self.info, self.device, self.dtype,
            self.max_model_len, self.eos_token_ids, device_total, padding_state_slot=no_graphs is None,
        )  # fmt: skip
        self.capacity, self.block_pool, self.scheduler = caches.capacity, caches.block_pool, caches.scheduler
        self.kv_cache_memory, self.max_model_len = caches.kv_cache_memory, caches.max_model_len
        phases.done("caches")
        capture_layers = self.proposer.capture_layers if self.proposer else ()
        encoder_cache = EncoderCache(self.model.encode_images) if self.images.enabled else None
        graphs = None
        if no_graphs is None:
            max_blocks = -(-(self.max_model_len + 2 * config.block_size) // config.block_size)
            graphs = DecodeGraphs(
                self.model, self.device, graph_sizes, max_blocks, config.block_size, caches.padding_state_slot
            )
            graphs.capture()
            phases.done("graphs")
        elif self.device.type == "cuda":
            log.info("decode graphs: off (%s)", no_graphs)
        self.runner = ModelRunner(
            self.model, config.block_size, self.device, capture_layers, calibrate_kv_scales, encoder_cache, graphs
        )
        log.info("engine start-up: %s", phases)
        self.requests: dict[str, Request] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.prompts: dict[str, str | None] = {}
        self._ids = itertools.count()
        self.stats = EngineStats()  # counters and latencies for /metrics

    # ---- requests ---------------------------------------------------------------------------
    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams.from_defaults(self.default_sampling)

    def tokenize(self, prompt: str | dict | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer(prompt).input_ids
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            token_ids = prompt["prompt_token_ids"]
            if not isinstance(token_ids, list | tuple):
                raise InvalidRequestError("prompt_token_ids must be a list of token ids", "prompt_token_ids")
            return prompt.get("prompt"), list(token_ids)
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self.tokenize(prompt["prompt"])
        if isinstance(prompt, list):
            return None, list(prompt)  # the entries are checked with every other prompt's
        raise InvalidRequestError("a prompt is a string, a list of token ids, or {'prompt_token_ids': [...]}", "prompt")

    def add_request(
        self, prompt: str | dict | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        text, token_ids = self.tokenize(prompt)
        mm = None
        if isinstance(prompt, dict) and prompt.get("multi_modal_data"):
            token_ids, mm = self.images.place(token_ids, prompt["multi_modal_data"])
        params = params or self.default_sampling_params()
        params.validate()
        if params.n != 1:
            raise InvalidRequestError(f"an engine request is one sequence, got n={params.n}: add one request per "
                                      "SamplingParams.child(i) (LLM.generate and the server do)", "n")  # fmt: skip
        if params.stop and isinstance(self.tokenizer, NoTokenizer):
            raise InvalidRequestError(f"stop strings need a tokenizer, and this server has none ({self.tokenizer.why})")
        self._check_prompt(token_ids)
        self._check_token_ids("stop_token_ids", params.stop_token_ids)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        request = Request(request_id, token_ids, params, self.max_model_len, generator, mm=mm)
        if mm is not None:
            request.block_extra_keys = mm.block_keys(self.config.block_size)
        self.requests[request_id] = request
        self.detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, token_ids, params)
        self.prompts[request_id] = text
        self.scheduler.add(request)
        self.stats.request_added(request_id)
        return request_id

    def _check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(token_ids)} tokens; max_model_len is {self.max_model_len}, "
                f"which must leave room for at least one generated token",
                "prompt",
            )
        self._check_token_ids("prompt", token_ids, "prompt token ids")

    def _check_token_ids(self, param: str, token_ids: list, what: str | None = None) -> None:
        """Every id an int (not a bool) inside the vocabulary, or an InvalidRequestError naming `param`."""
        not_ints = [t for t in token_ids if not is_int(t)]
        if not_ints:
            raise InvalidRequestError(f"{param} must be integers, got {not_ints[:10]!r}", param)
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            message = f"{what or param} out of the vocabulary [0, {self.vocab_size}): {bad[:10]}"
            raise InvalidRequestError(message, param)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.scheduler.abort(request_id)
        if request is None:
            return None
        output = self._finish_output(request, "", [], None)
        self.stats.record([output])
        return output

    def fail_request(self, request_id: str) -> RequestOutput | None:
        """End a live request as failed (finish reason "error"), e.g. after a step raised past its
        own guards; None if the request is not live."""
        request = self.requests.get(request_id)
        if request is None or request.status.finished:
            return None
        output = self._fail(request)
        self.stats.record([output])
        return output

    def _fail(self, request: Request) -> RequestOutput:
        """End a request the engine failed to process: its resources go back to the pools, and its
        last output carries finish reason "error" and no new tokens. Built from plain fields only,
        since the request's detokenizer or logprobs may be what failed."""
        self.scheduler.fail(request)
        detok = self.detokenizers.pop(request.request_id, None)
        completion = CompletionOutput(
            index=0, text=detok.output_text if detok else "", token_ids=list(request.output_token_ids),
            cumulative_logprob=None, logprobs=None, finish_reason=request.finish_reason, stop_reason=None,
        )  # fmt: skip
        self.requests.pop(request.request_id, None)
        return RequestOutput(
            request_id=request.request_id, prompt=self.prompts.pop(request.request_id, None),
            prompt_token_ids=request.prompt_token_ids, outputs=[completion], finished=True,
            num_cached_tokens=request.num_cached_tokens, delta_text="", delta_token_ids=[], delta_logprobs=None,
        )  # fmt: skip

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step ---------------------------------------------------------------------------
    # One request never hurts another: an exception in a request's own part of the step (its
    # logits processors, sampling or verification, commit and stop checks, detokenizing, drafting)
    # fails that request alone, with finish reason "error", and the others go on untouched. A
    # failure in a part every request shares (the model forward) fails the step's requests. Either
    # way a failed request's blocks and state slot go back to the pools, so the engine serves on.
    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        outputs: list[RequestOutput] = []  # filled as the step goes, so a failure keeps what is done
        try:
            self._run_step(plan, outputs)
        except Exception:
            unfinished = [item.request for item in plan.scheduled if item.request.request_id in self.requests]
            log.exception("engine step failed in a part its requests share; failing %s",
                          ", ".join(r.request_id for r in unfinished))  # fmt: skip
            outputs += [self._fail(request) for request in unfinished]
        self.stats.record(outputs)
        return outputs

    def _run_step(self, plan: SchedulerPlan, outputs: list[RequestOutput]) -> None:
        step = self.runner.execute(plan)
        guarded = lambda request, stage, fn, *args: self._guarded(request, stage, outputs, fn, *args)
        record_prompt_logprobs(plan, step, self.model.compute_logits, self.vocab_size, guarded)
        requests = [plan.scheduled[i].request for i in step.sample_rows]
        rows = [
            SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, r.generator, self.eos_token_ids)
            for r in requests
        ]
        drafts = [plan.scheduled[i].draft_token_ids for i in step.sample_rows] if self.proposer else None
        token_lists, logprob_lists = self._draw_tokens_isolating(step.logits, requests, rows, drafts)
        new_tokens: list[list[int]] = [[] for _ in plan.scheduled]
        num_accepted = [0] * len(plan.scheduled)
        for n, (i, request, tokens) in enumerate(zip(step.sample_rows, requests, token_lists)):
            if tokens is None:
                outputs.append(self._fail(request))
                continue
            new_tokens[i] = tokens
            if drafts is not None:
                num_accepted[i] = len(tokens) - 1
                self.spec_stats.observe(len(drafts[n]), num_accepted[i])
                self.acceptance_watch.observe(request.request_id, len(drafts[n]), num_accepted[i],
                                              len(request.prompt_token_ids), request.params.greedy)  # fmt: skip
        if drafts is not None:
            self.runner.keep_accepted_state(step, num_accepted)
        before = {r.request_id: len(r.output_token_ids) for r in requests}
        for item, tokens in zip(plan.scheduled, new_tokens):
            if not item.request.status.finished:  # finished here: failed while drawing its tokens
                self._guarded(item.request, "commit", outputs, self.scheduler.commit_one, item, tokens)
        self.runner.save_snapshots(plan, step, self.scheduler.take_snapshot_jobs())
        for request, logprobs in zip(requests, logprob_lists):
            if request.status is RequestStatus.FINISHED_ERROR:
                continue
            added = request.output_token_ids[before[request.request_id] :]
            logprobs = logprobs[: len(added)] if logprobs is not None else None
            output = self._guarded(request, "detokenizing", outputs, self._emit, request, added, logprobs)
            if output is not None:
                outputs.append(output)
        if self.proposer is not None:
            self._propose(plan, step, num_accepted, outputs)
            self._spec_logger.maybe_log()

    def _guarded(self, request: Request, stage: str, outputs: list[RequestOutput], fn, *args):
        """fn(*args), or, should it raise, None, with the request failed and its output in `outputs`."""
        try:
            return fn(*args)
        except Exception:
            log.exception("request %s failed in %s; only it is ended", request.request_id, stage)
            outputs.append(self._fail(request))
            return None

    def _draw_tokens_isolating(self, logits: torch.Tensor, requests: list[Request], rows: list[SamplingRow],
                               drafts: list[list[int]] | None) -> tuple[list, list]:  # fmt: skip
        """_draw_tokens for the whole batch. Should it raise, once more one request at a time, so
        that only the requests whose own rows raise fail (their tokens are None). Rows are processed
        independently, so the others' greedy tokens are the batch's; a random row redraws (seeded
        rows from their own generators, which a failure before the draw has not advanced)."""
        try:
            return self._draw_tokens(logits, rows, drafts)
        except Exception:
            log.warning("sampling the batch failed; sampling its %d requests one by one", len(requests), exc_info=True)
        token_lists, logprob_lists = [], []
        start = 0
        for i, request in enumerate(requests):
            end = start + 1 + (len(drafts[i]) if drafts is not None else 0)  # the request's logits rows
            one_draft = drafts[i : i + 1] if drafts is not None else None
            try:
                tokens, logprobs = self._draw_tokens(logits[start:end], rows[i : i + 1], one_draft)
                token_lists.append(tokens[0])
                logprob_lists.append(logprobs[0])
            except Exception:
                log.exception("request %s failed in sampling; only it is ended", request.request_id)
                token_lists.append(None)
                logprob_lists.append(None)
            start = end
        return token_lists, logprob_lists

    @staticmethod
    def _draw_tokens(
        logits: torch.Tensor, rows: list[SamplingRow], drafts: list[list[int]] | None
    ) -> tuple[list, list]:
        """Per row: its new tokens (sampled; or its accepted drafts then one target token) and
        their logprobs (None where not asked)."""
        if drafts is None:
            sampled = sample(logits, rows)
            return [[t] for t in sampled.token_ids], [[lp] if lp is not None else None for lp in sampled.logprobs]
        verified = verify(logits, rows, drafts)
        return verified.token_ids, verified.logprobs

    def _propose(
        self, plan: SchedulerPlan, step: StepOutput, num_accepted: list[int], outputs: list[RequestOutput]
    ) -> None:
        """Draft tokens for every running request whose next step is a decode (all its tokens but
        the last computed), at most as many as its remaining length allows. Model drafters also
        read the committed rows of the step to keep their own caches."""
        requests, limits = [], []
        for item in plan.scheduled:
            request = item.request
            if request.status is not RequestStatus.RUNNING or request.num_computed_tokens != request.num_tokens - 1:
                continue
            limit = min(self.spec_config.num_speculative_tokens, request.max_total_tokens - request.num_tokens - 1)
            if request.params.max_tokens is not None:
                limit = min(limit, request.params.max_tokens - len(request.output_token_ids) - 1)
            requests.append(request)
            limits.append(max(limit, 0))
        # Rows whose tokens are now committed (a prefill chunk's, or a verified request's last token
        # and accepted drafts), also of requests that finished this step: their blocks, released
        # but not reused before the next schedule, may be hashed, and a prefix hit reads the
        # drafter's cache there too. Rows past a stop string's truncation are not committed.
        rows = []
        for i, item in enumerate(plan.scheduled):
            request = item.request
            if request.status in (RequestStatus.FINISHED_ERROR, RequestStatus.FINISHED_ABORTED):
                continue
            start = step.batch.num_computed[i]
            n = min(item.num_tokens - item.num_drafts + num_accepted[i], request.num_tokens - 1 - start)
            if n > 0:
                rows.append((request, i, n))
        committed = CommittedStep(step.batch, step.hidden, step.captures, rows)
        try:
            drafts = self.proposer.propose(requests, limits, committed, self.scheduler.reserve)
        except Exception:
            log.warning("drafting for the batch failed; drafting for its %d requests one by one", len(rows),
                        exc_info=True)  # fmt: skip
            drafts = self._propose_one_by_one(requests, limits, committed, outputs)
        for request, draft in zip(requests, drafts):
            request.draft_token_ids = draft

    def _propose_one_by_one(self, requests: list[Request], limits: list[int], committed: CommittedStep,
                            outputs: list[RequestOutput]) -> list[list[int]]:  # fmt: skip
        """propose() for each committed request on its own, failing the ones it raises for. Drafts
        never change a verified output, only how many steps it takes."""
        limit_of = {id(r): k for r, k in zip(requests, limits)}
        drafts_of = {}
        for row in committed.rows:
            request = row[0]
            asked = [request] if id(request) in limit_of else []
            alone = CommittedStep(committed.batch, committed.hidden, committed.captures, [row])
            drafts = self._guarded(request, "drafting", outputs, self.proposer.propose,
                                   asked, [limit_of[id(r)] for r in asked], alone, self.scheduler.reserve)  # fmt: skip
            drafts_of[id(request)] = drafts[0] if drafts and asked else []
        return [drafts_of[id(r)] for r in requests]

    def _emit(self, request: Request, added: list[int], logprobs) -> RequestOutput:
        detok = self.detokenizers[request.request_id]
        stopped_by_token = request.status is RequestStatus.FINISHED_STOPPED
        # A stop token's own text is not part of the answer (vLLM does the same).
        text_tokens = added[:-1] if stopped_by_token and not request.params.include_stop_str_in_output else added
        delta = ""
        for n, token in enumerate(text_tokens):  # one at a time: a stop string ends the output at its token
            delta += detok.add_tokens([token])
            if detok.stopped and n + 1 < len(added):
                del request.output_token_ids[n + 1 - len(added) :]
                added = added[: n + 1]
                logprobs = logprobs[: n + 1] if logprobs is not None else None
                break
        if detok.stopped and not request.status.finished:
            request.stop_reason = detok.stop_reason
            self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)
        if request.status.finished and not detok.stopped:
            delta += detok.flush()
        if request.status.finished:
            return self._finish_output(request, delta, added, logprobs)
        return self._output(request, delta, added, logprobs)

    def _output(self, request: Request, delta: str, added: list[int], logprobs) -> RequestOutput:
        detok = self.detokenizers[request.request_id]
        all_logprobs = request.logprobs
        if all_logprobs is not None and logprobs:
            all_logprobs += logprobs
        completion = CompletionOutput(
            index=0,
            text=detok.output_text,
            token_ids=list(request.output_token_ids),
            cumulative_logprob=sum(lp.logprob for lp in all_logprobs) if all_logprobs else None,
            logprobs=list(all_logprobs) if all_logprobs is not None else None,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
        )
        return RequestOutput(
            request_id=request.request_id,
            prompt=self.prompts[request.request_id],
            prompt_token_ids=request.prompt_token_ids,
            outputs=[completion],
            finished=request.status.finished,
            num_cached_tokens=request.num_cached_tokens,
            delta_text=delta,
            delta_token_ids=added,
            delta_logprobs=logprobs,
            prompt_logprobs=request.prompt_logprobs,
        )

    def _finish_output(self, request: Request, delta: str, added: list[int], logprobs) -> RequestOutput:
        output = self._output(request, delta, added, logprobs)
        del self.requests[request.request_id], self.detokenizers[request.request_id], self.prompts[request.request_id]
        return output
