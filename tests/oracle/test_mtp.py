"""The Qwen3.5 MTP head against a direct reimplementation from transformers' own Qwen3.5 modules.

The reference applies docs/reference.md s.5 with no cache: rows (token_{t+1}, h_t) at positions 0..T-1,
h_t the target's final-norm output (transformers' last_hidden_state), fc over [norm_e(embed), norm_h(h)],
transformers' decoder layer with a causal mask, norm; a draft step j > 1 is one more row fed the
previous output and draft. fp4serve's head runs on paged KV (block size 16), chunked, batched, and
through rounds of draft -> partial acceptance -> draft, where rejected rows were written to its KV.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from spec_checkpoints import VOCAB, make_mtp_target

from fp4serve.config import ModelInfo
from fp4serve.engine.cache import allocate_caches
from fp4serve.errors import CheckpointError
from fp4serve.formats.safetensors_io import iter_tensors
from fp4serve.forward_batch import ForwardBatch, SequenceRows, build_batch
from fp4serve.models.mtp import Qwen3_5MTP, iter_mtp_tensors
from fp4serve.models.registry import model_class

ATOL = 1e-4
BLOCK = 16
MAX_BLOCKS = 8


@pytest.fixture(scope="module", params=["dense", "moe"])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"mtp-{request.param}")
    hf = make_mtp_target(path, moe=request.param == "moe")
    info = ModelInfo.load(path)
    target = model_class(info.architectures)(info.text_config, torch.float32)
    target.load_weights(iter_tensors(path))  # drops mtp.* by name
    mtp = Qwen3_5MTP(target)
    mtp.load_weights(iter_mtp_tensors(path))
    allocate_caches(mtp.cache_layers(), 2, 2**22, BLOCK, torch.float32, torch.device("cpu"))
    # two committed histories and the target's hidden states over them (a prefix's are a prefix)
    tokens = {s: _tokens(48, s) for s in (0, 1)}
    hidden = {s: target_hidden(hf, t) for s, t in tokens.items()}
    return SimpleNamespace(hf=hf, mtp=mtp, path=path, target=target, tokens=tokens, hidden=hidden)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def target_hidden(hf, tokens: list[int]) -> torch.Tensor:
    return hf.model(input_ids=torch.tensor([tokens])).last_hidden_state[0]


@torch.inference_mode()
def reference(hf, tokens: list[int], hidden: torch.Tensor) -> torch.Tensor:
    """MTP outputs [T, H] of rows (tokens[t], hidden[t]) at positions 0..T-1, no cache."""
    m = hf.mtp
    embeds = m.pre_fc_norm_embedding(hf.model.embed_tokens(torch.tensor(tokens)))
    x = m.fc(torch.cat([embeds, m.pre_fc_norm_hidden(hidden)], dim=-1))[None]
    T = x.shape[1]
    positions = torch.arange(T)[None]
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    rotary = hf.model.rotary_emb(x, positions)
    x = m.layers[0](x, position_embeddings=rotary, attention_mask=mask, position_ids=positions)
    return m.norm(x)[0]


def reference_drafts(hf, tokens: list[int], hidden: torch.Tensor, k: int, first=None) -> tuple[list[int], list]:
    """k greedy drafts after rows (tokens, hidden), reusing the layer on its own output; `first`:
    reference(hf, tokens, hidden) when the caller has it."""
    drafts, outs = [], []
    for i in range(k):
        out = (first if i == 0 and first is not None else reference(hf, tokens, hidden))[-1]
        outs.append(out)
        with torch.inference_mode():
            drafts.append(int(hf.lm_head(out).argmax()))
        tokens, hidden = tokens + [drafts[-1]], torch.cat([hidden, out[None]])
    return drafts, outs


def make_batch(work: list[tuple[int, int, int]], ids: list[list[int]]) -> ForwardBatch:
    """(slot, first position, number of rows) per sequence and its row ids; slot s owns KV blocks
    [s*8, (s+1)*8)."""
    seqs = [
        SequenceRows(list(t), start, list(range(slot * MAX_BLOCKS, (slot + 1) * MAX_BLOCKS)), slot)
        for (slot, start, _), t in zip(work, ids)
    ]
    return build_batch(seqs, BLOCK)


def test_head_layout(pair):
    hf, mtp, path, target = pair.hf, pair.mtp, pair.path, pair.target
    names = [n for n, _ in iter_mtp_tensors(path)]
    assert all(n.startswith("mtp.") for n in names)
    if not hasattr(hf.config, "num_experts"):
        assert len(names) == 15  # docs/reference.md s.5: 15 tensors for the dense head
    assert mtp.target.embed_tokens is target.model.embed_tokens and mtp.target.lm_head is target.lm_head
    assert not any("embed_tokens" in n or "lm_head" in n for n, _ in mtp.named_parameters())


def test_chunked_batched_forward_matches_transformers(pair):
    """Two sequences, rows fed in 7-row chunks beside each other: every row equals the reference."""
    hf, mtp = pair.hf, pair.mtp
    seqs = {0: pair.tokens[0][:46], 1: pair.tokens[1][:20]}
    hidden = {s: pair.hidden[s][: len(t)] for s, t in seqs.items()}
    got = {0: [], 1: []}
    for start in range(0, 45, 7):
        work = [(s, start, min(7, len(t) - 1 - start)) for s, t in seqs.items() if start < len(t) - 1]
        batch = make_batch(work, [seqs[s][p + 1 : p + 1 + n] for s, p, n in work])
        feats = torch.cat([hidden[s][p : p + n] for s, p, n in work])
        with torch.inference_mode():
            out = mtp(batch, feats)
        for i, (s, _, _) in enumerate(work):
            got[s].append(out[batch.seq_rows(i)])
    for s, tokens in seqs.items():
        ref = reference(hf, tokens[1:], hidden[s][:-1])
        torch.testing.assert_close(torch.cat(got[s]), ref, atol=ATOL, rtol=0)
        with torch.inference_mode():
            torch.testing.assert_close(mtp.compute_logits(torch.cat(got[s])), hf.lm_head(ref), atol=ATOL, rtol=0)


def test_draft_rounds_with_partial_acceptance(pair):
    """Prefill, then rounds of: up to k = 3 drafts (a different count per sequence); verification
    rows P..P+k where only the first a+1 are committed (the rest carry junk tokens and hidden states,
    as rejected drafts would) and the MTP's first pass covers all of them; drafts from the last
    committed row. Each round's drafts and every pass's hidden states equal the reference over the
    committed history only."""
    hf, mtp = pair.hf, pair.mtp
    k = 3
    truth, hidden = pair.tokens, pair.hidden
    committed = {0: 13, 1: 6}  # rows 0..P-1 computed; the MTP sees token P (just sampled) as row P-1's id
    passes: list[torch.Tensor] = []
    hook = mtp.mtp.norm.register_forward_hook(lambda mod, args, out: passes.append(out))
    gen = torch.Generator().manual_seed(5)
    try:
        work = [(s, 0, committed[s]) for s in truth]
        for round_index in range(3):
            counts = [k, round_index]  # the second sequence drafts 0, 1, 2 tokens
            ids, feats, goods = [], [], []
            for s, start, n in work:
                good = committed[s] - start  # rows with true tokens and hidden states
                junk = n - good
                junk_ids = torch.randint(0, VOCAB, (junk,), generator=gen).tolist()
                ids.append(truth[s][start + 1 : start + 1 + good] + junk_ids)
                feats += [hidden[s][start : start + good], torch.randn(junk, hidden[s].shape[1], generator=gen)]
                goods.append(good)
            batch = make_batch(work, ids)
            last_rows = [batch.query_start[i] + good - 1 for i, good in enumerate(goods)]
            passes.clear()
            drafts = mtp.propose(batch, torch.cat(feats), counts, last_rows)
            for i, (s, start, _) in enumerate(work):
                n_done = committed[s]
                first = reference(hf, truth[s][1 : n_done + 1], hidden[s][:n_done])
                rows = passes[0][batch.seq_rows(i)][: n_done - start]
                torch.testing.assert_close(rows, first[start:], atol=ATOL, rtol=0)
                if counts[i] == 0:
                    assert drafts[i] == []
                    continue
                ref_drafts, ref_outs = reference_drafts(
                    hf, truth[s][1 : n_done + 1], hidden[s][:n_done], counts[i], first
                )  # fmt: skip
                assert drafts[i] == ref_drafts
                for j in range(1, counts[i]):
                    row = [x for x in range(len(work)) if counts[x] > j].index(i)
                    torch.testing.assert_close(passes[j][row], ref_outs[j], atol=ATOL, rtol=0)
            assert len(passes) == max(counts)
            # verification of [token P, k drafts] at positions P..P+k; accept a random a of the k
            work = []
            for s in truth:
                a = int(torch.randint(0, k + 1, (1,), generator=gen))
                work.append((s, committed[s], k + 1))
                committed[s] += a + 1
    finally:
        hook.remove()


def _weights(path, drop=(), add=None):
    for name, tensor in iter_mtp_tensors(path):
        if name not in drop:
            yield name, tensor
    yield from (add or {}).items()


def test_strict_loading(pair):
    path, target = pair.path, pair.target
    fresh = Qwen3_5MTP(target)
    with pytest.raises(CheckpointError, match="no mtp"):
        fresh.load_weights((n, t) for n, t in iter_tensors(path) if not n.startswith("mtp."))
    with pytest.raises(CheckpointError, match=r"missing.*mtp\.layers\.0\.self_attn\.k_norm\.weight"):
        fresh.load_weights(_weights(path, drop={"mtp.layers.0.self_attn.k_norm.weight"}))
    with pytest.raises(CheckpointError, match=r"missing.*mtp\.layers\.0\.self_attn\.v_proj\.weight"):
        fresh.load_weights(_weights(path, drop={"mtp.layers.0.self_attn.v_proj.weight"}))
    with pytest.raises(CheckpointError, match=r"unexpected.*mtp\.layers\.1\.input_layernorm\.weight"):
        fresh.load_weights(_weights(path, add={"mtp.layers.1.input_layernorm.weight": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=r"mtp\.fc\.weight"):
        fresh.load_weights(_weights(path, drop={"mtp.fc.weight"}, add={"mtp.fc.weight": torch.zeros(64, 64)}))


def test_fused_expert_layout_loads_the_same(pair):
    """transformers' in-memory state dict (fused 3-D experts) loads into the same parameters."""
    hf, mtp, target = pair.hf, pair.mtp, pair.target
    fused = {f"mtp.{k}": v for k, v in hf.mtp.state_dict().items()}
    if not any("experts.gate_up_proj" in k for k in fused):
        pytest.skip("dense head: no experts")
    other = Qwen3_5MTP(target)
    other.load_weights(fused.items())
    for (name, a), (_, b) in zip(mtp.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), name


def test_bf16_head_built_like_the_target(pair):
    """Built for a bf16 target loaded as the engine loads it (oneDNN-packed where available): every
    parameter in bf16, and the head agrees with the fp32 one to bf16 precision."""
    from fp4serve.models.loader import load_model

    hf, path = pair.hf, pair.path
    target = load_model(ModelInfo.load(path), torch.bfloat16, torch.device("cpu"))
    head = Qwen3_5MTP.load(target, path)
    assert {p.dtype for p in head.parameters()} == {torch.bfloat16}
    allocate_caches(head.cache_layers(), 1, 2**22, BLOCK, torch.bfloat16, torch.device("cpu"))
    tokens, hidden = pair.tokens[0][:30], pair.hidden[0][:30]
    batch = make_batch([(0, 0, 29)], [tokens[1:]])
    with torch.inference_mode():
        ours = head(batch, hidden[:-1].bfloat16()).float()
    ref = reference(hf, tokens[1:], hidden[:-1])
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()
