"""S1 (Everything) at the paper's thresholds and at thresholds from the model's own scores.

The paper keeps an Everything-mode mask when its predicted IoU is above 0.88 and its stability
score at least 0.95 (SAM's defaults, :data:`cosmoslib.models.everything.DEFAULTS`). A model whose IoU
head rarely reaches 0.88 -- LiteMedSAM, trained with boxes only -- then keeps no mask at all,
and S1 scores DICE 0 for every object whatever its masks look like. The **variant** shown beside
it (never instead of it) sets both thresholds at a stated quantile
(:data:`cosmoslib.models.everything.VARIANT_QUANTILE`, 0.9) of the model's own predicted IoU and
stability over **all candidates of the run** -- every grid point's outputs on every image of the
call, per model and grid size (``scope="run"``) -- or of each image alone (``scope="image"``).
Empty candidates (no pixel above the mask threshold; stability 0) are no segmentation: they are
left out of the variant's pool and never kept by it (the paper's stability filter never keeps
them either). When a pool holds no non-empty candidate the variant keeps nothing; its thresholds
are then NaN and the ``note`` column says why.

One decoding pass per (model, image, grid size) serves both settings
(:func:`cosmoslib.models.everything.everything_candidates`, then
:func:`cosmoslib.models.everything.filter_candidates` twice). Each object is scored with its
best-matching kept mask (oracle rule, :func:`cosmoslib.protocol.matching.match_everything`), DICE in %;
an image where nothing is kept scores each object against an empty prediction (DICE 0, counted
in ``empty_pred``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cosmoslib import paths
from cosmoslib.data.readers import read_image, read_label
from cosmoslib.models import cache as cache_mod
from cosmoslib.models import everything
from cosmoslib.protocol import matching, metrics

__all__ = ["PAPER", "SCOPES", "variant_label", "s1_threshold_table", "threshold_means"]

#: Label of the paper's setting in the ``thresholds`` column.
PAPER = "paper (IoU > 0.88, stability >= 0.95)"
#: Pools the variant's quantiles are taken over.
SCOPES = ("run", "image")

COLUMNS = ["model", "points_per_side", "thresholds", "pred_iou_thresh", "stability_thresh", "task", "image_id",
           "label_value", "object", "modality", "dice", "empty_pred", "n_masks", "n_candidates", "note"]


def variant_label(quantile: float, scope: str = "run") -> str:
    """The ``thresholds`` label of the variant, e.g. ``"variant: 0.9 quantile of own scores (run)"``."""
    return f"variant: {quantile:g} quantile of own scores ({scope})"


def _score(result: everything.EverythingResult, label: np.ndarray, objects: pd.DataFrame) -> list[dict]:
    masks = result.masks
    rows = []
    for r in objects.itertuples(index=False):
        gt = label == int(r.label_value)
        m = matching.match_everything(masks, gt)
        pred = masks[m.oracle_index] if m.oracle_index is not None else np.zeros(gt.shape, bool)
        rows.append(dict(task=r.task, image_id=r.image_id, label_value=int(r.label_value), object=r.object,
                         modality=r.modality, dice=metrics.dice(pred, gt), empty_pred=not pred.any(),
                         n_masks=len(result)))
    return rows


def s1_threshold_table(manifest: pd.DataFrame, root: str | Path, model, points_per_side: int,
                       quantile: float = everything.VARIANT_QUANTILE, scope: str = "run",
                       cache_dir: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """S1 DICE of every object of ``manifest`` at the paper's thresholds and at the variant's.

    Parameters
    ----------
    manifest : DataFrame
        Objects (:func:`cosmoslib.io.index` rows); all objects of an image share its S1 masks.
    root : path
        COSMOS root of the manifest's relative paths.
    model : SamFamilyModel
    points_per_side : int
        Grid size m (m x m points).
    quantile : float in [0, 1)
        Quantile of the variant (:func:`cosmoslib.models.everything.quantile_thresholds`).
    scope : {"run", "image"}
        Pool of the variant's quantiles: all candidates of every image here, or each image's own.
    cache_dir : path, optional
        Embedding cache (default :func:`cosmoslib.paths.embedding_cache_dir`).
    progress : bool
        A tqdm bar over the images (stderr).

    Returns
    -------
    DataFrame
        :data:`COLUMNS`: one row per object and setting (``thresholds`` = :data:`PAPER` or
        :func:`variant_label`); ``dice`` in %, ``n_masks`` masks kept in the image,
        ``n_candidates`` candidates decoded in it. Empty (with these columns) for an empty manifest.

    Raises
    ------
    ValueError
        Unknown ``scope`` or a ``quantile`` outside [0, 1).
    cosmoslib.files.InputError
        An unreadable image or label.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not 0.0 <= float(quantile) < 1.0:
        raise ValueError(f"quantile must be in [0, 1), got {quantile!r}")
    root = Path(root)
    emb_cache = cache_mod.EmbeddingCache(Path(cache_dir) if cache_dir else paths.embedding_cache_dir(), model)
    images = list(manifest.groupby(["task", "image_id"], sort=True))
    found = []
    for (task, image_id), objects in tqdm(images, desc=f"S1 candidates {model.name} m={points_per_side}",
                                          unit="img", file=sys.stderr, disable=not progress):
        first = objects.iloc[0]
        label = read_label(root / first["label_path"])
        embedding = emb_cache.get(read_image(root / first["image_path"]))
        cands = everything.everything_candidates(model, embedding, label.shape[:2], points_per_side=points_per_side)
        found.append((objects, label, cands))
    pooled = None
    if scope == "run":
        pooled = _own_thresholds([c.nonempty() for _, _, c in found], quantile)
    paper_iou = everything.DEFAULTS["pred_iou_thresh"]
    paper_stab = everything.DEFAULTS["stability_score_thresh"]
    rows = []
    for objects, label, cands in found:
        nonempty = cands.nonempty()
        own = pooled if pooled is not None else _own_thresholds([nonempty], quantile)
        settings = ((PAPER, cands, (paper_iou, paper_stab), ""), (variant_label(quantile, scope), nonempty, *own))
        for name, pool, (t_iou, t_stab), note in settings:
            kept = (everything.filter_candidates(pool, t_iou, t_stab) if np.isfinite(t_iou)
                    else everything._empty(*cands.original_size))  # no threshold: nothing kept
            for row in _score(kept, label, objects):
                rows.append(dict(row, model=model.name, points_per_side=int(points_per_side), thresholds=name,
                                 pred_iou_thresh=float(t_iou), stability_thresh=float(t_stab),
                                 n_candidates=len(cands), note=note))
    return pd.DataFrame(rows, columns=COLUMNS)


def _own_thresholds(pools: list, quantile: float) -> tuple[tuple[float, float], str]:
    """The variant's thresholds over the non-empty candidates of ``pools`` (NaN, with a note, if none)."""
    iou = np.concatenate([c.predicted_iou for c in pools]) if pools else np.zeros(0)
    stab = np.concatenate([c.stability_score for c in pools]) if pools else np.zeros(0)
    if iou.size == 0:
        return (float("nan"), float("nan")), "no non-empty candidate to set thresholds from: nothing kept"
    return everything.quantile_thresholds(iou, stab, quantile), ""


def threshold_means(table: pd.DataFrame, keys: Sequence[str] = ("model", "points_per_side", "thresholds")) -> pd.DataFrame:
    """Mean S1 DICE (%) per model, grid size and threshold setting, with the thresholds used,
    the objects scored (``n``), those left without any mask (``n_empty``) and masks kept per image."""
    keys = list(keys)
    per_image = table.drop_duplicates([*keys, "task", "image_id"]).groupby(keys)["n_masks"].mean()
    out = table.groupby(keys).agg(dice=("dice", "mean"), n=("dice", "size"), n_empty=("empty_pred", "sum"),
                                  pred_iou_thresh=("pred_iou_thresh", "mean"),
                                  stability_thresh=("stability_thresh", "mean"))
    out["masks_per_image"] = per_image
    return out
