"""The method registry: one descriptor per method, and a new method is one registration.

A toy method (keep the weights with the largest |w| * sqrt(H_jj), i.e. Wanda's score, under a
new name) is registered here and run through params validation and the real sweep.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from whisper_obs_pruning import REGISTRY, register_method
from whisper_obs_pruning.methods import (
    Method,
    PruneResult,
    PruningError,
    mask_from_scores,
    prune_layer,
    unregister,
)
from whisper_obs_pruning.pipeline.params import Params, ParamsError

REPO = Path(__file__).resolve().parents[1]


def _toy_prune(W, H, sparsity, pattern=None, **_):
    diag = torch.diagonal(H) if H.dim() == 2 else H
    scores = W.abs().double() * diag.clamp_min(0).sqrt()[None, :]
    mask = mask_from_scores(scores, sparsity, pattern)
    return PruneResult(W.masked_fill(mask, 0), mask, {})


TOY = Method(
    name="toy_wanda",
    prune=_toy_prune,
    statistic="diagonal",
    saliency=lambda W, H, damp: W.abs().double(),
    summary="test-only: |w| * sqrt(H_jj)",
)


@pytest.fixture()
def toy():
    register_method(TOY)
    yield TOY
    unregister(TOY.name)


def test_every_method_declares_what_it_needs():
    assert list(REGISTRY) == ["magnitude", "diagonal", "sparsegpt", "obs"]
    assert {m.name: m.statistic for m in REGISTRY.values()} == {
        "magnitude": "none",
        "diagonal": "diagonal",
        "sparsegpt": "full",
        "obs": "full",
    }
    for m in REGISTRY.values():
        assert m.supports(None) and m.supports((2, 4)) and m.summary


def test_a_registered_method_is_known_everywhere(toy):
    torch.manual_seed(0)
    W, X = torch.randn(6, 16), torch.randn(64, 16)
    H = 2 / 64 * X.T @ X
    out = prune_layer(W, H, method="toy_wanda", sparsity=0.5)
    assert int(out.pruned_mask.sum()) == 48
    p = Params().updated({"prune.method": "toy_wanda", "sweep.methods": ["toy_wanda"]})
    assert p.prune.method == "toy_wanda"
    # it needs only the diagonal: a diagonal-only calibration is enough for it
    Params().updated(
        {
            "calibrate.hessian": "diagonal",
            "prune.method": "toy_wanda",
            "sweep.methods": ["toy_wanda"],
            "frontier.methods": ["toy_wanda"],
        }
    )
    with pytest.raises(PruningError, match="already registered"):
        register_method(TOY)


def test_an_unregistered_method_is_refused_naming_the_choices():
    with pytest.raises(
        ParamsError, match=r"prune.method = 'toy_wanda' is not allowed; choose one of \["
    ):
        Params().updated({"prune.method": "toy_wanda"})


def test_a_registered_method_runs_through_the_real_sweep(toy, tmp_path, monkeypatch):
    from whisper_obs_pruning.pipeline.calibrate import calibrate
    from whisper_obs_pruning.pipeline.sweep import run_sweep

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    p = Params().updated(
        {
            "model.device": "cpu",
            "data.calibration.max_samples": 2,
            "data.evaluation.max_samples": 3,
            "sweep.methods": ["magnitude", "toy_wanda"],
            "sweep.sparsities": [0.5],
            "sweep.patterns": [],
        }
    )
    calibrate(p, tmp_path / "hessians", progress=False)
    summary = run_sweep(
        p, tmp_path / "hessians", tmp_path / "out", tmp_path / "state", progress=False
    )
    points = {pt["method"]: pt for pt in summary["points"]}
    assert set(points) == {"magnitude", "toy_wanda"}
    assert points["toy_wanda"]["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert 0 <= points["toy_wanda"]["wer"] < 50
    assert "toy_wanda" in (tmp_path / "out" / "sweep.csv").read_text()
