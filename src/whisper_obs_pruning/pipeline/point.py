"""One sweep point: the dense model pruned (and quantized) from the cached Hessians, scored.

Shared by the in-process sweep (``sweep.run_sweep``: the CLI, the benchmarks) and the DVC
pipeline, where every point is a ``matrix`` stage of its own (``stages/sweep_point.py``) so DVC's
run cache decides what is recomputed. Nothing here logs to MLflow or draws plots: a point
stage depends on exactly this code, and editing a plot never re-runs a point.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_directory, write_json_atomic
from ..hessians.store import ArtifactError, reusable_hessians
from ..pruning.apply import prune_layers
from ..pruning.targets import check_pattern_fits, weight_sparsity
from ..quant.apply import quantize_layers
from ..quant.checkpoint import save_quantized
from ..quant.grid import parse_scheme
from ..sparsity import parse_pattern, pattern_name
from ..speech.datasets import LoadResult
from ..speech.scoring import write_rows_csv
from ..whisper.loading import load_whisper
from ..whisper.sparse_checkpoint import save_sparse
from .common import fingerprint, load_split, seed_everything, targets_for
from .evaluate import evaluate_on
from .params import Params

DENSE = {"method": "dense", "pattern": "dense", "target_sparsity": 0.0, "quant": "none"}


def sweep_points(p: Params) -> list[dict]:
    """The grid, per quantization scheme (``none`` first): every method at every sparsity,
    then at every N:M pattern; a quantized scheme also gets the dense model quantized."""
    sw = p.sweep
    points: list[dict] = []
    for q in sw.quant:
        if q != "none":
            points.append({**DENSE, "quant": q})
        points += [
            {"method": m, "pattern": "unstructured", "target_sparsity": float(s), "quant": q}
            for m in sw.methods
            for s in sw.sparsities
        ]
        for pat in sw.patterns:
            n, m_ = parse_pattern(pat)
            points += [
                {
                    "method": m,
                    "pattern": pattern_name((n, m_)),
                    "target_sparsity": n / m_,
                    "quant": q,
                }
                for m in sw.methods
            ]
    return points


def point_key(point: dict) -> str:
    key = f"{point['method']}@{point['pattern']}@{point['target_sparsity']:.4f}"
    quant = point.get("quant", "none")
    return key if quant == "none" else f"{key}+{quant}"


def checkpoint_bytes(model, processor, targets: list[str], quant_results: dict | None) -> int:
    """Bytes of the weights file of the compressed checkpoint of the model as evaluated:
    the quantized (+ bitmask) format for a quantized point, else the sparse export."""
    with tempfile.TemporaryDirectory(prefix="whisper-obs-size-") as tmp:
        if quant_results:
            summary = save_quantized(model, quant_results, Path(tmp) / "q", other_dtype="float16")
        else:
            summary = save_sparse(model, Path(tmp) / "s", targets=targets, processor=processor)
        return int(summary["weights_bytes"])


@dataclass
class PointContext:
    """What every point of a sweep shares, loaded once per process: the dense model (and a
    copy of its weights to restore), the verified Hessians, the evaluation splits."""

    p: Params
    model: torch.nn.Module
    processor: object
    targets: list[str]
    manifest: dict
    get_hessian: object
    data: LoadResult
    extras: dict[str, LoadResult]
    dense_state: dict[str, torch.Tensor] = field(repr=False)
    n_params: int = 0

    @classmethod
    def open(
        cls, p: Params, hessian_dir: str | Path, patterns: list[str] | None = None
    ) -> PointContext:
        """Load once; ``patterns`` (default: the grid's) are checked to fit every target."""
        seed_everything(p.seed)
        model, processor = load_whisper(p.model.id, device=p.model.device)
        targets = targets_for(model, p)
        for pattern in p.sweep.patterns if patterns is None else patterns:
            check_pattern_fits(model, targets, pattern)
        manifest, get_hessian = reusable_hessians(
            hessian_dir, model, targets, fingerprint(model), p.calibrate.max_hessian_bytes
        )
        extras = {
            x.name: load_split(x, x.name)
            for x in (p.data.extra_evaluation if p.sweep.extra_splits else [])
        }
        return cls(
            p=p,
            model=model,
            processor=processor,
            targets=targets,
            manifest=manifest,
            get_hessian=get_hessian,
            data=load_split(p.data.evaluation, "evaluation"),
            extras=extras,
            dense_state={k: v.detach().clone() for k, v in model.state_dict().items()},
            n_params=sum(t.numel() for t in {id(t): t for t in model.parameters()}.values()),
        )

    def evaluate(self, desc: str, progress: bool) -> tuple[dict, dict[str, list]]:
        """WER/CER on the evaluation split, ``wer_<name>``/``cer_<name>`` on each extra one,
        and the per-utterance rows of every split."""
        metrics, rows = evaluate_on(
            self.p, self.model, self.processor, self.data.utterances, progress=progress, desc=desc
        )
        keep = ("wer", "cer", "wer_raw", "num_utterances", "transcribe_seconds", "reference_words")
        out = {k: metrics[k] for k in keep if k in metrics}
        transcripts = {"evaluation": rows}
        for name, extra in self.extras.items():
            m, r = evaluate_on(
                self.p,
                self.model,
                self.processor,
                extra.utterances,
                progress=progress,
                desc=f"{desc} {name}",
            )
            out.update({f"{k}_{name}": m[k] for k in ("wer", "cer", "num_utterances")})
            transcripts[name] = r
        return out, transcripts

    def dense(self, progress: bool) -> tuple[dict, dict[str, list]]:
        """The unpruned, unquantized baseline."""
        self.model.load_state_dict(self.dense_state)
        m, transcripts = self.evaluate("dense", progress)
        dense_bytes = 4 * self.n_params  # the float32 checkpoint's weights
        result = {
            **DENSE,
            "sparsity": weight_sparsity(self.model, self.targets),
            **m,
            "model_bytes": dense_bytes,
            "model_bytes_fp16": dense_bytes // 2,
            "bits_per_weight": 32.0,
        }
        return result, transcripts

    def compute(self, point: dict, progress: bool) -> tuple[dict, dict[str, list]]:
        """Restore the dense weights, prune and quantize as ``point`` says, then score."""
        p = self.p
        self.model.load_state_dict(self.dense_state)  # quantization also rounds other tensors
        t0 = time.perf_counter()
        if point["method"] != "dense":
            prune_layers(
                self.model,
                self.targets,
                self.get_hessian,
                method=point["method"],
                sparsity=point["target_sparsity"],
                pattern=point["pattern"],
                progress=False,
                **p.prune.method_kwargs(),
            )
        prune_s = time.perf_counter() - t0
        quant_results, quant_s = None, 0.0
        spec = parse_scheme(point["quant"])
        if spec is not None:
            t1 = time.perf_counter()
            quant_results, _ = quantize_layers(
                self.model,
                self.targets,
                self.get_hessian,
                spec,
                method=p.quant.method,
                rel_damp=p.prune.rel_damp,
                blocksize=p.prune.blocksize,
                other_dtype=p.quant.other_dtype,
                progress=False,
            )
            quant_s = time.perf_counter() - t1
        m, transcripts = self.evaluate(point_key(point), progress)
        nbytes = checkpoint_bytes(self.model, self.processor, self.targets, quant_results)
        result = {
            **point,
            "sparsity": weight_sparsity(self.model, self.targets),
            **m,
            "prune_seconds": round(prune_s, 2),
            "quant_seconds": round(quant_s, 2),
            "model_bytes": nbytes,
            "bits_per_weight": round(8 * nbytes / self.n_params, 3),
        }
        return result, transcripts

    def restore(self) -> None:
        self.model.load_state_dict(self.dense_state)


# ------------------------------------------------------------------ one point per DVC stage
POINT_FILE = "point.json"


def grid_point(method: str, quant: str, sparsity: float | None, pattern: str | None) -> dict:
    """The point a ``sweep-point`` / ``sweep-nm`` / ``sweep-dense`` stage computes."""
    if method == "dense":
        return {**DENSE, "quant": quant}
    if pattern is not None:
        n, m = parse_pattern(pattern)
        return {
            "method": method,
            "pattern": pattern_name((n, m)),
            "target_sparsity": n / m,
            "quant": quant,
        }
    return {
        "method": method,
        "pattern": "unstructured",
        "target_sparsity": float(sparsity),
        "quant": quant,
    }


def run_point(
    p: Params, hessian_dir: str | Path, point: dict, out_dir: str | Path, *, progress: bool
) -> dict:
    """Compute one point and write it (``point.json`` + per-clip transcripts per split) as one
    atomic directory: the DVC output of its stage."""
    nm = [] if point["pattern"] in ("dense", "unstructured") else [point["pattern"]]
    ctx = PointContext.open(p, hessian_dir, patterns=nm)
    if point_key(point) == point_key(DENSE):
        result, transcripts = ctx.dense(progress)
    else:
        result, transcripts = ctx.compute(point, progress)
    with atomic_directory(Path(out_dir)) as tmp:
        write_json_atomic(
            tmp / POINT_FILE,
            {
                "model_id": p.model.id,
                "key": point_key(point),
                "result": result,
                "skipped_utterances": [
                    {"id": sk.id, "reason": sk.reason} for sk in ctx.data.skipped
                ],
            },
        )
        for split, rows in transcripts.items():
            write_rows_csv(tmp / f"utterances_{split}.csv", rows)
    return result


def read_points(points_dir: str | Path) -> dict[str, tuple[dict, Path]]:
    """``point_key -> (point.json content, its folder)`` for every point under ``points_dir``."""
    found: dict[str, tuple[dict, Path]] = {}
    for f in sorted(Path(points_dir).glob(f"*/{POINT_FILE}")):
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
            found[doc["key"]] = (doc, f.parent)
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{f}: not a sweep point ({exc!r}); re-run its stage") from None
    return found
