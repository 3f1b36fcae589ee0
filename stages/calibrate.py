"""DVC stage: accumulate per-layer Hessians on the calibration split -> artifacts/hessians/."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's code
from whisper_obs_pruning.cli import stage_main
from whisper_obs_pruning.pipeline import calibrate, log_stage, save_metrics


def main(params: dict, args) -> None:
    """Calibrate: teacher-forced passes over the calibration audio, one Hessian per Linear input."""
    metrics = calibrate(params, args.out, progress=not args.no_progress)
    save_metrics(args.metrics, metrics)
    log_stage(params, "calibrate", metrics, [args.metrics, f"{args.out}/manifest.json"])
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
