"""Greedy OBS with uniform vs global per-row counts, and the obs_loss allocation, on tiny.en.

Part ``losses``: every target Linear's rows are traced by greedy OBS once, to ``--top`` of the
inputs (``methods.obs.layer_trace``); from the traces, exactly, the layer loss of
``rows="uniform"`` (per_row_counts) and of ``rows="global"`` (``select_counts``) at each
sparsity: relative loss ``tr(dW H dW^T) / tr(W H W^T)`` with the damped H the method
minimises (the greedy is deterministic, so a prune with those counts has exactly that loss).
A row whose global count hits the trace's end is counted (``cap_bound_rows``; then the true
global loss is lower still).

Part ``wer``: for each ``--configs`` entry ``rows:sparsity[:allocation]`` a fresh model is
pruned with ``pruning.prune_layers`` (timed) and evaluated on the embedded evaluation split.

    PYTHONPATH=src python bench/bench_obs_global.py --part losses
    PYTHONPATH=src python bench/bench_obs_global.py --part wer --configs global:0.7,global:0.8
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from whisper_obs_pruning.hessians.store import load_hessian, read_manifest  # noqa: E402
from whisper_obs_pruning.methods import per_row_counts  # noqa: E402
from whisper_obs_pruning.methods.obs import layer_trace, select_counts  # noqa: E402
from whisper_obs_pruning.pruning import prune_layers, select_targets  # noqa: E402
from whisper_obs_pruning.whisper.loading import load_whisper  # noqa: E402

OUT = REPO / "metrics" / "bench" / "obs_global.json"


def load_out() -> dict:
    return json.loads(OUT.read_text()) if OUT.exists() else {}


def save_out(data: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=1) + "\n")


def set_out(path: Path) -> None:
    global OUT
    OUT = path


def targets_of(model) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return select_targets(names)


def part_losses(args, hdir, manifest) -> dict:
    model, _ = load_whisper(args.model)
    mods = dict(model.named_modules())
    per_layer = []
    t_all = time.perf_counter()
    for name in targets_of(model)[: args.limit]:
        W = mods[name].weight.detach().float()
        if args.sample_rows:  # evenly spaced rows only: a cheap estimate, not the layer's value
            pick = torch.linspace(0, W.shape[0] - 1, args.sample_rows).round().long().unique()
            W = W[pick]
        H = load_hessian(hdir, manifest, name)
        rows, cols = W.shape
        t0 = time.perf_counter()
        cum, dense = layer_trace(W, H, args.top, rel_damp=args.rel_damp)
        trace_s = time.perf_counter() - t0
        cap = cum.shape[1] - 1
        entry = {"layer": name, "shape": [rows, cols], "trace_seconds": round(trace_s, 2)}
        for s in args.sparsities:
            uni = per_row_counts(rows, cols, s)
            lu = float(cum.gather(1, uni.unsqueeze(1)).sum())
            counts, info = select_counts(cum, round(s * rows * cols))
            entry[f"{s}"] = {
                "uniform": lu / dense,
                "global": info["loss"] / dense,
                "ratio": lu / info["loss"] if info["loss"] > 0 else 1.0,
                "gap": info["gap"],
                "cap_bound_rows": int((counts >= cap).sum()) if cap < cols else 0,
                "count_min": int(counts.min()),
                "count_max": int(counts.max()),
            }
        per_layer.append(entry)
        print(name, {s: round(entry[f"{s}"]["ratio"], 3) for s in args.sparsities}, flush=True)
    summary = {}
    for s in args.sparsities:
        rows_ = [e[f"{s}"] for e in per_layer]
        summary[f"{s}"] = {
            "mean_rel_loss_uniform": sum(r["uniform"] for r in rows_) / len(rows_),
            "mean_rel_loss_global": sum(r["global"] for r in rows_) / len(rows_),
            "max_rel_loss_uniform": max(r["uniform"] for r in rows_),
            "max_rel_loss_global": max(r["global"] for r in rows_),
            "mean_ratio_uniform_over_global": sum(r["ratio"] for r in rows_) / len(rows_),
            "max_ratio_uniform_over_global": max(r["ratio"] for r in rows_),
            "worst_layer": max(per_layer, key=lambda e, s=s: e[f"{s}"]["ratio"])["layer"],
            "max_gap": max(r["gap"] for r in rows_),
            "cap_bound_rows": sum(r["cap_bound_rows"] for r in rows_),
        }
    return {
        "top": args.top,
        "sample_rows": args.sample_rows,
        "trace_seconds_total": round(time.perf_counter() - t_all, 1),
        "summary": summary,
        "per_layer": per_layer,
    }


def part_wer(args, hdir, manifest, start: dict, command: str) -> list[dict]:
    from whisper_obs_pruning.speech.datasets import load_utterances
    from whisper_obs_pruning.speech.scoring import evaluate_model

    utts = load_utterances("embedded", "evaluation").utterances
    results = []
    for cfg in args.configs:
        rows, sparsity, *rest = cfg.split(":")
        allocation = rest[0] if rest else "uniform"
        model, processor = load_whisper(args.model)
        targets = targets_of(model)
        t0 = time.perf_counter()
        report = prune_layers(
            model,
            targets,
            lambda n: load_hessian(hdir, manifest, n),
            method="obs",
            sparsity=float(sparsity),
            allocation=allocation,
            rel_damp=args.rel_damp,
            obs_rows=rows,
            progress=False,
        )
        prune_s = time.perf_counter() - t0
        entry = {
            "config": cfg,
            "rows": rows,
            "sparsity": float(sparsity),
            "allocation": allocation,
            "prune_seconds": round(prune_s, 1),
            "layer_seconds_sum": round(sum(r["seconds"] for r in report.values()), 1),
            "loadavg_after_prune": list(os.getloadavg()),
        }
        if allocation != "uniform":
            entry["per_layer_sparsity"] = {n: r["target_sparsity"] for n, r in report.items()}
        if not args.no_eval:
            metrics, _ = evaluate_model(model, processor, utts, batch_size=16, progress=False)
            entry["wer"] = metrics["wer"]
            entry["transcribe_seconds"] = metrics["transcribe_seconds"]
        print(json.dumps({k: v for k, v in entry.items() if k != "per_layer_sparsity"}), flush=True)
        results.append(entry)
        data = load_out()  # saved after each configuration: a long run keeps what it finished
        data.setdefault("runs", []).append({**entry, **start, "command": command})
        save_out(data)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["losses", "wer"], required=True)
    ap.add_argument("--model", default="bundled:tiny.en")
    ap.add_argument("--hessians", default="/work/hessians-tiny")
    ap.add_argument(
        "--sparsities", type=lambda t: [float(x) for x in t.split(",")], default=[0.5, 0.7, 0.8]
    )
    ap.add_argument("--top", type=float, default=0.92, help="trace depth, fraction of inputs")
    ap.add_argument("--rel-damp", type=float, default=0.01)
    ap.add_argument("--configs", type=lambda t: t.split(","), default=["global:0.7"])
    ap.add_argument("--no-eval", action="store_true", help="time the prune only")
    ap.add_argument("--limit", type=int, default=None, help="losses: first N layers (smoke)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--sample-rows", type=int, default=0, help="losses: rows per layer (0: all)")
    args = ap.parse_args()
    set_out(args.out)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    manifest = read_manifest(args.hessians)
    data = load_out()
    data.setdefault("runs", [])
    start = {"loadavg_start": list(os.getloadavg()), "started": time.strftime("%F %T")}
    if args.part == "losses":
        key = f"losses_sample{args.sample_rows}" if args.sample_rows else "losses"
        data[key] = {**start, **part_losses(args, args.hessians, manifest)}
        data[key]["command"] = "python " + shlex.join(sys.argv)
        data[key]["loadavg_end"] = list(os.getloadavg())
    else:
        part_wer(args, args.hessians, manifest, start, "python " + shlex.join(sys.argv))
        data = load_out()
    data["dense_wer_reference"] = 0.0830
    save_out(data)


if __name__ == "__main__":
    main()
