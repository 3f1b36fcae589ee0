"""``python -m whisper_obs_pruning.pipeline.report``: print the sweep table and where the results are."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .sweep import format_table, load_summary

# `dvc exp show` columns that make a readable table: WER per method and point, the prune knobs
EXP_SHOW_KEEP = r"Experiment|wer|.*\.wer$|prune\.(method|sparsity|pattern)"


def main(metrics_dir: str = "metrics") -> int:
    path = Path(metrics_dir) / "sweep.json"
    if not path.is_file():
        print(f"no sweep results at {path}; run `make run` (dvc repro) first", file=sys.stderr)
        return 1
    summary = load_summary(path)
    print()
    print(format_table(summary))
    eval_path = Path(metrics_dir) / "eval.json"
    if eval_path.is_file():
        ev = json.loads(eval_path.read_text())
        print(
            f"\nprune+evaluate stages ({ev['method']}, {ev['pattern']}, "
            f"target {100 * ev['target_sparsity']:.0f}%): WER {100 * ev['wer']:.2f}%, "
            f"CER {100 * ev['cer']:.2f}%, measured sparsity {100 * ev['sparsity']:.2f}%"
        )
    plots = [Path(metrics_dir) / f for f in ("sparsity_wer.png", "size_wer.png", "latency_wer.png")]
    print(f"\nplots:    {', '.join(str(f) for f in plots if f.is_file())}")
    print(f"table:    {Path(metrics_dir) / 'sweep.csv'} (and sweep.json)")
    print(
        "MLflow:   make ui  ->  http://127.0.0.1:5000 (experiment 'whisper-obs', sweep run "
        f"{summary.get('mlflow_run_id', '?')[:8]} with one nested run per point)"
    )
    print("DVC:      dvc metrics show; dvc plots show; dvc exp run -S prune.sparsity=0.6; then")
    print(f"          dvc exp show --drop '.*' --keep '{EXP_SHOW_KEEP}'")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
