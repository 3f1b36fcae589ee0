"""How to store the token embedding (issue 13): its scheme against WER and checkpoint MB.

Whisper ties the token embedding to ``proj_out``; it is 19.9 M of tiny.en's 37.8 M parameters,
so it decides the size of a 4-bit checkpoint. The model is pruned once (exact OBS 50% from
the cached Hessians), then for each variant the target Linears are quantized with GPTQ
(``--linear``) and the embedding with the variant's scheme through ``proj_out`` (``none``:
float16), the checkpoint written, and the 160 synthetic clips scored: the same code path as a
frontier point (``PointContext``), side by side in one process.

    python bench/bench_embedding.py --variants int4-g128/none int4-g128/int8 int4-g128/int6
"""

from __future__ import annotations

import time

import _benchlib as bl

DEFAULT = [
    "int4-g128/none",
    "int4-g128/int8",
    "int4-g128/int6",
    "int4-g128/int5",
    "int4-g128/int4-g32",
    "int4-g128/int4-g128",
    "int8/none",
    "int8/int8",
]


def main() -> None:
    ap = bl.base_parser(__doc__.split("\n")[0], "embedding")
    ap.add_argument("--variants", nargs="*", default=DEFAULT, help="linear/embedding schemes")
    ap.add_argument("--method", default="obs")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--hessians", default="artifacts/hessians")
    args = ap.parse_args()
    bl.setup_torch(args)
    from whisper_obs_pruning.pipeline.evaluate import evaluate_on
    from whisper_obs_pruning.pipeline.params import Params
    from whisper_obs_pruning.pipeline.point import PointContext, checkpoint_bytes
    from whisper_obs_pruning.pruning.apply import prune_layers
    from whisper_obs_pruning.quant.apply import quantize_layers
    from whisper_obs_pruning.quant.grid import parse_scheme

    p = Params()
    grid = p.frontier.model_copy(update={"latency_clips": 0, "extra_splits": False})
    p = p.model_copy(update={"sweep": grid})
    ctx = PointContext.open(p, bl.REPO / args.hessians, patterns=[])
    t0 = time.perf_counter()
    prune_layers(ctx.model, ctx.targets, ctx.get_hessian, method=args.method,
                 sparsity=args.sparsity, pattern="unstructured", progress=False,
                 **p.prune.method_kwargs())  # fmt: skip
    prune_s = time.perf_counter() - t0
    pruned = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    machine = bl.machine_info("cpu")
    rows, results = [], {}
    for variant in args.variants:
        linear, emb = variant.split("/")
        ctx.model.load_state_dict(pruned)
        emb_spec = parse_scheme(emb)
        q, _ = quantize_layers(
            ctx.model, ctx.targets, ctx.get_hessian, parse_scheme(linear), progress=False,
            layer_specs={ctx.embedding: emb_spec} if emb_spec else None,
        )  # fmt: skip
        nbytes = checkpoint_bytes(ctx.model, ctx.processor, ctx.targets, q)
        m, _ = evaluate_on(p, ctx.model, ctx.processor, ctx.data.utterances, progress=False)
        results[variant] = {"wer": m["wer"], "cer": m["cer"], "model_bytes": nbytes}
        rows.append(
            (variant, f"{100 * m['wer']:.2f}", f"{100 * m['cer']:.2f}", f"{nbytes / 1e6:.1f}")
        )
        print(variant, results[variant], flush=True)
    print(bl.table(["linear / embedding", "WER %", "CER %", "MB"], rows))
    bl.write_result(
        args.out,
        {
            "method": args.method,
            "sparsity": args.sparsity,
            "prune_seconds": prune_s,
            "variants": results,
            "loadavg": bl.loadavg(),
        },
        machine,
    )


if __name__ == "__main__":
    main()
