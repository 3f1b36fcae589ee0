"""What each DVC stage does, as plain functions of the validated params.

Stage scripts under ``stages/`` only parse ``--params`` and call these, so the library, the
tests and the pipeline share one implementation.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from . import tracking
from .artifacts import (
    atomic_directory,
    check_hessian_set,
    hessian_set_bytes,
    hessian_set_writer,
    load_hessian,
    model_fingerprint,
    save_tensors_atomic,
    write_json_atomic,
)
from .calibration import calibrate_in_passes
from .data import LoadResult, load_utterances
from .evaluate import evaluate_model, write_rows_csv
from .export import save_sparse, sparse_size_report
from .hessian import linear_layers
from .methods import get_method, parse_pattern, pattern_name
from .models import decoder_prompt_ids, load_whisper
from .params import flatten
from .pruning import prune_layers, select_targets, weight_sparsity
from .sequential import prune_sequential

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_split(p: dict, split: str) -> LoadResult:
    d = p["data"][split]
    result = load_utterances(d["source"], d["split"], limit=d["max_samples"])
    if result.skipped:
        log.warning("%s: %s", split, result.summary())
    return result


def targets_for(model: torch.nn.Module, p: dict) -> list[str]:
    t = p["prune"]["targets"]
    return select_targets(list(linear_layers(model)), t["include"], t["exclude"])


# ------------------------------------------------------------------ calibrate
def max_hessian_bytes(p: dict) -> int | None:
    """``calibrate.max_hessian_mb`` in bytes (None: no limit)."""
    mb = p["calibrate"]["max_hessian_mb"]
    return None if mb is None else int(mb * 2**20)


def calibrate(p: dict, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Hessians of every Linear on the calibration split, streamed to a verified artifact set.

    At most ``calibrate.max_hessian_mb`` of accumulators are held at once: the layers are
    calibrated in as many passes as that needs, each block written to disk before the next.
    """
    seed_everything(p["seed"])
    model, processor = load_whisper(p["model"]["id"], device=p["model"]["device"])
    data = load_split(p, "calibration")
    layers = linear_layers(model)
    t0 = time.perf_counter()
    with hessian_set_writer(out_dir) as writer:
        counts, layout = calibrate_in_passes(
            model,
            processor,
            data.utterances,
            layers,
            decoder_prompt_ids(model, processor, language=p["model"]["language"]),
            lambda name, stat: writer.add(name, stat.hessian(), stat.n_samples),
            diagonal=p["calibrate"]["hessian"] == "diagonal",
            max_bytes=max_hessian_bytes(p),
            batch_size=p["calibrate"]["batch_size"],
            exclude_padding=p["calibrate"]["exclude_padding"],
            progress=progress,
        )
        passes, peak = counts.pop("passes"), counts.pop("peak_accumulator_bytes")
        manifest = writer.finish(
            layout.shared_with,
            {
                "model_id": p["model"]["id"],
                "model_fingerprint": model_fingerprint(model, list(layers)),
                "hessian": p["calibrate"]["hessian"],
                "exclude_padding": p["calibrate"]["exclude_padding"],
                "calibration": {**p["data"]["calibration"], **counts, "skipped": len(data.skipped)},
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


def open_hessians(p: dict, hessian_dir: str | Path, model: torch.nn.Module, targets: list[str]):
    """Verify the set against the model; return a loader with a one-entry cache."""
    manifest = check_hessian_set(
        hessian_dir, model, targets, model_fingerprint(model, list(linear_layers(model)))
    )
    cache: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        key = manifest["layers"][name]["file"]
        if key not in cache:
            cache.clear()
            cache[key] = load_hessian(hessian_dir, manifest, name)
        return cache[key]

    return manifest, get


def reusable_hessians(p: dict, hessian_dir: str | Path, model: torch.nn.Module, targets: list[str]):
    """For callers that prune many times (the sweep): every target's H loaded and verified once
    when the set fits in ``calibrate.max_hessian_mb``, else read from disk one at a time."""
    manifest, load_one = open_hessians(p, hessian_dir, model, targets)
    budget = max_hessian_bytes(p)
    if budget is not None and hessian_set_bytes(manifest) > budget:
        log.info("Hessians exceed calibrate.max_hessian_mb: reading them per layer, per point")
        return manifest, load_one
    by_file: dict[str, torch.Tensor] = {}
    for name in targets:
        f = manifest["layers"][name]["file"]
        if f not in by_file:
            by_file[f] = load_hessian(hessian_dir, manifest, name)
    return manifest, lambda name: by_file[manifest["layers"][name]["file"]]


# ------------------------------------------------------------------ prune
def prune_kwargs(p: dict) -> dict:
    pr = p["prune"]
    return {
        "rel_damp": pr["rel_damp"],
        "blocksize": pr["blocksize"],
        "scope": pr["scope"],
        "allocation": pr["allocation"],
        "owl_lambda": pr["owl_lambda"],
    }


def prune(p: dict, hessian_dir: str | Path, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Prune the model with ``prune.*`` from cached Hessians; save an HF dir + masks + report."""
    seed_everything(p["seed"])
    pr = p["prune"]
    model, processor = load_whisper(p["model"]["id"], device=p["model"]["device"])
    targets = targets_for(model, p)
    t0 = time.perf_counter()
    if pr["sequential"]:  # Hessians re-collected layer by layer through the pruned layers
        report = prune_sequential(
            model,
            processor,
            load_split(p, "calibration").utterances,
            targets,
            decoder_prompt_ids(model, processor, language=p["model"]["language"]),
            method=pr["method"],
            sparsity=pr["sparsity"],
            pattern=pr["pattern"],
            batch_size=p["calibrate"]["batch_size"],
            exclude_padding=p["calibrate"]["exclude_padding"],
            progress=progress,
            **prune_kwargs(p),
        )
    else:
        get_h = lambda name: None  # noqa: E731
        if get_method(pr["method"]).needs_hessian or pr["allocation"] == "owl":
            _, get_h = open_hessians(p, hessian_dir, model, targets)
        report = prune_layers(
            model,
            targets,
            get_h,
            method=pr["method"],
            sparsity=pr["sparsity"],
            pattern=pr["pattern"],
            progress=progress,
            **prune_kwargs(p),
        )
    seconds = time.perf_counter() - t0
    modules = dict(model.named_modules())
    pat = parse_pattern(pr["pattern"])
    summary = {
        "method": pr["method"],
        "pattern": pattern_name(pat),
        "target_sparsity": pr["sparsity"] if pat is None else pat[0] / pat[1],
        "sparsity": weight_sparsity(model, targets),
        "prune_seconds": round(seconds, 2),
        "num_layers": len(targets),
        "sequential": pr["sequential"],
        "model_id": p["model"]["id"],
    }
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp / "model")
        processor.save_pretrained(tmp / "model")
        # The same weights, compressed (values + bitmask, or 2:4 packed): smaller on disk.
        save_sparse(model, tmp / "sparse", targets=targets, processor=processor)
        sizes = sparse_size_report(tmp / "model", tmp / "sparse")
        summary.update(
            {k: sizes[k] for k in ("dense_weights_bytes", "sparse_weights_bytes", "weights_ratio")}
        )
        masks = {n: _packbits(modules[n].weight.data == 0) for n in targets}
        save_tensors_atomic(tmp / "masks.safetensors", masks, {"format": "packbits, row-major"})
        write_json_atomic(tmp / "report.json", {"summary": summary, "layers": report})
    return summary


def _packbits(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.cpu().numpy().reshape(-1)))


# ------------------------------------------------------------------ evaluate
def evaluate_on(
    p: dict, model, processor, utterances, *, progress: bool = True, desc: str = "evaluate"
) -> tuple[dict, list]:
    """WER/CER of ``model`` on ``utterances`` with the params' batch size and language."""
    return evaluate_model(
        model,
        processor,
        utterances,
        batch_size=p["evaluate"]["batch_size"],
        language=p["model"]["language"],
        progress=progress,
        desc=desc,
    )


def evaluate(p: dict, model_dir: str | Path, *, progress: bool = True) -> tuple[dict, list]:
    """WER/CER of the pruned model saved by ``prune`` on the evaluation split."""
    seed_everything(p["seed"])
    model_dir = Path(model_dir)
    model, processor = load_whisper(str(model_dir / "model"), device=p["model"]["device"])
    report = json.loads((model_dir / "report.json").read_text())["summary"]
    data = load_split(p, "evaluation")
    targets = targets_for(model, p)
    metrics, rows = evaluate_on(p, model, processor, data.utterances, progress=progress)
    metrics.update(
        {
            "method": report["method"],
            "pattern": report["pattern"],
            "target_sparsity": report["target_sparsity"],
            "sparsity": weight_sparsity(model, targets),
            "skipped_utterances": len(data.skipped),
            "prune_seconds": report["prune_seconds"],
        }
    )
    return metrics, rows


def log_stage(p: dict, stage: str, metrics: dict, artifacts: list[Path] = ()) -> None:
    """One MLflow run per stage execution: all params, the numeric metrics, chosen files."""
    with tracking.run(
        p["mlflow"]["experiment"],
        stage,
        params=flatten(p),
        tags={"stage": stage},
        configured_uri=p["mlflow"]["tracking_uri"],
    ) as mlflow:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if _numeric(v)})
        for a in artifacts:
            if Path(a).exists():
                mlflow.log_artifact(str(a))


def _numeric(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def save_metrics(path: str | Path, metrics: dict) -> None:
    write_json_atomic(path, metrics)


__all__ = [
    "calibrate",
    "prune",
    "evaluate",
    "log_stage",
    "save_metrics",
    "write_rows_csv",
    "open_hessians",
    "reusable_hessians",
]
