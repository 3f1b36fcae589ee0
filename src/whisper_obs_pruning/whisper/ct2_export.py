"""Export to CTranslate2 / faster-whisper, and transcribe with the export.

The converter is CTranslate2's own (``TransformersConverter``, offline from a local Hugging Face
directory), not a hand-written one: it is what faster-whisper users run, so an export that
passes here loads there. The output is written atomically (``atomic_directory``).

Pitfall handled here: CT2's Whisper ``generate`` returns at most ``max_length // 2`` new
tokens, so it is asked for twice the per-clip cap and the result is cut to the cap.
"""

from __future__ import annotations

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
        f = np.ascontiguousarray(features[s : s + batch_size], dtype=np.float32)
        batch_caps = caps[s : s + batch_size]
        results = whisper.generate(
            ctranslate2.StorageView.from_array(f),
            [list(prompt)] * f.shape[0],
            beam_size=1,
            max_length=2 * max(batch_caps) + len(prompt),
        )
        for r, cap in zip(results, batch_caps, strict=True):
            out.append([t for t in r.sequences_ids[0] if t != eot][:cap])
    return out
