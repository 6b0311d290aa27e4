"""The dataset in use and its statistics (paper section 2, Fig. 3).

A chapter asks for "the data of this config": :func:`load_manifest` indexes a COSMOS-layout
root (building the embedded cosmos-demo when none is given) and applies the config's
seeded subsampling (:func:`subsample`), so every chapter of one config sees exactly the same
images and objects. The ``fig3_*`` functions compute the four panels of the paper's Fig. 3 for it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pandas as pd

from cosmoslib import paths
from cosmoslib.data import demo, indexer
from cosmoslib.files import InputError

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

            raise InputError(root, "data_root is not a folder")
        return root

    root = paths.demo_root()
    demo.build_demo(out=root)
    return root


#: Ways to choose objects when an image has more than ``max_objects_per_image`` of them.
ObjectSampling = Literal["random", "largest"]
OBJECT_SAMPLING: tuple[str, ...] = get_args(ObjectSampling)


def _object_keys(df: pd.DataFrame, seed: int) -> np.ndarray:
    """One uniform 64-bit key per row from (seed, task, image_id, label_value) only.

    The k smallest keys of an image are a uniformly random k-subset of its objects that does
    not depend on row order, on the other images present, or on the process (no ``hash()``).
    """

    def key(task, image_id, value) -> int:
        text = f"objects\0{int(seed)}\0{task}\0{image_id}\0{int(value)}".encode("utf-8")
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")

    return np.array([key(t, i, v) for t, i, v in
                     zip(df["task"], df["image_id"], df["label_value"])], dtype=np.uint64)


def subsample(manifest: pd.DataFrame, max_images_per_task: int = 0,
              max_objects_per_image: int = 0, seed: int = 0,
              object_sampling: ObjectSampling = "random") -> pd.DataFrame:
    """Seeded, reproducible subsample of a manifest (smoke runs, sized demos, ``--max-objects``).

    Parameters
    ----------
    manifest : DataFrame
        One row per (image, object), as returned by :func:`cosmoslib.data.indexer.index`.
    max_images_per_task : int
        Keep at most this many images per task (0 = all), a uniform random choice with a
        generator seeded by ``seed``, returned in manifest order.
    max_objects_per_image : int
        Keep at most this many objects per image (0 = all); images with fewer keep them all.
        Which ones is set by ``object_sampling``.
    seed : int
        Seed of the image choice and of the ``"random"`` object choice.
    object_sampling : {"random", "largest"}
        ``"random"`` (default): a uniform random sample of ``max_objects_per_image`` objects of
        each image, without replacement; every object of an image with n objects is kept with
        probability ``max_objects_per_image / n`` whatever its size, so factors such as size
        are not biased. The choice depends only on ``seed`` and the object's (task, image_id,
        label_value): the same for any row order, any subset of other images, any process;
        another seed gives another sample. ``"largest"``: the objects with the largest
        ``area_px``, ties broken by the smaller label value (deterministic, seed not used; the
        behaviour before this option existed). It favours large objects, so results on it
        overstate performance on small ones.

    Returns
    -------
    DataFrame
        A copy with the index reset, rows in manifest order; empty input gives empty output.

    Raises
    ------
    ValueError
        For an unknown ``object_sampling``.
    """
    if object_sampling not in OBJECT_SAMPLING:
        raise ValueError(f"unknown object_sampling {object_sampling!r}; choose one of {OBJECT_SAMPLING}")
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
        if object_sampling == "largest":
            order = df.sort_values(["task", "image_id", "area_px", "label_value"],
                                   ascending=[True, True, False, True])
        else:
            order = (df.assign(_key=_object_keys(df, seed))
                     .sort_values(["task", "image_id", "_key", "label_value"]).drop(columns="_key"))
        df = (order.groupby(["task", "image_id"], sort=False).head(max_objects_per_image)
              .sort_index())
    return df.reset_index(drop=True)


def load_manifest(data_root: str | Path | None = "", max_images_per_task: int = 0,
                  max_objects_per_image: int = 0, seed: int = 0,
                  object_sampling: ObjectSampling = "random") -> pd.DataFrame:
    """Index the config's COSMOS root and subsample it (see :func:`subsample`).

    The manifest gains a ``root`` attribute (``df.attrs["root"]``) with the absolute root.
    """

    root = resolve_root(data_root)
    df = subsample(indexer.index(root), max_images_per_task, max_objects_per_image, seed,
                   object_sampling=object_sampling)
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


def per_task(manifest: pd.DataFrame) -> pd.DataFrame:
    """Table 1b: images, masks and median image size (pixels) per dataset, task and modality."""
    return (images(manifest).groupby(["dataset", "task", "modality"])
            .agg(images=("image_id", "size"), masks=("n_objects", "sum"),
                 median_height=("height", "median"), median_width=("width", "median"))
            .reset_index())


def spread_objects(manifest: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """``n`` rows of ``manifest`` spread evenly over its tasks (all rows when ``n`` is 0 or more
    than there are).

    Rows are shuffled within each task with ``rng``, then taken one per task in turn (tasks in
    name order) until ``n`` are chosen, so small tasks are never crowded out. Returned in pick
    order.
    """
    if not n or n >= len(manifest):
        return manifest
    queues = [part.iloc[rng.permutation(len(part))] for _, part in manifest.groupby("task", sort=True)]
    picked, depth = [], 0
    while len(picked) < n:
        for q in queues:
            if depth < len(q) and len(picked) < n:
                picked.append(q.iloc[depth])
        depth += 1
    return pd.DataFrame(picked)
