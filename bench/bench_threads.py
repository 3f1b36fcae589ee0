"""Encoder thread choice (issue 17): fixed global threads vs ``encoder_threads="auto"``.

The evaluation's encoder used the global thread setting (2 on this machine); on a shared
2-core machine two OpenMP threads can be slower than one. Two conditions, each measured side
by side (interleaved rounds): as the machine is, and with ``--burners`` extra processes
spinning on the CPU (the load other users put here). In each: the encoder alone at 1 and at
2 threads (seconds per clip), and the whole greedy transcription with the encoder fixed at
the global count vs ``auto`` (tokens must be identical; wall seconds as a ratio).

    python bench/bench_threads.py --clips 16 --rounds 3 --burners 2
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time

import _benchlib as bl


def _burn(stop) -> None:
    x = 0
    while not stop.is_set():
        for i in range(100_000):
            x ^= i


def main() -> None:
    ap = bl.base_parser(__doc__.split("\n")[0], "threads")
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--burners", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    bl.setup_torch(args)
    import torch

    from whisper_obs_pruning.speech.datasets import load_utterances
    from whisper_obs_pruning.whisper.decoding import log_mel_features, transcribe_tokens
    from whisper_obs_pruning.whisper.loading import load_whisper

    model, processor = load_whisper("bundled:tiny.en", device="cpu")
    audios = [
        u.audio for u in load_utterances("embedded", "evaluation", limit=args.clips).utterances
    ]
    feats = log_mel_features(processor, audios[: args.batch_size])
    global_threads = torch.get_num_threads()
    machine = bl.machine_info("cpu")
    results = {}
    for condition, burners in (("as is", 0), (f"+{args.burners} busy processes", args.burners)):
        stop = mp.Event()
        procs = [mp.Process(target=_burn, args=(stop,), daemon=True) for _ in range(burners)]
        for pr in procs:
            pr.start()
        time.sleep(2 if burners else 0)
        load0 = bl.loadavg()[0]
        enc = {1: [], global_threads: []}
        full = {"fixed": [], "auto": []}
        tokens = {}
        try:
            for r in range(args.rounds):
                for t in enc if r % 2 == 0 else list(enc)[::-1]:
                    torch.set_num_threads(t)
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        model.model.encoder(feats)
                    enc[t].append((time.perf_counter() - t0) / feats.shape[0])
                torch.set_num_threads(global_threads)
                for mode in ("fixed", "auto") if r % 2 == 0 else ("auto", "fixed"):
                    t0 = time.perf_counter()
                    tokens[mode] = transcribe_tokens(
                        model,
                        processor,
                        audios,
                        batch_size=args.batch_size,
                        progress=False,
                        encoder_threads=None if mode == "fixed" else "auto",
                    )
                    full[mode].append(time.perf_counter() - t0)
        finally:
            stop.set()
            for pr in procs:
                pr.join()
            torch.set_num_threads(global_threads)
        med = {k: statistics.median(v) for k, v in {**enc, **full}.items()}
        results[condition] = {
            "load1_before": load0,
            "load1_after": bl.loadavg()[0],
            "encoder_s_per_clip": {str(t): round(med[t], 4) for t in enc},
            "transcribe_s": {m: round(med[m], 2) for m in full},
            "auto_speedup": round(med["fixed"] / med["auto"], 3),
            "identical_tokens": tokens["fixed"] == tokens["auto"],
            "rounds": args.rounds,
        }
        print(condition, results[condition], flush=True)
    rows = [
        (
            c,
            f"{v['load1_before']:.1f}",
            " / ".join(f"{s:.3f}" for s in v["encoder_s_per_clip"].values()),
            f"{v['transcribe_s']['fixed']:.1f} / {v['transcribe_s']['auto']:.1f}",
            f"{v['auto_speedup']:.2f}",
            v["identical_tokens"],
        )
        for c, v in results.items()
    ]
    print(
        bl.table(
            [
                "condition",
                "load",
                f"encoder s/clip (1 / {global_threads} threads)",
                "transcribe s (fixed / auto)",
                "auto x",
                "same tokens",
            ],
            rows,
        )
    )
    bl.write_result(args.out, {"conditions": results, "global_threads": global_threads}, machine)


if __name__ == "__main__":
    main()
