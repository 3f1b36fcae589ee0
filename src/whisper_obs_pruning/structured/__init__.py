"""Structured pruning that makes Whisper smaller and faster on any dense backend (issue 14).

- :mod:`.ffn`: which FFN neurons of one block to remove (greedy structured OBS, diagonal,
  magnitude) and the compensated fc2.
- :mod:`.surgery`: apply that to a ``WhisperForConditionalGeneration`` (same width in every layer
  of a stack), save it loadable by plain ``from_pretrained`` and the CTranslate2 converter.
- :mod:`.sequential`: the same with each fc2 Hessian re-collected through the already-shrunk
  layers below it.
"""

from .ffn import METHODS, FFNPruneResult, StructuredError, ffn_layer_loss, neuron_scores, prune_ffn
from .sequential import prune_ffn_sequential
from .surgery import (
    apply_ffn_plan,
    check_config_shapes,
    ffn_removal_counts,
    plan_ffn_pruning,
    prune_ffn_model,
    save_structured,
    shrink_layer,
)

__all__ = [
    "METHODS",
    "FFNPruneResult",
    "StructuredError",
    "apply_ffn_plan",
    "check_config_shapes",
    "ffn_layer_loss",
    "ffn_removal_counts",
    "neuron_scores",
    "plan_ffn_pruning",
    "prune_ffn",
    "prune_ffn_model",
    "prune_ffn_sequential",
    "save_structured",
    "shrink_layer",
]
