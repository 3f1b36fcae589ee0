"""Sequential re-calibration for structured FFN pruning: each fc2 Hessian is collected on
inputs that went through the already-shrunk layers below it.

One-shot structured pruning takes every Hessian from the dense model, so layer ``i`` is
compensated for inputs it will not see once layers ``< i`` lost their neurons. Here the encoder
runs layer by layer on cached hidden states (clips x 1500 x d_model floats): collect layer
``i``'s fc2 Hessian, prune and shrink it, push the hidden states through the shrunk layer. The
decoder (cheap) is re-run per layer on the shrunk encoder's output, teacher-forced, stopping at
the layer's fc2. Same counts and validation as :func:`~.surgery.plan_ffn_pruning`; the model is
only modified after validation passed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from ..hessians.calibration import teacher_forced_batches
from ..hessians.collector import HessianCollector, StopForward
from ..pruning.sequential import _first_layer_input
from ..speech.datasets import Utterance
from ..whisper.prompt import decoder_prompt_ids
from .ffn import METHODS, StructuredError, prune_ffn
from .surgery import _check_uniform, ffn_removal_counts, shrink_layer


def _collect(fc2: nn.Linear, name: str, passes) -> torch.Tensor:
    with HessianCollector({name: fc2}, stop_after=name) as col:
        for masks, run in passes:
            col.new_batch(masks)
            with contextlib.suppress(StopForward):
                run()
    return col.hessians([name])[name].hessian()


@torch.inference_mode()
def prune_ffn_sequential(
    model: nn.Module,
    processor,
    utterances: Sequence[Utterance],
    encoder_fraction: float,
    decoder_fraction: float,
    method: str = "obs",
    *,
    rel_damp: float = 0.01,
    per_step: int = 1,
    batch_size: int = 8,
    exclude_padding: bool = False,
) -> dict:
    """Structured FFN pruning with per-layer re-calibration; modifies ``model`` in place."""
    if method not in ("obs", "diagonal"):
        raise StructuredError(
            f"sequential re-calibration needs a Hessian method ('obs', 'diagonal'), not "
            f"{method!r} (of {METHODS})"
        )
    counts = ffn_removal_counts(model.config, encoder_fraction, decoder_fraction)
    _check_uniform(model)
    if not utterances:
        raise StructuredError("sequential re-calibration needs calibration utterances")
    prompt = decoder_prompt_ids(model, processor)
    dtype = next(model.parameters()).dtype
    batches = list(
        teacher_forced_batches(
            utterances, processor, prompt, batch_size, exclude_padding=exclude_padding
        )
    )
    encoder, dec_layers = model.model.encoder, model.model.decoder.layers
    report: dict[str, dict] = {}

    def prune(name: str, layer: nn.Module, H: torch.Tensor, k: int) -> None:
        res = prune_ffn(
            layer.fc1.weight, layer.fc2.weight, H, k, method, rel_damp=rel_damp, per_step=per_step
        )
        shrink_layer(layer, res)
        report[name] = {"loss": res.loss, "loss_rel": res.info["loss_rel"]}

    hidden = [_first_layer_input(encoder, f.to(dtype)) for f, _, _ in batches]
    for i, layer in enumerate(encoder.layers):
        name = f"model.encoder.layers.{i}"
        if counts["encoder"]:
            passes = [
                (m, partial(layer, h, None)) for h, (_, _, m) in zip(hidden, batches, strict=True)
            ]
            prune(name, layer, _collect(layer.fc2, f"{name}.fc2", passes), counts["encoder"])
        hidden = [_layer_out(layer(h, None)) for h in hidden]
    enc_out = [encoder.layer_norm(h) for h in hidden]
    del hidden
    if counts["decoder"]:
        passes = [
            (m, partial(model, encoder_outputs=(o,), decoder_input_ids=d, use_cache=False))
            for o, (_, d, m) in zip(enc_out, batches, strict=True)
        ]
        for i, layer in enumerate(dec_layers):
            name = f"model.decoder.layers.{i}"
            prune(name, layer, _collect(layer.fc2, f"{name}.fc2", passes), counts["decoder"])
    for stack in ("encoder", "decoder"):
        layer0 = getattr(model.model, stack).layers[0]
        setattr(model.config, f"{stack}_ffn_dim", layer0.fc1.out_features)
    _check_uniform(model)
    return {
        "method": f"{method}-seq",
        "encoder_ffn_dim": model.config.encoder_ffn_dim,
        "decoder_ffn_dim": model.config.decoder_ffn_dim,
        "layers": report,
    }


def _layer_out(out):
    return out[0] if isinstance(out, tuple) else out
