"""The draft acceptance rate over a recent window against its running level, and a warning when it
collapses while the request mix has not changed (docs/speculative.md, "Acceptance watchdog").

A drafter that decays silently (say, rejected drafts corrupting a shared cache) costs several times
the throughput and changes no output, so nothing else notices it. The watch keeps:

- the recent window: the latest verifications holding WINDOW_DRAFT_TOKENS draft tokens, whatever time
  they span (a fixed token count makes the rate equally noisy at any load);
- the running level: every verification since start that has left the window, so a decay is never
  diluted into its own baseline.

It warns once per episode when the recent rate is below FALL_RATIO of the running level and at
least MIN_FALL under it, both windows hold enough tokens, the window spans at least MIN_REQUESTS
requests (a single hard prompt is no episode), and the mix is the same: the window's typical prompt
length (geometric mean: shorter and longer prompts count alike) within PROMPT_LENGTH_FACTOR of the
running one, its share of greedy verifications within GREEDY_SHARE_DELTA of the running share. It
re-arms once the recent rate is back to REARM_RATIO of the running level at the warning: the
running level goes on taking in the decayed tokens, and against it a still-broken drafter would
look recovered.

The engine thread observes; the server reads rates() from another thread, so both take one lock.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter, deque
from dataclasses import dataclass

log = logging.getLogger(__name__)

WINDOW_DRAFT_TOKENS = 2000
MIN_RUNNING_DRAFT_TOKENS = 2000  # before the window; fewer and the running level is not yet a level
MIN_REQUESTS = 8
FALL_RATIO = 0.5
MIN_FALL = 0.10  # so that a drafter that rarely hits anyway (n-gram on prose) is not called broken
REARM_RATIO = 0.75  # above FALL_RATIO: a rate hovering at the threshold warns once, not on every crossing
PROMPT_LENGTH_FACTOR = 2.0
GREEDY_SHARE_DELTA = 0.2


@dataclass(frozen=True)
class Verification:
    """One request's verification step that carried drafts."""

    request_id: str
    num_draft_tokens: int
    num_accepted: int
    prompt_len: int
    greedy: bool


@dataclass
class Totals:
    verifications: int = 0
    draft_tokens: int = 0
    accepted: int = 0
    log_prompt_len: float = 0.0
    greedy: int = 0

    def add(self, v: Verification, sign: int = 1) -> None:
        self.verifications += sign
        self.draft_tokens += sign * v.num_draft_tokens
        self.accepted += sign * v.num_accepted
        self.log_prompt_len += sign * math.log(v.prompt_len)
        self.greedy += sign * v.greedy

    @property
    def rate(self) -> float:
        """accepted / draft tokens; NaN (Prometheus' "no value") before any draft token."""
        return self.accepted / self.draft_tokens if self.draft_tokens else math.nan

    @property
    def typical_prompt_len(self) -> float:
        return math.exp(self.log_prompt_len / self.verifications)

    @property
    def greedy_share(self) -> float:
        return self.greedy / self.verifications


class AcceptanceWatch:
    def __init__(
        self,
        method: str,
        window_draft_tokens: int = WINDOW_DRAFT_TOKENS,
        min_running_draft_tokens: int = MIN_RUNNING_DRAFT_TOKENS,
        min_requests: int = MIN_REQUESTS,
    ):
        self.method = method
        self.window_draft_tokens = window_draft_tokens
        self.min_running_draft_tokens = min_running_draft_tokens
        self.min_requests = min_requests
        self._lock = threading.Lock()
        self._window: deque[Verification] = deque()
        self._recent = Totals()
        self._running = Totals()
        self._requests_in_window: Counter[str] = Counter()
        self.armed = True
        self._episode_baseline = math.nan  # the running rate when the standing warning was given

    def observe(self, request_id: str, num_draft_tokens: int, num_accepted: int, prompt_len: int,
                greedy: bool) -> None:  # fmt: skip
        """One request's verification step: num_draft_tokens proposed, num_accepted of them kept."""
        if num_draft_tokens == 0:
            return
        with self._lock:
            self._push(Verification(request_id, num_draft_tokens, num_accepted, prompt_len, greedy))
            self._check()

    def rates(self) -> tuple[float, float]:
        """(recent, running) acceptance rates; NaN where a window holds no draft token yet."""
        with self._lock:
            return self._recent.rate, self._running.rate

    def _push(self, v: Verification) -> None:
        self._window.append(v)
        self._recent.add(v)
        self._requests_in_window[v.request_id] += 1
        # Keep the fewest verifications that still hold the window's tokens; older ones join the running level.
        while self._recent.draft_tokens - self._window[0].num_draft_tokens >= self.window_draft_tokens:
            old = self._window.popleft()
            self._recent.add(old, -1)
            self._running.add(old)
            self._requests_in_window[old.request_id] -= 1
            if not self._requests_in_window[old.request_id]:
                del self._requests_in_window[old.request_id]

    def _check(self) -> None:
        recent, running = self._recent, self._running
        if recent.draft_tokens < self.window_draft_tokens or running.draft_tokens < self.min_running_draft_tokens:
            return
        if self.armed and self._fallen() and self._mix_unchanged():
            self.armed, self._episode_baseline = False, running.rate
            log.warning(
                "draft acceptance for %s fell to %.1f%% over the last %d draft tokens from a running %.1f%% "
                "(%d earlier draft tokens) with an unchanged request mix (typical prompt %.0f vs %.0f tokens, "
                "greedy %.0f%% vs %.0f%% of verifications, %d requests): a cache-corruption symptom "
                '(see docs/speculative.md, "Acceptance watchdog"); restart the server, or report it',
                self.method, 100 * recent.rate, recent.draft_tokens, 100 * running.rate, running.draft_tokens,
                recent.typical_prompt_len, running.typical_prompt_len, 100 * recent.greedy_share,
                100 * running.greedy_share, len(self._requests_in_window),
            )  # fmt: skip
        elif not self.armed and recent.rate >= REARM_RATIO * self._episode_baseline:
            self.armed = True
            log.info(
                "draft acceptance for %s recovered to %.1f%% over the last %d draft tokens (%.1f%% before the "
                "fall); the acceptance watchdog is armed again",
                self.method, 100 * recent.rate, recent.draft_tokens, 100 * self._episode_baseline,
            )  # fmt: skip

    def _fallen(self) -> bool:
        recent, running = self._recent.rate, self._running.rate
        return recent < FALL_RATIO * running and running - recent >= MIN_FALL

    def _mix_unchanged(self) -> bool:
        recent, running = self._recent, self._running
        length_ratio = recent.typical_prompt_len / running.typical_prompt_len
        return (
            len(self._requests_in_window) >= self.min_requests
            and 1 / PROMPT_LENGTH_FACTOR <= length_ratio <= PROMPT_LENGTH_FACTOR
            and abs(recent.greedy_share - running.greedy_share) <= GREEDY_SHARE_DELTA
        )
