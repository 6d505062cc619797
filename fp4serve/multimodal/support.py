"""What an engine does with images: whether its model takes them (and, if not, why: the words of
the 400 an image request gets), the per-prompt limit, preprocessing, and turning a prompt's image
placeholders into the expanded prompt and its MultimodalPrompt."""

from __future__ import annotations

import logging

from fp4serve.errors import InvalidRequestError
from fp4serve.models.registry import model_class
from fp4serve.multimodal.image_processor import PREPROCESSOR_CONFIG, ImagePreprocessor
from fp4serve.multimodal.inputs import ImageInput, MultimodalPrompt, expand_placeholders

log = logging.getLogger(__name__)


class ImageSupport:
    """info: the model's ModelInfo; config: the EngineConfig; spec_method: the speculative method or None."""

    def __init__(self, info, model_path, config, spec_method: str | None):
        self.info = info
        self.limit = config.image_limit()
        self.spec_method = spec_method
        self.takes_images = hasattr(model_class(info.architectures), "encode_images")
        self.reason = self._why_not(model_path, config)
        self.preprocessor: ImagePreprocessor | None = None
        if self.reason is None:
            self.preprocessor = ImagePreprocessor(model_path, info.hf_config.vision_config)
            log.info(
                "image input: on (%s images per prompt at most)",
                self.limit if self.limit is not None else "no limit of",
            )
        elif self.takes_images:
            log.info("image input: off (%s)", self.reason)

    @property
    def enabled(self) -> bool:
        return self.reason is None

    def _why_not(self, model_path, config) -> str | None:
        if not self.takes_images:
            return f"{', '.join(self.info.architectures) or 'this model'} takes text only"
        if config.language_model_only:
            return "the server runs with --language-model-only"
        if getattr(self.info.hf_config, "language_model_only", False):
            return "the checkpoint's config.json says language_model_only (its vision tower was stripped)"
        limits = config.limit_mm_per_prompt
        if limits.get("image", 1) == 0 and limits.get("video", 0) == 0:
            return "--limit-mm-per-prompt allows no images"
        if not (model_path / PREPROCESSOR_CONFIG).exists():
            return f"the checkpoint has no {PREPROCESSOR_CONFIG}, which says how this model's images are preprocessed"
        return None

    def refusal(self, num_images: int) -> tuple[str, int] | None:
        """Why a request with this many images is refused, and the index of the first image the
        reason concerns; None if it is not."""
        if self.preprocessor is None:
            return f"images are not supported by this server: {self.reason}", 0
        if self.limit is not None and num_images > self.limit:
            return f"{num_images} images in one request; --limit-mm-per-prompt allows {self.limit}", self.limit
        if self.spec_method is not None and self.spec_method != "ngram":
            return (
                f"images cannot be combined with {self.spec_method} speculative decoding on this server: its drafter "
                "would see text positions where the model uses image (M-RoPE) positions; serve images without "
                "--speculative-config, or with the ngram method"
            ), 0
        return None

    def place(self, token_ids: list[int], data: dict) -> tuple[list[int], MultimodalPrompt]:
        """vLLM's multi_modal_data {"image": image or list}: PIL images (preprocessed here) or
        ImageInputs (the server preprocesses on its worker threads). The prompt has one image
        placeholder token per image, which is expanded to that image's number of embeddings."""
        param = "multi_modal_data"
        if not isinstance(data, dict) or set(data) - {"image"}:
            others = sorted(set(data) - {"image"}) if isinstance(data, dict) else data
            raise InvalidRequestError(f"only image input is supported, not {others!r} (no video or audio)", param)
        images = data["image"] if isinstance(data["image"], list | tuple) else [data["image"]]
        refused = self.refusal(len(images))
        if refused is not None:
            raise InvalidRequestError(refused[0], param)
        inputs = [image if isinstance(image, ImageInput) else self.preprocessor(image) for image in images]
        image_token_id = self.info.hf_config.image_token_id
        return expand_placeholders(
            token_ids, inputs, image_token_id, self.preprocessor.num_tokens, self.preprocessor.merge
        )
