"""The quality frontier: WER and CER per method x sparsity (and N:M), with the dense baseline.

Runs the library's own sweep (``pipeline.sweep.run_sweep``) with typed params built from the
defaults (``Params().updated(...)``), isolated from the main pipeline: the Hessian set, the sweep's checkpoint
(state) and its outputs live under ``--work-dir`` (default ``metrics/bench/quality/``) and MLflow
logs to ``sqlite:///<work-dir>/mlflow.db`` (``MLFLOW_TRACKING_URI`` is overridden for this
process, since it would otherwise win over the params). Finished points are checkpointed, so
an interrupted run resumes; ``--fresh`` starts over. Writes a JSON (``--out``), a two-panel
PNG (WER and CER against sparsity) and prints markdown tables.

Slow: every point is one full evaluation (about a minute for 160 clips on 2 CPU cores), plus
the prune (minutes for obs). Narrow it with ``--methods``, ``--sparsities``, ``--limit``.

    python bench/bench_quality.py                                   # everything, 160 clips
    python bench/bench_quality.py --limit 40 --sparsities 0.5 --methods magnitude,sparsegpt
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import _benchlib as bl


def _hessians_reusable(hdir: Path, p) -> bool:
    mpath = hdir / "manifest.json"
    if not mpath.is_file():
        return False
    try:
        m = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    cal = m.get("calibration", {})
    want = p.data.calibration
    return (
        m.get("model_id") == p.model.id
        and m.get("hessian") == "full"
        and m.get("exclude_padding", False) == p.calibrate.exclude_padding
        and cal.get("source") == want.source
        and cal.get("split") == want.split
        and cal.get("max_samples") == want.max_samples
    )


def plot(rows: list[dict], dense: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, key, label in ((axes[0], "wer", "WER (%)"), (axes[1], "cer", "CER (%)")):
        base = 100 * dense[key]
        ax.axhline(base, color="black", ls="--", lw=1, label=f"dense ({base:.1f}%)")
        for i, m in enumerate(methods):
            pts = sorted(
                (r for r in rows if r["method"] == m and r["pattern"] == "unstructured"),
                key=lambda r: r["sparsity"],
            )
            if pts:
                ax.plot(
                    [0] + [100 * r["sparsity"] for r in pts],
                    [base] + [max(100 * r[key], 0.1) for r in pts],
                    marker="o",
                    color=f"C{i}",
                    label=m,
                )
            for r in rows:
                if r["method"] == m and r["pattern"] != "unstructured":
                    ax.scatter(
                        100 * r["sparsity"],
                        max(100 * r[key], 0.1),
                        marker="s",
                        s=70,
                        facecolors="none",
                        edgecolors=f"C{i}",
                        label=f"{m} {r['pattern']}",
                    )
        ax.set_yscale("log")
        ax.set_xlabel("sparsity of the pruned Linear layers (%)")
        ax.set_ylabel(label + ", log scale")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    ap = bl.base_parser(__doc__.splitlines()[0], "quality")
    ap.add_argument("--model", default="bundled:tiny.en")
    ap.add_argument(
        "--methods", type=bl.csv_list(), default=None, help="default: every registered method"
    )
    ap.add_argument("--sparsities", type=bl.csv_list(float), default=[0.3, 0.5, 0.6, 0.7])
    ap.add_argument(
        "--patterns", type=bl.csv_list(), default=["2:4"], help="N:M patterns ('' for none)"
    )
    ap.add_argument("--limit", type=int, default=None, help="evaluation clips (default: all 160)")
    ap.add_argument(
        "--calib-clips", type=int, default=None, help="default: whole calibration split"
    )
    ap.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    ap.add_argument("--hessians", type=Path, default=None, help="reuse this Hessian set")
    ap.add_argument("--work-dir", type=Path, default=bl.BENCH_DIR / "quality")
    ap.add_argument("--plot", type=Path, default=None, help="PNG (default: --out with .png)")
    ap.add_argument("--fresh", action="store_true", help="drop the checkpoint; redo all points")
    args = ap.parse_args()
    device = bl.setup_torch(args)
    machine = bl.machine_info(device)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("whisper_obs_pruning.pipeline.sweep").setLevel(logging.INFO)

    from whisper_obs_pruning.methods import REGISTRY
    from whisper_obs_pruning.pipeline.calibrate import calibrate
    from whisper_obs_pruning.pipeline.params import Params
    from whisper_obs_pruning.pipeline.sweep import run_sweep

    if args.methods is None:
        args.methods = list(REGISTRY)

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    ignore = work / ".gitignore"  # the Hessian set (~180 MB for tiny.en) and stores stay local
    if not ignore.exists():
        ignore.write_text("hessians/\nstate/\nmlflow.db*\nmlartifacts/\n", encoding="utf-8")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri  # wins over params in tracking.tracking_uri

    p = Params().updated(
        {
            "model.id": args.model,
            "model.device": device,
            "data.evaluation.max_samples": args.limit,
            "data.calibration.max_samples": args.calib_clips,
            "calibrate.hessian": "full",
            "evaluate.batch_size": args.batch_size,
            "sweep.methods": args.methods,
            "sweep.sparsities": args.sparsities,
            "sweep.patterns": [x for x in args.patterns if x and x != "unstructured"],
            "mlflow.experiment": "whisper-obs-bench",
            "mlflow.tracking_uri": uri,
        }
    )
    patterns = list(p.sweep.patterns)

    hdir = args.hessians or work / "hessians"
    calib_info = {"reused": True, "dir": str(hdir)}
    if args.hessians is None and not _hessians_reusable(hdir, p):
        print(f"calibrating {args.model} -> {hdir} ...", flush=True)
        t0 = time.perf_counter()
        calib_info = {**calibrate(p, hdir, progress=False), "reused": False}
        calib_info["stage_seconds"] = round(time.perf_counter() - t0, 1)
        calib_info["dir"] = str(hdir)
    state_dir = work / "state"
    if args.fresh and state_dir.exists():
        shutil.rmtree(state_dir)

    n_points = len(args.methods) * (len(args.sparsities) + len(patterns))
    print(
        f"sweep: {n_points} points + dense on "
        f"{args.limit or 'all'} evaluation clips; MLflow -> {uri}",
        flush=True,
    )
    t0 = time.perf_counter()
    summary = run_sweep(p, hdir, work / "sweep", state_dir, progress=False)
    sweep_seconds = time.perf_counter() - t0

    dense = summary["dense"]
    rows = [
        {
            "method": pt["method"],
            "pattern": pt["pattern"],
            "target_sparsity": pt["target_sparsity"],
            "sparsity": pt["sparsity"],
            "wer": pt["wer"],
            "cer": pt["cer"],
            "wer_raw": pt.get("wer_raw"),
            "delta_wer": pt["wer"] - dense["wer"],
            "prune_seconds": pt.get("prune_seconds"),
            "transcribe_seconds": pt.get("transcribe_seconds"),
        }
        for pt in summary["points"]
    ]

    cols = [f"{s:.0%}" for s in args.sparsities] + patterns

    def cell(m: str, col: str, key: str) -> str:
        for r in rows:
            name = r["pattern"] if r["pattern"] != "unstructured" else f"{r['target_sparsity']:.0%}"
            if r["method"] == m and name == col:
                return f"{100 * r[key]:.2f}"
        return "-"

    n_utts = summary["num_utterances"]
    tables = {}
    for key in ("wer", "cer"):
        tables[key] = bl.table(
            ["method", *cols],
            [["dense", *[f"{100 * dense[key]:.2f}"] * len(cols)]]
            + [[m, *[cell(m, c, key) for c in cols]] for m in args.methods],
            markdown=True,
        )
    long = bl.table(
        ["method", "pattern", "sparsity", "WER %", "CER %", "dWER pp", "prune s", "eval s"],
        [
            [
                "dense",
                "-",
                f"{dense['sparsity']:.3f}",
                f"{100 * dense['wer']:.2f}",
                f"{100 * dense['cer']:.2f}",
                "0.00",
                "-",
                bl.fmt(dense.get("transcribe_seconds"), 1),
            ]
        ]
        + [
            [
                r["method"],
                r["pattern"],
                f"{r['sparsity']:.3f}",
                f"{100 * r['wer']:.2f}",
                f"{100 * r['cer']:.2f}",
                f"{100 * r['delta_wer']:+.2f}",
                bl.fmt(r["prune_seconds"], 1),
                bl.fmt(r["transcribe_seconds"], 1),
            ]
            for r in rows
        ],
        markdown=True,
    )
    print()
    print(
        f"**{args.model}**, {n_utts} evaluation clips, device {device}; load avg "
        f"{machine['loadavg_start'][:1]} -> {bl.loadavg()[:1]}; sweep {sweep_seconds:.0f} s\n"
    )
    print("WER % (dense row repeated in every column for reference)\n")
    print(tables["wer"])
    print("\nCER %\n")
    print(tables["cer"])
    print("\nAll points\n")
    print(long)

    png = args.plot or args.out.with_suffix(".png")
    plot(rows, dense, f"{args.model}: WER / CER vs sparsity ({n_utts} clips)", png)
    print(f"wrote {png}")
    bl.write_result(
        args.out,
        {
            "benchmark": "quality",
            "model": args.model,
            "num_utterances": n_utts,
            "methods": args.methods,
            "sparsities": args.sparsities,
            "patterns": patterns,
            "dense": dense,
            "points": rows,
            "sweep_seconds": round(sweep_seconds, 1),
            "calibration": calib_info,
            "mlflow_tracking_uri": uri,
            "mlflow_run_id": summary.get("mlflow_run_id"),
            "sweep_outputs": str(work / "sweep"),
            "plot": str(png),
            "markdown": {"wer": tables["wer"], "cer": tables["cer"], "all": long},
            "params": p.model_dump(),
        },
        machine,
    )


if __name__ == "__main__":
    main()
