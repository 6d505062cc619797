"""Hybrid prefix caching in the scheduler, without a model: KV blocks, GDN snapshots and a fake
GDN state that is simply the list of tokens a slot has consumed.

The fake runner does what engine/runner.py does to state slots (restore a snapshot before the
forward, advance each scheduled sequence by its tokens, keep only the accepted drafts' state after
verification, fill the snapshots the scheduler took after the commit), so the checks are
independent of the scheduler's bookkeeping: before every forward, every scheduled request's slot
must hold exactly its first num_computed_tokens tokens, and every cached snapshot must hold exactly
the tokens its block hash covers. A hypothesis state machine drives random interleavings of
requests with shared prefixes, chunked prefill, drafts with random acceptance, preemption (a small
pool), aborts and multi-turn continuations, and checks: nothing is leaked when idle, nothing is
released twice (the pools assert), no step writes a shared or hashed block (the scheduler
asserts), and snapshot keys stay tied to cached blocks.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fp4serve.engine.block_pool import BlockPool, block_hash
from fp4serve.engine.request import Request, RequestStatus
from fp4serve.engine.scheduler import Scheduler, SchedulerPlan
from fp4serve.engine.snapshot_pool import SnapshotPool
from fp4serve.sampling_params import SamplingParams

BS = 4
MBS = 8  # prefill snapshots every 2 blocks
SEQS = 3
EOS = 999


class FakeState:
    """state[slot] = the tokens that slot's GDN state has consumed, for sequence and snapshot slots."""

    def __init__(self):
        self.state: dict[int, list[int]] = {}

    def forward(self, plan: SchedulerPlan) -> dict[int, list[list[int]]]:
        for snapshot, slot in plan.restores:
            self.state[slot] = list(self.state[snapshot])
        per_token = {}
        for i, item in enumerate(plan.scheduled):
            r = item.request
            assert self.state.get(r.state_slot, [])[: r.num_computed_tokens] == r.all_token_ids[: r.num_computed_tokens]
            if r.num_computed_tokens == 0:
                self.state[r.state_slot] = []  # a fresh sequence starts from zeros
            assert self.state[r.state_slot] == r.all_token_ids[: r.num_computed_tokens], (
                f"{r.request_id}: slot holds {len(self.state[r.state_slot])} tokens' state, "
                f"{r.num_computed_tokens} are computed"
            )
            tokens = r.token_ids_in(r.num_computed_tokens, r.num_computed_tokens + item.num_tokens - item.num_drafts)
            tokens += item.draft_token_ids
            base = self.state[r.state_slot]
            per_token[i] = [base + tokens[: n + 1] for n in range(len(tokens))]
            self.state[r.state_slot] = base + tokens
        return per_token

    def keep_accepted(self, plan, per_token, accepted):
        for i, item in enumerate(plan.scheduled):
            if item.num_drafts:
                self.state[item.request.state_slot] = per_token[i][accepted[i]]

    def save(self, plan, per_token, jobs):
        index = {id(item): i for i, item in enumerate(plan.scheduled)}
        for job in jobs:
            i = index[id(job.item)]
            self.state[job.slot] = list(per_token[i][job.num_tokens - 1])


class HybridPrefixMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        snapshots = SnapshotPool(5, first_slot=SEQS)
        self.pool = BlockPool(9, BS, True, snapshots)
        self.s = Scheduler(self.pool, SEQS, 10, True, SEQS, frozenset({EOS}), mamba_block_size=MBS)
        self.fake = FakeState()
        self.ids = itertools.count()
        self.finished: list[Request] = []
        self.live: list[Request] = []

    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=20), max_tokens=st.integers(1, 12))
    def add(self, prompt, max_tokens):
        r = Request(f"r{next(self.ids)}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), 48)
        self.s.add(r)
        self.live.append(r)

    @precondition(lambda self: self.finished)
    @rule(data=st.data(), more=st.lists(st.integers(0, 2), min_size=1, max_size=6))
    def next_turn(self, data, more):
        """A conversation goes on: the previous turn's prompt and output, then new tokens."""
        before = data.draw(st.sampled_from(self.finished))
        prompt = (before.all_token_ids + more)[:40]
        self.add(prompt, 4)

    @precondition(lambda self: self.s.has_unfinished())
    @rule(data=st.data())
    def step(self, data):
        s = self.s
        for r in s.running:  # drafts for decoding requests: random tokens, some right by luck
            if r.num_computed_tokens == r.num_tokens - 1 and data.draw(st.booleans()):
                r.draft_token_ids = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=3))
        plan = s.schedule()
        per_token = self.fake.forward(plan)
        accepted, new_tokens = {}, []
        for i, item in enumerate(plan.scheduled):
            if not item.samples:
                new_tokens.append([])
                continue
            a = data.draw(st.integers(0, item.num_drafts))
            accepted[i] = a
            new_tokens.append(item.draft_token_ids[:a] + [data.draw(st.integers(0, 2))])
        self.fake.keep_accepted(plan, per_token, accepted)
        for item, tokens in zip(plan.scheduled, new_tokens):
            if s.commit_one(item, tokens):
                self.done(item.request)
        self.fake.save(plan, per_token, s.take_snapshot_jobs())

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data):
        r = data.draw(st.sampled_from(self.live))
        assert self.s.abort(r.request_id) is r
        self.done(r)

    def done(self, r):
        self.live.remove(r)
        if r.status is not RequestStatus.FINISHED_ABORTED:
            self.finished.append(r)

    @invariant()
    def snapshots_hold_their_prefix(self):
        """A cached snapshot keyed by a block's hash holds exactly the tokens that hash chain covers."""
        chains = {}
        for r in self.finished + self.live:
            tokens, parent = r.all_token_ids, None
            for j in range(len(tokens) // BS):
                parent = block_hash(parent, tuple(tokens[j * BS : (j + 1) * BS]))
                chains[parent] = tokens[: (j + 1) * BS]
        snaps = self.pool.snapshots
        for key, slot in snaps.cached.items():
            assert key in self.pool.cached, "a snapshot outlived its block"
            if key in chains:
                assert self.fake.state[slot] == chains[key], f"snapshot slot {slot} holds the wrong prefix's state"

    @invariant()
    def accounting(self):
        snaps = self.pool.snapshots
        held = [r.held_snapshot for r in self.s.running if r.held_snapshot is not None]
        for slot in range(snaps.first_slot, snaps.first_slot + snaps.capacity):
            assert snaps.ref_count[slot] == held.count(slot), f"snapshot slot {slot} refcount is off"
            assert (slot in snaps.lru) == (snaps.ref_count[slot] == 0)
        refs = [0] * self.pool.num_blocks
        for r in self.s.running:
            for b in r.block_ids:
                refs[b] += 1
        assert refs == self.pool.ref_count, "block refcounts do not match the running requests"
        if not self.s.has_unfinished():
            assert self.pool.num_free == self.pool.num_blocks, "blocks leaked"
            assert len(snaps.lru) == snaps.capacity, "snapshots leaked"
            assert len(self.s.free_slots) == SEQS, "state slots leaked"


HybridPrefixMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestHybridPrefix = HybridPrefixMachine.TestCase


def test_a_second_turn_resumes_from_the_first_turns_snapshot():
    """Turn 1's prompt + output ends at 13 tokens: its latest snapshot sits at 12; turn 2 extends
    it and is served 12 tokens from the cache, restoring that snapshot."""
    pool = BlockPool(16, BS, True, SnapshotPool(4, first_slot=2))
    s = Scheduler(pool, 2, 64, True, 2, frozenset({EOS}), mamba_block_size=MBS)
    fake = FakeState()
    first = Request("a", list(range(10)), SamplingParams(max_tokens=4, ignore_eos=True), 64)
    s.add(first)
    while s.has_unfinished():
        plan = s.schedule()
        per_token = fake.forward(plan)
        s.commit(plan, [[7] if item.samples else [] for item in plan.scheduled])
        fake.save(plan, per_token, s.take_snapshot_jobs())
    assert first.num_tokens == 14
    second = Request("b", first.all_token_ids + [3, 3], SamplingParams(max_tokens=1), 64)
    s.add(second)
    plan = s.schedule()
    assert second.num_computed_tokens == second.num_cached_tokens == 12
    assert [slot for _, slot in plan.restores] == [second.state_slot]
    fake.forward(plan)  # asserts the restored state is exactly the first 12 tokens'


def test_prefill_chunks_end_at_snapshot_points():
    """Chunks stop at multiples of mamba_block_size and at the last block end before the final token."""
    pool = BlockPool(16, BS, True, SnapshotPool(4, first_slot=1))
    s = Scheduler(pool, 1, 64, True, 1, frozenset({EOS}), mamba_block_size=MBS)
    s.add(Request("a", list(range(22)), SamplingParams(max_tokens=1), 64))
    ends = []
    while s.has_unfinished():
        plan = s.schedule()
        item = plan.scheduled[0]
        ends.append(item.request.num_computed_tokens + item.num_tokens)
        s.commit(plan, [[1] if item.samples else []])
        jobs = s.take_snapshot_jobs()
        assert [j.num_tokens for j in jobs] == ([item.num_tokens] if ends[-1] % BS == 0 else [])
    assert ends == [8, 16, 20, 22]
