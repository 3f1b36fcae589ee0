"""Cost of Hessian accumulation relative to plain teacher-forced forward passes.

Runs the same N calibration utterances (same batches) four ways, interleaved in one process
(each repeat runs every variant once, in a rotated order, so slow drifts of background load hit
all variants alike):

- ``features``: only building the batches (log-mel features + tokenisation), no model;
- ``forward``: the loop of ``run_calibration`` without a collector (no hooks);
- ``full``: ``run_calibration`` with ``HessianCollector(diagonal=False)``;
- ``diagonal``: ``run_calibration`` with ``HessianCollector(diagonal=True)``.

The headline is ``full / forward`` (target <= 1.5x), computed per repeat from adjacent runs and
summarised by the median. Peak memory of forward / full / diagonal is measured once each in a
fresh subprocess (see ``_benchlib.PeakMemory``: getrusage max RSS after a high-water reset).

    python bench/bench_calibration.py --n 32 --repeats 3
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import _benchlib as bl

VARIANTS = ("features", "forward", "full", "diagonal")


def _setup(model_id: str, n: int, device: str):
    from whisper_obs_pruning.speech.datasets import load_utterances
    from whisper_obs_pruning.whisper.loading import load_whisper
    from whisper_obs_pruning.whisper.prompt import decoder_prompt_ids

    model, processor = load_whisper(model_id, device=device)
    utts = load_utterances("embedded", "calibration", limit=n).utterances
    return model, processor, utts, decoder_prompt_ids(model, processor)


def run_variant(variant, model, processor, utts, prompt, batch_size, device, exclude_padding):
    """One pass over ``utts``; returns counts for the Hessian variants."""
    import torch

    from whisper_obs_pruning.hessians.calibration import run_calibration, teacher_forced_batches
    from whisper_obs_pruning.hessians.collector import HessianCollector, linear_layers

    if variant == "features":
        for _ in teacher_forced_batches(
            utts, processor, prompt, batch_size, exclude_padding=exclude_padding
        ):
            pass
        return {}
    if variant == "forward":
        dtype = next(model.parameters()).dtype
        with torch.inference_mode():
            for feats, dec, _ in teacher_forced_batches(
                utts, processor, prompt, batch_size, exclude_padding=exclude_padding
            ):
                model(
                    input_features=feats.to(device, dtype),
                    decoder_input_ids=dec.to(device),
                    use_cache=False,
                )
        return {}
    diagonal = variant == "diagonal"
    with HessianCollector(linear_layers(model), diagonal=diagonal, device=device) as col:
        counts = run_calibration(
            model,
            processor,
            utts,
            col,
            prompt,
            batch_size=batch_size,
            exclude_padding=exclude_padding,
            progress=False,
        )
    bytes_ = sum(s.sum_xxt.numel() * s.sum_xxt.element_size() for s in col.stats.values())
    return {
        **counts,
        "distinct_statistics": len(col.stats),
        "layers_hooked": len(col.layers),
        "statistics_mb": round(bytes_ / 2**20, 2),
    }


def worker(spec: dict) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model, processor, utts, prompt = _setup(spec["model"], spec["n"], spec["device"])
    # Warm-up outside the measured section (first-call allocations), on one small batch.
    run_variant("forward", model, processor, utts[:2], prompt, 2, spec["device"], True)
    with bl.PeakMemory(spec["device"]) as mem:
        t0 = time.perf_counter()
        info = run_variant(
            spec["variant"],
            model,
            processor,
            utts,
            prompt,
            spec["batch_size"],
            spec["device"],
            spec["exclude_padding"],
        )
        bl.sync(spec["device"])
        seconds = time.perf_counter() - t0
    bl.worker_reply({"variant": spec["variant"], "seconds": seconds, **info, **mem.result})


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == bl.WORKER_FLAG:
        worker(json.loads(sys.argv[2]))
        return
    ap = bl.base_parser(__doc__.splitlines()[0], "calibration")
    ap.add_argument("--model", default="bundled:tiny.en")
    ap.add_argument("--n", type=int, default=32, help="calibration utterances")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of all variants")
    ap.add_argument(
        "--exclude-padding",
        action="store_true",
        help="leave Whisper's zero-padding frames out (the pipeline's default keeps all 1500)",
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the subprocess memory runs")
    ap.add_argument("--target-ratio", type=float, default=1.5)
    args = ap.parse_args()
    device = bl.setup_torch(args)
    machine = bl.machine_info(device)
    exclude_padding = args.exclude_padding

    model, processor, utts, prompt = _setup(args.model, args.n, device)
    audio_s = sum(u.duration for u in utts)
    print(
        f"{args.model} on {device}: {len(utts)} calibration clips ({audio_s:.1f} s audio), "
        f"batch {args.batch_size}, {args.repeats} interleaved rounds",
        flush=True,
    )
    run_variant("forward", model, processor, utts[:2], prompt, 2, device, True)  # warm-up

    runs: list[dict] = []
    counts: dict[str, dict] = {}
    for rep in range(args.repeats):
        order = VARIANTS[rep % 4 :] + VARIANTS[: rep % 4]
        for v in order:
            dt, info = bl.timed(
                lambda v=v: run_variant(
                    v, model, processor, utts, prompt, args.batch_size, device, exclude_padding
                ),
                device,
            )
            counts.setdefault(v, info)
            runs.append({"round": rep, "variant": v, "seconds": round(dt, 4)})
            print(f"  round {rep} {v:<9} {dt:7.2f} s", flush=True)

    def t(rep: int, v: str) -> float:
        return next(r["seconds"] for r in runs if r["round"] == rep and r["variant"] == v)

    summary = {}
    for v in VARIANTS:
        secs = [t(r, v) for r in range(args.repeats)]
        summary[v] = {
            "seconds_min": min(secs),
            "seconds_median": bl.median(secs),
            "utterances_per_second": round(len(utts) / bl.median(secs), 2),
        }
    ratios = {}
    for v in ("full", "diagonal"):
        per_round = [t(r, v) / t(r, "forward") for r in range(args.repeats)]
        no_feat = [
            (t(r, v) - t(r, "features")) / max(1e-9, t(r, "forward") - t(r, "features"))
            for r in range(args.repeats)
        ]
        ratios[v] = {
            "ratio_to_forward_median": round(bl.median(per_round), 3),
            "ratio_to_forward_per_round": [round(x, 3) for x in per_round],
            "ratio_of_min_times": round(
                summary[v]["seconds_min"] / summary["forward"]["seconds_min"], 3
            ),
            "ratio_excluding_feature_extraction_median": round(bl.median(no_feat), 3),
            "meets_target": bl.median(per_round) <= args.target_ratio,
        }

    memory = {}
    if not args.no_memory:
        print("peak memory: one fresh subprocess per variant ...", flush=True)
        for v in ("forward", "full", "diagonal"):
            spec = {
                "model": args.model,
                "n": args.n,
                "batch_size": args.batch_size,
                "variant": v,
                "device": device,
                "threads": args.threads,
                "exclude_padding": exclude_padding,
            }
            memory[v] = bl.run_worker(Path(__file__), spec)
            m = memory[v]
            print(f"  {v:<9} peak RSS {m.get('rss_peak_mb', m.get('error'))} MB", flush=True)
        fwd_peak = memory["forward"].get("rss_peak_mb")
        for v in ("full", "diagonal"):
            if fwd_peak is not None and "rss_peak_mb" in memory[v]:
                memory[v]["peak_over_forward_mb"] = round(memory[v]["rss_peak_mb"] - fwd_peak, 1)

    rows = []
    for v in VARIANTS:
        s = summary[v]
        r = ratios.get(v, {})
        m = memory.get(v, {})
        rows.append(
            [
                v,
                bl.fmt(s["seconds_median"], 2),
                bl.fmt(s["seconds_min"], 2),
                s["utterances_per_second"],
                bl.fmt(r.get("ratio_to_forward_median"), 2)
                if r
                else ("1.00" if v == "forward" else "-"),
                bl.fmt(r.get("ratio_excluding_feature_extraction_median"), 2) if r else "-",
                bl.fmt(m.get("rss_peak_mb"), 0) if m else "-",
                bl.fmt(m.get("rss_delta_mb"), 0) if m else "-",
                bl.fmt(m.get("peak_over_forward_mb"), 0)
                if m.get("peak_over_forward_mb") is not None
                else "-",
                counts.get(v, {}).get("statistics_mb", "-"),
            ]
        )
    print()
    print(
        f"{args.model} on {device}, {len(utts)} clips, batch {args.batch_size}; load avg "
        f"{machine['loadavg_start'][:1]} -> {bl.loadavg()[:1]}"
    )
    print(
        bl.table(
            [
                "variant",
                "median s",
                "min s",
                "utt/s",
                "x forward",
                "x fwd (no feats)",
                "peak RSS MB",
                "+RSS MB",
                "peak-fwd MB",
                "stats MB",
            ],
            rows,
        )
    )
    for v in ("full", "diagonal"):
        r = ratios[v]
        print(
            f"{v}: {r['ratio_to_forward_median']:.2f}x forward (median of per-round ratios; "
            f"target <= {args.target_ratio}x: {'met' if r['meets_target'] else 'NOT met'})"
        )
    if memory:
        print("memory: " + next(iter(memory.values())).get("memory_method", "?"))

    bl.write_result(
        args.out,
        {
            "benchmark": "calibration",
            "model": args.model,
            "n_utterances": len(utts),
            "audio_seconds": round(audio_s, 2),
            "batch_size": args.batch_size,
            "exclude_padding": exclude_padding,
            "repeats": args.repeats,
            "target_ratio": args.target_ratio,
            "hessian_counts": counts.get("full"),
            "summary": summary,
            "ratios": ratios,
            "memory": memory,
            "memory_method": (
                "fresh subprocess per variant; peak RSS = getrusage ru_maxrss after resetting "
                "the high-water mark via /proc/self/clear_refs once model and data are loaded "
                "(psutil 2 ms sampling where the reset is not allowed); delta = peak - RSS "
                "at the start of the measured pass; peak_over_forward_mb = peak - forward's peak "
                "(the extra memory the collector needs)"
            ),
            "runs": runs,
        },
        machine,
    )


if __name__ == "__main__":
    main()
