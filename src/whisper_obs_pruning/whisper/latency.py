"""CPU transcription time per clip of several decoders, measured side by side.

Why side by side: the machines this runs on are shared, and a burst of load can double one
measurement. Every clip is transcribed by every decoder in turn (the order alternating from
round to round), ``repeats`` rounds; a decoder's time is the median over its (clip, round)
measurements, and its speed-up is the median of the paired per-clip ratios against the
reference decoder, so a burst lands on one pair, not on one decoder. Each decoder first runs
once untimed (first-call allocations and caches). One thread each (torch
and CTranslate2) by default: on 2 busy cores more threads measure the load, not the model.
The load average before and after is recorded with the figures.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

Runner = Callable[[np.ndarray], object]


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def measure_latency(
    runners: dict[str, Runner],
    clips: Sequence[np.ndarray],
    *,
    reference: str,
    repeats: int = 2,
    threads: int = 1,
) -> dict:
    """``{"seconds_per_clip": {name: s}, "speedup": {name: x}, ...}`` for each runner; the
    speed-up is ``reference time / its time`` (> 1: faster than the reference)."""
    if reference not in runners:
        raise ValueError(f"reference {reference!r} is not one of the runners {list(runners)}")
    if not clips or repeats < 1:
        raise ValueError("latency needs at least one clip and one round")
    names = list(runners)
    times: dict[str, list[list[float]]] = {n: [[] for _ in clips] for n in names}
    load_before = _load_average()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in names:  # one untimed call each: first-call allocations are not the model's
            runners[n](clips[0])
        for r in range(repeats):
            for i, clip in enumerate(clips):
                order = names if (r + i) % 2 == 0 else names[::-1]
                for n in order:
                    t0 = time.perf_counter()
                    runners[n](clip)
                    times[n][i].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)
    flat = {n: [t for per_clip in times[n] for t in per_clip] for n in names}
    ref = times[reference]
    return {
        "clips": len(clips),
        "repeats": repeats,
        "threads": threads,
        "load_average": [load_before, _load_average()],
        "seconds_per_clip": {n: round(statistics.median(flat[n]), 4) for n in names},
        "speedup": {
            n: round(
                statistics.median(
                    a / b
                    for ra, rb in zip(ref, times[n], strict=True)
                    for a, b in zip(ra, rb, strict=True)
                ),
                3,
            )
            for n in names
        },
    }
