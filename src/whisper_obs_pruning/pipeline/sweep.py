"""Methods x sparsities from one cached calibration: the sparsity-versus-WER comparison.

Each point restores the dense weights, prunes from the cached Hessians and evaluates. Finished
points are checkpointed (``state_dir``), so an interrupted sweep resumes where it stopped and
re-uses its MLflow parent run instead of logging duplicates.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
from pathlib import Path

from ..atomic import atomic_path, write_json_atomic, write_text_atomic
from ..hessians.store import reusable_hessians
from ..methods import parse_pattern, pattern_name
from ..pruning.apply import prune_layers
from ..pruning.targets import check_pattern_fits, weight_sparsity
from ..whisper.loading import load_whisper
from . import tracking
from .common import fingerprint, load_split, seed_everything, targets_for
from .evaluate import evaluate_on
from .params import Params, flatten

log = logging.getLogger(__name__)

CSV_FIELDS = ("method", "pattern", "target_sparsity", "sparsity", "wer", "cer")


def sweep_points(p: Params) -> list[dict]:
    """The grid: every method at every sparsity, then every method at every N:M pattern."""
    sw = p.sweep
    points = [
        {"method": m, "pattern": "unstructured", "target_sparsity": float(s)}
        for m in sw.methods
        for s in sw.sparsities
    ]
    for pat in sw.patterns:
        n, m_ = parse_pattern(pat)
        points += [
            {"method": m, "pattern": pattern_name((n, m_)), "target_sparsity": n / m_}
            for m in sw.methods
        ]
    return points


def point_key(point: dict) -> str:
    return f"{point['method']}@{point['pattern']}@{point['target_sparsity']:.4f}"


def _data_digest(utterances) -> str:
    """What was evaluated, bit for bit: ids, references and decoded audio of every clip."""
    h = hashlib.sha256()
    for u in utterances:
        h.update(u.id.encode())
        h.update(b"\0" + u.text.encode() + b"\0")
        h.update(u.audio.tobytes())
    return h.hexdigest()


def _code_digest() -> str:
    """The package's source (every module: a changed decoder or method changes results)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _config_key(p: Params, manifest: dict, utterances, model_fp: str) -> str:
    """A finished point is reused only if nothing it came from changed: params, Hessians,
    the evaluation data as decoded, the model's weights and the code."""
    relevant = {
        "data_digest": _data_digest(utterances),
        "code_digest": _code_digest(),
        "model_fingerprint": model_fp,
        "model": p.model.model_dump(),
        "data": p.data.evaluation.model_dump(),
        "evaluate": p.evaluate.model_dump(),
        "prune": p.prune.model_dump(exclude={"method", "sparsity", "pattern"}),
        "hessians": sorted({v["sha256"] for v in manifest["layers"].values()}),
        "seed": p.seed,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _load_state(state_dir: Path, key: str) -> dict:
    path = state_dir / "state.json"
    if path.is_file():
        try:
            state = json.loads(path.read_text())
            if state.get("config_key") == key:
                return state
        except json.JSONDecodeError:
            log.warning("ignoring unreadable sweep checkpoint %s", path)
    return {"config_key": key, "parent_run_id": None, "dense": None, "points": {}}


def run_sweep(
    p: Params,
    hessian_dir: str | Path,
    out_dir: str | Path = "metrics",
    state_dir: str | Path = "artifacts/sweep_state",
    *,
    progress: bool = True,
) -> dict:
    """Run (or resume) the sweep; write sweep.json / sweep.csv / sparsity_wer.png; log MLflow."""
    seed_everything(p.seed)
    out_dir, state_dir = Path(out_dir), Path(state_dir)
    model, processor = load_whisper(p.model.id, device=p.model.device)
    targets = targets_for(model, p)
    for pattern in p.sweep.patterns:
        check_pattern_fits(model, targets, pattern)
    manifest, get_hessian = reusable_hessians(
        hessian_dir, model, targets, fingerprint(model), p.calibrate.max_hessian_bytes
    )
    modules = dict(model.named_modules())
    dense = {n: modules[n].weight.data.clone() for n in targets}
    data = load_split(p.data.evaluation, "evaluation")
    state = _load_state(state_dir, _config_key(p, manifest, data.utterances, fingerprint(model)))
    points = sweep_points(p)

    def evaluate_now(desc: str) -> dict:
        return evaluate_on(p, model, processor, data.utterances, progress=progress, desc=desc)[0]

    mlflow = tracking.setup(p.mlflow.experiment, p.mlflow.tracking_uri)
    if state["parent_run_id"] and not _run_exists(mlflow, state["parent_run_id"]):
        log.warning(
            "sweep checkpoint names MLflow run %s, which this store does not have; "
            "logging its points to a new run",
            state["parent_run_id"],
        )
        state["parent_run_id"] = None
    run_kwargs = (
        {"run_id": state["parent_run_id"]}
        if state["parent_run_id"]
        else {"run_name": "sweep", "tags": {"stage": "sweep", **tracking.provenance()}}
    )
    with mlflow.start_run(**run_kwargs) as parent:
        if not state["parent_run_id"]:
            mlflow.log_params(flatten(p.model_dump(include={"seed", "model", "sweep", "evaluate"})))
            mlflow.log_params(flatten({"prune": p.prune.method_kwargs()}))
            mlflow.log_param("num_eval_utterances", len(data.utterances))
            state["parent_run_id"] = parent.info.run_id
            write_json_atomic(state_dir / "state.json", state)
        logged = _finished_points(mlflow, state["parent_run_id"])
        if state["dense"] is None:
            m = evaluate_now("dense")
            state["dense"] = {
                "method": "dense",
                "pattern": "dense",
                "target_sparsity": 0.0,
                "sparsity": weight_sparsity(model, targets),
                **_keep(m),
            }
            write_json_atomic(state_dir / "state.json", state)
        if "dense" not in logged:
            _log_point(mlflow, state["dense"], "dense")
        for i, point in enumerate(points):
            key = point_key(point)
            if key in state["points"]:
                log.info("sweep: %s already done, skipping", key)
                if key not in logged:  # killed between the checkpoint and the MLflow run
                    _log_point(mlflow, state["points"][key], key)
                continue
            log.info("sweep point %d/%d: %s", i + 1, len(points), key)
            for n in targets:
                modules[n].weight.data.copy_(dense[n])
            t0 = time.perf_counter()
            prune_layers(
                model,
                targets,
                get_hessian,
                method=point["method"],
                sparsity=point["target_sparsity"],
                pattern=point["pattern"],
                progress=False,
                **p.prune.method_kwargs(),
            )
            prune_s = time.perf_counter() - t0
            m = evaluate_now(key)
            result = {
                **point,
                "sparsity": weight_sparsity(model, targets),
                **_keep(m),
                "prune_seconds": round(prune_s, 2),
            }
            state["points"][key] = result
            write_json_atomic(state_dir / "state.json", state)
            _log_point(mlflow, result, key)
        summary = {
            "model_id": p.model.id,
            "num_utterances": len(data.utterances),
            "skipped_utterances": [{"id": sk.id, "reason": sk.reason} for sk in data.skipped],
            "dense": state["dense"],
            "points": [state["points"][point_key(pt)] for pt in points],
            "mlflow_run_id": state["parent_run_id"],
        }
        write_outputs(summary, out_dir)
        _log_parent(mlflow, summary, out_dir)
    for n in targets:
        modules[n].weight.data.copy_(dense[n])
    return summary


def _keep(m: dict) -> dict:
    keys = ("wer", "cer", "wer_raw", "num_utterances", "transcribe_seconds", "reference_words")
    return {k: m[k] for k in keys if k in m}


def _run_exists(mlflow, run_id: str) -> bool:
    try:
        return mlflow.tracking.MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # noqa: BLE001 - MlflowException for unknown ids, whatever the store
        return False


def _finished_points(mlflow, parent_id: str) -> set[str]:
    """Points already logged as finished nested runs; unfinished ones (killed) are deleted."""
    client = mlflow.tracking.MlflowClient()
    parent = client.get_run(parent_id)
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=5000
    )
    done = set()
    for r in runs:
        if r.info.status == "FINISHED":
            done.add(r.data.tags.get("point"))
        else:
            client.delete_run(r.info.run_id)
    return done


def _log_point(mlflow, result: dict, key: str) -> None:
    step = round(100 * result["target_sparsity"])
    with mlflow.start_run(run_name=key, nested=True, tags={"stage": "sweep-point", "point": key}):
        mlflow.log_params({k: result[k] for k in ("method", "pattern", "target_sparsity")})
        mlflow.log_metrics(
            {k: float(result[k]) for k in ("wer", "cer", "sparsity", "wer_raw") if k in result},
            step=step,
        )
        if "prune_seconds" in result:
            mlflow.log_metric("prune_seconds", result["prune_seconds"], step=step)


def _log_parent(mlflow, summary: dict, out_dir: Path) -> None:
    dense = summary["dense"]
    mlflow.log_metric("wer_dense", dense["wer"])
    for pt in summary["points"]:
        name = f"wer_{pt['method']}" + ("" if pt["pattern"] == "unstructured" else "_nm")
        mlflow.log_metric(name, pt["wer"], step=round(100 * pt["target_sparsity"]))
    for f in ("sweep.json", "sweep.csv", "sparsity_wer.png"):
        mlflow.log_artifact(str(out_dir / f))


# ------------------------------------------------------------------ outputs
def write_outputs(summary: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "sweep.json", summary)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerow(summary["dense"])
    for pt in summary["points"]:
        w.writerow(pt)
    write_text_atomic(out_dir / "sweep.csv", buf.getvalue())
    plot(summary, out_dir / "sparsity_wer.png")


def _plot_x(pt: dict) -> float:
    """Sparsity in percent; N:M points sit just right of the unstructured point they equal."""
    return 100 * pt["sparsity"] + (0.0 if pt["pattern"] == "unstructured" else 1.5)


def _plot_label(pt: dict) -> str:
    return pt["method"] if pt["pattern"] == "unstructured" else f"{pt['method']} {pt['pattern']}"


def plot(summary: dict, path: Path) -> None:
    """WER against sparsity: a line per method, N:M as separate markers, dense dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    dense = summary["dense"]["wer"] * 100
    ax.axhline(dense, color="black", ls="--", lw=1, label=f"dense ({dense:.1f}%)")
    methods = list(dict.fromkeys(pt["method"] for pt in summary["points"]))
    all_wer = [dense]
    for i, m in enumerate(methods):
        color = f"C{i}"
        pts = sorted(
            (
                pt
                for pt in summary["points"]
                if pt["method"] == m and pt["pattern"] == "unstructured"
            ),
            key=lambda pt: pt["target_sparsity"],
        )
        if pts:
            xs = [0] + [100 * pt["sparsity"] for pt in pts]
            ys = [dense] + [100 * pt["wer"] for pt in pts]
            ax.plot(xs, ys, marker="o", color=color, label=m, clip_on=True)
            all_wer += ys
        for pt in summary["points"]:
            if pt["method"] == m and pt["pattern"] != "unstructured":
                ax.scatter(
                    _plot_x(pt),
                    100 * pt["wer"],
                    marker="s",
                    s=60,
                    facecolors="none",
                    edgecolors=color,
                    label=_plot_label(pt),
                )
                all_wer.append(100 * pt["wer"])
    top = min(max(all_wer) * 1.1, max(100.0, dense * 4))
    ax.set_ylim(0, top)
    if max(all_wer) > top:  # degenerate points: drawn at the top edge, values listed below it
        over: dict[float, list[str]] = {}
        for m in methods:
            for pt in summary["points"]:
                if pt["method"] == m and 100 * pt["wer"] > top:
                    label = f"{_plot_label(pt)} {100 * pt['wer']:.0f}%"
                    over.setdefault(round(_plot_x(pt), 1), []).append(label)
        for x, labels in over.items():
            ax.annotate(
                "\n".join(labels),
                (x, top),
                xytext=(-4, -4),
                textcoords="offset points",
                ha="right",
                va="top",
                fontsize=7,
                color="gray",
            )
        ax.set_title(
            f"{summary['model_id']}: WER vs sparsity ({summary['num_utterances']} utts; "
            f"values above {top:.0f}% written at the edge)",
            fontsize=10,
        )
    else:
        ax.set_title(f"{summary['model_id']}: WER vs sparsity ({summary['num_utterances']} utts)")
    ax.set_xlabel("sparsity of pruned Linear layers (%)")
    ax.set_ylabel("WER (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="center left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def format_table(summary: dict) -> str:
    """Plain-text table: a row per method, a column per sparsity / pattern, cells WER %."""
    cols = sorted(
        dict.fromkeys((pt["pattern"], pt["target_sparsity"]) for pt in summary["points"]),
        key=lambda c: (c[0] != "unstructured", c[0], c[1]),
    )
    by = {(pt["method"], pt["pattern"], pt["target_sparsity"]): pt for pt in summary["points"]}
    rows = [["method"] + [f"{100 * s:.0f}%" if pat == "unstructured" else pat for pat, s in cols]]
    for m in dict.fromkeys(pt["method"] for pt in summary["points"]):
        cells = [by.get((m, pat, s)) for pat, s in cols]
        rows.append([m] + [f"{100 * pt['wer']:.1f}" if pt else "-" for pt in cells])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    dense = 100 * summary["dense"]["wer"]
    lines = [
        f"WER % on {summary['num_utterances']} utterances of {summary['model_id']}; "
        f"dense model: {dense:.2f}%"
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def load_summary(path: str | Path = "metrics/sweep.json") -> dict:
    return json.loads(Path(path).read_text())
