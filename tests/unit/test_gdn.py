"""Gated DeltaNet references: chunked == recurrent rule (and == transformers' torch versions), conv
window carry, and the layer's slot handling: batched decode == one sequence at a time, any split of a
sequence == the whole sequence, fresh sequences ignore what their slot held."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fp4serve.forward_batch import ForwardBatch, SequenceRows, build_batch
from fp4serve.layers.gdn import (
    GatedDeltaNet,
    causal_conv1d,
    chunk_gated_delta_rule,
    l2norm,
    recurrent_gated_delta_rule,
)

ATOL = 2e-5


def _inputs(B=2, T=150, Hk=2, Hv=4, dk=16, dv=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = l2norm(torch.randn(B, T, Hk, dk, generator=gen))
    k = l2norm(torch.randn(B, T, Hk, dk, generator=gen))
    v = torch.randn(B, T, Hv, dv, generator=gen)
    g = -F.softplus(torch.randn(B, T, Hv, generator=gen))  # log decay <= 0
    beta = torch.rand(B, T, Hv, generator=gen)
    state = torch.randn(B, Hv, dk, dv, generator=gen)
    return q, k, v, g, beta, state


@pytest.mark.parametrize("T", [1, 37, 64, 150])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_rule_matches_recurrent(T, with_state):
    q, k, v, g, beta, state = _inputs(T=T)
    init = state if with_state else None
    out_r, final_r = recurrent_gated_delta_rule(q, k, v, g, beta, init)
    out_c, final_c = chunk_gated_delta_rule(q, k, v, g, beta, init)
    torch.testing.assert_close(out_c, out_r, atol=ATOL, rtol=0)
    torch.testing.assert_close(final_c, final_r, atol=ATOL, rtol=0)


def test_rules_match_transformers():
    qwen = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
    gen = torch.Generator().manual_seed(1)
    q_raw, k_raw = torch.randn(2, 90, 2, 16, generator=gen), torch.randn(2, 90, 2, 16, generator=gen)
    _, _, v, g, beta, state = _inputs(T=90, seed=2)
    for ours, theirs in (
        (recurrent_gated_delta_rule, qwen.torch_recurrent_gated_delta_rule),
        (chunk_gated_delta_rule, qwen.torch_chunk_gated_delta_rule),
    ):
        out, final = ours(l2norm(q_raw), l2norm(k_raw), v, g, beta, state)
        ref, ref_final = theirs(
            q_raw, k_raw, v, g, beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True
        )
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(final, ref_final, atol=ATOL, rtol=0)


def test_rule_split_carries_state():
    q, k, v, g, beta, state = _inputs(T=150)
    whole, whole_final = chunk_gated_delta_rule(q, k, v, g, beta, state)
    first, mid = chunk_gated_delta_rule(q[:, :50], k[:, :50], v[:, :50], g[:, :50], beta[:, :50], state)
    second, final = chunk_gated_delta_rule(q[:, 50:], k[:, 50:], v[:, 50:], g[:, 50:], beta[:, 50:], mid)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=ATOL, rtol=0)
    torch.testing.assert_close(final, whole_final, atol=ATOL, rtol=0)


def test_causal_conv1d_window_carry():
    gen = torch.Generator().manual_seed(3)
    x, weight = torch.randn(2, 20, 12, generator=gen), torch.randn(12, 4, generator=gen)
    # the plain form: left-pad by K-1, depthwise conv, SiLU
    ref = F.silu(F.conv1d(x.transpose(1, 2), weight[:, None], padding=3, groups=12)[..., :20]).transpose(1, 2)
    window = torch.zeros(2, 3, 12)
    pieces = []
    for s, e in ((0, 2), (2, 3), (3, 11), (11, 20)):  # pieces shorter than the window too
        out, window = causal_conv1d(x[:, s:e], window, weight)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(window, x[:, -3:])


def _layer(slots=8, seed=4) -> GatedDeltaNet:
    torch.manual_seed(seed)
    layer = GatedDeltaNet(32, 2, 4, head_k_dim=8, head_v_dim=8, conv_kernel=4, eps=1e-6, dtype=torch.float32)
    for p in layer.parameters():
        p.normal_(0, 0.3)
    layer.A_log.copy_(torch.empty(4).uniform_(1, 8).log())
    # stale slot contents: random, as a previous owner would leave them
    spec = layer.cache_spec().tensors
    layer.bind_cache(**{name: torch.randn(slots, *shape, dtype=dtype) for name, shape, dtype in spec})
    return layer


def _batch(query_lens, num_computed, slots, num_drafts=None) -> ForwardBatch:
    """Only what GDN reads: per-sequence lengths, cached counts and state slots."""
    drafts = num_drafts or [0] * len(slots)
    seqs = [
        SequenceRows([0] * q, c, [0] * (-(-(c + q) // 16)), slot, k)
        for q, c, slot, k in zip(query_lens, num_computed, slots, drafts)
    ]
    return build_batch(seqs, 16)


def _snapshot(layer):
    return layer.conv_state.clone(), layer.recurrent_state.clone()


def _restore(layer, snap):
    layer.conv_state.copy_(snap[0])
    layer.recurrent_state.copy_(snap[1])


def test_batched_decode_matches_per_sequence():
    layer = _layer()
    x = torch.randn(4, 32)
    slots, done = [3, 0, 5, 2], [17, 4, 0, 9]  # the third is a fresh one-token prompt
    start = _snapshot(layer)
    with torch.inference_mode():
        batched = layer(x, _batch([1] * 4, done, slots))
        after = _snapshot(layer)
        for i in range(4):
            _restore(layer, start)
            alone = layer(x[i : i + 1], _batch([1], [done[i]], [slots[i]]))
            torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-6, rtol=0)
            torch.testing.assert_close(after[0][slots[i]], layer.conv_state[slots[i]], atol=1e-6, rtol=0)
            torch.testing.assert_close(after[1][slots[i]], layer.recurrent_state[slots[i]], atol=1e-6, rtol=0)
    untouched = [s for s in range(8) if s not in slots]
    torch.testing.assert_close(after[1][untouched], start[1][untouched], atol=0, rtol=0)


def test_any_split_equals_whole_sequence():
    """Whole prefill == 13-token chunk + 7 decodes, batched beside another sequence's prefill; stale slot ignored."""
    layer = _layer()
    x, other = torch.randn(20, 32), torch.randn(9, 32)
    with torch.inference_mode():
        whole = layer(x, _batch([20], [0], [1]))
        final = layer.recurrent_state[1].clone()
        layer.recurrent_state[1].normal_()  # stale content the fresh sequence must not read
        layer.conv_state[1].normal_()
        pieces = [layer(torch.cat([x[:13], other]), _batch([13, 9], [0, 0], [1, 6]))[:13]]
        for t in range(13, 20):
            pieces.append(layer(torch.cat([other[:1], x[t : t + 1]]), _batch([1, 1], [9 + t - 13, t], [6, 1]))[1:])
    torch.testing.assert_close(torch.cat(pieces), whole, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.recurrent_state[1], final, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kept", [1, 2, 4, 5])
def test_verification_rollback_equals_never_seeing_rejected_tokens(kept):
    """Two sequences verify 1 + 4 tokens in one step (beside a third's decode); keeping the first
    `kept` of sequence 0's tokens (all of sequence 1's) leaves exactly the states of a run that
    decoded only those tokens, one at a time, and the outputs of the kept rows are that run's."""
    layer = _layer()
    gen = torch.Generator().manual_seed(7)
    prefix, verified, other, decode = (torch.randn(n, 32, generator=gen) for n in (9, 5, 5, 1))
    with torch.inference_mode():
        layer(torch.cat([prefix, prefix]), _batch([9, 9], [0, 0], [2, 5]))  # both sequences share a 9-token prefill
        start = _snapshot(layer)
        x = torch.cat([verified, other, decode])
        batch = _batch([5, 5, 1], [9, 9, 3], [2, 5, 7], num_drafts=[4, 4, 0])
        out = layer(x, batch)
        # sequence 1 accepted everything: nothing to restore
        layer.restore_verified(batch.captures.verified[layer], {0: kept})
        rolled = _snapshot(layer)
        _restore(layer, start)
        reference = [layer(verified[t : t + 1], _batch([1], [9 + t], [2])) for t in range(kept)]
        for t in range(5):
            layer(other[t : t + 1], _batch([1], [9 + t], [5]))
        after = _snapshot(layer)
    torch.testing.assert_close(out[:kept], torch.cat(reference), atol=ATOL, rtol=0)
    for slot in (2, 5):
        torch.testing.assert_close(rolled[0][slot], after[0][slot], atol=ATOL, rtol=0)  # in_proj rounding varies with batch shape
        torch.testing.assert_close(rolled[1][slot], after[1][slot], atol=ATOL, rtol=0)
