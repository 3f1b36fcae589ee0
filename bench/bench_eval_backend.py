"""Evaluation backends side by side (issue 17): our torch decoder vs CTranslate2 float32.

For each model (dense; sparsegpt 50% from the cached Hessians; magnitude 70%, which loops to
the token cap) the evaluation split is transcribed by both backends, interleaved, and the
result must be the same hypotheses clip for clip; wall and CPU seconds are reported as
ratios (ct2 / torch) with the load average, because this machine is shared.

    python bench/bench_eval_backend.py --clips 160 --rounds 1
"""

from __future__ import annotations

import time

import _benchlib as bl


def main() -> None:
    ap = bl.base_parser(__doc__.split("\n")[0], "eval_backend")
    ap.add_argument("--clips", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--hessians", default="artifacts/hessians")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    bl.setup_torch(args)
    from whisper_obs_pruning.hessians.store import reusable_hessians
    from whisper_obs_pruning.pipeline.common import fingerprint, targets_for
    from whisper_obs_pruning.pipeline.params import Params
    from whisper_obs_pruning.pruning.apply import prune_layers
    from whisper_obs_pruning.speech.datasets import load_utterances
    from whisper_obs_pruning.speech.scoring import evaluate_model
    from whisper_obs_pruning.whisper.loading import load_whisper

    p = Params()
    model, processor = load_whisper(p.model.id, device="cpu")
    targets = targets_for(model, p)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    utts = load_utterances("embedded", "evaluation", limit=args.clips).utterances
    _, get_h = reusable_hessians(
        bl.REPO / args.hessians, model, targets, fingerprint(model), p.calibrate.max_hessian_bytes
    )
    machine = bl.machine_info("cpu")
    rows, results = [], {}
    for name, method, sparsity in (
        ("dense", None, 0.0),
        ("sparsegpt 50%", "sparsegpt", 0.5),
        ("magnitude 70%", "magnitude", 0.7),
    ):
        model.load_state_dict(dense)
        if method:
            prune_layers(model, targets, get_h, method=method, sparsity=sparsity, progress=False)
        timing = {"torch": [], "ct2": []}
        hyps = {}
        for _ in range(args.rounds):
            for backend in ("torch", "ct2"):
                load0 = bl.loadavg()[0]
                w0, c0 = time.perf_counter(), time.process_time()
                m, r = evaluate_model(
                    model,
                    processor,
                    utts,
                    batch_size=args.batch_size,
                    progress=False,
                    backend=backend,
                )
                timing[backend].append(
                    {
                        "wall_s": time.perf_counter() - w0,
                        "cpu_s": time.process_time() - c0,
                        "load1": load0,
                    }
                )
                hyps[backend] = ([x["hypothesis"] for x in r], m["wer"])
        same = sum(a == b for a, b in zip(hyps["torch"][0], hyps["ct2"][0], strict=True))
        best = {b: min(t, key=lambda x: x["wall_s"]) for b, t in timing.items()}
        results[name] = {
            "timing": timing,
            "identical_clips": same,
            "clips": len(utts),
            "wer_torch": hyps["torch"][1],
            "wer_ct2": hyps["ct2"][1],
            "wall_ratio": best["ct2"]["wall_s"] / best["torch"]["wall_s"],
            "cpu_ratio": best["ct2"]["cpu_s"] / best["torch"]["cpu_s"],
        }
        rows.append(
            (
                name,
                f"{same}/{len(utts)}",
                f"{100 * hyps['torch'][1]:.2f} / {100 * hyps['ct2'][1]:.2f}",
                f"{best['torch']['wall_s']:.1f} / {best['ct2']['wall_s']:.1f}",
                f"{results[name]['wall_ratio']:.2f}",
                f"{results[name]['cpu_ratio']:.2f}",
            )
        )
    print(
        bl.table(
            ["model", "same hyps", "WER % torch / ct2", "wall s torch / ct2", "wall x", "cpu x"],
            rows,
        )
    )
    bl.write_result(args.out, {"models": results, "loadavg": bl.loadavg()}, machine)


if __name__ == "__main__":
    main()
