"""Image-text engine rules on a tiny transformers-built Qwen3.5 checkpoint: a vision tower nested
under the language model or with a tensor missing is refused naming the tensors; the same text
with another image never hits the prefix cache; model drafters refuse images (ngram drafting gives
the plain greedy tokens); `fp4serve chat` sends an image with /image."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import load_file, save_file
from vision_checkpoints import (
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    hf_chat_reply,
    image_bytes,
    make_vision_model,
    random_image,
)

from fp4serve import LLM, SamplingParams
from fp4serve.chat_cli import TerminalChat
from fp4serve.engine.block_pool import BlockPool
from fp4serve.errors import CheckpointError, InvalidRequestError
from fp4serve.layers.linear import Linear

IMAGES = [random_image(40, 24, 1), random_image(40, 24, 2)]  # same size: same placeholder tokens
PROMPT = [3, 4, 8, 9, VISION_START, IMAGE_PAD, VISION_END, 5, 6, 7]  # block 0 (4 tokens) is text only
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("vl-engine")
    return path, make_vision_model(path)


def engine_args(**more):
    return {"dtype": "float32", "max_model_len": 128, "kv_cache_memory": "2MiB", "block_size": 4, **more}


def rewrite(path, tmp_path, edit):
    """A copy of the checkpoint at `path` with its tensors edited."""
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(path, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    save_file(edit(tensors), str(copy / "model.safetensors"), metadata={"format": "pt"})
    return copy


def test_mis_nested_tower_is_refused_naming_tensors(model, tmp_path):
    path, _ = model
    nested = rewrite(path, tmp_path, lambda t: {k.replace("model.visual.", "model.language_model.visual."): v
                                                for k, v in t.items()})  # fmt: skip
    with pytest.raises(CheckpointError) as info:
        LLM(str(nested), **engine_args())
    message = str(info.value)
    assert "model.language_model.visual.blocks.0.attn.qkv.weight" in message
    assert "fp4serve rename-tensors DIR --from model.language_model.visual. --to model.visual." in message
    LLM(str(nested), **engine_args(language_model_only=True))  # the text path still loads


def test_missing_vision_tensor_is_refused(model, tmp_path):
    path, _ = model
    broken = rewrite(path, tmp_path, lambda t: {k: v for k, v in t.items() if k != "model.visual.merger.norm.bias"})
    with pytest.raises(
        CheckpointError, match=r"missing tensors.*model\.visual\.merger\.norm\.bias.*--language-model-only"
    ):
        LLM(str(broken), **engine_args())


def test_same_text_other_image_never_hits_the_prefix_cache(model):
    path, _ = model
    llm = LLM(str(path), **engine_args())
    requests = []
    for image in (IMAGES[0], IMAGES[1], IMAGES[0]):
        rid = llm.engine.add_request({"prompt_token_ids": PROMPT, "multi_modal_data": {"image": image}}, GREEDY)
        requests.append(llm.engine.requests[rid])
    a, b, again = requests
    assert a.prompt_token_ids == b.prompt_token_ids  # equal ids: only the digests tell them apart
    assert a.block_extra_keys != b.block_extra_keys and a.block_extra_keys == again.block_extra_keys
    assert a.block_extra_keys[0] == () and a.block_extra_keys[1] == (a.mm.images[0].image.digest,)
    # The pool itself: register a's blocks,
    # then look up b's and a's again.
    pool = BlockPool(32, 4, enable_prefix_caching=True)
    blocks = pool.allocate(len(a.prompt_token_ids) // 4)
    pool.register_full_blocks(blocks, [], a.prompt_token_ids, len(a.prompt_token_ids), a.block_extra_keys)
    hit_b, _ = pool.match_prefix(b.prompt_token_ids, len(b.prompt_token_ids), b.block_extra_keys)
    hit_a, _ = pool.match_prefix(again.prompt_token_ids, len(again.prompt_token_ids), again.block_extra_keys)
    assert len(hit_b) == 1  # the text-only first block is shared
    assert len(hit_a) == len(blocks)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()


def test_prefix_cache_hits_only_with_the_same_image(model):
    """Prefix caching on (the default for this hybrid model): the same text with another image
    shares only the blocks before the image; the same image again hits past it, and every answer
    equals the answer without caching."""
    path, _ = model
    prompts = [{"prompt_token_ids": PROMPT + [30] * 12, "multi_modal_data": {"image": IMAGES[i]}} for i in (0, 1, 0)]
    plain = LLM(str(path), **engine_args(enable_prefix_caching=False))
    expected = [plain.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]
    llm = LLM(str(path), **engine_args(mamba_block_size=4))  # GDN snapshots at every block end
    outputs = [llm.generate([p], GREEDY)[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in outputs] == expected
    cached = [o.num_cached_tokens for o in outputs]
    image_at = PROMPT.index(VISION_START)  # 4: the block from here on holds image tokens
    assert cached[0] == 0 and cached[1] == image_at and cached[2] > image_at, cached


def test_model_drafters_refuse_images_and_ngram_keeps_greedy(model, tmp_path):
    path, _ = model
    prompt = {"prompt_token_ids": PROMPT, "multi_modal_data": {"image": IMAGES[0]}}
    plain = LLM(str(path), **engine_args()).generate([prompt], GREEDY)[0].outputs[0].token_ids
    ngram = LLM(str(path), **engine_args(speculative_config={"method": "ngram", "num_speculative_tokens": 3}))
    assert ngram.generate([prompt], GREEDY)[0].outputs[0].token_ids == plain
    make_vision_model(tmp_path, mtp=True)
    mtp = LLM(str(tmp_path), **engine_args(speculative_config={"method": "mtp", "num_speculative_tokens": 2}))
    with pytest.raises(InvalidRequestError, match="images cannot be combined with mtp speculative decoding"):
        mtp.engine.add_request(prompt, GREEDY)
    assert not mtp.engine.requests
    assert len(mtp.generate([{"prompt_token_ids": [3, 4, 5]}], GREEDY)[0].outputs[0].token_ids) == 6  # text drafts


def test_chat_cli_image_command(model, tmp_path):
    path, hf = model
    file = tmp_path / "cat.png"
    file.write_bytes(image_bytes(IMAGES[0]))
    llm = LLM(str(path), **engine_args(max_model_len=256))
    out, err = io.StringIO(), io.StringIO()
    lines = iter([f"/image {file}", "w5 w17", "/image nowhere.png"])
    chat = TerminalChat(llm, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                        read=lambda _: next(lines, None) or (_ for _ in ()).throw(EOFError), out=out, err=err)  # fmt: skip
    chat.run()
    assert out.getvalue().strip() == hf_chat_reply(path, hf, [IMAGES[0]], "w5 w17", 6)
    assert "image" in err.getvalue() and "nowhere.png" in err.getvalue()
    assert len(chat.images) == 1 and not chat.pending


def test_nvfp4_keeps_the_tower_in_16_bits(model):
    """--quantization nvfp4 quantizes the language model's Linears; the tower stays plain torch in the
    model dtype and encodes exactly as in the 16-bit model."""
    path, _ = model
    plain = LLM(str(path), **engine_args())
    nvfp4 = LLM(str(path), **engine_args(quantization="nvfp4"))
    tower = nvfp4.engine.model.visual
    assert all(p.dtype == torch.float32 for p in tower.parameters())
    assert not any(isinstance(m, Linear) for m in tower.modules())
    assert any(
        type(m.method).__name__ == "NVFP4LinearMethod" for m in nvfp4.engine.model.modules() if isinstance(m, Linear)
    )
    image = plain.engine.images.preprocessor(IMAGES[0])
    (a,), (b,) = plain.engine.model.encode_images([image]), nvfp4.engine.model.encode_images([image])
    assert torch.equal(a, b)
    out = nvfp4.generate([{"prompt_token_ids": PROMPT, "multi_modal_data": {"image": IMAGES[0]}}], GREEDY)
    assert len(out[0].outputs[0].token_ids) == 6


def test_encoder_cache_reuses_an_image_across_turns(model):
    path, _ = model
    # Chunks that split the image; no prefix caching, whose hit on turn 2 would skip the image rows.
    llm = LLM(str(path), **engine_args(max_num_batched_tokens=5, enable_prefix_caching=False))
    cache = llm.engine.runner.encoder_cache
    first = {"prompt_token_ids": PROMPT, "multi_modal_data": {"image": IMAGES[0]}}
    second = {"prompt_token_ids": PROMPT + [9, 10, 11], "multi_modal_data": {"image": IMAGES[0]}}
    llm.generate([first], GREEDY)
    assert cache.misses == 1 and cache.hits >= 2  # encoded once, read by each chunk after the first
    hits = cache.hits
    llm.generate([second], GREEDY)
    assert cache.misses == 1 and cache.hits > hits


def test_preemption_with_images_keeps_the_tokens(model):
    """Too little KV for four image prompts forces recompute: a preempted request re-reads its image
    embeddings (and positions) from the start; its tokens must not change."""
    path, _ = model
    prompts = [
        {"prompt_token_ids": PROMPT + [20 + i] * (3 * i), "multi_modal_data": {"image": IMAGES[i % 2]}}
        for i in range(4)
    ]
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    no_cache = {"max_num_seqs": 4, "enable_prefix_caching": False}  # the budget below holds no GDN snapshots
    roomy = LLM(str(path), **engine_args(**no_cache))
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, greedy)]
    capacity = roomy.engine.capacity
    tight = capacity.state_bytes + capacity.kv_bytes_per_token * 128  # 128 tokens of KV for ~200 needed
    llm = LLM(str(path), **engine_args(**no_cache, kv_cache_memory=tight))
    outputs = llm.generate(prompts, greedy)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.engine.block_pool.num_free == llm.engine.block_pool.num_blocks


def test_limit_mm_per_prompt(model):
    from fp4serve.cli import build_parser
    from fp4serve.config import EngineConfig
    from fp4serve.engine_args import engine_config
    from fp4serve.errors import ConfigError

    args = build_parser().parse_args(["serve", "m", "--limit-mm-per-prompt", '{"image": 2, "video": 0}'])
    assert engine_config(args).image_limit() == 2
    for bad, words in [('{"audio": 1}', "fp4serve knows image, video"), ('{"image": -1}', "count >= 0"),
                       ("[1]", "JSON object"), ("{image: 1}", "not valid JSON")]:  # fmt: skip
        with pytest.raises(ConfigError, match=words):
            EngineConfig(limit_mm_per_prompt=bad)
    path, _ = model
    off = LLM(str(path), **engine_args(limit_mm_per_prompt={"image": 0, "video": 0}))
    assert off.engine.model.visual is None
    assert off.engine.images.reason == "--limit-mm-per-prompt allows no images"
