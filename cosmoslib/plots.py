"""The book's shared figure style and provenance captions.

Every figure and table in the book names the notebook and config that produced it
(:func:`provenance`), so a number can be traced back to code and parameters.
"""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import seaborn as sns

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
