"""Magnitude pruning: remove the smallest |w|. The baseline every other method must beat."""

from __future__ import annotations

import torch

from ._base import Method, Pattern, PruneResult, mask_from_scores


def prune_magnitude(
    W: torch.Tensor,
    H: torch.Tensor | None,
    sparsity: float,
    pattern: Pattern = None,
    *,
    scope: str = "row",
    **_: object,
) -> PruneResult:
    """Remove the smallest |w| (per row or per layer, or per N:M group). H is ignored."""
    mask = mask_from_scores(W.abs().float(), sparsity, pattern, scope)
    return PruneResult(W.masked_fill(mask, 0), mask, {})


def _saliency(W: torch.Tensor, H: torch.Tensor | None, rel_damp: float) -> torch.Tensor:
    return W.detach().to(torch.float64).abs()


METHOD = Method(
    name="magnitude",
    prune=prune_magnitude,
    statistic="none",
    saliency=_saliency,
    summary="remove the smallest |w|; needs no calibration (baseline)",
    scoped=True,
)
