"""Vision-tower outputs by image digest, least recently used first out, bounded in embedding rows.

A chunked prefill needs an image's embeddings in every chunk that covers part of it, a preempted
request needs them again, and a conversation resends its earlier images with every turn: each is
encoded once while it stays here. The entry just added is never evicted, so an image larger than
the bound is still kept for the rest of its prefill."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from fp4serve.multimodal.inputs import ImageInput

DEFAULT_MAX_ROWS = 16384  # 27B-class hidden 5120 in bf16: 160 MiB at most


class EncoderCache:
    def __init__(self, encode: Callable[[Sequence[ImageInput]], list[torch.Tensor]], max_rows: int = DEFAULT_MAX_ROWS):
        self.encode = encode
        self.max_rows = max_rows
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.rows = 0
        self.hits = 0
        self.misses = 0

    def embeddings(self, images: Sequence[ImageInput]) -> dict[str, torch.Tensor]:
        """digest -> [num_tokens, hidden] for every image; the missing ones encoded in one pass."""
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, ImageInput] = {}
        for image in images:
            if image.digest in self.entries:
                self.entries.move_to_end(image.digest)
                found[image.digest] = self.entries[image.digest]
                self.hits += 1
            elif image.digest not in missing:
                missing[image.digest] = image
                self.misses += 1
        if missing:
            for digest, output in zip(missing, self.encode(list(missing.values())), strict=True):
                found[digest] = output
                self._keep(digest, output)
        return found

    def _keep(self, digest: str, output: torch.Tensor) -> None:
        self.entries[digest] = output
        self.rows += len(output)
        while self.rows > self.max_rows and len(self.entries) > 1:
            _, evicted = self.entries.popitem(last=False)
            self.rows -= len(evicted)
