"""The report's figures, each returned as PNG bytes (matplotlib's object API, Agg canvas)."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 110
LOSS_AND_ACCURACY = (("loss", "train_loss", "valid_loss"),
                     ("accuracy", "train_accuracy", "valid_accuracy"))


def png(figure: Figure) -> bytes:
    """Render a figure to PNG bytes."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _annotated_heatmap(ax, values: np.ndarray, fmt: str, cmap: str, vmin=None, vmax=None,
                       labels: np.ndarray | None = None):
    masked = np.ma.masked_invalid(values.astype(float))
    image = ax.imshow(masked, cmap=colormaps[cmap].with_extremes(bad="#dddddd"), vmin=vmin,
                      vmax=vmax, aspect="auto")
    for (i, j), value in np.ndenumerate(values if labels is None else labels):
        if isinstance(value, (float, np.floating)) and math.isnan(value):
            continue
        red, green, blue, _ = image.cmap(image.norm(masked[i, j]))
        dark = masked[i, j] is not np.ma.masked and 0.3 * red + 0.6 * green + 0.1 * blue < 0.5
        ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=8,
                color="white" if dark else "black")
    return image


def sweep_heatmap(grid: pd.DataFrame, metric: str) -> bytes:
    """The freeze x lr grid of the validation metric, annotated; grey where no trial ran."""
    figure = Figure(figsize=(1.3 * len(grid.columns) + 2.5, 0.55 * len(grid) + 1.5))
    ax = figure.subplots()
    cmap = "viridis_r" if metric.endswith("loss") else "viridis"
    image = _annotated_heatmap(ax, grid.to_numpy(dtype=float), ".3f", cmap)
    ax.set_xticks(range(len(grid.columns)), [f"{lr:g}" for lr in grid.columns])
    ax.set_yticks(range(len(grid)), [" / ".join(map(str, np.atleast_1d(i))) for i in grid.index])
    ax.set_xlabel("learning rate")
    ax.set_ylabel(" / ".join(grid.index.names))
    ax.set_title(f"{metric} (mean over repeats, last epoch)")
    figure.colorbar(image, ax=ax)
    return png(figure)


def sweep_curves(trials: pd.DataFrame, metric: str) -> bytes:
    """The validation metric of every trial by epoch, one colour per freeze spec."""
    figure = Figure(figsize=(8, 4))
    ax = figure.subplots()
    groups = trials.groupby("freeze") if "freeze" in trials.columns else [("trials", trials)]
    for (name, group), colour in zip(groups, _colours(len(groups))):
        for i, (_, trial) in enumerate(group.sort_values("epoch").groupby("trial_id")):
            ax.plot(trial["epoch"], trial[metric], color=colour, alpha=0.7, marker=".",
                    label=str(name) if i == 0 else None)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.set_title("every sweep trial (a line ends where it stopped)")
    ax.legend(fontsize=8)
    return png(figure)


def learning_curves(histories: pd.DataFrame) -> bytes:
    """Loss and accuracy by epoch: train dashed, validation solid, one colour per run."""
    panels = [p for p in LOSS_AND_ACCURACY if {p[1], p[2]} & set(histories.columns)]
    figure = Figure(figsize=(6 * len(panels), 4.2))
    axes = np.atleast_1d(figure.subplots(1, len(panels)))
    runs = list(dict.fromkeys(histories["configuration"]))
    for ax, (title, train, valid) in zip(axes, panels):
        for run, colour in zip(runs, _colours(len(runs))):
            history = histories[histories["configuration"] == run]
            label = run
            for column, style in ((valid, "-"), (train, "--")):
                if column in history.columns and history[column].notna().any():
                    ax.plot(history["epoch"], history[column], style, color=colour, label=label)
                    label = None
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{title} (validation solid, training dashed)")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return png(figure)


def per_class_heatmap(per_class: pd.DataFrame) -> bytes:
    """Per-class F1 (rows: classes with their test support; columns: approaches)."""
    scores = per_class.drop(columns="support")
    figure = Figure(figsize=(1.6 * len(scores.columns) + 3, 0.38 * len(scores) + 2))
    ax = figure.subplots()
    image = _annotated_heatmap(ax, scores.to_numpy(dtype=float), ".2f", "RdYlGn", 0.0, 1.0)
    ax.set_xticks(range(len(scores.columns)), scores.columns, rotation=30, ha="right")
    ax.set_yticks(range(len(scores)),
                  [f"{name} ({n})" for name, n in zip(scores.index, per_class["support"])])
    ax.set_title("F1 per class (test support in brackets)")
    figure.colorbar(image, ax=ax)
    return png(figure)


def confusion_grid(matrices: dict[str, pd.DataFrame]) -> bytes:
    """One confusion matrix per approach: counts, shaded by the share of each true class."""
    columns = min(2, len(matrices))
    rows = math.ceil(len(matrices) / columns)
    size = 0.42 * len(next(iter(matrices.values()))) + 2.5
    figure = Figure(figsize=(size * columns, size * rows))
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for ax, (title, matrix) in zip(axes, matrices.items()):
        counts = matrix.to_numpy()
        totals = counts.sum(axis=1, keepdims=True)
        shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
        _annotated_heatmap(ax, shares, ".0f", "Blues", 0.0, 1.0,
                           labels=np.where(counts > 0, counts, np.nan))
        ticks = range(len(matrix))
        ax.set_xticks(ticks, matrix.columns, rotation=90, fontsize=7)
        ax.set_yticks(ticks, matrix.index, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=9)
    for ax in axes[len(matrices):]:
        ax.set_visible(False)
    figure.tight_layout()
    return png(figure)


def _colours(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
