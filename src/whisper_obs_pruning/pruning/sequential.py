"""Sequential calibration (SparseGPT-style): prune layer by layer on inputs that already went
through the pruned layers before it.

One-shot pruning computes every Hessian on the dense model; later layers are then pruned for
inputs they will never see. Here each transformer layer's Hessians are collected on the
outputs of the already-pruned layers below it, so a layer can compensate the error upstream.

Cost: the encoder is run once, layer by layer, on cached hidden states (each layer's input is
kept for all calibration clips: clips x 1500 x d_model floats); the decoder, which is cheap,
is re-run whole once per decoder layer on the cached (pruned) encoder output. Only one
layer's Hessians exist at a time, so memory is bounded by the largest layer, not the model.
The Hessians depend on the pruning, so they cannot be cached across sweep points.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from ..hessians.calibration import teacher_forced_batches
from ..hessians.collector import HessianCollector, StopForward
from ..speech.datasets import Utterance
from .apply import prune_layers


def _first_layer_input(encoder: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """The hidden states entering encoder layer 0 (after the convolutions and positions)."""
    captured: list[torch.Tensor] = []

    def hook(module, args):
        captured.append(args[0])
        raise StopForward

    handle = encoder.layers[0].register_forward_pre_hook(hook)
    try:
        encoder(feats)
    except StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


def _layer_targets(targets: Sequence[str], prefix: str) -> list[str]:
    return [t for t in targets if t.startswith(prefix)]


@torch.inference_mode()
def prune_sequential(
    model: nn.Module,
    processor,
    utterances: Sequence[Utterance],
    targets: Sequence[str],
    prompt: list[int],
    *,
    method: str,
    sparsity: float,
    pattern: str | None = None,
    batch_size: int = 8,
    exclude_padding: bool = False,
    progress: bool = True,
    **prune_kwargs,
) -> dict[str, dict]:
    """Prune ``targets`` of a Whisper model layer by layer; return the per-layer report."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    modules = dict(model.named_modules())
    encoder, decoder_layers = model.model.encoder, model.model.decoder.layers
    batches = [
        (feats.to(device, dtype), dec.to(device), {k: v.to(device) for k, v in masks.items()})
        for feats, dec, masks in teacher_forced_batches(
            utterances,
            processor,
            prompt,
            batch_size,
            exclude_padding=exclude_padding,
            max_tokens=model.config.max_target_positions,
        )
    ]
    report: dict[str, dict] = {}
    done: set[str] = set()

    def prune_group(names: list[str], passes: list[tuple[dict, Callable[[], object]]]) -> None:
        """Collect the Hessians of ``names`` over ``passes``, then prune them."""
        if not names:
            return
        with HessianCollector({n: modules[n] for n in names}, device=device) as col:
            for masks, run in passes:
                col.new_batch(masks)
                run()
        hessians = {n: s.hessian() for n, s in col.hessians(names).items()}
        report.update(
            prune_layers(
                model,
                names,
                hessians.__getitem__,
                method=method,
                sparsity=sparsity,
                pattern=pattern,
                progress=False,
                **prune_kwargs,
            )
        )
        done.update(names)

    steps = len(encoder.layers) + len(decoder_layers) + 1
    bar = tqdm(total=steps, desc=f"sequential {method}", unit="layer", disable=not progress)
    hidden = [_first_layer_input(encoder, feats) for feats, _, _ in batches]
    for i, layer in enumerate(encoder.layers):
        prune_group(
            _layer_targets(targets, f"model.encoder.layers.{i}."),
            [(m, partial(layer, h, None)) for h, (_, _, m) in zip(hidden, batches, strict=True)],
        )
        hidden = [layer(h, None) for h in hidden]  # through the pruned layer
        bar.update()
    enc_out = [encoder.layer_norm(h) for h in hidden]
    del hidden
    decoder_passes = [
        (masks, partial(model, encoder_outputs=(out,), decoder_input_ids=dec, use_cache=False))
        for out, (_, dec, masks) in zip(enc_out, batches, strict=True)
    ]
    for i in range(len(decoder_layers)):
        prune_group(_layer_targets(targets, f"model.decoder.layers.{i}."), decoder_passes)
        bar.update()
    prune_group([t for t in targets if t not in done], decoder_passes)  # e.g. proj_out
    bar.update()
    bar.close()
    return report
