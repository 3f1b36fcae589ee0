"""What every pruning method shares: the descriptor, the result type, patterns, masks, H^-1.

The methods themselves are pure functions of one layer's weight W and input Hessian H.

Conventions used throughout:
- ``W`` is ``[rows = outputs, cols = inputs]`` (``nn.Linear.weight``); ``H`` is ``[cols, cols]``,
  ``H = 2/n * sum_k x_k x_k^T`` over calibration inputs ``x_k`` of the layer.
- The layer-wise loss of a change ``dW`` is ``||dW X||^2 = sum_rows dw H dw^T / 2 * n``, so every
  method minimises (or approximates the minimum of) ``1/2 dw H dw^T`` per row.
- ``Pattern``: ``None`` for unstructured sparsity or ``(n, m)``: exactly ``n`` zeros in every
  group of ``m`` consecutive inputs of a row (SparseGPT's ``prunen:prunem`` convention; for 2:4
  it is the same as NVIDIA's "2 of 4 kept").
- Exact sparsity: unstructured pruning removes exactly ``round(sparsity * rows * cols)`` weights
  per layer (round half to even, Python's ``round``). Per-row methods spread that count over rows
  by cumulative rounding, so every row loses ``floor`` or ``ceil`` of ``sparsity * cols``.
- Dead inputs (``H_jj == 0``: the input never fired in calibration) get ``H_jj = mean(diag H)``
  so they are judged by weight size and never cause a singular matrix; their weights are not
  zeroed beyond the target sparsity (OBC zeroes them, which silently adds sparsity).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import PruningError
from ..sparsity import Pattern, pattern_name

log = logging.getLogger(__name__)

Statistic = Literal["none", "diagonal", "full"]


@dataclass
class PruneResult:
    """The outcome of pruning one layer: new weight, where it is zero, and diagnostics."""

    weight: torch.Tensor
    pruned_mask: torch.Tensor  # True where the weight was removed
    info: dict = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return float(self.pruned_mask.float().mean())


def per_row_counts(rows: int, cols: int, sparsity: float) -> torch.Tensor:
    """How many weights each row loses so that the layer total is round(sparsity*rows*cols)."""
    cum = torch.tensor([round(sparsity * cols * i) for i in range(rows + 1)], dtype=torch.long)
    return (cum[1:] - cum[:-1]).clamp(0, cols)


def check_nm(cols: int, pattern: Pattern) -> None:
    if pattern is not None and cols % pattern[1] != 0:
        raise PruningError(
            f"pattern {pattern_name(pattern)} needs inputs divisible by M; got {cols}"
        )


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run pruning math on one CPU thread.

    The column/step loops issue thousands of ops on small tensors, and even the d x d
    factorisations are small; with two OpenMP threads each op waits on a barrier, and on a
    busy 2-core machine that measured 4-20x slower (SparseGPT on a 384x1536 layer: 0.8 s with
    one thread, 19 s with two; inverting a 1536x1536 H: 1.2 s vs 13.9 s). Results are equal.
    """
    before = torch.get_num_threads()
    _THREADS_OUTSIDE.append(before)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _THREADS_OUTSIDE.pop()
        torch.set_num_threads(before)


_THREADS_OUTSIDE: list[int] = []  # torch's thread count before each active single_thread()


def available_threads() -> int:
    """Cores torch may use outside :func:`single_thread`: how many parallel workers fit."""
    return _THREADS_OUTSIDE[0] if _THREADS_OUTSIDE else torch.get_num_threads()


# ---------------------------------------------------------------- masks from scores
def mask_from_scores(
    scores: torch.Tensor, sparsity: float, pattern: Pattern = None, scope: str = "row"
) -> torch.Tensor:
    """Boolean mask (True = prune) removing the lowest scores: exact count, N:M or unstructured.

    ``scope="row"`` prunes the same fraction of every row; ``"layer"`` uses one threshold for the
    whole matrix. N:M is always per group of M inputs within a row.
    """
    rows, cols = scores.shape
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if pattern is not None:
        n, m = pattern
        check_nm(cols, pattern)
        grouped = scores.reshape(rows, cols // m, m)
        idx = torch.topk(grouped, n, dim=-1, largest=False).indices
        return mask.reshape(rows, cols // m, m).scatter_(-1, idx, True).reshape(rows, cols)
    if scope == "layer":
        k = round(sparsity * scores.numel())
        if k > 0:
            idx = torch.topk(scores.flatten(), k, largest=False).indices
            mask.view(-1)[idx] = True
        return mask
    if scope != "row":
        raise PruningError(f"scope must be 'row' or 'layer', got {scope!r}")
    counts = per_row_counts(rows, cols, sparsity)
    counts = counts.to(scores.device)
    order = torch.argsort(scores, dim=1)  # ascending: least important first
    ranks = torch.empty_like(order)
    ranks.scatter_(
        1, order, torch.arange(cols, device=scores.device).expand(rows, cols).contiguous()
    )
    return ranks < counts[:, None]


# ---------------------------------------------------------------- Hessian preparation
def prepare_hessian(H: torch.Tensor, rel_damp: float) -> tuple[torch.Tensor, dict]:
    """Float64 copy of H with dead inputs repaired and ``rel_damp * mean(diag H)`` added."""
    H = H.to(torch.float64).clone()
    if not torch.isfinite(H).all():
        raise PruningError("Hessian contains NaN or Inf")
    H = (H + H.T) / 2
    diag = torch.diagonal(H)
    dead = diag <= 0
    mean_diag = diag[~dead].mean() if (~dead).any() else torch.tensor(1.0, dtype=H.dtype)
    if dead.any():
        H[dead, :] = 0
        H[:, dead] = 0
        H[dead, dead] = mean_diag
    damp = rel_damp * float(mean_diag)
    H.diagonal().add_(damp)
    return H, {"dead_inputs": int(dead.sum()), "damp": damp}


def inverse_hessian(
    H: torch.Tensor, rel_damp: float, *, max_tries: int = 8
) -> tuple[torch.Tensor, dict]:
    """H^-1 (float64) with damping; a factorisation failure retries with 10x the damping.

    A rank-deficient or indefinite H (few samples, numerical noise) is the normal case for
    decoder layers; it must never crash or produce NaN, only get more damping and a warning.
    """
    Hd, info = prepare_hessian(H, rel_damp)
    mean_diag = float(torch.diagonal(Hd).mean())
    extra = 0.0
    for attempt in range(max_tries):
        L, err = torch.linalg.cholesky_ex(Hd)
        if int(err) == 0:
            Hinv = torch.cholesky_inverse(L)
            if torch.isfinite(Hinv).all():
                info["damp"] += extra
                info["damp_retries"] = attempt
                return Hinv, info
        extra_new = max(rel_damp, 1e-6) * mean_diag * 10 ** (attempt + 1)
        Hd.diagonal().add_(extra_new - extra)
        extra = extra_new
        log.warning(
            "Hessian not positive definite; retrying with extra damping %.3g (try %d)",
            extra,
            attempt + 1,
        )
    log.warning("Hessian could not be inverted; falling back to the identity (magnitude)")
    info["damp_retries"] = max_tries
    info["fallback_identity"] = True
    return torch.eye(H.shape[0], dtype=torch.float64, device=H.device), info


# ---------------------------------------------------------------- the descriptor
PruneFn = Callable[..., PruneResult]
SaliencyFn = Callable[[torch.Tensor, "torch.Tensor | None", float], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """One pruning method, as everything around it needs to know it.

    Validation, allocation, the library API, the sweep, the benches and the docs read these
    fields instead of keeping their own lists: adding a method is one module that builds a
    ``Method`` plus one line in ``methods/__init__.py`` (or :func:`register` for a plug-in).
    """

    name: str
    prune: PruneFn  # f(W, H, sparsity, pattern, **knobs) -> PruneResult
    statistic: Statistic  # what it reads of the calibration: nothing, diag(H) or the full H
    saliency: SaliencyFn  # per-weight importance (higher = keep), for global allocation
    summary: str  # one line for docs and --help
    patterns: frozenset[str] = frozenset({"unstructured", "n:m"})
    scoped: bool = False  # honours scope = row | layer (score-threshold methods)

    @property
    def needs_hessian(self) -> bool:
        return self.statistic != "none"

    @property
    def needs_full_hessian(self) -> bool:
        return self.statistic == "full"

    def supports(self, pattern: Pattern) -> bool:
        return ("unstructured" if pattern is None else "n:m") in self.patterns


def damped_diagonal(H: torch.Tensor, rel_damp: float) -> tuple[torch.Tensor, int]:
    """diag(H) in float64, negatives clamped, plus ``rel_damp * mean``; and the dead-input count.

    Dead inputs (``H_jj == 0``) are counted *before* damping: afterwards no entry is zero.
    """
    diag = H if H.dim() == 1 else torch.diagonal(H)
    diag = diag.to(torch.float64).clamp_min(0)
    dead = int((diag == 0).sum())
    return diag + rel_damp * (float(diag.mean()) if diag.numel() else 0.0), dead


def second_order_saliency(W: torch.Tensor, H: torch.Tensor | None, rel_damp: float) -> torch.Tensor:
    """OBS saliency w^2 / [H^-1]_jj (diagonal H: w^2 H_jj; no H: |w|)."""
    W = W.detach().to(torch.float64)
    if H is None:
        return W.abs()
    if H.dim() == 1:
        return W**2 * damped_diagonal(H, rel_damp)[0][None, :]
    Hinv, _ = inverse_hessian(H, rel_damp)
    return W**2 / torch.diagonal(Hinv)[None, :]
