"""DVC stage: methods x sparsities from the cached Hessians -> metrics/sweep.{json,csv,png}."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's code
from whisper_obs_pruning.pipeline.cli import stage_main
from whisper_obs_pruning.pipeline.params import Params
from whisper_obs_pruning.pipeline.sweep import format_table, run_sweep


def main(params: Params, args) -> None:
    """Sweep every method over every sparsity (and N:M pattern) plus the dense baseline."""
    if args.grid == "frontier":  # the same sweep over the `frontier` section's grid
        params = params.model_copy(update={"sweep": params.frontier})
    summary = run_sweep(
        params, args.hessians, args.out, args.state, progress=not args.no_progress, name=args.grid
    )
    print(format_table(summary))


if __name__ == "__main__":
    stage_main(
        "sweep",
        main,
        lambda ap: (
            ap.add_argument("--hessians", default="artifacts/hessians"),
            ap.add_argument("--out", default="metrics"),
            ap.add_argument("--state", default="artifacts/sweep_state"),
            ap.add_argument("--grid", choices=("sweep", "frontier"), default="sweep"),
        ),
    )
