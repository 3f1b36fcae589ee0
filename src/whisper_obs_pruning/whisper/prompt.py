"""The decoder prompt Whisper is forced with: ``<|sot|> [<|lang|> <|task|>] <|notimestamps|>``.

Apart from loading and decoding because calibration (teacher forcing) and decoding both need
it, and it depends only on the generation config and the tokenizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor


def _language_token(language: str) -> str:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    lang = language.strip().lower()
    if lang.startswith("<|") and lang.endswith("|>"):
        lang = lang[2:-2]
    if lang in TO_LANGUAGE_CODE:
        lang = TO_LANGUAGE_CODE[lang]
    if lang not in LANGUAGES:
        raise ValueError(f"unknown Whisper language {language!r}")
    return f"<|{lang}|>"


def decoder_prompt_ids(
    model: WhisperForConditionalGeneration,
    processor: WhisperProcessor,
    language: str | None = "en",
    task: str = "transcribe",
) -> list[int]:
    """Forced decoder prompt for transcription without timestamps.

    English-only: ``[sot, notimestamps]``; multilingual: ``[sot, <|lang|>, <|task|>,
    notimestamps]`` (``language=None`` omits the language token: no detection is done).
    Used for teacher-forced calibration and greedy decoding alike.
    """
    gc = model.generation_config
    tok = processor.tokenizer
    sot = gc.decoder_start_token_id
    notimestamps = gc.no_timestamps_token_id
    if notimestamps is None:
        notimestamps = tok.convert_tokens_to_ids("<|notimestamps|>")
    if not getattr(gc, "is_multilingual", False):
        if language is not None and _language_token(language) != "<|en|>":
            raise ValueError(f"English-only model cannot transcribe language {language!r}")
        if task != "transcribe":
            raise ValueError(f"English-only model supports only task='transcribe', not {task!r}")
        return [int(sot), int(notimestamps)]
    task_to_id = getattr(gc, "task_to_id", None) or {
        "transcribe": tok.convert_tokens_to_ids("<|transcribe|>"),
        "translate": tok.convert_tokens_to_ids("<|translate|>"),
    }
    if task not in task_to_id:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(task_to_id)}")
    ids = [int(sot)]
    if language is not None:
        lang_tok = _language_token(language)
        lang_to_id = getattr(gc, "lang_to_id", None) or {}
        lang_id = lang_to_id.get(lang_tok, tok.convert_tokens_to_ids(lang_tok))
        if lang_id is None or lang_id == tok.unk_token_id:
            raise ValueError(f"language token {lang_tok} is not in this model's vocabulary")
        ids.append(int(lang_id))
    ids += [int(task_to_id[task]), int(notimestamps)]
    return ids
