"""Qwen3.5 image-text models (dense and MoE `*ForConditionalGeneration`) against transformers, on tiny
random checkpoints written by transformers: the vision tower's output, M-RoPE positions, per-position
logits of prompts with one and two images of different sizes (whole and in chunks that split an
image), and greedy generation through the whole engine."""

from __future__ import annotations

import pytest
import torch
from vision_checkpoints import IMAGE_PAD, VISION_END, VISION_START, hf_inputs, make_vision_model, random_image

from fp4serve import LLM, SamplingParams
from fp4serve.config import ModelInfo
from fp4serve.engine.cache import allocate_caches
from fp4serve.formats.safetensors_io import iter_tensors
from fp4serve.forward_batch import SequenceRows, build_batch
from fp4serve.models.registry import model_class
from fp4serve.multimodal.image_processor import ImagePreprocessor
from fp4serve.multimodal.inputs import expand_placeholders

ATOL = 1e-4
BLOCK = 16


class VisionHarness:
    def __init__(self, path):
        self.path = path
        info = ModelInfo.load(path)
        self.model = model_class(info.architectures)(
            info.text_config, torch.float32, vision_config=info.hf_config.vision_config
        )
        self.model.load_weights(iter_tensors(path))
        self.preprocess = ImagePreprocessor(path, info.hf_config.vision_config)
        allocate_caches(self.model.cache_layers(), 2, 2**24, BLOCK, torch.float32, torch.device("cpu"))

    def prompt(self, token_ids, images):
        inputs = [self.preprocess(image) for image in images]
        visual = self.model.visual
        return expand_placeholders(token_ids, inputs, IMAGE_PAD, visual.num_tokens, visual.merge)

    def logits(self, token_ids, mm, chunk: int) -> torch.Tensor:
        """The prompt in chunks of `chunk` tokens through sequence slot 0; logits of every position."""
        embeds = dict(zip((p.offset for p in mm.images), self.model.encode_images([p.image for p in mm.images])))
        out = []
        for start in range(0, len(token_ids), chunk):
            end = min(start + chunk, len(token_ids))
            rows = []
            for p in mm.images_in(start, end):  # the part of each image inside this chunk
                lo, hi = max(p.offset, start), min(p.end, end)
                rows.append((lo - start, embeds[p.offset][lo - p.offset : hi - p.offset]))
            seq = SequenceRows(
                token_ids[start:end], start, list(range(16)), 0, 0, mm.mrope_rows(start, end), tuple(rows)
            )
            batch = build_batch([seq], BLOCK)
            with torch.inference_mode():
                out.append(self.model.compute_logits(self.model(batch)))
        return torch.cat(out)


@pytest.fixture(scope="module", params=["dense", "moe"])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"vl-{request.param}")
    hf = make_vision_model(path, moe=request.param == "moe")
    return hf, VisionHarness(path)


IMAGES = [random_image(40, 24, 1), random_image(24, 56, 2)]  # grids 6x10 and 14x6 patches: 15 and 21 tokens


def _text(n: int, seed: int) -> list[int]:
    return torch.randint(0, VISION_START, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _image_prompt(num_images: int) -> list[int]:
    ids = _text(5, 10)
    for i in range(num_images):
        ids += [VISION_START, IMAGE_PAD, VISION_END] + _text(4 + i, 11 + i)
    return ids


def test_encoder_matches_transformers(pair):
    hf, ours = pair
    _, mm = ours.prompt(_image_prompt(2), IMAGES)
    inputs = hf_inputs([IMAGE_PAD], IMAGES)
    with torch.inference_mode():
        ref = hf.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    got = ours.model.encode_images([p.image for p in mm.images])
    assert [tuple(p.image.grid) for p in mm.images] == [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_mrope_positions_match_get_rope_index(pair):
    hf, ours = pair
    ids, mm = ours.prompt(_image_prompt(2), IMAGES)
    inputs = hf_inputs(ids, IMAGES)
    ref, delta = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    assert torch.equal(mm.positions, ref[:, 0])
    assert mm.delta == int(delta)
    assert torch.equal(
        mm.mrope_rows(len(ids) - 1, len(ids) + 2)[:, 1:], (torch.arange(2) + len(ids) + mm.delta).expand(3, 2)
    )


@pytest.mark.parametrize("num_images", [1, 2])
@pytest.mark.parametrize("chunk", [1000, 7])
def test_prompt_logits_match_transformers(pair, num_images, chunk):
    hf, ours = pair
    images = IMAGES[:num_images]
    ids, mm = ours.prompt(_image_prompt(num_images), images)
    with torch.inference_mode():
        ref = hf(**hf_inputs(ids, images)).logits[0]
    got = ours.logits(ids, mm, chunk)
    err = (got - ref).abs().max().item()
    assert err < ATOL * ref.abs().max().item(), f"max |logit diff| {err:.2e}, max |logit| {ref.abs().max():.1f}"
    # the images matter: without them (placeholder embeddings) the logits after the first image differ
    with torch.inference_mode():
        blind = hf(input_ids=torch.tensor([ids])).logits[0]
    assert (blind[mm.images[0].end :] - ref[mm.images[0].end :]).abs().max() > 100 * ATOL


def test_llm_generate_matches_transformers(pair):
    """The engine, 7-token chunks splitting images, against transformers' greedy generate."""
    hf, ours = pair
    llm = LLM(str(ours.path), dtype="float32", max_num_batched_tokens=7, kv_cache_memory="4MiB", block_size=4,
              max_model_len=256)  # fmt: skip
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [
        {"prompt_token_ids": _image_prompt(2), "multi_modal_data": {"image": IMAGES}},
        {"prompt_token_ids": _image_prompt(1), "multi_modal_data": {"image": IMAGES[1:]}},
        {"prompt_token_ids": _text(9, 3)},
    ]
    outputs = llm.generate(prompts, greedy)
    for prompt, out in zip(prompts, outputs):
        images = prompt.get("multi_modal_data", {}).get("image", [])
        ids = out.prompt_token_ids  # placeholders expanded
        with torch.inference_mode():
            ref = hf.generate(**hf_inputs(ids, images), max_new_tokens=12, do_sample=False, pad_token_id=0,
                              eos_token_id=None)  # fmt: skip
        assert out.outputs[0].token_ids == ref[0, len(ids) :].tolist()
