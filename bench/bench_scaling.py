"""Prune time and peak memory versus layer width, on synthetic layers, per method.

Layers are square-ish (``rows = --rows-ratio * inputs``) with inputs 384 (tiny), 768 (small),
1280 (large d_model), 2560 and 5120 (large's fc2 input); weights are N(0, 1/d) and Hessians are
correlated and positive definite: ``H = D (C + U U^T / r) D`` with ``C_ij = rho^|i-j|`` (local
correlation), a rank-r shared component ``U`` and log-normal channel scales ``D`` (outlier
channels, as in real activations). Every (method, width) runs in a fresh subprocess, timed and
measured for peak RSS there (getrusage max RSS after a high-water reset, see ``_benchlib``);
widths are visited in order and, at each width, the methods one after the other.

Before running a point, its time is predicted from the points measured so far (a log-log
least-squares fit; with one point, the method's theoretical exponent). A point predicted to
take longer than ``--max-seconds`` is not run: its time is extrapolated and marked as such.
Only ``--budgeted`` methods (default: obs) are skipped this way; the others always run (up to
``--timeout`` per point). The exponent k of ``time ~ d^k`` is fitted per method on the
measured points, and the width where a method would need more than ``--practical-seconds``
(default 10 min) per layer is reported.

    python bench/bench_scaling.py --max-seconds 120
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import _benchlib as bl

# Cost model for square layers (d rows, d inputs): magnitude/diagonal sort each row
# (~d^2 log d); SparseGPT inverts H and sweeps the columns (~d^3); exact OBS greedily removes
# k = d/2 weights per row at O(d t) per step (~d^4).
THEORY = {"magnitude": 2.0, "diagonal": 2.0, "sparsegpt": 3.0, "obs": 4.0}


def synthetic_layer(rows: int, d: int, seed: int, device: str, rho: float = 0.9, rank: int = 16):
    import torch

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, d, generator=g) / math.sqrt(d)
    idx = torch.arange(d, dtype=torch.float64)
    C = rho ** (idx[:, None] - idx[None, :]).abs()
    U = torch.randn(d, rank, generator=g, dtype=torch.float64)
    C += U @ U.T / rank
    scale = torch.exp(0.5 * torch.randn(d, generator=g, dtype=torch.float64))
    H = C * scale[:, None] * scale[None, :]
    return W.to(device), H.to(device)


def worker(spec: dict) -> None:
    import torch

    from whisper_obs_pruning.methods import REGISTRY, prune_layer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    W, H = synthetic_layer(spec["rows"], spec["d"], spec["seed"], device)
    H = H if REGISTRY[spec["method"]].needs_hessian else None
    pattern = None if spec["pattern"] == "unstructured" else spec["pattern"]

    def once():
        return prune_layer(
            W,
            H,
            method=spec["method"],
            sparsity=spec["sparsity"],
            pattern=pattern,
            rel_damp=spec["rel_damp"],
        )

    try:
        with bl.PeakMemory(device) as mem:
            seconds, res = bl.timed(once, device)
        times = [seconds]
        while sum(times) < 1.0 and len(times) < 5:  # fast points: best of up to five
            times.append(bl.timed(once, device)[0])
        out = {
            "seconds": min(times),
            "seconds_runs": [round(t, 4) for t in times],
            "sparsity": float(res.pruned_mask.float().mean()),
            **mem.result,
            "inputs_mb": round(
                (
                    W.numel() * W.element_size()
                    + (H.numel() * H.element_size() if H is not None else 0)
                )
                / 2**20,
                1,
            ),
        }
    except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
        out = {"error": f"{type(exc).__name__}: {exc}"}
    bl.worker_reply(out)


def fit_loglog(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least squares on log t = a + k log d; returns (k, a) or None with < 2 points."""
    pts = [(math.log(d), math.log(t)) for d, t in points if t > 0]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    k = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return k, my - k * mx


def predict(method: str, measured: list[tuple[int, float]], d: int) -> float | None:
    """Time at width d from the last measured point and a local exponent.

    The exponent is the log-log slope over the (up to) three largest measured widths, but at
    least 3/4 of the theoretical one (small widths are overhead-bound and flatten the slope);
    with one point, the theoretical exponent.
    """
    if not measured:
        return None
    fit = fit_loglog(measured[-3:])
    theory = THEORY.get(method, 3.0)  # a registered method without a cost model: ~SparseGPT
    k = theory if fit is None else max(fit[0], 0.75 * theory)
    d0, t0 = measured[-1]
    return t0 * (d / d0) ** k


def _limit_cell(width: int | None, largest: int) -> str:
    if not width:
        return "-"
    return f"> {4 * largest:,}" if width > 4 * largest else f"{width:,}"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == bl.WORKER_FLAG:
        worker(json.loads(sys.argv[2]))
        return
    ap = bl.base_parser(__doc__.splitlines()[0], "scaling")
    ap.add_argument("--sizes", type=bl.csv_list(int), default=[384, 768, 1280, 2560, 5120])
    ap.add_argument("--rows-ratio", type=float, default=1.0, help="rows = ratio * inputs")
    ap.add_argument(
        "--methods", type=bl.csv_list(), default=None, help="default: every registered method"
    )
    ap.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M, e.g. 2:4")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--rel-damp", type=float, default=0.01)
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        help="skip (and extrapolate) a point predicted to take longer than this",
    )
    ap.add_argument(
        "--practical-seconds",
        type=float,
        default=600.0,
        help="a method is 'impractical' for a layer above this time",
    )
    ap.add_argument(
        "--budgeted",
        type=bl.csv_list(),
        default=["obs"],
        help="methods whose points are skipped when predicted over --max-seconds",
    )
    ap.add_argument("--timeout", type=float, default=900.0, help="hard limit per point (s)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    device = bl.setup_torch(args)
    machine = bl.machine_info(device)
    import torch

    from whisper_obs_pruning.methods import REGISTRY

    if args.methods is None:
        args.methods = list(REGISTRY)
    unknown = [m for m in args.methods if m not in REGISTRY]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(REGISTRY)}")

    print(
        f"synthetic layers on {device}: widths {args.sizes}, rows = {args.rows_ratio} x inputs, "
        f"{args.pattern}{'' if args.pattern != 'unstructured' else f' {args.sparsity:.0%}'}; "
        f"budget {args.max_seconds:.0f} s per point",
        flush=True,
    )
    points: list[dict] = []
    measured: dict[str, list[tuple[int, float]]] = {m: [] for m in args.methods}
    for d in sorted(args.sizes):
        rows = max(1, round(args.rows_ratio * d))
        for method in args.methods:
            guess = predict(method, measured[method], d)
            base = {"method": method, "d": d, "rows": rows}
            if method in args.budgeted and guess is not None and guess > args.max_seconds:
                points.append(
                    {**base, "seconds": guess, "extrapolated": True, "predicted_seconds": guess}
                )
                print(f"  d={d:<5} {method:<9} skipped: predicted {guess:,.0f} s", flush=True)
                continue
            spec = {
                "method": method,
                "d": d,
                "rows": rows,
                "seed": args.seed,
                "device": device,
                "threads": args.threads or torch.get_num_threads(),
                "pattern": args.pattern,
                "sparsity": args.sparsity,
                "rel_damp": args.rel_damp,
            }
            r = bl.run_worker(Path(__file__), spec, timeout=args.timeout)
            if "error" in r:
                points.append({**base, "error": r["error"], "extrapolated": False})
                print(f"  d={d:<5} {method:<9} ERROR {r['error']}", flush=True)
                continue
            points.append({**base, **r, "extrapolated": False, "predicted_seconds": guess})
            measured[method].append((d, r["seconds"]))
            print(
                f"  d={d:<5} {method:<9} {r['seconds']:9.3f} s  peak RSS {r['rss_peak_mb']:7.0f} MB"
                f" (+{r['rss_delta_mb']:.0f} MB over inputs)"
                + (f"  [predicted {guess:.2f} s]" if guess is not None else ""),
                flush=True,
            )

    fits = {}
    for m in args.methods:
        all_fit = fit_loglog(measured[m])
        big_fit = fit_loglog(measured[m][-3:])
        practical = None
        if all_fit is not None:
            k, a = big_fit if big_fit is not None else all_fit
            practical = math.exp((math.log(args.practical_seconds) - a) / k) if k > 0 else None
        first_over = next(
            (
                p["d"]
                for p in points
                if p["method"] == m and "seconds" in p and p["seconds"] > args.practical_seconds
            ),
            None,
        )
        fits[m] = {
            "exponent_all": round(all_fit[0], 3) if all_fit else None,
            "exponent_largest3": round(big_fit[0], 3) if big_fit else None,
            "theory": THEORY.get(m),
            "measured_widths": [d for d, _ in measured[m]],
            "width_at_practical_limit": round(practical) if practical else None,
            "first_listed_width_over_limit": first_over,
        }

    print()
    print(
        f"prune time per layer (s) on {device}, rows = {args.rows_ratio} x inputs; "
        f"load avg {machine['loadavg_start'][:1]} -> {bl.loadavg()[:1]}; ~ = extrapolated"
    )
    sizes = sorted(args.sizes)

    def cell(m: str, d: int, key: str) -> str:
        p = next((p for p in points if p["method"] == m and p["d"] == d), None)
        if p is None:
            return "-"
        if "error" in p:
            return "error"
        if key == "seconds":
            v = p["seconds"]
            s = f"{v:,.3f}" if v < 10 else f"{v:,.0f}"
            return ("~" + s) if p["extrapolated"] else s
        return "-" if p["extrapolated"] else f"{p.get(key, 0):,.0f}"

    print(
        bl.table(
            [
                "method",
                *[f"d={d}" for d in sizes],
                "k (fit)",
                "k (3 largest)",
                f">{args.practical_seconds:.0f}s at d",
            ],
            [
                [
                    m,
                    *[cell(m, d, "seconds") for d in sizes],
                    bl.fmt(fits[m]["exponent_all"], 2),
                    bl.fmt(fits[m]["exponent_largest3"], 2),
                    _limit_cell(fits[m]["width_at_practical_limit"], max(sizes)),
                ]
                for m in args.methods
            ],
        )
    )
    print("\npeak RSS over the inputs (MB), fresh subprocess per point")
    print(
        bl.table(
            ["method", *[f"d={d}" for d in sizes]],
            [[m, *[cell(m, d, "rss_delta_mb") for d in sizes]] for m in args.methods],
        )
    )
    for m in args.methods:
        f = fits[m]
        if f["width_at_practical_limit"] and f["width_at_practical_limit"] <= 4 * max(sizes):
            print(
                f"{m}: time ~ d^{f['exponent_largest3'] or f['exponent_all']:.2f}; a layer takes "
                f"> {args.practical_seconds:.0f} s from d ~ {f['width_at_practical_limit']:,}"
            )

    bl.write_result(
        args.out,
        {
            "benchmark": "scaling",
            "sizes": sizes,
            "rows_ratio": args.rows_ratio,
            "pattern": args.pattern,
            "sparsity": args.sparsity,
            "max_seconds": args.max_seconds,
            "practical_seconds": args.practical_seconds,
            "hessian": "H = D (C + U U^T/16) D, C_ij = 0.9^|i-j|, D = exp(N(0, 0.25)); W ~ N(0, 1/d)",
            "memory_method": (
                "fresh subprocess per point; peak RSS = getrusage ru_maxrss after resetting the "
                "high-water mark (/proc/self/clear_refs) once W and H exist; rss_delta_mb = "
                "peak - RSS before pruning (the method's working memory)"
            ),
            "points": points,
            "fits": fits,
        },
        machine,
    )


if __name__ == "__main__":
    main()
