"""Model-level pruning: pick target layers, allocate sparsity, apply a method layer by layer.

One implementation serves the library (``WhisperOBSPruner``), the ``prune`` stage and the sweep.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .methods import (
    Pattern,
    PruningError,
    check_sparsity,
    get_method,
    parse_pattern,
    pattern_name,
    prune_layer,
)

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "global", "owl")
DEFAULT_EXCLUDE = ("proj_out",)


def select_targets(
    names: Sequence[str],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = DEFAULT_EXCLUDE,
) -> list[str]:
    """Layers to prune, in model order.

    Each ``include``/``exclude`` entry is an exact layer name or a regular expression matched
    with ``re.fullmatch``. An entry that matches nothing is an error (a typo must not silently
    prune nothing, or everything).
    """
    names = list(names)

    def matches(pattern: str) -> set[str]:
        if pattern in names:
            return {pattern}
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise PruningError(f"target pattern {pattern!r} is not a valid regex: {exc}") from exc
        return {n for n in names if rx.fullmatch(n)}

    chosen: set[str] = set()
    for pattern in include or [".*"]:
        found = matches(pattern)
        if not found:
            raise PruningError(
                f"target layer {pattern!r} matches no Linear layer; known layers look like "
                f"{names[0]!r} ... {names[-1]!r} ({len(names)} in all)"
            )
        chosen |= found
    for pattern in exclude or []:
        # Excluding something absent is harmless only for the default proj_out on odd models.
        found = matches(pattern)
        if not found and pattern not in DEFAULT_EXCLUDE:
            raise PruningError(f"exclude pattern {pattern!r} matches no Linear layer")
        chosen -= found
    if not chosen:
        raise PruningError("no layers left to prune after include/exclude")
    return [n for n in names if n in chosen]


# ------------------------------------------------------------------ allocation
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


# ------------------------------------------------------------------ applying a method
def prune_layers(
    model: nn.Module,
    targets: Sequence[str],
    get_hessian: Callable[[str], torch.Tensor | None],
    *,
    method: str,
    sparsity: float,
    pattern: str | Pattern = None,
    allocation: str = "uniform",
    rel_damp: float = 0.01,
    blocksize: int = 128,
    scope: str = "row",
    owl_lambda: float = 0.08,
    progress: bool = True,
) -> dict[str, dict]:
    """Prune ``targets`` in place; return a per-layer report.

    ``get_hessian(name)`` supplies each layer's H when it is needed (so a caller can stream
    Hessians from disk one at a time). Weights are checked finite before they are written.
    """
    pat = parse_pattern(pattern)
    if pat is None:
        check_sparsity(sparsity)
    elif allocation != "uniform":
        raise PruningError("N:M patterns fix the sparsity per group; use allocation 'uniform'")
    modules = dict(model.named_modules())
    needs_h = get_method(method).needs_hessian or allocation == "owl"
    if allocation == "uniform" or pat is not None:
        per_layer = dict.fromkeys(targets, sparsity if pat is None else 0.0)
    else:
        per_layer = allocate_sparsity(
            {n: modules[n].weight for n in targets},
            sparsity,
            get_hessian if needs_h else (lambda name: None),
            allocation=allocation,
            method=method,
            rel_damp=rel_damp,
            owl_lambda=owl_lambda,
        )
    report: dict[str, dict] = {}
    for name in tqdm(targets, desc=f"prune {method} {pattern_name(pat)}", disable=not progress):
        layer = modules[name]
        W = layer.weight.data
        H = get_hessian(name) if get_method(method).needs_hessian else None
        H = H.to(W.device) if H is not None else None  # prune where the model lives (CPU/GPU)
        t0 = time.perf_counter()
        result = prune_layer(
            W.detach().float(),
            H,
            method=method,
            sparsity=per_layer[name],
            pattern=pat,
            rel_damp=rel_damp,
            blocksize=blocksize,
            scope=scope,
        )
        new_w = result.weight.to(W.device, W.dtype)
        if not torch.isfinite(new_w).all():  # e.g. overflow when casting to fp16
            raise PruningError(f"pruning {name!r} gave non-finite weights in {W.dtype}; not saved")
        layer.weight.data.copy_(new_w)
        report[name] = {
            "shape": list(W.shape),
            "target_sparsity": per_layer[name] if pat is None else pat[0] / pat[1],
            "sparsity": float((layer.weight.data == 0).float().mean()),
            "seconds": round(time.perf_counter() - t0, 4),
            **{k: v for k, v in result.info.items() if isinstance(v, (int, float, bool))},
        }
    return report


def weight_sparsity(model: nn.Module, names: Sequence[str]) -> float:
    """Fraction of exact zeros over the named Linear weights, measured on the weights."""
    modules = dict(model.named_modules())
    zeros = total = 0
    for n in names:
        w = modules[n].weight
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0
