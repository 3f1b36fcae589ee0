"""Export to CTranslate2 / faster-whisper, and transcribe with the export.

The converter is CTranslate2's own (``TransformersConverter``, offline from a local Hugging Face
directory), not a hand-written one: it is what faster-whisper users run, so an export that
passes here loads there. The output is written atomically (``atomic_directory``).

Pitfall handled here: CT2's Whisper ``generate`` returns at most ``max_length // 2`` new
tokens, so it is asked for twice the per-clip cap and the result is cut to the cap.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_directory
from ..errors import WhisperObsError

QUANTIZATIONS = ("float32", "float16", "int8", "int8_float32", "int8_float16", "int16")
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "special_tokens_map.json",
    "normalizer.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


class CT2ExportError(WhisperObsError, ValueError):
    """A model that cannot be exported, or an unknown CT2 quantization."""


def export_ct2(model_dir: str | Path, out_dir: str | Path, quantization: str = "int8") -> Path:
    """Convert the HF Whisper in ``model_dir`` into a CT2 / faster-whisper model at ``out_dir``."""
    try:
        import ctranslate2
    except ImportError as exc:  # an optional runtime dependency
        raise CT2ExportError("CTranslate2 export needs `pip install ctranslate2`") from exc
    if quantization not in QUANTIZATIONS:
        raise CT2ExportError(
            f"CT2 quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}"
        )
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CT2ExportError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    with atomic_directory(out_dir) as tmp:
        target = tmp / "model"
        try:
            ctranslate2.converters.TransformersConverter(str(model_dir)).convert(
                str(target), quantization=quantization, force=True
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise CT2ExportError(f"CTranslate2 could not convert {model_dir}: {exc}") from exc
        for f in target.iterdir():
            f.rename(tmp / f.name)
        target.rmdir()
        for name in PROCESSOR_FILES:  # faster-whisper reads the tokenizer/feature config beside
            src = model_dir / name
            if src.is_file() and not (tmp / name).exists():
                (tmp / name).write_bytes(src.read_bytes())
    return Path(out_dir)


def ct2_generate(
    ct2_dir: str | Path,
    features: np.ndarray,
    prompt: Sequence[int],
    caps: Sequence[int],
    eot: int,
    *,
    batch_size: int = 16,
    compute_type: str = "default",
    threads: int = 1,
) -> list[list[int]]:
    """Greedy token ids per clip (prompt and eot excluded) from a CT2 Whisper export."""
    import ctranslate2

    whisper = ctranslate2.models.Whisper(
        str(ct2_dir), device="cpu", compute_type=compute_type, intra_threads=threads
    )
    out: list[list[int]] = []
    for s in range(0, features.shape[0], batch_size):
        out += _greedy(whisper, features[s : s + batch_size], prompt, caps[s : s + batch_size], eot)
    return out


def _greedy(whisper, features: np.ndarray, prompt, caps: Sequence[int], eot: int):
    """One batch of greedy decoding: at most ``caps[i]`` tokens for clip i, eot dropped.

    CT2 returns at most ``max_length // 2`` new tokens, so it is asked for twice the cap."""
    import ctranslate2

    f = np.ascontiguousarray(features, dtype=np.float32)
    results = whisper.generate(
        ctranslate2.StorageView.from_array(f),
        [list(prompt)] * f.shape[0],
        beam_size=1,
        max_length=2 * max(caps) + len(prompt),
    )
    return [
        [t for t in r.sequences_ids[0] if t != eot][:cap]
        for r, cap in zip(results, caps, strict=True)
    ]


def convert_in_memory(model, processor, out_dir: str | Path, quantization: str = "float32") -> Path:
    """Convert a loaded (e.g. just pruned) HF Whisper to CT2 without saving it first.

    CTranslate2's converter reads the config from a folder and then loads the model; the
    folder here holds only ``config.json`` and ``load_model`` returns ``model`` itself, so a
    sweep point is converted in ~1 s instead of a save + reload of the whole checkpoint.

    Pitfall: a quantizing conversion (``int8``...) rewrites the weights it was given in place
    (measured: a second conversion of the same model decoded "He He He ..."), so the
    converter gets a copy then; ``float32`` only reads them and gets the model itself.
    """
    try:
        import ctranslate2
    except ImportError as exc:
        raise CT2ExportError("the ct2 backend needs `pip install ctranslate2`") from exc
    if quantization not in QUANTIZATIONS:
        raise CT2ExportError(
            f"CT2 quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}"
        )

    source = model if quantization == "float32" else copy.deepcopy(model)

    class _Loaded(ctranslate2.converters.TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            return source

        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return processor.tokenizer

    import tempfile

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="whisper-obs-ct2-config-") as cfg_dir:
        model.config.save_pretrained(cfg_dir)
        try:
            _Loaded(cfg_dir).convert(str(out_dir), quantization=quantization, force=True)
        except (ValueError, RuntimeError, OSError) as exc:
            raise CT2ExportError(f"CTranslate2 could not convert the model: {exc}") from exc
    return out_dir


def ct2_quantization(scheme: str) -> str | None:
    """``"ct2-int8"`` -> ``"int8"`` (a sweep point exported to CTranslate2 at that weight type);
    None for any other scheme name. Raises CT2ExportError for an unknown CT2 type."""
    text = scheme.strip().lower()
    if not text.startswith("ct2-"):
        return None
    quantization = text.removeprefix("ct2-")
    if quantization not in QUANTIZATIONS:
        raise CT2ExportError(
            f"unknown CTranslate2 scheme {scheme!r}: expected ct2-<type>, <type> one of "
            f"{', '.join(QUANTIZATIONS)}"
        )
    return quantization


class CT2Whisper:
    """A loaded (e.g. just pruned) model converted in memory to CTranslate2 and loaded there,
    decoding the same problem as our PyTorch decoder (prompt, features, per-clip caps, greedy).

    ``model_bytes`` is the size of the export's ``model.bin``: what a faster-whisper user ships.
    The converted folder is deleted once CT2 has loaded it, unless ``keep`` names where to
    write it (with the processor files: a folder ``faster_whisper.WhisperModel`` loads).
    """

    def __init__(
        self,
        model,
        processor,
        *,
        quantization: str = "float32",
        threads: int | None = None,
        language: str | None = "en",
        task: str = "transcribe",
        keep: str | Path | None = None,
    ) -> None:
        import contextlib
        import tempfile

        import torch

        from .decoding import DecodeSetup

        if model.device.type != "cpu":
            raise CT2ExportError(
                f"the ct2 evaluation backend runs on the CPU; the model is on {model.device} "
                "(use evaluate.backend: torch there)"
            )
        self.processor = processor
        self.setup = DecodeSetup.of(model, processor, language=language, task=task)
        self.quantization = quantization
        with (
            contextlib.nullcontext(None) if keep else tempfile.TemporaryDirectory(
                prefix="whisper-obs-ct2-")
        ) as tmp:  # fmt: skip
            path = convert_in_memory(
                model, processor, Path(keep) if keep else Path(tmp) / "model", quantization
            )
            if keep:  # a faster-whisper model folder: the tokenizer and feature config beside
                processor.save_pretrained(str(path))
                # faster-whisper reads preprocessor_config.json (transformers now writes the
                # combined processor_config.json): the feature extractor's own file too
                processor.feature_extractor.save_pretrained(str(path))
            import ctranslate2  # present: convert_in_memory checked it

            self.model_bytes = (path / "model.bin").stat().st_size
            self.whisper = ctranslate2.models.Whisper(
                str(path), device="cpu", intra_threads=threads or torch.get_num_threads()
            )

    def tokens(
        self,
        audios: Sequence[np.ndarray],
        *,
        batch_size: int = 16,
        progress: bool = False,
        desc: str = "transcribe (ct2)",
    ) -> list[list[int]]:
        """Greedy token ids per clip (prompt and eot excluded)."""
        from tqdm.auto import tqdm

        from .decoding import log_mel_features

        out: list[list[int]] = []
        with tqdm(total=len(audios), desc=desc, unit="clip", disable=not progress) as bar:
            for s in range(0, len(audios), batch_size):
                batch = list(audios[s : s + batch_size])
                feats = log_mel_features(self.processor, batch).numpy()
                caps = self.setup.caps(batch)
                out += _greedy(self.whisper, feats, self.setup.prompt, caps, self.setup.eot)
                bar.update(len(batch))
        return out


def transcribe_tokens_ct2(
    model,
    processor,
    audios: Sequence[np.ndarray],
    *,
    batch_size: int = 16,
    language: str | None = "en",
    task: str = "transcribe",
    quantization: str = "float32",
    progress: bool = True,
    desc: str = "transcribe (ct2)",
) -> list[list[int]]:
    """:func:`..decoding.transcribe_tokens` with CTranslate2 doing the work: the same prompt,
    features, per-clip token caps and greedy search (float32: the same tokens, checked in
    ``tests/test_ct2_export.py``), at a lower CPU cost per clip; other ``quantization``
    values score the export a faster-whisper user would run (e.g. ``int8``)."""
    ct2 = CT2Whisper(model, processor, quantization=quantization, language=language, task=task)
    return ct2.tokens(audios, batch_size=batch_size, progress=progress, desc=desc)
