"""The tests' own quantization, independent of shardstate's quant/: per output row, scale = max|w| / qmax over
the whole row (1 for an all-zero row), values rounded (int8) or cast (fp8)."""

from __future__ import annotations

import torch

QMAX = {"int8": 127.0, "fp8": torch.finfo(torch.float8_e4m3fn).max}
DTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
KEPT = ("embed_tokens", "lm_head", "norm", ".gate.weight", "shared_expert_gate")  # not quantized


def quantized_rows(weight: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values in the method's dtype, fp32 scales [N, 1]) of an fp32 weight [N, K]."""
    absmax = weight.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / QMAX[method], torch.ones_like(absmax))
    q = (weight / scale).clamp(-QMAX[method], QMAX[method])
    return (q.round() if method == "int8" else q).to(DTYPE[method]), scale


def fake_quantized(weight: torch.Tensor, method: str) -> torch.Tensor:
    """Quantized and back to fp32."""
    q, scale = quantized_rows(weight, method)
    return q.float() * scale
