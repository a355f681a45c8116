"""Figures of the evaluation report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# (history key, axis title, transform) of the training-curve panels
HISTORY_PANELS = (
    ("loss", "total loss", np.asarray),
    ("impute_mse", "imputation RMSE (masked samples)", np.sqrt),
    ("class_ce", "classification cross-entropy", np.asarray),
    ("anomaly_loss", "anomaly loss (abnormality CE; EcgNet 1: reconstruction MSE)", np.asarray),
)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _shade_gaps(ax, missing: np.ndarray) -> None:
    """Shade each run of missing samples."""
    edges = np.diff(np.concatenate([[0], missing.astype(int), [0]]))
    for start, stop in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
        ax.axvspan(start - 0.5, stop - 0.5, color="0.85", zorder=0)


def plot_repairs(path, original, missing, recovered, lengths, titles, cols: int = 4) -> Path:
    """Grid of beats: Original (green), Masked input (red dashed, NaN in gaps), Recovered (blue).

    Only the signal-bearing part of each beat is drawn; the imputed region is shaded.
    """
    rows = -(-len(original) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(original) :]:
        ax.axis("off")
    for ax, beat, miss, rec, n, title in zip(
        axes.flat, original, missing, recovered, lengths, titles, strict=False
    ):
        x = np.arange(int(n))
        _shade_gaps(ax, miss[:n])
        ax.plot(x, beat[:n], color="green", lw=1.6, label="Original")
        ax.plot(x, rec[:n], color="blue", lw=1.0, label="Recovered")
        masked = np.where(miss[:n], np.nan, beat[:n])  # NaN: the gaps show as breaks
        ax.plot(x, masked, "r--", lw=1.0, label="Masked input", zorder=3)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7, loc="upper right")
    return _save(fig, Path(path))


def plot_confusion(path, matrix, classes, title: str) -> Path:
    """Confusion-matrix heatmap: colour = row-normalised rate (sensitivity), text = counts."""
    cm = np.asarray(matrix, dtype=float)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(cm):
        colour = "white" if rates[i, j] > 0.6 else "black"
        ax.text(j, i, f"{int(count)}", ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, label="row rate")
    return _save(fig, Path(path))


def plot_history(path, histories: dict[str, list[dict]]) -> Path:
    """Per-epoch training curves of several checkpoints (one line per checkpoint)."""
    fig, axes = plt.subplots(1, len(HISTORY_PANELS), figsize=(4.0 * len(HISTORY_PANELS), 3.2))
    for ax, (key, title, transform) in zip(axes, HISTORY_PANELS, strict=True):
        for name, history in histories.items():
            epochs = [h["epoch"] for h in history if key in h]
            values = transform([h[key] for h in history if key in h])
            ax.plot(epochs, values, marker="o", ms=3, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=8)
    return _save(fig, Path(path))
