"""whisper-obs: second-order (Optimal Brain Surgeon family) pruning of OpenAI Whisper.

Library entry points: ``WhisperOBSPruner`` and ``prune_whisper_model`` (the seed API),
``load_whisper`` (bundled offline models, local directories, hub ids), ``prune_layer`` (one
weight matrix), ``load_utterances`` (embedded set, audio folders, HF datasets).

Names are imported lazily: ``import whisper_obs_pruning.methods`` must not pay for transformers.
"""

from importlib import import_module

_EXPORTS = {
    "WhisperOBSPruner": "pruner",
    "prune_whisper_model": "pruner",
    "load_whisper": "models",
    "decoder_prompt_ids": "models",
    "prune_layer": "methods",
    "PruneResult": "methods",
    "PruningError": "methods",
    "METHODS": "methods",
    "load_utterances": "data",
    "Utterance": "data",
    "LoadResult": "data",
    "transcribe": "transcribe",
    "evaluate_model": "evaluate",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
