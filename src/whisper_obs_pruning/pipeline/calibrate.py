"""The ``calibrate`` stage body: Hessians of every Linear, streamed to a verified artifact set.

At most ``calibrate.max_hessian_mb`` of accumulators are held at once: the layers are
calibrated in as many passes as that needs, each block written to disk before the next.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..hessians.calibration import calibrate_in_passes
from ..hessians.collector import linear_layers
from ..hessians.store import hessian_set_bytes, hessian_set_writer
from ..whisper.loading import load_whisper
from ..whisper.prompt import decoder_prompt_ids
from .common import fingerprint, load_split, seed_everything
from .params import Params


def calibrate(p: Params, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Calibrate on ``data.calibration``; write ``out_dir`` atomically; return the metrics."""
    seed_everything(p.seed)
    model, processor = load_whisper(p.model.id, device=p.model.device)
    data = load_split(p.data.calibration, "calibration")
    layers = linear_layers(model)
    t0 = time.perf_counter()
    with hessian_set_writer(out_dir) as writer:
        counts, layout = calibrate_in_passes(
            model,
            processor,
            data.utterances,
            layers,
            decoder_prompt_ids(model, processor, language=p.model.language),
            lambda name, stat: writer.add(name, stat.hessian(), stat.n_samples),
            diagonal=p.calibrate.hessian == "diagonal",
            max_bytes=p.calibrate.max_hessian_bytes,
            batch_size=p.calibrate.batch_size,
            exclude_padding=p.calibrate.exclude_padding,
            progress=progress,
        )
        passes, peak = counts.pop("passes"), counts.pop("peak_accumulator_bytes")
        manifest = writer.finish(
            layout.shared_with,
            {
                "model_id": p.model.id,
                "model_fingerprint": fingerprint(model),
                "hessian": p.calibrate.hessian,
                "exclude_padding": p.calibrate.exclude_padding,
                "calibration": {
                    **p.data.calibration.model_dump(),
                    **counts,
                    "skipped": len(data.skipped),
                },
            },
        )
    seconds = time.perf_counter() - t0
    return {
        **counts,
        "skipped_utterances": len(data.skipped),
        "layers": len(manifest["layers"]),
        "distinct_hessians": len(layout.dims),
        "hessians_mb": round(hessian_set_bytes(manifest) / 2**20, 1),
        "passes": passes,
        "peak_accumulator_mb": round(peak / 2**20, 1),
        "seconds": round(seconds, 2),
    }
