"""DVC stage: prune the model from cached Hessians -> artifacts/pruned/ (HF dir, masks, report)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's code
from whisper_obs_pruning.pipeline.cli import stage_main
from whisper_obs_pruning.pipeline.common import check_tracking, log_stage
from whisper_obs_pruning.pipeline.params import Params
from whisper_obs_pruning.pipeline.prune import prune


def main(params: Params, args) -> None:
    """Prune with prune.method / sparsity / pattern from the cached Hessians."""
    started = check_tracking(params)
    summary = prune(params, args.hessians, args.out, progress=not args.no_progress)
    model = [f"{args.out}/model"] if params.mlflow.log_model else []  # the chosen point's model
    log_stage(params, "prune", summary, [f"{args.out}/report.json", *model], started)
    print(f"[prune] {summary}")


if __name__ == "__main__":
    stage_main(
        "prune",
        main,
        lambda ap: (
            ap.add_argument("--hessians", default="artifacts/hessians"),
            ap.add_argument("--out", default="artifacts/pruned"),
        ),
    )
