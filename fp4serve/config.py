"""Engine configuration: the serve flags (vLLM names and meanings) and the parsed model config."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from fp4serve.errors import ConfigError
from fp4serve.formats.checkpoint import QuantConfig, detect_quantization
from fp4serve.kernels.cpu_features import CPUFeatures, cpu_features
from fp4serve.max_model_len import parse_max_model_len

log = logging.getLogger(__name__)
DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "float": torch.float32,
}
QUANTIZATIONS = ("modelopt", "compressed-tensors", "nvfp4")
NVFP4_COMPUTES = ("auto", "w4a16", "w4a4")
KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8", "fp8_e4m3", "nvfp4")
GENERATION_CONFIGS = ("auto", "vllm")
MAMBA_CACHE_MODES = ("none", "all", "align")  # vLLM's; what each does here: docs/prefix_caching.md
DEFAULT_MAMBA_BLOCK_SIZE = 256  # tokens between prefill GDN snapshots (rounded up to a multiple of --block-size)
_UNITS = {
    "": 1, "b": 1,
    "k": 1e3, "kb": 1e3, "kib": 2**10,
    "m": 1e6, "mb": 1e6, "mib": 2**20,
    "g": 1e9, "gb": 1e9, "gib": 2**30,
}  # fmt: skip


def parse_bytes(value: int | str) -> int:
    """'2GiB', '512MiB', '1.5G' or a plain number of bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot parse a size from {value!r} (examples: 2GiB, 512MiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def engine_arg(default, help: str | None = None, **flag) -> Any:
    """An EngineConfig field with what its command-line flag adds (fp4serve/engine_args.py reads
    it): help, and optionally choices, aliases, negatable (a --no- form) or positional."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class EngineConfig:
    """Everything `fp4serve serve` and `LLM(...)` accept. Field names are vLLM's engine args; each
    field is also the command-line argument of that name (max_num_seqs: --max-num-seqs; model is
    positional), with the field's default."""

    model: str | None = engine_arg(
        None,
        "Hugging Face model directory, or a hub id (org/name) already in the local Hugging Face cache "
        "(default: embedded SmolLM2-135M-Instruct)",
        positional=True,
    )
    revision: str | None = engine_arg(None, "the cached snapshot of a hub id: branch, tag or commit (default: main)")
    tokenizer: str | None = engine_arg(None, "tokenizer directory or cached hub id (default: the model's)")
    tokenizer_revision: str | None = engine_arg(None, "the cached snapshot of a --tokenizer hub id (default: main)")
    skip_tokenizer_init: bool = engine_arg(
        False, "load no tokenizer: prompts are token ids, outputs carry token ids and empty text"
    )
    dtype: str = engine_arg("auto", choices=("auto", *DTYPES))
    device: str = engine_arg("auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    max_model_len: int | str | None = engine_arg(
        None,
        "context length: tokens (32768), vLLM's 32k (x1000) or 32K (x1024), -1 or auto (the model's, lowered to "
        "what the KV cache holds); default: the model's",
    )
    max_num_seqs: int = engine_arg(64, "maximum concurrent sequences")
    max_num_batched_tokens: int = engine_arg(2048, "token budget of one step")
    block_size: int = engine_arg(16, "tokens per KV cache block")
    kv_cache_memory: int | str | None = engine_arg(
        None,
        "memory for KV cache and GDN state, e.g. 2GiB or bytes "
        "(default: --gpu-memory-utilization's share of the device when given, else 2GiB)",
    )
    enable_prefix_caching: bool = engine_arg(True, negatable=True)
    enable_chunked_prefill: bool = engine_arg(True, negatable=True)
    seed: int = 0
    generation_config: str = engine_arg(
        "auto",
        "auto: the model's generation_config.json sets request defaults; vllm: ignore it",
        choices=GENERATION_CONFIGS,
    )
    chat_template: str | None = engine_arg(None, "chat template file or text (default: the model's)")
    language_model_only: bool = engine_arg(
        False, "image-text checkpoints: build no vision tower (no image input; its memory stays free), as in vLLM"
    )
    limit_mm_per_prompt: dict | str | None = engine_arg(
        None,
        "JSON, e.g. '{\"image\": 2}': the most images one prompt may carry (default: as many as fit "
        "max_model_len); image and video 0 build no vision tower, as --language-model-only",
    )
    trust_remote_code: bool = engine_arg(False, "accepted for vLLM compatibility; no remote code runs")
    num_threads: int | None = engine_arg(None, "CPU threads for torch (default: torch's own choice)")
    quantization: str | None = engine_arg(
        None,
        "checkpoint format (default: detected from the files); nvfp4 quantizes a 16-bit checkpoint at load",
        choices=QUANTIZATIONS,
        aliases=("-q",),
    )
    nvfp4_lm_head: bool = engine_arg(
        False,
        "quantize the 16-bit lm_head to NVFP4 W4A16 at load "
        "(smaller decode reads; see docs/benchmarks.md for its quality)",
    )
    nvfp4_compute: str = engine_arg(
        "auto",
        "NVFP4 linears: w4a16 dequantizes weights (auto); w4a4 also quantizes activations (Blackwell numerics)",
        choices=NVFP4_COMPUTES,
    )
    kv_cache_dtype: str = engine_arg(
        "auto",
        "KV cache storage: auto (model dtype); fp8 with per-layer k/v scales; nvfp4 (4-bit, 16-element blocks)",
        choices=KV_CACHE_DTYPES,
    )
    calculate_kv_scales: bool = engine_arg(
        False, "fp8/nvfp4 KV: calibrate each layer's k/v scales on the first prefill (default: checkpoint or 1.0)"
    )
    enforce_eager: bool = engine_arg(
        False, "never capture decode steps in CUDA graphs (vLLM's flag); CPU runs eagerly either way"
    )
    cuda_graph_sizes: str | None = engine_arg(
        None, "decode batch sizes to capture in CUDA graphs, e.g. 1,2,4,8 (default: 1, 2, 4, then every 8 up to "
        "--max-num-seqs, at most 256)"
    )
    speculative_config: dict | str | None = engine_arg(
        None, 'JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 3}\''
    )
    # vLLM flags that `vllm serve` recipes pass, so that such a line starts as written. Each has
    # vLLM's meaning where fp4serve can honour it, else the engine logs what fp4serve does instead
    # (fp4serve/vllm_compat.py); docs/serving.md has the table.
    gpu_memory_utilization: float | None = engine_arg(
        None,
        "fraction of the device's memory (CPU: of available RAM) for weights, KV cache and GDN state, as in "
        "vLLM; sizes the cache when --kv-cache-memory is not given",
    )
    tensor_parallel_size: int = engine_arg(
        1, "accepted as 1 (fp4serve runs one device); larger values are refused", aliases=("-tp",)
    )
    attention_backend: str | None = engine_arg(None, "accepted and logged: fp4serve has one attention path")
    linear_backend: str | None = engine_arg(None, "accepted and logged: NVFP4 linears follow --nvfp4-compute")
    moe_backend: str | None = engine_arg(None, "accepted and logged: MoE experts run fp4serve's own path")
    mm_encoder_tp_mode: str | None = engine_arg(None, "accepted and logged: the vision tower runs on the one device")
    mamba_cache_mode: str | None = engine_arg(
        None,
        "GDN state snapshots for prefix caching on hybrid models: align (default) at every --mamba-block-size "
        "tokens of prefill, a prompt's last block and a request's latest block; all: also keeps every decode "
        "snapshot; none: no snapshots, so no prefix hits on hybrid models",
        choices=MAMBA_CACHE_MODES,
    )
    mamba_block_size: int | None = engine_arg(
        None,
        f"tokens between GDN snapshots in prefill, a multiple of --block-size "
        f"(default: {DEFAULT_MAMBA_BLOCK_SIZE}, rounded up to one)",
    )
    gdn_snapshot_fraction: float = engine_arg(
        0.25,
        "hybrid models with prefix caching: the share of --kv-cache-memory (after the per-sequence GDN state) "
        "given to GDN snapshots",
    )

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown engine arguments: {unknown}; known: {sorted(names)}")
        return cls(**kwargs)

    def __post_init__(self):
        self.max_model_len = parse_max_model_len(self.max_model_len)
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"--gpu-memory-utilization {self.gpu_memory_utilization}: give a fraction in (0, 1]")
        if self.tensor_parallel_size != 1:
            raise ConfigError(
                f"--tensor-parallel-size {self.tensor_parallel_size}: fp4serve runs the model on one device; the "
                f"checkpoint loads unchanged in vLLM, which serves it across {self.tensor_parallel_size} GPUs with "
                "this flag; drop the flag (or pass 1) if the model fits one device"
            )
        if self.mamba_cache_mode is not None and self.mamba_cache_mode not in MAMBA_CACHE_MODES:
            raise ConfigError(f"--mamba-cache-mode {self.mamba_cache_mode!r}: choose {', '.join(MAMBA_CACHE_MODES)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}: choose auto, {', '.join(DTYPES)}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"--quantization {self.quantization!r}: choose {', '.join(QUANTIZATIONS)}")
        if self.nvfp4_compute not in NVFP4_COMPUTES:
            raise ConfigError(f"--nvfp4-compute {self.nvfp4_compute!r}: choose {', '.join(NVFP4_COMPUTES)}")
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
            raise ConfigError(
                '--speculative-config must be a JSON object, e.g. \'{"method": "ngram", "num_speculative_tokens": 3}\''
            )
        self.limit_mm_per_prompt = parse_mm_limits(self.limit_mm_per_prompt)
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.mamba_block_size is None:
            self.mamba_block_size = -(-DEFAULT_MAMBA_BLOCK_SIZE // self.block_size) * self.block_size
        elif self.mamba_block_size < 1 or self.mamba_block_size % self.block_size:
            raise ConfigError(
                f"--mamba-block-size {self.mamba_block_size} must be a positive multiple of --block-size "
                f"{self.block_size}"
            )
        if not 0 <= self.gdn_snapshot_fraction < 1:
            raise ConfigError(f"--gdn-snapshot-fraction {self.gdn_snapshot_fraction}: give a fraction in [0, 1)")

    def image_limit(self) -> int | None:
        """--limit-mm-per-prompt's image count (None: no limit of its own)."""
        return self.limit_mm_per_prompt.get("image")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


MM_MODALITIES = ("image", "video")


def parse_mm_limits(value: dict | str | None) -> dict[str, int]:
    """--limit-mm-per-prompt: a JSON object of modality -> count, vLLM's form."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--limit-mm-per-prompt is not valid JSON: {e} (example: '{{\"image\": 2}}')") from e
    if not isinstance(value, dict):
        raise ConfigError("--limit-mm-per-prompt must be a JSON object, e.g. '{\"image\": 2}'")
    for modality, count in value.items():
        if modality not in MM_MODALITIES:
            raise ConfigError(f"--limit-mm-per-prompt {modality!r}: fp4serve knows {', '.join(MM_MODALITIES)}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ConfigError(f"--limit-mm-per-prompt {modality}: give a count >= 0, not {count!r}")
    return dict(value)


@dataclass
class ModelInfo:
    """What the engine needs to know of a model directory before building the model."""

    path: Path
    hf_config: object  # the top-level transformers config
    text_config: object  # the language model's config (hf_config itself for text-only models)
    architectures: list[str] = field(default_factory=list)
    quant: QuantConfig | None = None  # the checkpoint's own quantization (None: 16/32-bit weights)

    @classmethod
    def load(cls, path: str | Path) -> ModelInfo:
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

    def torch_dtype(
        self, requested: str, device: torch.device, cpu: CPUFeatures | None = None
    ) -> tuple[torch.dtype, str]:
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
        return (
            chosen,
            f"auto: the checkpoint's {str(stored).removeprefix('torch.')}" if stored == chosen else "auto: bf16",
        )
    cpu = cpu or cpu_features()
    if requested != "auto":
        dtype = DTYPES[requested]
        if dtype == torch.bfloat16 and not cpu.native_bf16:
            log.warning(
                "--dtype bfloat16 on a CPU without bf16 dot products (level %s): torch emulates bf16 matmuls, "
                "which is far slower than float32; --dtype auto picks float32 here",
                cpu.level,
            )
        if dtype == torch.float16:
            log.warning("--dtype float16 on CPU: torch's CPU fp16 matmuls are slow; --dtype auto picks a faster dtype")
        return dtype, "--dtype"
    if cpu.native_bf16:
        return torch.bfloat16, f"auto: bf16 dot products in hardware (CPU level {cpu.level})"
    return torch.float32, f"auto: float32, since this CPU (level {cpu.level}) has no bf16 dot products"
