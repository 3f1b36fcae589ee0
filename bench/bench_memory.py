"""Peak memory of one-shot calibration and pruning: all Hessians held vs streamed to disk.

For each model (tiny.en and base from the bundled packages; ``small`` is Whisper small's
architecture with random weights, because the bundled small packages are incomplete and
memory does not depend on weight values), each in a fresh subprocess:

- ``forward``: the teacher-forced calibration batches without a collector (activations only);
- ``calibrate held``: ``calibrate_in_passes`` with no budget: one pass, every accumulator alive;
- ``calibrate streamed``: the same with ``--budget-layers`` x the largest input's Hessian as
  ``max_bytes``: several passes, each block written to disk before the next;
- ``prune held`` / ``prune streamed``: SparseGPT on every target layer from the saved set,
  all Hessians preloaded (what the sweep does under the budget) vs read one at a time.

Peak memory is the process's peak RSS over the measured phase (``_benchlib.PeakMemory``).
The two calibrations must write bit-identical Hessian sets (checked, reported).

    python bench/bench_memory.py                      # tiny, base, small; 4 clips
    python bench/bench_memory.py --models tiny --n 8
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _benchlib as bl

MODELS = {"tiny": "bundled:tiny.en", "base": "bundled:base", "small": "small-architecture"}
MiB = 2**20


def _load(model: str, device: str):
    """(model, processor) of a benchmark model; ``small`` = Whisper small's shapes, random."""
    import torch

    from whisper_obs_pruning.whisper.loading import load_whisper

    if model != "small":
        return load_whisper(MODELS[model], device=device)
    from transformers import WhisperForConditionalGeneration

    base, processor = load_whisper("bundled:base", device="cpu")
    config = base.config.to_dict()
    config.update(  # openai/whisper-small (same vocabulary and mel bins as base)
        d_model=768,
        encoder_layers=12,
        decoder_layers=12,
        encoder_attention_heads=12,
        decoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_ffn_dim=3072,
    )
    torch.manual_seed(0)
    small = WhisperForConditionalGeneration(type(base.config).from_dict(config)).eval()
    small.generation_config = base.generation_config
    return small.to(device), processor


def worker(spec: dict) -> dict:
    import torch

    from whisper_obs_pruning.hessians.calibration import (
        calibrate_in_passes,
        hessian_nbytes,
        run_calibration,
    )
    from whisper_obs_pruning.hessians.collector import HessianCollector, linear_layers
    from whisper_obs_pruning.hessians.store import (
        hessian_set_bytes,
        hessian_set_writer,
        reusable_hessians,
    )
    from whisper_obs_pruning.pipeline.common import fingerprint
    from whisper_obs_pruning.pruning import prune_layers
    from whisper_obs_pruning.speech.datasets import load_utterances
    from whisper_obs_pruning.whisper.prompt import decoder_prompt_ids

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model, processor = _load(spec["model"], spec["device"])
    utts = load_utterances("embedded", "calibration", limit=spec["n"]).utterances
    prompt = decoder_prompt_ids(model, processor, language="en")
    layers = linear_layers(model)
    fp = fingerprint(model)  # before the measured section: it copies every weight
    max_bytes = None if spec.get("max_mb") is None else int(spec["max_mb"] * MiB)
    out: dict = {"phase": spec["phase"], "max_mb": spec.get("max_mb")}
    t0 = time.perf_counter()
    with bl.PeakMemory(spec["device"]) as mem:
        if spec["phase"] == "forward":
            with HessianCollector({}) as nothing:
                run_calibration(model, processor, utts, nothing, prompt, batch_size=spec["batch"])
        elif spec["phase"] == "calibrate":
            with hessian_set_writer(spec["hdir"]) as writer:
                counts, layout = calibrate_in_passes(
                    model,
                    processor,
                    utts,
                    layers,
                    prompt,
                    lambda name, stat: writer.add(name, stat.hessian(), stat.n_samples),
                    max_bytes=max_bytes,
                    batch_size=spec["batch"],
                    progress=False,
                )
                manifest = writer.finish(
                    layout.shared_with, {"model_id": spec["model"], "model_fingerprint": fp}
                )
            out.update(
                passes=counts["passes"],
                peak_accumulator_mb=round(counts["peak_accumulator_bytes"] / MiB, 1),
                hessians_mb=round(hessian_set_bytes(manifest) / MiB, 1),
                largest_mb=round(max(map(hessian_nbytes, layout.dims.values())) / MiB, 1),
                distinct_inputs=len(layout.dims),
                linears=len(layers),
                sha256={n: e["sha256"] for n, e in manifest["layers"].items()},
            )
        else:  # prune: every Linear but proj_out, SparseGPT 50%, Hessians held or streamed
            targets = [n for n in layers if n != "proj_out"]
            _, get_hessian = reusable_hessians(spec["hdir"], model, targets, fp, max_bytes)
            prune_layers(
                model, targets, get_hessian, method="sparsegpt", sparsity=0.5, progress=False
            )
    out.update(mem.result, seconds=round(time.perf_counter() - t0, 2))
    return out


def main() -> None:
    ap = bl.base_parser(__doc__.splitlines()[0], "memory")
    ap.add_argument("--models", type=bl.csv_list(), default=list(MODELS))
    ap.add_argument("--n", type=int, default=4, help="calibration clips")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument(
        "--budget-layers",
        type=float,
        default=4.0,
        help="streamed budget, in multiples of the largest input's Hessian",
    )
    ap.add_argument("--no-prune", action="store_true", help="skip the pruning phases")
    if len(sys.argv) == 3 and sys.argv[1] == bl.WORKER_FLAG:
        bl.worker_reply(worker(json.loads(sys.argv[2])))
        return
    args = ap.parse_args()
    for m in args.models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    device = bl.setup_torch(args)
    machine = bl.machine_info(device)
    script = Path(__file__).resolve()
    results: dict[str, dict] = {}
    rows = []
    for m in args.models:
        tmp = Path(tempfile.mkdtemp(prefix=f"whisper-obs-bench-memory-{m}-"))
        base = {"model": m, "device": device, "n": args.n, "batch": args.batch_size}
        base["threads"] = args.threads
        try:
            r: dict = {"forward": bl.run_worker(script, {**base, "phase": "forward"})}
            print(f"{m} forward: {r['forward']}", flush=True)
            held = bl.run_worker(
                script, {**base, "phase": "calibrate", "max_mb": None, "hdir": str(tmp / "held")}
            )
            if "error" in held:
                raise RuntimeError(held["error"])
            budget_mb = round(args.budget_layers * held["largest_mb"], 1)
            streamed = bl.run_worker(
                script,
                {**base, "phase": "calibrate", "max_mb": budget_mb, "hdir": str(tmp / "streamed")},
            )
            if "error" in streamed:
                raise RuntimeError(streamed["error"])
            identical = held.pop("sha256") == streamed.pop("sha256")
            r.update(calibrate_held=held, calibrate_streamed=streamed, identical=identical)
            print(f"{m} calibrate: held {held}\n  streamed {streamed}", flush=True)
            if not args.no_prune:
                for mode, mb in (("held", None), ("streamed", budget_mb)):
                    spec = {**base, "phase": "prune", "max_mb": mb, "hdir": str(tmp / "held")}
                    r[f"prune_{mode}"] = bl.run_worker(script, spec)
                    print(f"{m} prune {mode}: {r[f'prune_{mode}']}", flush=True)
        except RuntimeError as exc:
            r["error"] = str(exc)
            print(f"{m}: {exc}", file=sys.stderr)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        results[m] = r
        if "error" in r:
            continue
        fwd = r["forward"].get("rss_delta_mb")
        held, streamed = r["calibrate_held"], r["calibrate_streamed"]

        def delta(phase: dict) -> str:
            return bl.fmt(phase.get("rss_delta_mb"), 0) if phase else "-"

        rows.append(
            [
                m,
                held["linears"],
                held["distinct_inputs"],
                bl.fmt(held["hessians_mb"], 0),
                bl.fmt(held["largest_mb"], 0),
                bl.fmt(fwd, 0),
                delta(held),
                f"{delta(streamed)} ({streamed['passes']} passes, <= {budget_mb:.0f})",
                bl.fmt(streamed["seconds"] / held["seconds"], 2),
                "yes" if r["identical"] else "NO",
                delta(r.get("prune_held", {})),
                delta(r.get("prune_streamed", {})),
            ]
        )
    headers = [
        "model",
        "Linears",
        "distinct H",
        "sum of H MB",
        "largest H MB",
        "forward +MB",
        "calib held +MB",
        "calib streamed +MB",
        "time streamed/held",
        "same H",
        "prune held +MB",
        "prune streamed +MB",
    ]
    print()
    print(f"{args.n} clips, batch {args.batch_size}, {device}; +MB = peak RSS over the start")
    print(bl.table(headers, rows))
    bl.write_result(
        args.out,
        {
            "benchmark": "memory",
            "n_utterances": args.n,
            "batch_size": args.batch_size,
            "budget_layers": args.budget_layers,
            "small_note": "Whisper small architecture with random weights (memory only)",
            "memory_method": "fresh subprocess per phase; peak RSS after a high-water reset "
            "once model and data are loaded (see _benchlib.PeakMemory)",
            "results": results,
        },
        machine,
    )


if __name__ == "__main__":
    main()
