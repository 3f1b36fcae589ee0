"""Benchmark ``transcribe`` (hand-written greedy loop) against HF ``model.generate``.

Why: evaluation of every pruned model is dominated by transcription; this measures seconds
per clip for several batch sizes on the same clips in one run, and checks that both give the
same tokens. Prints a table and writes ``metrics/bench/transcribe.json``.

    python bench/bench_transcribe.py --model bundled:tiny.en --clips data/evaluation --n 16
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _benchlib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("whisper_obs_pruning") is None:  # not pip-installed: use the checkout
    sys.path.insert(0, str(REPO / "src"))

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please send the quarterly report to the finance team by Friday afternoon.",
    "We measured the temperature every hour for three consecutive days.",
    "Artificial intelligence is changing how people write software.",
    "The meeting has been moved to the second floor conference room.",
    "She bought apples, oranges and a loaf of fresh bread at the market.",
    "Our train was delayed because of heavy snow on the northern line.",
    "Remember to water the plants and feed the cat while I am away.",
    "The museum opens at nine and closes at five on weekdays.",
    "He played the piano beautifully during the evening concert.",
    "Scientists discovered a new species of frog in the rainforest.",
    "Could you please turn down the music, I am trying to sleep.",
    "The library will be closed for renovations until next spring.",
    "Children were laughing and playing in the park all afternoon.",
    "Our new product launch is scheduled for the end of the month.",
    "The pilot announced that we would land in about twenty minutes.",
]


def _read(path: Path) -> np.ndarray:
    import soundfile as sf
    import soxr

    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if sr != 16000:
        audio = soxr.resample(audio, sr, 16000).astype(np.float32)
    return np.ascontiguousarray(audio[: 30 * 16000])


def load_clips(folder: Path, n: int, lo: float = 3.0, hi: float = 6.0) -> tuple[list, str]:
    """``n`` clips from ``folder`` (metadata.csv or audio files), preferring lo..hi seconds.

    Falls back to synthesising with espeak-ng when the folder does not exist (benchmark only).
    """
    files: list[Path] = []
    meta = folder / "metadata.csv"
    if meta.is_file():
        with meta.open(newline="", encoding="utf-8") as fh:
            files = [folder / r["file_name"] for r in csv.DictReader(fh)]
    elif folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".wav", ".flac"})
    if files:
        clips = [_read(p) for p in files]
        good = [c for c in clips if lo <= len(c) / 16000 <= hi]
        pool = good if len(good) >= n else clips
        return pool[:n], f"{folder} ({len(good)} of {len(clips)} clips in {lo}-{hi} s)"
    espeak = shutil.which("espeak-ng")
    if not espeak:
        raise SystemExit(f"no clips in {folder} and espeak-ng is not installed")
    clips = []
    voices = ["en-us", "en-gb", "en-us+f3", "en-us+m5"]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            wav = Path(tmp) / f"{i}.wav"
            text = SENTENCES[i % len(SENTENCES)]
            cmd = [espeak, "-v", voices[i % 4], "-s", str(140 + 3 * i), "-w", str(wav), text]
            subprocess.run(cmd, check=True)
            clips.append(_read(wav))
    return clips, f"espeak-ng synthetic ({n} clips; {folder} not found)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled:tiny.en")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clips", type=Path, default=REPO / "data" / "evaluation")
    ap.add_argument("--n", type=int, default=16, help="number of clips")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell; min and median kept")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF generate baseline")
    ap.add_argument("--out", type=Path, default=REPO / "metrics" / "bench" / "transcribe.json")
    args = ap.parse_args()

    import torch
    import transformers

    from whisper_obs_pruning.whisper.decoding import transcribe_tokens
    from whisper_obs_pruning.whisper.loading import load_whisper
    from whisper_obs_pruning.whisper.prompt import decoder_prompt_ids

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    transformers.logging.set_verbosity_error()
    clips, source = load_clips(args.clips, args.n)
    audio_s = sum(len(c) for c in clips) / 16000
    model, processor = load_whisper(args.model, device=args.device)
    prompt = decoder_prompt_ids(model, processor)
    load_start = os.getloadavg()

    def ours(bs: int, dthreads: int | str | None):
        return transcribe_tokens(
            model, processor, clips, batch_size=bs, progress=False, decoder_threads=dthreads
        )

    methods: list[tuple[str, object]] = [
        ("transcribe (decoder threads auto)", lambda bs: ours(bs, "auto")),
        ("transcribe (decoder 1 thread)", lambda bs: ours(bs, 1)),
        (f"transcribe (decoder {args.threads} threads)", lambda bs: ours(bs, None)),
    ]
    if not args.no_hf:
        methods.append(
            (
                "hf_generate",
                lambda bs: _benchlib.hf_generate_tokens(model, processor, clips, prompt, bs),
            )
        )

    # Warm-up (first-call allocations, lazy imports) on two clips.
    transcribe_tokens(model, processor, clips[:2], batch_size=2, progress=False)

    runs = []
    reference: list[list[int]] | None = None
    for rep in range(args.repeats):
        for bs in args.batch_sizes:
            for name, fn in methods:  # interleaved so background load hits all methods alike
                t0 = time.perf_counter()
                toks = fn(bs)
                dt = time.perf_counter() - t0
                if reference is None:
                    reference = toks
                same = toks == reference
                runs.append(
                    {
                        "method": name,
                        "batch_size": bs,
                        "repeat": rep,
                        "seconds": dt,
                        "same": same,
                        "tokens": sum(len(t) for t in toks),
                    }
                )
                print(
                    f"  rep {rep} {name:<34} bs={bs:<3} {dt / len(clips):.3f} s/clip"
                    f"{'' if same else '  (tokens differ)'}",
                    flush=True,
                )

    rows = []
    for name, _ in methods:
        for bs in args.batch_sizes:
            sel = [r for r in runs if r["method"] == name and r["batch_size"] == bs]
            secs = sorted(r["seconds"] for r in sel)
            rows.append(
                {
                    "method": name,
                    "batch_size": bs,
                    "seconds_per_clip_min": round(secs[0] / len(clips), 4),
                    "seconds_per_clip_median": round(float(np.median(secs)) / len(clips), 4),
                    "real_time_factor_min": round(secs[0] / audio_s, 4),
                    "repeats": len(secs),
                    "tokens": sel[0]["tokens"],
                    "same_tokens_as_first_run": all(r["same"] for r in sel),
                }
            )

    result = {
        "model": args.model,
        "device": str(model.device),
        "torch_threads": args.threads,
        "clips": source,
        "n_clips": len(clips),
        "audio_seconds": round(audio_s, 2),
        "mean_clip_seconds": round(audio_s / len(clips), 2),
        "cpu_count": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "repeats": args.repeats,
        "results": rows,
        "runs": [{**r, "seconds": round(r["seconds"], 3)} for r in runs],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    print(
        f"\n{args.model} on {model.device}, {len(clips)} clips ({audio_s:.1f} s audio), "
        f"{args.threads} threads, load avg {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(f"{'method':<36}" + "".join(f"bs={bs:<10}" for bs in args.batch_sizes))
    for name, _ in methods:
        cells = {r["batch_size"]: r for r in rows if r["method"] == name}
        line = "".join(
            f"{cells[bs]['seconds_per_clip_min']:.3f}/{cells[bs]['seconds_per_clip_median']:.3f}"
            f"{'' if cells[bs]['same_tokens_as_first_run'] else '*':<2} "
            for bs in args.batch_sizes
        )
        print(f"{name:<36}{line}")
    print(f"seconds per clip, min/median of {args.repeats} runs; * = tokens differ from run 1")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
