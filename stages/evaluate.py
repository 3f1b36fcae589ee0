"""DVC stage: WER/CER of the pruned model on the evaluation split -> metrics/eval.json."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's code
from whisper_obs_pruning.cli import stage_main
from whisper_obs_pruning.pipeline import evaluate, log_stage, save_metrics, write_rows_csv


def main(params: dict, args) -> None:
    """Transcribe the evaluation split with the pruned model and score it."""
    metrics, rows = evaluate(params, args.model, progress=not args.no_progress)
    write_rows_csv(args.utterances, rows)
    save_metrics(args.metrics, metrics)
    log_stage(params, "evaluate", metrics, [args.metrics, args.utterances])
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
        ),
    )
