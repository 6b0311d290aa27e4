"""The figures that re-decode objects of a finished run: the Fig. 9 gallery and Fig. 11's
Everything masks. Functions of the chapter (its config, root, manifest and tables); the
re-decoding itself is :class:`cosmoslib.book.redecode.Redecoder`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from cosmoslib.book.redecode import Redecoder
from cosmoslib.data import readers


@dataclass(frozen=True)
class GalleryItem:
    """One object of the Fig. 9 gallery: image, GT, and per-strategy prompt + matched mask."""

    title: str
    image: np.ndarray
    gt: np.ndarray
    panels: tuple  # of (strategy, Prompt, mask bool (H, W), dice %)


def redecoder(ch, model_name: str | None = None) -> Redecoder:
    """The :class:`~cosmoslib.book.redecode.Redecoder` of ``model_name`` (default: the config's
    first model) over the chapter's S1-S6 run (computed first if needed)."""
    return ch.tables.redecoder(model_name)


def gallery(ch, results: pd.DataFrame, n_per_task: int = 1,
            strategies: Sequence[str] = ("S2", "S3", "S4", "S5", "S6"),
            model_name: str | None = None) -> list[GalleryItem]:
    """Fig. 9: per task, ``n_per_task`` objects spread over the S5 DICE range of ``results``
    (the chapter's ``results`` table), each strategy drawn."""
    name = model_name or ch.config.models[0]
    redecode = redecoder(ch, name)
    s5 = results[(results["model"] == name) & (results["strategy"] == "S5")
                 & (results["shift_level"] == 0) & (results["selection_rule"] == "oracle_dice")]
    items = []
    for _, part in s5.groupby("task", sort=True):
        part = part.sort_values(["dice", "image_id", "label_value"]).reset_index(drop=True)
        picks = part.iloc[np.linspace(0, len(part) - 1, min(n_per_task, len(part))).round().astype(int)]
        for r in picks.itertuples(index=False):
            panels, image, gt = [], None, None
            for strategy in strategies:
                image, gt, prompt, mask, dice = redecode(r.task, r.image_id, r.label_value, strategy)
                panels.append((strategy, prompt, mask, dice))
            items.append(GalleryItem(f"{r.object} ({r.modality}) {r.image_id}", image, gt, tuple(panels)))
    return items


def everything_example(ch, grid: pd.DataFrame, model_name: str | None = None):
    """Fig. 11: the Everything masks of the image with most objects in ``grid`` (the chapter's
    ``everything_grid`` table), for each m: the masks the grid run stored beside its result
    parts (never recomputed).

    Returns
    -------
    (title, image, {m: list of bool (H, W) masks})
    """
    name = model_name or ch.config.models[0]
    reports = ch.tables.grid_reports()
    sub = grid[grid["model"] == name]
    counts = sub.drop_duplicates(["task", "image_id", "label_value"]).groupby(["task", "image_id"]).size()
    task, image_id = counts.sort_values(ascending=False, kind="stable").index[0]
    row = ch.manifest[(ch.manifest["task"] == task) & (ch.manifest["image_id"] == image_id)].iloc[0]
    image = readers.read_image(ch.root / row["image_path"])
    masks = {m: report.s1_masks(name, task, image_id) for m, report in sorted(reports.items())}
    return f"{task}/{image_id} ({row['modality']})", image, masks


__all__ = ["GalleryItem", "everything_example", "gallery", "redecoder"]
