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
import functools
import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..speech.datasets import Utterance
from .collector import HessianCollector, LayerHessian, StopForward


@functools.lru_cache(maxsize=1)
def _default_feature_extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor()


def encoder_geometry(feature_extractor=None) -> tuple[int, int]:
    """(audio samples per encoder frame, encoder frames per window), from the feature extractor.

    The encoder's second convolution has stride 2, so one output frame covers two mel hops
    (tiny..large: 320 samples, 1500 frames for the 30 s window).
    """
    fe = feature_extractor or _default_feature_extractor()
    return 2 * fe.hop_length, fe.nb_max_frames // 2


def encoder_valid_frames(num_samples: int, feature_extractor=None) -> int:
    """Encoder output frames that hold audio; the rest of the 30 s window is zero padding."""
    per_frame, frames = encoder_geometry(feature_extractor)
    return min(frames, max(1, math.ceil(num_samples / per_frame)))


def teacher_forced_batches(
    utterances: Sequence[Utterance],
    processor,
    prompt: list[int],
    batch_size: int,
    *,
    exclude_padding: bool = False,
    eot: int | None = None,
    max_tokens: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]]:
    """Yield (input_features, decoder_input_ids, row_masks) per batch.

    Decoder inputs are ``prompt + tokens(" " + text)``; the end-of-text token is predicted, never
    fed, so it is not an input row. Batches are right-padded; padded rows are masked out.
    ``max_tokens`` (the model's ``max_target_positions``) cuts longer transcripts.
    """
    fe = processor.feature_extractor
    _, frames = encoder_geometry(fe)
    tok = processor.tokenizer
    pad = eot if eot is not None else tok.eos_token_id
    for start in range(0, len(utterances), batch_size):
        batch = utterances[start : start + batch_size]
        feats = processor.feature_extractor(
            [np.asarray(u.audio, dtype=np.float32) for u in batch],
            sampling_rate=fe.sampling_rate,
            return_tensors="pt",
        ).input_features
        ids = [
            prompt + tok(" " + u.text.strip(), add_special_tokens=False).input_ids for u in batch
        ]
        if max_tokens is not None:
            ids = [seq[:max_tokens] for seq in ids]
        T = max(len(s) for s in ids)
        dec = torch.full((len(batch), T), pad, dtype=torch.long)
        dec_mask = torch.zeros(len(batch), T, dtype=torch.bool)
        for i, seq in enumerate(ids):
            dec[i, : len(seq)] = torch.tensor(seq)
            dec_mask[i, : len(seq)] = True
        masks = None
        if exclude_padding:
            enc_mask = torch.zeros(len(batch), frames, dtype=torch.bool)
            for i, u in enumerate(batch):
                enc_mask[i, : encoder_valid_frames(len(u.audio), fe)] = True
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
    encoder_cache: EncoderOutputCache | None = None,
) -> dict:
    """Run every utterance through the model once, teacher-forced; return counts.

    ``encoder_cache``: when complete, the decoder reads the cached encoder output instead of
    running the encoder; otherwise this pass fills it.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n_tokens = n_frames = n_batches = 0
    reading = encoder_cache is not None and encoder_cache.complete
    writing = encoder_cache is not None and not reading
    handle = None
    if writing:
        handle = model.get_encoder().register_forward_hook(
            lambda module, args, out: encoder_cache.save(n_batches, out[0])
        )
    bar = tqdm(total=len(utterances), desc=desc, unit="utt", disable=not progress)
    try:
        for feats, dec, masks in teacher_forced_batches(
            utterances,
            processor,
            prompt,
            batch_size,
            exclude_padding=exclude_padding,
            max_tokens=model.config.max_target_positions,
        ):
            collector.new_batch({k: v.to(device) for k, v in masks.items()})
            inputs = (
                {"encoder_outputs": (encoder_cache.load(n_batches).to(device, dtype),)}
                if reading
                else {"input_features": feats.to(device, dtype)}
            )
            with contextlib.suppress(StopForward):  # raised once the collector has all it wants
                model(**inputs, decoder_input_ids=dec.to(device), use_cache=False)
            n_batches += 1
            n_tokens += int(masks["decoder"].sum())
            n_frames += (
                int(masks["encoder"].sum())
                if "encoder" in masks
                else len(feats) * encoder_geometry(processor.feature_extractor)[1]
            )
            bar.update(feats.shape[0])
    finally:
        if handle is not None:
            handle.remove()
        bar.close()
        collector.new_batch(None)
    if writing:
        encoder_cache.complete = len(encoder_cache) == n_batches
    return {"utterances": len(utterances), "decoder_tokens": n_tokens, "encoder_frames": n_frames}


class EncoderOutputCache:
    """The encoder's output for each calibration batch, in a temporary directory on disk.

    Why: a calibration pass over decoder layers only needs the encoder's output, which is the
    same in every pass; recomputing it (1500 frames per clip) is most of such a pass's cost,
    and holding it in memory would cost clips x 1500 x d_model floats beside the budget.
    """

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="whisper-obs-encoder-")
        self._saved: set[int] = set()
        self.complete = False

    def _path(self, batch: int) -> Path:
        return Path(self._dir.name) / f"{batch:06d}.pt"

    def save(self, batch: int, hidden: torch.Tensor) -> None:
        torch.save(hidden.detach().cpu().contiguous(), self._path(batch))
        self._saved.add(batch)

    def load(self, batch: int) -> torch.Tensor:
        return torch.load(self._path(batch), weights_only=True)

    def __len__(self) -> int:
        return len(self._saved)

    def close(self) -> None:
        self._dir.cleanup()


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

    Passes over decoder layers only read the encoder's output from an on-disk cache filled by
    the first pass that runs the whole encoder (``EncoderOutputCache``).
    """
    if not utterances:
        raise ValueError("calibration needs at least one utterance")
    device = next(model.parameters()).device
    layout = discover_inputs(model, processor, utterances[0], layers, prompt)
    blocks = plan_passes(layout.dims, max_bytes, diagonal=diagonal)
    # The encoder runs before any decoder layer, so every block after the first one that
    # reaches the decoder is decoder-only: that first one fills the cache, the rest read it.
    in_encoder = {id(m) for m in model.get_encoder().modules()}
    reaches_decoder = [any(id(layers[n]) not in in_encoder for n in b) for b in blocks]
    first_decoder = reaches_decoder.index(True) if True in reaches_decoder else len(blocks)
    cache = EncoderOutputCache() if first_decoder < len(blocks) - 1 else None
    counts: dict = {}
    try:
        for i, block in enumerate(blocks):
            hooked = {name: layers[name] for name in block}
            col = HessianCollector(hooked, diagonal=diagonal, device=device, stop_after=block[-1])
            with col:
                counts = run_calibration(
                    model,
                    processor,
                    utterances,
                    col,
                    prompt,
                    batch_size=batch_size,
                    exclude_padding=exclude_padding,
                    progress=progress,
                    desc=f"calibrate pass {i + 1}/{len(blocks)}"
                    if len(blocks) > 1
                    else "calibrate",
                    encoder_cache=cache if i >= first_decoder else None,
                )
            for name in block:
                stat = col.stats.pop(name, None)
                if stat is None:
                    raise RuntimeError(f"layer {name!r} saw no input in calibration pass {i + 1}")
                sink(name, stat)
    finally:
        if cache is not None:
            cache.close()
    sizes = [sum(hessian_nbytes(layout.dims[n], diagonal=diagonal) for n in b) for b in blocks]
    peak = max(sizes, default=0)
    return {**counts, "passes": len(blocks), "peak_accumulator_bytes": peak}, layout
