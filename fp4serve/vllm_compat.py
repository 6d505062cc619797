"""What fp4serve does with the vLLM flags it accepts without vLLM's effect: one log line each, so a
`vllm serve` recipe starts as written and its log says what changed. (--gpu-memory-utilization
keeps vLLM's meaning: fp4serve/engine/memory.py.)"""

from __future__ import annotations

from fp4serve.config import EngineConfig


def vllm_flag_notes(config: EngineConfig) -> list[str]:
    """One line for each such flag the config sets, saying what fp4serve does instead."""
    notes = []
    if config.attention_backend is not None:
        notes.append(
            f"--attention-backend {config.attention_backend}: not applicable; fp4serve has one attention "
            "implementation (paged attention in PyTorch) and uses it"
        )
    spec_backend = (config.speculative_config or {}).get("attention_backend")
    if spec_backend is not None:
        notes.append(
            f"--speculative-config attention_backend {spec_backend}: not applicable; the drafter uses fp4serve's "
            "one attention implementation, as the target does"
        )
    if config.linear_backend is not None:
        notes.append(
            f"--linear-backend {config.linear_backend}: not applicable; NVFP4 linears run fp4serve's own kernels, "
            f"and --nvfp4-compute {config.nvfp4_compute} chooses their numerics (w4a4 is vLLM's Blackwell one)"
        )
    if config.moe_backend is not None:
        notes.append(f"--moe-backend {config.moe_backend}: not applicable; MoE experts run fp4serve's own kernels")
    if config.mm_encoder_tp_mode is not None:
        notes.append(
            f"--mm-encoder-tp-mode {config.mm_encoder_tp_mode}: not applicable; fp4serve runs the vision tower "
            "on its one device"
        )
    if config.limit_mm_per_prompt.get("video"):
        notes.append(
            f"--limit-mm-per-prompt video {config.limit_mm_per_prompt['video']}: fp4serve takes no video input; "
            "a request with a video part is refused (400)"
        )
    return notes
