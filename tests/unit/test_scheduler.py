"""Scheduler policy without a model: a BlockPool and a Scheduler built directly, driven by fake
commits (each step that reaches the end of a request's tokens "samples" a fresh token id).

Covers the token budget, chunked prefill next to running decodes, max_num_seqs, preemption by
recompute (newest first, back at the front of the queue, outputs kept), abort, every finish rule,
and the 1 + k shape that speculative decoding verification needs. Block size 4.
"""
from __future__ import annotations

import itertools
import random

import pytest

from fp4serve.engine.block_pool import BlockPool
from fp4serve.engine.request import Request, RequestStatus
from fp4serve.engine.scheduler import Scheduler, SchedulerPlan
from fp4serve.sampling_params import SamplingParams

BS = 4
EOS = 299
FAKE_TOKENS = itertools.count(1000)  # sampled tokens: never EOS, never a prompt token


def make_scheduler(
    num_blocks: int = 64,
    budget: int = 16,
    max_seqs: int = 8,
    chunked: bool = True,
    slots: int = 0,
    prefix: bool = False,
) -> Scheduler:
    return Scheduler(BlockPool(num_blocks, BS, prefix), max_seqs, budget, chunked, slots, frozenset({EOS}))


def make_request(rid: str, prompt_len: int, max_total: int = 10_000, first: int = 0, **params) -> Request:
    params.setdefault("max_tokens", 100)
    return Request(rid, list(range(first, first + prompt_len)), SamplingParams(**params), max_total)


def fake_commit(s: Scheduler, plan: SchedulerPlan, tokens: dict[str, list[int]] | None = None) -> list[Request]:
    """Commit `plan` as the engine would: one new token for each request whose step samples
    (tokens[request_id] overrides it), none for a prefill chunk that stops short of the end."""
    tokens = tokens or {}
    new = []
    for item in plan.scheduled:
        rid = item.request.request_id
        new.append(tokens.get(rid, [next(FAKE_TOKENS)]) if item.samples else [])
    return s.commit(plan, new)


def step(
    s: Scheduler, tokens: dict[str, list[int]] | None = None
) -> tuple[dict[str, int], SchedulerPlan, list[Request]]:
    """One schedule + commit; returns {request_id: tokens scheduled}, the plan and the finished."""
    plan = s.schedule()
    check_plan(s, plan)
    scheduled = {item.request.request_id: item.num_tokens for item in plan.scheduled}
    return scheduled, plan, fake_commit(s, plan, tokens)


def check_plan(s: Scheduler, plan: SchedulerPlan) -> None:
    """What every plan must satisfy, before its commit."""
    assert plan.num_tokens <= s.max_num_batched_tokens, "token budget exceeded"
    assert len(s.running) <= s.max_num_seqs, "max_num_seqs exceeded"
    ids = [item.request.request_id for item in plan.scheduled]
    assert len(ids) == len(set(ids)), "a request scheduled twice in one step"
    for item in plan.scheduled:
        r = item.request
        assert r.status is RequestStatus.RUNNING and r in s.running
        assert item.num_tokens >= 1
        assert r.num_computed_tokens + item.num_tokens - item.num_drafts <= r.num_tokens, "scheduled past the known tokens"
        assert item.draft_token_ids == r.draft_token_ids[: item.num_drafts], "drafts verified out of order"
        assert len(r.block_ids) * BS >= r.num_computed_tokens + item.num_tokens, "no KV slot for a scheduled token"
    for r in plan.preempted:
        assert r.block_ids == [] and r.state_slot is None and r.num_computed_tokens == 0
        assert r not in [item.request for item in plan.scheduled]
    held = sum(len(r.block_ids) for r in s.running)
    if not s.pool.enable_prefix_caching:
        assert s.pool.num_free + held == s.pool.num_blocks, "blocks leaked or double counted"


def run_to_completion(s: Scheduler, max_steps: int = 1000) -> list[dict[str, int]]:
    steps = []
    for _ in range(max_steps):
        if not s.has_unfinished():
            return steps
        scheduled, _, _ = step(s)
        steps.append(scheduled)
    raise AssertionError("the scheduler made no progress")


# ---- budget, chunking, sequence limit -------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_token_budget_respected_every_step(seed):
    rng = random.Random(seed)
    s = make_scheduler(num_blocks=64, budget=10, max_seqs=4)
    requests = [make_request(f"r{i}", rng.randint(1, 30), max_tokens=rng.randint(1, 8)) for i in range(10)]
    for r in requests:
        s.add(r)
    steps = run_to_completion(s)
    assert all(sum(x.values()) <= 10 for x in steps)
    assert max(sum(x.values()) for x in steps) == 10, "the budget should be filled when work is queued"
    for r in requests:
        assert r.status is RequestStatus.FINISHED_LENGTH
        assert len(r.output_token_ids) == r.params.max_tokens
    assert s.pool.num_free == s.pool.num_blocks


def test_long_prompt_is_chunked_while_decodes_run_first():
    s = make_scheduler(budget=8)
    a = make_request("a", 3)
    s.add(a)
    assert step(s)[0] == {"a": 3}
    b = make_request("b", 20, first=100)
    s.add(b)
    scheduled, plan, _ = step(s)
    assert [item.request.request_id for item in plan.scheduled] == ["a", "b"], "the running decode goes first"
    assert scheduled == {"a": 1, "b": 7}
    assert b.num_computed_tokens == 7 and b.output_token_ids == [], "a partial chunk samples nothing"
    assert step(s)[0] == {"a": 1, "b": 7}
    assert b.output_token_ids == []
    plan = s.schedule()  # `samples` reads the request's state, so look before the commit
    assert [(i.request.request_id, i.num_tokens, i.samples) for i in plan.scheduled] == [("a", 1, True), ("b", 6, True)]
    fake_commit(s, plan)
    assert len(b.output_token_ids) == 1 and b.num_computed_tokens == 20
    assert step(s)[0] == {"a": 1, "b": 1}, "b now decodes too"
    assert len(a.output_token_ids) == 5


def test_chunk_boundaries_and_samples_flag():
    s = make_scheduler(budget=5)
    r = make_request("r", 12)
    s.add(r)
    chunks = []
    while not r.output_token_ids:
        plan = s.schedule()
        chunks.append((plan.scheduled[0].num_tokens, plan.scheduled[0].samples))
        fake_commit(s, plan)
    assert chunks == [(5, False), (5, False), (2, True)]


def test_max_num_seqs_respected():
    s = make_scheduler(budget=100, max_seqs=2)
    for i in range(5):
        s.add(make_request(f"r{i}", 3, max_tokens=3))
    scheduled, _, _ = step(s)
    assert scheduled == {"r0": 3, "r1": 3}
    assert len(s.waiting) == 3
    steps = run_to_completion(s)
    assert all(len(x) <= 2 for x in steps)


def test_waiting_requests_admitted_in_arrival_order():
    s = make_scheduler(budget=6, max_seqs=8)
    for i in range(3):
        s.add(make_request(f"r{i}", 4))
    scheduled, _, _ = step(s)
    assert scheduled == {"r0": 4, "r1": 2}, "r1 starts with the budget left over (chunked)"
    assert [r.request_id for r in s.waiting] == ["r2"]


def test_chunked_prefill_disabled_prompt_waits_instead_of_chunking():
    s = make_scheduler(budget=8, chunked=False)
    a = make_request("a", 2)
    s.add(a)
    step(s)
    b = make_request("b", 8, first=100)  # fits the budget alone, not next to a's decode
    s.add(b)
    scheduled, _, _ = step(s)
    assert scheduled == {"a": 1}, "with chunking off, b must wait for a whole-prompt step"
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.block_ids == []
    assert s.pool.num_free + len(a.block_ids) == s.pool.num_blocks
    s.abort("a")
    scheduled, _, _ = step(s)
    assert scheduled == {"b": 8}, "the whole prompt in one step once the budget allows"


def test_chunked_prefill_disabled_short_prompts_still_batch():
    s = make_scheduler(budget=8, chunked=False)
    s.add(make_request("a", 3))
    s.add(make_request("b", 5, first=50))
    s.add(make_request("c", 1, first=90))
    scheduled, _, _ = step(s)
    assert scheduled == {"a": 3, "b": 5}, "c does not fit the remaining budget of 0"


# ---- preemption ------------------------------------------------------------------------------


def test_newest_running_request_is_preempted_and_resumed_with_outputs_kept():
    s = make_scheduler(num_blocks=4, budget=16, slots=3)
    a = make_request("a", 7, max_tokens=4)
    b = make_request("b", 7, first=100, max_tokens=4)
    s.add(a)
    s.add(b)
    assert step(s)[0] == {"a": 7, "b": 7}  # 2 blocks each; the pool is full
    assert step(s)[0] == {"a": 1, "b": 1}  # position 7 still fits in block 1
    assert s.pool.num_free == 0
    b_outputs = list(b.output_token_ids)
    c = make_request("c", 1, first=200, max_tokens=2)
    s.add(c)
    scheduled, plan, _ = step(s)  # a needs a third block for position 8: b (newest) gives its blocks up
    assert plan.preempted == [b]
    assert scheduled == {"a": 1}, "no admission (not even c, which would fit) in a step that preempted"
    assert b.status is RequestStatus.PREEMPTED
    assert b.num_computed_tokens == 0 and b.block_ids == [] and b.block_hashes == []
    assert b.state_slot is None and len(s.free_slots) == 3 - 1, "b's state slot is back in the pool"
    assert b.output_token_ids == b_outputs, "recompute keeps the generated tokens"
    assert b.num_preemptions == 1 and s.num_preemptions == 1
    assert list(s.waiting) == [b, c], "a preempted request goes back to the front of the queue"
    assert len(a.block_ids) == 3
    # b needs 3 blocks to recompute its 9 tokens; it waits (and c behind it) until a finishes.
    while a.status is RequestStatus.RUNNING:
        scheduled, _, _ = step(s)
        assert "b" not in scheduled and "c" not in scheduled
    scheduled, plan, _ = step(s)
    assert scheduled == {"b": 9, "c": 1}, "b recomputes prompt + kept outputs in one prefill"
    assert b.status is RequestStatus.RUNNING and b.state_slot is not None
    assert b.output_token_ids[:2] == b_outputs and len(b.output_token_ids) == 3
    assert b.num_cached_tokens == 0, "num_cached_tokens describes the first schedule only"
    run_to_completion(s)
    assert b.status is RequestStatus.FINISHED_LENGTH and len(b.output_token_ids) == 4
    assert s.pool.num_free == 4 and len(s.free_slots) == 3


def test_newest_request_preempts_itself_when_it_cannot_grow():
    s = make_scheduler(num_blocks=5, budget=16)
    a = make_request("a", 8)
    b = make_request("b", 7, first=100)
    s.add(a)
    s.add(b)
    assert step(s)[0] == {"a": 8, "b": 7}  # a: 2 blocks, b: 2 blocks, 1 free
    assert step(s)[0] == {"a": 1, "b": 1}  # a takes the last block for position 8
    scheduled, plan, _ = step(s)  # b needs a third block for position 8; it is the newest itself
    assert plan.preempted == [b]
    assert scheduled == {"a": 1}
    assert s.running == [a] and list(s.waiting) == [b]


def test_preemption_under_random_load_keeps_accounting():
    """Many requests on a small pool: every plan satisfies check_plan, every request finishes
    with all its tokens, and the pool is whole at the end."""
    rng = random.Random(0)
    s = make_scheduler(num_blocks=12, budget=12, max_seqs=6, slots=6)
    requests = [
        make_request(f"r{i}", rng.randint(1, 14), first=20 * i, max_tokens=rng.randint(3, 12)) for i in range(12)
    ]
    for r in requests:
        s.add(r)
    run_to_completion(s)
    assert s.num_preemptions > 0, "the pool is meant to be too small for all of them"
    for r in requests:
        assert len(r.output_token_ids) == r.params.max_tokens
    assert s.pool.num_free == s.pool.num_blocks and len(s.free_slots) == 6


def test_preempted_request_resumes_from_prefix_cache():
    s = make_scheduler(num_blocks=5, budget=16, prefix=True)
    a = make_request("a", 8)
    b = make_request("b", 7, first=100)
    s.add(a)
    s.add(b)
    step(s)
    step(s)
    _, plan, _ = step(s)
    assert plan.preempted == [b]
    a.params.max_tokens = len(a.output_token_ids) + 1  # let a finish next step
    step(s)
    scheduled, _, _ = step(s)
    # b's two full blocks (its first 8 committed tokens) were hashed when computed and stayed
    # findable after the preemption freed them: only the last token is recomputed.
    assert scheduled == {"b": 1}
    assert b.num_computed_tokens == 9 and len(b.output_token_ids) == 3
    assert b.num_cached_tokens == 0, "num_cached_tokens describes the first schedule only"


# ---- prefix caching through the scheduler ---------------------------------------------------


def test_prefix_cache_hit_skips_cached_tokens():
    s = make_scheduler(budget=32, prefix=True)
    a = make_request("a", 10)
    s.add(a)
    step(s)  # a's 10 prompt tokens computed: blocks 0 and 1 are full and hashed
    assert len(a.block_hashes) == 2
    b = make_request("b", 10)  # same prompt
    s.add(b)
    scheduled, _, _ = step(s)
    assert scheduled == {"a": 1, "b": 2}, "b computes only the tokens past the cached blocks"
    assert b.num_cached_tokens == 8
    assert b.block_ids[:2] == a.block_ids[:2] and s.pool.ref_count[a.block_ids[0]] == 2


def test_prefix_cache_hit_stops_short_of_the_last_token():
    s = make_scheduler(budget=32, prefix=True)
    s.add(make_request("a", 8))
    step(s)
    b = make_request("b", 8)  # 2 full blocks, both cached
    s.add(b)
    scheduled, _, _ = step(s)
    assert scheduled["b"] == 4, "the last block is recomputed so the last token yields logits"
    assert b.num_cached_tokens == 4


def test_only_committed_tokens_are_hashed():
    s = make_scheduler(budget=3, prefix=True)
    r = make_request("r", 10)
    s.add(r)
    step(s)  # 3 computed
    assert r.block_hashes == []
    step(s)  # 6 computed
    assert len(r.block_hashes) == 1 and s.pool.hash_of[r.block_ids[0]] is not None
    assert s.pool.hash_of[r.block_ids[1]] is None


# ---- abort -----------------------------------------------------------------------------------


def test_abort_waiting_and_running_frees_everything():
    s = make_scheduler(num_blocks=16, budget=8, slots=4)
    running = make_request("run", 6)
    waiting = make_request("wait", 30, first=100)
    s.add(running)
    s.add(waiting)
    step(s)  # run: 6 tokens; wait: 2-token chunk, so both are running now
    queued = make_request("queued", 3, first=200)
    s.add(queued)
    assert s.pool.num_free < 16 and len(s.free_slots) == 2
    aborted = s.abort("queued")
    assert aborted is queued and aborted.status is RequestStatus.FINISHED_ABORTED
    assert aborted.finish_reason == "abort"
    assert queued not in s.waiting
    for rid in ("wait", "run"):
        r = s.abort(rid)
        assert r.status is RequestStatus.FINISHED_ABORTED and r.block_ids == [] and r.state_slot is None
    assert s.pool.num_free == 16 and sorted(s.free_slots) == [0, 1, 2, 3]
    assert not s.has_unfinished()
    assert s.abort("nope") is None
    assert s.abort("run") is None, "aborting twice is a no-op"


def test_abort_preempted_request():
    s = make_scheduler(num_blocks=4, budget=16, slots=2)
    a, b = make_request("a", 7), make_request("b", 7, first=100)
    s.add(a)
    s.add(b)
    for _ in range(3):
        step(s)
    assert b.status is RequestStatus.PREEMPTED
    assert s.abort("b") is b and b.status is RequestStatus.FINISHED_ABORTED
    s.abort("a")
    assert s.pool.num_free == 4 and len(s.free_slots) == 2


# ---- finishing -------------------------------------------------------------------------------


def drive(s: Scheduler, r: Request, tokens: list[int]) -> None:
    """Feed `tokens` one per step as r's sampled tokens until they run out or r finishes."""
    s.add(r)
    for t in tokens:
        step(s, {r.request_id: [t]})
        if r.status.finished:
            return


def test_finish_by_eos():
    s = make_scheduler()
    r = make_request("r", 3)
    drive(s, r, [5, 6, EOS, 7])
    assert r.status is RequestStatus.FINISHED_STOPPED and r.finish_reason == "stop"
    assert r.output_token_ids == [5, 6, EOS] and r.stop_reason is None
    assert r not in s.running and s.pool.num_free == s.pool.num_blocks


def test_ignore_eos_does_not_stop():
    s = make_scheduler()
    r = make_request("r", 3, ignore_eos=True, max_tokens=5)
    drive(s, r, [EOS] * 10)
    assert r.output_token_ids == [EOS] * 5 and r.status is RequestStatus.FINISHED_LENGTH


def test_finish_by_stop_token_ids():
    s = make_scheduler()
    r = make_request("r", 3, stop_token_ids=[42, 43])
    drive(s, r, [5, 43, 6])
    assert r.status is RequestStatus.FINISHED_STOPPED and r.stop_reason == 43
    assert r.output_token_ids == [5, 43]


def test_stop_token_ids_apply_even_with_ignore_eos():
    s = make_scheduler()
    r = make_request("r", 3, stop_token_ids=[42], ignore_eos=True)
    drive(s, r, [EOS, 42])
    assert r.status is RequestStatus.FINISHED_STOPPED and r.stop_reason == 42


def test_finish_by_max_tokens():
    s = make_scheduler()
    r = make_request("r", 3, max_tokens=3)
    drive(s, r, [1, 2, 3, 4])
    assert r.status is RequestStatus.FINISHED_LENGTH and r.finish_reason == "length"
    assert r.output_token_ids == [1, 2, 3]


def test_finish_by_max_total_tokens():
    s = make_scheduler()
    r = make_request("r", 6, max_total=8, max_tokens=None)
    drive(s, r, [1, 2, 3, 4])
    assert r.status is RequestStatus.FINISHED_LENGTH and r.num_tokens == 8
    assert r.output_token_ids == [1, 2]


def test_min_tokens_suppresses_eos_and_stop_tokens():
    s = make_scheduler()
    r = make_request("r", 3, min_tokens=3, stop_token_ids=[42])
    drive(s, r, [EOS, 42, EOS, 9])
    assert r.output_token_ids == [EOS, 42, EOS], "eos counts once min_tokens outputs exist"
    assert r.status is RequestStatus.FINISHED_STOPPED


def test_max_tokens_applies_within_min_tokens_window():
    s = make_scheduler()
    r = make_request("r", 3, min_tokens=2, max_tokens=2)
    drive(s, r, [EOS, EOS, EOS])
    assert r.output_token_ids == [EOS, EOS] and r.status is RequestStatus.FINISHED_STOPPED


def test_finish_releases_blocks_and_slot():
    s = make_scheduler(num_blocks=8, slots=2)
    r = make_request("r", 9, max_tokens=1)
    s.add(r)
    _, _, finished = step(s)
    assert finished == [r]
    assert s.pool.num_free == 8 and len(s.free_slots) == 2 and r.state_slot is None


def test_engine_side_finish_removes_running_request():
    """A stop string found by the detokenizer finishes the request through Scheduler.finish."""
    s = make_scheduler(num_blocks=8)
    r = make_request("r", 5)
    s.add(r)
    step(s)
    s.finish(r, RequestStatus.FINISHED_STOPPED)
    assert r not in s.running and s.pool.num_free == 8
    assert s.schedule().scheduled == []


# ---- the 1 + k shape (speculative decoding) -------------------------------------------------


def test_step_schedules_one_plus_k_tokens():
    """A running request whose known tokens run k past its next decode position (drafts appended
    for verification) is scheduled for all 1 + k in one step, with KV blocks for each."""
    s = make_scheduler(num_blocks=16, budget=32)
    r = make_request("r", 7)
    s.add(r)
    step(s)
    assert r.num_tokens - r.num_computed_tokens == 1
    r.output_token_ids += [11, 12, 13]  # k = 3 drafts
    plan = s.schedule()
    check_plan(s, plan)
    assert [(i.request, i.num_tokens) for i in plan.scheduled] == [(r, 4)]
    assert plan.scheduled[0].samples
    assert len(r.block_ids) * BS >= 7 + 4 and len(r.block_ids) == 3


def test_one_plus_k_is_capped_by_the_budget():
    s = make_scheduler(budget=3)
    r = make_request("r", 2)
    s.add(r)
    step(s)
    r.output_token_ids += [11, 12, 13, 14]
    plan = s.schedule()
    assert plan.scheduled[0].num_tokens == 3 and not plan.scheduled[0].samples


def test_commit_of_several_tokens_stops_at_the_first_stop():
    s = make_scheduler()
    r = make_request("r", 3, stop_token_ids=[42])
    s.add(r)
    step(s)
    plan = s.schedule()
    finished = s.commit(plan, [[5, 42, 6, 7]])
    assert finished == [r] and r.output_token_ids[-2:] == [5, 42] and r.stop_reason == 42


def test_commit_of_several_tokens_respects_max_tokens():
    s = make_scheduler()
    r = make_request("r", 3, max_tokens=3)
    s.add(r)
    step(s)  # 1 output
    plan = s.schedule()
    s.commit(plan, [[5, 6, 7, 8]])
    assert len(r.output_token_ids) == 3 and r.status is RequestStatus.FINISHED_LENGTH


# ---- drafts (request.draft_token_ids) ---------------------------------------------------------


def test_drafts_ride_with_the_last_token_within_the_budget():
    s = make_scheduler(budget=4)
    r = make_request("r", 3)
    s.add(r)
    step(s)
    r.draft_token_ids = [11, 12, 13, 14]
    plan = s.schedule()
    check_plan(s, plan)
    item = plan.scheduled[0]
    assert (item.num_tokens, item.draft_token_ids, item.samples) == (4, [11, 12, 13], True)  # 1 + 3 fit


def test_commit_counts_only_accepted_drafts_as_computed():
    s = make_scheduler()
    r = make_request("r", 3)
    s.add(r)
    step(s, {"r": [50]})
    r.draft_token_ids = [11, 12, 13, 14]
    plan = s.schedule()
    assert plan.scheduled[0].num_tokens == 5
    s.commit(plan, [[11, 60]])  # one draft accepted, then the target's own token
    assert r.output_token_ids == [50, 11, 60] and r.num_computed_tokens == 5 and r.draft_token_ids == []
    plan = s.schedule()
    assert plan.scheduled[0].num_tokens == 1 and r.num_computed_tokens + 1 == r.num_tokens


def test_rejected_drafts_never_enter_the_prefix_cache():
    """Block 2 (positions 4..7) held the KV of drafts 12, 13, 14 when all were rejected; a later prompt
    with exactly those tokens must not hit it. Block 1 (all committed) is cached."""
    s = make_scheduler(prefix=True)
    r = make_request("r", 3)
    s.add(r)
    step(s, {"r": [50]})
    r.draft_token_ids = [11, 12, 13, 14]
    plan = s.schedule()
    s.commit(plan, [[70]])  # all rejected: only the last token (position 3) was committed
    assert r.num_computed_tokens == 4 and len(r.block_hashes) == 1
    s.finish(r, RequestStatus.FINISHED_ABORTED)
    other = Request("o", [0, 1, 2, 50, 11, 12, 13, 14, 15], SamplingParams(max_tokens=1), 100)
    s.add(other)
    s.schedule()
    assert other.num_computed_tokens == BS  # one cached block, not two


def test_preemption_drops_drafts():
    s = make_scheduler(num_blocks=3, budget=16)
    a, b = make_request("a", 4), make_request("b", 4, first=50)
    for r in (a, b):
        s.add(r)
    step(s)
    b.draft_token_ids = [1, 2, 3]
    a.draft_token_ids = [7, 8, 9, 10, 11, 12, 13]  # a needs more blocks than are free: b is preempted
    plan = s.schedule()
    assert plan.preempted == [b] and b.draft_token_ids == []
