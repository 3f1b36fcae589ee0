"""Run every benchmark in sequence with modest defaults (``make bench``).

Each benchmark runs in its own process (so one's memory or threads cannot skew the next),
writes its JSON under ``metrics/bench/`` and prints its table; this runner adds
``metrics/bench/run_all.json`` with each command, exit status and duration. A failing
benchmark does not stop the others; the runner exits non-zero if any failed.

    python bench/run_all.py                      # all, CPU
    python bench/run_all.py --device cuda        # all, on the GPU
    python bench/run_all.py --only prune,scaling
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = REPO / "metrics" / "bench"

# name -> (script, modest default arguments)
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "calibration": ("bench_calibration.py", []),
    "memory": ("bench_memory.py", []),
    # exact OBS takes ~15+ min per pattern on tiny.en on 2 busy cores: cap it, extrapolate the rest
    "prune": ("bench_prune.py", ["--budget-seconds", "300"]),
    "sweep_economics": ("bench_sweep_economics.py", []),
    "scaling": ("bench_scaling.py", []),
    "quality": (
        "bench_quality.py",
        ["--limit", "40", "--sparsities", "0.5", "--methods", "magnitude,diagonal,sparsegpt"],
    ),
    # Owned by someone else; called as it is (it writes metrics/bench/transcribe.json).
    "transcribe": ("bench_transcribe.py", ["--repeats", "1"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    ap.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    ap.add_argument(
        "--full-quality",
        action="store_true",
        help="run bench_quality with its full defaults (all methods, 4 sparsities, 160 clips)",
    )
    ap.add_argument("--model", default=None, help="pass --model to the model benchmarks")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args()

    only = [x for x in args.only.split(",") if x]
    skip = {x for x in args.skip.split(",") if x}
    for name in [*only, *skip]:
        if name not in BENCHMARKS:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    names = [n for n in (only or BENCHMARKS) if n not in skip]

    OUT.mkdir(parents=True, exist_ok=True)
    summary = {"command": " ".join([sys.executable, *sys.argv]), "runs": []}
    failed = []
    for name in names:
        script, extra = BENCHMARKS[name]
        if name == "quality" and args.full_quality:
            extra = []
        cmd = [sys.executable, str(HERE / script), "--device", args.device, *extra]
        if args.model and name not in ("scaling", "memory"):
            cmd += ["--model", args.model]
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        dt = time.perf_counter() - t0
        print(f"=== {name}: exit {rc} after {dt:.0f} s", flush=True)
        summary["runs"].append(
            {"name": name, "command": cmd, "returncode": rc, "seconds": round(dt, 1)}
        )
        if rc != 0:
            failed.append(name)
    if args.dry_run:
        return
    (OUT / "run_all.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(
        "\n"
        + "\n".join(
            f"{r['name']:<16} exit {r['returncode']}  {r['seconds']:>7.0f} s"
            for r in summary["runs"]
        )
    )
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
