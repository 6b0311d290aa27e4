"""The book's shared figure style and provenance captions.

Every figure and table in the book names the notebook and config that produced it
(:func:`provenance`), so a number can be traced back to code and parameters.
"""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.colors import to_rgba
from matplotlib.patches import Rectangle

from cosmoslib.analysis.stats import ALPHA

#: Colours of the paper's Fig. 9: green stars positive points, blue stars negative, green box.
POSITIVE = "#2ca02c"
NEGATIVE = "#1f77b4"
BOX = "#2ca02c"


def use_style() -> None:
    """Apply the book's matplotlib/seaborn style (call once per notebook)."""
    matplotlib.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "figure.figsize": (7.0, 3.6),
                                "axes.spines.top": False, "axes.spines.right": False})
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")


def provenance(notebook: str, config: str) -> str:
    """The sentence every caption ends with, e.g. ``"notebooks/00_dataset.ipynb, config demo"``."""
    return f"Produced by `notebooks/{notebook}.ipynb` with config `{config}`."


def bar(series, ax=None, xlabel: str = "", ylabel: str = "", rotate: int = 60, log: bool = False):
    """Bar chart of a Series (index on x), returned as the Axes."""
    if ax is None:
        _, ax = plt.subplots()
    ax.bar(range(len(series)), series.to_numpy(), color=sns.color_palette()[0])
    ax.set_xticks(range(len(series)))
    ax.set_xticklabels([str(i) for i in series.index], rotation=rotate, ha="right" if rotate else "center")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    return ax


def show_image(ax, image) -> None:
    """Show a grey or RGB uint8 image without axes."""
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
    ax.set_axis_off()


def overlay(ax, mask, color: str, alpha: float = 0.45) -> None:
    """Overlay a boolean mask in one colour."""

    rgba = np.zeros(mask.shape + (4,))
    rgba[mask] = to_rgba(color, alpha)
    ax.imshow(rgba)


def draw_prompt(ax, prompt, size: float = 140) -> None:
    """Draw a :class:`cosmoslib.protocol.prompts.Prompt` as in the paper's Fig. 9.

    Green stars are positive points, blue stars negative points, the green rectangle the box;
    coordinates are (x, y) original-image pixels.
    """

    if prompt.points is not None and len(prompt.points):
        pts, labels = prompt.points, prompt.point_labels
        for lab, color in ((1, POSITIVE), (0, NEGATIVE)):
            sel = labels == lab
            if sel.any():
                ax.scatter(pts[sel, 0], pts[sel, 1], marker="*", s=size, c=color, edgecolors="white",
                           linewidths=0.8, zorder=3)
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False,
                               edgecolor=BOX, linewidth=1.6, zorder=3))


def gallery_figure(items, panel_size: float = 2.0):
    """Fig. 9: one row per item (image, GT, then each strategy's prompt and matched mask)."""
    if not items:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.text(0.5, 0.5, "no objects to show", ha="center", va="center")
        ax.set_axis_off()
        return fig
    ncols = 2 + max(len(it.panels) for it in items)
    fig, axes = plt.subplots(len(items), ncols, figsize=(panel_size * ncols, panel_size * len(items)),
                             squeeze=False)
    for row, item in zip(axes, items):
        for ax in row:
            ax.set_axis_off()
        show_image(row[0], item.image)
        row[0].set_title(item.title, fontsize=7, loc="left")
        show_image(row[1], item.image)
        overlay(row[1], item.gt, "#d62728")
        row[1].set_title("GT", fontsize=8)
        for ax, (strategy, prompt, mask, dice) in zip(row[2:], item.panels):
            show_image(ax, item.image)
            overlay(ax, mask, "#ff7f0e")
            draw_prompt(ax, prompt)
            ax.set_title(f"{strategy}: DICE {dice:.1f}%", fontsize=8)
    fig.tight_layout()
    return fig


def everything_overlay(ax, image, masks, seed: int = 0) -> None:
    """Fig. 11: every Everything-mode mask in its own random colour (largest drawn first)."""
    show_image(ax, image)
    rng = np.random.default_rng(seed)
    order = np.argsort([-m.sum() for m in masks]) if len(masks) else []
    rgba = np.zeros(image.shape[:2] + (4,))
    for i in order:
        rgba[masks[i]] = np.concatenate([rng.random(3), [0.55]])
    ax.imshow(rgba)


def table6_style(table6):
    """Table 6 wide (rows model x strategy, columns factor), p < ``stats.ALPHA`` in bold.

    Empty cells are the ones the long table explains in its ``note`` column.
    """
    wide = table6.pivot_table(index=["model", "strategy"], columns="factor", values=["r", "p"], dropna=False)
    r, p = wide["r"], wide["p"]
    return r.style.format("{:.3f}", na_rep="—").apply(
        lambda col: np.where(p[col.name] < ALPHA, "font-weight: bold", ""), axis=0)


#: One colour per shift level of Table 8 (level 0, the unshifted prompt, in white).
SHIFT_COLOURS = {0: "white", 1: "#ffdd00", 2: "#ff7f0e", 3: "#d62728"}


def draw_shifted_boxes(ax, prompt_rows) -> None:
    """Draw the boxes of prompt-table rows (one object, S5/S6), coloured by ``shift_level``."""
    for r in prompt_rows.sort_values(["shift_level", "repeat"]).itertuples(index=False):
        if r.box is None:
            continue
        x0, y0, x1, y1 = (float(v) for v in r.box)
        level = int(r.shift_level)
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False,
                               edgecolor=SHIFT_COLOURS.get(level, "grey"), linewidth=1.8 if level == 0 else 1.0,
                               zorder=4 if level == 0 else 3, label=f"level {level}"))
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")


def interval_bars(ax, long, x: str, hue: str | None = None, mean: str = "mean", order=None, ylabel: str = ""):
    """Grouped bars of a long interval table with asymmetric error bars (the interval).

    Parameters
    ----------
    ax : matplotlib Axes.
    long : DataFrame with ``x``, ``hue``, ``mean`` (bar height), ``low``, ``high`` and
        ``n_units`` (as :func:`cosmoslib.analysis.uncertainty.with_intervals` returns).
    x, hue : columns for the bar positions and the bar colours (one bar per hue level).
    order : x levels in drawing order (default: sorted).
    ylabel : axis label.

    Returns
    -------
    The Axes. A bar whose cell has one unit, or no finite bounds, gets no error bar and an
    ``n=1`` mark above it (``no CI`` when the bounds are missing for another reason), so a
    missing interval is never read as a tight one.
    """
    xs = list(order) if order is not None else sorted(long[x].unique())
    hues = sorted(long[hue].unique()) if hue else [None]
    width = 0.8 / len(hues)
    colours = sns.color_palette(n_colors=max(len(hues), 1))
    for j, level in enumerate(hues):
        part = long if hue is None else long[long[hue] == level]
        part = part.set_index(x).reindex(xs)
        pos = np.arange(len(xs)) - 0.4 + width * (j + 0.5)
        heights = part[mean].to_numpy(dtype=float)
        ax.bar(pos, np.nan_to_num(heights), width=width, color=colours[j], label=level)
        low, high = part["low"].to_numpy(dtype=float), part["high"].to_numpy(dtype=float)
        has = np.isfinite(low) & np.isfinite(high) & np.isfinite(heights)
        ax.errorbar(pos[has], heights[has], yerr=[heights[has] - low[has], high[has] - heights[has]],
                    fmt="none", ecolor="black", elinewidth=1, capsize=2)
        units = part["n_units"].to_numpy(dtype=float)
        for p, h, ok, k in zip(pos, heights, has, units):
            if np.isfinite(h) and not ok:
                ax.annotate("n=1" if k < 2 else "no CI", (p, h), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels([str(v) for v in xs])
    ax.set_ylabel(ylabel)
    if hue:
        ax.legend(fontsize=8)
    return ax
