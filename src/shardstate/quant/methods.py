"""Weight-only int8 (symmetric) and fp8 (e4m3) with one fp32 scale per output channel, computed over the
whole input row: `scale = max|w_row| / qmax`, `q = w / scale` rounded (int8) or cast (fp8). The same row
gives the same bytes whatever the TP size, so quantizing on the workers, offline and after a reshard
agree."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardstate.errors import ShardstateError
from shardstate.format.manifest import QUANT_WEIGHT_DTYPES
from shardstate.format.safetensors_header import DTYPES


@dataclass(frozen=True)
class QuantMethod:
    name: str
    dtype: torch.dtype  # what the quantized weight is stored as
    qmax: float  # the largest magnitude it holds

    def scales(self, row_absmax: torch.Tensor) -> torch.Tensor:
        """fp32 scales [..., N, 1] from each output row's max |w| (an all-zero row gets scale 1)."""
        absmax = row_absmax.float().unsqueeze(-1)
        # a tensor divisor: CUDA divides by a Python scalar as a multiply by its reciprocal (one bit off the
        # CPU's exact division), and workers on GPUs must write the bytes the offline converter does
        return torch.where(absmax > 0, absmax / torch.full_like(absmax, self.qmax), torch.ones_like(absmax))

    def quantize(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        scaled = (weight.float() / scale).clamp(-self.qmax, self.qmax)
        return scaled.round().to(self.dtype) if self.name == "int8" else scaled.to(self.dtype)


METHODS = {"int8": QuantMethod("int8", DTYPES[QUANT_WEIGHT_DTYPES["int8"]], 127.0),
           "fp8": QuantMethod("fp8", DTYPES[QUANT_WEIGHT_DTYPES["fp8"]], torch.finfo(torch.float8_e4m3fn).max)}


def method_named(name: str) -> QuantMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ShardstateError(f"unknown quantization '{name}'", None, f"use one of {', '.join(METHODS)}") from None


def row_absmax(weight: torch.Tensor) -> torch.Tensor:
    """max |w| over the last (input) dim, fp32, [..., N]."""
    return weight.detach().abs().amax(dim=-1).float()
