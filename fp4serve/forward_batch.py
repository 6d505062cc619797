"""ForwardBatch: the flat tensors one model forward needs, built by `build_batch` from one
`SequenceRows` per sequence (the runner, the drafters, quality eval and the tests all build them
this way), read by the layers. `StepCaptures` is what layers hand back from that forward."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SequenceRows:
    """One sequence's rows in a forward: `token_ids` at positions start, start + 1, ...; the tokens
    before `start` are already in the caches. block_ids[j] holds positions j*block_size ..; the
    last `num_drafts` tokens are drafts to verify."""

    token_ids: list[int]
    start: int
    block_ids: list[int]
    state_slot: int = 0  # the sequence's GDN state slot
    num_drafts: int = 0
    # Sequences with images: the M-RoPE (t, h, w) position of each row [3, len(token_ids)], and the
    # encoder embeddings that replace the rows of image placeholder tokens, as (first row, [n, H]).
    mrope_positions: torch.Tensor | None = None
    embeds: tuple[tuple[int, torch.Tensor], ...] = ()


@dataclass
class VerifiedStates:
    """A GDN layer's record of one verified sequence: what restoring to any accepted prefix needs."""

    slot: int
    conv_inputs: torch.Tensor  # [K-1+T, C]: the conv window before the step, then the step's inputs
    states: torch.Tensor  # [T, Hv, dk, dv] fp32: the recurrent state after each of the T tokens


@dataclass
class StepCaptures:
    """What layers hand back from one forward, besides its output: created with the batch, so it
    lives exactly as long as the step (nothing is left on modules for another file to read)."""

    # hidden-state taps the caller asked for (layer index -> [T, H]); see ForwardBatch.capture_layers
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    # per GDN layer, per verified sequence (index into the batch)
    verified: dict[object, dict[int, VerifiedStates]] = field(default_factory=dict)


@dataclass
class ForwardBatch:
    """Tokens of several sequences laid end to end ("varlen"), sequence i owning rows
    query_start[i]:query_start[i+1]. Per-sequence lists stay Python lists: CPU code loops over
    them, and turning them into tensors on every access would cost more than it saves."""

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long, absolute position of each token in its sequence
    query_lens: list[int]  # tokens scheduled this step, per sequence
    num_computed: list[int]  # tokens already in the caches before this step, per sequence
    slot_mapping: torch.Tensor  # [T] long, KV slot (block * block_size + offset) of each token
    block_tables: torch.Tensor  # [B, max_blocks] long, padded
    context_lens: torch.Tensor  # [B] long, num_computed + query_len
    state_slots: torch.Tensor  # [B] long, GDN state slot of each sequence
    query_start_loc: torch.Tensor  # [B + 1] long, sequence i's rows are [loc[i], loc[i+1]) (GPU kernels)
    block_size: int
    # Draft tokens at the end of each sequence's rows (speculative verification): layers with
    # recurrent state keep the state after each of them in `captures`, so a partial acceptance
    # can be restored.
    num_drafts: list[int] | None = None
    block_ids: list[list[int]] | None = None  # the unpadded block tables, per sequence
    # Decoder layers whose output the model keeps in captures.hidden (a drafter's target features;
    # the last layer's entry is taken after the final norm, as transformers reports it).
    capture_layers: tuple[int, ...] = ()
    # Set the K/V scales of a quantized KV cache from this forward's amax (--calculate-kv-scales).
    calibrate_kv_scales: bool = False
    captures: StepCaptures = field(default_factory=StepCaptures)
    # Set when a sequence has images: [3, T] M-RoPE positions (text rows repeat `positions`), and
    # the rows whose token embeddings the image embeddings replace ([N] long, [N, H]).
    mrope_positions: torch.Tensor | None = None
    embed_rows: torch.Tensor | None = None
    embed_values: torch.Tensor | None = None

    def __post_init__(self):
        starts = [0]
        for n in self.query_lens:
            starts.append(starts[-1] + n)
        self.query_start = starts
        self.decode_only = all(n == 1 for n in self.query_lens)
        self._memo: dict = {}

    def memo(self, key, compute):
        """Per-step values every layer would otherwise recompute (rotary cos/sin, gather indices)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return self.query_start[-1]

    def seq_rows(self, i: int) -> slice:
        return slice(self.query_start[i], self.query_start[i + 1])


def build_batch(
    seqs: Sequence[SequenceRows],
    block_size: int,
    device: torch.device | str | None = None,
    pad_block: int = 0,
    **options,
) -> ForwardBatch:
    """The ForwardBatch of `seqs`: positions, KV slots and context lengths follow from each
    sequence's start, tokens and blocks. pad_block fills the block table past a sequence's own
    blocks (never read: attention stops at context_lens). options: capture_layers,
    calibrate_kv_scales."""
    ids, positions, slots = [], [], []
    for seq in seqs:
        end = seq.start + len(seq.token_ids)
        if -(-end // block_size) > len(seq.block_ids):
            raise ValueError(f"{len(seq.block_ids)} KV blocks of {block_size} cannot hold positions up to {end - 1}")
        ids += seq.token_ids
        positions += range(seq.start, end)
        blocks = seq.block_ids
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(seq.start, end)]
    width = max(len(s.block_ids) for s in seqs)
    table = [s.block_ids + [pad_block] * (width - len(s.block_ids)) for s in seqs]

    def tensor(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    if any(s.mrope_positions is not None or s.embeds for s in seqs):
        options.update(_multimodal_rows(seqs, tensor(positions), device))
    return ForwardBatch(
        input_ids=tensor(ids),
        positions=tensor(positions),
        query_lens=[len(s.token_ids) for s in seqs],
        num_computed=[s.start for s in seqs],
        slot_mapping=tensor(slots),
        block_tables=tensor(table),
        context_lens=tensor([s.start + len(s.token_ids) for s in seqs]),
        state_slots=tensor([s.state_slot for s in seqs]),
        query_start_loc=tensor([0, *itertools.accumulate(len(s.token_ids) for s in seqs)]),
        block_size=block_size,
        num_drafts=[s.num_drafts for s in seqs],
        block_ids=[s.block_ids for s in seqs],
        **options,
    )


def _multimodal_rows(seqs: Sequence[SequenceRows], positions: torch.Tensor, device) -> dict:
    """ForwardBatch's mrope_positions, embed_rows and embed_values for sequences laid end to end."""
    mrope, rows, values = [], [], []
    first = 0
    for seq, n in ((s, len(s.token_ids)) for s in seqs):
        own = seq.mrope_positions
        mrope.append(own.to(device) if own is not None else positions[first : first + n].expand(3, n))
        for offset, embeds in seq.embeds:
            rows.append(torch.arange(first + offset, first + offset + len(embeds), device=device))
            values.append(embeds)
        first += n
    out = {"mrope_positions": torch.cat(mrope, dim=1)}
    if rows:
        out["embed_rows"], out["embed_values"] = torch.cat(rows), torch.cat(values).to(device)
    return out
