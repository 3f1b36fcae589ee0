"""Hostile data folders (issue 16): nothing read outside the folder, nothing silently mis-scored."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from whisper_obs_pruning.speech.audio import AudioError, to_mono_16k
from whisper_obs_pruning.speech.datasets import DataError, load_utterances


def tone(seconds: float, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def folder_with(tmp_path: Path, csv_text: str, clips: dict[str, float]) -> Path:
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    for name, seconds in clips.items():
        sf.write(d / name, tone(seconds), 16000)
    (d / "metadata.csv").write_bytes(csv_text.encode("utf-8"))
    return d


def test_bom_and_crlf_metadata_read_correctly(tmp_path):
    d = folder_with(
        tmp_path,
        "\ufefffile_name,transcription,speaker\r\na.wav,hello there,x\r\nb.wav,good morning,y\r\n",
        {"a.wav": 1.0, "b.wav": 1.0},
    )
    result = load_utterances(str(d))
    assert [(u.id, u.text, u.meta["speaker"]) for u in result.utterances] == [
        ("a.wav", "hello there", "x"),
        ("b.wav", "good morning", "y"),
    ]


def test_duplicate_file_names_are_refused(tmp_path):
    d = folder_with(tmp_path, "file_name,transcription\na.wav,one\na.wav,two\n", {"a.wav": 1.0})
    with pytest.raises(DataError, match=r"'a.wav' is listed twice \(rows 2 and 3\)"):
        load_utterances(str(d))


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_paths_outside_the_folder_are_refused(tmp_path, kind):
    secret = tmp_path / "secret.wav"
    sf.write(secret, tone(1.0), 16000)
    name = {"absolute": str(secret), "dotdot": "../secret.wav", "symlink": "link.wav"}[kind]
    d = folder_with(tmp_path, f"file_name,transcription\nok.wav,fine\n{name},leak\n", {"ok.wav": 1})
    if kind == "symlink":
        os.symlink(secret, d / "link.wav")
    result = load_utterances(str(d))
    assert [u.id for u in result.utterances] == ["ok.wav"]
    (skip,) = result.skipped
    assert "outside the data folder" in skip.reason


def test_outside_paths_allowed_when_the_user_opts_in(tmp_path, monkeypatch):
    secret = tmp_path / "shared.wav"
    sf.write(secret, tone(1.0), 16000)
    d = folder_with(tmp_path, f"file_name,transcription\n{secret},shared clip\n", {})
    monkeypatch.setenv("WHISPER_OBS_ALLOW_OUTSIDE_DATA", "1")
    assert len(load_utterances(str(d)).utterances) == 1


def test_punctuation_only_and_too_short_clips_are_skipped_not_scored(tmp_path):
    d = folder_with(
        tmp_path,
        "file_name,transcription\na.wav,real words\nb.wav,?!...\nc.wav,one sample\n"
        "d.wav,too short\n",
        {"a.wav": 1.0, "b.wav": 1.0, "c.wav": 1 / 16000, "d.wav": 0.05},
    )
    result = load_utterances(str(d))
    assert [u.id for u in result.utterances] == ["a.wav"]
    reasons = {s.id: s.reason for s in result.skipped}
    assert reasons["b.wav"] == "transcription is empty after normalisation"
    assert "shorter than 0.1 s" in reasons["c.wav"] and "shorter than 0.1 s" in reasons["d.wav"]


def test_jsonl_rows_that_are_not_objects_are_refused_naming_the_line(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    sf.write(d / "a.wav", tone(1.0), 16000)
    lines = [json.dumps({"file_name": "a.wav", "transcription": "hi"}), json.dumps(["b.wav"])]
    (d / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 2: each line must be a JSON object"):
        load_utterances(str(d))


def test_float_audio_far_out_of_range_names_the_clip():
    with pytest.raises(AudioError, match=r"clip7: sample amplitude 3e\+29"):
        to_mono_16k(tone(0.5) * 1e30, 16000, name="clip7")


def test_extra_columns_do_not_change_the_transcript_column(tmp_path):
    """The documented rule: the first of transcription, text, sentence, normalized_text."""
    d = folder_with(
        tmp_path,
        "notes,file_name,speaker,text,transcription,sentence\n"
        "n1,a.wav,x,WRONG text,the right one,WRONG sentence\n",
        {"a.wav": 1.0},
    )
    (u,) = load_utterances(str(d)).utterances
    assert u.text == "the right one" and u.meta["notes"] == "n1" and u.meta["text"] == "WRONG text"
