"""What one DVC stage per sweep point would cost on top of the in-process sweep (issue 11).

A ``matrix`` stage per point runs each point in its own process, so every point pays the
start-up the in-process sweep pays once: the interpreter and imports, the model load, the
sha256 check and load of the Hessian set, the evaluation audio decoded. This benchmark
measures those parts in a fresh subprocess each (``--rounds`` times, median), next to the
cost of a point itself read from the sweep's own timings (``metrics/sweep.json``:
``prune_seconds`` + ``transcribe_seconds``), and reports the overhead of N point stages.

    python bench/bench_point_overhead.py --rounds 3
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import _benchlib as bl

PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, "src")
from whisper_obs_pruning.pipeline.common import fingerprint, load_split, targets_for
from whisper_obs_pruning.pipeline.params import load_params
from whisper_obs_pruning.hessians.store import reusable_hessians
from whisper_obs_pruning.whisper.loading import load_whisper
import whisper_obs_pruning.pipeline.sweep  # noqa: F401  (what a point stage would import)
t1 = time.perf_counter()
p = load_params(sys.argv[1])
model, processor = load_whisper(p.model.id, device="cpu")
targets = targets_for(model, p)
t2 = time.perf_counter()
manifest, get_h = reusable_hessians(
    sys.argv[2], model, targets, fingerprint(model), p.calibrate.max_hessian_bytes
)
for name in targets:
    get_h(name)
t3 = time.perf_counter()
data = load_split(p.data.evaluation, "evaluation")
t4 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "load_model": t2 - t1, "load_hessians": t3 - t2,
                  "load_eval_audio": t4 - t3, "clips": len(data.utterances)}))
"""


def main() -> None:
    ap = bl.base_parser(__doc__.split("\n")[0], "point_overhead")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--hessians", default="artifacts/hessians")
    ap.add_argument("--sweep", default="metrics/sweep.json", help="a finished sweep's timings")
    args = ap.parse_args()
    machine = bl.machine_info("cpu")
    rounds = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", PROBE, args.params, args.hessians],
            cwd=bl.REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        parts = json.loads(out.stdout.strip().splitlines()[-1])
        parts["process_total"] = time.perf_counter() - t0
        rounds.append(parts)
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0] if k != "clips"}
    sweep = json.loads((bl.REPO / args.sweep).read_text())
    point_s = [p.get("prune_seconds", 0) + p.get("transcribe_seconds", 0) for p in sweep["points"]]
    n = len(point_s)
    result = {
        "rounds": rounds,
        "median_seconds": median,
        "points": n,
        "point_seconds_median": statistics.median(point_s),
        "points_seconds_total": sum(point_s),
        "matrix_overhead_seconds": n * median["process_total"],
        "matrix_overhead_ratio": n * median["process_total"] / sum(point_s),
        "loadavg": bl.loadavg(),
    }
    print(
        bl.table(
            ["part", "median s"],
            [(k, f"{v:.2f}") for k, v in median.items()],
        )
    )
    print(
        f"{n} points: {sum(point_s):.0f} s of work in the sweep; {n} point stages would add "
        f"{result['matrix_overhead_seconds']:.0f} s of start-up "
        f"({100 * result['matrix_overhead_ratio']:.1f}%)."
    )
    bl.write_result(args.out, result, machine)


if __name__ == "__main__":
    main()
