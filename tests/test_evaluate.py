"""WER/CER scoring with Whisper's English normaliser, and the evaluation of a real model."""

from __future__ import annotations

import jiwer
import pytest

from whisper_obs_pruning.speech.scoring import evaluate_model, normalize, score


def test_normaliser_makes_number_and_spelling_variants_equal():
    m = score(
        ["I paid $4.50 for 25 colour pencils."],
        ["i paid four dollars and fifty cents for twenty five color pencils"],
    )
    assert m["wer"] == 0.0 and m["cer"] == 0.0
    assert m["wer_raw"] > 0.5  # raw WER counts them all as errors


def test_corpus_wer_counts_edits_over_reference_words():
    m = score(["the cat sat down", "good morning"], ["the cat sat", "good morning friend"])
    # 6 reference words; one deletion in the first, one insertion in the second
    assert m["reference_words"] == 6
    assert (m["substitutions"], m["deletions"], m["insertions"]) == (0, 1, 1)
    assert m["wer"] == pytest.approx(2 / 6)


def test_empty_references_are_not_scored():
    m = score(["", "hello world"], ["anything at all", "hello world"])
    assert m["num_utterances"] == 1 and m["wer"] == 0.0
    with pytest.raises(ValueError, match="no reference"):
        score(["", "  "], ["a", "b"])


def test_evaluate_model_rows_add_up(tiny, eval_utts):
    model, processor = tiny
    utts = eval_utts[:6]
    metrics, rows = evaluate_model(model, processor, utts, batch_size=4, progress=False)
    assert len(rows) == 6 and [r["id"] for r in rows] == [u.id for u in utts]
    refs = [normalize(r["reference"]) for r in rows]
    hyps = [normalize(r["hypothesis"]) for r in rows]
    assert metrics["wer"] == pytest.approx(jiwer.wer(refs, hyps))
    assert metrics["wer"] < 0.5  # dense tiny.en transcribes the embedded clips
    assert metrics["num_utterances"] == 6 and metrics["utterances_per_second"] > 0
