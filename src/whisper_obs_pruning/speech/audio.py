"""Audio loading for Whisper: any file soundfile reads in, 16 kHz mono float32 out.

Whisper's feature extractor assumes 16 kHz mono; feeding it another rate silently ruins the
transcript, so every clip goes through :func:`load_audio`, which resamples (soxr, high
quality), downmixes, and turns every way a clip can be unusable into an :class:`AudioError`
that names the file. soundfile reads WAV, FLAC, OGG/Vorbis, OGG/Opus and MP3 (libsndfile
>= 1.1); nothing here needs torchcodec or FFmpeg.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from ..errors import WhisperObsError

SAMPLE_RATE = 16000
MIN_SECONDS = 0.1  # shorter clips hold no word; they are skipped, never scored
MAX_PEAK = 16.0  # float audio is in [-1, 1]; a little headroom, never 1e30
MAX_SECONDS = 30.0  # Whisper's window: longer clips are cut by the feature extractor

__all__ = ["MAX_SECONDS", "SAMPLE_RATE", "AudioError", "load_audio", "to_mono_16k"]


class AudioError(WhisperObsError, ValueError):
    """A clip that cannot be used: missing, empty, undecodable, zero-length or non-finite."""


def load_audio(
    source: str | Path | bytes,
    *,
    target_sr: int = SAMPLE_RATE,
    name: str | None = None,
) -> np.ndarray:
    """Read ``source`` (a path, or the encoded bytes of a file) as mono float32 at ``target_sr``.

    ``name`` labels error messages for in-memory bytes (e.g. the file's original path).
    """
    if isinstance(source, bytes | bytearray | memoryview):
        label = name or "<audio bytes>"
        data = bytes(source)
        if not data:
            raise AudioError(f"{label}: empty audio (0 bytes)")
        fileobj: io.BytesIO | Path = io.BytesIO(data)
    elif isinstance(source, str | Path):
        path = Path(source)
        label = name or str(path)
        if not path.exists():
            raise AudioError(f"{label}: audio file not found")
        if not path.is_file():
            raise AudioError(f"{label}: not a file")
        if path.stat().st_size == 0:
            raise AudioError(f"{label}: empty audio file (0 bytes)")
        fileobj = path
    else:
        raise TypeError(f"load_audio takes a path or bytes, not {type(source).__name__}")
    try:
        audio, sr = sf.read(fileobj, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError, EOFError) as e:
        raise AudioError(f"{label}: cannot decode audio ({e})") from e
    return to_mono_16k(audio, sr, target_sr=target_sr, name=label)


def to_mono_16k(
    audio: np.ndarray, sr: int, *, target_sr: int = SAMPLE_RATE, name: str = "<audio>"
) -> np.ndarray:
    """Downmix (mean over channels) and resample an already decoded array; checks it too.

    ``audio`` is (samples,) or (samples, channels), as soundfile returns it.
    """
    if target_sr <= 0:
        raise ValueError(f"target_sr must be positive, got {target_sr}")
    a = np.asarray(audio, dtype=np.float32)
    if a.ndim == 2:
        a = a.mean(axis=1, dtype=np.float32) if a.shape[1] > 1 else a[:, 0]
    elif a.ndim != 1:
        raise AudioError(f"{name}: expected (samples,) or (samples, channels), got {a.shape}")
    if a.size == 0:
        raise AudioError(f"{name}: zero-length audio (no samples)")
    if not sr or sr <= 0:
        raise AudioError(f"{name}: invalid sample rate {sr!r}")
    if not np.isfinite(a).all():
        raise AudioError(f"{name}: audio contains NaN or infinite samples")
    peak = float(np.abs(a).max())
    if peak > MAX_PEAK:
        raise AudioError(
            f"{name}: sample amplitude {peak:.3g} is far outside [-1, 1] (float audio must be "
            f"normalised; at most {MAX_PEAK:g} is accepted)"
        )
    if sr != target_sr:
        a = soxr.resample(a, sr, target_sr, quality="HQ").astype(np.float32, copy=False)
        if a.size == 0:
            raise AudioError(f"{name}: too short to resample from {sr} Hz to {target_sr} Hz")
    return np.ascontiguousarray(a, dtype=np.float32)
