"""RMSNorm, in the two flavours the supported models use."""
import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool) -> torch.Tensor:
    """Normalize in fp32 like transformers, then scale. Zero-centred weights (Qwen3.5) scale by
    (1 + w) and cast after scaling; Llama-style weights cast back before scaling."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if zero_centered:
        return (x32 * (1.0 + weight.float())).to(dtype)
    return weight * x32.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, zero_centered: bool = False):
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        init = torch.zeros if zero_centered else torch.ones
        self.weight = nn.Parameter(init(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.zero_centered:
            return rms_norm(x, self.weight, self.eps, True)
        # torch's fused op: one kernel instead of seven. Equal to rms_norm in fp32; in 16-bit it
        # rounds once at the end where transformers rounds before the weight multiply.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
