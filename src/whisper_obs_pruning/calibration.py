"""Teacher-forced calibration passes that feed the Hessian collector.

The decoder is fed the reference transcript (prompt + tokens), exactly the inputs it sees when
it transcribes the clip correctly, so decoder-side Hessians describe real decoding, not a
random or degenerate continuation, and one forward pass per batch suffices (no generation).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import Utterance
from .hessian import HessianCollector

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
) -> dict:
    """Run every utterance through the model once, teacher-forced; return counts."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n_tokens = n_frames = 0
    bar = tqdm(total=len(utterances), desc="calibrate", unit="utt", disable=not progress)
    for feats, dec, masks in teacher_forced_batches(
        utterances, processor, prompt, batch_size, exclude_padding=exclude_padding
    ):
        collector.new_batch({k: v.to(device) for k, v in masks.items()})
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
