"""Remove whole decoder layers, chosen greedily by calibration loss (optional part of issue 14).

Why decoder layers: greedy decoding runs the decoder once per token, and on a CPU at batch 1 a
step is dominated by per-op overhead, not FLOPs, so narrowing FFNs barely speeds it up while
dropping a layer removes its ops outright. Scoring: teacher-forced cross-entropy of the next
token on calibration clips (encoder output computed once), with a candidate layer skipped;
remove the layer whose absence costs least, re-score, repeat.

The result is an ordinary smaller Whisper: the ``ModuleList`` loses entries (saved keys are
renumbered by ``save_pretrained``), ``config.decoder_layers`` is updated and each attention's
``layer_idx`` (its KV-cache slot) is renumbered, so ``from_pretrained``, ``generate`` with a
cache and the CTranslate2 converter all work. Layers are not compensated (no weight update).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..hessians.calibration import teacher_forced_batches
from ..speech.datasets import Utterance
from ..whisper.prompt import decoder_prompt_ids
from .ffn import StructuredError


def drop_decoder_layers(model: nn.Module, indices: Sequence[int]) -> None:
    """Delete decoder layers ``indices`` in place; validated before anything changes."""
    layers = model.model.decoder.layers
    n = len(layers)
    idx = sorted({int(i) for i in indices})
    if any(i < 0 or i >= n for i in idx):
        raise StructuredError(f"decoder layer indices {list(indices)} out of range 0..{n - 1}")
    if len(idx) >= n:
        raise StructuredError(f"cannot remove all {n} decoder layers")
    keep = [layer for i, layer in enumerate(layers) if i not in idx]
    model.model.decoder.layers = nn.ModuleList(keep)
    for new_i, layer in enumerate(keep):
        for attn in (getattr(layer, "self_attn", None), getattr(layer, "encoder_attn", None)):
            if attn is not None and hasattr(attn, "layer_idx"):
                attn.layer_idx = new_i
    model.config.decoder_layers = len(keep)
    # not num_hidden_layers: in WhisperConfig it is the *encoder* layer count


@torch.inference_mode()
def _batches(model, processor, utterances, batch_size):
    prompt = decoder_prompt_ids(model, processor)
    dtype = next(model.parameters()).dtype
    out = []
    for feats, dec, masks in teacher_forced_batches(utterances, processor, prompt, batch_size):
        enc = model.model.encoder(feats.to(dtype)).last_hidden_state
        out.append((enc, dec, masks["decoder"]))
    return out


@torch.inference_mode()
def _ce(model, batches, layers: list[nn.Module]) -> float:
    dec = model.model.decoder
    saved = dec.layers
    dec.layers = nn.ModuleList(layers)
    try:
        total, count = 0.0, 0
        for enc, ids, mask in batches:
            logits = model(encoder_outputs=(enc,), decoder_input_ids=ids, use_cache=False).logits
            target, valid = ids[:, 1:], mask[:, 1:]
            lp = torch.log_softmax(logits[:, :-1].float(), -1)
            nll = -lp.gather(-1, target[..., None])[..., 0]
            total += float(nll[valid].sum())
            count += int(valid.sum())
    finally:
        dec.layers = saved
    return total / max(count, 1)


def prune_decoder_layers(
    model: nn.Module,
    processor,
    utterances: Sequence[Utterance],
    n_remove: int,
    *,
    batch_size: int = 8,
) -> dict:
    """Greedily remove ``n_remove`` decoder layers by teacher-forced calibration loss."""
    n = len(model.model.decoder.layers)
    if not 0 <= n_remove < n:
        raise StructuredError(f"can remove 0..{n - 1} of {n} decoder layers, not {n_remove}")
    if n_remove and not utterances:
        raise StructuredError("scoring decoder layers needs calibration utterances")
    batches = _batches(model, processor, utterances, batch_size) if n_remove else []
    current = list(model.model.decoder.layers)
    original = {id(layer): i for i, layer in enumerate(current)}
    history = [{"removed": None, "loss": _ce(model, batches, current)}] if n_remove else []
    for _ in range(n_remove):
        scores = {
            original[id(layer)]: _ce(model, batches, [x for x in current if x is not layer])
            for layer in current
        }
        best = min(scores, key=scores.get)
        current = [x for x in current if original[id(x)] != best]
        history.append({"removed": best, "loss": scores[best], "scores": scores})
    removed = [h["removed"] for h in history if h["removed"] is not None]
    drop_decoder_layers(model, removed)
    return {"removed": removed, "history": history, "decoder_layers": len(current)}
