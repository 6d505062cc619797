"""A prompt's images after preprocessing: pixels, grids and digests (ImageInput), and where their
tokens sit once each image's one placeholder token is expanded to the number of embeddings the
vision tower makes of it (MultimodalPrompt)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fp4serve.errors import InvalidRequestError
from fp4serve.multimodal.mrope import Grid, mrope_positions


@dataclass(frozen=True, eq=False)
class ImageInput:
    """One preprocessed image: patch rows [t*h*w, C*T*P*P] and the (t, h, w) patch grid. The digest
    (sha256 of grid and pixels) is what prefix-cache hashes and the encoder cache key on."""

    pixel_values: torch.Tensor
    grid: Grid
    digest: str

    @classmethod
    def of(cls, pixel_values: torch.Tensor, grid: Sequence[int]) -> ImageInput:
        pixels = pixel_values.detach().to("cpu", torch.float32).contiguous()
        digest = hashlib.sha256(repr(tuple(grid)).encode())
        digest.update(pixels.numpy().tobytes())
        return cls(pixels, tuple(int(g) for g in grid), digest.hexdigest())


@dataclass(frozen=True, eq=False)
class PlacedImage:
    image: ImageInput
    offset: int  # index of its first placeholder token in the expanded prompt
    num_tokens: int

    @property
    def end(self) -> int:
        return self.offset + self.num_tokens


@dataclass(eq=False)
class MultimodalPrompt:
    images: list[PlacedImage]
    positions: torch.Tensor  # [3, prompt length] M-RoPE positions
    delta: int  # a token at index i past the prompt sits at i + delta

    def mrope_rows(self, start: int, end: int) -> torch.Tensor:
        """Positions [3, end - start] of tokens start..end-1 (prompt, then generated tokens)."""
        length = self.positions.shape[1]
        past = torch.arange(max(start, length), max(end, length)) + self.delta
        return torch.cat((self.positions[:, start:end], past.expand(3, -1)), dim=1)

    def images_in(self, start: int, end: int) -> list[PlacedImage]:
        return [p for p in self.images if p.offset < end and p.end > start]

    def block_keys(self, block_size: int) -> list[tuple[str, ...]]:
        """Per prompt block, the digests of the images with tokens in it (() for text-only blocks):
        what the prefix cache adds to those blocks' hashes, so another image never hits."""
        num_blocks = -(-self.positions.shape[1] // block_size)
        return [
            tuple(p.image.digest for p in self.images_in(b * block_size, (b + 1) * block_size))
            for b in range(num_blocks)
        ]


def expand_placeholders(
    token_ids: list[int],
    images: Sequence[ImageInput],
    image_token_id: int,
    num_tokens: Callable[[Grid], int],
    merge: int,
) -> tuple[list[int], MultimodalPrompt]:
    """The prompt with each image's single placeholder token (as chat templates render it) repeated
    once per embedding of that image, and where each image and position lies."""
    found = [i for i, t in enumerate(token_ids) if t == image_token_id]
    if len(found) != len(images):
        raise InvalidRequestError(
            f"the prompt has {len(found)} image placeholder tokens (id {image_token_id}) for {len(images)} images: "
            "each image needs exactly one where it belongs (the chat template writes it)",
            "messages",
        )
    expanded: list[int] = []
    placed: list[PlacedImage] = []
    previous = 0
    for index, image in zip(found, images):
        expanded += token_ids[previous:index]
        n = num_tokens(image.grid)
        placed.append(PlacedImage(image, len(expanded), n))
        expanded += [image_token_id] * n
        previous = index + 1
    expanded += token_ids[previous:]
    positions, delta = mrope_positions(len(expanded), [(p.offset, p.image.grid) for p in placed], merge)
    return expanded, MultimodalPrompt(placed, positions, delta)
