"""Side-by-side latency: the bookkeeping (alternating order, pairing, medians), not a timing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from whisper_obs_pruning.whisper.latency import measure_latency


def test_every_clip_is_timed_by_every_runner_in_alternating_order():
    calls: list[tuple[str, int]] = []
    clips = [np.full(3, i, dtype=np.float32) for i in range(3)]

    def runner(name):
        return lambda clip: calls.append((name, int(clip[0])))

    threads = torch.get_num_threads()
    out = measure_latency(
        {"ref": runner("ref"), "b": runner("b")}, clips, reference="ref", repeats=2
    )
    assert torch.get_num_threads() == threads  # restored after the one-thread measurement
    assert calls[:2] == [("ref", 0), ("b", 0)]  # the untimed warm-up
    calls = calls[2:]
    assert len(calls) == 2 * 3 * 2
    # per clip both run back to back, the first one alternating: a load burst hits pairs
    firsts = [calls[i][0] for i in range(0, len(calls), 2)]
    assert firsts == ["ref", "b", "ref", "b", "ref", "b"]
    assert [calls[i][1] for i in range(0, len(calls), 2)] == [0, 1, 2, 0, 1, 2]
    assert out["speedup"]["ref"] == 1.0 and out["clips"] == 3 and out["repeats"] == 2
    assert set(out["seconds_per_clip"]) == {"ref", "b"} and out["threads"] == 1


def test_speedup_is_the_median_of_paired_ratios():
    """A runner that does ~4x the work of the reference is reported ~4x slower (speed-up ~0.25)
    whatever the machine's speed: the ratio is taken per pair, not from two separate runs."""
    a = torch.randn(256, 256)

    def work(n):
        def run(_clip):
            for _ in range(n):
                a @ a

        return run

    out = measure_latency(
        {"ref": work(10), "slow": work(40)}, [np.zeros(1)] * 5, reference="ref", repeats=3
    )
    assert 0.1 < out["speedup"]["slow"] < 0.6
    assert out["seconds_per_clip"]["slow"] > out["seconds_per_clip"]["ref"]


def test_bad_reference_or_no_clips():
    with pytest.raises(ValueError, match="reference"):
        measure_latency({"a": lambda c: None}, [np.zeros(1)], reference="b")
    with pytest.raises(ValueError, match="clip"):
        measure_latency({"a": lambda c: None}, [], reference="a")
