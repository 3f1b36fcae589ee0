"""Why a pruned model is as good as it is: damping, padding frames, allocation, calibration size.

Calibrates once per calibration setting (padding frames excluded or included, number of
clips), then prunes and evaluates each variant on the embedded evaluation split, side by side
in one process. Writes metrics/bench/ablation.json and prints a table.

    python bench/bench_ablation.py                       # the default grid (~15 min on 2 cores)
    python bench/bench_ablation.py --variants sparsegpt:unstructured:0.5:0.01:excl:uniform:96

Calibration clips: ``96`` = the first 96 of the synthetic (TTS) calibration split, ``real96``
= of the recorded-speech one (``data/real/calibration``), ``both96`` = 96 of each (issue 12's
calibration-source ablation: ``--real`` scores every row on both evaluation splits).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from whisper_obs_pruning.hessians.calibration import run_calibration
from whisper_obs_pruning.hessians.collector import HessianCollector, linear_layers
from whisper_obs_pruning.pruning import prune_layers, select_targets
from whisper_obs_pruning.pruning.sequential import prune_sequential
from whisper_obs_pruning.speech.datasets import load_utterances
from whisper_obs_pruning.speech.scoring import evaluate_model
from whisper_obs_pruning.whisper.loading import load_whisper
from whisper_obs_pruning.whisper.prompt import decoder_prompt_ids

DEFAULT_VARIANTS = [
    # method:pattern:sparsity:rel_damp:padding:allocation:calibration clips[:seq][:grows]
    # (seq: sequential calibration; grows: exact OBS with OBC's global row selection)
    "sparsegpt:unstructured:0.5:0.01:excl:uniform:96",
    "sparsegpt:unstructured:0.5:0.05:excl:uniform:96",
    "sparsegpt:unstructured:0.5:0.1:excl:uniform:96",
    "sparsegpt:unstructured:0.5:0.01:incl:uniform:96",
    "sparsegpt:unstructured:0.5:0.01:excl:uniform:32",
    "sparsegpt:unstructured:0.5:0.01:excl:owl:96",
    "sparsegpt:unstructured:0.5:0.01:excl:uniform:96:seq",
    "obs:unstructured:0.5:0.01:excl:uniform:96",
    "sparsegpt:2:4:0.5:0.01:excl:uniform:96",
    "sparsegpt:2:4:0.5:0.1:excl:uniform:96",
]


def parse_variant(text: str) -> dict:
    parts = text.split(":")
    if parts[1] != "unstructured":  # "2:4" contains a colon
        parts = [parts[0], f"{parts[1]}:{parts[2]}", *parts[3:]]
    flags = set()
    while parts[-1] in ("seq", "grows"):  # trailing flags, in any order
        flags.add(parts.pop())
    method, pattern, sparsity, damp, padding, allocation, clips = parts
    return {
        "method": method,
        "pattern": pattern,
        "sparsity": float(sparsity),
        "rel_damp": float(damp),
        "padding": padding,
        "allocation": allocation,
        "clips": int(clips.removeprefix("real").removeprefix("both")),
        "source": "real"
        if clips.startswith("real")
        else "both"
        if clips.startswith("both")
        else "tts",
        "sequential": "seq" in flags,
        "obs_rows": "global" if "grows" in flags else "uniform",
        "name": text,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled:tiny.en")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument(
        "--real", action="store_true", help="also score every row on the real-speech split"
    )
    ap.add_argument("--real-limit", type=int, default=None, help="first N real clips only")
    ap.add_argument("--real-only", action="store_true", help="score on the real-speech split only")
    ap.add_argument("--out", default="metrics/bench/ablation.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    variants = [parse_variant(v) for v in args.variants]
    model, processor = load_whisper(args.model, device=args.device)
    calib_sets = {
        "tts": load_utterances("embedded", "calibration").utterances,
        "real": load_utterances("embedded", "real/calibration").utterances,
    }

    def calib(source: str, n: int) -> list:
        """The first ``n`` calibration clips of a source (``both``: ``n`` of each)."""
        if source == "both":
            return calib_sets["tts"][:n] + calib_sets["real"][:n]
        return calib_sets[source][:n]

    evals = load_utterances("embedded", "evaluation", limit=args.eval_limit).utterances
    real = load_utterances("embedded", "real/evaluation", limit=args.real_limit).utterances
    real = real if args.real or args.real_only else []

    def score() -> dict:
        """WER/CER on the embedded split (and wer_real/cer_real on the real one)."""
        out = {"wer": float("nan"), "cer": float("nan")}
        if not args.real_only:
            m, _ = evaluate_model(model, processor, evals, progress=False)
            out = {"wer": m["wer"], "cer": m["cer"]}
        if real:
            r, _ = evaluate_model(model, processor, real, progress=False)
            out |= {"wer_real": r["wer"], "cer_real": r["cer"]}
        return out

    layers = linear_layers(model)
    targets = select_targets(list(layers))
    prompt = decoder_prompt_ids(model, processor)
    hessians: dict[tuple, dict[str, torch.Tensor]] = {}
    keys = {(v["padding"], v["clips"], v["source"]) for v in variants if not v["sequential"]}
    for key in sorted(keys):
        t0 = time.perf_counter()
        with HessianCollector(layers) as col:
            run_calibration(
                model,
                processor,
                calib(key[2], key[1]),
                col,
                prompt,
                exclude_padding=key[0] == "excl",
                progress=False,
            )
        hessians[key] = {n: s.hessian() for n, s in col.hessians(targets).items()}
        print(f"calibrated {key} in {time.perf_counter() - t0:.0f} s", flush=True)
    dense = {n: layers[n].weight.data.clone() for n in targets}
    rows = []
    m = score()
    rows.append({"name": "dense", **m, "prune_s": 0.0})
    print(f"dense: WER {100 * m['wer']:.2f}%", flush=True)
    for v in variants:
        for n in targets:
            layers[n].weight.data.copy_(dense[n])
        t0 = time.perf_counter()
        if v["sequential"]:
            prune_sequential(
                model,
                processor,
                calib(v["source"], v["clips"]),
                targets,
                prompt,
                method=v["method"],
                sparsity=v["sparsity"],
                pattern=v["pattern"],
                rel_damp=v["rel_damp"],
                exclude_padding=v["padding"] == "excl",
                progress=False,
                obs_rows=v["obs_rows"],
            )
        else:
            prune_layers(
                model,
                targets,
                hessians[(v["padding"], v["clips"], v["source"])].__getitem__,
                method=v["method"],
                sparsity=v["sparsity"],
                pattern=v["pattern"],
                rel_damp=v["rel_damp"],
                allocation=v["allocation"],
                obs_rows=v["obs_rows"],
                progress=False,
            )
        prune_s = time.perf_counter() - t0
        m = score()
        rows.append({**copy.deepcopy(v), **m, "prune_s": round(prune_s, 1)})
        real_text = f" real WER {100 * m['wer_real']:.2f}%" if real else ""
        print(
            f"{v['name']}: WER {100 * m['wer']:.2f}% CER {100 * m['cer']:.2f}%{real_text} "
            f"(prune {prune_s:.0f} s)",
            flush=True,
        )
    dense_wer, dense_real = rows[0]["wer"], rows[0].get("wer_real")
    head = "| variant | WER % | x dense | CER % |" + (" real WER % | x dense |" if real else "")
    print(f"\n{head} prune s |\n" + "|---" * (head.count("|") - 0) + "|")
    for r in rows:
        ratio = f"{r['wer'] / dense_wer:.2f}" if dense_wer else "-"  # dense WER 0: tiny eval set
        extra = f" {100 * r['wer_real']:.2f} | {r['wer_real'] / dense_real:.2f} |" if real else ""
        print(
            f"| {r['name']} | {100 * r['wer']:.2f} | {ratio} | "
            f"{100 * r['cer']:.2f} |{extra} {r['prune_s']} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "model": args.model,
                "num_eval": len(evals),
                "num_eval_real": len(real),
                "loadavg_end": list(os.getloadavg()),
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
