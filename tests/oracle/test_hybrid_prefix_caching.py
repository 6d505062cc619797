"""Prefix caching on hybrid (GDN + attention) Qwen3.5 targets, through the whole engine.

A two-turn conversation (turn 2 = turn 1's prompt and answer, then new tokens) and a second
conversation sharing part of the first prompt, under chunked prefill (24-token budget), snapshot
points every 32 tokens and a 7-block KV cache that preempts. With prefix caching on, with and
without drafting (n-gram, MTP, DFlash), the greedy outputs are token for token those of the same
engine with prefix caching off and no drafting; turn 2 is served from the cache (num_cached_tokens,
the snapshot hit counter); and the MTP and DFlash drafts proposed after hits equal a full
recompute by transformers' models, so the drafter caches a hit reuses are exact. Aborts and
preemption leave nothing held once the engine is idle.
"""

from __future__ import annotations

import pytest
from spec_checkpoints import make_dflash_drafter, make_mtp_target
from test_speculative import Recorder, check_dflash_drafts, check_mtp_drafts, greedy, outputs, tight_llm

from fp4serve import SamplingParams

A = list(range(10, 40))  # 30 tokens
B = A[:20] + [90, 91, 92, 93, 94, 95]  # shares one 16-token block with A
MORE = {0: [5, 6, 7], 1: [1, 2]}
SETTINGS = {"mamba_block_size": 32}
METHODS = {
    "ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3},
    "mtp": {"method": "mtp", "num_speculative_tokens": 3},
}


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    built = {}

    def get(kind: str):
        if kind not in built:
            root = tmp_path_factory.mktemp(f"hybrid-prefix-{kind}")
            hf = make_mtp_target(root / "target", moe=kind == "moe")
            tensors = make_dflash_drafter(
                root / "dflash", hf.config, num_layers=2, block_size=4, target_layer_ids=[0, 2]
            )
            plain = tight_llm(root / "target", enable_prefix_caching=False)
            built[kind] = root, hf, tensors, conversation(plain)
        return built[kind]

    return get


def conversation(llm) -> tuple[list[list[int]], list[list[int]]]:
    """Turn 1 (A, B), then turn 2 (each prompt + its answer + new tokens, and C: A's first 32 tokens
    and answer, then other tokens): the two turns' outputs. A's turn 1 ends with 48 of its 49
    tokens computed, so its last step fills the block that ends at 48."""
    first = [outputs(llm, [A], greedy(19))[0], outputs(llm, [B], greedy(12))[0]]
    second_prompts = [p + o + MORE[i] for i, (p, o) in enumerate(zip([A, B], first))]
    second_prompts.append((A + first[0])[:32] + [77, 78, 79])
    results = llm.generate([{"prompt_token_ids": p} for p in second_prompts], greedy(24))  # these preempt
    llm.turn2_cached = [r.num_cached_tokens for r in results]
    return first, [r.outputs[0].token_ids for r in results]


def assert_idle_and_free(llm) -> None:
    engine = llm.engine
    pool, snapshots = engine.block_pool, engine.block_pool.snapshots
    assert not engine.has_unfinished_requests()
    assert pool.num_free == pool.num_blocks, "KV blocks leaked"
    assert all(n == 0 for n in snapshots.ref_count.values()) and len(snapshots.lru) == snapshots.capacity
    assert len(engine.scheduler.free_slots) == engine.capacity.num_state_slots, "GDN state slots leaked"


@pytest.mark.parametrize(("kind", "method"), [("dense", None), ("dense", "ngram"), ("dense", "mtp"),
                                              ("dense", "dflash"), ("moe", None), ("moe", "mtp")])  # fmt: skip
def test_turn_two_hits_and_equals_no_cache(targets, kind, method):
    root, hf, tensors, reference = targets(kind)
    spec = METHODS.get(method) or ({"method": "dflash", "model": str(root / "dflash")} if method else None)
    llm = tight_llm(root / "target", speculative_config=spec, **SETTINGS)
    assert llm.engine.block_pool.enable_prefix_caching and llm.engine.block_pool.snapshots.capacity > 0
    recorder = None
    if method in ("mtp", "dflash"):
        recorder = llm.engine.proposer = Recorder(llm.engine.proposer)
    assert conversation(llm) == reference
    # A's turn 1 ends with 48 tokens computed: turn 2 restores the snapshot there. C diverges from A
    # right after 32, a snapshot point; MTP's cache row at 31 holds A's token 32, so with MTP the
    # hit falls back to the snapshot at 16 (the end of A's prompt's last full block).
    assert llm.turn2_cached[0] == 48 and llm.engine.block_pool.snapshots.hits >= 2
    assert llm.turn2_cached[2] == (16 if method == "mtp" else 32)
    assert llm.engine.scheduler.num_preemptions > 0
    if recorder is not None:
        check = check_mtp_drafts if method == "mtp" else check_dflash_drafts
        check(hf, root, tensors, [r for r in recorder.records if len(r[0]) > 32])
    assert_idle_and_free(llm)


@pytest.mark.parametrize("mode", ["none", "all"])
def test_mamba_cache_modes(targets, mode):
    """none: no snapshots, so no hit, and prefix caching is off for the model; all: hits as align."""
    root, _, _, reference = targets("dense")
    llm = tight_llm(root / "target", mamba_cache_mode=mode, **SETTINGS)
    assert conversation(llm) == reference
    if mode == "none":
        assert llm.turn2_cached == [0, 0, 0] and not llm.engine.block_pool.enable_prefix_caching
    else:
        assert llm.turn2_cached[0] == 48
        assert_idle_and_free(llm)


def test_aborts_leave_nothing_behind_and_later_turns_still_match(targets):
    root, _, _, reference = targets("dense")
    llm = tight_llm(root / "target", speculative_config=METHODS["mtp"], **SETTINGS)
    engine = llm.engine
    engine.add_request({"prompt_token_ids": A + [1, 2, 3]}, greedy(30), "gone")
    engine.add_request({"prompt_token_ids": B}, SamplingParams(temperature=0.8, max_tokens=30, seed=1), "gone-too")
    for _ in range(4):
        engine.step()
    assert engine.abort_request("gone") is not None and engine.abort_request("gone-too") is not None
    assert_idle_and_free(llm)
    assert conversation(llm) == reference  # what the aborted requests cached is valid for others
    assert_idle_and_free(llm)
