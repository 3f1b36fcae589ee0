"""whisper-obs: second-order (Optimal Brain Surgeon family) pruning of OpenAI Whisper.

Library entry points: ``WhisperOBSPruner`` and ``prune_whisper_model`` (the seed API),
``load_whisper`` (bundled offline models, local directories, hub ids), ``prune_layer`` (one
weight matrix), ``load_utterances`` (embedded set, audio folders, HF datasets), ``transcribe``
and ``evaluate_model``.

Names are imported lazily: ``import whisper_obs_pruning.methods`` must not pay for
transformers. No exported name is also a submodule's name, so importing a submodule can never
replace an exported function on this package (``transcribe`` once returned the module).
"""

from importlib import import_module

_EXPORTS = {
    "WhisperOBSPruner": "api",
    "prune_whisper_model": "api",
    "load_whisper": "whisper.loading",
    "decoder_prompt_ids": "whisper.decoding",
    "prune_layer": "methods",
    "register_method": "methods",
    "Method": "methods",
    "PruneResult": "methods",
    "PruningError": "methods",
    "REGISTRY": "methods",
    "load_utterances": "speech.datasets",
    "Utterance": "speech.datasets",
    "LoadResult": "speech.datasets",
    "transcribe": "whisper.decoding",
    "evaluate_model": "speech.scoring",
}
_ALIASES = {"register_method": "register"}
__all__ = sorted(_EXPORTS)
__version__ = "0.2.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        module = import_module(f".{_EXPORTS[name]}", __name__)
        value = getattr(module, _ALIASES.get(name, name))
        globals()[name] = value  # cached: later lookups never reach a submodule attribute
        return value
    if name == "METHODS":
        return tuple(import_module(".methods", __name__).REGISTRY)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
