"""Whisper's English text normaliser (numbers, British/American spelling, fillers).

Apart from scoring so that data loading can skip references that normalise to nothing (a
punctuation-only line would otherwise be scored as a 1000% WER) without importing the model.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    return " ".join(normalizer()(text).split())
