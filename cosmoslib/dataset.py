"""The dataset in use and its statistics (paper section 2, Fig. 3).

A chapter asks for "the data of this config": :func:`load_manifest` indexes a COSMOS-layout
root (building the embedded cosmos-demo when none is given) and applies the config's
deterministic subsampling, so every chapter of one config sees exactly the same images and
objects. The ``fig3_*`` functions compute the four panels of the paper's Fig. 3 for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cosmoslib import paths

#: Upper edges of the paper's Fig. 3(d) image-area bins: (0, 128²], (128², 256²], ... in pixels².
AREA_BIN_SIDES = (128, 256, 512, 1024, 2048, 4096)


def resolve_root(data_root: str | Path | None) -> Path:
    """The COSMOS root of a config: ``data_root``, or cosmos-demo (built on first use).

    Parameters
    ----------
    data_root : str, Path or None
        A COSMOS-layout folder; ``""`` or None means the embedded cosmos-demo dataset.
    """
    if data_root:
        root = Path(data_root).expanduser().resolve()
        if not root.is_dir():
            from cosmoslib.io import InputError

            raise InputError(root, "data_root is not a folder")
        return root
    from cosmoslib import demo

    root = paths.demo_root()
    demo.build_demo(out=root)
    return root


def subsample(manifest: pd.DataFrame, max_images_per_task: int = 0,
              max_objects_per_image: int = 0, seed: int = 0) -> pd.DataFrame:
    """Deterministic subsample of a manifest (smoke runs, sized demos).

    Parameters
    ----------
    manifest : DataFrame
        One row per (image, object), as returned by :func:`cosmoslib.io.index`.
    max_images_per_task : int
        Keep at most this many images per task (0 = all), chosen with a seeded generator and
        returned in manifest order.
    max_objects_per_image : int
        Keep at most this many objects per image (0 = all): the largest by ``area_px``,
        ties broken by label value, so the choice does not depend on row order.
    seed : int
        Seed of the image choice.

    Returns
    -------
    DataFrame
        A copy with the index reset; empty input gives empty output.
    """
    df = manifest
    if max_images_per_task and len(df):
        rng = np.random.default_rng(seed)
        keep = []
        for task in sorted(df["task"].unique()):
            ids = np.array(sorted(df.loc[df["task"] == task, "image_id"].unique()))
            if len(ids) > max_images_per_task:
                ids = np.sort(rng.choice(ids, size=max_images_per_task, replace=False))
            keep.extend((task, i) for i in ids)
        keys = pd.MultiIndex.from_frame(df[["task", "image_id"]])
        df = df[keys.isin(keep)]
    if max_objects_per_image and len(df):
        df = (df.sort_values(["task", "image_id", "area_px", "label_value"],
                             ascending=[True, True, False, True])
                .groupby(["task", "image_id"], sort=False).head(max_objects_per_image)
                .sort_index())
    return df.reset_index(drop=True)


def load_manifest(data_root: str | Path | None = "", max_images_per_task: int = 0,
                  max_objects_per_image: int = 0, seed: int = 0) -> pd.DataFrame:
    """Index the config's COSMOS root and subsample it (see :func:`subsample`).

    The manifest gains a ``root`` attribute (``df.attrs["root"]``) with the absolute root.
    """
    from cosmoslib import io

    root = resolve_root(data_root)
    df = subsample(io.index(root), max_images_per_task, max_objects_per_image, seed)
    df.attrs["root"] = str(root)
    return df


def images(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per image: dataset, task, modality, image_id, height, width, n_objects."""
    cols = ["dataset", "task", "modality", "image_id", "height", "width"]
    return (manifest.groupby(cols, as_index=False, sort=True)
            .agg(n_objects=("label_value", "size")))


def fig3a_images_per_dataset(manifest: pd.DataFrame) -> pd.Series:
    """Fig. 3(a): number of images per dataset after preprocessing, descending."""
    return images(manifest).groupby("dataset").size().sort_values(ascending=False).rename("images")


def fig3b_objects(manifest: pd.DataFrame) -> pd.Series:
    """Fig. 3(b): number of masks per object name, descending."""
    return manifest.groupby("object").size().sort_values(ascending=False).rename("masks")


def fig3c_images_per_modality(manifest: pd.DataFrame) -> pd.Series:
    """Fig. 3(c): number of images per modality, descending."""
    return images(manifest).groupby("modality").size().sort_values(ascending=False).rename("images")


def area_bin_labels(sides: tuple[int, ...] = AREA_BIN_SIDES) -> list[str]:
    """Labels of the Fig. 3(d) bins, e.g. ``"128*128"``; the last bin is open-ended (``">4096*4096"``)."""
    return [f"{s}*{s}" for s in sides] + [f">{sides[-1]}*{sides[-1]}"]


def fig3d_area_histogram(manifest: pd.DataFrame,
                         sides: tuple[int, ...] = AREA_BIN_SIDES) -> pd.Series:
    """Fig. 3(d): images per image-area interval, with the paper's bins.

    The bin labelled ``"256*256"`` counts images with area in (128², 256²] pixels², as in the
    paper's caption; the first bin is (0, 128²]; areas above the last edge go to an open bin.
    All bins are returned, empty ones with 0.
    """
    areas = images(manifest).eval("height * width").to_numpy()
    edges = np.array([0] + [s * s for s in sides] + [np.inf], dtype=float)
    counts, _ = np.histogram(areas, bins=edges)
    # np.histogram bins are [a, b) except the last; the paper's are (a, b]: count edge values down.
    on_edge = np.isin(areas, edges[1:-1])
    if on_edge.any():
        counts = np.histogram(np.where(on_edge, areas - 0.5, areas), bins=edges)[0]
    return pd.Series(counts, index=area_bin_labels(sides), name="images")


def summary_numbers(manifest: pd.DataFrame) -> dict[str, int]:
    """Headline counts for prose: datasets, tasks, modalities, objects, images, masks, sources."""
    imgs = images(manifest)
    return {
        "n_datasets": int(manifest["dataset"].nunique()),
        "n_tasks": int(manifest["task"].nunique()),
        "n_modalities": int(manifest["modality"].nunique()),
        "n_objects": int(manifest["object"].nunique()),
        "n_object_modality": int(manifest[["object", "modality"]].drop_duplicates().shape[0]),
        "n_images": int(len(imgs)),
        "n_masks": int(len(manifest)),
        "n_sources": int(manifest["source"].dropna().nunique()) if "source" in manifest else 0,
    }
