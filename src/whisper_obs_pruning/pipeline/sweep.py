"""Methods x sparsities from one cached calibration: the sparsity-versus-WER comparison.

Two ways to run the grid over the same point code (``point.py``): the DVC pipeline computes
each point in a stage of its own and :func:`aggregate_sweep` gathers them (tables, plots, one
MLflow parent run with a nested run per point); :func:`run_sweep` (``whisper-obs sweep``, the
benchmarks) runs them in one process, with a memo of finished points (``state_dir``) so an
interrupted sweep resumes where it stopped and re-uses its MLflow parent run.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import logging
import tempfile
import urllib.parse
from pathlib import Path

from ..atomic import write_json_atomic, write_text_atomic
from ..hessians.store import ArtifactError
from ..speech.scoring import write_rows_csv
from . import tracking
from .common import fingerprint
from .params import Params, flatten
from .plots import plot_latency, plot_size, plot_sparsity
from .point import DENSE, PointContext, point_key, read_points, sweep_points

log = logging.getLogger(__name__)

CSV_FIELDS = (
    "method",
    "pattern",
    "target_sparsity",
    "quant",
    "sparsity",
    "wer",
    "cer",
    "model_bytes",
    "bits_per_weight",
)


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
        "extra_data": [x.model_dump() for x in p.data.extra_evaluation]
        if p.sweep.extra_splits
        else [],
        "evaluate": p.evaluate.model_dump(),
        "prune": p.prune.model_dump(exclude={"method", "sparsity", "pattern"}),
        "quant": p.quant.model_dump(),
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


def _save_state(state_dir: Path, state: dict) -> None:
    """Write the checkpoint, keeping the points another process saved meanwhile (queued DVC
    experiments share it): a file lock orders the read-merge-write of ``state.json``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "state.json"
    with open(state_dir / "state.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            disk = json.loads(path.read_text()) if path.is_file() else None
        except json.JSONDecodeError:
            disk = None
        if isinstance(disk, dict) and disk.get("config_key") == state["config_key"]:
            state["points"] = {**disk.get("points", {}), **state["points"]}
        write_json_atomic(path, state)


def run_sweep(
    p: Params,
    hessian_dir: str | Path,
    out_dir: str | Path = "metrics",
    state_dir: str | Path = "artifacts/sweep_state",
    *,
    progress: bool = True,
    name: str = "sweep",
) -> dict:
    """Run (or resume) the sweep; write sweep.json / sweep.csv / sparsity_wer.png; log MLflow.

    ``state_dir`` is a memo of finished points, keyed by everything a point's result depends on
    (:func:`_config_key`: params, Hessians, decoded evaluation data, model, code). A relative
    path is taken from the user's repository (:func:`tracking.project_root`), also from inside
    a queued DVC experiment's temporary copy, so an experiment that adds sparsities computes
    only the new points. (The DVC pipeline does not use it: there every point is a stage and
    DVC's run cache does this job; see :func:`aggregate_sweep`.)
    """
    out_dir, state_dir = Path(out_dir), Path(state_dir)
    if not state_dir.is_absolute():
        state_dir = tracking.project_root() / state_dir
    ctx = PointContext.open(p, hessian_dir)
    data = ctx.data
    state = _load_state(
        state_dir,
        _config_key(
            p,
            ctx.manifest,
            [u for d in (data, *ctx.extras.values()) for u in d.utterances],
            fingerprint(ctx.model),
        ),
    )
    points = sweep_points(p)

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
        else {"run_name": name, "tags": {"stage": name, **tracking.provenance()}}
    )
    with mlflow.start_run(**run_kwargs) as parent:
        if not state["parent_run_id"]:
            _log_sweep_params(mlflow, p, len(data.utterances))
            state["parent_run_id"] = parent.info.run_id
            _save_state(state_dir, state)
        logged = _finished_points(mlflow, state["parent_run_id"])
        if state["dense"] is None:
            state["dense"], transcripts = ctx.dense(progress)
            _save_state(state_dir, state)
        else:
            transcripts = None
        if "dense" not in logged:
            _log_point(mlflow, state["dense"], "dense", transcripts)
        for i, point in enumerate(points):
            key = point_key(point)
            if key in state["points"]:
                log.info("sweep: %s already done, skipping", key)
                if key not in logged:  # killed between the checkpoint and the MLflow run
                    _log_point(mlflow, state["points"][key], key)
                continue
            log.info("sweep point %d/%d: %s", i + 1, len(points), key)
            state["points"][key], transcripts = ctx.compute(point, progress)
            _save_state(state_dir, state)
            _log_point(mlflow, state["points"][key], key, transcripts)
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
    ctx.restore()
    return summary


def aggregate_sweep(
    p: Params, points_dir: str | Path, out_dir: str | Path = "metrics", *, name: str = "sweep"
) -> dict:
    """The DVC pipeline's sweep: gather the points its ``matrix`` stages computed (one folder
    each under ``points_dir``), write sweep.json / sweep.csv / the plots, and log one MLflow
    parent run with a nested run per point. Computes nothing: DVC's run cache decides which
    points ran, so a queued experiment recomputes only the points its params change."""
    found = read_points(points_dir)
    wanted = [DENSE, *sweep_points(p)]
    missing = [point_key(pt) for pt in wanted if point_key(pt) not in found]
    if missing:
        raise ArtifactError(
            f"{points_dir}: no result for {', '.join(missing)}; run `dvc repro` (the points are "
            "the stages named sweep-point@..., sweep-nm@..., sweep-dense@...)"
        )
    docs = {point_key(pt): found[point_key(pt)] for pt in wanted}
    dense_doc = docs[point_key(DENSE)][0]
    summary = {
        "model_id": dense_doc["model_id"],
        "num_utterances": dense_doc["result"]["num_utterances"],
        "skipped_utterances": dense_doc["skipped_utterances"],
        "dense": dense_doc["result"],
        "points": [docs[point_key(pt)][0]["result"] for pt in wanted[1:]],
    }
    out_dir = Path(out_dir)
    with tracking.run(
        p.mlflow.experiment,
        name,
        tags={"stage": name, **tracking.provenance()},
        configured_uri=p.mlflow.tracking_uri,
    ) as mlflow:
        _log_sweep_params(mlflow, p, summary["num_utterances"])
        summary["mlflow_run_id"] = mlflow.active_run().info.run_id
        for key, (doc, folder) in docs.items():
            label = "dense" if key == point_key(DENSE) else key
            _log_point(mlflow, doc["result"], label, files=sorted(folder.glob("utterances_*.csv")))
        write_outputs(summary, out_dir)
        _log_parent(mlflow, summary, out_dir)
    return summary


def _log_sweep_params(mlflow, p: Params, num_eval_utterances: int) -> None:
    """The parent run's params: what every point of the sweep shares."""
    mlflow.log_params(flatten(p.model_dump(include={"seed", "model", "sweep", "evaluate"})))
    mlflow.log_params(flatten({"prune": p.prune.method_kwargs()}))
    mlflow.log_param("num_eval_utterances", num_eval_utterances)


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


def _log_point(
    mlflow, result: dict, key: str, transcripts: dict | None = None, files: list[Path] = ()
) -> None:
    """A nested run per point: its params, scores, timings and per-clip transcripts (rows
    in memory, or the CSV ``files`` a point stage wrote)."""
    step = round(100 * result["target_sparsity"])
    with mlflow.start_run(run_name=key, nested=True, tags={"stage": "sweep-point", "point": key}):
        mlflow.log_params(
            {k: result.get(k, "none") for k in ("method", "pattern", "target_sparsity", "quant")}
        )
        keys = (
            *("wer", "cer", "sparsity", "wer_raw", "model_bytes", "bits_per_weight"),
            *("params_millions", "speedup", "latency_seconds_per_clip"),
        )
        split_keys = [k for k in result if k.startswith(("wer_", "cer_")) and k != "wer_raw"]
        mlflow.log_metrics(
            {k: float(result[k]) for k in (*keys, *split_keys) if result.get(k) is not None},
            step=step,
        )
        for split, rows in (transcripts or {}).items():
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"utterances_{split}.csv"
                write_rows_csv(path, rows)
                mlflow.log_artifact(str(path))
        for f in files:
            mlflow.log_artifact(str(f))
        for k in ("prune_seconds", "quant_seconds"):
            if k in result:
                mlflow.log_metric(k, result[k], step=step)


def _curve_metric(pt: dict) -> str | None:
    """The parent run's metric a point belongs to: one per method, ``_nm`` for N:M patterns
    (whose step is the pattern's sparsity); None for a quantized dense point (its own run)."""
    if pt["method"] == "dense":
        return None
    label = _row_label(pt).replace("+", "_")  # MLflow metric names: no '+'
    return f"wer_{label}" + ("" if pt["pattern"] == "unstructured" else "_nm")


def curve_metric_names(summary: dict) -> list[str]:
    """The parent run's curve metrics, in point order."""
    names = [_curve_metric(pt) for pt in summary["points"]]
    return [n for i, n in enumerate(names) if n is not None and n not in names[:i]]


def overlay_chart_route(run_id: str, experiment_id: str, metrics: list[str]) -> str:
    """The MLflow UI route (after ``#``) that draws every curve metric of one run in one chart,
    against the step (the target sparsity in %)."""
    q = urllib.parse.quote
    query = {
        "runs": json.dumps([run_id]),
        "metric": q(json.dumps(metrics[0])),
        "experiments": json.dumps([experiment_id]),
        "plot_metric_keys": q(json.dumps(metrics)),
        "plot_layout": "{}",
        "x_axis": "step",
        "y_axis_scale": "linear",
        "line_smoothness": "1",
        "show_point": "true",
        "deselected_curves": "[]",
        "last_linear_y_axis_range": "[]",
    }
    return "/metric?" + "&".join(f"{k}={v}" for k, v in query.items())


def _log_parent(mlflow, summary: dict, out_dir: Path) -> None:
    dense = summary["dense"]
    mlflow.log_metric("wer_dense", dense["wer"])
    names = curve_metric_names(summary)
    for name in names:  # every curve starts at the dense model, step 0
        mlflow.log_metric(name, dense["wer"], step=0)
    for pt in summary["points"]:
        if name := _curve_metric(pt):
            mlflow.log_metric(name, pt["wer"], step=round(100 * pt["target_sparsity"]))
    if names:
        run = mlflow.active_run()
        route = overlay_chart_route(run.info.run_id, run.info.experiment_id, names)
        mlflow.set_tag("overlay_chart", route)
        mlflow.set_tag(
            "mlflow.note.content",  # the run's description, shown on its page
            f"WER against sparsity, every method in one chart: [open the chart](#{route}) "
            "(x: target sparsity %, step 0 = the dense model).",
        )
    for f in ("sweep.json", "sweep.csv", "sweep_wer.json", "sparsity_wer.png", "size_wer.png",
              "latency_wer.png"):  # fmt: skip
        if (out_dir / f).is_file():
            mlflow.log_artifact(str(out_dir / f))


# ------------------------------------------------------------------ outputs
def write_outputs(summary: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "sweep.json", summary)
    buf = io.StringIO()
    split_fields = [
        k
        for k in summary["dense"]
        if k.startswith(("wer_", "cer_")) and k != "wer_raw" and not k.startswith("wer_dense")
    ]
    fields = [*CSV_FIELDS, *(k for k in split_fields if not k.startswith("num_"))]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerow(summary["dense"])
    for pt in summary["points"]:
        w.writerow(pt)
    write_text_atomic(out_dir / "sweep.csv", buf.getvalue())
    write_json_atomic(out_dir / "sweep_wer.json", wer_by_method(summary))
    write_text_atomic(out_dir / "sweep_curves.csv", curves_csv(summary))
    unquantized = [pt for pt in summary["points"] if pt.get("quant", "none") == "none"]
    plot_sparsity(
        {**summary, "points": [pt for pt in unquantized if pt["method"] != "dense"]},
        out_dir / "sparsity_wer.png",
    )
    plot_size(summary, out_dir / "size_wer.png")
    plot_latency(summary, out_dir / "latency_wer.png")  # grids with latency_clips > 0


def _scores(pt: dict) -> dict:
    """WER/CER of a point on every split, rounded: the numbers DVC compares, nothing else."""
    keys = [k for k in pt if k.startswith(("wer", "cer")) and k != "wer_raw"]
    return {k: round(float(pt[k]), 6) for k in keys if pt[k] is not None}


def _column(pt: dict) -> str:
    """``50`` for 50% unstructured, the pattern (``2:4``) otherwise."""
    if pt["pattern"] == "unstructured":
        return f"{100 * pt['target_sparsity']:g}"
    return pt["pattern"]


def wer_by_method(summary: dict) -> dict:
    """``{"dense": {...}, "obs": {"50": {"wer", "cer", ...}, "2:4": {...}}, ...}``: the sweep's
    scores as nested scalars, so ``dvc metrics show`` / ``dvc exp show`` give a column per
    method and point (``sweep_wer.json:obs.50.wer``) and ``dvc metrics diff`` compares
    scores only (timings and counters stay in sweep.json, which is not a metric)."""
    out: dict = {"dense": _scores(summary["dense"])}
    for pt in summary["points"]:
        out.setdefault(_row_label(pt), {})[_column(pt)] = _scores(pt)
    return out


def curves_csv(summary: dict) -> str:
    """WER per method (one column each) against target sparsity, unstructured and unquantized
    points only, every curve starting at the dense model: the file DVC's plot colours by
    column, i.e. by method (2:4 would sit on 50% and is in sweep_wer.json instead)."""
    points = [
        pt
        for pt in summary["points"]
        if pt["pattern"] == "unstructured" and pt.get("quant", "none") == "none"
    ]
    methods = list(dict.fromkeys(pt["method"] for pt in points if pt["method"] != "dense"))
    rows = {0.0: dict.fromkeys(methods, summary["dense"]["wer"])}
    for pt in points:
        if pt["method"] in methods:
            rows.setdefault(pt["target_sparsity"], {})[pt["method"]] = pt["wer"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["target_sparsity", *methods])
    for s in sorted(rows):
        w.writerow([s, *(f"{rows[s][m]:.6f}" if m in rows[s] else "" for m in methods)])
    return buf.getvalue()


def _row_label(pt: dict) -> str:
    """``obs``, or ``obs+int4-g128`` for a quantized point (``dense+int8`` for dense)."""
    quant = pt.get("quant", "none")
    return pt["method"] if quant == "none" else f"{pt['method']}+{quant}"


def _grid_lines(summary: dict, key: str, header: str) -> list[str]:
    """A row per method (and quantization), a column per sparsity / pattern, cells ``key`` %."""
    points = [pt for pt in summary["points"] if pt["method"] != "dense"]
    cols = sorted(
        dict.fromkeys((pt["pattern"], pt["target_sparsity"]) for pt in points),
        key=lambda c: (c[0] != "unstructured", c[0], c[1]),
    )
    by = {(_row_label(pt), pt["pattern"], pt["target_sparsity"]): pt for pt in points}
    rows = [["method"] + [f"{100 * s:.0f}%" if pat == "unstructured" else pat for pat, s in cols]]
    for m in dict.fromkeys(_row_label(pt) for pt in points):
        cells = [by.get((m, pat, s)) for pat, s in cols]
        rows.append([m] + [f"{100 * pt[key]:.1f}" if pt and key in pt else "-" for pt in cells])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [header] + ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]


def extra_splits(summary: dict) -> list[str]:
    """Names of the extra evaluation splits a sweep scored (``wer_<name>`` on the dense point)."""
    return [
        k.removeprefix("num_utterances_")
        for k in summary["dense"]
        if k.startswith("num_utterances_")
    ]


def format_table(summary: dict) -> str:
    """Plain-text tables of WER %: the evaluation split, then each extra split."""
    d = summary["dense"]
    lines = _grid_lines(
        summary,
        "wer",
        f"WER % on {summary['num_utterances']} utterances of {summary['model_id']}; "
        f"dense model: {100 * d['wer']:.2f}%",
    )
    for name in extra_splits(summary):
        lines += [""] + _grid_lines(
            summary,
            f"wer_{name}",
            f"WER % on split '{name}' ({d[f'num_utterances_{name}']} utterances); "
            f"dense model: {100 * d[f'wer_{name}']:.2f}%",
        )
    if any(pt.get("quant", "none") != "none" for pt in summary["points"]):
        lines += ["", *size_lines(summary)]
    return "\n".join(lines)


def size_lines(summary: dict) -> list[str]:
    """Checkpoint MB, WER on every split, and the measured speed-up over dense PyTorch (side
    by side, one thread; ``-`` where the grid measured none), a row per point."""
    d = summary["dense"]
    splits = extra_splits(summary)
    head = f"{'point':>28}  {'WER %':>6}" + "".join(f"  {'WER ' + n:>8}" for n in splits)
    lines = [
        "checkpoint size (weights file; CTranslate2: model.bin), WER, CPU speed-up vs dense "
        "PyTorch:",
        head + f"  {'MB':>6}  {'bits/w':>6}  {'speedup':>7}",
    ]
    for pt in [d, *summary["points"]]:
        if not pt.get("model_bytes"):
            continue
        label = "dense fp32" if pt is d else f"{_row_label(pt)} {pt['pattern']}"
        if pt is not d and pt["pattern"] == "unstructured":
            label = f"{_row_label(pt)} {100 * pt['target_sparsity']:.0f}%"
        extra = "".join(
            f"  {100 * pt[f'wer_{n}']:8.2f}" if f"wer_{n}" in pt else f"  {'-':>8}" for n in splits
        )
        speed = f"{pt['speedup']:6.2f}x" if "speedup" in pt else f"{'-':>7}"
        lines.append(
            f"{label:>28}  {100 * pt['wer']:6.2f}{extra}  {pt['model_bytes'] / 1e6:6.1f}  "
            f"{pt['bits_per_weight']:6.2f}  {speed}"
        )
    return lines


def load_summary(path: str | Path = "metrics/sweep.json") -> dict:
    return json.loads(Path(path).read_text())
