"""Round to nearest (RTN): every weight to its nearest grid point, no error compensation."""

from __future__ import annotations

import torch

from .grid import (
    QuantResult,
    QuantSpec,
    check_mask,
    compute_grid,
    expand,
    make_result,
    parse_scheme,
    quantize_codes,
)


def quantize_rtn(
    W: torch.Tensor,
    spec: QuantSpec | str,
    *,
    H: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    loss: bool = True,
) -> QuantResult:
    """RTN of ``W [outputs, inputs]`` on ``spec``'s grid (scales from the weights themselves).

    ``mask`` (True = pruned): those weights are set to exactly 0 first (and stay 0); the grid is
    computed on the kept weights. ``H`` is only used to report ``info["loss"]``.
    """
    spec = _need_spec(spec)
    mask = check_mask(mask, W)
    Wf = W.detach().float().clone()
    if mask is not None:
        Wf[mask] = 0
    scale, zero = compute_grid(Wf, spec)
    codes = quantize_codes(
        Wf, expand(scale, spec, Wf.shape[1]), expand(zero, spec, Wf.shape[1]), spec.maxq
    )
    return make_result(W, codes, scale, zero, spec, mask, H, {"method": "rtn"}, loss)


def _need_spec(spec: QuantSpec | str) -> QuantSpec:
    parsed = parse_scheme(spec)
    if parsed is None:
        from .grid import QuantError

        raise QuantError(f"quantization scheme {spec!r} means no quantization; nothing to do")
    return parsed
