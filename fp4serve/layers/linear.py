"""Linear layers whose weight format is a pluggable method object.

A `LinearMethod` creates the layer's parameters, copies checkpoint tensors into them, and computes
y = x W^T. Fused projections (q/k/v, gate/up) are one Linear with several `output_sizes`; the
loader hands each checkpoint tensor over with its shard index.

A Linear built without an explicit method asks the active `linear_methods(choose)` scope (the
loader opens one while it builds a model from a quantized checkpoint) which format its prefix gets,
so model code never threads a quantization config through its constructors."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from fp4serve.errors import CheckpointError


class LinearMethod:
    """Weight format of a Linear. Subclasses: plain (here), NVFP4 formats (quantization)."""

    def create_weights(self, layer: "Linear", dtype: torch.dtype, device=None) -> None:
        raise NotImplementedError

    def tensor_names(self, layer: "Linear") -> list[str]:
        """Checkpoint tensor names (per shard) this format needs, e.g. ["weight"]."""
        raise NotImplementedError

    def load(self, layer: "Linear", name: str, tensor: torch.Tensor, shard: int | None) -> None:
        raise NotImplementedError

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: "Linear") -> None:
        """Called once every tensor is loaded (checks across shards, fast-path layouts)."""

    def weight_bytes(self, layer: "Linear") -> int:
        """Bytes this layer's weight occupies in memory (bias excluded)."""
        return layer.weight.numel() * layer.weight.element_size()


class PlainLinearMethod(LinearMethod):
    """Unquantized weights in the model dtype."""

    def create_weights(self, layer, dtype, device=None):
        weight = torch.empty(layer.out_features, layer.in_features, dtype=dtype, device=device)
        layer.weight = nn.Parameter(weight, requires_grad=False)

    def tensor_names(self, layer):
        return ["weight"]

    def load(self, layer, name, tensor, shard):
        if name != "weight":
            raise CheckpointError(f"unexpected tensor {layer.prefix}.{name} for an unquantized Linear")
        layer.weight.data[layer.dense_shard_rows(tensor, shard)].copy_(tensor)

    def apply(self, layer, x):
        return F.linear(x, layer.weight, layer.bias)


MethodChooser = Callable[[str, list[int]], "LinearMethod | None"]
_chooser: ContextVar[MethodChooser | None] = ContextVar("linear_method_chooser", default=None)


@contextmanager
def linear_methods(choose: MethodChooser) -> Iterator[None]:
    """Within this scope a Linear made without a method takes choose(prefix, output_sizes)
    (None: plain)."""
    token = _chooser.set(choose)
    try:
        yield
    finally:
        _chooser.reset(token)


def _default_method(prefix: str, output_sizes: list[int]) -> LinearMethod:
    choose = _chooser.get()
    return (choose(prefix, output_sizes) if choose else None) or PlainLinearMethod()


class Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        output_sizes: int | list[int],
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        method: LinearMethod | None = None,
        prefix: str = "",
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.in_features = in_features
        self.out_features = sum(self.output_sizes)
        self.prefix = prefix
        self.method = method or _default_method(prefix, self.output_sizes)
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype), requires_grad=False) if bias else None
        self.method.create_weights(self, dtype, device)

    def shard_rows(self, shard: int | None) -> slice:
        if shard is None:
            return slice(0, self.out_features)
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])

    def dense_shard_rows(self, weight: torch.Tensor, shard: int | None) -> slice:
        """The output rows a dense (16-bit) weight shard fills, after checking its shape."""
        rows = self.shard_rows(shard)
        expected = (rows.stop - rows.start, self.in_features)
        if tuple(weight.shape) != expected:
            raise CheckpointError(f"{self.prefix}.weight (shard {shard}): shape {tuple(weight.shape)}, expected {expected}")
        return rows

    def load(self, name: str, tensor: torch.Tensor, shard: int | None = None) -> None:
        if name == "bias" and self.bias is not None:
            rows = self.shard_rows(shard)
            if tensor.shape != (rows.stop - rows.start,):
                raise CheckpointError(f"{self.prefix}.bias (shard {shard}): shape {tuple(tensor.shape)} does not fit")
            self.bias.data[rows].copy_(tensor)
            return
        self.method.load(self, name, tensor, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.output_sizes}, method={type(self.method).__name__}"
