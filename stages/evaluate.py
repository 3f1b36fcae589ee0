"""DVC stage: WER/CER of the pruned model on the evaluation split -> metrics/eval.json
(everything, with timings) and metrics/eval_scores.json (the scores DVC compares)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's code
from whisper_obs_pruning.atomic import write_json_atomic
from whisper_obs_pruning.pipeline.cli import stage_main
from whisper_obs_pruning.pipeline.common import check_tracking, log_stage
from whisper_obs_pruning.pipeline.evaluate import evaluate, scores_only
from whisper_obs_pruning.pipeline.params import Params
from whisper_obs_pruning.speech.scoring import write_rows_csv


def main(params: Params, args) -> None:
    """Transcribe the evaluation split with the pruned model and score it."""
    started = check_tracking(params)
    metrics, rows = evaluate(params, args.model, progress=not args.no_progress)
    write_rows_csv(args.utterances, rows)
    write_json_atomic(args.metrics, metrics)
    write_json_atomic(args.scores, scores_only(metrics))
    log_stage(params, "evaluate", metrics, [args.metrics, args.utterances], started)
    print(
        f"[evaluate] WER {100 * metrics['wer']:.2f}%  CER {100 * metrics['cer']:.2f}%  "
        f"sparsity {100 * metrics['sparsity']:.1f}% ({metrics['method']}, {metrics['pattern']})"
    )


if __name__ == "__main__":
    stage_main(
        "evaluate",
        main,
        lambda ap: (
            ap.add_argument("--model", default="artifacts/pruned"),
            ap.add_argument("--metrics", default="metrics/eval.json"),
            ap.add_argument("--utterances", default="metrics/eval_utterances.csv"),
            ap.add_argument("--scores", default="metrics/eval_scores.json"),
        ),
    )
