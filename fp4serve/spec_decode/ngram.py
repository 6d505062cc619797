"""N-gram prompt lookup: propose the tokens that followed the latest earlier occurrence of the
sequence's longest suffix n-gram (n from prompt_lookup_max down to prompt_lookup_min).

Free to run (no model), and strong wherever the output copies its input: code edits, extraction,
summaries that quote. Searches with numpy over the last `max_window` tokens (vLLM's ngram proposer
also looks back a bounded distance), so the cost per step stays flat on long contexts."""
from __future__ import annotations

import numpy as np

from fp4serve.spec_decode.proposer import CommittedStep, Proposer, Reserve


class NgramProposer(Proposer):
    def __init__(self, k: int, min_n: int, max_n: int, max_window: int = 4096):
        self.k, self.min_n, self.max_n, self.max_window = k, min_n, max_n, max_window

    def propose(self, requests, limits: list[int], committed: CommittedStep, reserve: Reserve) -> list[list[int]]:
        """Drafts from each request's own tokens; the step's tensors are not needed."""
        return [self.lookup(r.all_token_ids, k) for r, k in zip(requests, limits)]

    def lookup(self, token_ids: list[int], k: int | None = None) -> list[int]:
        """Up to k (default self.k) draft tokens continuing `token_ids`; [] when no n-gram matches."""
        k = self.k if k is None else k
        if k <= 0:
            return []
        tokens = np.asarray(token_ids[-self.max_window :], dtype=np.int64)
        total = len(tokens)
        for n in range(min(self.max_n, total - 1), self.min_n - 1, -1):
            suffix = tokens[total - n :]
            # Windows starting at 0 .. total - n - 1: every earlier occurrence, never the suffix itself.
            windows = np.lib.stride_tricks.sliding_window_view(tokens[: total - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n  # the most recent occurrence: the likeliest continuation
                return tokens[start : start + k].tolist()
        return []
