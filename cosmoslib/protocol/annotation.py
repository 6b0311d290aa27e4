"""Annotation effort: Human Correction Efforts (HCE) of a mask (paper 4.9, Table 7).

HCE (Qin et al. 2022, "Highly Accurate Dichotomous Image Segmentation", ECCV) estimates how
many mouse actions a person needs to turn a predicted mask into the GT mask: for every error
region that must be fixed, the number of polygon control points along the part of its
boundary that has to be redrawn (the boundary simplified by Ramer-Douglas-Peucker with
tolerance ``epsilon`` pixels), plus one action per error region that can be fixed without
drawing (a false-positive island that is deleted, a hole in the prediction that is filled).
Errors within ``relax`` pixels of the boundary of the union of prediction and GT are forgiven
(5 in the paper), except that the GT's skeleton must be covered. Lower is better; 0 is a mask
any annotator would accept. The paper's Table 7 reports it for human annotations with and
without SAM's box-prompted masks. The computation is PyPI ``pysodmetrics``'s
``HumanCorrectionEffortMeasure`` (a port of the authors' code); this module only feeds it
correctly and aggregates.

Quirks of pysodmetrics (1.6.2) handled here
-------------------------------------------
* Its ``step()`` normalises by default as for saliency maps: the GT is thresholded at
  ``> 128`` and the prediction min-max scaled, so a 0/1 or bool GT would become empty and a
  constant prediction would keep its value / 255. :func:`hce` therefore calls ``cal_hce`` on
  a float64 0/1 prediction and a bool GT (what ``step(normalize=False)`` passes on).
* OpenCV's erosion treats pixels outside the image as foreground: an error region that
  touches the image edge is not relaxed from that side; its dilation treats them as
  background. The boundary along the image edge is never counted (nothing to draw there).
* It returns a numpy integer; :func:`hce` returns a Python ``int``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: Relaxation (pixels) and RDP tolerance (pixels) of Qin et al. (and pysodmetrics' defaults).
HCE_RELAX = 5
HCE_EPSILON = 2.0


def hce(pred: np.ndarray, gt: np.ndarray, relax: int = HCE_RELAX,
        epsilon: float = HCE_EPSILON) -> int:
    """Human Correction Efforts of one predicted mask against its GT mask.

    Parameters
    ----------
    pred, gt : (H, W) arrays, the same shape; nonzero = object. Either may be empty.
    relax : int >= 0, pixels of error along the union's boundary that are forgiven.
    epsilon : float > 0, Ramer-Douglas-Peucker tolerance (pixels) of the redrawn boundaries.

    Returns
    -------
    int
        Control points plus independent regions (see the module docstring); 0 when
        ``pred`` equals ``gt``.

    Raises
    ------
    ValueError
        Shapes differ or are not 2D, ``relax < 0`` or ``epsilon <= 0``.
    """
    # pysodmetrics is installed --no-deps (see Makefile) and only Table 7 needs it: import on use.
    from py_sod_metrics import HumanCorrectionEffortMeasure

    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must be the same (H, W)")
    if isinstance(relax, bool) or int(relax) != relax or relax < 0:
        raise ValueError(f"relax must be a non-negative integer; got {relax!r}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0; got {epsilon!r}")
    measure = HumanCorrectionEffortMeasure(relax=int(relax), epsilon=float(epsilon))
    return int(measure.cal_hce(pred.astype(bool).astype(np.float64), gt.astype(bool)))


def hce_by_image(per_object, keys=("task", "image_id"), column: str = "hce"):
    """Per-image HCE from per-object HCE: the sum over the image's objects.

    Each object's mask is corrected separately, so an image's effort is the sum of its
    objects' efforts.

    Parameters
    ----------
    per_object : pandas.DataFrame with the ``keys`` columns and ``column`` (one row per object).
    keys : column names that identify an image.
    column : the per-object HCE column.

    Returns
    -------
    pandas.DataFrame
        One row per image, sorted by ``keys``: ``keys``, ``n_objects``, ``hce`` (the sum,
        int) and ``hce_per_object`` (the mean, float). Objects whose HCE is missing (NaN)
        are left out of both and of ``n_objects``.

    Raises
    ------
    KeyError
        A missing column.
    """

    keys = list(keys)
    missing = [c for c in keys + [column] if c not in per_object.columns]
    if missing:
        raise KeyError(f"per-object table lacks columns {missing}")
    frame = per_object.dropna(subset=[column])
    grouped = frame.groupby(keys, sort=True)[column]
    out = pd.DataFrame({
        "n_objects": grouped.size(),
        "hce": grouped.sum().astype(np.int64),
        "hce_per_object": grouped.mean().astype(np.float64),
    }).reset_index()
    return out[keys + ["n_objects", "hce", "hce_per_object"]]


#: Columns of :func:`annotation_table`.
TABLE_COLUMNS = ["model", "task", "image_id", "label_value", "object", "modality", "dice", "hce", "seconds"]


def annotation_table(results: pd.DataFrame, redecoders) -> pd.DataFrame:
    """Table 7: HCE of each object's S5 mask (box prompt, oracle rule) and the seconds it cost.

    Parameters
    ----------
    results : the results table of the run (:func:`cosmoslib.protocol.evaluate.evaluate`); its
        unshifted S5 oracle rows are used.
    redecoders : ``{model name: redecode}``, ``redecode(task, image_id, label_value, strategy)
        -> (image, gt, prompt, mask, dice)``: the mask the run chose, decoded again from the
        cached embedding with the run's own prompt (masks are not stored).

    Returns
    -------
    DataFrame
        :data:`TABLE_COLUMNS`, one row per model and object: ``dice`` (%) of the re-decoded mask,
        ``hce`` (:func:`hce`), ``seconds`` = the object's decode time plus its share of the
        image's encode time (``t_embed_s`` / objects of the image in the run). Empty (same
        columns) when the results have no S5 row.

    Raises
    ------
    KeyError
        A model of the S5 rows without a re-decoder.
    """
    s5 = results[(results["strategy"] == "S5") & (results["selection_rule"] == "oracle_dice")
                 & (results["shift_level"] == 0)]
    rows = []
    for name, part in s5.groupby("model", sort=False):
        if name not in redecoders:
            raise KeyError(f"no re-decoder for model {name!r} (have {sorted(redecoders)})")
        redecode = redecoders[name]
        n_obj = part.groupby(["task", "image_id"])["label_value"].transform("size")
        for r, objects_in_image in zip(part.itertuples(index=False), n_obj):
            _, gt, _, mask, dice = redecode(r.task, r.image_id, r.label_value, "S5")
            rows.append(dict(model=name, task=r.task, image_id=r.image_id, label_value=int(r.label_value),
                             object=r.object, modality=r.modality, dice=dice, hce=hce(mask, gt),
                             seconds=float(r.t_decode_s) + float(r.t_embed_s) / objects_in_image))
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)
