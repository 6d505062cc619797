"""One request never hurts another: chaos on the engine's per-request stages.

Random requests of a loaded engine (more requests than --max-num-seqs, greedy, so every output is
known from a clean run) get an exception injected at a random output length into one stage of
their own: a logits processor, the sampler or verifier, the stop checks, the detokenizer, or the
drafter. Each of them must end alone with finish reason "error"; every other request must give
exactly its clean output; nothing may leak (KV blocks, GDN state slots, the engine's request
tables); and the engine must serve the next requests. Targets: the hybrid Qwen3.5 model (GDN state
slots) plain, with n-gram drafting and with its MTP head (a model drafter with its own KV).
"""
from __future__ import annotations

import asyncio
import random

import pytest
from prometheus_client.parser import text_string_to_metric_families
from spec_checkpoints import make_mtp_target

import fp4serve.engine.engine as engine_module
from fp4serve import LLM, SamplingParams
from fp4serve import metric_names as names
from fp4serve.engine.async_engine import AsyncEngine, RequestFailedError
from fp4serve.server.metrics import metrics_registry, render

NUM_REQUESTS = 16
MAX_TOKENS = 12
SETTINGS = {"dtype": "float32", "max_model_len": 128, "max_num_batched_tokens": 64, "max_num_seqs": 6, "block_size": 16}
SPEC = {
    "plain": None,
    "ngram": {"method": "ngram", "num_speculative_tokens": 3},
    "mtp": {"method": "mtp", "num_speculative_tokens": 2},
}
STAGES = ("logits_processor", "sampler", "stop_check", "detokenizer", "proposer")


class InjectedFault(RuntimeError):
    """The exception planted into a request's stage."""


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = tmp_path_factory.mktemp("isolation") / "target"
    make_mtp_target(path)
    return path


@pytest.fixture(scope="module")
def clean(target) -> tuple[list[list[int]], dict[str, list[int]]]:
    """The prompts, and request id -> its output token ids in a run without faults. Greedy
    drafting is lossless, so these are every method's outputs too."""
    prompts = make_prompts(random.Random("chaos"))
    outputs = run(LLM(str(target), **SETTINGS).engine, prompts, [greedy() for _ in prompts])
    assert all(o.outputs[0].finish_reason == "length" for o in outputs.values())
    return prompts, {rid: o.outputs[0].token_ids for rid, o in outputs.items()}


def make_prompts(rng: random.Random) -> list[list[int]]:
    """Mixed lengths, with repeated runs so that n-gram lookup drafts something."""
    prompts = []
    for _ in range(NUM_REQUESTS):
        run = [rng.randrange(3, 500) for _ in range(rng.randrange(2, 6))]
        prompts.append(run * rng.randrange(1, 5) + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 30))])
    return prompts


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def run(engine, prompts: list[list[int]], params: list[SamplingParams], on_added=None) -> dict[str, object]:
    """Drive the engine until every request finished; request id -> its final output."""
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(prompt, p, f"r{i}")
        if on_added:
            on_added(f"r{i}")
    final = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                assert output.request_id not in final, "a request finished twice"
                final[output.request_id] = output
    return final


class Chaos:
    """Which request fails in which stage, from which output length on; and the stages wired to fail."""

    def __init__(self, engine, faults: dict[str, tuple[str, int]]):
        self.engine, self.faults = engine, faults
        self.request_of_params: dict[int, str] = {}

    def fires(self, request_id: str, stage: str) -> bool:
        fault = self.faults.get(request_id)
        request = self.engine.requests.get(request_id)
        if fault is None or fault[0] != stage or request is None:
            return False
        return len(request.output_token_ids) >= fault[1]

    def raise_if(self, request_id: str, stage: str) -> None:
        if self.fires(request_id, stage):
            raise InjectedFault(f"{stage} of {request_id}")

    def params_for(self, request_id: str) -> SamplingParams:
        params = greedy()
        if self.faults.get(request_id, ("",))[0] == "logits_processor":
            params.logits_processors = [lambda output_ids, logits: self.raise_if(request_id, "logits_processor")]
        self.request_of_params[id(params)] = request_id
        return params

    def wire(self, monkeypatch) -> None:
        engine = self.engine

        def failing(batched):
            def stage(logits, rows, *args):
                for row in rows:
                    self.raise_if(self.request_of_params[id(row.params)], "sampler")
                return batched(logits, rows, *args)

            return stage

        monkeypatch.setattr(engine_module, "sample", failing(engine_module.sample))
        monkeypatch.setattr(engine_module, "verify", failing(engine_module.verify))
        check_stop = engine.scheduler._check_stop

        def failing_check_stop(request, token):
            self.raise_if(request.request_id, "stop_check")
            return check_stop(request, token)

        monkeypatch.setattr(engine.scheduler, "_check_stop", failing_check_stop)
        if engine.proposer is not None:
            propose = engine.proposer.propose

            def failing_propose(requests, limits, committed, reserve):
                for request, *_ in committed.rows:
                    self.raise_if(request.request_id, "proposer")
                return propose(requests, limits, committed, reserve)

            monkeypatch.setattr(engine.proposer, "propose", failing_propose)

    def wire_detokenizer(self, request_id: str) -> None:
        detok = self.engine.detokenizers[request_id]
        add_tokens = detok.add_tokens

        def failing_add_tokens(token_ids):
            self.raise_if(request_id, "detokenizer")
            return add_tokens(token_ids)

        detok.add_tokens = failing_add_tokens


def error_count_on_metrics(engine) -> float:
    """vllm:request_success_total{finished_reason="error"} as /metrics shows it."""
    text = render(metrics_registry(engine, "m")).decode()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    name = names.exposed_counter(names.REQUEST_SUCCESS)
    return next(s.value for s in samples if s.name == name and s.labels["finished_reason"] == "error")


def assert_idle(engine, free_blocks: int) -> None:
    """Nothing held: every block and state slot back in its pool, no request left anywhere."""
    scheduler = engine.scheduler
    assert engine.block_pool.num_free == free_blocks
    assert sorted(scheduler.free_slots) == list(range(engine.capacity.num_state_slots))
    assert not (scheduler.running or scheduler.waiting)
    assert not (engine.requests or engine.detokenizers or engine.prompts)


@pytest.mark.parametrize("method", list(SPEC))
def test_a_failing_request_fails_alone(target, clean, method, monkeypatch):
    prompts, expected = clean
    rng = random.Random(f"chaos-{method}")
    engine = LLM(str(target), **SETTINGS, speculative_config=SPEC[method]).engine
    free_blocks = engine.block_pool.num_free
    stages = STAGES if engine.proposer is not None else STAGES[:-1]
    victims = rng.sample(sorted(expected), 6)
    faults = {rid: (stages[n % len(stages)], rng.randrange(0, MAX_TOKENS)) for n, rid in enumerate(victims)}
    chaos = Chaos(engine, faults)
    with monkeypatch.context() as patches:
        chaos.wire(patches)
        on_added = lambda rid: chaos.wire_detokenizer(rid) if faults.get(rid, ("",))[0] == "detokenizer" else None
        params = [chaos.params_for(f"r{i}") for i in range(len(prompts))]
        outputs = run(engine, prompts, params, on_added)

    assert sorted(outputs) == sorted(expected)
    for rid, output in outputs.items():
        completion = output.outputs[0]
        if rid in faults:
            assert completion.finish_reason == "error", (rid, faults[rid])
            assert completion.token_ids == expected[rid][: len(completion.token_ids)]
        else:
            assert (completion.finish_reason, completion.token_ids) == ("length", expected[rid]), rid
    assert error_count_on_metrics(engine) == len(faults)
    assert_idle(engine, free_blocks)
    # The engine serves on: the victims again, without faults, give their clean outputs.
    again = run(engine, [prompts[int(rid[1:])] for rid in victims], [greedy() for _ in victims])
    # by request id: prefix-cache hits change the order in which they finish
    assert [again[f"r{i}"].outputs[0].token_ids for i in range(len(victims))] == [expected[rid] for rid in victims]
    assert_idle(engine, free_blocks)


def test_a_failing_forward_fails_its_step_and_the_engine_serves_on(target, clean, monkeypatch):
    prompts, expected = clean
    engine = LLM(str(target), **SETTINGS, speculative_config=SPEC["ngram"]).engine
    free_blocks = engine.block_pool.num_free
    execute, plans = engine.runner.execute, []

    def execute_failing_once(plan):
        plans.append(plan)
        if len(plans) == 3:
            raise InjectedFault("the forward")
        return execute(plan)

    monkeypatch.setattr(engine.runner, "execute", execute_failing_once)
    outputs = run(engine, prompts, [greedy() for _ in prompts])
    failed = {item.request.request_id for item in plans[2].scheduled}
    assert {rid for rid, o in outputs.items() if o.outputs[0].finish_reason == "error"} == failed
    for rid in set(outputs) - failed:
        assert outputs[rid].outputs[0].token_ids == expected[rid]
    assert_idle(engine, free_blocks)


def test_the_async_engine_fails_only_the_failing_stream(target, clean):
    prompts, expected = clean
    engine = LLM(str(target), **SETTINGS).engine

    def raising(output_ids, logits):
        if len(output_ids) == 3:
            raise InjectedFault("a logits processor")

    async def serve():
        async_engine = AsyncEngine(engine)
        try:

            async def one(i):
                params = greedy()
                if i == 2:
                    params.logits_processors = [raising]
                stream = await async_engine.add_request(prompts[i], params, f"r{i}")
                return (await stream.final_output()).outputs[0].token_ids

            return await asyncio.gather(*(one(i) for i in range(8)), return_exceptions=True)
        finally:
            async_engine.shutdown()

    results = asyncio.run(serve())
    assert isinstance(results[2], RequestFailedError) and "InjectedFault" not in str(results[2])
    assert [r for i, r in enumerate(results) if i != 2] == [expected[f"r{i}"] for i in range(8) if i != 2]


def test_a_step_that_raises_past_its_guards_fails_its_streams_as_errors(target, clean, monkeypatch):
    """A bug outside step()'s own guards (here in schedule()): the async engine ends every live
    request as failed, counted as an error (not an abort), frees everything, and serves on."""
    prompts, expected = clean
    engine = LLM(str(target), **SETTINGS).engine
    free_blocks = engine.block_pool.num_free
    real_schedule, calls = engine.scheduler.schedule, 0

    def schedule():
        nonlocal calls
        calls += 1
        if calls == 3:
            raise InjectedFault("the scheduler")
        return real_schedule()

    monkeypatch.setattr(engine.scheduler, "schedule", schedule)

    async def serve(ids):
        async_engine = AsyncEngine(engine)
        try:

            async def one(i):
                stream = await async_engine.add_request(prompts[i], greedy(), f"{ids}{i}")
                return (await stream.final_output()).outputs[0].token_ids

            return await asyncio.gather(*(one(i) for i in range(4)), return_exceptions=True)
        finally:
            async_engine.shutdown()

    results = asyncio.run(serve("a"))
    assert all(isinstance(r, RequestFailedError) and "InjectedFault" not in str(r) for r in results)
    assert engine.stats.finished["error"] == 4 and engine.stats.finished["abort"] == 0
    assert_idle(engine, free_blocks)
    assert asyncio.run(serve("b")) == [expected[f"r{i}"] for i in range(4)]  # it serves on
