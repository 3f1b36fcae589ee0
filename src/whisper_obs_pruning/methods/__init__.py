"""The method registry: every pruning method as a :class:`Method` descriptor, by name.

Everything that needs to know the methods (params validation, allocation, the library API,
the sweep, benches, docs) reads ``REGISTRY``. Adding a method: a module that builds a
``Method`` (see ``magnitude.py``, the shortest), and one entry below; a plug-in outside the
package calls :func:`register`.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import PruningError
from ..sparsity import Pattern, check_sparsity, parse_pattern, pattern_name
from . import diagonal, magnitude, obs, sparsegpt
from ._base import (
    Method,
    PruneResult,
    check_nm,
    inverse_hessian,
    mask_from_scores,
    per_row_counts,
    prepare_hessian,
    single_thread,
)

REGISTRY: dict[str, Method] = {
    m.name: m for m in (magnitude.METHOD, diagonal.METHOD, sparsegpt.METHOD, obs.METHOD)
}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add a method (e.g. from a plug-in or a test); every consumer sees it at once."""
    if method.name in REGISTRY and not replace:
        raise PruningError(f"a method named {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def method_names() -> list[str]:
    return list(REGISTRY)


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise PruningError(
            f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}"
        ) from None


def __getattr__(name: str):
    # Read-only views kept for callers of the old module (``methods.METHODS``).
    if name == "METHODS":
        return tuple(REGISTRY)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prune_layer(
    W: torch.Tensor,
    H: torch.Tensor | None,
    *,
    method: str,
    sparsity: float,
    pattern: str | Pattern = None,
    **kwargs: object,
) -> PruneResult:
    """Prune one weight matrix with the named method. Never returns NaN/Inf weights."""
    m = get_method(method)
    pat = parse_pattern(pattern)
    sparsity = check_sparsity(sparsity) if pat is None else 0.0
    if not m.supports(pat):
        raise PruningError(f"method {method!r} does not support pattern {pattern_name(pat)}")
    if W.dim() != 2:
        raise PruningError(f"weight must be 2-D, got shape {tuple(W.shape)}")
    if m.needs_hessian:
        if H is None:
            raise PruningError(f"method {method!r} needs a Hessian")
        expect = (W.shape[1],) if H.dim() == 1 else (W.shape[1], W.shape[1])
        if tuple(H.shape) != expect:
            raise PruningError(
                f"Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}"
            )
        if m.needs_full_hessian and H.dim() != 2:
            raise PruningError(f"method {method!r} needs the full Hessian, not its diagonal")
    if pat is None and sparsity == 0.0:
        return PruneResult(W.clone(), torch.zeros_like(W, dtype=torch.bool), {})
    with single_thread() if W.device.type == "cpu" else contextlib.nullcontext():
        result = m.prune(W, H, sparsity, pat, **kwargs)
        if not torch.isfinite(result.weight).all():
            raise PruningError(f"method {method!r} produced non-finite weights")
    return result


__all__ = [
    "REGISTRY",
    "Method",
    "Pattern",
    "PruneResult",
    "PruningError",
    "check_nm",
    "check_sparsity",
    "get_method",
    "inverse_hessian",
    "mask_from_scores",
    "method_names",
    "parse_pattern",
    "pattern_name",
    "per_row_counts",
    "prepare_hessian",
    "prune_layer",
    "register",
    "single_thread",
    "unregister",
]
