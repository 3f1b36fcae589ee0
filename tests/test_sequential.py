"""Sequential calibration: layer l's Hessian sees the pruned layers below it, nothing else."""

from __future__ import annotations

import copy

import pytest
import torch

from whisper_obs_pruning.hessians.calibration import run_calibration
from whisper_obs_pruning.hessians.collector import HessianCollector, linear_layers
from whisper_obs_pruning.pruning import prune_layers
from whisper_obs_pruning.pruning.sequential import prune_sequential
from whisper_obs_pruning.whisper.prompt import decoder_prompt_ids

TARGETS = [
    "model.encoder.layers.0.fc1",
    "model.encoder.layers.1.fc1",
    "model.decoder.layers.0.fc1",
    "model.decoder.layers.0.encoder_attn.k_proj",
]


@pytest.mark.parametrize("method", ["sparsegpt", "obs"])
def test_sequential_matches_oneshot_first_layer_only(tiny, calib_utts, method):
    base, processor = tiny
    utts = calib_utts[:3]
    prompt = decoder_prompt_ids(base, processor)

    oneshot = copy.deepcopy(base)
    with HessianCollector(linear_layers(oneshot)) as col:
        run_calibration(oneshot, processor, utts, col, prompt, batch_size=2, progress=False)
    hs = {n: s.hessian() for n, s in col.hessians(TARGETS).items()}
    prune_layers(oneshot, TARGETS, hs.__getitem__, method=method, sparsity=0.5, progress=False)

    seq = copy.deepcopy(base)
    report = prune_sequential(
        seq,
        processor,
        utts,
        TARGETS,
        prompt,
        method=method,
        sparsity=0.5,
        batch_size=2,
        progress=False,
    )
    assert set(report) == set(TARGETS)
    w1 = dict(oneshot.named_modules())
    w2 = dict(seq.named_modules())
    for name in TARGETS:
        a, b = w1[name].weight, w2[name].weight
        assert int((b == 0).sum()) == round(0.5 * b.numel())
        assert torch.isfinite(b).all()
        same = torch.allclose(a, b, atol=1e-5)
        # Layer 0's input does not depend on any pruned layer: identical to one-shot. Every
        # later target reads activations that went through a pruned layer: it must differ.
        assert same == (name == "model.encoder.layers.0.fc1"), name
    untouched = [n for n in linear_layers(seq) if n not in TARGETS]
    assert all(torch.equal(w2[n].weight, dict(base.named_modules())[n].weight) for n in untouched)
