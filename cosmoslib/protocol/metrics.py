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

Physical spacing, 3D and NSD
----------------------------
:func:`evaluate_mm`, :func:`surface_distances_mm` and :func:`nsd` are the spacing-aware
variants for 2D *and* 3D masks (used for the volume-level scores of :mod:`cosmoslib.protocol.volumes`):
the same boundary definition (erosion with the cross-shaped, face-connected footprint of the
mask's dimension, image outside = background) and the same pooling as above, but distances in
millimetres (``distance_transform_edt(..., sampling=spacing)``; medpy's ``voxelspacing``).
With unit spacing on 2D masks they give exactly :func:`evaluate_pair`'s numbers.

**NSD** (normalised surface Dice, Nikolov et al. 2021) at tolerance ``tau`` mm is the share of
boundary elements of both masks that lie within ``tau`` of the other mask's boundary:
``(#{d_PG <= tau} + #{d_GP <= tau}) / (|dP| + |dG|)``, in percent. Boundary elements are
boundary voxels counted once each, as in MONAI's ``compute_surface_dice`` (its default
``use_subvoxels=False``); DeepMind's ``surface-distance`` package, which MedSAM's evaluation
uses, weights each boundary element by its surface area instead, so values differ slightly
(more with strong anisotropy). Empty masks follow the policy like DICE: both empty -> 100
(``"worst"``) or NaN (``"nan"``); exactly one empty -> 0 (no boundary element of the non-empty
mask can be matched). Distances of an exactly-one-empty pair under ``"worst"`` are the
physical diagonal of the array, :func:`worst_distance_mm`.
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
#: Metrics of :func:`evaluate_mm` (DICE, JAC, NSD in %; HD, HD95, ASSD in mm).
METRIC_NAMES_MM = ("dice", "jac", "hd", "hd95", "assd", "nsd")

#: Default NSD tolerance in mm. 2 mm is what MedSAM's own evaluation script uses
#: (bowang-lab/MedSAM, evaluation/compute_metrics.py: ``compute_multi_class_nsd(...,
#: tolerance=2.0)``, also used for the CVPR 2024 "MedSAM on laptop" challenge's DSC + NSD), so
#: our NSD numbers sit on the scale MedSAM users know. For 2D images without a known spacing the
#: tolerance is read in pixels.
NSD_TOLERANCE_MM = 2.0

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
    # pixels on the image edge belong to the boundary); in 3D the 6-connected cross.
    footprint = _FOOTPRINT if mask.ndim == 2 else generate_binary_structure(mask.ndim, 1)
    return mask ^ binary_erosion(mask, structure=footprint, iterations=1)


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
    return _surface_distances_nd(pred, gt, None)


def _surface_distances_nd(pred: np.ndarray, gt: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """:func:`surface_distances` for bool masks of any dimension; ``spacing`` None = unit."""
    if not pred.any() or not gt.any():
        raise ValueError("surface distances are undefined for an empty mask")
    union = pred | gt
    window = []
    for axis in range(union.ndim):
        others = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=others))
        window.append(slice(idx[0], idx[-1] + 1))
    window = tuple(window)
    pred, gt = pred[window], gt[window]
    b_pred, b_gt = _boundary(pred), _boundary(gt)
    # distance_transform_edt measures the distance to the nearest zero, hence the inversion.
    d_pred_gt = distance_transform_edt(~b_gt, sampling=spacing)[b_pred]
    d_gt_pred = distance_transform_edt(~b_pred, sampling=spacing)[b_gt]
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


# --------------------------------------------------------------------------------------------
# spacing-aware variants (2D and 3D): distances in mm, NSD
# --------------------------------------------------------------------------------------------


def _check_pair_nd(pred, gt, spacing) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.ndim not in (2, 3) or gt.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D (H, W) or 3D (D, H, W); got pred {pred.shape}, gt {gt.shape}")
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: pred {pred.shape} vs gt {gt.shape}")
    if spacing is None:
        spacing = (1.0,) * pred.ndim
    spacing = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=float)))
    if len(spacing) == 1:
        spacing = spacing * pred.ndim
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} entries for {pred.ndim}D masks")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be finite and positive, got {spacing}")
    return pred.astype(bool, copy=False), gt.astype(bool, copy=False), spacing


def worst_distance_mm(shape, spacing=None) -> float:
    """Worst-case distance (mm) in an array of ``shape``: its physical diagonal.

    ``sqrt(sum(((n_i - 1) * s_i) ** 2))``, the largest distance between two voxel centres, hence
    an upper bound on HD, HD95 and ASSD of any two non-empty masks of that shape. With unit
    spacing on a 2D shape it equals :func:`worst_distance`.

    Parameters
    ----------
    shape : tuple of int
        Array shape, 2D ``(H, W)`` or 3D ``(D, H, W)``.
    spacing : sequence of float, optional
        Voxel size in mm along each axis of ``shape`` (default: 1 per axis).
    """
    spacing = (1.0,) * len(shape) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != len(shape):
        raise ValueError(f"spacing {spacing} does not match shape {shape}")
    return float(math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, spacing))))


def surface_distances_mm(pred, gt, spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """Directed boundary distances in mm, ``pred -> gt`` and ``gt -> pred``, for 2D or 3D masks.

    Parameters
    ----------
    pred, gt : array_like, bool, same 2D ``(H, W)`` or 3D ``(D, H, W)`` shape, both non-empty.
    spacing : sequence of float, optional
        Voxel size in mm along each array axis (same order as the axes); a scalar is used for
        every axis; default 1 (distances then in pixels/voxels).

    Returns
    -------
    d_pred_gt, d_gt_pred : 1D float64 arrays
        For each boundary voxel of ``pred`` (raster order) the distance in mm to the nearest
        boundary voxel of ``gt``, and vice versa; the values of medpy's private
        ``__surface_distances(pred, gt, voxelspacing=spacing, connectivity=1)``.

    Raises
    ------
    ValueError
        Empty mask, shape mismatch, or a non-positive spacing.
    """
    pred, gt, spacing = _check_pair_nd(pred, gt, spacing)
    return _surface_distances_nd(pred, gt, spacing)


def _nsd_from(d1: np.ndarray, d2: np.ndarray, tolerance: float) -> float:
    return 100.0 * (np.count_nonzero(d1 <= tolerance) + np.count_nonzero(d2 <= tolerance)) / (d1.size + d2.size)


def _check_tolerance(tolerance) -> float:
    tolerance = float(tolerance)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"NSD tolerance must be a finite number >= 0 (mm), got {tolerance}")
    return tolerance


def nsd(pred, gt, tolerance: float = NSD_TOLERANCE_MM, spacing=None, policy: str = EMPTY_POLICY) -> float:
    """Normalised surface Dice in percent at ``tolerance`` mm, for 2D or 3D masks.

    Parameters
    ----------
    pred, gt : array_like, same 2D ``(H, W)`` or 3D ``(D, H, W)`` shape (non-zero = foreground).
    tolerance : float
        Tolerance ``tau`` in mm (in pixels when ``spacing`` is None); a boundary voxel counts as
        matched when its distance to the other boundary is ``<= tau``. Default
        :data:`NSD_TOLERANCE_MM` (2 mm, MedSAM's evaluation).
    spacing : sequence of float, optional
        Voxel size in mm per array axis; default 1.
    policy : {"worst", "nan"}
        Empty-mask policy: both empty -> 100 (``"worst"``) or NaN (``"nan"``); exactly one
        empty -> 0 under both (see the module docstring).

    Returns
    -------
    float
        ``100 (#{d_PG <= tau} + #{d_GP <= tau}) / (|dP| + |dG|)`` with boundary voxels counted
        once each (MONAI ``compute_surface_dice`` with ``use_subvoxels=False``); 0..100.
    """
    _check_policy(policy)
    tolerance = _check_tolerance(tolerance)
    pred, gt, spacing = _check_pair_nd(pred, gt, spacing)
    empty_pred, empty_gt = not pred.any(), not gt.any()
    if empty_pred and empty_gt:
        return 100.0 if policy == WORST else float("nan")
    if empty_pred or empty_gt:
        return 0.0
    return _nsd_from(*_surface_distances_nd(pred, gt, spacing), tolerance)


def evaluate_mm(pred, gt, spacing=None, tolerance: float = NSD_TOLERANCE_MM,
                policy: str = EMPTY_POLICY) -> dict:
    """All metrics of one 2D or 3D prediction against its GT, with distances in millimetres.

    Parameters
    ----------
    pred, gt : array_like, same 2D ``(H, W)`` or 3D ``(D, H, W)`` shape (non-zero = foreground).
    spacing : sequence of float, optional
        Voxel size in mm along each array axis, in the axis order of the arrays (for a volume
        stacked from slices: ``(slice spacing, row spacing, column spacing)``). Default 1 per
        axis: then distances are in pixels and, on 2D masks, every number equals
        :func:`evaluate_pair`'s.
    tolerance : float
        NSD tolerance in mm (:data:`NSD_TOLERANCE_MM`).
    policy : {"worst", "nan"}
        Empty-mask policy (module docstring); exactly one empty under ``"worst"`` gives the
        distances :func:`worst_distance_mm` of the array.

    Returns
    -------
    dict
        ``dice``, ``jac``, ``nsd`` (percent), ``hd``, ``hd95``, ``assd`` (mm), and the bools
        ``empty_pred`` / ``empty_gt``. Distances are medpy's ``hd``/``hd95``/``assd`` with
        ``voxelspacing=spacing``; boundaries are computed once for all four surface metrics.

    Raises
    ------
    ValueError
        Masks not 2D/3D or of different shapes, bad spacing or tolerance, unknown policy.
    """
    _check_policy(policy)
    tolerance = _check_tolerance(tolerance)
    pred, gt, spacing = _check_pair_nd(pred, gt, spacing)
    d, j = _overlap(pred, gt, policy)
    empty_pred, empty_gt = not pred.any(), not gt.any()
    if empty_pred and empty_gt:
        dist = 0.0 if policy == WORST else float("nan")
        h = h95 = a = dist
        n = 100.0 if policy == WORST else float("nan")
    elif empty_pred or empty_gt:
        h = h95 = a = worst_distance_mm(pred.shape, spacing) if policy == WORST else float("nan")
        n = 0.0
    else:
        d1, d2 = _surface_distances_nd(pred, gt, spacing)
        pooled = np.concatenate([d1, d2])
        h, h95, a = float(max(d1.max(), d2.max())), float(np.percentile(pooled, 95)), float(pooled.mean())
        n = _nsd_from(d1, d2, tolerance)
    return {"dice": d, "jac": j, "hd": h, "hd95": h95, "assd": a, "nsd": n,
            "empty_pred": empty_pred, "empty_gt": empty_gt}
