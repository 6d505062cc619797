"""Engine configuration: the serve flags (vLLM names and meanings) and the parsed model config."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from fp4serve.errors import ConfigError
from fp4serve.formats.checkpoint import QuantConfig, detect_quantization
from fp4serve.kernels.cpu_features import CPUFeatures, cpu_features

log = logging.getLogger(__name__)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16, "float32": torch.float32, "float": torch.float32}  # fmt: skip
QUANTIZATIONS = (None, "modelopt", "compressed-tensors", "nvfp4")
KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8", "fp8_e4m3", "nvfp4")
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": 1e9, "gb": 1e9, "gib": 2**30}  # fmt: skip


def parse_bytes(value: int | str) -> int:
    """'2GiB', '512MiB', '1.5G' or a plain number of bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot parse a size from {value!r} (examples: 2GiB, 512MiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class EngineConfig:
    """Everything `fp4serve serve` and `LLM(...)` accept. Field names are vLLM's engine args."""

    model: str | None = None  # None: the embedded default model
    tokenizer: str | None = None  # a directory with the tokenizer (default: the model's)
    skip_tokenizer_init: bool = False  # no tokenizer: token-id prompts only, outputs without text
    dtype: str = "auto"
    device: str = "auto"  # auto: cuda when available, else cpu
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: int | str = "2GiB"
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    generation_config: str = "auto"  # auto: model's generation_config.json gives request defaults
    chat_template: str | None = None
    language_model_only: bool = True
    trust_remote_code: bool = False  # accepted for vLLM compatibility; we never run remote code
    num_threads: int | None = None  # CPU threads for torch (default: torch's own choice)
    quantization: str | None = None  # None: detect from the files; modelopt | compressed-tensors | nvfp4 (on the fly)
    nvfp4_lm_head: bool = False  # quantize a 16-bit lm_head to NVFP4 at load (the biggest read of a 4-bit decode step)
    nvfp4_compute: str = "auto"  # auto (w4a16) | w4a16 | w4a4 (activations quantize-dequantized per 16-block)
    kv_cache_dtype: str = "auto"  # auto (model dtype) | bfloat16 | fp8 | fp8_e4m3 | nvfp4
    calculate_kv_scales: bool = False  # fp8/nvfp4 KV: per-layer scales from the first prefill's amax
    speculative_config: dict | str | None = None  # vLLM's --speculative-config JSON

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown engine arguments: {unknown}; known: {sorted(names)}")
        return cls(**kwargs)

    def __post_init__(self):
        self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}: choose auto, {', '.join(DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"--quantization {self.quantization!r}: choose {', '.join(q for q in QUANTIZATIONS if q)}")
        if self.nvfp4_compute not in ("auto", "w4a16", "w4a4"):
            raise ConfigError(f"--nvfp4-compute {self.nvfp4_compute!r}: choose auto, w4a16, w4a4")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"--kv-cache-dtype {self.kv_cache_dtype!r}: choose {', '.join(KV_CACHE_DTYPES)}")
        if self.calculate_kv_scales and self.kv_cache_dtype in ("auto", "bfloat16"):
            raise ConfigError(
                f"--calculate-kv-scales calibrates the scales of a quantized KV cache; with --kv-cache-dtype "
                f"{self.kv_cache_dtype} there are none: add --kv-cache-dtype fp8 or nvfp4, or drop the flag"
            )
        if isinstance(self.speculative_config, str):
            try:
                self.speculative_config = json.loads(self.speculative_config)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--speculative-config is not valid JSON: {e}") from e
        if self.speculative_config is not None and not isinstance(self.speculative_config, dict):
            raise ConfigError("--speculative-config must be a JSON object, e.g. '{\"method\": \"ngram\", \"num_speculative_tokens\": 3}'")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class ModelInfo:
    """What the engine needs to know of a model directory before building the model."""

    path: Path
    hf_config: object  # the top-level transformers config
    text_config: object  # the language model's config (hf_config itself for text-only models)
    architectures: list[str] = field(default_factory=list)
    quant: QuantConfig | None = None  # the checkpoint's own quantization (None: 16/32-bit weights)

    @classmethod
    def load(cls, path: str | Path) -> "ModelInfo":
        from transformers import AutoConfig

        path = Path(path)
        if not (path / "config.json").exists():
            raise ConfigError(f"{path} is not a model directory (no config.json)")
        try:
            hf_config = AutoConfig.from_pretrained(str(path))
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}/config.json: {e}") from e
        quant = detect_quantization(path)
        text_config = hf_config.get_text_config()
        if text_config is not hf_config:
            # transformers ties a multimodal model's lm_head by the top-level flag; the text config's own
            # flag may disagree (Qwen3_5Config(tie_word_embeddings=True) leaves text_config's False)
            text_config.tie_word_embeddings = getattr(hf_config, "tie_word_embeddings", False)
        return cls(path, hf_config, text_config, list(getattr(hf_config, "architectures", None) or []), quant)

    def torch_dtype(self, requested: str, device: torch.device, cpu: CPUFeatures | None = None) -> tuple[torch.dtype, str]:
        """The compute dtype and why, for the start log. cpu: the CPU's features (default: this
        machine's)."""
        stored = getattr(self.text_config, "dtype", None) or getattr(self.hf_config, "dtype", None)
        if isinstance(stored, str):
            stored = DTYPES.get(stored)
        return choose_dtype(requested, stored, device, cpu)


def choose_dtype(
    requested: str, stored: torch.dtype | None, device: torch.device, cpu: CPUFeatures | None = None
) -> tuple[torch.dtype, str]:
    """--dtype auto: on CUDA vLLM's rule (fp32 checkpoints run in bf16, half types as stored). On
    CPU a dtype the hardware computes natively: bf16 where it has bf16 dot products (AVX512-BF16,
    AMX, ARM BF16), else fp32, because bf16 and fp16 matmuls there are emulated and hundreds of
    times slower. An explicit 16-bit dtype on such a CPU still runs, with a warning."""
    if device.type != "cpu":
        if requested != "auto":
            return DTYPES[requested], "--dtype"
        chosen = stored if stored in (torch.bfloat16, torch.float16) else torch.bfloat16
        return chosen, f"auto: the checkpoint's {str(stored).removeprefix('torch.')}" if stored == chosen else "auto: bf16"
    cpu = cpu or cpu_features()
    if requested != "auto":
        dtype = DTYPES[requested]
        if dtype == torch.bfloat16 and not cpu.native_bf16:
            log.warning(
                "--dtype bfloat16 on a CPU without bf16 dot products (level %s): torch emulates bf16 matmuls, "
                "which is far slower than float32; --dtype auto picks float32 here", cpu.level,
            )  # fmt: skip
        if dtype == torch.float16:
            log.warning("--dtype float16 on CPU: torch's CPU fp16 matmuls are slow; --dtype auto picks a faster dtype")
        return dtype, "--dtype"
    if cpu.native_bf16:
        return torch.bfloat16, f"auto: bf16 dot products in hardware (CPU level {cpu.level})"
    return torch.float32, f"auto: float32, since this CPU (level {cpu.level}) has no bf16 dot products"
