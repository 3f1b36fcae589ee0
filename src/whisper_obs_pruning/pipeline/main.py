"""``whisper-obs``: the command line. Subcommands share the stage bodies the DVC stages run.

    whisper-obs evaluate --model DIR_OR_HUB_ID --data FOLDER [--split S] [--limit N]
    whisper-obs calibrate|prune|sweep [--params params.yaml]
    whisper-obs export --model DIR --out DIR [--quantization int8]   (CTranslate2 / faster-whisper)
    whisper-obs shrink --out DIR [--encoder-ffn 0.5 --decoder-ffn 0.5 --method obs]  (structured)
    whisper-obs report [--metrics metrics]

Every user-facing failure prints one ``error:`` line and exits 2 (see ``cli.error_line``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys

from .cli import check_output_flags, error_line, exit_cleanly_on_sigterm, setup_logging


def _evaluate(args: argparse.Namespace) -> int:
    from ..atomic import write_json_atomic
    from ..speech.datasets import load_utterances
    from ..speech.scoring import evaluate_model, write_rows_csv
    from ..whisper.loading import load_whisper

    data = load_utterances(args.data, args.split, limit=args.limit)  # bad data fails first
    model, processor = load_whisper(args.model, device=args.device)
    if data.skipped:
        print(f"[evaluate] {data.summary()}", file=sys.stderr)
    metrics, rows = evaluate_model(
        model,
        processor,
        data.utterances,
        batch_size=args.batch_size,
        language=args.language,
        progress=not args.no_progress,
        backend=args.backend,
    )
    metrics["skipped_utterances"] = len(data.skipped)
    if args.out:
        write_json_atomic(args.out, {"model": args.model, "data": args.data, **metrics})
    if args.utterances:
        write_rows_csv(args.utterances, rows)
    print(
        f"WER {100 * metrics['wer']:.2f}%  CER {100 * metrics['cer']:.2f}%  on "
        f"{metrics['num_utterances']} utterances ({metrics['reference_words']} words) of "
        f"{args.data}; {len(data.skipped)} skipped"
    )
    if args.json:
        print(json.dumps(metrics))
    return 0


def _stage(args: argparse.Namespace) -> int:
    from .common import check_tracking, log_stage
    from .params import load_params

    p = load_params(args.params)
    started = check_tracking(p)
    progress = not args.no_progress
    if args.command == "calibrate":
        from ..atomic import write_json_atomic
        from .calibrate import calibrate

        metrics = calibrate(p, args.out or "artifacts/hessians", progress=progress)
        write_json_atomic("metrics/calibrate.json", metrics)
        log_stage(p, "calibrate", metrics, started=started)
        print(metrics)
    elif args.command == "prune":
        from .prune import prune

        out = args.out or "artifacts/pruned"
        summary = prune(p, args.hessians, out, progress=progress)
        log_stage(p, "prune", summary, [f"{out}/model"] if p.mlflow.log_model else [], started)
        print(summary)
    else:
        from .sweep import format_table, run_sweep

        summary = run_sweep(p, args.hessians, args.out or "metrics", args.state, progress=progress)
        print(format_table(summary))
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..whisper.ct2_export import export_ct2
    from ..whisper.loading import resolve_model_dir

    src = resolve_model_dir(args.model)  # a model dir, bundled:tiny.en, or a hub id
    out = export_ct2(src, args.out, args.quantization)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"CTranslate2 / faster-whisper model ({args.quantization}): {out} ({size / 1e6:.1f} MB)")
    return 0


def _shrink(args: argparse.Namespace) -> int:
    from ..structured import prune_ffn_model, save_structured
    from ..whisper.loading import load_whisper
    from ..whisper.model_card import model_card

    model, processor = load_whisper(args.model, device="cpu")
    n_before = sum(p.numel() for p in model.parameters())
    info = prune_ffn_model(
        model,
        args.encoder_ffn,
        args.decoder_ffn,
        None if args.method == "magnitude" else args.hessians,
        method=args.method,
        rel_damp=args.rel_damp,
    )
    n_after = sum(p.numel() for p in model.parameters())
    card = model_card(
        model_id=args.model,
        title=f"{args.model} with {args.method}-pruned FFN neurons",
        compression={
            "method": f"structured {args.method} (whole FFN neurons, OBS weight update)",
            "encoder FFN neurons removed": f"{100 * args.encoder_ffn:.0f}%",
            "decoder FFN neurons removed": f"{100 * args.decoder_ffn:.0f}%",
            "encoder_ffn_dim / decoder_ffn_dim": (
                f"{model.config.encoder_ffn_dim} / {model.config.decoder_ffn_dim}"
            ),
            "parameters": f"{n_before / 1e6:.1f}M -> {n_after / 1e6:.1f}M",
            "rel_damp": args.rel_damp,
        },
        calibration=None if args.method == "magnitude" else {"Hessian set": args.hessians},
        evaluation=None,
        command=shlex.join(["whisper-obs", *args.argv]),
        how=f"structured: whole FFN neurons removed ({args.method}), the layers made smaller.",
        tags=("structured", args.method),
    )
    out = save_structured(model, processor, args.out, card=card)
    print(
        f"{out}: {n_before / 1e6:.1f}M -> {n_after / 1e6:.1f}M parameters "
        f"(encoder_ffn_dim {model.config.encoder_ffn_dim}, decoder_ffn_dim "
        f"{model.config.decoder_ffn_dim}); loads with WhisperForConditionalGeneration."
        "from_pretrained"
    )
    if args.json:
        print(json.dumps({k: v for k, v in info.items() if isinstance(v, (int, float, str))}))
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import main as report_main

    return report_main(args.metrics)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="whisper-obs", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="WER/CER of any Whisper on any audio folder")
    ev.add_argument("--model", required=True, help="model dir, bundled:tiny.en, or a hub id")
    ev.add_argument("--data", required=True, help="folder with metadata.csv, embedded, hf:NAME")
    ev.add_argument("--split", default="evaluation")
    ev.add_argument("--limit", type=int, default=None, help="at most this many clips")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--language", default="en")
    ev.add_argument("--device", default="auto")
    ev.add_argument(
        "--backend",
        choices=("torch", "ct2"),
        default="torch",
        help="decoder: ours (torch) or CTranslate2 float32 (same tokens, CPU only)",
    )
    ev.add_argument("--out", help="write the metrics as JSON here")
    ev.add_argument("--utterances", help="write per-clip reference/hypothesis CSV here")
    ev.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    ev.set_defaults(func=_evaluate)
    for name, helptext in (
        ("calibrate", "Hessians on the calibration split (the calibrate stage)"),
        ("prune", "prune with prune.* from cached Hessians (the prune stage)"),
        ("sweep", "methods x sparsities from cached Hessians (the sweep stage)"),
    ):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--params", default="params.yaml")
        sp.add_argument("--hessians", default="artifacts/hessians")
        sp.add_argument("--out", default=None)
        if name == "sweep":
            sp.add_argument(
                "--state",
                default="artifacts/sweep_state",
                help="memo of finished points: a killed sweep resumes (default: %(default)s)",
            )
        sp.set_defaults(func=_stage)
    xp = sub.add_parser("export", help="convert to CTranslate2 / faster-whisper")
    xp.add_argument("--model", required=True, help="model dir (e.g. artifacts/pruned/model)")
    xp.add_argument("--out", required=True)
    xp.add_argument("--quantization", default="int8", help="float32 | int8 | int8_float32 | ...")
    xp.set_defaults(func=_export)
    sp = sub.add_parser("shrink", help="structured OBS: remove FFN neurons -> smaller dense model")
    sp.add_argument("--model", default="bundled:tiny.en")
    sp.add_argument("--hessians", default="artifacts/hessians", help="from `dvc repro calibrate`")
    sp.add_argument(
        "--encoder-ffn", type=float, default=0.5, help="fraction of FFN neurons removed"
    )
    sp.add_argument("--decoder-ffn", type=float, default=0.5)
    sp.add_argument("--method", default="obs", choices=("obs", "diagonal", "magnitude"))
    sp.add_argument("--rel-damp", type=float, default=0.01)
    sp.add_argument("--out", required=True)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_shrink)
    rp = sub.add_parser("report", help="print the sweep table and where the results are")
    rp.add_argument("--metrics", default="metrics")
    rp.set_defaults(func=_report)
    for sp in sub.choices.values():
        sp.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return ap


def main(argv: list[str] | None = None) -> int:
    from ..errors import WhisperObsError

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the model card's command
    exit_cleanly_on_sigterm()
    stage = args.command in ("calibrate", "prune", "sweep")  # long work: say what it does
    setup_logging("whisper-obs", logging.INFO if stage else logging.WARNING)
    try:
        if args.command != "report":  # the one command whose --metrics is an input
            check_output_flags(args)  # a read-only destination fails now, not after the work
        return args.func(args)
    except (WhisperObsError, OSError) as exc:
        print(error_line(f"whisper-obs {args.command}", exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("[whisper-obs] interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
