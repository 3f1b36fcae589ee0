"""Shared plumbing for the benchmarks in ``bench/``: arguments, machine info, memory, output.

Memory is measured as the process's peak resident set size (RSS), never with tracemalloc
(torch allocates outside Python's allocator, so tracemalloc sees almost nothing). Each
variant runs in a fresh subprocess; after its setup (imports, model, data) the kernel's RSS
high-water mark is reset by writing ``5`` to ``/proc/self/clear_refs`` and, after the measured
section, read back with ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the same number as
``VmHWM``). Where the reset is not allowed (non-Linux, locked-down /proc) a psutil thread
samples RSS every 2 ms instead; the JSON says which one was used. On CUDA the peak of
``torch.cuda.max_memory_allocated`` is reported beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "metrics" / "bench"
if importlib.util.find_spec("whisper_obs_pruning") is None:  # not pip-installed: use the checkout
    sys.path.insert(0, str(REPO / "src"))

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ------------------------------------------------------------------ arguments
def base_parser(description: str, name: str) -> argparse.ArgumentParser:
    """Parser with the flags every benchmark shares: --device, --out, --threads."""
    ap = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="cpu",
        help="where the model runs; auto = cuda when available",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=BENCH_DIR / f"{name}.json",
        help="JSON result file",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's own choice)",
    )
    return ap


def csv_list(kind: Callable[[str], Any] = str) -> Callable[[str], list]:
    """argparse type for comma-separated lists: ``--methods a,b`` -> ``["a", "b"]``."""

    def parse(text: str) -> list:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]

    return parse


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here (use cpu or auto)")
    return device


def setup_torch(args: argparse.Namespace) -> str:
    """Apply --threads, quiet transformers, resolve --device; return the device string."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass
    return resolve_device(args.device)


def sync(device: str) -> None:
    """Wait for queued GPU work so wall-clock timings are real."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# ------------------------------------------------------------------ machine info
def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info(device: str) -> dict:
    """What the numbers were measured on (call at start; ``finish`` adds the end load)."""
    import torch

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:  # pragma: no cover
        tf_version = None
    info = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": loadavg(),
        "memory_total_mb": _mem_total_mb(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _mem_total_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def command_line() -> str:
    return shlex.join([sys.executable, *sys.argv])


def write_result(path: Path, result: dict, machine: dict) -> None:
    """Write ``result`` with the machine info (end load added) and the exact command line."""
    machine = {**machine, "loadavg_end": loadavg()}
    payload = {"command": command_line(), "cwd": os.getcwd(), "machine": machine, **result}
    from whisper_obs_pruning.atomic import write_text_atomic

    path = Path(path)
    write_text_atomic(path, json.dumps(payload, indent=2, default=_json_default) + "\n")
    print(f"wrote {path}")


def _json_default(o: object) -> object:
    if isinstance(o, Path):
        return str(o)
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ------------------------------------------------------------------ tables
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    """Right-aligned plain-text (or markdown) table of already formatted cells."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if markdown:
        out = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |"]
        out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        out += [
            "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"
            for r in cells[1:]
        ]
        return "\n".join(out)
    out = ["  ".join(c.rjust(w) for c, w in zip(cells[0], widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
    return "\n".join(out)


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (x != x):
        return "nan"
    return f"{x:.{digits}f}"


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


# ------------------------------------------------------------------ memory
def rss_mb() -> float:
    """Current resident set size of this process (MB)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss / 2**20


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _maxrss_mb() -> float:
    """Peak RSS since the last reset: ``VmHWM`` (= getrusage ru_maxrss on Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


class PeakMemory:
    """Context manager: peak RSS (and CUDA peak) of the code inside it, in this process.

    Use it in a fresh subprocess per variant (see ``run_worker``) so nothing measured before
    (another variant, a larger earlier allocation) hides in the high-water mark.
    """

    def __init__(self, device: str = "cpu", sample_s: float = 0.002) -> None:
        self.device = device
        self.sample_s = sample_s
        self.result: dict = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak_sampled = 0.0

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self._peak_sampled = max(self._peak_sampled, proc.memory_info().rss / 2**20)
            time.sleep(self.sample_s)

    def __enter__(self) -> PeakMemory:
        import gc

        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_base = torch.cuda.memory_allocated() / 2**20
        self.baseline = rss_mb()
        self.method = (
            "peak RSS (VmHWM = getrusage ru_maxrss) after resetting the high-water mark "
            "(/proc/self/clear_refs)"
            if _reset_hwm()
            else "psutil RSS sampling every 2 ms"
        )
        if self.method.startswith("psutil"):
            self._peak_sampled = self.baseline
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak_sampled, rss_mb())
        else:
            peak = _maxrss_mb()
        self.result = {
            "rss_baseline_mb": round(self.baseline, 1),
            "rss_peak_mb": round(peak, 1),
            "rss_delta_mb": round(max(0.0, peak - self.baseline), 1),
            "memory_method": self.method,
        }
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.result["cuda_baseline_mb"] = round(self._cuda_base, 1)
            self.result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            self.result["cuda_delta_mb"] = round(
                self.result["cuda_peak_mb"] - self.result["cuda_baseline_mb"], 1
            )


WORKER_FLAG = "--_worker"


def run_worker(script: Path, spec: dict, timeout: float | None = None) -> dict:
    """Run ``script --_worker '<json spec>'`` in a fresh interpreter; return its JSON answer.

    The worker prints exactly one line starting with ``RESULT `` followed by JSON.
    """
    cmd = [sys.executable, str(script), WORKER_FLAG, json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {timeout} s"}
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT ") :])
            out["worker_wall_seconds"] = round(wall, 2)
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"worker exited {proc.returncode}: " + " | ".join(tail)}


def worker_reply(obj: dict) -> None:
    print("RESULT " + json.dumps(obj, default=_json_default), flush=True)


# ------------------------------------------------------------------ model helpers
def layer_group(name: str) -> tuple[str, str]:
    """(side, kind) of a Whisper Linear: side ``encoder`` / ``decoder``; kind ``q`` / ``k`` /
    ``v`` / ``out`` / ``fc1`` / ``fc2``, with ``cross-`` before the decoder's cross-attention."""
    side = "encoder" if ".encoder." in f".{name}." else "decoder"
    last = name.rsplit(".", 1)[-1]
    kind = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "out"}.get(last, last)
    if ".encoder_attn." in name:
        kind = f"cross-{kind}"
    return side, kind


def timed(fn: Callable[[], Any], device: str = "cpu") -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def hf_generate_tokens(model, processor, audios, prompt, batch_size: int) -> list[list[int]]:
    """Plain greedy ``model.generate`` with the prompt forced: the floor to compare against."""
    import torch

    from whisper_obs_pruning.whisper.decoding import log_mel_features

    eot = model.generation_config.eos_token_id
    out: list[list[int]] = []
    for i in range(0, len(audios), batch_size):
        chunk = audios[i : i + batch_size]
        feats = log_mel_features(processor, chunk, device=model.device, dtype=model.dtype)
        dec = torch.tensor([prompt] * len(chunk), device=model.device)
        with torch.inference_mode():
            seqs = model.generate(
                feats,
                decoder_input_ids=dec,
                num_beams=1,
                do_sample=False,
                max_new_tokens=448 - len(prompt),
            )
        for row in seqs.tolist():
            if row[: len(prompt)] == prompt:
                row = row[len(prompt) :]
            out.append(row[: row.index(eot)] if eot in row else row)
    return out
