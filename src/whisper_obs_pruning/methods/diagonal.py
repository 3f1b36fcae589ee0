"""Diagonal OBS, the seed's method (= OBD; ranks like Wanda): score w^2 H_jj, no compensation."""

from __future__ import annotations

import torch

from ._base import Method, Pattern, PruneResult, damped_diagonal, mask_from_scores


def prune_diagonal(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    pattern: Pattern = None,
    *,
    rel_damp: float = 1e-4,
    scope: str = "row",
    **_: object,
) -> PruneResult:
    """Remove the weights with the smallest w^2 * H_jj; the others are left as they are.

    With a diagonal H, [H^-1]_jj = 1/H_jj, so the OBS saliency w^2 / [H^-1]_jj is w^2 H_jj.
    ``H`` may be the full Hessian (its diagonal is used) or the diagonal vector itself.
    """
    diag, dead = damped_diagonal(H, rel_damp)
    scores = W.to(torch.float64) ** 2 * diag[None, :]
    mask = mask_from_scores(scores, sparsity, pattern, scope)
    return PruneResult(W.masked_fill(mask, 0), mask, {"dead_inputs": dead})


def _saliency(W: torch.Tensor, H: torch.Tensor | None, rel_damp: float) -> torch.Tensor:
    W = W.detach().to(torch.float64)
    return W.abs() if H is None else W**2 * damped_diagonal(H, rel_damp)[0][None, :]


METHOD = Method(
    name="diagonal",
    prune=prune_diagonal,
    statistic="diagonal",
    saliency=_saliency,
    summary="the seed's diagonal OBS (OBD, ranks like Wanda): w^2 H_jj, no weight update",
    scoped=True,
)
