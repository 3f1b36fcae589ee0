"""The seed README's library API, run as written on the real tiny.en."""

from __future__ import annotations

import pytest
import torch

from whisper_obs_pruning import WhisperOBSPruner, prune_whisper_model
from whisper_obs_pruning.speech.scoring import evaluate_model


def test_seed_readme_flow(fresh_tiny):
    model, _ = fresh_tiny
    pruner = WhisperOBSPruner(model, rel_damp=1e-4)
    # Hook passes the caller makes are accumulated, as in the seed README ...
    with torch.no_grad():
        model.generate(torch.randn(1, 80, 3000), max_length=8)
    # ... and accumulate_hessian brings its own calibration audio (the embedded split).
    obs_data = pruner.accumulate_hessian(max_samples=4, progress=False)
    assert len(obs_data) == 65
    for name, entry in obs_data.items():
        assert entry["n_samples"] > 0, name
        assert entry["H"].shape == (entry["shape"][1], entry["shape"][1])
        assert torch.isfinite(entry["H"]).all()

    target = "model.encoder.layers.0.fc1"
    before = {n: m.weight.detach().clone() for n, m in pruner.layers.items()}
    pruned_weights = pruner.prune_model(sparsity=0.3, target_layers=[target], progress=False)
    assert list(pruned_weights) == [target]
    w = pruned_weights[target]
    assert int((w == 0).sum()) == round(0.3 * w.numel())
    info = pruner.get_layer_info()
    assert info[target]["sparsity"] == pytest.approx(0.3, abs=1e-4)
    assert info[target]["shape"] == (1536, 384)
    untouched = [n for n in info if n != target]
    assert all(torch.equal(pruner.layers[n].weight, before[n]) for n in untouched)

    attention_layers = [n for n in pruner.obs_data if "attn" in n and "proj" in n]
    assert len(attention_layers) == 48
    pruner.prune_model(
        sparsity=0.4, target_layers=attention_layers, method="sparsegpt", progress=False
    )
    info = pruner.get_layer_info()
    assert all(info[n]["sparsity"] == pytest.approx(0.4, abs=1e-3) for n in attention_layers)
    assert torch.equal(pruner.layers["proj_out"].weight, before["proj_out"])  # tied: untouched

    pruner.cleanup()
    assert all(entry["H"] is None for entry in pruner.obs_data.values())
    n_hooks = sum(len(m._forward_pre_hooks) for m in pruner.layers.values())
    assert n_hooks == 0


def test_prune_model_errors(fresh_tiny):
    model, _ = fresh_tiny
    pruner = WhisperOBSPruner(model)
    with pytest.raises(ValueError, match="matches no Linear"):
        pruner.prune_model(0.3, target_layers=["model.encoder.layers.99.fc1"], method="magnitude")
    with pytest.raises(RuntimeError, match="accumulate_hessian"):
        pruner.prune_model(0.3, target_layers=["model.encoder.layers.0.fc1"], method="sparsegpt")
    with pytest.raises(ValueError, match="max_samples"):
        pruner.accumulate_hessian(max_samples=0)
    with pytest.raises(ValueError, match="rel_damp"):
        WhisperOBSPruner(model, rel_damp=-1)
    pruner.cleanup()


def test_prune_whisper_model_convenience(fresh_tiny, eval_utts):
    model, processor = fresh_tiny
    pruned_model = prune_whisper_model(
        model=model, sparsity=0.3, max_samples=8, method="sparsegpt", rel_damp=0.01, progress=False
    )
    assert pruned_model is model
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "proj_out":
            assert float((m.weight == 0).float().mean()) == pytest.approx(0.3, abs=1e-3), name
    # proj_out is tied to the token embedding and is left alone by default
    assert float((model.proj_out.weight == 0).float().mean()) < 1e-4
    metrics, _ = evaluate_model(model, processor, eval_utts, progress=False)
    assert metrics["wer"] < 0.35  # 30% SparseGPT keeps tiny.en usable (dense ~0.08-0.2 here)
