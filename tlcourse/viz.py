"""Plots the chapters share: learning curves, image grids with labels, top-k bars."""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch


def plot_history(history: Mapping[str, Sequence[float]], title: str | None = None, axes=None):
    """Loss and accuracy per epoch, train vs validation, side by side. Returns the figure."""
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    else:
        fig = axes[0].figure
    for ax, metric in zip(axes, ("loss", "acc")):
        for split, style in (("train", "-"), ("val", "--")):
            values = history.get(f"{split}_{metric}")
            if values:
                ax.plot(range(1, len(values) + 1), values, style, marker="o", ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if metric == "acc" else "loss")
        ax.grid(alpha=0.3)
        ax.legend()
    best = getattr(history, "best_epoch", None)
    if best is not None and history.get("val_acc"):
        axes[1].axvline(best + 1, color="grey", lw=0.8, ls=":")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def to_image(x, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> np.ndarray:
    """A displayable ``[H, W, 3]`` array in [0, 1] from a normalised tensor ``[3, H, W]``,
    a ``[H, W]`` grey tensor/array, or a PIL image."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu()
        if x.ndim == 3 and x.shape[0] in (1, 3):
            x = x * torch.tensor(std[: x.shape[0]]).view(-1, 1, 1) + torch.tensor(mean[: x.shape[0]]).view(-1, 1, 1)
            x = x.permute(1, 2, 0)
        x = x.numpy()
    x = np.asarray(x)
    if x.dtype == np.uint8:
        x = x / 255.0
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
    return np.clip(x, 0, 1)


def show_images(images, titles: Sequence[str] | None = None, ncols: int = 4, size: float = 2.4,
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), colors: Sequence[str] | None = None):
    """A grid of images with optional titles (e.g. predicted labels; ``colors`` marks right/wrong)."""
    images = list(images)
    ncols = min(ncols, len(images))
    nrows = math.ceil(len(images) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(images):
            continue
        img = to_image(images[i], mean, std)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        if titles is not None:
            ax.set_title(titles[i], fontsize=9, **({} if colors is None else {"color": colors[i]}))
    fig.tight_layout()
    return fig


def show_predictions(images, predicted: Sequence[str], actual: Sequence[str] | None = None, **kwargs):
    """Image grid titled with predicted labels; green when right, red when wrong."""
    if actual is None:
        return show_images(images, list(predicted), **kwargs)
    titles = [f"{p}\n(true: {a})" if p != a else p for p, a in zip(predicted, actual)]
    colors = ["tab:green" if p == a else "tab:red" for p, a in zip(predicted, actual)]
    return show_images(images, titles, colors=colors, **kwargs)


def plot_topk(predictions: Sequence[tuple[str, float]], ax=None, title: str | None = None):
    """Horizontal bars of one image's top-k ``(class, probability)`` pairs."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 2))
    names = [name.split(",")[0] for name, _ in predictions][::-1]
    probs = [p for _, p in predictions][::-1]
    ax.barh(names, probs, color="tab:blue")
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def draw_pipeline(stages: Sequence[tuple[str, str]], ax=None, title: str | None = None):
    """A left-to-right box diagram of a model pipeline.

    ``stages`` are ``(label, state)`` pairs with state ``"data"``, ``"frozen"``,
    ``"trained"`` or ``"cached"``; the colour legend says which parts learn.
    """
    colours = {"data": "#eeeeee", "frozen": "#9ecae1", "trained": "#fdae6b", "cached": "#c7e9c0"}
    if ax is None:
        _, ax = plt.subplots(figsize=(2.3 * len(stages), 1.6))
    for i, (label, state) in enumerate(stages):
        ax.add_patch(plt.Rectangle((i * 2.3, 0), 1.8, 1, facecolor=colours[state], edgecolor="black"))
        ax.text(i * 2.3 + 0.9, 0.5, label, ha="center", va="center", fontsize=9, wrap=True)
        if i:
            ax.annotate("", xy=(i * 2.3, 0.5), xytext=(i * 2.3 - 0.5, 0.5), arrowprops={"arrowstyle": "->"})
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=colours[s], edgecolor="black") for s in ("frozen", "cached", "trained")]
    ax.legend(handles, ["frozen (no gradients)", "computed once, cached", "trained"], loc="upper center",
              bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    ax.set_xlim(-0.1, len(stages) * 2.3 - 0.4)
    ax.set_ylim(-0.1, 1.1)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def plot_domains(embedding: np.ndarray, labels: Sequence[int], is_target: Sequence[bool], ax=None,
                 title: str | None = None, classes: Sequence[str] | None = None):
    """A 2-D embedding ``[N, 2]`` (t-SNE, PCA) of two domains: colour = class, marker = domain
    (dots: source, crosses: target). Returns the axes."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4))
    labels, is_target = np.asarray(labels), np.asarray(is_target, dtype=bool)
    cmap = plt.get_cmap("tab10")
    for domain, marker, name in ((False, "o", "source"), (True, "x", "target")):
        sel = is_target == domain
        ax.scatter(*embedding[sel].T, c=[cmap(int(c) % 10) for c in labels[sel]], marker=marker,
                   s=10 if marker == "o" else 14, lw=0.8, alpha=0.6, label=name)
    if classes is not None:
        for c, name in enumerate(classes):  # class colours, placed at each class's centre
            centre = np.median(embedding[labels == c], axis=0)
            ax.annotate(name, centre, fontsize=11, weight="bold", color=cmap(c % 10), ha="center")
    ax.set_xticks([])
    ax.set_yticks([])
    leg = ax.legend(loc="lower right", fontsize=8)
    for handle in leg.legend_handles:
        handle.set_color("grey")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def plot_softened(logits: torch.Tensor, classes: Sequence[str], temperature: float, k: int = 8, ax=None):
    """Bars of ``softmax(logits / T)`` for the ``k`` classes with the largest logits ``[C]``.

    The classes stay in the same order at every temperature, so a row of these plots shows
    the probability mass moving from the top class to the runners-up as T grows. The x-axis
    fits the largest bar; the title gives the mass left for the other ``C - k`` classes.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 2.4))
    logits = torch.as_tensor(logits).float().flatten()
    probs = torch.softmax(logits / temperature, dim=0)
    top = logits.topk(min(k, len(logits))).indices.tolist()
    values = [probs[i].item() for i in top]
    ax.barh([classes[i].split(",")[0] for i in top][::-1], values[::-1], color="tab:purple")
    ax.set_xlim(0, 1.15 * max(values))
    ax.set_xlabel("probability")
    rest = len(logits) - len(top)
    tail = f"{max(0.0, 1 - sum(values)):.2f} left for the other {rest}" if rest else f"all {len(top)} classes shown"
    ax.set_title(f"T = {temperature:g}: {tail}", fontsize=10)
    ax.tick_params(labelsize=8)
    return ax


def temperature_slider(logits: torch.Tensor, classes: Sequence[str], k: int = 8, temperature: float = 1.0):
    """An ipywidgets slider over T for :func:`plot_softened` (T from 0.5 to 16, log scale).

    In a live notebook it redraws as the slider moves. Executed headless (``tlcourse run`` and
    the tests set ``TLCOURSE_HEADLESS=1``), or where ipywidgets is missing, a slider would be
    saved as a blank widget: the figure for ``temperature`` is drawn once instead, and its
    axes are returned.
    """
    try:
        import ipywidgets as widgets
    except ImportError:
        widgets = None
    if widgets is None or os.environ.get("TLCOURSE_HEADLESS"):
        return plot_softened(logits, classes, temperature, k)
    slider = widgets.FloatLogSlider(value=temperature, base=2, min=-1, max=4, step=0.25,
                                    description="temperature T", continuous_update=False,
                                    style={"description_width": "initial"})  # the default width cuts the label

    def draw(temperature):
        plot_softened(logits, classes, temperature, k)
        plt.show()

    return widgets.interact(draw, temperature=slider)


def plot_heatmap(values, rows: Sequence, cols: Sequence, row_label: str, col_label: str, ax=None,
                 title: str | None = None, fmt: str = "{:.3f}", cmap: str = "viridis"):
    """A table of numbers ``values [len(rows), len(cols)]`` as a coloured grid, each cell printed."""
    values = np.asarray(values, dtype=float)
    if values.shape != (len(rows), len(cols)):
        raise ValueError(f"values {values.shape} do not match {len(rows)} rows x {len(cols)} columns")
    if ax is None:
        _, ax = plt.subplots(figsize=(1.1 * len(cols) + 1.5, 0.6 * len(rows) + 1.2))
    image = ax.imshow(values, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    middle = (np.nanmax(values) + np.nanmin(values)) / 2
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=9,
                color="black" if v > middle else "white")
    plt.colorbar(image, ax=ax, fraction=0.05)
    if title:
        ax.set_title(title, fontsize=10)
    return ax
