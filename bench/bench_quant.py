"""GPTQ vs RTN on every target Linear of a Whisper model, from a cached Hessian set.

Times the quantization of all layers (Hessian inversion included, loss evaluation excluded)
per scheme, and the mean relative layer loss tr(dW H dW^T) / tr(W H W^T) over the layers.

    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/bench_quant.py \
        --hessians /work/hessians-tiny --model bundled:tiny.en
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchlib as bl  # noqa: E402  (puts src/ on sys.path for a checkout)
import torch

from whisper_obs_pruning.hessians.store import load_hessian, read_manifest
from whisper_obs_pruning.quant import layer_loss, quantize_gptq, quantize_rtn
from whisper_obs_pruning.whisper.loading import load_whisper


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hessians", default="/work/hessians-tiny")
    p.add_argument("--model", default="bundled:tiny.en")
    p.add_argument("--schemes", default="int8,int4-g128,int4,int3-g128")
    p.add_argument("--methods", default="rtn,gptq")
    p.add_argument("--limit", type=int, default=None, help="first N layers only (smoke test)")
    p.add_argument(
        "--sizes",
        default="int8,int4-g128",
        help="checkpoint sizes for these schemes, dense and 50%% SparseGPT-pruned ('' = skip)",
    )
    p.add_argument("--out", default=str(bl.BENCH_DIR / "quant.json"))
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    manifest = read_manifest(args.hessians)
    names = [n for n in manifest["layers"] if n != "proj_out"][: args.limit]
    model, _ = load_whisper(args.model)
    modules = dict(model.named_modules())
    weights = {n: modules[n].weight.detach().float().clone() for n in names}
    hessians = {n: load_hessian(args.hessians, manifest, n) for n in names}

    results: dict[str, dict] = {}
    for scheme in args.schemes.split(","):
        for method in args.methods.split(","):
            outs = {}
            t0 = time.perf_counter()
            for n in names:
                if method == "gptq":
                    outs[n] = quantize_gptq(weights[n], hessians[n], scheme, loss=False)
                else:
                    outs[n] = quantize_rtn(weights[n], scheme, loss=False)
            secs = time.perf_counter() - t0
            rel = [layer_loss(weights[n], outs[n].weight, hessians[n])[1] for n in names]
            key = f"{method}/{scheme}"
            results[key] = {
                "method": method,
                "scheme": scheme,
                "layers": len(names),
                "seconds": round(secs, 3),
                "mean_rel_loss": sum(rel) / len(rel),
                "median_rel_loss": sorted(rel)[len(rel) // 2],
                "max_rel_loss": max(rel),
            }
            print(f"{key:18s} {secs:7.2f} s  mean rel loss {sum(rel) / len(rel):.3e}", flush=True)
    sizes = checkpoint_sizes(model, names, weights, hessians, args.sizes) if args.sizes else {}
    out = {
        "bench": "quant",
        "command": bl.command_line(),
        "loadavg": list(os.getloadavg()),
        "hessians": args.hessians,
        "model": args.model,
        "torch_threads": torch.get_num_threads(),
        "results": results,
        "checkpoint_sizes": sizes,
    }
    bl.write_result(Path(args.out), out, bl.machine_info("cpu"))
    return out


def checkpoint_sizes(model, names, weights, hessians, schemes: str) -> dict:
    """Bytes of the quantized checkpoint (GPTQ; SparseGPT 50% + GPTQ with the mask) vs fp32/16.

    Every checkpoint is loaded back and compared bit for bit with the evaluated weights.
    """
    import tempfile

    from whisper_obs_pruning.methods.sparsegpt import prune_sparsegpt
    from whisper_obs_pruning.quant.checkpoint import (
        load_quantized_state_dict,
        model_bytes,
        save_quantized,
    )

    modules = dict(model.named_modules())
    emb = modules["proj_out"].weight.detach().float().clone()
    out: dict = {"fp32_bytes": model_bytes(model, 4), "fp16_bytes": model_bytes(model, 2)}
    pruned = {}
    t0 = time.perf_counter()
    for n in names:
        pr = prune_sparsegpt(weights[n], hessians[n], 0.5)
        pruned[n] = (pr.weight.float(), pr.pruned_mask)
    out["sparsegpt_50_seconds"] = round(time.perf_counter() - t0, 2)
    for scheme in schemes.split(","):
        for sparsity in (0.0, 0.5):
            results = {}
            for n in names:
                W, mask = pruned[n] if sparsity else (weights[n], None)
                results[n] = quantize_gptq(W, hessians[n], scheme, mask=mask, loss=False)
                with torch.no_grad():
                    modules[n].weight.copy_(results[n].weight)
            for other in ("float16", "float16+embed-int8"):
                if other.endswith("embed-int8"):  # tied proj_out/embed_tokens: RTN int8 per row
                    results["proj_out"] = quantize_rtn(emb, "int8", loss=False)
                    with torch.no_grad():
                        modules["proj_out"].weight.copy_(results["proj_out"].weight)
                with tempfile.TemporaryDirectory() as tmp:
                    summ = save_quantized(model, results, Path(tmp) / "ckpt", other_dtype="float16")
                    state = load_quantized_state_dict(Path(tmp) / "ckpt")
                    exact = all(
                        torch.equal(
                            state[f"{n}.weight"].view(torch.int32),
                            results[n].weight.view(torch.int32),
                        )
                        for n in results
                    )
                q_bytes = sum(v["nbytes"] for v in _layer_bytes(results).values())
                key = f"{'sparse50+' if sparsity else ''}{scheme}/others-{other}"
                out[key] = {
                    "weights_file_bytes": summ["weights_bytes"],
                    "dir_bytes": summ["total_bytes"],
                    "quantized_linears_bytes": q_bytes,
                    "formats": summ["formats"],
                    "vs_fp32": round(summ["weights_bytes"] / out["fp32_bytes"], 4),
                    "vs_fp16": round(summ["weights_bytes"] / out["fp16_bytes"], 4),
                    "bit_exact_reload": exact,
                }
                print(
                    f"{key:36s} {summ['weights_bytes'] / 1e6:7.2f} MB "
                    f"(linears {q_bytes / 1e6:.2f} MB) exact={exact}",
                    flush=True,
                )
    with torch.no_grad():  # restore the dense weights
        for n in names:
            modules[n].weight.copy_(weights[n])
        modules["proj_out"].weight.copy_(emb)
    return out


def _layer_bytes(results: dict) -> dict:
    from whisper_obs_pruning.quant.checkpoint import encode_quantized

    sizes = {}
    for n, res in results.items():
        tens, meta = encode_quantized(n, res)
        sizes[n] = {
            "format": meta["format"],
            "nbytes": sum(t.numel() * t.element_size() for t in tens.values()),
        }
    return sizes


if __name__ == "__main__":
    main()
