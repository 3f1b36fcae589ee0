"""Speech + transcript loading: the embedded set, local audio folders, Hugging Face datasets.

Every source yields :class:`Utterance` objects (16 kHz mono float32 audio, reference text) in a
deterministic order. A clip that cannot be used is never dropped silently: it is listed in
:attr:`LoadResult.skipped` with the reason, and a source with nothing usable raises
:class:`DataError`. Clips longer than Whisper's 30 s window are skipped, not truncated, because
a cut clip would no longer match its transcript.

Local folders follow the Hugging Face ``audiofolder`` convention (``metadata.csv`` with a
``file_name`` column relative to the folder) but are read here with soundfile + soxr: the
``datasets`` audio decoding path needs torchcodec and FFmpeg, which this project does not.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WhisperObsError
from .audio import MAX_SECONDS, MIN_SECONDS, SAMPLE_RATE, AudioError, load_audio, to_mono_16k
from .text import normalize

__all__ = [
    "DataError",
    "LoadResult",
    "Skipped",
    "Utterance",
    "embedded_data_dir",
    "load_utterances",
    "utterances_from_hf_dataset",
]

TEXT_COLUMNS = ("transcription", "text", "sentence", "normalized_text")
DATA_ENV = "WHISPER_OBS_DATA"


class DataError(WhisperObsError, ValueError):
    """A data source that cannot be read at all (missing folder, metadata or column)."""


@dataclass
class Utterance:
    """One clip: 16 kHz mono float32 ``audio`` and its reference ``text``."""

    id: str
    audio: np.ndarray
    text: str
    meta: dict = field(default_factory=dict)

    @property
    def duration(self) -> float:
        """Length in seconds (at 16 kHz)."""
        return len(self.audio) / SAMPLE_RATE


@dataclass
class Skipped:
    id: str
    reason: str


@dataclass
class LoadResult:
    utterances: list[Utterance]
    skipped: list[Skipped]
    source: str = ""

    def summary(self, max_reasons: int = 5) -> str:
        """One line for logs: counts, audio length, and the first few skip reasons."""
        seconds = sum(u.duration for u in self.utterances)
        where = f" from {self.source}" if self.source else ""
        text = f"{len(self.utterances)} utterances ({seconds:.1f} s of audio){where}"
        if not self.skipped:
            return text + ", none skipped"
        reasons = "; ".join(f"{s.id}: {s.reason}" for s in self.skipped[:max_reasons])
        more = (
            f"; ... {len(self.skipped) - max_reasons} more"
            if len(self.skipped) > max_reasons
            else ""
        )
        return f"{text}, {len(self.skipped)} skipped ({reasons}{more})"


def embedded_data_dir() -> Path:
    """The repository's ``data/`` folder (``$WHISPER_OBS_DATA`` overrides it)."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[3] / "data"


def load_utterances(
    source: str = "embedded",
    split: str = "evaluation",
    *,
    limit: int | None = None,
    max_seconds: float = MAX_SECONDS,
    audio_column: str = "audio",
    text_column: str | None = None,
    config: str | None = None,
    data_files: Any = None,
    streaming: bool | None = None,
) -> LoadResult:
    """Load up to ``limit`` usable utterances from ``source``, in the source's own order.

    ``source``: ``"embedded"`` (the repo's ``data/<split>/``), a local folder holding
    ``metadata.csv`` (or ``<split>/metadata.csv``), or ``"hf:<dataset>"`` for
    ``datasets.load_dataset(<dataset>, config, split=split, data_files=...)``; e.g.
    ``hf:parquet`` with ``data_files`` reads local parquet files. ``streaming`` defaults to
    True for ``hf:`` sources when ``limit`` is set, so only what is needed is downloaded.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit}")
    if not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    if source.startswith("hf:"):
        return _load_hf(
            source[3:],
            split,
            config=config,
            data_files=data_files,
            streaming=limit is not None if streaming is None else streaming,
            limit=limit,
            max_seconds=max_seconds,
            audio_column=audio_column,
            text_column=text_column,
        )
    if source == "embedded":
        root = embedded_data_dir()
        folder = root / split
        if not (folder / "metadata.csv").is_file():
            have = (
                sorted(p.name for p in root.iterdir() if (p / "metadata.csv").is_file())
                if root.is_dir()
                else []
            )
            raise DataError(
                f"embedded split {split!r} not found: expected {folder / 'metadata.csv'} "
                f"(available splits: {', '.join(have) or 'none'}; the embedded set lives in the "
                f"repository's data/ folder, or set ${DATA_ENV} to its location)"
            )
        metadata = folder / "metadata.csv"
    else:
        metadata = _find_metadata(Path(source).expanduser(), split)
    return _load_folder(metadata, limit=limit, max_seconds=max_seconds, text_column=text_column)


# ------------------------------------------------------------------------------ local folders


def _find_metadata(path: Path, split: str) -> Path:
    if path.is_file() and path.suffix in (".csv", ".jsonl"):
        return path
    if not path.exists():
        raise DataError(
            f"data source {str(path)!r} not found: expected 'embedded', 'hf:<dataset name>', "
            "or a folder holding metadata.csv (file_name,transcription) and the audio files"
        )
    if not path.is_dir():
        raise DataError(f"data source {path} is not a folder (nor a metadata.csv file)")
    for folder in (path / split, path):
        for name in ("metadata.csv", "metadata.jsonl"):
            if (folder / name).is_file():
                return folder / name
    raise DataError(
        f"no metadata.csv in {path} (nor in {path / split}): a local audio folder needs a "
        "metadata.csv with columns file_name (audio path relative to the folder) and "
        "transcription (or text / sentence)"
    )


def _read_rows(metadata: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        if metadata.suffix == ".jsonl":
            rows = []
            for n, line in enumerate(metadata.read_text(encoding="utf-8-sig").splitlines(), 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise DataError(
                        f"{metadata}, line {n}: each line must be a JSON object "
                        f'({{"file_name": ..., "transcription": ...}}), got {type(row).__name__}'
                    )
                rows.append(row)
            columns = list(dict.fromkeys(k for r in rows for k in r))
            return columns, [{k: "" if v is None else str(v) for k, v in r.items()} for r in rows]
        with open(metadata, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [{k: (v or "") for k, v in r.items() if k is not None} for r in reader]
            return list(reader.fieldnames or []), rows
    except (OSError, UnicodeDecodeError, csv.Error, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {metadata}: {e}") from e


def _pick_text_column(columns: Iterable[str], text_column: str | None, where: str) -> str:
    columns = list(columns)
    if text_column is not None:
        if text_column not in columns:
            raise DataError(f"{where}: text column {text_column!r} not found (columns: {columns})")
        return text_column
    for name in TEXT_COLUMNS:
        if name in columns:
            return name
    raise DataError(
        f"{where}: no transcript column; expected one of {', '.join(TEXT_COLUMNS)} "
        f"(columns: {columns}), or pass text_column="
    )


def _load_folder(
    metadata: Path, *, limit: int | None, max_seconds: float, text_column: str | None
) -> LoadResult:
    columns, rows = _read_rows(metadata)
    if "file_name" not in columns:
        raise DataError(
            f"{metadata}: missing required column 'file_name' (the audio path relative to "
            f"{metadata.parent}); columns found: {columns}"
        )
    text_col = _pick_text_column(columns, text_column, str(metadata))
    folder = metadata.parent
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        name = row.get("file_name", "").strip()
        if name and name in seen:
            raise DataError(
                f"{metadata}: file_name {name!r} is listed twice (rows {seen[name] + 2} and "
                f"{i + 2}); each clip must appear once with one transcript"
            )
        seen[name] = i

    def items() -> Iterator[tuple[str, Any, str, dict]]:
        for i, row in enumerate(rows):
            file_name = row.get("file_name", "").strip()
            meta = {k: v for k, v in row.items() if k not in ("file_name", text_col)}
            uid = file_name or f"row {i + 2}"
            source = _inside(folder, file_name) if file_name else None
            yield uid, source, row.get(text_col, ""), {**meta, "path": str(source or "")}

    return _collect(items(), str(metadata), limit=limit, max_seconds=max_seconds)


ALLOW_OUTSIDE_ENV = "WHISPER_OBS_ALLOW_OUTSIDE_DATA"


class _Outside(str):
    """A file_name that resolves outside its data folder: skipped with this reason."""


def _inside(folder: Path, file_name: str) -> Path | _Outside:
    """``folder / file_name`` if it resolves inside ``folder`` (symlinks followed).

    A shared metadata file must not make the pipeline read any file the user can read:
    absolute paths, ``..`` and symlinks out of the folder are refused unless
    ``$WHISPER_OBS_ALLOW_OUTSIDE_DATA=1``.
    """
    path = folder / file_name
    if os.environ.get(ALLOW_OUTSIDE_ENV) == "1":
        return path
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):
        inside = False
    if not inside:
        return _Outside(
            f"{file_name!r} resolves outside the data folder {folder} (absolute path, '..' or "
            f"a symlink); refused (set {ALLOW_OUTSIDE_ENV}=1 to allow)"
        )
    return path


def _collect(
    items: Iterable[tuple[str, Any, str, dict]],
    where: str,
    *,
    limit: int | None,
    max_seconds: float,
) -> LoadResult:
    """Decode and check clips in order until ``limit`` usable ones; record every skip."""
    utterances: list[Utterance] = []
    skipped: list[Skipped] = []
    for uid, audio_source, text, meta in items:
        if limit is not None and len(utterances) >= limit:
            break
        text = (text or "").strip()
        if not text:
            skipped.append(Skipped(uid, "empty transcription"))
            continue
        if not any(ch.isalnum() for ch in normalize(text)):
            skipped.append(Skipped(uid, "transcription is empty after normalisation"))
            continue
        if audio_source is None:
            skipped.append(Skipped(uid, "no audio file named"))
            continue
        if isinstance(audio_source, _Outside):
            skipped.append(Skipped(uid, str(audio_source)))
            continue
        try:
            audio = _decode(audio_source, uid)
        except AudioError as e:
            skipped.append(Skipped(uid, str(e)))
            continue
        seconds = len(audio) / SAMPLE_RATE
        if seconds < MIN_SECONDS:
            skipped.append(Skipped(uid, f"{seconds:.3f} s: shorter than {MIN_SECONDS:g} s"))
            continue
        if seconds > max_seconds:
            skipped.append(
                Skipped(
                    uid,
                    f"{seconds:.1f} s: longer than {max_seconds:g} s (Whisper's window); "
                    "split it into shorter clips",
                )
            )
            continue
        utterances.append(Utterance(id=uid, audio=audio, text=text, meta=meta))
    if not utterances:
        first = "; ".join(f"{s.id}: {s.reason}" for s in skipped[:3])
        raise DataError(
            f"no usable utterances in {where}"
            + (f": all {len(skipped)} skipped ({first})" if skipped else " (it lists no clips)")
        )
    return LoadResult(utterances, skipped, source=where)


def _decode(audio_source: Any, uid: str) -> np.ndarray:
    """A path, encoded bytes, or a datasets-style dict ({bytes, path} or {array, sampling_rate})."""
    if isinstance(audio_source, str | Path | bytes | bytearray):
        return load_audio(
            audio_source, name=uid if isinstance(audio_source, bytes | bytearray) else None
        )
    if isinstance(audio_source, Mapping):
        if audio_source.get("bytes"):
            return load_audio(audio_source["bytes"], name=audio_source.get("path") or uid)
        if audio_source.get("array") is not None:
            sr = audio_source.get("sampling_rate")
            return to_mono_16k(np.asarray(audio_source["array"]), sr, name=uid)
        if audio_source.get("path"):
            return load_audio(audio_source["path"])
        raise AudioError(f"{uid}: audio entry has neither bytes nor a path")
    raise AudioError(f"{uid}: unsupported audio value of type {type(audio_source).__name__}")


# ------------------------------------------------------------------------- Hugging Face datasets


def _load_hf(
    name: str,
    split: str,
    *,
    config: str | None,
    data_files: Any,
    streaming: bool,
    limit: int | None,
    max_seconds: float,
    audio_column: str,
    text_column: str | None,
) -> LoadResult:
    if not name:
        raise DataError(
            "empty dataset name: use 'hf:<dataset name>', e.g. hf:openslr/librispeech_asr"
        )
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            "hf: sources need the 'datasets' package (pip install 'whisper-obs-pruning[hf]')"
        ) from e
    kwargs: dict[str, Any] = {"split": split, "streaming": streaming}
    if data_files is not None:
        kwargs["data_files"] = data_files
    try:
        ds = datasets.load_dataset(name, config, **kwargs)
    except Exception as e:  # network, missing config/split, auth: all end the same way here
        raise DataError(
            f"cannot load HF dataset {name!r} (config={config!r}, split={split!r}): {e}"
        ) from e
    return utterances_from_hf_dataset(
        ds,
        audio_column=audio_column,
        text_column=text_column,
        limit=limit,
        max_seconds=max_seconds,
        where=f"hf:{name}" + (f"/{config}" if config else "") + f" [{split}]",
    )


def utterances_from_hf_dataset(
    ds: Any,
    audio_column: str = "audio",
    text_column: str | None = None,
    *,
    limit: int | None = None,
    max_seconds: float = MAX_SECONDS,
    where: str = "HF dataset",
) -> LoadResult:
    """Utterances from a ``datasets.Dataset`` / ``IterableDataset`` (what ``hf:`` sources use).

    The audio column is cast to ``Audio(decode=False)`` and decoded here with soundfile, so
    neither torchcodec nor FFmpeg is needed; plain ``{bytes, path}`` structs, path strings and
    already decoded ``{array, sampling_rate}`` dicts work too.
    """
    columns = _hf_columns(ds)
    if audio_column not in columns:
        raise DataError(f"{where}: audio column {audio_column!r} not found (columns: {columns})")
    text_col = _pick_text_column(columns, text_column, where)
    ds = _without_audio_decoding(ds, audio_column)
    skip_meta = {audio_column, text_col}

    def items() -> Iterator[tuple[str, Any, str, dict]]:
        for i, ex in enumerate(ds):
            audio = ex[audio_column]
            path = audio.get("path") if isinstance(audio, Mapping) else None
            uid = str(ex.get("id") or (os.path.basename(path) if path else f"{i}"))
            meta = {k: v for k, v in ex.items() if k not in skip_meta and _is_scalar(v)}
            text = ex.get(text_col)
            yield uid, audio, "" if text is None else str(text), meta

    return _collect(items(), where, limit=limit, max_seconds=max_seconds)


def _hf_columns(ds: Any) -> list[str]:
    names = getattr(ds, "column_names", None)
    if names:
        return list(names)
    features = getattr(ds, "features", None)
    if features:
        return list(features)
    try:  # an IterableDataset without known features: peek at the first example
        return list(next(iter(ds)))
    except StopIteration as e:
        raise DataError("the HF dataset is empty") from e


def _without_audio_decoding(ds: Any, audio_column: str) -> Any:
    """Cast an ``Audio`` column to ``decode=False``; other column types are left as they are."""
    try:
        from datasets import Audio
    except ImportError:
        return ds
    features = getattr(ds, "features", None) or {}
    feature = features.get(audio_column)
    if isinstance(feature, Audio) and feature.decode:
        return ds.cast_column(audio_column, Audio(decode=False))
    return ds


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)
