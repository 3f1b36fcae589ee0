"""Hostile model directories and patterns (issue 16): refused before any work, never scored."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from whisper_obs_pruning.errors import PruningError
from whisper_obs_pruning.hessians.collector import linear_layers
from whisper_obs_pruning.pruning.targets import check_pattern_fits, select_targets
from whisper_obs_pruning.whisper.loading import ModelLoadError, load_whisper


def test_pattern_that_does_not_divide_the_inputs_is_refused_naming_the_layer(tiny):
    model = tiny[0]
    targets = select_targets(list(linear_layers(model)))
    check_pattern_fits(model, targets, "2:4")  # 384 and 1536 inputs: fine
    with pytest.raises(
        PruningError, match=r"3:7 .* 'model\.encoder\.layers\.0\.self_attn\.k_proj' has 384"
    ):
        check_pattern_fits(model, targets, "3:7")


@pytest.mark.parametrize("damage", ["missing_tensor", "extra_tensor"])
def test_checkpoint_that_does_not_match_its_config_is_refused(tiny, tmp_path, damage):
    model, processor = tiny
    d = tmp_path / "model"
    model.save_pretrained(d)
    processor.save_pretrained(d)
    f = d / "model.safetensors"
    state = load_file(str(f))
    if damage == "missing_tensor":
        state.pop("model.encoder.layers.1.fc1.weight")
    else:
        state["model.encoder.layers.9.fc1.weight"] = state[
            "model.encoder.layers.1.fc1.weight"
        ].clone()
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="does not match its config"):
        load_whisper(str(d))


def test_evaluate_refuses_missing_broken_report_and_changed_weights(tiny, tmp_path):
    """Issue 16: a missing/non-JSON report.json gave tracebacks; flipped bytes in the saved
    model were loaded and scored. Both are refused before anything is transcribed."""
    import json

    from whisper_obs_pruning.atomic import sha256_file
    from whisper_obs_pruning.errors import WhisperObsError
    from whisper_obs_pruning.pipeline.evaluate import evaluate
    from whisper_obs_pruning.pipeline.params import Params

    p = Params().updated({"model.device": "cpu", "data.evaluation.max_samples": 1})
    d = tmp_path / "pruned"
    tiny[0].save_pretrained(d / "model")
    tiny[1].save_pretrained(d / "model")
    with pytest.raises(WhisperObsError, match="report.json is missing"):
        evaluate(p, d, progress=False)
    (d / "report.json").write_text("{not json")
    with pytest.raises(WhisperObsError, match="not a valid prune report"):
        evaluate(p, d, progress=False)
    weights = d / "model" / "model.safetensors"
    summary = {
        "method": "obs",
        "pattern": "unstructured",
        "target_sparsity": 0.5,
        "prune_seconds": 1.0,
        "model_sha256": {"model.safetensors": sha256_file(weights)},
    }
    (d / "report.json").write_text(json.dumps({"summary": summary}))
    data = bytearray(weights.read_bytes())
    data[-1000] ^= 0x40  # one flipped bit inside a weight
    weights.write_bytes(bytes(data))
    with pytest.raises(WhisperObsError, match="changed since prune wrote it"):
        evaluate(p, d, progress=False)
