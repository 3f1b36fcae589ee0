"""One sweep point: the dense model pruned (and quantized) from the cached Hessians, scored.

Shared by the in-process sweep (``sweep.run_sweep``: the CLI, the benchmarks) and the DVC
pipeline, where every point is a ``matrix`` stage of its own (``stages/sweep_point.py``) so DVC's
run cache decides what is recomputed. Nothing here logs to MLflow or draws plots: a point
stage depends on exactly this code, and editing a plot never re-runs a point.
"""

from __future__ import annotations

import copy
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
from ..quant.apply import embedding_layer, quantize_layers
from ..quant.checkpoint import save_quantized
from ..quant.grid import QuantSpec, parse_scheme
from ..sparsity import parse_pattern, pattern_name
from ..speech.datasets import LoadResult
from ..speech.scoring import write_rows_csv
from ..whisper.ct2_export import CT2Whisper, ct2_quantization
from ..whisper.decoding import transcribe_tokens
from ..whisper.latency import measure_latency
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
            points.append(grid_point("dense", q, None, None))
        points += [grid_point(m, q, s, None) for m in sw.methods for s in sw.sparsities]
        points += [grid_point(m, q, None, pat) for pat in sw.patterns for m in sw.methods]
    return points


def point_key(point: dict) -> str:
    key = f"{point['method']}@{point['pattern']}@{point['target_sparsity']:.4f}"
    quant = point.get("quant", "none")
    return key if quant == "none" else f"{key}+{quant}"


def checkpoint_bytes(
    model, processor, targets: list[str], quant_results: dict | None, keep: Path | None = None
) -> int:
    """Bytes of the weights file of the compressed checkpoint of the model as evaluated:
    the quantized (+ bitmask) format for a quantized point, else the sparse export. ``keep``:
    a quantized checkpoint is written there (with the processor) instead of a temporary folder."""
    if quant_results and keep is not None:
        summary = save_quantized(model, quant_results, keep, other_dtype="float16",
                                 processor=processor)  # fmt: skip
        return int(summary["weights_bytes"])
    with tempfile.TemporaryDirectory(prefix="whisper-obs-size-") as tmp:
        if quant_results:
            summary = save_quantized(model, quant_results, Path(tmp) / "q", other_dtype="float16")
        else:
            summary = save_sparse(model, Path(tmp) / "s", targets=targets, processor=processor)
        return int(summary["weights_bytes"])


def embedding_spec(p: Params, spec: QuantSpec | None) -> QuantSpec | None:
    """The scheme of the tied token embedding at a point quantized with ``spec``:
    ``quant.embedding`` = ``same`` (the point's), ``none``, or a scheme of its own."""
    if spec is None or p.quant.embedding == "none":
        return None
    return spec if p.quant.embedding == "same" else parse_scheme(p.quant.embedding)


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
    embedding: str | None = None  # the Linear tied to the token embedding (proj_out)
    dense_model: torch.nn.Module | None = field(default=None, repr=False)

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
        emb = embedding_layer(model)
        quantized = any(parse_scheme(q) for q in p.sweep.quant if ct2_quantization(q) is None)
        hessian_layers = targets + (
            [emb]
            if quantized and emb not in (None, *targets) and p.quant.embedding != "none"
            else []
        )
        manifest, get_hessian = reusable_hessians(
            hessian_dir, model, hessian_layers, fingerprint(model), p.calibrate.max_hessian_bytes
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
            embedding=emb,
        )

    def evaluate(
        self, desc: str, progress: bool, ct2: str | None = None
    ) -> tuple[dict, dict[str, list]]:
        """WER/CER on the evaluation split, ``wer_<name>``/``cer_<name>`` on each extra one,
        and the per-utterance rows of every split; ``ct2``: score the CTranslate2 export at
        that weight type instead of the PyTorch model."""
        metrics, rows = evaluate_on(
            self.p,
            self.model,
            self.processor,
            self.data.utterances,
            progress=progress,
            desc=desc,
            ct2_quantization=ct2,
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
                ct2_quantization=ct2,
            )
            out.update({f"{k}_{name}": m[k] for k in ("wer", "cer", "num_utterances")})
            transcripts[name] = r
        return out, transcripts

    def latency(self, ct2: CT2Whisper | None) -> dict:
        """Seconds per clip of the point's model (or its CT2 export) and of the dense PyTorch
        model, side by side on the first ``latency_clips`` evaluation clips, one thread each
        (``whisper/latency.py``); ``{}`` when ``latency_clips`` is 0."""
        n = self.p.sweep.latency_clips
        if not n:
            return {}
        clips = [u.audio for u in self.data.utterances[:n]]
        lang = self.p.model.language

        def torch_runner(model):
            return lambda a: transcribe_tokens(
                model, self.processor, [a], batch_size=1, language=lang, progress=False,
                decoder_threads=None, encoder_threads=None,
            )  # fmt: skip

        runners = {"dense": torch_runner(self.dense_model or self.model)}
        if self.dense_model is not None:
            runners["point"] = (
                torch_runner(self.model) if ct2 is None else (lambda a: ct2.tokens([a]))
            )
        lat = measure_latency(runners, clips, reference="dense")
        point = "point" if "point" in runners else "dense"
        return {
            "latency_seconds_per_clip": lat["seconds_per_clip"][point],
            "latency_dense_seconds_per_clip": lat["seconds_per_clip"]["dense"],
            "speedup": lat["speedup"][point],
            "latency": {k: lat[k] for k in ("clips", "repeats", "threads", "load_average")},
        }

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
            "params_millions": round(self.n_params / 1e6, 2),
            **self.latency(None),
        }
        return result, transcripts

    def compute(
        self, point: dict, progress: bool, keep: Path | None = None
    ) -> tuple[dict, dict[str, list]]:
        """Restore the dense weights, prune and quantize (or export to CTranslate2) as
        ``point`` says, then score. ``keep``: where a quantized point's checkpoint or a CT2
        point's export is written (the DVC point stage keeps them; the in-process sweep not)."""
        p = self.p
        self.model.load_state_dict(self.dense_state)  # quantization also rounds other tensors
        if p.sweep.latency_clips and self.dense_model is None:
            self.dense_model = copy.deepcopy(self.model)  # the reference of the timing
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
        quant_results, quant_s, ct2 = None, 0.0, None
        ct2_type = ct2_quantization(point["quant"])
        spec = None if ct2_type else parse_scheme(point["quant"])
        t1 = time.perf_counter()
        if spec is not None:
            emb = embedding_spec(p, spec)
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
                layer_specs={self.embedding: emb} if emb and self.embedding else None,
            )
        elif ct2_type:
            ct2 = CT2Whisper(self.model, self.processor, quantization=ct2_type, threads=1,
                             language=p.model.language, keep=keep)  # fmt: skip
        quant_s = time.perf_counter() - t1
        m, transcripts = self.evaluate(point_key(point), progress, ct2=ct2_type)
        if ct2 is not None:
            nbytes = ct2.model_bytes  # the export's model.bin: what faster-whisper loads
        else:
            nbytes = checkpoint_bytes(
                self.model, self.processor, self.targets, quant_results, keep=keep
            )
        result = {
            **point,
            "sparsity": weight_sparsity(self.model, self.targets),
            **m,
            "prune_seconds": round(prune_s, 2),
            "quant_seconds": round(quant_s, 2),
            "model_bytes": nbytes,
            "bits_per_weight": round(8 * nbytes / self.n_params, 3),
            "params_millions": round(self.n_params / 1e6, 2),
            **self.latency(ct2),
        }
        return result, transcripts

    def restore(self) -> None:
        self.model.load_state_dict(self.dense_state)


# ------------------------------------------------------------------ one point per DVC stage
POINT_FILE = "point.json"
MODEL_DIR = "model"  # a quantized point's checkpoint, a CT2 point's faster-whisper export


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
    with atomic_directory(Path(out_dir)) as tmp:
        if point_key(point) == point_key(DENSE):
            result, transcripts = ctx.dense(progress)
        else:  # a quantized checkpoint / CT2 export is kept with the point: the small model
            result, transcripts = ctx.compute(point, progress, keep=tmp / MODEL_DIR)
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
