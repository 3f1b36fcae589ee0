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
    """
    try:
        import ctranslate2
    except ImportError as exc:
        raise CT2ExportError("the ct2 backend needs `pip install ctranslate2`") from exc
    if quantization not in QUANTIZATIONS:
        raise CT2ExportError(
            f"CT2 quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}"
        )

    class _Loaded(ctranslate2.converters.TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            return model

        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return processor.tokenizer

    out_dir = Path(out_dir)
    cfg_dir = out_dir.with_name(out_dir.name + ".config")
    cfg_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(cfg_dir))
    try:
        _Loaded(str(cfg_dir)).convert(str(out_dir), quantization=quantization, force=True)
    except (ValueError, RuntimeError, OSError) as exc:
        raise CT2ExportError(f"CTranslate2 could not convert the model: {exc}") from exc
    return out_dir


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
    ``tests/test_ct2_export.py``), at a lower CPU cost per clip."""
    import tempfile

    import ctranslate2
    import torch
    from tqdm.auto import tqdm

    from .decoding import default_token_cap, log_mel_features
    from .prompt import decoder_prompt_ids

    if model.device.type != "cpu":
        raise CT2ExportError(
            f"the ct2 evaluation backend runs on the CPU; the model is on {model.device} "
            "(use evaluate.backend: torch there)"
        )
    prompt = decoder_prompt_ids(model, processor, language=language, task=task)
    max_pos = int(model.config.max_target_positions)
    rate = processor.feature_extractor.sampling_rate
    eot = model.generation_config.eos_token_id
    eot = int(eot[0] if isinstance(eot, (list, tuple)) else eot)
    out: list[list[int]] = []
    with tempfile.TemporaryDirectory(prefix="whisper-obs-ct2-") as tmp:
        ct2_dir = convert_in_memory(model, processor, Path(tmp) / "model", quantization)
        whisper = ctranslate2.models.Whisper(
            str(ct2_dir), device="cpu", intra_threads=torch.get_num_threads()
        )
        with tqdm(total=len(audios), desc=desc, unit="clip", disable=not progress) as bar:
            for s in range(0, len(audios), batch_size):
                batch = list(audios[s : s + batch_size])
                caps = [default_token_cap(len(a) / rate, len(prompt), max_pos) for a in batch]
                feats = log_mel_features(processor, batch).numpy()
                out += _greedy(whisper, feats, prompt, caps, eot)
                bar.update(len(batch))
    return out
