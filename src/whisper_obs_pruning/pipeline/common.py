"""What every stage body does first: seed, load a split, pick the targets, log a stage run."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from ..hessians.collector import linear_layers
from ..hessians.store import model_fingerprint
from ..pruning.targets import select_targets
from ..speech.datasets import LoadResult, load_utterances
from .params import Params, SplitSpec

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_split(spec: SplitSpec, name: str) -> LoadResult:
    result = load_utterances(spec.source, spec.split, limit=spec.max_samples)
    if result.skipped:
        log.warning("%s: %s", name, result.summary())
    return result


def targets_for(model: torch.nn.Module, p: Params) -> list[str]:
    t = p.prune.targets
    return select_targets(list(linear_layers(model)), t.include, t.exclude)


def fingerprint(model: torch.nn.Module) -> str:
    """The model fingerprint a Hessian set is checked against (all Linears, like calibrate)."""
    return model_fingerprint(model, list(linear_layers(model)))


def check_tracking(p: Params) -> float:
    """Open the MLflow store before a stage's work, so a bad one fails in seconds; return the
    time the work starts (``log_stage``'s ``started``: the run spans the work)."""
    import time

    from . import tracking

    tracking.setup(p.mlflow.experiment, p.mlflow.tracking_uri)
    return time.time()


def log_stage(
    p: Params,
    stage: str,
    metrics: dict,
    artifacts: list[str | Path] = (),
    started: float | None = None,
) -> None:
    """One MLflow run per stage execution: all params, the numeric metrics, chosen files and
    folders (a folder is logged under its own name, e.g. ``model/``)."""
    from . import tracking

    with tracking.run(
        p.mlflow.experiment,
        run_name(stage, p),
        params=p.flat(),
        tags={"stage": stage, **tracking.provenance()},
        configured_uri=p.mlflow.tracking_uri,
        started=started,
    ) as mlflow:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if numeric(v)})
        for a in map(Path, artifacts):
            if a.is_dir():
                mlflow.log_artifacts(str(a), artifact_path=a.name)
            elif a.exists():
                mlflow.log_artifact(str(a))


def run_name(stage: str, p: Params) -> str:
    """``prune obs 50%`` / ``prune obs 2:4``: runs of different experiments told apart."""
    if stage not in ("prune", "evaluate"):
        return stage
    pr = p.prune
    point = f"{pr.sparsity:.0%}" if pr.pattern_tuple is None else pr.pattern
    return f"{stage} {pr.method} {point}"


def numeric(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
