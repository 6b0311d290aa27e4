"""The volumes chapter's computations: per-slice predictions back into volumes, 3D beside 2D.

:mod:`cosmoslib.protocol.volumes` scores reassembled volumes given one mask provider per run. This module
supplies the providers a finished config already implies -- each slice's matched mask is
re-decoded from the cached embedding with the config's own prompt (:class:`cosmoslib.book.redecode.
Redecoder`), so no mask has to be stored -- and summarises the volume table for the chapter:

* :func:`redecoded_masks` -- a provider ``(task, image_id, label_value) -> mask`` for one strategy;
* :func:`volume_scores` -- the volume table of one model under several strategies;
* :func:`side_by_side` -- per model and strategy, each metric in 3D (the volume) beside the mean
  of its 2D slice values over the same volumes, with cluster bootstrap intervals, and the
  difference slice - volume with its interval;
* :func:`gap_sentence` -- the protocol gap (:func:`cosmoslib.protocol.volumes.protocol_gap`) in words.

Units: DICE and NSD in %, HD95 and ASSD in mm (voxel spacing from the manifest), NSD at the
tolerance the volume table states (``tolerance_mm``).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from cosmoslib.analysis import uncertainty
from cosmoslib.protocol import propagation, volumes
from cosmoslib.protocol.metrics import NSD_TOLERANCE_MM

#: Metrics of :func:`side_by_side`: (label, unit, 3D column, 2D slice-mean column or None).
METRIC_PAIRS = (
    ("DICE", "%", "dice", "slice_dice"),
    ("NSD", "%", "nsd", "slice_nsd"),
    ("HD95", "mm", "hd95", "slice_hd95"),
    ("ASSD", "mm", "assd", None),
)

#: Columns of :func:`side_by_side`.
SIDE_COLUMNS = ["model", "strategy", "metric", "unit", "volume_3d", "volume_low", "volume_high",
                "slice_2d", "slice_low", "slice_high", "slice_minus_volume", "diff_low", "diff_high",
                "n_volumes", "n_clusters"]


def redecoded_masks(redecode: Callable, strategy: str) -> Callable[[str, str, int], np.ndarray]:
    """A mask provider for :func:`cosmoslib.protocol.volumes.volume_table` from a re-decoder.

    Parameters
    ----------
    redecode : callable ``(task, image_id, label_value, strategy) -> (image, gt, prompt, mask,
        dice)``, e.g. :func:`cosmoslib.book.figures.redecoder`; ``mask`` is the candidate the oracle rule
        matched (the one the results table scores).
    strategy : the strategy whose prompt is decoded (``"S5"``, ``"S2"``, ...).

    Returns
    -------
    callable ``(task, image_id, label_value) -> (H, W) bool``
    """
    def get(task, image_id, label_value):
        return np.asarray(redecode(task, image_id, int(label_value), strategy)[3], dtype=bool)

    return get


def volume_scores(manifest: pd.DataFrame, redecode: Callable, model: str, root,
                  strategies: Sequence[str] = ("S5", "S2"), tolerance: float = NSD_TOLERANCE_MM,
                  gaps: str = "nan", gt=None) -> pd.DataFrame:
    """The volume table of ``model`` under ``strategies`` (:func:`cosmoslib.protocol.volumes.volume_table`).

    Parameters
    ----------
    manifest : the config's manifest (only its volume slices are used).
    redecode : see :func:`redecoded_masks` (the re-decoder of ``model``).
    model : the model name written in the table.
    root : the COSMOS root (ground-truth labels).
    strategies : prompts to score.
    tolerance : NSD tolerance in mm.
    gaps : passed on (``"nan"``: no 3D surface metrics for volumes with missing inner slices).
    gt : GT mask provider (as in :func:`cosmoslib.protocol.volumes.volume_table`); default: the label
        files under ``root``.

    Returns
    -------
    DataFrame
        One row per strategy and volume, :data:`cosmoslib.protocol.volumes.VOLUME_COLUMNS` after ``model,
        strategy``; empty (same columns) when the manifest has no volume slices.
    """
    columns = [*volumes.RUN_COLUMNS, "task", "source", *volumes.VOLUME_COLUMNS[2:]]
    if not volumes.has_volumes(manifest):
        return pd.DataFrame(columns=columns)
    pred = {(model, s): redecoded_masks(redecode, s) for s in strategies}
    return volumes.volume_table(manifest, pred, gt, root=root, tolerance=tolerance, gaps=gaps)


def side_by_side(volume_table: pd.DataFrame, ci: float = 95.0, n_resamples: int = uncertainty.N_RESAMPLES_TABLES,
                 seed: int = 0) -> pd.DataFrame:
    """Each metric in 3D beside the mean of its 2D slice values, over the same volumes.

    Parameters
    ----------
    volume_table : :func:`cosmoslib.protocol.volumes.volume_table` output (``model, strategy``, ...).
    ci, n_resamples, seed : cluster bootstrap (:func:`cosmoslib.analysis.uncertainty.cluster_bootstrap_ci`);
        the unit is the source volume (``task/source``), so the objects of one volume travel
        together.

    Returns
    -------
    DataFrame, columns :data:`SIDE_COLUMNS`
        One row per model, strategy and metric of :data:`METRIC_PAIRS`. ``volume_3d`` is the
        mean over volumes of the 3D value; ``slice_2d`` the mean over the same volumes of each
        volume's mean 2D value (each volume weighs 1 in both, so the two differ only by how a
        volume is scored); ``slice_minus_volume`` the mean per-volume difference (positive
        DICE/NSD or negative HD95: the slice view looks better). Volumes where either value is
        not finite (3D surface metrics of sampled volumes with gaps are NaN) are left out of
        that metric's row, and ``n_volumes`` counts the rest. ASSD has no 2D column.
    """
    rows = []
    if len(volume_table) == 0:
        return pd.DataFrame(columns=SIDE_COLUMNS)
    for (model, strategy), block in volume_table.groupby(["model", "strategy"], sort=True):
        for label, unit, col3, col2 in METRIC_PAIRS:
            v3 = pd.to_numeric(block[col3], errors="coerce").astype(float)
            ok = np.isfinite(v3)
            if col2 is not None:
                v2 = pd.to_numeric(block[col2], errors="coerce").astype(float)
                ok &= np.isfinite(v2)
            part = block[ok].assign(_v3=v3[ok])
            row = dict(model=model, strategy=strategy, metric=label, unit=unit)
            est = uncertainty.cluster_bootstrap_ci(part, "_v3", ci=ci, n_resamples=n_resamples, seed=seed)
            row.update(volume_3d=est.estimate, volume_low=est.low, volume_high=est.high,
                       n_volumes=int(ok.sum()), n_clusters=est.n_clusters)
            if col2 is not None:
                part = part.assign(_v2=v2[ok], _d=v2[ok] - v3[ok])
                s2 = uncertainty.cluster_bootstrap_ci(part, "_v2", ci=ci, n_resamples=n_resamples, seed=seed)
                d = uncertainty.cluster_bootstrap_ci(part, "_d", ci=ci, n_resamples=n_resamples, seed=seed)
                row.update(slice_2d=s2.estimate, slice_low=s2.low, slice_high=s2.high,
                           slice_minus_volume=d.estimate, diff_low=d.low, diff_high=d.high)
            rows.append(row)
    out = pd.DataFrame(rows, columns=SIDE_COLUMNS)
    return out.astype({"n_volumes": "int64", "n_clusters": "int64"})


def gap_sentence(gap: pd.DataFrame, strategy: str, model: str | None = None, tolerance: float = 0.5) -> str:
    """The slice-only protocol's flattery under one strategy, in words, from its numbers.

    Parameters
    ----------
    gap : :func:`cosmoslib.protocol.volumes.protocol_gap` output grouped by (at least) ``strategy``
        (and ``model``).
    strategy, model : the row to describe (``model`` None: the first model).
    tolerance : |gap| in DICE points below which the two protocols are called "about equal".

    Returns
    -------
    str
        e.g. ``"the slice mean (84.1 %) exceeds the volume DICE (80.3 %) by 3.8 points over 4
        volumes"``; "no volume was scored" when the row is missing.
    """
    g = gap[gap["strategy"] == strategy]
    if model is not None and "model" in g:
        g = g[g["model"] == model]
    if g.empty:
        return f"no volume was scored under {strategy}"
    n_slices, n_vol = int(g["n_slices"].sum()), int(g["n_volumes"].sum())
    slice_dice = float((g["slice_dice"] * g["n_slices"]).sum() / max(n_slices, 1))
    volume_dice = float((g["volume_dice"] * g["n_volumes"]).sum() / max(n_vol, 1))
    diff = slice_dice - volume_dice
    where = f"over {n_vol} volume{'s' if n_vol != 1 else ''} ({n_slices} slices)"
    if not math.isfinite(diff):
        return f"the gap is undefined {where}"
    if abs(diff) < tolerance:
        return (f"the slice mean ({slice_dice:.1f} %) and the volume DICE ({volume_dice:.1f} %) are about "
                f"equal {where}")
    verb = "exceeds" if diff > 0 else "falls below"
    return (f"the slice mean ({slice_dice:.1f} %) {verb} the volume DICE ({volume_dice:.1f} %) by "
            f"{abs(diff):.1f} points {where}")


def status_sentence(manifest: pd.DataFrame, volume_table: pd.DataFrame) -> str:
    """What the chapter could reassemble, in words, from the manifest and the volume table.

    Returns
    -------
    str
        "This config has no volume source ..." when the manifest has no volume slice; else the
        number of volumes (objects in source volumes), source volumes, slices and tasks, and how
        many volumes have gaps (sampled slices: no 3D surface metrics).
    """
    if not volumes.has_volumes(manifest) or len(volume_table) == 0:
        return ("This config has no volume source: every image comes from a 2D file, so there is nothing to "
                "put back together and the tables below are empty.")
    one = volume_table.drop_duplicates(["task", "source", "label_value"])
    n_vol, n_src = len(one), one[["task", "source"]].drop_duplicates().shape[0]
    n_slices, n_tasks = int(one["n_slices"].sum()), one["task"].nunique()
    n_gaps = int((one["slice_gaps"] > 0).sum())
    text = (f"This config has {n_vol} object volume{'s' if n_vol != 1 else ''} in {n_src} source volume"
            f"{'s' if n_src != 1 else ''} of {n_tasks} task{'s' if n_tasks != 1 else ''}, reassembled from "
            f"{n_slices} slice{'s' if n_slices != 1 else ''}.")
    if n_gaps:
        text += (f" {n_gaps} of them miss slices inside the object (the config samples slices), so only their "
                 f"DICE is scored in 3D: their surface metrics would compare slab faces that match by construction.")
    return text


def metric_sentence(side: pd.DataFrame, strategy: str, metric: str, model: str | None = None) -> str:
    """One row of :func:`side_by_side` in words: the 3D value beside the slice mean, with intervals.

    Returns
    -------
    str
        e.g. ``"HD95 is 5.2 mm in 3D (95 % CI 1.1 to 15.4) and 7.1 mm as the mean of its slices
        (95 % CI 2.5 to 18.7), over 5 volumes"``; ``"no volume has a 3D HD95"`` when missing.
    """
    r = side[(side["strategy"] == strategy) & (side["metric"] == metric)]
    if model is not None:
        r = r[r["model"] == model]
    if r.empty or int(r["n_volumes"].iloc[0]) == 0 or not math.isfinite(float(r["volume_3d"].iloc[0])):
        return f"no volume has a 3D {metric} under {strategy}"
    r = r.iloc[0]
    unit = " %" if r["unit"] == "%" else f" {r['unit']}"

    def ci(lo, hi):
        return "no interval" if not (math.isfinite(lo) and math.isfinite(hi)) else f"95 % CI {lo:.1f} to {hi:.1f}"

    text = f"{metric} is {r['volume_3d']:.1f}{unit} in 3D ({ci(float(r['volume_low']), float(r['volume_high']))})"
    if math.isfinite(float(r["slice_2d"])):
        text += (f" and {r['slice_2d']:.1f}{unit} as the mean of its slices "
                 f"({ci(float(r['slice_low']), float(r['slice_high']))})")
    n = int(r["n_volumes"])
    return text + f", over {n} volume{'s' if n != 1 else ''}"


__all__ = ["METRIC_PAIRS", "SIDE_COLUMNS", "gap_sentence", "metric_sentence", "redecoded_masks", "side_by_side",
           "status_sentence", "volume_scores"]


def propagation_scores(manifest: pd.DataFrame, root, models: Sequence, volume_table: pd.DataFrame,
                       stacks_from: pd.DataFrame | None = None, tolerance: float = NSD_TOLERANCE_MM
                       ) -> tuple[pd.DataFrame, list]:
    """The volumes chapter's SAM 2 section: one box per object propagated through its slices,
    beside the per-slice rows of the same model (:mod:`cosmoslib.protocol.propagation`).

    Parameters
    ----------
    manifest : the config's manifest (only volume slices are used).
    root : the COSMOS root.
    models : loaded models; only those with a video predictor (SAM 2) are propagated, the others
        are listed in the returned reasons.
    volume_table : :func:`volume_scores` of the same models (its S5 rows are the per-slice
        protocol the propagation is compared with).
    stacks_from : manifest rows the slice stacks are built from (default ``manifest``).
    tolerance : NSD tolerance in mm.

    Returns
    -------
    (DataFrame, list)
        :func:`cosmoslib.protocol.propagation.propagation_table` (one row per model, prompt-slice
        rule and object: 3D DICE/NSD/HD95 beside S5's, DICE gap, leaked and missed slices,
        prompts 1 against one per slice), and ``(what, reason)`` for every model or volume not
        propagated. Empty table (same columns) when no model has a video predictor.
    """
    video_models = [m for m in models if hasattr(m, "video")]
    skipped = [(m.name, "no video predictor (propagation needs a SAM 2 model)")
               for m in models if not hasattr(m, "video")]
    if not video_models or not volumes.has_volumes(manifest):
        why = "no SAM 2 model" if not video_models else "no volume source in this config"
        return pd.DataFrame(columns=propagation.PROPAGATION_COLUMNS), skipped + [("(all)", why)]
    run = propagation.propagate(manifest, root, video_models, stacks_from=stacks_from)
    if not len(run.info):  # nothing propagated: no volume rows to build
        return pd.DataFrame(columns=propagation.PROPAGATION_COLUMNS), skipped + run.skipped
    rows = propagation.volume_rows_with(run, manifest, root, tolerance=tolerance)
    table = pd.concat([t for t in (volume_table, rows) if len(t)], ignore_index=True)
    return propagation.propagation_table(table, run.info), skipped + run.skipped

