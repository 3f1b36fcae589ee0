"""Per-layer sparsity for a model-level target: uniform, global saliency, or OWL."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..methods import PruningError, check_sparsity, get_method

ALLOCATIONS = ("uniform", "global", "owl", "obs_loss")
HESSIAN_ALLOCATIONS = ("owl", "obs_loss")  # read Hessians whatever the method


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
    grid_step: float = 0.05,
    sample_rows: int = 64,
    split_sides: bool = False,
    obs_loss_span: float | None = 0.2,
) -> dict[str, float]:
    """Per-layer sparsity whose parameter-weighted mean is ``sparsity``.

    - ``uniform``: every layer gets ``sparsity``.
    - ``global``: one threshold over all weights of the method's saliency, each layer's scores
      divided by their layer mean (otherwise scale differences between layers decide).
    - ``owl``: outlier-weighted (OWL, Yin et al. 2023): layers with more outliers of the
      Wanda metric |w|*||x|| (> owl_m x layer mean) get lower sparsity, within +-owl_lambda.
    - ``obs_loss`` (SPDY-like): each layer's greedy-OBS loss curve (:func:`obs_loss_curves`,
      normalised by its dense ``tr(W H W^T)``) on a grid of ``grid_step``; the grid point per
      layer with the least summed normalised loss whose parameter-weighted mean is the target
      (:func:`choose_grid_sparsities`). ``split_sides``: encoder and decoder each meet it.
      ``obs_loss_span``: the grid only covers ``sparsity +- span`` (None: 0 to max_sparsity),
      a guard like OWL's lambda, as summed layer losses ignore how errors propagate.

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
    elif allocation == "obs_loss":
        top = min(max_sparsity, 1.0 - 1e-9)
        grid = [i * grid_step for i in range(int(top / grid_step + 1e-9) + 1)]
        if obs_loss_span is not None:
            grid = [g for g in grid if abs(g - sparsity) <= obs_loss_span + 1e-9]
            if len(grid) < 2:
                raise PruningError("obs_loss_span leaves fewer than two grid points")
        curves = obs_loss_curves(
            weights, get_hessian, grid, rel_damp=rel_damp, sample_rows=sample_rows
        )
        groups: dict[str, list[str]] = {}
        for n in names:
            side = n.split(".")[1] if split_sides and n.count(".") > 1 else ""
            groups.setdefault(side, []).append(n)
        out: dict[str, float] = {}
        for members in groups.values():
            out.update(
                choose_grid_sparsities(
                    {n: curves[n] for n in members},
                    {n: weights[n].numel() for n in members},
                    grid,
                    sparsity,
                )
            )
        return {n: out[n] for n in names}
    else:
        raise PruningError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    return dict(zip(names, _rebalance(raw, sizes, sparsity, max_sparsity).tolist(), strict=True))


def obs_loss_curves(
    weights: dict[str, torch.Tensor],
    get_hessian: Callable[[str], torch.Tensor | None],
    grid: Sequence[float],
    *,
    rel_damp: float = 0.01,
    sample_rows: int = 64,
) -> dict[str, torch.Tensor]:
    """Per layer, the normalised OBS loss at each grid sparsity: ``[len(grid)]`` float64.

    ``sample_rows`` evenly spaced rows of the layer are traced by greedy OBS to the grid's top
    (one run, :func:`methods.obs.layer_trace`); at each grid sparsity their counts are chosen as
    in ``rows="global"`` and the loss is divided by the same rows' ``tr(W H W^T) / 2`` (damped
    H, as the losses), so layers of any scale compare. Cost: a few percent of a full prune.
    """
    from ..methods.obs import layer_trace, select_counts

    curves = {}
    for name, W in weights.items():
        H = get_hessian(name)
        if H is None or H.dim() != 2:
            raise PruningError("obs_loss allocation needs full Hessians")
        rows, cols = W.shape
        pick = torch.linspace(0, rows - 1, min(rows, sample_rows)).round().long().unique()
        Ws = W.detach().float().cpu()[pick]
        cum, dense = layer_trace(Ws, H.cpu(), max(grid), rel_damp=rel_damp)
        total = Ws.numel()
        losses = [select_counts(cum, round(s * total))[1]["loss"] if s > 0 else 0.0 for s in grid]
        curves[name] = torch.tensor(losses, dtype=torch.float64) / max(dense, 1e-300)
    return curves


def choose_grid_sparsities(
    curves: dict[str, torch.Tensor],
    sizes: dict[str, int],
    grid: Sequence[float],
    target: float,
    *,
    max_units: int = 200_000,
) -> dict[str, float]:
    """Grid index per layer minimising the summed curves with ``sum s_l n_l = target * N``.

    A knapsack DP over the pruned-parameter budget in units of ``step * g`` (``g`` the gcd of
    the sizes, coarsened if the budget would exceed ``max_units``) with equality; what the grid
    cannot reach (a target off the grid, a coarsened unit) goes to the layer whose curve is
    cheapest per parameter there, by linear interpolation, so the weighted mean is the target.
    """
    import math as _m

    names = list(curves)
    step = grid[1] - grid[0]
    N = sum(sizes[n] for n in names)
    g = 0
    for n in names:
        g = _m.gcd(g, sizes[n])
    budget = (target - grid[0]) * N / (step * g)  # grid[0] for every layer, then the steps
    if budget > max_units:
        g = g * _m.ceil(budget / max_units)
        budget = (target - grid[0]) * N / (step * g)
    if budget < -1e-9:
        raise PruningError(f"target {target} is below the grid's first point {grid[0]}")
    cap = int(_m.floor(budget + 1e-9))
    inf = float("inf")
    dp = [0.0] + [inf] * cap
    choices = []
    for n in names:
        w = round(sizes[n] / g) or 1
        cost = curves[n].tolist()
        new = [inf] * (cap + 1)
        arg = [0] * (cap + 1)
        for c in range(cap + 1):
            best, bi = inf, 0
            for i, ci in enumerate(cost):
                j = c - i * w
                if j < 0:
                    break
                v = dp[j] + ci
                if v < best:
                    best, bi = v, i
            new[c], arg[c] = best, bi
        dp = new
        choices.append(arg)
    c = max(range(cap + 1), key=lambda j: (dp[j] < inf, j))  # the largest reachable budget
    idx = {}
    for n, arg in zip(reversed(names), reversed(choices), strict=True):
        idx[n] = arg[c]
        c -= idx[n] * (round(sizes[n] / g) or 1)
    out = {n: grid[idx[n]] for n in names}
    rest = target * N - sum(out[n] * sizes[n] for n in names)  # parameters still to prune

    def slope(n: str) -> float:  # normalised loss per parameter of the next grid step
        i = round((out[n] - grid[0]) / step)
        if i + 1 >= len(grid) or out[n] > grid[i] + 1e-12:
            return inf
        return float(curves[n][i + 1] - curves[n][i]) / (step * sizes[n])

    while rest > 1e-12 * N:
        n = min(names, key=slope)
        if slope(n) == inf:
            break
        take = min(rest, step * sizes[n])
        out[n] += take / sizes[n]
        rest -= take
    return out


def _rebalance(raw: torch.Tensor, sizes: torch.Tensor, target: float, cap: float) -> torch.Tensor:
    """Shift per-layer ratios (clamped to [0, cap]) so the weighted mean equals ``target``."""
    lo, hi = -1.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        mean = float(((raw + mid).clamp(0, cap) * sizes).sum() / sizes.sum())
        lo, hi = (mid, hi) if mean < target else (lo, mid)
    return (raw + (lo + hi) / 2).clamp(0, cap)
