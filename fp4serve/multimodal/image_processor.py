"""Pixels the way the model was trained on them: the checkpoint's own preprocessor_config.json through
transformers' image processor (Qwen2-VL's resize to multiples of patch x merge within min/max
pixels, rescale, normalize, patch rows in merge-block order), after Pillow decodes the bytes."""

from __future__ import annotations

import io
from pathlib import Path

from fp4serve.errors import ConfigError, InvalidRequestError
from fp4serve.multimodal.inputs import ImageInput
from fp4serve.multimodal.mrope import Grid

FORMATS = ("PNG", "JPEG", "WEBP")
# Decoding is refused above this many pixels (read from the header, before any is decoded): a
# small file can declare a huge canvas, and the processor shrinks large images anyway.
MAX_DECODED_PIXELS = 64 * 2**20
PREPROCESSOR_CONFIG = "preprocessor_config.json"


def decode_image(data: bytes, param: str | None = None):
    """A PNG, JPEG or WebP file -> an RGB PIL image; InvalidRequestError naming `param` otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise InvalidRequestError(f"the image is not a {', '.join(FORMATS)} file", param) from None
    width, height = image.size
    if width * height > MAX_DECODED_PIXELS:
        raise InvalidRequestError(f"the image is {width}x{height} pixels; at most {MAX_DECODED_PIXELS} are decoded",
                                  param)  # fmt: skip
    try:
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # truncated or corrupt data
        raise InvalidRequestError(f"the image cannot be decoded: {e}", param) from None


class ImagePreprocessor:
    """model_dir's image processor (its preprocessor_config.json), checked against the vision tower it
    feeds (patch and merge size)."""

    def __init__(self, model_dir: Path, vision_config):
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(str(model_dir))
        theirs = (getattr(self.processor, "patch_size", None), getattr(self.processor, "merge_size", None))
        ours = (vision_config.patch_size, vision_config.spatial_merge_size)
        if theirs != ours:
            raise ConfigError(f"{model_dir}/{PREPROCESSOR_CONFIG} makes patches of {theirs[0]} pixels merged "
                              f"{theirs[1]}x{theirs[1]}; the vision tower takes {ours[0]} and {ours[1]}")  # fmt: skip

        self.merge = ours[1]

    def num_tokens(self, grid: Grid) -> int:
        """An image's placeholder tokens in the prompt (one per merged block of its patch grid)."""
        t, h, w = grid
        return t * h * w // self.merge**2

    def __call__(self, image) -> ImageInput:
        """A PIL image -> its patch rows and grid."""
        out = self.processor(images=[image.convert("RGB")], return_tensors="pt")
        return ImageInput.of(out["pixel_values"], out["image_grid_thw"][0].tolist())
