"""The report's plots (matplotlib, Agg), each returned as a base64 PNG for inlining into ``report.html``."""

from __future__ import annotations

import base64
import io
from typing import Any, Dict

from pipelines.formats.model import read_metrics


def png(fig) -> str:
    """The figure as base64 PNG (90 dpi, tight); the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def learning_curves(stages, names: Dict[str, str]) -> str:
    """Held-out loss and accuracy vs step of each ``label -> train stage``, and Grad-Mimic's ``alignment``."""
    import matplotlib.pyplot as plt
    import pandas as pd

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for label, name in names.items():
        m = read_metrics(stages[name]["dir"]).to_pandas()
        ev = m[m["test_loss"].notna()] if "test_loss" in m else pd.DataFrame()
        if len(ev):
            axes[0].plot(ev["step"], ev["test_loss"], marker="o", ms=3, label=f"{label} ({name})")
            if "test_accuracy" in ev:
                axes[1].plot(ev["step"], ev["test_accuracy"], marker="o", ms=3, label=f"{label} ({name})")
        if label == "Grad-Mimic" and "alignment" in m:
            axes[2].plot(m["step"], m["alignment"], lw=1, label="alignment (mimic)")
    for ax, title in zip(axes, ("held-out loss", "held-out (zero-shot) accuracy", "alignment with the task vector")):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
        else:  # nothing to show (a pool without labels has no accuracy): no empty frame
            ax.set_visible(False)
    return png(fig)


def detection_plots(counts, det: Dict[str, Any]) -> str:
    """Histograms of ``mean_score`` for clean vs corrupted samples (``counts``: a
    :class:`pipelines.report.samples.Detection`, the clean ones already counted in its bins), and the ROC curve of
    ``det`` when it has one."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    if counts.bins is not None:
        bins = counts.bins
        axes[0].hist(bins[:-1], bins=bins, weights=counts.clean_hist, alpha=0.6, label="clean")
        axes[0].hist(counts.bad_scores, bins=bins, alpha=0.6, label="corrupted")
    axes[0].set_title("mean mimic score")
    axes[0].legend(fontsize=7)
    if "_roc" in det:
        fpr, tpr = det["_roc"]
        axes[1].plot(fpr, tpr, label=f"AUROC {det['detection_auroc']:.3f}")
        axes[1].plot([0, 1], [0, 1], ls=":", c="grey")
        axes[1].set_xlabel("false positive rate")
        axes[1].set_ylabel("true positive rate")
        axes[1].set_title("detecting corrupted samples")
        axes[1].legend(fontsize=7)
    return png(fig)


def efficiency_plot(curves: Dict[str, Dict[str, Dict[str, Any]]]) -> str:
    """Test accuracy (mean, std error bars) vs the kept fraction, one line per ranking column."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for column, by in curves.items():
        ps = sorted(by, key=float)
        ax.errorbar([float(p) * 100 for p in ps], [by[p]["mean"] for p in ps], yerr=[by[p]["std"] for p in ps],
                    marker="o", ms=4, capsize=3, label=f"{'random' if column == 'random' else 'top by ' + column} p%")
    ax.set_xlabel("training samples kept (p %)")
    ax.set_ylabel("test accuracy")
    ax.set_title("data efficiency")
    ax.legend(fontsize=7)
    return png(fig)
