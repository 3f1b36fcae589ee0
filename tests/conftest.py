"""Shared fixtures: the real bundled tiny.en (converted once, cached) and embedded audio."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a hub


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) of the bundled Whisper tiny.en, float32, CPU."""
    from whisper_obs_pruning.whisper.loading import load_whisper

    return load_whisper("bundled:tiny.en", device="cpu")


@pytest.fixture(scope="session")
def calib_utts():
    from whisper_obs_pruning.speech.datasets import load_utterances

    return load_utterances("embedded", "calibration", limit=8).utterances


@pytest.fixture(scope="session")
def eval_utts():
    from whisper_obs_pruning.speech.datasets import load_utterances

    return load_utterances("embedded", "evaluation", limit=12).utterances


@pytest.fixture()
def fresh_tiny(tiny):
    """A private copy of tiny.en that a test may prune."""
    import copy

    model, processor = tiny
    return copy.deepcopy(model), processor
