"""Segmentation metrics: DICE, JAC, HD, HD95, ASSD and the empty-mask policy (paper 4.2).

All metrics compare one predicted binary mask with one ground-truth (GT) mask of the same
``(H, W)`` shape, at the original image resolution:

* **DICE** and **JAC** (Jaccard, IoU) are percentages, 0..100.
* **HD**, **HD95** and **ASSD** are in pixels (unit pixel spacing, no physical spacing).

Distances follow :mod:`medpy.metric.binary` (``hd``, ``hd95``, ``assd`` with the defaults
``connectivity=1``, ``voxelspacing=None``) exactly, so numbers are comparable with the many
papers that use medpy:

* the *boundary* of a mask is ``mask XOR binary_erosion(mask, 4-connected cross)``, with
  everything outside the image counted as background (a mask touching the image border has its
  border pixels on its boundary);
* the *surface distances* from A to B are, for every boundary pixel of A, the Euclidean distance
  to the nearest boundary pixel of B (``scipy.ndimage.distance_transform_edt``);
* HD is the maximum of both directed sets, HD95 the 95th percentile (``numpy.percentile``,
  linear interpolation) of the two sets pooled, ASSD the mean of the two sets pooled.

Empty masks
-----------
Distances are undefined when a mask has no pixel, and DICE is 0/0 when both are empty.
medpy raises; the authors' evaluation code returned HD = 0 for an empty prediction. That is
wrong: HD is "lower is better", so a model that predicts *nothing* would get the best possible
distance and a failure would pull the average HD *down*, i.e. look like a success. We apply an
explicit, named policy instead (:data:`EMPTY_POLICY`) and report ``empty_pred`` / ``empty_gt``
flags with every result so tables count how often it was applied:

``"worst"`` (default, :data:`WORST`)
    both empty: DICE = JAC = 100, HD = HD95 = ASSD = 0 (nothing to find, nothing found);
    exactly one empty: DICE = JAC = 0 and HD = HD95 = ASSD = the image diagonal
    ``hypot(H - 1, W - 1)``, the largest distance any two pixels of the image can have, i.e. the
    worst value a non-empty prediction could reach. It is finite, so averages stay defined.
``"nan"`` (:data:`NAN`)
    exactly one empty: DICE = JAC = 0 (well defined), distances NaN;
    both empty: every metric NaN. Averages must then skip NaNs explicitly (pandas does).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import (
    binary_erosion,
    distance_transform_edt,
    generate_binary_structure,
)

WORST = "worst"
NAN = "nan"
EMPTY_POLICIES = (WORST, NAN)
#: The empty-mask policy used unless a caller asks otherwise; see the module docstring.
EMPTY_POLICY = WORST

METRIC_NAMES = ("dice", "jac", "hd", "hd95", "assd")

# 4-connected cross: medpy's default ``connectivity=1`` footprint for the boundary.
_FOOTPRINT = generate_binary_structure(2, 1)


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.ndim != 2 or gt.ndim != 2:
        raise ValueError(f"masks must be 2D (H, W); got pred {pred.shape}, gt {gt.shape}")
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: pred {pred.shape} vs gt {gt.shape}")
    return pred.astype(bool, copy=False), gt.astype(bool, copy=False)


def _check_policy(policy: str) -> None:
    if policy not in EMPTY_POLICIES:
        raise ValueError(f"unknown empty-mask policy {policy!r}; choose one of {EMPTY_POLICIES}")


def worst_distance(shape: tuple[int, int]) -> float:
    """Worst-case distance (pixels) for an image of ``shape``: ``hypot(H - 1, W - 1)``.

    The largest distance between two pixel centres of the image, hence an upper bound on the HD,
    HD95 and ASSD of any two non-empty masks of that shape.
    """
    h, w = shape
    return float(math.hypot(h - 1, w - 1))


def _overlap(pred: np.ndarray, gt: np.ndarray, policy: str) -> tuple[float, float]:
    inter = int(np.count_nonzero(pred & gt))
    n_pred = int(np.count_nonzero(pred))
    n_gt = int(np.count_nonzero(gt))
    if n_pred == 0 and n_gt == 0:
        value = 100.0 if policy == WORST else float("nan")
        return value, value
    union = n_pred + n_gt - inter
    return 200.0 * inter / (n_pred + n_gt), 100.0 * inter / union


def dice(pred: np.ndarray, gt: np.ndarray, policy: str = EMPTY_POLICY) -> float:
    """DICE coefficient in percent: ``200 |P ∩ G| / (|P| + |G|)``.

    Both masks empty: 100 under ``"worst"``, NaN under ``"nan"``; one empty: 0.
    """
    _check_policy(policy)
    return _overlap(*_check_pair(pred, gt), policy)[0]


def jac(pred: np.ndarray, gt: np.ndarray, policy: str = EMPTY_POLICY) -> float:
    """Jaccard index (IoU) in percent: ``100 |P ∩ G| / |P ∪ G|``; empty masks as :func:`dice`."""
    _check_policy(policy)
    return _overlap(*_check_pair(pred, gt), policy)[1]


def _boundary(mask: np.ndarray) -> np.ndarray:
    # medpy's definition: the pixels removed by one 4-connected erosion (border_value=0, so
    # pixels on the image edge belong to the boundary).
    return mask ^ binary_erosion(mask, structure=_FOOTPRINT, iterations=1)


def surface_distances(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Directed boundary distances (pixels) ``pred -> gt`` and ``gt -> pred``.

    Parameters
    ----------
    pred, gt : (H, W) bool arrays, both non-empty.

    Returns
    -------
    d_pred_gt, d_gt_pred : 1D float64 arrays
        For each boundary pixel of ``pred`` (in raster order) the distance to the nearest
        boundary pixel of ``gt``, and vice versa; the same values as medpy's private
        ``__surface_distances(pred, gt)`` and ``__surface_distances(gt, pred)``.

    Raises
    ------
    ValueError
        If either mask is empty (distances are undefined; see the empty-mask policy).

    Notes
    -----
    Both masks are first cropped to the bounding box of their union. This is exact, not an
    approximation: every boundary pixel lies inside that box, the pixels just outside it are
    background in both masks (as the image outside is for the erosion), and a distance
    transform only needs the feature pixels, which are all inside. It makes small objects in
    large images cheap.
    """
    pred, gt = _check_pair(pred, gt)
    if not pred.any() or not gt.any():
        raise ValueError("surface distances are undefined for an empty mask")
    rows = np.flatnonzero((pred | gt).any(axis=1))
    cols = np.flatnonzero((pred | gt).any(axis=0))
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    pred, gt = pred[window], gt[window]
    b_pred, b_gt = _boundary(pred), _boundary(gt)
    # distance_transform_edt measures the distance to the nearest zero, hence the inversion.
    d_pred_gt = distance_transform_edt(~b_gt)[b_pred]
    d_gt_pred = distance_transform_edt(~b_pred)[b_gt]
    return d_pred_gt, d_gt_pred


def _distances(pred: np.ndarray, gt: np.ndarray, policy: str) -> tuple[float, float, float]:
    empty_pred, empty_gt = not pred.any(), not gt.any()
    if empty_pred and empty_gt:
        value = 0.0 if policy == WORST else float("nan")
        return value, value, value
    if empty_pred or empty_gt:
        value = worst_distance(pred.shape) if policy == WORST else float("nan")
        return value, value, value
    d1, d2 = surface_distances(pred, gt)
    pooled = np.concatenate([d1, d2])  # medpy's order (matters only for float summation)
    return float(max(d1.max(), d2.max())), float(np.percentile(pooled, 95)), float(pooled.mean())


def hd(pred: np.ndarray, gt: np.ndarray, policy: str = EMPTY_POLICY) -> float:
    """Symmetric (maximum) Hausdorff distance between the mask boundaries, in pixels."""
    _check_policy(policy)
    return _distances(*_check_pair(pred, gt), policy)[0]


def hd95(pred: np.ndarray, gt: np.ndarray, policy: str = EMPTY_POLICY) -> float:
    """95th percentile of the pooled boundary distances (medpy's ``hd95``), in pixels."""
    _check_policy(policy)
    return _distances(*_check_pair(pred, gt), policy)[1]


def assd(pred: np.ndarray, gt: np.ndarray, policy: str = EMPTY_POLICY) -> float:
    """Average symmetric surface distance (mean of the pooled boundary distances), in pixels."""
    _check_policy(policy)
    return _distances(*_check_pair(pred, gt), policy)[2]


def evaluate_pair(pred: np.ndarray, gt: np.ndarray, policy: str = EMPTY_POLICY) -> dict:
    """All metrics of one prediction against one GT mask.

    Parameters
    ----------
    pred, gt : (H, W) array_like, interpreted as bool (non-zero = foreground).
    policy : {"worst", "nan"}
        Empty-mask policy (module docstring); default :data:`EMPTY_POLICY`.

    Returns
    -------
    dict
        ``dice``, ``jac`` (percent), ``hd``, ``hd95``, ``assd`` (pixels) as float, and the bools
        ``empty_pred`` / ``empty_gt`` telling whether the policy, not a measurement, produced
        the numbers. Boundaries are computed once for all three distances.

    Raises
    ------
    ValueError
        If the masks are not 2D, differ in shape, or the policy is unknown.
    """
    _check_policy(policy)
    pred, gt = _check_pair(pred, gt)
    d, j = _overlap(pred, gt, policy)
    h, h95, a = _distances(pred, gt, policy)
    return {
        "dice": d,
        "jac": j,
        "hd": h,
        "hd95": h95,
        "assd": a,
        "empty_pred": not pred.any(),
        "empty_gt": not gt.any(),
    }


def empty_counts(results) -> dict:
    """How often the empty-mask policy was applied in a results table.

    Parameters
    ----------
    results : pandas.DataFrame with bool columns ``empty_pred`` and ``empty_gt``.

    Returns
    -------
    dict
        ``n`` (rows), ``empty_pred_only``, ``empty_gt_only``, ``both_empty``.
    """
    ep = results["empty_pred"].astype(bool)
    eg = results["empty_gt"].astype(bool)
    return {
        "n": len(results),
        "empty_pred_only": int((ep & ~eg).sum()),
        "empty_gt_only": int((~ep & eg).sum()),
        "both_empty": int((ep & eg).sum()),
    }
