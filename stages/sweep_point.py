"""DVC stage (a `matrix` entry): one sweep point -> artifacts/points/<grid>/<point>/.

DVC runs one of these per method x sparsity (or N:M pattern) x quantization, and the dense
baseline, so its run cache decides which points are recomputed: an experiment that only adds
a sparsity runs only the new points. `stages/sweep.py` gathers them.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's code
from whisper_obs_pruning.pipeline.cli import stage_main
from whisper_obs_pruning.pipeline.params import Params, ParamsError, parse_params
from whisper_obs_pruning.pipeline.point import grid_point, point_key, run_point


def main(params: Params, args) -> None:
    """Prune (and quantize) the dense model for one point of the grid and score it."""
    grid = params.frontier if args.grid == "frontier" else params.sweep
    try:  # the point is validated like the grid's own entries (method, sparsity, scheme)
        parse_params(
            {
                "sweep": {
                    "methods": [args.method] if args.method != "dense" else grid.methods,
                    "sparsities": [args.sparsity] if args.sparsity is not None else [],
                    "patterns": [args.pattern] if args.pattern else [],
                    "quant": [args.quant],
                }
            }
        )
    except ParamsError as exc:
        raise ParamsError(f"the point given on the command line: {exc}") from None
    params = params.model_copy(update={"sweep": grid})
    point = grid_point(args.method, args.quant, args.sparsity, args.pattern)
    result = run_point(params, args.hessians, point, args.out, progress=not args.no_progress)
    print(f"[sweep-point] {point_key(point)}: WER {100 * result['wer']:.2f}%")


if __name__ == "__main__":
    stage_main(
        "sweep-point",
        main,
        lambda ap: (
            ap.add_argument("--grid", choices=("sweep", "frontier"), default="sweep"),
            ap.add_argument("--method", required=True),
            ap.add_argument("--sparsity", type=float, default=None),
            ap.add_argument("--pattern", default=None),
            ap.add_argument("--quant", default="none"),
            ap.add_argument("--hessians", default="artifacts/hessians"),
            ap.add_argument("--out", required=True),
        ),
    )
