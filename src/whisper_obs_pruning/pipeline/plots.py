"""The sweep's figures: WER against sparsity (per method) and WER against checkpoint size."""

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
    """WER against the compressed checkpoint's MB: every point, the dense fp32 / fp16 references.

    The frontier users decide on: the lower left is better. A marker per method, a colour per
    quantization scheme; values above the axis are written at the edge.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    dense = summary["dense"]
    mb = 1e6
    ref = 100 * dense["wer"]
    ax.axhline(ref, color="black", ls="--", lw=1, label=f"dense WER ({ref:.1f}%)")
    for nbytes, label in (
        (dense.get("model_bytes"), "fp32"),
        (dense.get("model_bytes_fp16"), "fp16"),
    ):
        if nbytes:
            ax.axvline(nbytes / mb, color="gray", ls=":", lw=1)
            ax.annotate(
                f"dense {label}",
                (nbytes / mb, 0),
                rotation=90,
                fontsize=7,
                color="gray",
                xytext=(2, 2),
                textcoords="offset points",
            )
    quants = list(dict.fromkeys(pt.get("quant", "none") for pt in summary["points"]))
    methods = list(dict.fromkeys(pt["method"] for pt in summary["points"]))
    markers = "osD^v<>P*X"
    top = max(100.0, ref * 4)
    for pt in summary["points"]:
        if not pt.get("model_bytes"):
            continue
        q = pt.get("quant", "none")
        m = pt["method"]
        y = min(100 * pt["wer"], top)
        ax.scatter(
            pt["model_bytes"] / mb,
            y,
            marker=markers[methods.index(m) % len(markers)],
            color=f"C{quants.index(q)}",
            s=36,
            label=f"{m} / {q}",
        )
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, ncol=2, loc="upper right")
    ax.set_ylim(0, top * 1.05)
    ax.set_xlim(left=0)
    ax.set_xlabel("compressed checkpoint (MB, weights file)")
    ax.set_ylabel("WER (%)")
    ax.set_title(
        f"{summary['model_id']}: WER vs checkpoint size ({summary['num_utterances']} utts)"
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
