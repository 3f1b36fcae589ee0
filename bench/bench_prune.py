"""Prune time and layer-wise reconstruction error per method and pattern, on a real Whisper.

1. Full Hessians of every target layer are collected once, in-process, from ``--calib-clips``
   calibration clips (the library's ``HessianCollector`` + ``run_calibration``).
2. Held-out activations come from ``--heldout-clips`` *other* calibration clips, captured with
   this script's own forward pre-hooks and masks (independent of the collector): encoder-side
   inputs keep only the first ``ceil(len(audio)/320)`` of the 1500 frames, decoder-side inputs
   only the real tokens (prompt + transcript). Rows are folded into a Gram matrix
   ``G = sum_k x_k x_k^T`` per distinct input, which gives the error exactly:
   ``||(W - W')X||^2 = tr(dW G dW^T)``. One layer is also checked against stored raw X.
3. Each method x pattern prunes every target layer from the dense weights
   (``pruning.prune_layers``), timed; then per layer the relative error
   ``||(W - W')X||^2 / ||W X||^2`` on held-out X (and on the calibration X, i.e. the objective
   the second-order methods minimise).

Pruning runs where the library runs it: Hessians stay on the CPU, so ``prune_layers`` prunes
on the CPU even with ``--device cuda`` (the device is used for the forward passes).

    python bench/bench_prune.py                          # tiny.en, all methods, 50% and 2:4
    python bench/bench_prune.py --model bundled:base --methods magnitude,sparsegpt
"""

from __future__ import annotations

import math
import re
import time
import weakref
from collections import defaultdict

import _benchlib as bl

TARGET_SECONDS = {"sparsegpt": 5.0, "obs": 180.0}  # for tiny.en, all target layers


def _own_masks(utts, dec_ids, valid_frames_fn):
    """Row masks built here, not by the library: encoder frames and decoder tokens."""
    import torch

    enc = torch.zeros(len(utts), 1500, dtype=torch.bool)
    for i, u in enumerate(utts):
        enc[i, : valid_frames_fn(len(u.audio))] = True
    return enc, dec_ids


class HeldOutGram:
    """Forward pre-hooks that fold each target layer's valid input rows into G = sum x x^T.

    Layers reading the same tensor within a forward pass (q/k/v; all cross-attention k/v)
    share one Gram; sameness is checked by identity through a weak reference.
    """

    def __init__(self, modules: dict, names: list[str], device: str, keep_raw: str | None):
        self.names = names
        self.modules = modules
        self.device = device
        self.gram: dict[str, object] = {}
        self.rows: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self.keep_raw = keep_raw
        self.raw: list = []
        self.masks: dict[str, object] = {}
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._handles = []

    def __enter__(self):
        for n in self.names:
            self._handles.append(self.modules[n].register_forward_pre_hook(self._hook(n)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._seen.clear()

    def new_batch(self, enc_mask, dec_mask):
        self.masks = {"encoder": enc_mask, "decoder": dec_mask}
        self._seen.clear()

    def _hook(self, name: str):
        import torch

        encoder_side = ".encoder." in f".{name}." or re.search(r"encoder_attn\.[kv]_proj$", name)

        def hook(module, args):
            x = args[0]
            prev = self._seen.get(id(x))
            if prev is not None and prev[0]() is x:
                self.alias[name] = prev[1]
                return
            self._seen[id(x)] = (weakref.ref(x), name)
            mask = self.masks["encoder" if encoder_side else "decoder"]
            if tuple(mask.shape) != tuple(x.shape[:2]):
                raise RuntimeError(f"{name}: input {tuple(x.shape)} vs mask {tuple(mask.shape)}")
            rows = x.detach()[mask.to(x.device)].float()
            g = (rows.T @ rows).to("cpu", torch.float64)
            if name in self.gram:
                self.gram[name] += g
            else:
                self.gram[name] = g
            self.rows[name] = self.rows.get(name, 0) + rows.shape[0]
            if name == self.keep_raw:
                self.raw.append(rows.to("cpu", torch.float64))

        return hook

    def of(self, name: str):
        leader = self.alias.get(name, name)
        return self.gram[leader], self.rows[leader]


def _cost(method: str, rows: int, cols: int) -> float:
    """Relative cost of pruning a rows x cols layer (for extrapolating unseen shapes)."""
    if method == "obs":
        return rows * cols**3
    if method == "sparsegpt":
        return cols**3 + rows * cols**2
    return rows * cols


def rel_error(dW, W, G) -> float:
    """||dW X||^2 / ||W X||^2 with G = X^T X (rows of X are inputs): tr(dW G dW^T)/tr(W G W^T)."""
    num = float(((dW @ G) * dW).sum())
    den = float(((W @ G) * W).sum())
    return num / den if den > 0 else math.nan


def main() -> None:
    ap = bl.base_parser(__doc__.splitlines()[0], "prune")
    ap.add_argument("--model", default="bundled:tiny.en")
    ap.add_argument("--calib-clips", type=int, default=64, help="clips for the Hessians")
    ap.add_argument("--heldout-clips", type=int, default=32, help="other clips for the error")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--methods", type=bl.csv_list(), default=None, help="default: every registered method"
    )
    ap.add_argument(
        "--patterns",
        type=bl.csv_list(),
        default=["unstructured", "2:4"],
        help="'unstructured' (at --sparsity) and/or N:M patterns",
    )
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--rel-damp", type=float, default=0.01)
    ap.add_argument("--include", default=None, help="regex: only target layers matching it")
    ap.add_argument("--max-layers", type=int, default=None, help="only the first N targets")
    ap.add_argument(
        "--budget-seconds",
        type=float,
        default=600.0,
        help="stop a method x pattern after this long; the rest is extrapolated per shape",
    )
    ap.add_argument(
        "--exclude-padding",
        action="store_true",
        help="Hessians and errors on audio frames only (the pipeline's default keeps all 1500)",
    )
    args = ap.parse_args()
    device = bl.setup_torch(args)
    machine = bl.machine_info(device)

    import torch

    from whisper_obs_pruning.hessians.calibration import (
        encoder_valid_frames,
        run_calibration,
        teacher_forced_batches,
    )
    from whisper_obs_pruning.hessians.collector import HessianCollector, linear_layers
    from whisper_obs_pruning.methods import REGISTRY
    from whisper_obs_pruning.pruning import prune_layers, select_targets
    from whisper_obs_pruning.speech.datasets import load_utterances
    from whisper_obs_pruning.whisper.loading import load_whisper
    from whisper_obs_pruning.whisper.prompt import decoder_prompt_ids

    if args.methods is None:
        args.methods = list(REGISTRY)
    for m in args.methods:
        if m not in REGISTRY:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(REGISTRY)}")

    model, processor = load_whisper(args.model, device=device)
    prompt = decoder_prompt_ids(model, processor)
    all_linear = linear_layers(model)
    targets = select_targets(list(all_linear))
    if args.include:
        targets = [n for n in targets if re.search(args.include, n)]
    if args.max_layers:
        targets = targets[: args.max_layers]
    if not targets:
        raise SystemExit("no target layers selected")
    modules = dict(model.named_modules())

    want = args.calib_clips + args.heldout_clips
    utts = load_utterances("embedded", "calibration", limit=want).utterances
    if len(utts) < want:
        raise SystemExit(f"the calibration split has {len(utts)} clips; asked for {want}")
    calib, held = utts[: args.calib_clips], utts[args.calib_clips :]
    print(
        f"{args.model} on {device}: {len(targets)} target layers; Hessians from {len(calib)} "
        f"clips, error on {len(held)} held-out clips",
        flush=True,
    )

    # 1. Hessians (library collector), calibration clips only.
    t0 = time.perf_counter()
    with HessianCollector({n: all_linear[n] for n in targets}, device=device) as col:
        calib_counts = run_calibration(
            model,
            processor,
            calib,
            col,
            prompt,
            batch_size=args.batch_size,
            exclude_padding=args.exclude_padding,
            progress=False,
        )
    calib_seconds = time.perf_counter() - t0
    H: dict[str, torch.Tensor] = {}
    by_stat: dict[int, torch.Tensor] = {}
    for n, stat in col.hessians(targets).items():
        if id(stat) not in by_stat:
            by_stat[id(stat)] = stat.hessian().to("cpu", torch.float64)
        H[n] = by_stat[id(stat)]
    del col
    print(f"  Hessians: {calib_seconds:.1f} s ({len(by_stat)} distinct)", flush=True)

    # 2. Held-out Gram matrices with our own hooks and masks.
    # A layer whose input is never shared, so its raw rows are kept (identity check).
    check_layer = next((n for n in targets if n.endswith(("fc1", "out_proj"))), None)
    t0 = time.perf_counter()
    mismatched_masks = 0
    with HeldOutGram(modules, targets, device, keep_raw=check_layer) as hog, torch.inference_mode():
        dtype = next(model.parameters()).dtype
        for b, (feats, dec, lib_masks) in enumerate(
            teacher_forced_batches(held, processor, prompt, args.batch_size, exclude_padding=True)
        ):
            batch = held[b * args.batch_size : (b + 1) * args.batch_size]
            lengths = [
                min(
                    448,
                    len(prompt)
                    + len(
                        processor.tokenizer(
                            " " + u.text.strip(), add_special_tokens=False
                        ).input_ids
                    ),
                )
                for u in batch
            ]
            dec_mask = torch.zeros(dec.shape, dtype=torch.bool)
            for i, L in enumerate(lengths):
                dec_mask[i, :L] = True
            enc_mask, _ = _own_masks(batch, dec_mask, encoder_valid_frames)
            mismatched_masks += int(
                not torch.equal(enc_mask, lib_masks["encoder"])
                or not torch.equal(dec_mask, lib_masks["decoder"])
            )
            if not args.exclude_padding:  # error over every frame the encoder computes
                enc_mask = torch.ones_like(enc_mask)
            hog.new_batch(enc_mask.to(device), dec_mask.to(device))
            model(
                input_features=feats.to(device, dtype),
                decoder_input_ids=dec.to(device),
                use_cache=False,
            )
    heldout_seconds = time.perf_counter() - t0
    X_check = torch.cat(hog.raw) if hog.raw else None
    print(
        f"  held-out activations: {heldout_seconds:.1f} s; masks differing from the library's: "
        f"{mismatched_masks} batches",
        flush=True,
    )

    dense = {n: modules[n].weight.data.detach().clone() for n in targets}
    dense64 = {n: w.to("cpu", torch.float64) for n, w in dense.items()}

    # 3. Prune with each method x pattern from the dense weights; time and error.
    results = []
    per_layer = []
    errors: list[dict] = []
    identity_check = None
    for pattern in args.patterns:
        for method in args.methods:
            for n in targets:
                modules[n].weight.data.copy_(dense[n])
            label = f"{method} {pattern if pattern != 'unstructured' else f'{args.sparsity:.0%}'}"
            print(f"  {label} ...", flush=True)
            # One prune_layers call per layer (same code path, one layer at a time) so a
            # method over --budget-seconds can stop; the rest is extrapolated per layer shape.
            report: dict[str, dict] = {}
            dt = 0.0
            error = None
            for n in targets:
                if dt > args.budget_seconds:
                    break
                try:
                    t_layer, rep = bl.timed(
                        lambda n=n, method=method, pattern=pattern: prune_layers(
                            model,
                            [n],
                            H.__getitem__,
                            method=method,
                            sparsity=args.sparsity,
                            pattern=None if pattern == "unstructured" else pattern,
                            rel_damp=args.rel_damp,
                            progress=False,
                        ),
                        device,
                    )
                except Exception as exc:  # noqa: BLE001 - recorded; the other methods go on
                    error = f"{type(exc).__name__}: {exc}"
                    break
                dt += t_layer
                report.update(rep)
            if error is not None:
                errors.append({"method": method, "pattern": pattern, "error": error})
                print(f"    ERROR: {error}", flush=True)
                continue
            done = [n for n in targets if n in report]
            skipped = [n for n in targets if n not in report]
            extrapolated = dt
            for n in skipped:
                same = [report[m]["seconds"] for m in done if dense[m].shape == dense[n].shape]
                if same:
                    extrapolated += sum(same) / len(same)
                else:  # a shape not seen yet: scale by the method's cost model
                    rate = sum(report[m]["seconds"] for m in done) / sum(
                        _cost(method, *dense[m].shape) for m in done
                    )
                    extrapolated += rate * _cost(method, *dense[n].shape)
            if skipped:
                print(
                    f"    over the {args.budget_seconds:.0f} s budget after {len(done)} of "
                    f"{len(targets)} layers; total extrapolated per layer shape: "
                    f"{extrapolated:.0f} s",
                    flush=True,
                )
            errs_h, errs_c = [], []
            for n in done:
                W = dense64[n]
                dW = W - modules[n].weight.data.to("cpu", torch.float64)
                G, rows = hog.of(n)
                e_h = rel_error(dW, W, G)
                e_c = rel_error(dW, W, H[n])
                errs_h.append(e_h)
                errs_c.append(e_c)
                side, kind = bl.layer_group(n)
                per_layer.append(
                    {
                        "method": method,
                        "pattern": pattern,
                        "layer": n,
                        "side": side,
                        "kind": kind,
                        "shape": list(W.shape),
                        "seconds": report[n]["seconds"],
                        "sparsity": round(report[n]["sparsity"], 4),
                        "rel_error_heldout": e_h,
                        "rel_error_calibration": e_c,
                        "heldout_rows": rows,
                    }
                )
                if n == check_layer and X_check is not None and identity_check is None:
                    direct = float(((X_check @ dW.T) ** 2).sum() / ((X_check @ W.T) ** 2).sum())
                    identity_check = {
                        "layer": n,
                        "method": method,
                        "rows": X_check.shape[0],
                        "gram": e_h,
                        "direct": direct,
                        "rel_diff": abs(e_h - direct) / max(direct, 1e-30),
                    }
            sizes = [dense[n].numel() for n in done]
            results.append(
                {
                    "method": method,
                    "pattern": pattern,
                    "sparsity": args.sparsity if pattern == "unstructured" else None,
                    "seconds_total": round(extrapolated, 3),
                    "seconds_measured": round(dt, 3),
                    "layers_pruned": len(done),
                    "complete": not skipped,
                    "seconds_layers_sum": round(sum(report[n]["seconds"] for n in done), 3),
                    "slowest_layer": max(done, key=lambda n: report[n]["seconds"]),
                    "slowest_layer_seconds": max(report[n]["seconds"] for n in done),
                    "mean_rel_error_heldout": sum(errs_h) / len(errs_h),
                    "weighted_rel_error_heldout": sum(
                        e * s for e, s in zip(errs_h, sizes, strict=True)
                    )
                    / sum(sizes),
                    "median_rel_error_heldout": bl.median(errs_h),
                    "mean_rel_error_calibration": sum(errs_c) / len(errs_c),
                    "achieved_sparsity": sum(
                        report[n]["sparsity"] * s for n, s in zip(done, sizes, strict=True)
                    )
                    / sum(sizes),
                }
            )
            r = results[-1]
            print(
                f"    {dt:8.2f} s, mean held-out rel. error {r['mean_rel_error_heldout']:.4f} "
                f"(calibration {r['mean_rel_error_calibration']:.4f})",
                flush=True,
            )
    for n in targets:
        modules[n].weight.data.copy_(dense[n])

    # Methods stopped by the budget pruned fewer layers: also compare on the common layers.
    combo_layers = defaultdict(dict)
    for row in per_layer:
        combo_layers[(row["method"], row["pattern"])][row["layer"]] = row["rel_error_heldout"]
    common = set(targets)
    for errs in combo_layers.values():
        common &= set(errs)
    for r in results:
        errs = combo_layers[(r["method"], r["pattern"])]
        r["common_layers"] = len(common)
        r["mean_rel_error_heldout_common"] = (
            sum(errs[n] for n in common) / len(common) if common else None
        )

    # Per layer type: mean held-out error per (side, kind).
    groups: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in per_layer:
        groups[(row["side"], row["kind"])][f"{row['method']} {row['pattern']}"].append(
            row["rel_error_heldout"]
        )
    combos = [f"{r['method']} {r['pattern']}" for r in results]
    by_type = {
        f"{side}.{kind}": {c: sum(v[c]) / len(v[c]) for c in combos if v.get(c)}
        for (side, kind), v in sorted(groups.items())
    }

    full_model = len(targets) == len(select_targets(list(all_linear)))
    targets_met = {}
    if full_model and args.model == "bundled:tiny.en":
        for r in results:
            if r["method"] in TARGET_SECONDS:
                key = f"{r['method']} {r['pattern']}"
                targets_met[key] = {
                    "seconds": r["seconds_total"],
                    "target_seconds": TARGET_SECONDS[r["method"]],
                    "complete": r["complete"],
                    "met": r["seconds_total"] < TARGET_SECONDS[r["method"]],
                }

    print()
    print(
        f"{args.model} on {device}: {len(targets)} layers, Hessians from {len(calib)} clips, "
        f"error on {len(held)} held-out clips; load avg {machine['loadavg_start'][:1]} -> "
        f"{bl.loadavg()[:1]}"
    )
    print(
        bl.table(
            [
                "method",
                "pattern",
                "prune s",
                "slowest layer s",
                "layers",
                "sparsity",
                "held-out err (mean)",
                "(param-weighted)",
                "calib err (mean)",
                f"held-out err ({len(common)} common layers)",
            ],
            [
                [
                    r["method"],
                    r["pattern"],
                    bl.fmt(r["seconds_total"], 2)
                    if r["complete"]
                    else f"~{r['seconds_total']:.0f}",
                    bl.fmt(r["slowest_layer_seconds"], 2),
                    f"{r['layers_pruned']}/{len(targets)}",
                    bl.fmt(r["achieved_sparsity"], 3),
                    bl.fmt(r["mean_rel_error_heldout"], 4),
                    bl.fmt(r["weighted_rel_error_heldout"], 4),
                    bl.fmt(r["mean_rel_error_calibration"], 4),
                    bl.fmt(r["mean_rel_error_heldout_common"], 4),
                ]
                for r in results
            ],
        )
    )
    print("\nmean held-out relative error per layer type (over the layers each method pruned)")
    print(
        bl.table(
            ["layer type", *combos],
            [[g, *[bl.fmt(v.get(c), 4) for c in combos]] for g, v in by_type.items()],
        )
    )
    for k, v in targets_met.items():
        print(
            f"target {k}: {v['seconds']:.2f} s{'' if v['complete'] else ' (extrapolated)'} < "
            f"{v['target_seconds']:.0f} s: {'met' if v['met'] else 'NOT met'}"
        )
    if identity_check:
        print(
            f"check tr(dW G dW^T) vs ||dW X||^2 on {identity_check['layer']}: relative "
            f"difference {identity_check['rel_diff']:.2e}"
        )

    bl.write_result(
        args.out,
        {
            "benchmark": "prune",
            "model": args.model,
            "n_targets": len(targets),
            "all_targets": full_model,
            "calibration_clips": len(calib),
            "heldout_clips": len(held),
            "calibration_counts": calib_counts,
            "hessian_seconds": round(calib_seconds, 2),
            "heldout_capture_seconds": round(heldout_seconds, 2),
            "heldout_mask_batches_differing_from_library": mismatched_masks,
            "sparsity": args.sparsity,
            "rel_damp": args.rel_damp,
            "pruning_device": str(device),
            "error_definition": (
                "||(W-W')X||^2/||WX||^2 with X the layer's dense-model inputs on held-out "
                "calibration clips (encoder side: "
                + ("first ceil(len/320) frames" if args.exclude_padding else "all 1500 frames")
                + "; decoder side: prompt + transcript tokens), computed as "
                "tr(dW G dW^T)/tr(W G W^T), G = X^T X"
            ),
            "exclude_padding": args.exclude_padding,
            "identity_check": identity_check,
            "targets": targets_met,
            "results": results,
            "errors": errors,
            "by_layer_type": by_type,
            "per_layer": per_layer,
        },
        machine,
    )


if __name__ == "__main__":
    main()
