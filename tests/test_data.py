"""Audio loading and data sources: resampling, bad clips, folders, the embedded set, hf:."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from whisper_obs_pruning.speech.audio import SAMPLE_RATE, AudioError, load_audio
from whisper_obs_pruning.speech.datasets import (
    DataError,
    LoadResult,
    Utterance,
    embedded_data_dir,
    load_utterances,
    utterances_from_hf_dataset,
)


def sine(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(audio: np.ndarray, sr: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / sr)[spectrum.argmax()])


def write_folder(folder: Path, rows: list[dict], header: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    header = header or list(rows[0])
    with open(folder / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return folder


# ----------------------------------------------------------------------------- load_audio


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_resamples_to_16k_and_keeps_frequency(tmp_path: Path, sr: int) -> None:
    path = tmp_path / f"tone_{sr}.wav"
    sf.write(path, sine(1000.0, 1.0, sr), sr, subtype="PCM_16")
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - SAMPLE_RATE) <= 1
    assert abs(peak_hz(audio) - 1000.0) <= 2.0
    # bytes in, same result out
    np.testing.assert_array_equal(load_audio(path.read_bytes()), audio)


def test_16k_is_passed_through_unchanged(tmp_path: Path) -> None:
    x = sine(440.0, 0.5, SAMPLE_RATE)
    sf.write(tmp_path / "a.flac", x, SAMPLE_RATE, subtype="PCM_16")
    np.testing.assert_allclose(load_audio(tmp_path / "a.flac"), x, atol=1 / 32768)


def test_stereo_is_averaged(tmp_path: Path) -> None:
    left, right = sine(300.0, 0.5, SAMPLE_RATE, 0.6), sine(1200.0, 0.5, SAMPLE_RATE, 0.2)
    sf.write(tmp_path / "st.wav", np.stack([left, right], axis=1), SAMPLE_RATE, subtype="FLOAT")
    audio = load_audio(tmp_path / "st.wav")
    np.testing.assert_allclose(audio, (left + right) / 2, atol=1e-6)


def test_stereo_44k1_downmixed_and_resampled(tmp_path: Path) -> None:
    x = sine(2000.0, 1.0, 44100)
    sf.write(tmp_path / "st.flac", np.stack([x, x], axis=1), 44100, subtype="PCM_16")
    audio = load_audio(tmp_path / "st.flac")
    assert abs(len(audio) - SAMPLE_RATE) <= 1 and abs(peak_hz(audio) - 2000.0) <= 2.0


def test_missing_empty_corrupt_zero_length_nonfinite(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match=r"nope\.wav.*not found"):
        load_audio(tmp_path / "nope.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav.*0 bytes"):
        load_audio(tmp_path / "empty.wav")
    junk = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    (tmp_path / "junk.flac").write_bytes(junk)
    with pytest.raises(AudioError, match=r"junk\.flac.*cannot decode"):
        load_audio(tmp_path / "junk.flac")
    with pytest.raises(AudioError, match=r"clip7.*cannot decode"):
        load_audio(junk, name="clip7")
    with pytest.raises(AudioError, match="0 bytes"):
        load_audio(b"")
    sf.write(tmp_path / "zero.wav", np.zeros(0, np.float32), SAMPLE_RATE)
    assert (tmp_path / "zero.wav").stat().st_size > 0  # a header, no samples
    with pytest.raises(AudioError, match=r"zero\.wav.*zero-length"):
        load_audio(tmp_path / "zero.wav")
    bad = sine(440.0, 0.1, SAMPLE_RATE)
    bad[10] = np.nan
    sf.write(tmp_path / "nan.wav", bad, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan\.wav.*NaN"):
        load_audio(tmp_path / "nan.wav")
    assert issubclass(AudioError, ValueError)


# ----------------------------------------------------------------------------- local folders


@pytest.fixture()
def messy_folder(tmp_path: Path) -> Path:
    """Two good clips and one of each kind of bad clip, in a known order."""
    d = tmp_path / "clips"
    d.mkdir()
    sf.write(d / "good1.wav", np.stack([sine(500, 1.0, 8000)] * 2, axis=1), 8000)
    sf.write(d / "long.flac", sine(500, 31.0, 8000), 8000)
    (d / "empty.wav").write_bytes(b"")
    (d / "junk.wav").write_bytes(b"RIFF\x00\x00junk" * 50)
    sf.write(d / "notext.wav", sine(500, 0.5, 16000), 16000)
    sf.write(d / "good2.flac", sine(700, 2.0, 48000), 48000)
    rows = [
        {"file_name": "good1.wav", "transcription": "first clip", "speaker": "a"},
        {"file_name": "long.flac", "transcription": "too long", "speaker": "b"},
        {"file_name": "missing.wav", "transcription": "not there", "speaker": "c"},
        {"file_name": "empty.wav", "transcription": "empty", "speaker": "d"},
        {"file_name": "junk.wav", "transcription": "junk", "speaker": "e"},
        {"file_name": "notext.wav", "transcription": "  ", "speaker": "f"},
        {"file_name": "good2.flac", "transcription": " second clip ", "speaker": "g"},
    ]
    return write_folder(d, rows)


def test_folder_skips_bad_clips_with_reasons(messy_folder: Path) -> None:
    result = load_utterances(str(messy_folder))
    assert isinstance(result, LoadResult)
    assert [u.id for u in result.utterances] == ["good1.wav", "good2.flac"]
    u1, u2 = result.utterances
    assert isinstance(u1, Utterance) and u1.text == "first clip" and u2.text == "second clip"
    assert u1.meta["speaker"] == "a" and abs(u1.duration - 1.0) < 1e-3
    assert abs(u2.duration - 2.0) < 1e-3 and u2.audio.dtype == np.float32
    reasons = {s.id: s.reason for s in result.skipped}
    assert list(reasons) == ["long.flac", "missing.wav", "empty.wav", "junk.wav", "notext.wav"]
    assert (
        "31.0 s: longer than 30 s (Whisper's window); split it into shorter clips"
        in reasons["long.flac"]
    )
    assert "not found" in reasons["missing.wav"] and "missing.wav" in reasons["missing.wav"]
    assert "0 bytes" in reasons["empty.wav"]
    assert "cannot decode" in reasons["junk.wav"]
    assert reasons["notext.wav"] == "empty transcription"
    summary = result.summary()
    assert "2 utterances" in summary and "5 skipped" in summary and "long.flac" in summary


def test_folder_limit_and_max_seconds(messy_folder: Path) -> None:
    only = load_utterances(str(messy_folder), limit=1)
    assert [u.id for u in only.utterances] == ["good1.wav"] and only.skipped == []
    short = load_utterances(str(messy_folder), max_seconds=1.5)
    assert [u.id for u in short.utterances] == ["good1.wav"]
    assert any("longer than 1.5 s" in s.reason for s in short.skipped if s.id == "good2.flac")


def test_folder_split_subfolder_and_text_alias(tmp_path: Path) -> None:
    d = tmp_path / "ds" / "test"
    d.mkdir(parents=True)
    sf.write(d / "a.wav", sine(440, 0.5, 16000), 16000)
    write_folder(d, [{"file_name": "a.wav", "text": "hello"}])
    result = load_utterances(str(tmp_path / "ds"), "test")
    assert [u.text for u in result.utterances] == ["hello"]


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_utterances(str(tmp_path / "nowhere"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"no metadata\.csv in .*empty_dir"):
        load_utterances(str(tmp_path / "empty_dir"))
    write_folder(tmp_path / "nofile", [{"path": "a.wav", "transcription": "x"}])
    with pytest.raises(DataError, match="'file_name'"):
        load_utterances(str(tmp_path / "nofile"))
    write_folder(tmp_path / "notext", [{"file_name": "a.wav", "words": "x"}])
    with pytest.raises(DataError, match="transcript column"):
        load_utterances(str(tmp_path / "notext"))
    write_folder(tmp_path / "allbad", [{"file_name": "gone.wav", "transcription": "x"}])
    with pytest.raises(DataError, match=r"no usable utterances.*gone\.wav"):
        load_utterances(str(tmp_path / "allbad"))
    with pytest.raises(ValueError):
        load_utterances(str(tmp_path / "allbad"), limit=0)


def test_embedded_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "mine" / "dev"
    d.mkdir(parents=True)
    sf.write(d / "a.wav", sine(440, 0.5, 16000), 16000)
    write_folder(d, [{"file_name": "a.wav", "transcription": "hi"}])
    monkeypatch.setenv("WHISPER_OBS_DATA", str(tmp_path / "mine"))
    assert embedded_data_dir() == tmp_path / "mine"
    assert len(load_utterances("embedded", "dev").utterances) == 1
    with pytest.raises(DataError, match="available splits: dev"):
        load_utterances("embedded", "nosuchsplit")


# ----------------------------------------------------------------------------- embedded set


@pytest.fixture(scope="module")
def embedded() -> dict[str, LoadResult]:
    return {s: load_utterances("embedded", s) for s in ("calibration", "evaluation")}


def test_embedded_splits(embedded: dict[str, LoadResult]) -> None:
    cal, ev = embedded["calibration"], embedded["evaluation"]
    assert len(cal.utterances) >= 96 and len(ev.utterances) >= 160
    assert not cal.skipped and not ev.skipped
    for result, (lo, hi) in ((cal, (9.9, 28.0)), (ev, (1.9, 8.1))):
        for u in result.utterances:
            assert u.audio.dtype == np.float32 and u.audio.ndim == 1
            assert lo <= u.duration <= hi, (u.id, u.duration)
            assert abs(u.duration - float(u.meta["duration_s"])) < 0.01
            assert u.meta["voice"] and u.text
    assert sum(len(u.text.split()) for u in cal.utterances) >= 3000
    assert len({u.meta["voice"] for u in ev.utterances}) >= 8


def test_embedded_files_are_16k_mono_flac() -> None:
    for split in ("calibration", "evaluation"):
        files = sorted((embedded_data_dir() / split).glob("*.flac"))
        for f in files[:: max(1, len(files) // 10)]:
            info = sf.info(f)
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), f


def test_embedded_calibration_and_evaluation_text_disjoint(
    embedded: dict[str, LoadResult],
) -> None:
    def sentences(text: str) -> list[str]:
        return [s.strip().lower() for s in re.split(r"(?<=[.?!])\s+", text) if s.strip()]

    cal = {s for u in embedded["calibration"].utterances for s in sentences(u.text)}
    ev = {s for u in embedded["evaluation"].utterances for s in sentences(u.text)}
    assert len(ev) == len(embedded["evaluation"].utterances)  # no repeats either
    assert not cal & ev


# ----------------------------------------------------------------------------- hf: sources


def _encoded(x: np.ndarray, sr: int, fmt: str = "FLAC") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture()
def hf_dict() -> dict:
    stereo = np.stack([sine(1000, 1.0, 44100)] * 2, axis=1)
    return {
        "id": ["u1", "u2", "u3", "u4"],
        "audio": [
            {"bytes": _encoded(stereo, 44100), "path": "u1.flac"},
            {"bytes": b"not audio at all", "path": "u2.wav"},
            {"bytes": _encoded(sine(300, 0.5, 8000), 8000, "WAV"), "path": "u3.wav"},
            {"bytes": _encoded(sine(300, 0.5, 8000), 8000, "WAV"), "path": "u4.wav"},
        ],
        "sentence": ["one thousand hertz", "broken", "", "three hundred"],
        "speaker_id": [7, 8, 9, 10],
    }


def _check_hf_result(result: LoadResult) -> None:
    assert [u.id for u in result.utterances] == ["u1", "u4"]
    u1 = result.utterances[0]
    assert abs(len(u1.audio) - SAMPLE_RATE) <= 1 and abs(peak_hz(u1.audio) - 1000) <= 2
    assert u1.text == "one thousand hertz" and u1.meta["speaker_id"] == 7
    reasons = {s.id: s.reason for s in result.skipped}
    assert "cannot decode" in reasons["u2"] and reasons["u3"] == "empty transcription"


def test_hf_dataset_struct_and_audio_feature(hf_dict: dict) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(hf_dict)
    _check_hf_result(utterances_from_hf_dataset(ds))  # plain {bytes, path} struct
    as_audio = ds.cast_column("audio", datasets.Audio())  # decode=True, as on the hub
    _check_hf_result(utterances_from_hf_dataset(as_audio, text_column="sentence"))
    _check_hf_result(utterances_from_hf_dataset(as_audio.to_iterable_dataset()))
    with pytest.raises(DataError, match="audio column 'speech'"):
        utterances_from_hf_dataset(ds, audio_column="speech")


def test_load_utterances_hf_parquet(
    hf_dict: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    ds = datasets.Dataset.from_dict(hf_dict).cast_column("audio", datasets.Audio())
    ds.to_parquet(str(tmp_path / "d.parquet"))
    files = str(tmp_path / "d.parquet")
    _check_hf_result(load_utterances("hf:parquet", "train", data_files=files))
    streamed = load_utterances("hf:parquet", "train", data_files=files, limit=1)  # streaming
    assert [u.id for u in streamed.utterances] == ["u1"]
    with pytest.raises(DataError, match="cannot load HF dataset"):
        load_utterances("hf:parquet", "train", data_files=str(tmp_path / "none.parquet"))
