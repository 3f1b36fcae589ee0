"""WER/CER of a Whisper model on utterances: batched greedy transcription, Whisper's normaliser.

Scores use OpenAI's ``EnglishTextNormalizer`` (numbers, British/American spelling, fillers), so
"twenty five" vs "25" is not an error; raw (unnormalised) WER is reported beside it.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence

import jiwer

from ..atomic import write_text_atomic
from ..whisper.decoding import transcribe
from .audio import SAMPLE_RATE
from .datasets import Utterance
from .text import normalize


def score(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus-level WER/CER over normalised texts (and raw WER); pairs with empty refs dropped."""
    refs, hyps, raw_r, raw_h = [], [], [], []
    for r, h in zip(references, hypotheses, strict=True):
        nr = normalize(r)
        if not any(ch.isalnum() for ch in nr):  # the loaders skip such clips already
            continue
        refs.append(nr)
        hyps.append(normalize(h))
        raw_r.append(r.strip() or nr)
        raw_h.append(h.strip())
    if not refs:
        raise ValueError("no reference transcript is left after normalisation")
    words = jiwer.process_words(refs, hyps)
    return {
        "wer": float(words.wer),
        "cer": float(jiwer.cer(refs, hyps)),
        "wer_raw": float(jiwer.wer(raw_r, raw_h)),
        "substitutions": int(words.substitutions),
        "deletions": int(words.deletions),
        "insertions": int(words.insertions),
        "reference_words": int(sum(len(r.split()) for r in refs)),
        "num_utterances": len(refs),
    }


def evaluate_model(
    model,
    processor,
    utterances: Sequence[Utterance],
    *,
    batch_size: int = 16,
    language: str | None = "en",
    progress: bool = True,
    desc: str = "evaluate",
    backend: str = "torch",
    ct2_quantization: str = "float32",
) -> tuple[dict, list[dict]]:
    """Transcribe and score; return (metrics, per-utterance rows). ``backend``: ``torch`` (our
    batched greedy decoder) or ``ct2`` (CTranslate2; at ``float32`` the same tokens, less
    CPU; ``ct2_quantization="int8"`` scores the int8 export faster-whisper would run)."""
    t0 = time.perf_counter()
    ct2 = {"quantization": ct2_quantization} if backend == "ct2" else {}
    hyps = transcribe(
        model,
        processor,
        [u.audio for u in utterances],
        batch_size=batch_size,
        language=language,
        progress=progress,
        desc=desc,
        backend=backend,
        **ct2,
    )
    seconds = time.perf_counter() - t0
    metrics = score([u.text for u in utterances], hyps)
    audio_s = sum(len(u.audio) for u in utterances) / SAMPLE_RATE
    metrics.update(
        {
            "transcribe_seconds": round(seconds, 2),
            "utterances_per_second": round(len(utterances) / seconds, 3) if seconds else None,
            "audio_seconds": round(audio_s, 1),
        }
    )
    rows = []
    for u, h in zip(utterances, hyps, strict=True):
        r_n, h_n = normalize(u.text), normalize(h)
        rows.append(
            {
                "id": u.id,
                "voice": u.meta.get("voice", ""),
                "reference": u.text,
                "hypothesis": h,
                "wer": round(jiwer.wer(r_n, h_n), 4) if r_n else "",
            }
        )
    return metrics, rows


def write_rows_csv(path, rows: list[dict]) -> None:
    """Per-utterance reference/hypothesis table, written atomically."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())
