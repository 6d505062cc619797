"""Tiny image-text Qwen3.5 checkpoints (dense and MoE `*ForConditionalGeneration`, built and saved by
transformers' own classes), with a word tokenizer that knows the vision tokens, a chat template that
renders image parts as Qwen3.5's does, and the model's image processor config; plus small images."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

VOCAB = 512
SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>",
            "<|endoftext|>"]  # fmt: skip
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = (VOCAB - len(SPECIALS) + i for i in range(4))
TEXT = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"], "initializer_range": 0.1,
    # hub-style interleaved M-RoPE over half of head_dim: 4 frequencies, sections t/h/w = 2/1/1
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5,
                        "mrope_section": [2, 1, 1], "mrope_interleaved": True},
}  # fmt: skip
MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48}
VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
          "patch_size": 4, "num_position_embeddings": 16}  # fmt: skip
# Qwen2-VL's processor, scaled down: images resized to multiples of patch * merge = 8 pixels, at
# most 4096 pixels (64 patches... 16 tokens per 1024 pixels)
PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor", "patch_size": 4, "temporal_patch_size": 2, "merge_size": 2,
    "size": {"shortest_edge": 256, "longest_edge": 4096},
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}  # fmt: skip
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|> <|image_pad|> <|vision_end|> {% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_vision_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - len(SPECIALS))}
    vocab.update({s: VOCAB - len(SPECIALS) + i for i, s in enumerate(SPECIALS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", additional_special_tokens=SPECIALS[:-1]
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def make_vision_model(path: Path, moe: bool = False, seed: int = 0, mtp: bool = False):
    """A tiny Qwen3_5(Moe)ForConditionalGeneration saved by transformers into `path`, with tokenizer
    and preprocessor_config.json (mtp: and an MTP head, see spec_checkpoints); returns the fp32
    transformers model."""
    t = transformers
    torch.manual_seed(seed)
    ids = {"image_token_id": IMAGE_PAD, "video_token_id": VIDEO_PAD, "vision_start_token_id": VISION_START,
           "vision_end_token_id": VISION_END}  # fmt: skip
    if moe:
        hf = t.Qwen3_5MoeForConditionalGeneration(t.Qwen3_5MoeConfig(text_config={**TEXT, **MOE}, vision_config=VISION,
                                                                     **ids))  # fmt: skip
    else:
        hf = t.Qwen3_5ForConditionalGeneration(t.Qwen3_5Config(text_config=TEXT, vision_config=VISION, **ids))
    with torch.no_grad():  # a wide random tower, so a wrong patch order or position changes the output
        for p in hf.model.visual.parameters():
            p.normal_(0, 0.2)
    if mtp:
        from spec_checkpoints import hf_mtp_head

        hf.config.text_config.mtp_num_hidden_layers = 1
        hf.mtp = hf_mtp_head(hf.config.text_config, moe)
    hf = hf.float().eval()
    hf.save_pretrained(path)
    save_vision_tokenizer(path)
    (Path(path) / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return hf


def random_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def hf_processor():
    return transformers.Qwen2VLImageProcessorPil(
        **{k: v for k, v in PREPROCESSOR.items() if k != "image_processor_type"}
    )


def hf_inputs(token_ids: list[int], images: list[Image.Image]) -> dict:
    """transformers' forward inputs for a prompt whose placeholders are already expanded."""
    processed = hf_processor()(images=images, return_tensors="pt") if images else {}
    ids = torch.tensor([token_ids])
    inputs = {"input_ids": ids, "mm_token_type_ids": (ids == IMAGE_PAD).int()}
    if images:
        inputs.update(pixel_values=processed["pixel_values"], image_grid_thw=processed["image_grid_thw"])
    return inputs


def hf_chat_reply(path, hf, images, text: str, max_tokens: int) -> str:
    """transformers' greedy reply to one user turn of `images` then `text`."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)  # fmt: skip
    grids = hf_processor()(images=images, return_tensors="pt")["image_grid_thw"].tolist()
    expanded, grid_iter = [], iter(grids)
    for t in ids:
        if t == IMAGE_PAD:
            t_, h, w = next(grid_iter)
            expanded += [IMAGE_PAD] * (t_ * h * w // 4)
        else:
            expanded.append(t)
    with torch.inference_mode():
        out = hf.generate(**hf_inputs(expanded, images), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
                          eos_token_id=None)  # fmt: skip
    return tokenizer.decode(out[0, len(expanded) :], skip_special_tokens=True)
