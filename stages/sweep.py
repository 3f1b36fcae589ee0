"""DVC stage: gather the sweep's points -> metrics/sweep.{json,csv}, the plots, the MLflow runs."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's code
from whisper_obs_pruning.pipeline.cli import stage_main
from whisper_obs_pruning.pipeline.common import check_tracking
from whisper_obs_pruning.pipeline.params import Params
from whisper_obs_pruning.pipeline.sweep import aggregate_sweep, format_table


def main(params: Params, args) -> None:
    """Every method over every sparsity (and N:M pattern) plus the dense baseline, as computed
    by the sweep-point / sweep-nm / sweep-dense stages."""
    if args.grid == "frontier":  # the same sweep over the `frontier` section's grid
        params = params.model_copy(update={"sweep": params.frontier})
    check_tracking(params)
    summary = aggregate_sweep(params, args.points, args.out, name=args.grid)
    print(format_table(summary))


if __name__ == "__main__":
    stage_main(
        "sweep",
        main,
        lambda ap: (
            ap.add_argument("--points", default="artifacts/points/sweep"),
            ap.add_argument("--out", default="metrics"),
            ap.add_argument("--grid", choices=("sweep", "frontier"), default="sweep"),
        ),
    )
