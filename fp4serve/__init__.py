"""fp4serve: serve and make NVFP4 checkpoints of hybrid Qwen3.5/3.6 and Llama-family models."""
from fp4serve.llm import LLM
from fp4serve.outputs import CompletionOutput, RequestOutput
from fp4serve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
