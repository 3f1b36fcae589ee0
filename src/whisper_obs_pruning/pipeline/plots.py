"""The sweep's figures: WER against sparsity (per method), checkpoint size and CPU latency."""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_x(pt: dict) -> float:
    """Sparsity in percent; N:M points sit just right of the unstructured point they equal."""
    return 100 * pt["sparsity"] + (0.0 if pt["pattern"] == "unstructured" else 1.5)


def _plot_label(pt: dict) -> str:
    return pt["method"] if pt["pattern"] == "unstructured" else f"{pt['method']} {pt['pattern']}"


def plot_sparsity(summary: dict, path: Path) -> None:
    """WER against sparsity: a line per method, N:M as separate markers, dense dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    dense = summary["dense"]["wer"] * 100
    ax.axhline(dense, color="black", ls="--", lw=1, label=f"dense ({dense:.1f}%)")
    methods = list(dict.fromkeys(pt["method"] for pt in summary["points"]))
    all_wer = [dense]
    for i, m in enumerate(methods):
        color = f"C{i}"
        pts = sorted(
            (
                pt
                for pt in summary["points"]
                if pt["method"] == m and pt["pattern"] == "unstructured"
            ),
            key=lambda pt: pt["target_sparsity"],
        )
        if pts:
            xs = [0] + [100 * pt["sparsity"] for pt in pts]
            ys = [dense] + [100 * pt["wer"] for pt in pts]
            ax.plot(xs, ys, marker="o", color=color, label=m, clip_on=True)
            all_wer += ys
        for pt in summary["points"]:
            if pt["method"] == m and pt["pattern"] != "unstructured":
                ax.scatter(
                    _plot_x(pt),
                    100 * pt["wer"],
                    marker="s",
                    s=60,
                    facecolors="none",
                    edgecolors=color,
                    label=_plot_label(pt),
                )
                all_wer.append(100 * pt["wer"])
    top = min(max(all_wer) * 1.1, max(100.0, dense * 4))
    ax.set_ylim(0, top)
    if max(all_wer) > top:  # degenerate points: drawn at the top edge, values listed below it
        over: dict[float, list[str]] = {}
        for m in methods:
            for pt in summary["points"]:
                if pt["method"] == m and 100 * pt["wer"] > top:
                    label = f"{_plot_label(pt)} {100 * pt['wer']:.0f}%"
                    over.setdefault(round(_plot_x(pt), 1), []).append(label)
        for x, labels in over.items():
            ax.annotate(
                "\n".join(labels),
                (x, top),
                xytext=(-4, -4),
                textcoords="offset points",
                ha="right",
                va="top",
                fontsize=7,
                color="gray",
            )
        ax.set_title(
            f"{summary['model_id']}: WER vs sparsity ({summary['num_utterances']} utts; "
            f"values above {top:.0f}% written at the edge)",
            fontsize=10,
        )
    else:
        ax.set_title(f"{summary['model_id']}: WER vs sparsity ({summary['num_utterances']} utts)")
    ax.set_xlabel("sparsity of pruned Linear layers (%)")
    ax.set_ylabel("WER (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="center left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_size(summary: dict, path: Path) -> None:
    """WER against the compressed checkpoint's MB: every point, the dense fp32 / fp16 references,
    one panel per evaluation split (the embedded one, then e.g. ``real``).

    The frontier users decide on: the lower left is better. A marker per method, a colour per
    quantization scheme (``ct2-int8``: the CTranslate2 export, its ``model.bin``).
    """
    dense = summary["dense"]
    refs = [(dense.get(k), f"dense {name}") for k, name in (("model_bytes", "fp32"),
                                                            ("model_bytes_fp16", "fp16"))]  # fmt: skip
    _plot_frontier(
        summary,
        path,
        lambda pt: pt["model_bytes"] / 1e6 if pt.get("model_bytes") else None,
        [(v / 1e6, label) for v, label in refs if v],
        "compressed checkpoint (MB, weights file)",
        "WER vs checkpoint size",
    )


def plot_latency(summary: dict, path: Path) -> bool:
    """WER against CPU seconds per clip (one thread, batch 1); False (nothing drawn) when the
    grid timed no point.

    Every point was timed side by side with dense PyTorch in its own process, at its own
    moment of a shared machine's load, so x is the dense model's time divided by the point's
    paired speed-up (``whisper/latency.py``), not its raw seconds from another moment."""
    dense = summary["dense"]
    base = dense.get("latency_seconds_per_clip")
    if base is None:
        return False
    _plot_frontier(
        summary,
        path,
        lambda pt: base / pt["speedup"] if pt.get("speedup") else None,
        [(base, "dense PyTorch")],
        "CPU seconds per clip (1 thread, batch 1): dense time / measured speed-up",
        "WER vs latency",
    )
    return True


def _plot_frontier(summary: dict, path: Path, x_of, refs, xlabel: str, what: str) -> None:
    """A panel per evaluation split of WER against ``x_of(point)``: dense WER dashed, the
    ``refs`` as labelled vertical lines, a marker per method, a colour per quantization."""
    plt = _pyplot()
    dense = summary["dense"]
    splits = [("wer", f"{summary['num_utterances']} utts")] + [
        (f"wer_{k.removeprefix('num_utterances_')}", f"{k.removeprefix('num_utterances_')}, "
         f"{dense[k]} utts")
        for k in dense
        if k.startswith("num_utterances_")
    ]  # fmt: skip
    fig, axes = plt.subplots(1, len(splits), figsize=(7 * len(splits), 4.5), dpi=120, squeeze=False)
    quants = list(dict.fromkeys(pt.get("quant", "none") for pt in summary["points"]))
    methods = list(dict.fromkeys(pt["method"] for pt in summary["points"]))
    markers = "osD^v<>P*X"
    for ax, (key, split) in zip(axes[0], splits, strict=True):
        ref = 100 * dense[key]
        ax.axhline(ref, color="black", ls="--", lw=1, label=f"dense WER ({ref:.1f}%)")
        for x, label in refs:
            ax.axvline(x, color="gray", ls=":", lw=1)
            ax.annotate(label, (x, 0), rotation=90, fontsize=7, color="gray", xytext=(2, 2),
                        textcoords="offset points")  # fmt: skip
        # zoom on the points (a broken one, far above, is drawn at the edge)
        shown = [100 * pt[key] for pt in summary["points"] if key in pt and x_of(pt) is not None]
        top = min(max([2 * ref, *(1.15 * w for w in shown)]), max(100.0, 4 * ref))
        for pt in summary["points"]:
            x = x_of(pt)
            if x is None or key not in pt:
                continue
            q = pt.get("quant", "none")
            ax.scatter(
                x,
                min(100 * pt[key], top),
                marker=markers[methods.index(pt["method"]) % len(markers)],
                color=f"C{quants.index(q)}",
                s=36,
                label=f"{pt['method']} / {q}",
            )
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=True))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, ncol=2, loc="upper right")
        ax.set_ylim(0, top * 1.05)
        xs = [x for pt in summary["points"] if (x := x_of(pt)) is not None]
        ax.set_xlim(0, 1.08 * max([*xs, *(x for x, _ in refs)], default=1.0))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("WER (%)")
        ax.set_title(f"{summary['model_id']}: {what} ({split})")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
