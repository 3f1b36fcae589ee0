"""Which Linear layers to prune (names or regexes; typos are errors), and how sparse they are.

Apart from the methods on purpose: evaluation measures sparsity without importing them."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from ..errors import PruningError

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


def weight_sparsity(model: nn.Module, names: Sequence[str]) -> float:
    """Fraction of exact zeros over the named Linear weights, measured on the weights."""
    modules = dict(model.named_modules())
    zeros = total = 0
    for n in names:
        w = modules[n].weight
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


def check_pattern_fits(model: nn.Module, names: Sequence[str], pattern) -> None:
    """Refuse an N:M pattern that does not divide some target's inputs, before any work."""
    from ..sparsity import parse_pattern, pattern_name

    pat = parse_pattern(pattern)
    if pat is None:
        return
    modules = dict(model.named_modules())
    for n in names:
        cols = modules[n].weight.shape[1]
        if cols % pat[1]:
            raise PruningError(
                f"pattern {pattern_name(pat)} needs every target layer's inputs divisible by "
                f"{pat[1]}; {n!r} has {cols}"
            )
