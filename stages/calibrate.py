"""DVC stage: accumulate per-layer Hessians on the calibration split -> artifacts/hessians/."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's code
from whisper_obs_pruning.atomic import write_json_atomic
from whisper_obs_pruning.pipeline.calibrate import calibrate
from whisper_obs_pruning.pipeline.cli import stage_main
from whisper_obs_pruning.pipeline.common import check_tracking, log_stage
from whisper_obs_pruning.pipeline.params import Params


def main(params: Params, args) -> None:
    """Calibrate: teacher-forced passes over the calibration audio, one Hessian per Linear input."""
    started = check_tracking(params)  # an unusable MLflow store fails now, not after the work
    metrics = calibrate(params, args.out, progress=not args.no_progress)
    write_json_atomic(args.metrics, metrics)
    log_stage(params, "calibrate", metrics, [args.metrics, f"{args.out}/manifest.json"], started)
    print(f"[calibrate] {metrics}")


if __name__ == "__main__":
    stage_main(
        "calibrate",
        main,
        lambda ap: (
            ap.add_argument("--out", default="artifacts/hessians"),
            ap.add_argument("--metrics", default="metrics/calibrate.json"),
        ),
    )
