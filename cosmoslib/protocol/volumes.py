"""Volume-level scoring: per-slice masks back into volumes, 3D metrics in millimetres (issue 13).

The paper scores every 2D slice on its own, and only slices that contain the object (the
"slice-only protocol", paper 2.2). For a volume source (NIfTI/NRRD/... cut by
:func:`cosmoslib.data.preprocess.prepare`) the manifest knows where each slice came from
(``source``, ``slice_index``) and, in the columns :data:`SPACING_COLUMNS` and ``plane``, the
physical voxel size of the slice. This module puts the per-slice masks back:

* :func:`reassemble` stacks the slices of one ``(task, source, label_value)`` at their
  ``slice_index`` in a zero volume ``(D, H, W)`` of depth ``max(slice_index) + 1`` (or the
  ``source_depth`` column when the manifest has one). Slices not in the manifest stay empty:
  under the slice-only protocol they hold no object (or too small an object: <= 50 pixels,
  paper 2.2) and the model was never asked about them.
* :func:`volume_table` scores every reassembled volume of every run (model x strategy) in 3D,
  with the voxel spacing, beside the mean of the same volume's 2D slice scores:
  DICE / JAC (%), HD / HD95 / ASSD (mm) and NSD (% at a tolerance in mm), all from
  :func:`cosmoslib.protocol.metrics.evaluate_mm`.
* :func:`protocol_gap` compares the slice-level mean DICE with the volume-level DICE: how much
  the way slices are averaged (and, with ``extra_slices``, the slices left out) flatters a model.

Axis order
----------
A reassembled volume is ``(slice, row, column)``: axis 0 runs over ``slice_index`` (the
descriptor's main plane, see :func:`cosmoslib.data.preprocess.slices`), axes 1-2 are the rows and
columns of the 2D slices as stored. Its voxel size in mm is therefore ``(spacing_slice,
spacing_row, spacing_col)`` from the manifest (``preprocess`` records the spacing of each slice
as ``[row, column, slice]``). When the manifest has no spacing columns, or they are empty for a
volume, the voxels are taken as 1 mm cubes, the table says so in ``spacing_known`` (False) and
a warning is raised: distances are then in voxels, not mm.

Caveats
-------
* Sampled volumes: a descriptor with ``sampling.max_slices_per_volume`` (the demo's MNI tasks:
  16 slices) keeps only some of the object's slices, so the reassembled volume has empty gaps
  *inside* the object. ``slice_gaps`` counts them (slices between the first and the last
  manifest slice that neither the manifest nor ``extra_slices`` holds). With gaps, 3D DICE is
  still the voxel-pooled DICE of the kept slices, but every kept slice becomes a separate slab
  whose top and bottom faces are surface *in both masks*: they match each other exactly, so
  HD / HD95 / ASSD / NSD would come out better than the 2D numbers of the same slices (on a
  sampled MNI-sized ellipsoid shifted by 2 rows: HD95 0 mm in "3D" against 1.4 mm per slice).
  By default (``gaps="nan"``) the 3D surface metrics of such a volume are therefore NaN, and
  only DICE / JAC are reported; ``gaps="score"`` computes them anyway.
* 4D sources (one source, several frames) need a ``frame`` column in the manifest; without it
  the slices of different frames collide on the same ``slice_index`` and the volume is skipped
  with a warning rather than scored wrongly.
* Empty masks follow :data:`cosmoslib.protocol.metrics.EMPTY_POLICY` (see :mod:`cosmoslib.protocol.metrics`); a
  prediction empty on every slice of a volume gets, under ``"worst"``, DICE 0, NSD 0 and the
  physical diagonal of the volume as its distances.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cosmoslib import files
from cosmoslib.data import readers
from cosmoslib.protocol import metrics
from cosmoslib.protocol.metrics import EMPTY_POLICY, NSD_TOLERANCE_MM

#: Manifest columns holding a slice's pixel size in mm: rows, columns, and the slice spacing
#: (distance between neighbouring slices of the source volume along the main plane's normal).
SPACING_COLUMNS = ("spacing_row", "spacing_col", "spacing_slice")

#: Columns that identify a run (one set of predictions) in :func:`volume_table`.
RUN_COLUMNS = ("model", "strategy")

#: Columns of the volume table after the run columns (see :func:`volume_table`).
VOLUME_COLUMNS = [
    "task", "source", "label_value", "object", "modality", "plane",
    "n_slices", "slice_min", "slice_max", "slice_gaps", "n_extra_slices", "n_extra_fp",
    "depth", "height", "width", "spacing_row", "spacing_col", "spacing_slice", "spacing_known",
    "tolerance_mm", "dice", "jac", "hd", "hd95", "assd", "nsd",
    "slice_dice", "slice_hd95", "slice_nsd", "empty_pred", "empty_gt",
]

# --------------------------------------------------------------------------------------------
# which rows are volume slices
# --------------------------------------------------------------------------------------------


def _volume_key(df: pd.DataFrame) -> list[str]:
    return ["task", "source", "frame", "label_value"] if "frame" in df else ["task", "source", "label_value"]


def volume_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest rows that are slices of a volume source.

    Parameters
    ----------
    manifest : DataFrame
        The manifest (:func:`cosmoslib.data.indexer.index`); needs ``task, image_id, label_value, source,
        slice_index, height, width``.

    Returns
    -------
    DataFrame
        Rows with a ``source`` and a ``slice_index >= 0`` (2D sources have ``-1`` or null),
        ``slice_index`` as int64, in the manifest's order.
    """
    need = {"task", "image_id", "label_value", "source", "slice_index", "height", "width"}
    if missing := sorted(need - set(manifest)):
        raise KeyError(f"manifest lacks columns {missing}")
    idx = pd.to_numeric(manifest["slice_index"], errors="coerce")
    keep = manifest["source"].notna() & idx.notna() & (idx >= 0)
    out = manifest[keep].copy()
    out["slice_index"] = idx[keep].astype("int64")
    return out


def has_volumes(manifest: pd.DataFrame) -> bool:
    """True when at least one manifest row is a slice of a volume source (see :func:`volume_rows`)."""
    try:
        return len(volume_rows(manifest)) > 0
    except KeyError:
        return False


def volume_spacing(rows: pd.DataFrame) -> tuple[tuple[float, float, float], bool]:
    """Voxel size in mm of the volume that ``rows`` (the slices of one volume) come from.

    Parameters
    ----------
    rows : DataFrame
        Manifest rows of one volume, with the columns :data:`SPACING_COLUMNS` if known.

    Returns
    -------
    spacing : (float, float, float)
        ``(slice spacing, row spacing, column spacing)`` in mm: the axis order of
        :func:`reassemble`'s volume. ``(1.0, 1.0, 1.0)`` when unknown.
    known : bool
        False when the columns are missing or empty for these rows (spacing then assumed 1 mm).

    Raises
    ------
    ValueError
        The slices of one volume disagree on their spacing, or a spacing is not positive.
    """
    if not all(c in rows for c in SPACING_COLUMNS):
        return (1.0, 1.0, 1.0), False
    values = rows[list(SPACING_COLUMNS)].apply(pd.to_numeric, errors="coerce").astype(float)
    if values.isna().all(axis=None):
        return (1.0, 1.0, 1.0), False
    if values.isna().any(axis=None):
        raise ValueError("some slices of the volume have a spacing and some do not")
    uniq = values.drop_duplicates()
    if len(uniq) > 1:
        raise ValueError(f"the slices of one volume disagree on their spacing: {uniq.values.tolist()}")
    row, col, sl = (float(v) for v in uniq.iloc[0])
    if not all(math.isfinite(v) and v > 0 for v in (row, col, sl)):
        raise ValueError(f"spacing must be positive, got row {row}, col {col}, slice {sl}")
    return (sl, row, col), True


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------


def _getter(provider, what: str) -> Callable[[str, str, int], np.ndarray]:
    if isinstance(provider, Mapping):
        def get(task, image_id, label_value):
            key = (task, image_id, int(label_value))
            if key not in provider:
                raise KeyError(f"no {what} mask for {key}")
            return provider[key]
        return get
    if callable(provider):
        return provider
    raise TypeError(f"{what} masks: expected a callable (task, image_id, label_value) or a mapping, "
                    f"got {type(provider).__name__}")


def _mask(get, what, task, image_id, label_value, shape) -> np.ndarray:
    mask = get(task, image_id, int(label_value))
    if mask is None:
        raise KeyError(f"no {what} mask for {(task, image_id, int(label_value))}")
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"{what} mask of {(task, image_id, int(label_value))} has shape {mask.shape}, "
                         f"the manifest says {tuple(shape)}")
    return mask.astype(bool, copy=False)


def label_masks(manifest: pd.DataFrame, root) -> Callable[[str, str, int], np.ndarray]:
    """GT mask provider reading the COSMOS label PNGs: ``get(task, image_id, label_value)``.

    Parameters
    ----------
    manifest : DataFrame
        With ``task, image_id, label_value, label_path`` (relative to ``root``).
    root : path of the COSMOS layout.

    Returns
    -------
    callable
        ``(H, W)`` bool mask ``label == label_value``. The last 256 label files read are kept
        decoded, so the several objects of one image are read once.
    """
    root = Path(root)
    paths = {(r.task, r.image_id, int(r.label_value)): r.label_path
             for r in manifest[["task", "image_id", "label_value", "label_path"]].itertuples(index=False)}

    @lru_cache(maxsize=256)
    def read(rel):
        return readers.read_label(root / rel)

    def get(task, image_id, label_value):
        key = (task, image_id, int(label_value))
        if key not in paths:
            raise KeyError(f"no manifest row for {key}")
        return read(paths[key]) == int(label_value)

    return get


def saved_masks(save_masks, model: str, strategy: str, manifest: pd.DataFrame) -> Callable[[str, str, int], np.ndarray]:
    """Prediction provider reading the matched masks that ``evaluate(save_masks=...)`` wrote.

    Parameters
    ----------
    save_masks : the folder given to the evaluation (``<model>/<strategy>/<task>/<file>.png``,
        file names from :func:`cosmoslib.protocol.evaluate.mask_filename`).
    model, strategy : the run.
    manifest : DataFrame with ``task, image_id, label_value, object`` (the object names the file).

    Returns
    -------
    callable
        ``(task, image_id, label_value) -> (H, W) bool`` (PNG value > 0). Raises
        :class:`KeyError` when the file does not exist (the object was not evaluated).
    """
    folder = Path(save_masks) / files.slug(model) / strategy
    objects = {(r.task, r.image_id, int(r.label_value)): r.object
               for r in manifest[["task", "image_id", "label_value", "object"]].itertuples(index=False)}

    def get(task, image_id, label_value):
        key = (task, image_id, int(label_value))
        if key not in objects:
            raise KeyError(f"no manifest row for {key}")
        path = folder / str(task) / files.mask_filename(image_id, objects[key], int(label_value))
        if not path.is_file():
            raise KeyError(f"no saved mask for {key}: {path} not found")
        return readers.read_raw_label(path) > 0

    return get


def reassemble(rows: pd.DataFrame, masks, depth: int | None = None, what: str = "predicted") -> np.ndarray:
    """Stack the 2D masks of one volume's slices at their ``slice_index``.

    Parameters
    ----------
    rows : DataFrame
        Manifest rows of *one* volume (one ``task, source, label_value``), with ``task,
        image_id, label_value, slice_index, height, width``.
    masks : callable ``(task, image_id, label_value) -> (H, W) array`` or mapping keyed by
        ``(task, image_id, label_value)``; non-zero = foreground.
    depth : int, optional
        Number of slices of the source volume along the main plane; default
        ``max(slice_index) + 1``.
    what : word used in error messages ("predicted", "GT").

    Returns
    -------
    ndarray, bool, ``(D, H, W)``
        ``volume[k]`` is the mask of the row with ``slice_index == k``; slices without a row
        are all False.

    Raises
    ------
    ValueError
        Rows of different slice shapes, a repeated ``slice_index`` (two frames of a 4D source
        without a ``frame`` column, or two objects with one label value), a negative index or
        one ``>= depth``, or a mask whose shape is not the row's ``(height, width)``.
    KeyError
        A mask the provider does not have.
    """
    if len(rows) == 0:
        raise ValueError("reassemble: no rows")
    shapes = rows[["height", "width"]].drop_duplicates()
    if len(shapes) != 1:
        raise ValueError(f"slices of one volume differ in size: {shapes.values.tolist()}")
    h, w = (int(v) for v in shapes.iloc[0])
    idx = rows["slice_index"].astype("int64").to_numpy()
    if idx.min() < 0:
        raise ValueError(f"negative slice_index {idx.min()}: not a volume slice")
    if len(np.unique(idx)) != len(idx):
        dup = sorted({int(k) for k in idx if (idx == k).sum() > 1})
        raise ValueError(f"slice_index repeated within one volume: {dup[:10]} (a 4D source needs a 'frame' column)")
    depth = int(idx.max()) + 1 if depth is None else int(depth)
    if idx.max() >= depth:
        raise ValueError(f"slice_index {idx.max()} outside a volume of depth {depth}")
    get = _getter(masks, what)
    volume = np.zeros((depth, h, w), dtype=bool)
    for r, k in zip(rows.itertuples(index=False), idx):
        volume[k] = _mask(get, what, r.task, r.image_id, r.label_value, (h, w))
    return volume


# --------------------------------------------------------------------------------------------
# the volume table
# --------------------------------------------------------------------------------------------


def _first(rows: pd.DataFrame, col: str):
    if col not in rows:
        return None
    vals = rows[col].dropna()
    return vals.iloc[0] if len(vals) else None


def _runs(pred, run_columns) -> list[tuple[tuple, Callable]]:
    if not isinstance(pred, Mapping):
        raise TypeError("pred: expected a mapping {run key: mask provider}, e.g. {('vit_b', 'S2'): provider}")
    out = []
    for key, provider in pred.items():
        key = key if isinstance(key, tuple) else (key,)
        if len(key) != len(run_columns):
            raise ValueError(f"run key {key} does not match run_columns {tuple(run_columns)}")
        out.append((key, _getter(provider, "predicted")))
    return out


def volume_table(
    manifest: pd.DataFrame,
    pred: Mapping,
    gt=None,
    *,
    root=None,
    run_columns: Sequence[str] = RUN_COLUMNS,
    tolerance: float = NSD_TOLERANCE_MM,
    policy: str = EMPTY_POLICY,
    extra_slices: pd.DataFrame | None = None,
    gaps: str = "nan",
    progress: bool = False,
) -> pd.DataFrame:
    """Score every volume of every run in 3D (mm) beside the mean of its 2D slice scores.

    Parameters
    ----------
    manifest : DataFrame
        The manifest; only volume slices are used (:func:`volume_rows`). Uses the optional
        columns ``object, modality, plane``, :data:`SPACING_COLUMNS`, ``frame`` and
        ``source_depth`` when present.
    pred : mapping ``{run key: provider}``
        One mask provider per run; a run key is a tuple of values of ``run_columns`` (a scalar
        for a single run column), e.g. ``{("vit_b", "S2"): provider}``. A provider is a callable
        ``(task, image_id, label_value) -> (H, W) mask`` or a mapping keyed by ``(task,
        image_id, label_value)`` (e.g. :func:`saved_masks`).
    gt : provider, optional
        GT masks in the same form; default :func:`label_masks` ``(manifest, root)``.
    root : COSMOS root, needed when ``gt`` is None.
    run_columns : names of the parts of a run key (default ``("model", "strategy")``; add
        ``"selection_rule"`` to score both candidate choices).
    tolerance : NSD tolerance in mm (default :data:`cosmoslib.protocol.metrics.NSD_TOLERANCE_MM`, 2 mm).
    policy : empty-mask policy (:data:`cosmoslib.protocol.metrics.EMPTY_POLICY`).
    extra_slices : DataFrame, optional
        Slices *without* the object that were also segmented (e.g. prompted from the
        neighbouring slice's box, as MedSAM propagates): columns ``task, source, label_value,
        slice_index, image_id`` (and ``frame`` when the manifest has it). Their GT is empty;
        the prediction comes from each run's provider under ``(task, image_id, label_value)``.
        They enter the 3D volume only (the slice means stay over the manifest's slices) and are
        counted in ``n_extra_slices`` / ``n_extra_fp``.
    gaps : {"nan", "score"}
        Volumes with ``slice_gaps > 0`` (sampled volumes, module docstring): ``"nan"`` (default)
        reports their 3D ``hd, hd95, assd, nsd`` as NaN (the empty gap slices would make
        surfaces that match by construction); ``"score"`` computes them anyway. DICE, JAC and
        the slice means are always computed.
    progress : tqdm bar over volumes (stderr).

    Returns
    -------
    DataFrame
        One row per run and volume, columns ``*run_columns`` then :data:`VOLUME_COLUMNS`
        (``frame`` after ``source`` when the manifest has it):

        * ``object, modality, plane``: from the manifest (None if absent);
        * ``n_slices``: manifest slices (slices with the object); ``slice_min, slice_max``;
          ``slice_gaps``: slices between them that neither the manifest nor ``extra_slices``
          holds (sampled volumes; see ``gaps``);
        * ``n_extra_slices``: slices from ``extra_slices``; ``n_extra_fp``: of these, slices
          where the prediction is not empty (false-positive slices);
        * ``depth, height, width``: the reassembled volume's shape;
        * ``spacing_row, spacing_col, spacing_slice`` (mm), ``spacing_known`` (False: 1 mm
          assumed); ``tolerance_mm``;
        * 3D metrics of the volume: ``dice, jac, nsd`` (%), ``hd, hd95, assd`` (mm); the
          surface metrics NaN for volumes with gaps under ``gaps="nan"``;
        * means over the manifest slices of the 2D metrics in mm (spacing ``(row, col)``):
          ``slice_dice`` (%), ``slice_hd95`` (mm), ``slice_nsd`` (%);
        * ``empty_pred, empty_gt``: the 3D masks were empty (the policy produced the numbers).

        Sorted by the run columns, then task, source, label_value. Volumes that cannot be
        reassembled unambiguously (repeated ``slice_index``) are left out with a warning.

    Raises
    ------
    KeyError
        A provider lacks a mask of a manifest slice (the run did not cover that object:
        score only the objects it covered by passing a filtered manifest).
    """
    if gaps not in ("nan", "score"):
        raise ValueError(f"gaps must be 'nan' or 'score', got {gaps!r}")
    run_columns = list(run_columns)
    runs = _runs(pred, run_columns)
    vrows = volume_rows(manifest)
    if gt is None:
        if root is None:
            raise ValueError("volume_table: give gt masks or the COSMOS root to read them from")
        gt = label_masks(vrows, root)
    get_gt = _getter(gt, "GT")
    key_cols = _volume_key(vrows)
    extra_groups = {}
    if extra_slices is not None and len(extra_slices):
        need = set(key_cols) | {"slice_index", "image_id"}
        if missing := sorted(need - set(extra_slices)):
            raise KeyError(f"extra_slices lacks columns {missing}")
        extra_groups = {k if isinstance(k, tuple) else (k,): g
                        for k, g in extra_slices.groupby(key_cols, sort=False, dropna=False)}
    if not all(c in vrows for c in SPACING_COLUMNS):
        warnings.warn("the manifest has no spacing columns (spacing_row, spacing_col, spacing_slice): "
                      "voxels are taken as 1 mm, distances are in voxels; to get millimetres, index the root again with "
                      "`cosmos index ROOT` after giving each slice a `spacing` [row, col, slice] in mm "
                      "in its task's JSON (the COSMOS `images` provenance)",
                      stacklevel=2)

    out_rows = []
    skipped = []
    unknown_spacing = 0
    groups = list(vrows.groupby(key_cols, sort=True, dropna=False))
    for key, rows in tqdm(groups, desc="volumes", unit="vol", disable=not progress):
        key = key if isinstance(key, tuple) else (key,)
        info = dict(zip(key_cols, key))
        rows = rows.sort_values("slice_index", kind="stable")
        extra = extra_groups.get(key)
        idx = rows["slice_index"].to_numpy()
        if len(np.unique(idx)) != len(idx):
            skipped.append(key)
            continue
        h, w = int(rows["height"].iloc[0]), int(rows["width"].iloc[0])
        if extra is not None:
            extra = extra.assign(slice_index=extra["slice_index"].astype("int64"), height=h, width=w,
                                 task=info["task"], label_value=int(info["label_value"]))
            clash = sorted(set(extra["slice_index"]) & set(idx.tolist()))
            if clash:
                raise ValueError(f"extra_slices repeat manifest slices {clash[:10]} of volume {key}")
        present = set(idx.tolist()) | (set(extra["slice_index"].tolist()) if extra is not None else set())
        n_gaps = sum(1 for k in range(int(idx.min()), int(idx.max()) + 1) if k not in present)
        depth = int(max(idx.max(), extra["slice_index"].max() if extra is not None else -1)) + 1
        source_depth = _first(rows, "source_depth")
        if source_depth is not None:
            depth = max(depth, int(source_depth))
        spacing, known = volume_spacing(rows)
        unknown_spacing += not known
        gt_vol = reassemble(rows, get_gt, depth, what="GT")
        base = {
            **info,
            "object": _first(rows, "object"),
            "modality": _first(rows, "modality"),
            "plane": _first(rows, "plane"),
            "n_slices": len(rows),
            "slice_min": int(idx.min()),
            "slice_max": int(idx.max()),
            "slice_gaps": n_gaps,
            "n_extra_slices": 0 if extra is None else len(extra),
            "depth": depth, "height": h, "width": w,
            "spacing_row": spacing[1], "spacing_col": spacing[2], "spacing_slice": spacing[0],
            "spacing_known": known,
            "tolerance_mm": float(tolerance),
        }
        for run_key, get_pred in runs:
            pred_vol = reassemble(rows, get_pred, depth)
            n_fp = 0
            if extra is not None:
                for r in extra.itertuples(index=False):
                    m = _mask(get_pred, "predicted", r.task, r.image_id, r.label_value, (h, w))
                    pred_vol[int(r.slice_index)] = m
                    n_fp += bool(m.any())
            m3 = metrics.evaluate_mm(pred_vol, gt_vol, spacing, tolerance, policy)
            if n_gaps and gaps == "nan":
                m3.update(hd=float("nan"), hd95=float("nan"), assd=float("nan"), nsd=float("nan"))
            per_slice = [metrics.evaluate_mm(pred_vol[k], gt_vol[k], spacing[1:], tolerance, policy) for k in idx]
            row = {**dict(zip(run_columns, run_key)), **base, "n_extra_fp": n_fp,
                   **{m: m3[m] for m in metrics.METRIC_NAMES_MM},
                   "slice_dice": float(np.mean([s["dice"] for s in per_slice])),
                   "slice_hd95": float(np.mean([s["hd95"] for s in per_slice])),
                   "slice_nsd": float(np.mean([s["nsd"] for s in per_slice])),
                   "empty_pred": m3["empty_pred"], "empty_gt": m3["empty_gt"]}
            out_rows.append(row)
    if skipped:
        warnings.warn(f"{len(skipped)} volume(s) left out: slice_index repeated (a 4D source without a "
                      f"'frame' column?), first {skipped[0]}", stacklevel=2)
    if unknown_spacing and all(c in vrows for c in SPACING_COLUMNS):
        warnings.warn(f"{unknown_spacing} volume(s) without a spacing in the manifest: 1 mm assumed; give their "
                      f"slices a `spacing` [row, col, slice] in mm in the task's JSON and index again", stacklevel=2)
    key_out = ["task", "source", "frame"] if "frame" in key_cols else ["task", "source"]
    columns = [*run_columns, *key_out, *VOLUME_COLUMNS[2:]]
    df = pd.DataFrame(out_rows, columns=columns)
    if len(df):
        df = df.sort_values([*run_columns, *key_out, "label_value"], kind="stable").reset_index(drop=True)
    for col in ("label_value", "n_slices", "slice_min", "slice_max", "slice_gaps", "n_extra_slices",
                "n_extra_fp", "depth", "height", "width"):
        df[col] = df[col].astype("int64")
    for col in ("spacing_known", "empty_pred", "empty_gt"):
        df[col] = df[col].astype(bool)
    return df


def protocol_gap(volumes: pd.DataFrame, by: Sequence[str] = ("model", "strategy", "task")) -> pd.DataFrame:
    """How much the slice-level mean DICE flatters the model compared with volume-level DICE.

    Parameters
    ----------
    volumes : DataFrame
        The output of :func:`volume_table`.
    by : grouping columns.

    Returns
    -------
    DataFrame
        One row per group: ``*by, n_volumes, n_slices, slice_dice, volume_dice, gap,
        n_extra_slices, n_extra_fp``. ``slice_dice`` is the mean 2D DICE over all slices of
        the group's volumes (each slice one unit, as the paper averages); ``volume_dice`` the
        mean 3D DICE over volumes (each volume one unit); ``gap = slice_dice - volume_dice`` in
        percentage points (positive: the slice-only protocol flatters). Without
        ``extra_slices`` the 3D volume holds the same voxels as the slices, so the gap comes
        from weighting only (small, badly segmented end slices count fully in the slice mean
        but little in the volume's DICE), not from false positives on slices without the object.
    """
    by = list(by)
    need = set(by) | {"slice_dice", "dice", "n_slices", "n_extra_slices", "n_extra_fp"}
    if missing := sorted(need - set(volumes)):
        raise KeyError(f"protocol_gap: volume table lacks columns {missing}")
    v = volumes.assign(_w=volumes["slice_dice"] * volumes["n_slices"])
    g = v.groupby(by, sort=True, dropna=False)
    out = pd.DataFrame({
        "n_volumes": g.size(),
        "n_slices": g["n_slices"].sum(),
        "slice_dice": g["_w"].sum() / g["n_slices"].sum(),
        "volume_dice": g["dice"].mean(),
        "n_extra_slices": g["n_extra_slices"].sum(),
        "n_extra_fp": g["n_extra_fp"].sum(),
    }).reset_index()
    out["gap"] = out["slice_dice"] - out["volume_dice"]
    return out[[*by, "n_volumes", "n_slices", "slice_dice", "volume_dice", "gap", "n_extra_slices", "n_extra_fp"]]
