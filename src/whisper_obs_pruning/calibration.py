"""Teacher-forced calibration passes that feed the Hessian collector.

The decoder is fed the reference transcript (prompt + tokens), exactly the inputs it sees when
it transcribes the clip correctly, so decoder-side Hessians describe real decoding, not a
random or degenerate continuation, and one forward pass per batch suffices (no generation).

Memory: ``calibrate_in_passes`` holds at most a budget's worth of accumulators at once. The
distinct layer inputs, in execution order, are split into consecutive blocks that fit; each
block gets its own pass over the calibration data (ending as soon as the block's last layer is
reached) and its Hessians go to disk before the next pass starts. Each layer's sum sees the
same batches in the same order, so the Hessians equal those of one pass bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import Utterance
from .hessian import HessianCollector, LayerHessian, StopForward

SAMPLES_PER_ENCODER_FRAME = 320  # hop 160 samples per mel frame, conv2 stride 2
ENCODER_FRAMES = 1500


def encoder_valid_frames(num_samples: int) -> int:
    """Encoder output frames that hold audio; the rest of the 30 s window is zero padding."""
    return min(ENCODER_FRAMES, max(1, math.ceil(num_samples / SAMPLES_PER_ENCODER_FRAME)))


def teacher_forced_batches(
    utterances: Sequence[Utterance],
    processor,
    prompt: list[int],
    batch_size: int,
    *,
    exclude_padding: bool = False,
    eot: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]]:
    """Yield (input_features, decoder_input_ids, row_masks) per batch.

    Decoder inputs are ``prompt + tokens(" " + text)``; the end-of-text token is predicted, never
    fed, so it is not an input row. Batches are right-padded; padded rows are masked out.
    """
    tok = processor.tokenizer
    pad = eot if eot is not None else tok.eos_token_id
    for start in range(0, len(utterances), batch_size):
        batch = utterances[start : start + batch_size]
        feats = processor.feature_extractor(
            [np.asarray(u.audio, dtype=np.float32) for u in batch],
            sampling_rate=16000,
            return_tensors="pt",
        ).input_features
        ids = [
            prompt + tok(" " + u.text.strip(), add_special_tokens=False).input_ids for u in batch
        ]
        ids = [seq[:448] for seq in ids]
        T = max(len(s) for s in ids)
        dec = torch.full((len(batch), T), pad, dtype=torch.long)
        dec_mask = torch.zeros(len(batch), T, dtype=torch.bool)
        for i, seq in enumerate(ids):
            dec[i, : len(seq)] = torch.tensor(seq)
            dec_mask[i, : len(seq)] = True
        masks = None
        if exclude_padding:
            enc_mask = torch.zeros(len(batch), ENCODER_FRAMES, dtype=torch.bool)
            for i, u in enumerate(batch):
                enc_mask[i, : encoder_valid_frames(len(u.audio))] = True
            masks = {"encoder": enc_mask, "decoder": dec_mask}
        else:
            masks = {"decoder": dec_mask}
        yield feats, dec, masks


@torch.inference_mode()
def run_calibration(
    model: torch.nn.Module,
    processor,
    utterances: Sequence[Utterance],
    collector: HessianCollector,
    prompt: list[int],
    *,
    batch_size: int = 8,
    exclude_padding: bool = False,
    progress: bool = True,
    desc: str = "calibrate",
) -> dict:
    """Run every utterance through the model once, teacher-forced; return counts."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n_tokens = n_frames = 0
    bar = tqdm(total=len(utterances), desc=desc, unit="utt", disable=not progress)
    for feats, dec, masks in teacher_forced_batches(
        utterances, processor, prompt, batch_size, exclude_padding=exclude_padding
    ):
        collector.new_batch({k: v.to(device) for k, v in masks.items()})
        with contextlib.suppress(StopForward):  # raised once the collector has all it wants
            model(
                input_features=feats.to(device, dtype),
                decoder_input_ids=dec.to(device),
                use_cache=False,
            )
        n_tokens += int(masks["decoder"].sum())
        n_frames += int(masks["encoder"].sum()) if "encoder" in masks else feats.shape[0] * 1500
        bar.update(feats.shape[0])
    bar.close()
    collector.new_batch(None)
    return {"utterances": len(utterances), "decoder_tokens": n_tokens, "encoder_frames": n_frames}


# ------------------------------------------------------------------ bounded-memory passes
def hessian_nbytes(dim: int, *, diagonal: bool = False) -> int:
    """Bytes of one float64 accumulator for an input of width ``dim``."""
    return 8 * (dim if diagonal else dim * dim)


@dataclass
class InputLayout:
    """The distinct Linear inputs of a model, as one forward pass shows them."""

    dims: dict[str, int]  # leader layer -> input width, in execution order
    shared_with: dict[str, str]  # every other layer -> the leader whose input it reads


def discover_inputs(
    model: torch.nn.Module, processor, utterance: Utterance, layers: dict, prompt: list[int]
) -> InputLayout:
    """Which layers read the same tensor, and in which order inputs appear (one clip)."""
    with HessianCollector(layers, diagonal=True) as probe:
        run_calibration(model, processor, [utterance], probe, prompt, batch_size=1, progress=False)
    dims = {name: stat.sum_xxt.shape[0] for name, stat in probe.stats.items()}
    return InputLayout(dims, dict(probe.shared_with))


def plan_passes(
    dims: dict[str, int], max_bytes: int | None, *, diagonal: bool = False
) -> list[list[str]]:
    """Consecutive blocks of inputs whose accumulators fit in ``max_bytes`` together.

    ``None``: one block. An input larger than the budget gets a block of its own, so the peak
    is ``max(max_bytes, largest input)``.
    """
    if max_bytes is None:
        return [list(dims)] if dims else []
    blocks: list[list[str]] = []
    used = 0
    for name, dim in dims.items():
        size = hessian_nbytes(dim, diagonal=diagonal)
        if not blocks or used + size > max_bytes:
            blocks.append([])
            used = 0
        blocks[-1].append(name)
        used += size
    return blocks


def calibrate_in_passes(
    model: torch.nn.Module,
    processor,
    utterances: Sequence[Utterance],
    layers: dict,
    prompt: list[int],
    sink: Callable[[str, LayerHessian], None],
    *,
    diagonal: bool = False,
    max_bytes: int | None = None,
    batch_size: int = 8,
    exclude_padding: bool = False,
    progress: bool = True,
) -> tuple[dict, InputLayout]:
    """One-shot Hessians of every distinct input of ``layers``, handed to ``sink`` block by
    block so at most ``max_bytes`` of accumulators (or one input, if larger) exist at a time.

    Returns the calibration counts (plus ``passes`` and ``peak_accumulator_bytes``) and the
    input layout (``shared_with`` says which layers reuse which leader's Hessian).
    """
    if not utterances:
        raise ValueError("calibration needs at least one utterance")
    device = next(model.parameters()).device
    layout = discover_inputs(model, processor, utterances[0], layers, prompt)
    blocks = plan_passes(layout.dims, max_bytes, diagonal=diagonal)
    counts: dict = {}
    for i, block in enumerate(blocks):
        hooked = {name: layers[name] for name in block}
        with HessianCollector(hooked, diagonal=diagonal, device=device, stop_after=block[-1]) as c:
            counts = run_calibration(
                model,
                processor,
                utterances,
                c,
                prompt,
                batch_size=batch_size,
                exclude_padding=exclude_padding,
                progress=progress,
                desc=f"calibrate pass {i + 1}/{len(blocks)}" if len(blocks) > 1 else "calibrate",
            )
        for name in block:
            stat = c.stats.pop(name, None)
            if stat is None:
                raise RuntimeError(f"layer {name!r} saw no input during calibration pass {i + 1}")
            sink(name, stat)
    peak = max(sum(hessian_nbytes(layout.dims[n], diagonal=diagonal) for n in b) for b in blocks)
    return {**counts, "passes": len(blocks), "peak_accumulator_bytes": peak}, layout
