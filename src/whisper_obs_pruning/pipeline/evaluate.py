"""The ``evaluate`` stage body: WER/CER of a saved (pruned) model on the evaluation split."""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import sha256_file
from ..hessians.store import ArtifactError
from ..pruning.targets import weight_sparsity
from ..speech.scoring import evaluate_model
from ..whisper.loading import load_whisper
from .common import load_split, seed_everything, targets_for
from .params import Params


def evaluate_on(
    p: Params,
    model,
    processor,
    utterances,
    *,
    progress: bool = True,
    desc: str = "evaluate",
    ct2_quantization: str | None = None,
) -> tuple[dict, list]:
    """WER/CER of ``model`` on ``utterances`` with the params' batch size, language and
    backend; ``ct2_quantization`` (e.g. ``int8``): score its CTranslate2 export at that type."""
    return evaluate_model(
        model,
        processor,
        utterances,
        batch_size=p.evaluate.batch_size,
        language=p.model.language,
        progress=progress,
        desc=desc,
        backend="ct2" if ct2_quantization else p.evaluate.backend,
        ct2_quantization=ct2_quantization or "float32",
    )


def read_report(model_dir: Path) -> dict:
    """The ``summary`` of a pruned model's ``report.json``; a clear error when it is unusable."""
    path = model_dir / "report.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))["summary"]
        for key in ("method", "pattern", "target_sparsity", "prune_seconds"):
            summary[key]  # noqa: B018 - presence check
        return summary
    except FileNotFoundError:
        raise ArtifactError(
            f"{path} is missing: {model_dir} is not a pruned model from `prune`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path} is not a valid prune report ({exc!r}); re-run prune") from None


def verify_model_files(model_dir: Path, report: dict) -> None:
    """The files ``prune`` wrote, byte for byte (sha256): a flipped bit is refused, not scored."""
    for name, digest in report.get("model_sha256", {}).items():
        f = model_dir / "model" / name
        if not f.is_file():
            raise ArtifactError(f"{f} is missing (written by prune); re-run prune")
        if sha256_file(f) != digest:
            raise ArtifactError(f"{f} changed since prune wrote it (sha256 mismatch); re-run prune")


def evaluate(p: Params, model_dir: str | Path, *, progress: bool = True) -> tuple[dict, list]:
    """WER/CER of the pruned model saved by ``prune`` on the evaluation split."""
    seed_everything(p.seed)
    model_dir = Path(model_dir)
    report = read_report(model_dir)
    verify_model_files(model_dir, report)
    model, processor = load_whisper(str(model_dir / "model"), device=p.model.device)
    data = load_split(p.data.evaluation, "evaluation")
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


def scores_only(metrics: dict) -> dict:
    """The DVC metric of the stage: WER/CER (every split) and the measured sparsity, without
    the counts and timings that would make ``dvc metrics diff`` report noise."""
    keep = [k for k in metrics if k.startswith(("wer", "cer")) or k == "sparsity"]
    return {k: metrics[k] for k in keep}
