"""What a methods x sparsities sweep costs with cached Hessians vs recalibrating per point,
and how fast evaluation is (batched, unbatched, plain HF ``generate``).

Measured in this run (the parts):
- ``calibrate``: the calibrate stage, ``pipeline.calibrate.calibrate`` (load model and data, Hessians of
  every Linear over the calibration split, save the verified Hessian set);
- ``load_hessians``: ``hessians.store.reusable_hessians`` (every H sha256-verified and loaded once);
- ``prune[m]``: ``prune_layers`` of every target layer at 50% for each method m of the grid;
- ``evaluate``: WER of one pruned point (sparsegpt at 50%; the first method when sparsegpt
  is not in the grid) on the evaluation clips, as the sweep does it (``evaluate_on``,
  ``evaluate.batch_size``), and of the dense model.

The sweep totals are then *computed from those measured parts* (not measured end to end):

- cached (what ``sweep.run_sweep`` does): calibrate + load_hessians + dense eval
  + sum over points (prune[m] + evaluate);
- recalibrating per point: dense eval + sum over points (calibrate + load_hessians
  + prune[m] + evaluate).

Evaluation throughput is measured side by side on the same clips with the dense model:
``evaluate_model`` at batch 16 and at batch 1, and plain HF ``model.generate`` (greedy, batch
16, no per-clip token cap) as the floor to compare against; the rounds are interleaved.

    python bench/bench_sweep_economics.py --throughput-clips 32
"""

from __future__ import annotations

import shutil
import tempfile
import time

import _benchlib as bl


def hf_generate_texts(model, processor, audios, prompt, batch_size: int) -> list[str]:
    """Plain ``model.generate`` (greedy), the prompt forced as decoder_input_ids."""
    tokens = bl.hf_generate_tokens(model, processor, audios, prompt, batch_size)
    return [t.strip() for t in processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)]


def main() -> None:
    ap = bl.base_parser(__doc__.splitlines()[0], "sweep_economics")
    ap.add_argument("--model", default="bundled:tiny.en")
    ap.add_argument(
        "--calib-clips", type=int, default=None, help="calibration clips (default: whole split)"
    )
    ap.add_argument(
        "--eval-clips", type=int, default=None, help="evaluation clips per point (default: all)"
    )
    ap.add_argument(
        "--methods",
        type=bl.csv_list(),
        default=None,
        help="methods whose prune time is measured (default: Params().sweep.methods)",
    )
    ap.add_argument(
        "--grid-sparsities",
        type=bl.csv_list(float),
        default=None,
        help="sparsities of the sweep being costed (default: Params().sweep.sparsities)",
    )
    ap.add_argument(
        "--grid-patterns",
        type=bl.csv_list(),
        default=None,
        help="N:M patterns of the sweep being costed (default: Params().sweep.patterns)",
    )
    ap.add_argument("--throughput-clips", type=int, default=32)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved throughput rounds")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF generate baseline")
    args = ap.parse_args()
    device = bl.setup_torch(args)
    machine = bl.machine_info(device)

    from whisper_obs_pruning.hessians.store import reusable_hessians
    from whisper_obs_pruning.pipeline.calibrate import calibrate
    from whisper_obs_pruning.pipeline.common import fingerprint, load_split, targets_for
    from whisper_obs_pruning.pipeline.evaluate import evaluate_on
    from whisper_obs_pruning.pipeline.params import Params
    from whisper_obs_pruning.pruning import prune_layers
    from whisper_obs_pruning.speech.datasets import load_utterances
    from whisper_obs_pruning.speech.scoring import evaluate_model, score
    from whisper_obs_pruning.whisper.loading import load_whisper
    from whisper_obs_pruning.whisper.prompt import decoder_prompt_ids

    changes: dict[str, object] = {
        "model.id": args.model,
        "model.device": device,
        "data.calibration.max_samples": args.calib_clips,
        "data.evaluation.max_samples": args.eval_clips,
    }
    if args.methods:
        changes["sweep.methods"] = args.methods
    if args.grid_sparsities:
        changes["sweep.sparsities"] = args.grid_sparsities
    if args.grid_patterns is not None:
        changes["sweep.patterns"] = [x for x in args.grid_patterns if x and x != "unstructured"]
    p = Params().updated(changes)
    methods = list(p.sweep.methods)
    parts: dict[str, float] = {}

    tmp = tempfile.mkdtemp(prefix="whisper-obs-bench-hessians-")
    try:
        print(f"{args.model} on {device}: measuring the parts of a sweep", flush=True)
        t0 = time.perf_counter()
        model, processor = load_whisper(args.model, device=device)
        parts["model_load"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        cal = calibrate(p, tmp, progress=False)
        parts["calibrate"] = time.perf_counter() - t0
        print(
            f"  calibrate stage: {parts['calibrate']:.1f} s ({cal['utterances']} clips; "
            f"calibration pass alone {cal['seconds']:.1f} s)",
            flush=True,
        )

        targets = targets_for(model, p)
        t0 = time.perf_counter()
        _, get_hessian = reusable_hessians(
            tmp, model, targets, fingerprint(model), p.calibrate.max_hessian_bytes
        )
        parts["load_hessians"] = time.perf_counter() - t0
        print(f"  load Hessians: {parts['load_hessians']:.1f} s", flush=True)

        modules = dict(model.named_modules())
        dense = {n: modules[n].weight.data.clone() for n in targets}
        eval_utts = load_split(p.data.evaluation, "evaluation").utterances

        def restore() -> None:
            for n in targets:
                modules[n].weight.data.copy_(dense[n])

        t0 = time.perf_counter()
        dense_metrics, _ = evaluate_on(p, model, processor, eval_utts, progress=False)
        parts["evaluate_dense"] = time.perf_counter() - t0
        print(
            f"  dense eval: {parts['evaluate_dense']:.1f} s on {len(eval_utts)} clips, "
            f"WER {dense_metrics['wer']:.2%}",
            flush=True,
        )

        prune_s: dict[str, float] = {}
        prune_errors: dict[str, str] = {}
        point_metrics = None
        point_method = None
        # The evaluated point: sparsegpt 50% when it is in the grid (the sweep's main method;
        # a collapsed model can decode differently), else the first method.
        evaluated = "sparsegpt" if "sparsegpt" in methods else methods[0]
        for m in methods:
            restore()
            try:
                dt, _ = bl.timed(
                    lambda m=m: prune_layers(
                        model,
                        targets,
                        get_hessian,
                        method=m,
                        sparsity=0.5,
                        progress=False,
                        **p.prune.method_kwargs(),
                    ),
                    device,
                )
            except Exception as exc:  # noqa: BLE001 - recorded; costed without this method
                prune_errors[m] = f"{type(exc).__name__}: {exc}"
                print(f"  prune {m} 50%: ERROR {prune_errors[m]}", flush=True)
                continue
            prune_s[m] = dt
            print(f"  prune {m} 50%: {dt:.2f} s", flush=True)
            if point_method is None and m == evaluated:
                point_method = m
                t0 = time.perf_counter()
                point_metrics, _ = evaluate_on(p, model, processor, eval_utts, progress=False)
                parts["evaluate_point"] = time.perf_counter() - t0
                print(
                    f"  eval {m} 50%: {parts['evaluate_point']:.1f} s, "
                    f"WER {point_metrics['wer']:.2%}",
                    flush=True,
                )
        restore()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if point_method is None:
        raise SystemExit(f"{evaluated} could not prune: {prune_errors}")
    methods = [m for m in methods if m in prune_s]

    def costs(n_methods: list[str], n_sparsities: int, n_patterns: int) -> dict:
        per_method_points = n_sparsities + n_patterns
        prune_total = sum(prune_s[m] for m in n_methods) * per_method_points
        points = len(n_methods) * per_method_points
        ev = parts["evaluate_point"]
        cached = (
            parts["calibrate"]
            + parts["load_hessians"]
            + parts["evaluate_dense"]
            + prune_total
            + points * ev
        )
        recal = (
            parts["evaluate_dense"]
            + prune_total
            + points * (parts["calibrate"] + parts["load_hessians"] + ev)
        )
        return {
            "methods": n_methods,
            "sparsities": n_sparsities,
            "patterns": n_patterns,
            "points": points,
            "cached_seconds": round(cached, 1),
            "recalibrate_seconds": round(recal, 1),
            "speedup": round(recal / cached, 2),
            "calibration_share_cached": round(parts["calibrate"] / cached, 3),
        }

    grid = costs(methods, len(p.sweep.sparsities), len(p.sweep.patterns))
    scenarios = [grid]
    for s in (4, 8):
        if s != grid["sparsities"]:
            scenarios.append(costs(methods, s, grid["patterns"]))

    # Throughput: dense model, same clips, interleaved rounds.
    tp_utts = load_utterances("embedded", "evaluation", limit=args.throughput_clips).utterances
    audios = [u.audio for u in tp_utts]
    refs = [u.text for u in tp_utts]
    audio_s = sum(u.duration for u in tp_utts)
    prompt = decoder_prompt_ids(model, processor)
    variants = {
        "evaluate batch 16": lambda: evaluate_model(
            model, processor, tp_utts, batch_size=16, progress=False
        )[0]["wer"],
        "evaluate batch 1": lambda: evaluate_model(
            model, processor, tp_utts, batch_size=1, progress=False
        )[0]["wer"],
    }
    if not args.no_hf:
        variants[f"HF generate batch {args.hf_batch_size}"] = lambda: score(
            refs, hf_generate_texts(model, processor, audios, prompt, args.hf_batch_size)
        )["wer"]
    evaluate_model(model, processor, tp_utts[:2], batch_size=2, progress=False)  # warm-up
    print(f"  throughput on {len(tp_utts)} clips ({audio_s:.0f} s audio) ...", flush=True)
    tp_runs = []
    names = list(variants)
    for rep in range(args.repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            dt, wer = bl.timed(variants[name], device)
            tp_runs.append({"round": rep, "variant": name, "seconds": round(dt, 3), "wer": wer})
            print(f"    round {rep} {name:<22} {dt:7.1f} s  WER {wer:.2%}", flush=True)
    throughput = {}
    for name in names:
        secs = [r["seconds"] for r in tp_runs if r["variant"] == name]
        med = bl.median(secs)
        throughput[name] = {
            "seconds_median": med,
            "utterances_per_second": round(len(tp_utts) / med, 3),
            "real_time_factor": round(med / audio_s, 4),
            "wer": next(r["wer"] for r in tp_runs if r["variant"] == name),
        }
    b16 = throughput["evaluate batch 16"]["utterances_per_second"]
    for name in names:
        throughput[name]["relative_to_batch16"] = round(
            throughput[name]["utterances_per_second"] / b16, 3
        )

    print()
    print(
        f"{args.model} on {device}; load avg {machine['loadavg_start'][:1]} -> {bl.loadavg()[:1]}"
    )
    print("measured parts (s):")
    print(
        bl.table(
            ["part", "seconds"],
            [[k, bl.fmt(v, 2)] for k, v in parts.items()]
            + [[f"prune {m} 50%", bl.fmt(v, 2)] for m, v in prune_s.items()],
        )
    )
    print("\nsweep totals COMPUTED from the measured parts (not measured end to end):")
    print(
        bl.table(
            ["methods", "S", "N:M", "points", "cached h", "recalibrate h", "recal/cached"],
            [
                [
                    ",".join(c["methods"]),
                    c["sparsities"],
                    c["patterns"],
                    c["points"],
                    bl.fmt(c["cached_seconds"] / 3600, 2),
                    bl.fmt(c["recalibrate_seconds"] / 3600, 2),
                    f"{c['speedup']:.2f}x",
                ]
                for c in scenarios
            ],
        )
    )
    print(f"\nevaluation throughput, dense model, {len(tp_utts)} clips ({audio_s:.0f} s audio):")
    print(
        bl.table(
            ["variant", "s", "utt/s", "x batch 16", "RTF", "WER"],
            [
                [
                    n,
                    bl.fmt(t["seconds_median"], 1),
                    bl.fmt(t["utterances_per_second"], 2),
                    bl.fmt(t["relative_to_batch16"], 2),
                    bl.fmt(t["real_time_factor"], 3),
                    f"{t['wer']:.2%}",
                ]
                for n, t in throughput.items()
            ],
        )
    )

    bl.write_result(
        args.out,
        {
            "benchmark": "sweep_economics",
            "model": args.model,
            "calibration_clips": cal["utterances"],
            "evaluation_clips": len(eval_utts),
            "parts_seconds": {k: round(v, 3) for k, v in parts.items()},
            "prune_seconds_at_50pct": {k: round(v, 3) for k, v in prune_s.items()},
            "calibrate_metrics": cal,
            "dense_metrics": dense_metrics,
            "point_metrics": point_metrics,
            "point": f"{point_method} 50%",
            "prune_errors": prune_errors,
            "totals_are": "computed from the measured parts, not measured end to end",
            "formulas": {
                "cached": "calibrate + load_hessians + evaluate_dense + sum_points(prune[m] + evaluate_point)",
                "recalibrate": "evaluate_dense + sum_points(calibrate + load_hessians + prune[m] + evaluate_point)",
                "note": "every point's eval is costed as the measured pruned point's; prune[m] measured at 50% is used for every sparsity and pattern of method m",
            },
            "sweep_costs": scenarios,
            "throughput_clips": len(tp_utts),
            "throughput_audio_seconds": round(audio_s, 1),
            "throughput": throughput,
            "throughput_runs": tp_runs,
        },
        machine,
    )


if __name__ == "__main__":
    main()
