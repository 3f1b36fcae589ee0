"""The ``prune`` stage body: prune with ``prune.*`` from cached Hessians; save model + report."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_directory, save_tensors_atomic, sha256_file, write_json_atomic
from ..hessians.store import open_hessians
from ..methods import get_method, pattern_name
from ..pruning.allocation import HESSIAN_ALLOCATIONS
from ..pruning.apply import prune_layers
from ..pruning.sequential import prune_sequential
from ..pruning.targets import check_pattern_fits, weight_sparsity
from ..whisper.loading import load_whisper
from ..whisper.model_card import model_card, write_model_card
from ..whisper.prompt import decoder_prompt_ids
from ..whisper.sparse_checkpoint import save_sparse, sparse_size_report
from .common import fingerprint, load_split, seed_everything, targets_for
from .params import Params


def prune(
    p: Params, hessian_dir: str | Path, out_dir: str | Path, *, progress: bool = True
) -> dict:
    """Prune the model; write ``out_dir`` (HF dir, sparse export, masks, report) atomically."""
    seed_everything(p.seed)
    pr = p.prune
    model, processor = load_whisper(p.model.id, device=p.model.device)
    targets = targets_for(model, p)
    check_pattern_fits(model, targets, pr.pattern_tuple)
    t0 = time.perf_counter()
    calibration: dict | None = None
    if pr.sequential:  # Hessians re-collected layer by layer through the pruned layers
        cal = load_split(p.data.calibration, "calibration")
        calibration = {
            "source": p.data.calibration.source,
            "split": p.data.calibration.split,
            "utterances": len(cal.utterances),
            "mode": "sequential (re-collected through the pruned layers)",
        }
        report = prune_sequential(
            model,
            processor,
            cal.utterances,
            targets,
            decoder_prompt_ids(model, processor, language=p.model.language),
            method=pr.method,
            sparsity=pr.sparsity,
            pattern=pr.pattern,
            batch_size=p.calibrate.batch_size,
            exclude_padding=p.calibrate.exclude_padding,
            progress=progress,
            **pr.method_kwargs(),
        )
    else:
        get_h = lambda name: None  # noqa: E731
        if get_method(pr.method).needs_hessian or pr.allocation in HESSIAN_ALLOCATIONS:
            manifest, get_h = open_hessians(hessian_dir, model, targets, fingerprint(model))
            calibration = {**manifest.get("calibration", {}), "mode": "one-shot (cached Hessians)"}
        report = prune_layers(
            model,
            targets,
            get_h,
            method=pr.method,
            sparsity=pr.sparsity,
            pattern=pr.pattern_tuple,
            progress=progress,
            **pr.method_kwargs(),
        )
    seconds = time.perf_counter() - t0
    modules = dict(model.named_modules())
    summary = {
        "method": pr.method,
        "pattern": pattern_name(pr.pattern_tuple),
        "target_sparsity": pr.target_sparsity,
        "sparsity": weight_sparsity(model, targets),
        "prune_seconds": round(seconds, 2),
        "num_layers": len(targets),
        "sequential": pr.sequential,
        "model_id": p.model.id,
    }
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp / "model")
        processor.save_pretrained(tmp / "model")
        write_model_card(tmp / "model", _card(p, summary, calibration))
        # The same weights, compressed (values + bitmask, or 2:4 packed): smaller on disk.
        save_sparse(model, tmp / "sparse", targets=targets, processor=processor)
        sizes = sparse_size_report(tmp / "model", tmp / "sparse")
        summary.update(
            {k: sizes[k] for k in ("dense_weights_bytes", "sparse_weights_bytes", "weights_ratio")}
        )
        # checksums of what was written: evaluate refuses a model directory that changed since
        summary["model_sha256"] = {
            f.name: sha256_file(f) for f in sorted((tmp / "model").iterdir()) if f.is_file()
        }
        masks = {n: _packbits(modules[n].weight.data == 0) for n in targets}
        save_tensors_atomic(tmp / "masks.safetensors", masks, {"format": "packbits, row-major"})
        write_json_atomic(tmp / "report.json", {"summary": summary, "layers": report})
    return summary


def how_pruned(method: str, sequential: bool) -> str:
    """The card's sentence on how the weights were chosen: it differs by method and mode."""
    if method == "magnitude":
        return "the smallest-magnitude weights set to zero (no calibration, no weight update)."
    if sequential:
        return (
            f"{method}, layer by layer, each layer's Hessian taken from the inputs of the "
            "already-pruned layers before it (no fine-tuning)."
        )
    return f"{method}, one-shot, from per-layer Hessians of calibration audio (no fine-tuning)."


def _card(p: Params, summary: dict, calibration: dict | None) -> str:
    """The pruned model's card: what was removed, from which calibration, how to redo it."""
    pr = p.prune
    compression = {
        "method": pr.method,
        "pattern": summary["pattern"],
        "target sparsity": f"{100 * pr.target_sparsity:.1f}%",
        "measured sparsity of the pruned layers": f"{100 * summary['sparsity']:.2f}%",
        "pruned Linear layers": f"{summary['num_layers']} (kept dense: {pr.targets.exclude})",
        "rel_damp": pr.rel_damp,
        "allocation": pr.allocation,
        "obs rows": pr.obs_rows if pr.method == "obs" else None,
        "sequential": pr.sequential,
        "prune seconds": summary["prune_seconds"],
    }
    sets = " ".join(
        f"-S prune.{k}={v}" for k, v in (("method", pr.method), ("sparsity", pr.sparsity))
    )
    return model_card(
        model_id=p.model.id,
        title=f"{p.model.id} pruned with {pr.method} to {summary['pattern']} "
        f"{100 * pr.target_sparsity:.0f}%",
        compression=compression,
        calibration=calibration,
        evaluation=None,
        command=f"dvc exp run {sets} -S prune.pattern={summary['pattern']}  # stage prune",
        how=how_pruned(pr.method, pr.sequential),
        language=p.model.language,
        tags=("pruned", "sparse", pr.method),
    )


def _packbits(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.cpu().numpy().reshape(-1)))
