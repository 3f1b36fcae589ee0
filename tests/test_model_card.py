"""The model card: a valid Hugging Face header, the base model behind a bundled id, scores."""

from __future__ import annotations

import yaml

from whisper_obs_pruning.pipeline.prune import how_pruned
from whisper_obs_pruning.whisper.model_card import base_model_id, model_card


def test_bundled_ids_name_the_checkpoint_they_convert_and_others_pass_through():
    assert base_model_id("bundled:tiny.en") == "openai/whisper-tiny.en"
    assert base_model_id("bundled:base") == "openai/whisper-base"
    assert base_model_id("openai/whisper-small") == "openai/whisper-small"
    assert base_model_id("bundled:nonexistent") == "bundled:nonexistent"


def test_card_header_is_yaml_and_the_body_lists_what_was_done():
    text = model_card(
        model_id="bundled:tiny.en",
        title="tiny.en pruned with obs to 2:4",
        compression={"method": "obs", "pattern": "2:4", "obs rows": None},
        calibration={"source": "embedded", "utterances": 96},
        evaluation={"evaluation": {"wer": 0.0744, "cer": 0.0352, "clips": 160}},
        command="dvc exp run -S prune.method=obs",
        how="obs, one-shot.",
        tags=("pruned",),
    )
    _, header, body = text.split("---\n", 2)
    meta = yaml.safe_load(header)
    assert meta["base_model"] == "openai/whisper-tiny.en"
    assert meta["pipeline_tag"] == "automatic-speech-recognition"
    assert meta["tags"] == ["whisper", "whisper-obs", "pruned"] and meta["language"] == ["en"]
    assert "| pattern | 2:4 |" in body and "obs rows" not in body  # None rows are left out
    assert "| utterances | 96 |" in body
    assert "| evaluation | 7.44 | 3.52 | 160 |" in body
    assert "dvc exp run -S prune.method=obs" in body


def test_card_without_scores_says_where_they_come_from():
    text = model_card(
        model_id="/some/dir",
        title="t",
        compression={"method": "magnitude"},
        calibration=None,
        evaluation=None,
        command="c",
        how="the smallest-magnitude weights set to zero.",
        language=None,
    )
    assert "language" not in text.split("---\n")[1]
    assert "reads no Hessians" in text and "metrics/" in text
    assert "by whisper-obs: the smallest-magnitude weights set to zero." in text


def test_card_sentence_names_the_method_and_mode_it_describes():
    assert "no calibration" in how_pruned("magnitude", sequential=False)
    assert "one-shot" in how_pruned("obs", sequential=False)
    seq = how_pruned("sparsegpt", sequential=True)
    assert "sparsegpt" in seq and "already-pruned" in seq and "one-shot" not in seq
