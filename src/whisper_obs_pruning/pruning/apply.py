"""Apply a method to a model's target layers, one layer at a time, Hessians asked for lazily.

One implementation serves the library (``WhisperOBSPruner``), the ``prune`` stage and the sweep.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..methods import (
    Pattern,
    PruningError,
    check_sparsity,
    get_method,
    parse_pattern,
    pattern_name,
    prune_layer,
)
from .allocation import HESSIAN_ALLOCATIONS, allocate_sparsity

log = logging.getLogger(__name__)


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
    obs_rows: str = "uniform",
    progress: bool = True,
) -> dict[str, dict]:
    """Prune ``targets`` in place; return a per-layer report.

    ``get_hessian(name)`` supplies each layer's H when it is needed (so a caller can stream
    Hessians from disk one at a time). Weights are checked finite before they are written.
    ``obs_rows``: the ``obs`` method's ``rows`` knob (``uniform`` / ``global``); the other
    methods ignore it.
    """
    pat = parse_pattern(pattern)
    if pat is None:
        check_sparsity(sparsity)
    elif allocation != "uniform":
        raise PruningError("N:M patterns fix the sparsity per group; use allocation 'uniform'")
    modules = dict(model.named_modules())
    needs_h = get_method(method).needs_hessian or allocation in HESSIAN_ALLOCATIONS
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
            rows=obs_rows,
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
