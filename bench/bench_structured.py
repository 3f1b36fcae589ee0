"""Structured FFN pruning of tiny.en: quality, size, and real CPU speed (PyTorch and CTranslate2).

For each method (obs / diagonal / magnitude) and FFN fraction (same in encoder and decoder),
prunes tiny.en one-shot from the cached Hessians, measures WER/CER on the embedded evaluation
split and the parameter count. Then times, side by side in this one process (1 torch thread,
interleaved repeats, median), dense vs the best structured model per fraction:
- ``e2e``: features -> tokens (encoder + greedy decoding with KV cache, the repo's decoding
  loop, per-clip token caps) on the same precomputed log-mel features;
- ``encoder``: the encoder alone on the same features;
- CT2: the dense and structured models exported with the CTranslate2 converter, float32 and
  int8, ``models.Whisper.generate`` on the same features, greedy, ``max_length = 2 x cap``
  (CT2's Whisper generate returns at most ``max_length // 2`` new tokens). Their WER on the
  full evaluation split is measured too.
Optionally (``--drop-decoder-layers``) whole decoder layers are removed on top of the best model
at the largest fraction, chosen greedily by teacher-forced loss on calibration clips.
Writes ``metrics/bench/structured.json``.

    flock /tmp/heavy.lock python bench/bench_structured.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _benchlib as bl
import torch

from whisper_obs_pruning.speech.datasets import load_utterances
from whisper_obs_pruning.speech.scoring import evaluate_model, score
from whisper_obs_pruning.structured import prune_ffn_model, save_structured
from whisper_obs_pruning.structured.layers import prune_decoder_layers
from whisper_obs_pruning.structured.sequential import prune_ffn_sequential
from whisper_obs_pruning.whisper.decoding import (
    _decode_batch,
    _suppress_tensors,
    default_token_cap,
    log_mel_features,
)
from whisper_obs_pruning.whisper.loading import load_whisper
from whisper_obs_pruning.whisper.prompt import decoder_prompt_ids


def n_params(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def pt_decode(model, processor, feats, caps, batch_size):
    prompt = decoder_prompt_ids(model, processor)
    eot = model.generation_config.eos_token_id
    sup, begin = _suppress_tensors(model, torch.device("cpu"))
    out = []
    for s in range(0, feats.shape[0], batch_size):
        out += _decode_batch(
            model,
            feats[s : s + batch_size],
            prompt,
            caps[s : s + batch_size],
            eot,
            sup,
            begin,
            None,
        )
    return out


@torch.inference_mode()
def pt_encoder(model, feats, batch_size):
    for s in range(0, feats.shape[0], batch_size):
        model.model.encoder(feats[s : s + batch_size])


def ct2_decode(w, feats_np, caps, prompt, batch_size):
    import ctranslate2

    out = []
    for s in range(0, feats_np.shape[0], batch_size):
        f = feats_np[s : s + batch_size]
        cap = max(caps[s : s + batch_size])
        res = w.generate(
            ctranslate2.StorageView.from_array(f),
            [prompt] * f.shape[0],
            beam_size=1,
            max_length=2 * cap,
        )
        for r, c in zip(res, caps[s : s + batch_size], strict=True):
            ids = [t for t in r.sequences_ids[0] if t != 50256][:c]
            out.append(ids)
    return out


def ct2_export(hf_dir: Path, out: Path, quantization: str) -> Path:
    import ctranslate2

    ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(
        str(out), quantization=quantization, force=True
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled:tiny.en")
    ap.add_argument("--hessians", default="/work/hessians-tiny")
    ap.add_argument("--fractions", default="0.25,0.5")
    ap.add_argument(
        "--methods",
        default="obs,diagonal,magnitude",
        help="also obs-seq: sequential re-calibration",
    )
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--time-clips", type=int, default=16)
    ap.add_argument("--time-batch-sizes", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "metrics/bench/structured.json"))
    ap.add_argument("--rel-damp", type=float, default=0.01)
    ap.add_argument("--drop-decoder-layers", default="1,2", help="on top of the best FFN model")
    ap.add_argument("--seq-clips", type=int, default=32, help="calibration clips for obs-seq")
    ap.add_argument("--eval-limit", type=int, default=None, help="first N clips (smoke runs)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    machine = bl.machine_info("cpu")
    fractions = [float(x) for x in args.fractions.split(",")]
    methods = args.methods.split(",")
    bsizes = [int(x) for x in args.time_batch_sizes.split(",")]

    dense, processor = load_whisper(args.model)
    utts = load_utterances("embedded", "evaluation", limit=args.eval_limit).utterances
    prompt = decoder_prompt_ids(dense, processor)
    results: dict = {"quality": [], "timing": [], "ct2": []}

    def evaluate(name, model, **extra):
        t0 = time.perf_counter()
        m, _ = evaluate_model(
            model, processor, utts, batch_size=args.eval_batch_size, progress=False, desc=name
        )
        row = {
            "model": name,
            "wer": m["wer"],
            "cer": m["cer"],
            "params_m": n_params(model),
            "eval_s": round(time.perf_counter() - t0, 1),
            "loadavg": bl.loadavg(),
            **extra,
        }
        results["quality"].append(row)
        print(
            f"{name:22s} WER {m['wer']:.4f} CER {m['cer']:.4f} params {row['params_m']:.2f}M"
            f"  load {row['loadavg']}",
            flush=True,
        )
        return row

    dense_row = evaluate(
        "dense", dense, method="dense", fraction=0.0, encoder_ffn_dim=dense.config.encoder_ffn_dim
    )
    models = {"dense": dense}
    best: dict[float, tuple[str, dict]] = {}
    for frac in fractions:
        for method in methods:
            m = copy.deepcopy(dense)
            t0 = time.perf_counter()
            if method.endswith("-seq"):
                calib = load_utterances("embedded", "calibration", limit=args.seq_clips).utterances
                rep = prune_ffn_sequential(
                    m, processor, calib, frac, frac, method[:-4], rel_damp=args.rel_damp
                )
            else:
                hessians = args.hessians if method != "magnitude" else None
                rep = prune_ffn_model(m, frac, frac, hessians, method, rel_damp=args.rel_damp)
            prune_s = time.perf_counter() - t0
            name = f"{method}@{frac}"
            losses = [v["loss_rel"] for v in rep["layers"].values()]
            row = evaluate(
                name,
                m,
                method=method,
                fraction=frac,
                prune_s=round(prune_s, 1),
                encoder_ffn_dim=rep["encoder_ffn_dim"],
                mean_layer_loss_rel=statistics.mean(losses),
            )
            if frac not in best or row["wer"] < best[frac][1]["wer"]:
                best[frac] = (name, row)
                models[name] = m
    results["dense_wer"] = dense_row["wer"]

    # whole decoder layers removed on top of the best model at the largest fraction
    extra = []
    top = best[max(fractions)][0] if fractions else "dense"
    for n_drop in [int(x) for x in args.drop_decoder_layers.split(",") if x]:
        m = copy.deepcopy(models[top])
        calib = load_utterances("embedded", "calibration", limit=args.seq_clips).utterances
        t0 = time.perf_counter()
        rep = prune_decoder_layers(m, processor, calib, n_drop)
        name = f"{top}+dec-{n_drop}L"
        evaluate(
            name,
            m,
            method=f"{top} + drop decoder layers",
            fraction=max(fractions),
            removed_decoder_layers=rep["removed"],
            prune_s=round(time.perf_counter() - t0, 1),
        )
        models[name] = m
        extra.append(name)

    # ---------------------------------------------------------------- timing, interleaved
    clips = utts[: args.time_clips]
    audios = [u.audio for u in clips]
    feats = log_mel_features(processor, audios)
    caps = [
        default_token_cap(u.duration, len(prompt), dense.config.max_target_positions) for u in clips
    ]
    timed = ["dense"] + [best[f][0] for f in fractions] + extra
    print("timing", timed, flush=True)
    for bs in bsizes:
        e2e = {n: [] for n in timed}
        enc = {n: [] for n in timed}
        toks = {}
        for r in range(args.repeats):
            order = timed[r % len(timed) :] + timed[: r % len(timed)]
            for n in order:
                t0 = time.perf_counter()
                ids = pt_decode(models[n], processor, feats, caps, bs)
                e2e[n].append(time.perf_counter() - t0)
                toks[n] = sum(len(x) for x in ids)
                t0 = time.perf_counter()
                pt_encoder(models[n], feats, bs)
                enc[n].append(time.perf_counter() - t0)
        for n in timed:
            row = {
                "model": n,
                "batch_size": bs,
                "clips": len(clips),
                "tokens": toks[n],
                "e2e_s": e2e[n],
                "encoder_s": enc[n],
                "e2e_median_s": statistics.median(e2e[n]),
                "encoder_median_s": statistics.median(enc[n]),
                "loadavg": bl.loadavg(),
            }
            row["e2e_speedup"] = statistics.median(
                [a / b for a, b in zip(e2e["dense"], e2e[n], strict=True)]
            )
            row["encoder_speedup"] = statistics.median(
                [a / b for a, b in zip(enc["dense"], enc[n], strict=True)]
            )
            results["timing"].append(row)
            print(
                f"bs {bs} {n:18s} e2e {row['e2e_median_s']:.2f}s x{row['e2e_speedup']:.2f}  "
                f"enc {row['encoder_median_s']:.2f}s x{row['encoder_speedup']:.2f} "
                f"tokens {toks[n]} load {row['loadavg']}",
                flush=True,
            )

    # ---------------------------------------------------------------- CTranslate2
    try:
        import ctranslate2
    except ImportError:
        ctranslate2 = None
    if ctranslate2 is not None:
        with tempfile.TemporaryDirectory(prefix="bench-structured-") as tmp:
            tmp = Path(tmp)
            ct2 = {}
            for n in timed:
                hf = save_structured(models[n], processor, tmp / f"hf-{n}")
                for q in ("float32", "int8"):
                    d = ct2_export(hf, tmp / f"ct2-{n}-{q}", q)
                    ct2[(n, q)] = ctranslate2.models.Whisper(
                        str(d), device="cpu", compute_type=q, intra_threads=1, inter_threads=1
                    )
            # WER of every CT2 model on the full evaluation split
            all_feats = log_mel_features(processor, [u.audio for u in utts]).numpy()
            all_caps = [
                default_token_cap(u.duration, len(prompt), dense.config.max_target_positions)
                for u in utts
            ]
            quality = {}
            for key, w in ct2.items():
                ids = ct2_decode(w, all_feats, all_caps, prompt, args.eval_batch_size)
                hyps = processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
                quality[key] = score([u.text for u in utts], hyps)
                print(f"ct2 {key} WER {quality[key]['wer']:.4f}", flush=True)
            fnp = feats.numpy()
            for bs in bsizes:
                keys = list(ct2)
                t = {k: [] for k in keys}
                ref = []
                for r in range(args.repeats):
                    t0 = time.perf_counter()
                    pt_decode(dense, processor, feats, caps, bs)
                    ref.append(time.perf_counter() - t0)
                    for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
                        t0 = time.perf_counter()
                        ct2_decode(ct2[k], fnp, caps, prompt, bs)
                        t[k].append(time.perf_counter() - t0)
                for k in keys:
                    row = {
                        "model": k[0],
                        "compute_type": k[1],
                        "batch_size": bs,
                        "wer": quality[k]["wer"],
                        "cer": quality[k]["cer"],
                        "e2e_s": t[k],
                        "e2e_median_s": statistics.median(t[k]),
                        "dense_pytorch_s": ref,
                        "speedup_vs_dense_pytorch": statistics.median(
                            [a / b for a, b in zip(ref, t[k], strict=True)]
                        ),
                        "loadavg": bl.loadavg(),
                    }
                    results["ct2"].append(row)
                    print(
                        f"bs {bs} ct2 {k[0]:16s} {k[1]:7s} {row['e2e_median_s']:.2f}s "
                        f"x{row['speedup_vs_dense_pytorch']:.2f} vs dense PyTorch  "
                        f"WER {row['wer']:.4f}",
                        flush=True,
                    )
    bl.write_result(Path(args.out), results, machine)
    print(json.dumps({"loadavg_end": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
