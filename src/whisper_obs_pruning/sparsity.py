"""Sparsity targets and N:M patterns: parsing and checking, shared by params, methods and reports.

No torch here: params validation and reports use it without importing the methods.
"""

from __future__ import annotations

import math

from .errors import PruningError

Pattern = tuple[int, int] | None


def parse_pattern(pattern: str | tuple[int, int] | None) -> Pattern:
    """``"2:4"`` -> ``(2, 4)``; ``None``/``"unstructured"`` -> ``None``. Validates N < M."""
    if pattern is None or pattern in ("", "unstructured", "none"):
        return None
    if isinstance(pattern, str):
        parts = pattern.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise PruningError(
                f"pattern {pattern!r} is not 'unstructured' or 'N:M' with integers, e.g. '2:4'"
            )
        n, m = int(parts[0]), int(parts[1])
    else:
        n, m = (int(v) for v in pattern)
    if n <= 0 or m <= 0 or n >= m:
        raise PruningError(
            f"pattern {n}:{m} is malformed: need 0 < N < M (N zeros in every group of M)"
        )
    return (n, m)


def pattern_name(pattern: Pattern) -> str:
    return "unstructured" if pattern is None else f"{pattern[0]}:{pattern[1]}"


def check_sparsity(sparsity: float) -> float:
    sparsity = float(sparsity)
    if not (0.0 <= sparsity < 1.0) or math.isnan(sparsity):
        raise PruningError(f"sparsity must be in [0, 1), got {sparsity}")
    return sparsity
