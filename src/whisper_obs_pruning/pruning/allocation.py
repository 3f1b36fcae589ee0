"""Per-layer sparsity for a model-level target: uniform, global saliency, or OWL."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..methods import PruningError, check_sparsity, get_method

ALLOCATIONS = ("uniform", "global", "owl")


def saliency(method: str, W: torch.Tensor, H: torch.Tensor | None, rel_damp: float) -> torch.Tensor:
    """The method's own per-weight importance (higher = keep), used for global allocation."""
    return get_method(method).saliency(W, H, rel_damp)


def allocate_sparsity(
    weights: dict[str, torch.Tensor],
    sparsity: float,
    get_hessian: Callable[[str], torch.Tensor | None] = lambda name: None,
    *,
    allocation: str = "uniform",
    method: str = "sparsegpt",
    rel_damp: float = 0.01,
    owl_lambda: float = 0.08,
    owl_m: float = 5.0,
    max_sparsity: float = 0.99,
) -> dict[str, float]:
    """Per-layer sparsity whose parameter-weighted mean is ``sparsity``.

    - ``uniform``: every layer gets ``sparsity``.
    - ``global``: one threshold over all weights of the method's saliency, each layer's scores
      divided by their layer mean (otherwise scale differences between layers decide).
    - ``owl``: outlier-weighted (OWL, Yin et al. 2023): layers with more outliers of the
      Wanda metric |w|*||x|| (> owl_m x layer mean) get lower sparsity, within +-owl_lambda.

    Hessians are asked for one layer at a time (``get_hessian``), so a caller reading them
    from disk never holds more than one.
    """
    sparsity = check_sparsity(sparsity)
    names = list(weights)
    sizes = torch.tensor([weights[n].numel() for n in names], dtype=torch.float64)
    if allocation == "uniform" or sparsity == 0.0:
        if allocation not in ALLOCATIONS:
            raise PruningError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        return dict.fromkeys(names, sparsity)
    if allocation == "global":
        sorted_scores = []
        for n in names:
            H = get_hessian(n) if get_method(method).needs_hessian else None
            s = saliency(method, weights[n], H, rel_damp).flatten()
            sorted_scores.append(torch.sort(s / s.mean().clamp_min(1e-30)).values)
        total = round(sparsity * float(sizes.sum()))
        lo, hi = 0.0, max(float(s[-1]) for s in sorted_scores)
        for _ in range(60):  # bisection on the global threshold
            mid = (lo + hi) / 2
            count = sum(int(torch.searchsorted(s, mid)) for s in sorted_scores)
            lo, hi = (mid, hi) if count < total else (lo, mid)
        raw = torch.tensor(
            [int(torch.searchsorted(s, hi)) / s.numel() for s in sorted_scores], dtype=torch.float64
        )
    elif allocation == "owl":
        ratios = []
        for n in names:
            H = get_hessian(n)
            if H is None:
                raise PruningError("owl allocation needs Hessians (input norms)")
            diag = H if H.dim() == 1 else torch.diagonal(H)
            metric = weights[n].detach().abs().to(torch.float64) * diag.clamp_min(0).sqrt()[None, :]
            ratios.append(float((metric > owl_m * metric.mean()).double().mean()))
        D = torch.tensor(ratios, dtype=torch.float64)
        span = float(D.max() - D.min())
        norm = (D - D.min()) / span if span > 0 else torch.zeros_like(D)
        raw = sparsity + owl_lambda * (1 - 2 * norm)
    else:
        raise PruningError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    return dict(zip(names, _rebalance(raw, sizes, sparsity, max_sparsity).tolist(), strict=True))


def _rebalance(raw: torch.Tensor, sizes: torch.Tensor, target: float, cap: float) -> torch.Tensor:
    """Shift per-layer ratios (clamped to [0, cap]) so the weighted mean equals ``target``."""
    lo, hi = -1.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        mean = float(((raw + mid).clamp(0, cap) * sizes).sum() / sizes.sum())
        lo, hi = (mid, hi) if mean < target else (lo, mid)
    return (raw + (lo + hi) / 2).clamp(0, cap)
