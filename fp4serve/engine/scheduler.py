"""Continuous batching: which requests run this step and how many tokens each.

The scheduler owns all policy. Each step it first continues running requests (decodes and
unfinished prefill chunks, oldest first), preempting the newest by recompute when KV blocks run
out, then admits waiting requests while the token budget, the sequence limit, the blocks and the
state slots allow. A request may be scheduled for any number of tokens, so a verification step of
1 + k tokens (its last token plus the k drafts in request.draft_token_ids) is the same plan as a
prefill chunk. Commit advances a verified request only past the tokens that were accepted: the KV
written for rejected drafts is dead, is overwritten later, and never enters the prefix cache.

Every position a step writes lies at or past the request's committed length, in blocks only it
holds and nobody has hashed (checked each step): a shared block is never written. On hybrid
models a prefix hit also needs a GDN snapshot at its end (docs/prefix_caching.md): prefill chunks
end at snapshot points, commit decides which snapshots to take (`snapshot_jobs`, filled by the
runner), and a hit restores one (`SchedulerPlan.restores`)."""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from fp4serve.engine.block_pool import BlockPool
from fp4serve.engine.request import Request, RequestStatus

log = logging.getLogger(__name__)


@dataclass
class ScheduledRequest:
    request: Request
    num_tokens: int  # tokens computed this step, starting at request.num_computed_tokens (drafts included)
    draft_token_ids: list[int] = field(default_factory=list)  # the drafts verified this step, last in the step

    @property
    def num_drafts(self) -> int:
        return len(self.draft_token_ids)

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the known tokens, so a new token is sampled."""
        return self.request.num_computed_tokens + self.num_tokens - self.num_drafts == self.request.num_tokens


@dataclass
class SnapshotJob:
    """Save the GDN state after the first `num_tokens` tokens `item` computed this step into
    snapshot slot `slot` (after verification: from the step's per-token captures)."""

    item: ScheduledRequest
    num_tokens: int
    slot: int


@dataclass
class SchedulerPlan:
    scheduled: list[ScheduledRequest]
    preempted: list[Request]
    # (snapshot slot, state slot): GDN state to copy in before the forward, for prefix hits
    restores: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        block_pool: BlockPool,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool,
        num_state_slots: int,
        eos_token_ids: frozenset[int],
        mamba_block_size: int = 0,
        keep_every_snapshot: bool = False,
        drafter_lookahead: int = 0,
    ):
        """mamba_block_size: prefill snapshot interval of a hybrid model with GDN snapshots
        (block_pool.snapshots); keep_every_snapshot (--mamba-cache-mode all): decode snapshots
        stay cached when superseded; drafter_lookahead: 1 when a drafter's cache row at a position
        depends on the next token (MTP), so a hit must also match that token."""
        self.pool = block_pool
        self.block_size = block_pool.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = enable_chunked_prefill
        self.uses_state_slots = num_state_slots > 0
        self.free_slots = list(range(num_state_slots - 1, -1, -1))
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.snapshots = block_pool.snapshots if self.uses_state_slots else None
        self.mamba_block_size = mamba_block_size
        self.keep_every_snapshot = keep_every_snapshot
        self.drafter_lookahead = drafter_lookahead
        self.snapshot_jobs: list[SnapshotJob] = []  # taken by commit, filled by the runner
        self._restores: list[tuple[int, int]] = []

    # ---- queue management -------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Request | None:
        for queue in (self.running, self.waiting):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    self._release(request)
                    request.status = RequestStatus.FINISHED_ABORTED
                    return request
        return None

    # ---- scheduling -------------------------------------------------------------------------
    def schedule(self) -> SchedulerPlan:
        # Snapshots taken by a step that failed before the runner filled them hold no state.
        for job in self.take_snapshot_jobs():
            if self.snapshots.key_of[job.slot] is not None:
                self.snapshots.drop(self.snapshots.key_of[job.slot])
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = self._chunk(
                request, request.num_computed_tokens, min(request.num_tokens - request.num_computed_tokens, budget)
            )
            drafts = []
            if request.draft_token_ids and n == request.num_tokens - request.num_computed_tokens:
                drafts = request.draft_token_ids[: budget - n]  # verify as many as the budget allows
                n += len(drafts)
            while not self._grow(request, request.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break
            scheduled.append(ScheduledRequest(request, n, drafts))
            budget -= n
            i += 1
        # Admitting new work while evicting running work would only thrash.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            n = self._admit(request, budget)
            if n == 0:
                break
            self.waiting.popleft()
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, n))
            budget -= n
        for item in scheduled:
            self._check_writable(item)
        restores, self._restores = self._restores, []
        return SchedulerPlan(scheduled, preempted, restores)

    def _check_writable(self, item: ScheduledRequest) -> None:
        """The blocks this step writes belong to the request alone and are not in the prefix cache."""
        start, end = item.request.num_computed_tokens, item.request.num_computed_tokens + item.num_tokens
        for j in range(start // self.block_size, -(-end // self.block_size)):
            block = item.request.block_ids[j]
            assert self.pool.ref_count[block] == 1 and self.pool.hash_of[block] is None, (
                f"{item.request.request_id} would write positions {start}..{end - 1} into block {block}, which is "
                f"shared (refcount {self.pool.ref_count[block]}) or hashed into the prefix cache"
            )

    def _chunk(self, request: Request, start: int, n: int) -> int:
        """n, or fewer so that a prefill chunk ends at the next snapshot point it would cross: a
        multiple of mamba_block_size, or the last block boundary before the request's last token
        (where a request with the same tokens would hit)."""
        if self.snapshots is None or n <= 1:
            return n
        mbs, bs = self.mamba_block_size, self.block_size
        points = ((start // mbs + 1) * mbs, (request.num_tokens - 1) // bs * bs)
        return min([p - start for p in points if start < p < start + n], default=n)

    def reserve(self, request: Request, num_tokens: int) -> bool:
        """Make a running request's blocks cover `num_tokens` positions now, if blocks are free (a
        drafter writing its own KV ahead of the next step); False, holding nothing new, if not."""
        return self._grow(request, num_tokens)

    def _blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _grow(self, request: Request, num_tokens: int) -> bool:
        need = self._blocks_for(num_tokens) - len(request.block_ids)
        if need > self.pool.num_free:
            return False
        if need > 0:
            request.block_ids += self.pool.allocate(need)
        return True

    def _admit(self, request: Request, budget: int) -> int:
        """Give a waiting request its prefix-cache hit, blocks and state slot; 0 if it cannot start."""
        if self.uses_state_slots and not self.free_slots:
            return 0
        # At least one token must be computed to produce logits, so the hit stops short of the end.
        # Prompt logprobs need the logits of every prompt position: no hit at all (as vLLM).
        blocks, hashes = [], []
        if request.params.prompt_logprobs is None:
            blocks, hashes = self.pool.match_prefix(
                request.all_token_ids, request.num_tokens - 1, request.block_extra_keys
            )
        snapshot = None
        if self.uses_state_slots and blocks:
            keep, snapshot = self._snapshot_hit(request, blocks, hashes)
            self.pool.unuse_hit(blocks[keep:])
            blocks, hashes = blocks[:keep], hashes[:keep]
        computed = len(blocks) * self.block_size
        remaining = request.num_tokens - computed
        n = self._chunk(request, computed, min(remaining, budget))
        need = self._blocks_for(computed + n) - len(blocks)
        if (n < remaining and not self.chunked_prefill) or need > self.pool.num_free:
            self.pool.release(blocks[::-1])
            return 0
        request.block_ids = blocks + self.pool.allocate(need)
        request.block_hashes = hashes
        request.num_computed_tokens = computed
        if request.num_preemptions == 0:
            request.num_cached_tokens = computed
        if self.uses_state_slots:
            request.state_slot = self.free_slots.pop()
            if snapshot is not None:
                self.snapshots.lookup(hashes[-1])  # freshen it: it was just used
                self.snapshots.hits += 1
                self._restores.append((snapshot, request.state_slot))
        request.status = RequestStatus.RUNNING
        return n

    def _snapshot_hit(self, request: Request, blocks: list[int], hashes: list[bytes]) -> tuple[int, int | None]:
        """How many of the matched blocks a hybrid model can use: up to the longest GDN snapshot at
        a block end, with the snapshot slot (0 and None without one: recompute from the start)."""
        if self.snapshots is None:
            return 0, None
        tokens = request.all_token_ids
        for j in range(len(blocks), 0, -1):
            slot = self.snapshots.cached.get(hashes[j - 1])
            # MTP's cache row at the block's last position was written with the next token of the
            # sequence that filled the block: usable only if this request has the same one.
            if slot is not None and (
                not self.drafter_lookahead or self.pool.next_token[blocks[j - 1]] == tokens[j * self.block_size]
            ):
                return j, slot
        return 0, None

    def _preempt(self, request: Request) -> None:
        """Recompute policy: drop everything the request holds; it restarts from its tokens so far."""
        self._release(request)
        request.draft_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        log.debug("preempted %s (%d tokens)", request.request_id, request.num_tokens)

    def _release(self, request: Request) -> None:
        self.pool.release(request.block_ids[::-1])
        request.block_ids = []
        request.block_hashes = []
        if request.held_snapshot is not None:  # it stays cached: the next turn or a resume can use it
            self.snapshots.unhold(request.held_snapshot)
            request.held_snapshot = None
        if request.state_slot is not None:
            self.free_slots.append(request.state_slot)
            request.state_slot = None

    # ---- after the forward ------------------------------------------------------------------
    def commit(self, plan: SchedulerPlan, new_tokens: list[list[int]]) -> list[Request]:
        """Advance each scheduled request by its computed tokens and append the sampled ones
        (new_tokens[i] is empty for a prefill chunk that did not reach the end). For a verified
        request new_tokens[i] is its accepted drafts then one target token, and only the accepted
        drafts count as computed. Returns the requests that finished this step; their resources
        are already released."""
        return [item.request for item, tokens in zip(plan.scheduled, new_tokens) if self.commit_one(item, tokens)]

    def commit_one(self, item: ScheduledRequest, tokens: list[int]) -> bool:
        """commit() for one scheduled request; True if it finished (its resources released)."""
        request = item.request
        request.draft_token_ids = []
        accepted = len(tokens) - 1 if item.num_drafts else 0
        assert 0 <= accepted <= item.num_drafts and tokens[:accepted] == item.draft_token_ids[:accepted]
        start = request.num_computed_tokens
        request.num_computed_tokens += item.num_tokens - item.num_drafts + accepted
        for token in tokens:
            request.output_token_ids.append(token)
            if self._check_stop(request, token):
                break
        # After the appends, so the accepted drafts are among the tokens hashed; a stop inside an
        # accepted run leaves computed positions past the last token, which are not committed.
        committed = min(request.num_computed_tokens, request.num_tokens)
        bs = self.block_size
        if self.pool.enable_prefix_caching and (len(request.block_hashes) + 1) * bs <= committed:
            self.pool.register_full_blocks(
                request.block_ids, request.block_hashes, request.all_token_ids, committed, request.block_extra_keys
            )
        if self.snapshots is not None:
            self._take_snapshots(item, start, committed)
        if request.status.finished:
            self.finish(request, request.status)
        return request.status.finished

    def _take_snapshots(self, item: ScheduledRequest, start: int, committed: int) -> None:
        """Snapshot points this step reached: block ends in (start, committed] that are multiples of
        mamba_block_size, and the last one (the request's latest, held while it runs, so a resume
        or the next turn of a conversation finds it). Without per-token captures (no drafts) the
        state exists only at the step's end."""
        request, bs, mbs = item.request, self.block_size, self.mamba_block_size
        last = committed // bs * bs
        if last <= start or (not item.num_drafts and last != committed):
            return
        first = last if not item.num_drafts else (start // bs + 1) * bs
        for m in range(first, last + 1, bs):
            if m % mbs and m != last:
                continue
            key = request.block_hashes[m // bs - 1]
            slot = self.snapshots.take(key)
            if slot is not None:
                self.snapshot_jobs.append(SnapshotJob(item, m - start, slot))
            if m == last:
                self._hold_latest(request, key, m)

    def _hold_latest(self, request: Request, key: bytes, position: int) -> None:
        slot = self.snapshots.cached.get(key)
        if slot is None:  # every slot held: nothing new to hold
            return
        previous, request.held_snapshot = request.held_snapshot, slot
        self.snapshots.hold(slot)
        if previous is not None:
            self.snapshots.unhold(previous)
            # --mamba-cache-mode align keeps prefill snapshots (mamba_block_size multiples and the
            # prompt's last block end); a superseded decode snapshot goes.
            prompt_end = (request.num_prompt_tokens - 1) // self.block_size * self.block_size
            old = request.held_position
            if not self.keep_every_snapshot and old % self.mamba_block_size and old > prompt_end:
                key_of = self.snapshots.key_of[previous]
                if key_of is not None and self.snapshots.ref_count[previous] == 0:
                    self.snapshots.drop(key_of)
        request.held_position = position

    def take_snapshot_jobs(self) -> list[SnapshotJob]:
        jobs, self.snapshot_jobs = self.snapshot_jobs, []
        return jobs

    def _check_stop(self, request: Request, token: int) -> bool:
        params = request.params
        if len(request.output_token_ids) >= params.min_tokens:
            if token in params.stop_token_ids:
                request.status, request.stop_reason = RequestStatus.FINISHED_STOPPED, token
                return True
            if not params.ignore_eos and token in self.eos_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                return True
        if params.max_tokens is not None and len(request.output_token_ids) >= params.max_tokens:
            request.status = RequestStatus.FINISHED_LENGTH
            return True
        if request.num_tokens >= request.max_total_tokens:
            request.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Take a request out of the running set (stop token, length, or a stop string that the
        engine's detokenizer found) and free what it holds."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        self._release(request)

    def fail(self, request: Request) -> None:
        """Take out a request the engine failed to process, in whatever state the failure left it
        (running, waiting, or already finished and released this step), and free what it holds."""
        if request in self.waiting:
            self.waiting.remove(request)
        self.finish(request, RequestStatus.FINISHED_ERROR)
