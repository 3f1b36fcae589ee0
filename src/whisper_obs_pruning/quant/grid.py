"""Uniform integer grids for weight quantization: the spec, scheme names, scales and zero points.

A weight ``W[rows = outputs, cols = inputs]`` is quantized per output row, either over the whole
row (``group_size=None``, "per channel") or per group of ``group_size`` consecutive inputs.
When ``group_size`` does not divide ``cols`` the **last group is shorter** (``cols % group_size``
inputs); it gets its own scale like any other group. A group size larger than ``cols`` is one
group per row.

Codes are unsigned integers ``c`` in ``[0, 2**bits - 1]`` (``maxq``) and a weight is
``q = scale * (c - zero)`` computed in float32, with:

- symmetric: ``zero = 2**(bits-1)`` (fixed, not stored), ``scale = 2 * max|w| / maxq``: the
  GPTQ reference grid (``-2**(bits-1) .. 2**(bits-1) - 1`` steps; the positive extreme is
  clipped by half a step).
- asymmetric: ``xmin = min(w, 0)``, ``xmax = max(w, 0)``, ``scale = (xmax - xmin) / maxq`` and an
  **integer** ``zero = round(-xmin / scale)`` in ``[0, maxq]``.

Both grids contain 0.0 exactly (``c = zero``), so a pruned (zero) weight stays exactly zero.
Scales are rounded to float16 (what a checkpoint stores) and clamped to
``[2**-24, 65504]``: a group whose weights are all zero (or a row of a dead layer) gets
``scale = 1`` and codes ``= zero``, never a NaN or Inf. The float32 dequantization of the stored
``(codes, fp16 scales, zeros)`` is therefore bit-identical to the weights that were evaluated.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from ..errors import WhisperObsError

FP16_MIN_SCALE = 2.0**-24  # smallest positive float16 (subnormal)
FP16_MAX = 65504.0
SUPPORTED_BITS = range(2, 9)


class QuantError(WhisperObsError, ValueError):
    """Invalid quantization arguments: bits, group size, scheme name, shapes."""


@dataclass(frozen=True)
class QuantSpec:
    """``bits`` in 2..8; ``symmetric``; ``group_size`` inputs per scale (None: one per row)."""

    bits: int
    symmetric: bool = True
    group_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise QuantError(f"bits must be an integer in 2..8, got {self.bits!r}")
        if self.bits not in SUPPORTED_BITS:
            raise QuantError(f"bits must be in 2..8, got {self.bits}")
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs < 1):
            raise QuantError(f"group_size must be a positive integer or None, got {gs!r}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def name(self) -> str:
        s = f"int{self.bits}"
        if self.group_size is not None:
            s += f"-g{self.group_size}"
        return s if self.symmetric else s + "-asym"

    def n_groups(self, cols: int) -> int:
        return 1 if self.group_size is None else math.ceil(cols / self.group_size)

    def group_bounds(self, cols: int) -> list[tuple[int, int]]:
        """``[(start, end), ...]`` of the groups of a row of ``cols`` inputs (last may be short)."""
        gs = cols if self.group_size is None else self.group_size
        return [(s, min(s + gs, cols)) for s in range(0, cols, max(gs, 1))] or [(0, 0)]

    def group_index(self, cols: int) -> torch.Tensor:
        """Group of every input column, ``[cols]`` long."""
        gs = cols if self.group_size is None else self.group_size
        return torch.arange(cols) // max(gs, 1)


_SCHEME = re.compile(r"^int(?P<bits>\d+)(?:-g(?P<gs>\d+))?(?P<asym>-asym)?$")


def parse_scheme(name: str | QuantSpec | None) -> QuantSpec | None:
    """``"int8"``, ``"int4"``, ``"int4-g128"``, ``"int3-g128"``, ``"int4-g128-asym"`` -> spec;
    ``"none"`` / ``None`` -> ``None`` (no quantization)."""
    if name is None or isinstance(name, QuantSpec):
        return name
    if not isinstance(name, str):
        raise QuantError(f"quantization scheme must be a string, got {name!r}")
    text = name.strip().lower()
    if text in ("none", ""):
        return None
    m = _SCHEME.match(text)
    if m is None:
        raise QuantError(
            f"unknown quantization scheme {name!r}: expected 'none' or 'int<bits>[-g<group>]"
            "[-asym]', e.g. 'int8', 'int4-g128', 'int4-g128-asym'"
        )
    gs = m.group("gs")
    if gs is not None and int(gs) < 1:
        raise QuantError(f"group size in scheme {name!r} must be positive, got {gs}")
    return QuantSpec(
        bits=int(m.group("bits")),
        symmetric=m.group("asym") is None,
        group_size=None if gs is None else int(gs),
    )


# ---------------------------------------------------------------- scales and zero points
def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round to float16-representable values (what a checkpoint stores), kept positive, finite."""
    scale = torch.nan_to_num(scale.float(), nan=1.0, posinf=FP16_MAX, neginf=1.0)
    return scale.clamp(FP16_MIN_SCALE, FP16_MAX).half().float().clamp_min(FP16_MIN_SCALE)


def block_grid(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point per row of ``w`` ``[rows, k]`` (one group): float32 each.

    Non-finite weights are treated as zero for the range (they are the caller's bug, but must
    not poison the scale of their group).
    """
    w = torch.nan_to_num(w.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
    rows = w.shape[0]
    if w.shape[1] == 0:
        one = torch.ones(rows, device=w.device)
        return one, one * (0 if not spec.symmetric else 1 << (spec.bits - 1))
    maxq = spec.maxq
    if spec.symmetric:
        amax = w.abs().amax(dim=1)
        scale = torch.where(amax > 0, 2 * amax / maxq, torch.ones_like(amax))
        scale = _fp16_scale(scale)
        zero = torch.full_like(scale, float(1 << (spec.bits - 1)))
        return scale, zero
    xmin = w.amin(dim=1).clamp_max(0)
    xmax = w.amax(dim=1).clamp_min(0)
    span = xmax - xmin
    scale = _fp16_scale(torch.where(span > 0, span / maxq, torch.ones_like(span)))
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def compute_grid(W: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points ``[rows, n_groups]`` (float32) of ``W`` per row / per group."""
    if W.dim() != 2:
        raise QuantError(f"expected a 2-D weight [outputs, inputs], got shape {tuple(W.shape)}")
    parts = [block_grid(W[:, s:e], spec) for s, e in spec.group_bounds(W.shape[1])]
    return torch.stack([p[0] for p in parts], 1), torch.stack([p[1] for p in parts], 1)


def expand(t: torch.Tensor, spec: QuantSpec, cols: int) -> torch.Tensor:
    """``[rows, n_groups]`` -> ``[rows, cols]``: each input column gets its group's value."""
    return t[:, spec.group_index(cols).to(t.device)]


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
) -> torch.Tensor:
    """Nearest grid point's code (float tensor of integers) for broadcastable w / scale / zero."""
    c = torch.round(w.float() / scale) + zero
    return torch.nan_to_num(c, nan=0.0).clamp(0, maxq)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """``scale * (codes - zero)`` in float32; scale / zero ``[rows, n_groups]``.

    The one function every producer (RTN, GPTQ) and the checkpoint loader use, so the weights
    evaluated and the weights loaded are computed by the same float32 operations, bit for bit.
    """
    cols = codes.shape[1]
    s = expand(scale.float(), spec, cols)
    z = expand(zero.float(), spec, cols)
    return s * (codes.float() - z)


# ---------------------------------------------------------------- the result of one layer
@dataclass
class QuantResult:
    """One quantized layer: the float weight (exactly on the grid) and what a checkpoint stores.

    ``weight == dequantize(codes, scale, zero, spec)`` bit for bit (float32).
    ``codes``: uint8 ``[rows, cols]`` in ``[0, maxq]``; ``scale``: float16 ``[rows, n_groups]``;
    ``zero``: uint8 ``[rows, n_groups]`` (``2**(bits-1)`` everywhere for symmetric grids);
    ``mask``: the fixed pruning mask that was honoured (True = pruned, weight exactly 0), or None.
    ``info``: ``loss`` = tr(dW H dW^T) with the undamped H (when H was given), ``rel_loss`` =
    loss / tr(W H W^T), and method diagnostics.
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec
    mask: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.spec)


def layer_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    """``tr((W-Q) H (W-Q)^T)`` and its ratio to ``tr(W H W^T)`` (float64)."""
    H = H.to(torch.float64)
    W64 = W.detach().to(torch.float64)
    dW = W64 - Q.detach().to(torch.float64)
    loss = float(((dW @ H) * dW).sum())
    ref = float(((W64 @ H) * W64).sum())
    return loss, (loss / ref if ref > 0 else float("nan"))


def check_mask(mask: torch.Tensor | None, W: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(W.shape):
        raise QuantError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(W.shape)}")
    return mask.to(device=W.device, dtype=torch.bool)


def make_result(
    W: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    spec: QuantSpec,
    mask: torch.Tensor | None,
    H: torch.Tensor | None,
    info: dict,
    loss: bool,
) -> QuantResult:
    """Assemble a result; the weight is recomputed from the stored forms (bit-exact by design)."""
    res = QuantResult(
        weight=torch.empty(0),
        codes=codes.to(torch.uint8),
        scale=scale.half(),
        zero=zero.to(torch.uint8),
        spec=spec,
        mask=mask,
        info=dict(info, scheme=spec.name),
    )
    res.weight = res.dequantize()
    if mask is not None and bool(res.weight[mask].any()):  # pragma: no cover - invariant
        raise AssertionError("a pruned weight is non-zero after quantization")
    if loss and H is not None and H.dim() == 2:
        res.info["loss"], res.info["rel_loss"] = layer_loss(W, res.weight, H)
    return res
