"""Image input cost on a tiny random Qwen3.5 image-text model (built here by transformers; numbers
say what fp4serve's own path costs, not a real model's): the time to preprocess and encode one
448x448 image (the vision tower at Qwen's patch 16 / merge 2, so 784 patches -> 196 tokens), and
time to first token of a 32-token text prompt with and without that image (median of --repeats;
the encoder cache is cleared before each image run, so each one encodes).

Run:  python benchmarks/vision.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from fp4serve import LLM, SamplingParams

VOCAB, IMAGE, START, END = 1024, 1000, 1001, 1002
TEXT = {"vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "linear_num_key_heads": 2,
        "linear_num_value_heads": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"]}  # fmt: skip
VISION = {"depth": 4, "hidden_size": 256, "intermediate_size": 512, "num_heads": 4, "out_hidden_size": 256,
          "patch_size": 16, "num_position_embeddings": 2304}  # fmt: skip
PREPROCESSOR = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 16, "temporal_patch_size": 2,
                "merge_size": 2, "size": {"shortest_edge": 65536, "longest_edge": 16777216},
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}  # fmt: skip


def build(path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.Qwen3_5Config(text_config=TEXT, vision_config=VISION, image_token_id=IMAGE,
                                        vision_start_token_id=START, vision_end_token_id=END)  # fmt: skip
    transformers.Qwen3_5ForConditionalGeneration(config).eval().save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))


def ttft(llm: LLM, prompt: dict) -> float:
    engine = llm.engine
    start = time.perf_counter()
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8))
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        llm = LLM(tmp, dtype="float32", skip_tokenizer_init=True, max_model_len=1024, kv_cache_memory="64MiB")
        engine = llm.engine
        preprocess, encode = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            pixels = engine.images.preprocessor(image)
            t1 = time.perf_counter()
            engine.model.encode_images([pixels])
            encode.append(time.perf_counter() - t1)
            preprocess.append(t1 - t0)
        text = list(range(16))
        with_image = {"prompt_token_ids": text + [START, IMAGE, END] + text, "multi_modal_data": {"image": image}}
        cache = engine.runner.encoder_cache
        plain, pictured = [], []
        for _ in range(args.repeats):
            plain.append(ttft(llm, {"prompt_token_ids": text + text}))
            cache.entries.clear()
            cache.rows = 0
            pictured.append(ttft(llm, with_image))
    ms = lambda xs: f"{statistics.median(xs) * 1e3:8.1f} ms"
    grid = pixels.grid
    print(
        f"448x448 image: grid {grid} patches -> {engine.model.visual.num_tokens(grid)} tokens; {args.threads} threads"
    )
    print(f"preprocess (transformers' image processor)   {ms(preprocess)}")
    print(f"encode (vision tower, {VISION['depth']} blocks)               {ms(encode)}")
    print(f"TTFT, 32 text tokens                          {ms(plain)}")
    print(f"TTFT, 32 text tokens + the image (incl. both) {ms(pictured)}")


if __name__ == "__main__":
    main()
