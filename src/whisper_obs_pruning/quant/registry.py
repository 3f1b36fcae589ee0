"""Quantization methods as descriptors, like the pruning methods (``methods/``): each declares
what calibration statistic it needs, so params validation and the sweep read one table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from .gptq import quantize_gptq
from .grid import QuantError, QuantResult, QuantSpec
from .rtn import quantize_rtn


@dataclass(frozen=True)
class Quantizer:
    name: str
    statistic: Literal["none", "full"]
    quantize: Callable[..., QuantResult]  # f(W, H, spec, *, mask, rel_damp, blocksize)
    summary: str


def _rtn(W, H, spec, *, mask=None, **_):
    return quantize_rtn(W, spec, H=H, mask=mask)


def _gptq(W, H, spec, *, mask=None, rel_damp=0.01, blocksize=128, **_):
    return quantize_gptq(W, H, spec, mask=mask, rel_damp=rel_damp, blocksize=blocksize)


QUANTIZERS: dict[str, Quantizer] = {
    q.name: q
    for q in (
        Quantizer("rtn", "none", _rtn, "round to nearest on the grid (baseline)"),
        Quantizer("gptq", "full", _gptq, "OBS column by column with lazy block updates (GPTQ)"),
    )
}


def quantize_layer(
    W: torch.Tensor,
    H: torch.Tensor | None,
    spec: QuantSpec,
    *,
    method: str = "gptq",
    mask: torch.Tensor | None = None,
    **knobs: object,
) -> QuantResult:
    if method not in QUANTIZERS:
        raise QuantError(
            f"unknown quantization method {method!r}; choose one of {list(QUANTIZERS)}"
        )
    q = QUANTIZERS[method]
    if q.statistic == "full" and (H is None or H.dim() != 2):
        raise QuantError(f"quantization method {method!r} needs the full Hessian")
    return q.quantize(W, H, spec, mask=mask, **knobs)
