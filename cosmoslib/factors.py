"""What makes an object hard: the five object factors of paper section 4.8.

For every (image, object) the paper records five properties and correlates each with SAM's
DICE (Table 6, computed in :mod:`cosmoslib.stats`):

``size_px`` -- :func:`size`
    Pixel area of the ground-truth (GT) mask, in pixels.
``aspect_ratio`` -- :func:`aspect_ratio`
    Short side / long side of the tight GT bounding box (0..1]; sides are counted inclusively
    in pixels, so a one-pixel-wide object has side 1.
``intensity_diff`` -- :func:`contrast`
    Contrast magnitude ``|mean inside - mean of surroundings|``, the paper's reading ("poor ...
    with low contrast" is about magnitude). The surroundings are the bounding box enlarged
    outward by 0.1 x its width on the left and on the right and 0.1 x its height at the top
    and at the bottom (each margin rounded *up* to whole pixels, so every object gets at least
    a one-pixel ring), clipped to the image, without the object itself. Units: grey levels of
    the 0..255 normalised image; RGB is first turned into luma with ITU-R BT.601 weights
    (0.299 R + 0.587 G + 0.114 B, as PIL's ``'L'`` mode, kept as float). NaN when the
    surroundings are empty (the object fills its enlarged box, e.g. the whole image).
``intensity_diff_signed`` -- :func:`intensity_difference`
    The same difference with its sign (positive = object brighter), kept as its own column.
``modality_code`` -- :func:`modality_code`
    A fixed integer per modality (:data:`MODALITY_CODES`, from :mod:`cosmoslib.vocabulary`:
    the paper's 18 modalities in alphabetical order, "unknown" 18), stable across runs.
``fourier_order`` -- :func:`fourier_order`
    Boundary complexity as the elliptic-Fourier order needed to redraw the object's outer
    contour (Eq. 2-3), DICE taken against the region that contour encloses (holes filled), as
    the paper defines it. ``fourier_order_mask`` is the same search with DICE against the whole
    mask (holes and other parts penalised); :func:`fo_reference_effect` compares the two.

:func:`compute_factors` applies them to a manifest and :func:`factors_cli` backs
``cosmos factors ROOT --out factors.parquet``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyefd
from scipy import ndimage
from skimage import measure
from tqdm.auto import tqdm

from cosmoslib import io, vocabulary
from cosmoslib.prompts import object_mask

#: Re-exported from :mod:`cosmoslib.vocabulary` (the one modality vocabulary): the paper's 18
#: modalities in case-insensitive alphabetical order, then "unknown" (18).
MODALITY_CODES: dict[str, int] = vocabulary.MODALITY_CODES

#: ITU-R BT.601 luma weights (R, G, B), the ones PIL uses for mode "L".
LUMA_BT601 = (0.299, 0.587, 0.114)

#: Columns of the factors table, in order.
FACTOR_COLUMNS = (
    "task", "image_id", "label_value", "object", "modality", "size_px", "aspect_ratio",
    "intensity_diff", "intensity_diff_signed", "modality_code", "fourier_order",
    "fourier_order_raw", "efd_dice", "n_contours", "n_holes", "fo_stopped_by",
    "fourier_order_mask", "efd_dice_mask",
)

_KEY = ["task", "image_id", "label_value"]


# --------------------------------------------------------------------------------------------
# Simple factors
# --------------------------------------------------------------------------------------------


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight bounding box ``[x0, y0, x1, y1]`` of a non-empty mask (inclusive pixel indices)."""
    mask = object_mask(mask)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def size(mask: np.ndarray) -> int:
    """Object size: number of mask pixels.

    Raises
    ------
    ValueError
        For an empty or non-2-D mask.
    """
    return int(object_mask(mask).sum())


def aspect_ratio(mask: np.ndarray) -> float:
    """Short side / long side of the tight bounding box, in ``(0, 1]``.

    Sides are counted inclusively in pixels (``x1 - x0 + 1``), so a 1 x 20 line gives 0.05
    and a single pixel gives 1.
    """
    x0, y0, x1, y1 = bbox(mask)
    w, h = x1 - x0 + 1, y1 - y0 + 1
    return min(w, h) / max(w, h)


def _margin(side: int, ratio: float) -> int:
    # ceil(ratio * side) with a tolerance, so 0.1 * 30 = 3.0000000000000004 gives 3, not 4.
    return int(math.ceil(ratio * side - 1e-9))


def enlarged_box(mask: np.ndarray, ratio: float = 0.1) -> tuple[int, int, int, int]:
    """The bounding box grown outward by ``ceil(ratio * side)`` on each side, clipped.

    Returns ``[x0, y0, x1, y1]`` inclusive. Width margins go left and right, height margins
    top and bottom.
    """
    mask = object_mask(mask)
    x0, y0, x1, y1 = bbox(mask)
    mx, my = _margin(x1 - x0 + 1, ratio), _margin(y1 - y0 + 1, ratio)
    h, w = mask.shape
    return max(x0 - mx, 0), max(y0 - my, 0), min(x1 + mx, w - 1), min(y1 + my, h - 1)


def to_grey(image: np.ndarray) -> np.ndarray:
    """Float grey levels of an image: (H, W) as is, (H, W, 3) RGB -> BT.601 luma.

    RGBA (H, W, 4) drops the alpha channel first.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        return image.astype(float)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return image[..., :3].astype(float) @ np.asarray(LUMA_BT601)
    raise ValueError(f"image must be (H, W) or (H, W, 3), got shape {image.shape}")


def intensity_difference(image: np.ndarray, mask: np.ndarray, ratio: float = 0.1) -> float:
    """Mean intensity inside the object minus mean over its surroundings (grey levels).

    Parameters
    ----------
    image : (H, W) or (H, W, 3) array
        The 0..255 normalised image; RGB is reduced to BT.601 luma (see :func:`to_grey`).
    mask : (H, W) bool array
        The object.
    ratio : float
        Outward growth of the bounding box per side, as a fraction of that side (paper: 0.1),
        rounded up to whole pixels (see :func:`enlarged_box`).

    Returns
    -------
    float
        ``mean(object) - mean(enlarged box minus object)``; positive when the object is
        brighter. NaN when that surrounding region is empty. Other objects inside the enlarged
        box count as surroundings.
    """
    mask = object_mask(mask)
    grey = to_grey(image)
    if grey.shape != mask.shape:
        raise ValueError(f"image {grey.shape} and mask {mask.shape} differ in size")
    x0, y0, x1, y1 = enlarged_box(mask, ratio)
    region = np.zeros_like(mask)
    region[y0 : y1 + 1, x0 : x1 + 1] = True
    surround = region & ~mask
    if not surround.any():
        return float("nan")
    return float(grey[mask].mean() - grey[surround].mean())


def contrast(image: np.ndarray, mask: np.ndarray, ratio: float = 0.1) -> float:
    """Contrast magnitude ``|intensity_difference(image, mask, ratio)|`` in grey levels.

    The paper's reading of the intensity factor ("SAM performs poorly ... with low contrast"
    is about how far the object's grey level is from its surroundings, in either direction):
    the ``intensity_diff`` column of the factors table. NaN where
    :func:`intensity_difference` is NaN (empty surroundings).
    """
    return abs(intensity_difference(image, mask, ratio))


def modality_code(modality: str | None) -> int:
    """The fixed integer code of a modality name (:func:`cosmoslib.vocabulary.modality_code`).

    Matching ignores case and every non-alphanumeric character and knows a few aliases
    ("Ultrasound" -> US, "X ray" -> X-ray, "MR" -> MRI, "T1W" -> T1W MRI, ...). The paper's 18
    modalities get 0..17 (:data:`MODALITY_CODES`), the vocabulary's extra names (PET, OCT, ...)
    19 and up; anything else, including None/NaN/"unknown", is ``MODALITY_CODES["unknown"]``
    (18).
    """
    return vocabulary.modality_code(modality)


# --------------------------------------------------------------------------------------------
# Fourier order (Eq. 2-3)
# --------------------------------------------------------------------------------------------


#: What the decoded contour is compared with in :func:`fourier_order`.
FO_REFERENCES = ("outer", "mask")


@dataclass(frozen=True)
class FourierOrder:
    """Result of :func:`fourier_order`.

    Attributes
    ----------
    order : float
        ``F_final = F_a + n * 100 * (1 - DICE_a)``, the paper's optimised Fourier order.
    raw_order : int
        ``F_a``, the order at which the search stopped.
    dice : float
        DICE (%) between the filled reconstruction at ``F_a`` and the reference (see
        ``reference``).
    stopped_by : str
        ``'dice'`` (DICE > threshold), ``'gain'`` (DICE gained less than ``min_gain`` for
        ``patience`` consecutive orders) or ``'cap'`` (``max_order`` reached).
    n_contours : int
        Number of boundaries of the mask: outer boundaries of its 8-connected components plus
        the boundaries of its holes (1 = one simple region).
    dices : tuple of float
        DICE (%) at orders 1..F_a.
    reference : str
        ``'outer'`` (the filled outer region, the paper's "original contour") or ``'mask'``
        (the whole mask, holes and other components included).
    """

    order: float
    raw_order: int
    dice: float
    stopped_by: str
    n_contours: int
    dices: tuple[float, ...] = field(repr=False)
    reference: str = "outer"


def _contours(mask: np.ndarray) -> list[np.ndarray]:
    """All boundaries of a mask as closed (M, 2) ``(x, y)`` polylines.

    Marching squares (:func:`skimage.measure.find_contours`) at level 0.5 on the mask padded by
    one pixel, so objects touching the border still get closed curves. The curves run half-way
    between object and background pixel centres, so filling one (pixel centres inside, as
    :func:`skimage.draw.polygon`) gives back exactly the pixels it encloses;
    ``fully_connected='high'`` makes the object 8-connected (and the background 4-connected).
    """

    padded = np.pad(mask.astype(float), 1)
    return [c[:, ::-1] - 1.0 for c in measure.find_contours(padded, 0.5, fully_connected="high")]


_EIGHT = np.ones((3, 3), dtype=bool)


def outer_region(mask: np.ndarray) -> np.ndarray:
    """The region inside the object's outer contour: its largest part with holes filled.

    The mask is split into 8-connected components (:func:`scipy.ndimage.label`, the
    connectivity of :func:`_contours`); each is filled with
    :func:`scipy.ndimage.binary_fill_holes` (background 4-connected, so a hole that touches
    the outside only at a corner stays a hole); the filled component with the most pixels is
    returned (ties: the first in raster order). This is the region the paper's "original
    contour" encloses, the reference of :func:`fourier_order` by default.

    Parameters
    ----------
    mask : (H, W) bool array, non-empty.

    Returns
    -------
    (H, W) bool array
        Equal to ``mask`` for a single component without holes.
    """

    mask = object_mask(mask)
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 1:
        return ndimage.binary_fill_holes(mask)
    filled = [ndimage.binary_fill_holes(labels == i) for i in range(1, n + 1)]
    return filled[int(np.argmax([f.sum() for f in filled]))]


def count_holes(mask: np.ndarray) -> int:
    """Number of holes of a mask: 4-connected background regions enclosed by the object.

    Counted with :func:`scipy.ndimage.binary_fill_holes` and :func:`scipy.ndimage.label`
    (4-connected background, as :func:`_contours`), so ``n_contours = components + holes``.
    A myocardium ring has 1, a disc 0.
    """

    mask = object_mask(mask)
    return int(ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)[1])


def _outline(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``(contour, outer, n_contours)``: the fitted outline (the boundary of
    :func:`outer_region`), that region, and the number of boundaries of the whole mask."""
    curves = _contours(mask)
    if len(curves) == 1:  # one component, no hole: the mask is its own outer region
        return curves[0], mask, 1
    outer = outer_region(mask)
    (contour,) = _contours(outer)
    return contour, outer, len(curves)


def _largest_contour(mask: np.ndarray) -> tuple[np.ndarray, int]:
    contour, _, n_contours = _outline(mask)
    return contour, n_contours


def _n_points(contour: np.ndarray, order: int) -> int:
    # Sample the reconstruction twice as densely as the traced boundary (whose vertices are at
    # most one pixel apart), with a floor of 300 and >= 8 points per period of the top order.
    return int(max(300, 2 * len(contour), 8 * order))


def _efd(contour: np.ndarray, max_order: int):

    coeffs = pyefd.elliptic_fourier_descriptors(contour, order=max_order, normalize=False)
    locus = pyefd.calculate_dc_coefficients(contour)
    return coeffs, locus


def _reconstruct(coeffs: np.ndarray, locus, order: int, num_points: int) -> np.ndarray:

    # Each harmonic's coefficients do not depend on how many are computed, so truncating the
    # max_order series to its first `order` rows is the order-`order` EFD.
    return pyefd.reconstruct_contour(coeffs[:order], locus=locus, num_points=num_points)


def _polygon_spans(curve_xy: np.ndarray, shape: tuple[int, int]):
    """Pixel runs inside a polygon: ``rows, c0, c1`` with columns ``c0 <= c < c1`` filled.

    The pixels :func:`skimage.draw.polygon` fills (a pixel centre ``(c, r)`` is inside when a
    ray to its right crosses an odd number of edges, each edge counting for rows
    ``min(y) <= r < max(y)``), found by scanlines. One difference: skimage also fills centres
    lying exactly on an edge or vertex; here those follow the crossing rule (which never matters
    for curves rebuilt from Fourier series, whose vertices are not on the pixel grid). Written
    by hand because
    ``skimage.draw.polygon`` tests every pixel of the bounding box against every vertex: a
    1000-pixel object redrawn at ~50 orders took minutes; this takes milliseconds.
    """
    h, w = int(shape[0]), int(shape[1])
    x, y = curve_xy[:, 0].astype(float), curve_xy[:, 1].astype(float)
    xj, yj = np.roll(x, 1), np.roll(y, 1)  # edge (i-1 -> i), as skimage's point_in_polygon
    r0 = np.clip(np.ceil(np.minimum(y, yj)), 0, h).astype(np.int64)  # first row >= min(y)
    r1 = np.clip(np.ceil(np.maximum(y, yj)), 0, h).astype(np.int64)  # rows < max(y)
    count = np.maximum(r1 - r0, 0)
    edge = np.repeat(np.arange(len(x)), count)
    rows = r0[edge] + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    # Same expression as skimage, so boundary decisions agree to the last bit.
    xs = (xj[edge] - x[edge]) * (rows - y[edge]) / (yj[edge] - y[edge]) + x[edge]
    order = np.lexsort((xs, rows))
    rows, xs = rows[order], xs[order]
    # A closed curve crosses every row an even number of times: pair them up.
    c0 = np.clip(np.ceil(xs[0::2]), 0, w).astype(np.int64)
    c1 = np.clip(np.ceil(xs[1::2]), 0, w).astype(np.int64)
    keep = c1 > c0
    return rows[0::2][keep], c0[keep], c1[keep]


def fill_polygon(curve_xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Filled polygon as a bool mask of ``shape`` (the pixels of :func:`skimage.draw.polygon`
    up to centres exactly on the boundary; see :func:`_polygon_spans`).

    Parameters
    ----------
    curve_xy : (M, 2) array of ``(x, y)`` vertices (closed implicitly; even-odd rule).
    shape : (H, W) of the output; parts outside are cut off.
    """
    out = np.zeros(tuple(shape[:2]), dtype=bool)
    rows, c0, c1 = _polygon_spans(np.asarray(curve_xy, float), out.shape)
    for r, a, b in zip(rows, c0, c1):
        out[r, a:b] = True
    return out


class _DiceToMask:
    """DICE (%) of filled polygons against one fixed mask, from row prefix sums of the mask.

    Only the mask's bounding box is summed (pixels outside it cannot overlap the mask), so the
    cost does not grow with the image for a small object.
    """

    def __init__(self, mask: np.ndarray):
        self.shape = mask.shape
        self.area = int(mask.sum())
        self.x0, self.y0, x1, y1 = bbox(mask)
        crop = mask[self.y0 : y1 + 1, self.x0 : x1 + 1]
        self.prefix = np.zeros((crop.shape[0], crop.shape[1] + 1), dtype=np.int64)
        np.cumsum(crop, axis=1, out=self.prefix[:, 1:])

    def __call__(self, curve_xy: np.ndarray) -> float:
        rows, c0, c1 = _polygon_spans(curve_xy, self.shape)
        filled = int((c1 - c0).sum())
        h, w1 = self.prefix.shape
        r = rows - self.y0
        inside = (r >= 0) & (r < h)
        a = np.clip(c0[inside] - self.x0, 0, w1 - 1)
        b = np.clip(c1[inside] - self.x0, 0, w1 - 1)
        overlap = int((self.prefix[r[inside], b] - self.prefix[r[inside], a]).sum())
        return 200.0 * overlap / (self.area + filled)


def efd_contour(mask: np.ndarray, order: int, num_points: int | None = None) -> np.ndarray:
    """The object's outline redrawn from its first ``order`` elliptic Fourier harmonics.

    For figures (paper Fig. 12 and Fig. 15). The outline fitted is the same one
    :func:`fourier_order` uses: the boundary of :func:`outer_region` (the largest part of the
    mask, holes filled).

    Parameters
    ----------
    mask : (H, W) bool array
    order : int
        Number of harmonics, >= 1.
    num_points : int, optional
        Points on the returned curve (default: twice the vertices of the traced boundary,
        at least 300).

    Returns
    -------
    ndarray, shape (M, 2)
        ``(x, y)`` pixel coordinates; plot with ``ax.plot(c[:, 0], c[:, 1])`` over
        ``ax.imshow(image)``.
    """
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    mask = object_mask(mask)
    contour, _ = _largest_contour(mask)
    coeffs, locus = _efd(contour, order)
    return _reconstruct(coeffs, locus, order, num_points or _n_points(contour, order))


def fourier_order(
    mask: np.ndarray,
    n: float = 2,
    dice_stop: float = 97.0,
    min_gain: float = 0.1,
    max_order: int = 50,
    patience: int = 1,
    reference: str = "outer",
) -> FourierOrder:
    """Boundary complexity as the paper's optimised Fourier order (section 4.8, Eq. 2-3).

    The paper: "we increased the FO from 1 and calculated the DICE between the decoded contour
    and the original contour at each step. Then we set two ways to end the process: 1)
    DICE > 97.0%; 2) the difference in the DICE between order F_(a-1) and order F_(a) is less
    than 0.1%. Consequently, we record the FO (F_a) and DICE after termination. Finally, we take
    F_final = F_a + n x 100 x (1 - DICE), n = 2 as the final optimized FO."

    Procedure here: the outline is the boundary of :func:`outer_region` -- the mask's largest
    8-connected part with its holes filled -- traced by marching squares (:func:`_contours`);
    its elliptic Fourier descriptors come from :func:`pyefd.elliptic_fourier_descriptors`
    (``normalize=False``) and the centre ``(L_x, L_y)`` from
    :func:`pyefd.calculate_dc_coefficients`. For orders ``1, 2, ...`` the outline is rebuilt
    with :func:`pyefd.reconstruct_contour`, filled on the image grid (the pixels
    :func:`skimage.draw.polygon` would fill, even-odd rule for a self-crossing curve, see
    :func:`fill_polygon`) and compared by DICE with the reference:

    * ``reference='outer'`` (default, the paper's definition): the region the original contour
      encloses, :func:`outer_region`. Holes are not boundary complexity here: a ring scores as
      its filled outer disc.
    * ``reference='mask'``: the whole GT mask. Holes and further components cap the reachable
      DICE, stop the search by the gain rule and raise ``F_final`` through the penalty term
      (a myocardium ring ends near DICE 60 % and FO ~ 80); kept to show how much the choice
      moves FO (:func:`fo_reference_effect`).

    For a mask with one component and no hole (``n_contours == 1``) both give the same result.
    The search stops at the first order ``F_a`` where

    * DICE > ``dice_stop`` -> ``'dice'``;
    * DICE gained less than ``min_gain`` percentage points over the previous order (a loss
      counts as a gain below ``min_gain``), for ``patience`` consecutive orders -> ``'gain'``;
      ``patience=1`` is the paper's rule;
    * ``F_a == max_order`` -> ``'cap'`` (a guard the paper does not need to state).

    Then ``F_final = F_a + n * 100 * (1 - DICE_a)`` with ``DICE_a`` as a fraction.

    A caveat of the paper's gain rule (kept as the default): harmonics that a shape's symmetry
    makes zero add nothing, so a shape with k-fold rotational symmetry only gains at orders
    ``1, k-1, k+1, 2k-1, ...`` and point-symmetric shapes (ellipses) gain nothing at order 2.
    With ``patience=1`` such shapes stop at order 2 and their complexity is carried only by
    the penalty term; ``patience > 1`` lets the search look past such flat stretches.

    Parameters
    ----------
    mask : (H, W) bool array
        The GT object; must be non-empty.
    n : float
        Weight of the DICE shortfall (paper: 2).
    dice_stop : float
        DICE threshold in % (paper: 97.0); stop when DICE is strictly greater.
    min_gain : float
        Gain threshold in percentage points (paper: 0.1).
    max_order : int
        Hard cap on the order (not in the paper), >= 1.
    patience : int
        Consecutive low-gain orders needed to stop by the gain rule (paper: 1).
    reference : {'outer', 'mask'}
        What the decoded contour is compared with (see above).

    Returns
    -------
    FourierOrder

    Raises
    ------
    ValueError
        Empty or non-2-D mask, ``max_order < 1``, ``patience < 1`` or an unknown ``reference``.
    """
    if max_order < 1:
        raise ValueError(f"max_order must be >= 1, got {max_order}")
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if reference not in FO_REFERENCES:
        raise ValueError(f"reference must be one of {FO_REFERENCES}, got {reference!r}")
    mask = object_mask(mask)
    contour, outer, n_contours = _outline(mask)
    dice_of = _DiceToMask(outer if reference == "outer" else mask)
    coeffs, locus = _efd(contour, max_order)
    num_points = _n_points(contour, max_order)

    dices: list[float] = []
    stalled = 0
    stopped_by = "cap"
    for order in range(1, max_order + 1):
        dice = dice_of(_reconstruct(coeffs, locus, order, num_points))
        if dices:
            stalled = stalled + 1 if dice - dices[-1] < min_gain else 0
        dices.append(dice)
        if dice > dice_stop:
            stopped_by = "dice"
            break
        if stalled >= patience:
            stopped_by = "gain"
            break
    raw, dice_a = len(dices), dices[-1]
    return FourierOrder(
        order=raw + n * 100.0 * (1.0 - dice_a / 100.0),
        raw_order=raw,
        dice=dice_a,
        stopped_by=stopped_by,
        n_contours=n_contours,
        dices=tuple(dices),
        reference=reference,
    )


# --------------------------------------------------------------------------------------------
# A manifest's factors
# --------------------------------------------------------------------------------------------


_FO_KWARGS = ("n", "dice_stop", "min_gain", "max_order", "patience")


def _check_fo_kwargs(fo_kwargs: dict) -> None:
    if bad := sorted(set(fo_kwargs) - set(_FO_KWARGS)):
        raise TypeError(
            f"unexpected Fourier-order option(s) {bad}; allowed: {list(_FO_KWARGS)} (the table "
            "always holds both references: fourier_order (outer) and fourier_order_mask)")


def object_factors(image: np.ndarray, mask: np.ndarray, modality: str | None = None,
                   **fo_kwargs) -> dict:
    """All factors of one object as a dict of the factor columns (no key columns).

    ``fourier_order``, ``fourier_order_raw``, ``efd_dice`` and ``fo_stopped_by`` use the
    paper's reference (:func:`fourier_order` with ``reference='outer'``);
    ``fourier_order_mask`` and ``efd_dice_mask`` the whole mask (computed only when the mask
    has more than one boundary; otherwise the two are the same numbers).
    ``intensity_diff`` is the contrast magnitude (:func:`contrast`) and
    ``intensity_diff_signed`` the signed :func:`intensity_difference`.
    ``fo_kwargs``: ``n, dice_stop, min_gain, max_order, patience`` of :func:`fourier_order`.
    """
    _check_fo_kwargs(fo_kwargs)
    fo = fourier_order(mask, **fo_kwargs)
    fo_mask = fourier_order(mask, reference="mask", **fo_kwargs) if fo.n_contours > 1 else fo
    signed = intensity_difference(image, mask)
    return dict(
        size_px=size(mask),
        aspect_ratio=aspect_ratio(mask),
        intensity_diff=abs(signed),
        intensity_diff_signed=signed,
        modality_code=modality_code(modality),
        fourier_order=fo.order,
        fourier_order_raw=fo.raw_order,
        efd_dice=fo.dice,
        n_contours=fo.n_contours,
        n_holes=count_holes(mask) if fo.n_contours > 1 else 0,
        fo_stopped_by=fo.stopped_by,
        fourier_order_mask=fo_mask.order,
        efd_dice_mask=fo_mask.dice,
    )


def _iter_images(manifest: pd.DataFrame, root: Path, fo_kwargs: dict, progress: bool):
    """Yield ``(rows, skipped)`` per image: factor dicts (with the manifest row number in
    ``_row``) for its objects, and ``(file, reason)`` pairs for the objects that failed."""


    groups = manifest.groupby(["image_path", "label_path"], sort=False, dropna=False)
    for (image_path, label_path), group in tqdm(
        groups, total=groups.ngroups, desc="factors", unit="image", disable=not progress
    ):
        keys = []
        for row_number, rec in zip(group.index, group.to_dict("records")):
            keys.append({c: rec.get(c) for c in ("task", "image_id", "label_value", "object",
                                                "modality")} | {"_row": row_number})
        rows = [dict(k, modality_code=modality_code(k["modality"])) for k in keys]
        skipped: list[tuple[str, str]] = []
        try:
            image = io.read_image(root / image_path)
            label = io.read_label(root / label_path)
        except Exception as exc:  # noqa: BLE001 -- a bad file must not stop a batch
            where = getattr(exc, "path", None) or root / image_path
            skipped.extend((str(where), f"{type(exc).__name__}: {exc}") for _ in keys)
            yield rows, skipped
            continue
        for row in rows:
            try:
                mask = label == int(row["label_value"])
                row.update(object_factors(image, mask, row["modality"], **fo_kwargs))
            except Exception as exc:  # noqa: BLE001 -- one bad object must not stop a batch
                skipped.append((str(root / label_path),
                                f"label {row['label_value']}: {type(exc).__name__}: {exc}"))
        yield rows, skipped


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """The factors columns in order, with nullable integers where a value may be missing."""
    df = df.reindex(columns=list(FACTOR_COLUMNS))
    for col in ("label_value", "size_px", "modality_code", "fourier_order_raw", "n_contours",
                "n_holes"):
        df[col] = df[col].astype("Int64")
    for col in ("aspect_ratio", "intensity_diff", "intensity_diff_signed", "fourier_order",
                "efd_dice", "fourier_order_mask", "efd_dice_mask"):
        df[col] = df[col].astype(float)
    for col in ("task", "image_id", "object", "modality", "fo_stopped_by"):
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    return df


def compute_factors(
    manifest: pd.DataFrame,
    root: str | Path,
    *,
    progress: bool = True,
    **fo_kwargs,
) -> pd.DataFrame:
    """The factors table of a manifest: one row per manifest row, in manifest order.

    Each image and label is read once (:func:`cosmoslib.io.read_image`,
    :func:`cosmoslib.io.read_label`); the object is ``label == label_value``.

    Parameters
    ----------
    manifest : DataFrame
        Needs ``task, image_id, label_value, image_path, label_path``; ``object`` and
        ``modality`` are copied when present. Paths are relative to ``root``.
    root : path
        The COSMOS root.
    progress : bool
        Show a tqdm bar over images (stderr).
    **fo_kwargs
        Passed to :func:`fourier_order` (``n, dice_stop, min_gain, max_order, patience``).

    Returns
    -------
    DataFrame
        Columns :data:`FACTOR_COLUMNS`. An unreadable image or a failing object gives NaN
        factors (the key columns stay) and is recorded in ``df.attrs["skipped"]`` as a list of
        ``(file, reason)``; it never stops the batch. ``df.attrs["unknown_modality"]`` is
        ``{task: n_objects}`` for the tasks whose modality the vocabulary does not know
        (``modality_code`` 18; see :func:`cosmoslib.io.unknown_modalities`).
    """

    _check_fo_kwargs(fo_kwargs)
    missing = {"task", "image_id", "label_value", "image_path", "label_path"} - set(manifest)
    if missing:
        raise ValueError(f"manifest lacks columns {sorted(missing)}")
    manifest = manifest.reset_index(drop=True)
    rows: list[dict] = []
    skipped: list[tuple[str, str]] = []
    for image_rows, image_skipped in _iter_images(manifest, Path(root), fo_kwargs, progress):
        rows.extend(image_rows)
        skipped.extend(image_skipped)
    # groupby visits images in first-appearance order; restore the manifest's row order.
    rows.sort(key=lambda r: r["_row"])
    df = _typed(pd.DataFrame(rows))
    df.attrs["skipped"] = skipped
    df.attrs["unknown_modality"] = io.unknown_modalities(df) if "modality" in manifest else {}
    return df


def fo_reference_effect(factors: pd.DataFrame, by: str | list[str] = "object") -> pd.DataFrame:
    """How much the Fourier-order reference moves FO, for the objects where it can.

    The two references of :func:`fourier_order` differ only for masks with more than one
    boundary (``n_contours > 1``: holes, or several parts). For those objects, per group:

    ``n`` (objects with more than one boundary), ``n_holed`` (of which with at least one
    hole), ``fo_median`` (the paper's FO, decoded contour vs filled outer region),
    ``fo_mask_median`` (vs the whole mask), ``shift_median`` and ``shift_max`` (of
    ``fourier_order_mask - fourier_order``), ``efd_dice_median`` and
    ``efd_dice_mask_median`` (DICE % at the stopping order).

    Parameters
    ----------
    factors : DataFrame
        A factors table of :func:`compute_factors` (needs ``n_contours, n_holes,
        fourier_order, fourier_order_mask, efd_dice, efd_dice_mask`` and the ``by`` columns).
    by : str or list of str
        Grouping columns (default ``object``; e.g. ``["object", "modality"]``).

    Returns
    -------
    DataFrame
        One row per group, sorted by ``shift_median`` descending; empty (with these columns)
        when no object has more than one boundary. Objects whose factors could not be
        computed (NaN FO) are left out.
    """
    by = [by] if isinstance(by, str) else list(by)
    need = {"n_contours", "n_holes", "fourier_order", "fourier_order_mask", "efd_dice",
            "efd_dice_mask", *by}
    if missing := sorted(need - set(factors)):
        raise KeyError(f"fo_reference_effect: factors table lacks columns {missing} "
                       "(recompute it with this version of cosmoslib.factors)")
    columns = [*by, "n", "n_holed", "fo_median", "fo_mask_median", "shift_median", "shift_max",
               "efd_dice_median", "efd_dice_mask_median"]
    multi = factors[(factors["n_contours"] > 1).fillna(False)
                    & factors["fourier_order"].notna() & factors["fourier_order_mask"].notna()]
    if multi.empty:
        return pd.DataFrame(columns=columns)
    multi = multi.assign(_shift=multi["fourier_order_mask"] - multi["fourier_order"],
                         _holed=(multi["n_holes"] > 0).astype(int))
    out = multi.groupby(by, sort=True, dropna=False).agg(
        n=("_shift", "size"), n_holed=("_holed", "sum"),
        fo_median=("fourier_order", "median"), fo_mask_median=("fourier_order_mask", "median"),
        shift_median=("_shift", "median"), shift_max=("_shift", "max"),
        efd_dice_median=("efd_dice", "median"), efd_dice_mask_median=("efd_dice_mask", "median"),
    ).reset_index()
    return out.sort_values(["shift_median", *by], ascending=[False] + [True] * len(by),
                           kind="stable").reset_index(drop=True)[columns]


@dataclass
class FactorsReport:
    """What :func:`factors_cli` did."""

    out: Path
    n_objects: int
    n_images: int
    n_computed: int
    n_reused: int
    n_intensity_nan: int
    n_fo_cap: int
    skipped: list[tuple[str, str]]
    skipped_csv: Path
    seconds: float
    unknown_modality: dict = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        """Objects whose factors could not be computed in this run."""
        return len(self.skipped)

    def summary(self) -> str:
        """One paragraph for the command line."""
        text = (
            f"Factors of {self.n_objects} objects in {self.n_images} images written to "
            f"{self.out} ({self.n_computed} computed, {self.n_reused} reused from an earlier "
            f"run, {self.seconds:.1f} s). Intensity difference undefined (object fills its "
            f"enlarged box) for {self.n_intensity_nan}; the Fourier-order search hit the order "
            f"cap for {self.n_fo_cap}."
        )
        if self.skipped:
            text += (f" Skipped {self.n_skipped} objects (NaN factors), listed in "
                     f"{self.skipped_csv}.")
        else:
            text += " Nothing skipped."
        if self.unknown_modality:
            tasks = ", ".join(f"{t} ({n})" for t, n in self.unknown_modality.items())
            text += (f" Modality unknown (modality_code {MODALITY_CODES['unknown']}) for "
                     f"{sum(self.unknown_modality.values())} objects of task(s) {tasks}; "
                     "name it with modality={task: name} (cosmos factors --modality TASK=NAME).")
        return text


def _assemble(keys: pd.DataFrame, parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Factor rows for the manifest ``keys``, in manifest order (later parts win).

    ``keys`` holds the key columns and ``modality``: the modality (and its code) always come
    from the current manifest, so a rerun with another ``--modality`` updates reused rows.
    """
    parts = [p for p in parts if len(p)]
    if not parts:
        return _typed(pd.DataFrame(columns=list(FACTOR_COLUMNS)))
    table = _typed(pd.concat([_typed(p) for p in parts], ignore_index=True))
    table = table.drop_duplicates(_KEY, keep="last").drop(columns=["modality", "modality_code"])
    # An inner merge keeps the left (manifest) order.
    merged = keys.merge(table, on=_KEY, how="inner")
    merged["modality_code"] = [modality_code(m) for m in merged["modality"]]
    return _typed(merged)


def factors_cli(
    root: str | Path,
    out: str | Path,
    info_dir: str | Path | None = None,
    *,
    modality: dict[str, str] | None = None,
    chunk_images: int = 200,
    progress: bool = True,
    scheduler=None,
    threads: int = 1,
    **fo_kwargs,
) -> FactorsReport:
    """``cosmos factors``: index a COSMOS root, compute the factors, write Parquet.

    Parameters
    ----------
    root : path
        The COSMOS root, indexed with :func:`cosmoslib.io.index`.
    out : path
        The factors Parquet file to write.
    info_dir : path, optional
        Folder of the ``<task>.json`` files, passed to the indexer.
    modality : dict, optional
        ``{task: modality name}`` overriding every other source of a task's modality
        (passed to :func:`cosmoslib.io.index`; ``cosmos factors --modality TASK=NAME``).
    chunk_images : int
        Rewrite ``out`` (atomically) after every this many images; with ``scheduler`` also the
        images of one Dask task.
    progress : bool
        tqdm bar over images on stderr.
    scheduler : None (this process), or a Dask scheduler (``"local:N"``, ``"tcp://HOST:PORT"``,
        ``"slurm:cluster.yaml"``, or a ``distributed.Client``; see
        :func:`cosmoslib.distributed.client_for`): the chunks are computed on its workers and
        ``out`` is rewritten as each finishes. The table and the skipped list are the same.
    threads : threads per Dask worker made here (ignored without ``scheduler``).
    **fo_kwargs
        Passed to :func:`fourier_order`.

    Returns
    -------
    FactorsReport
        Counts and the problems met. Resumable: rows already in ``out`` whose image could be
        read (``size_px`` present) are kept, not recomputed, so an interrupted run loses at most
        one chunk; ``modality`` and ``modality_code`` of reused rows are refreshed from the
        current index. Problems of this run go to ``<out stem>.skipped.csv``
        (``file, reason``) next to ``out``.
    """


    _check_fo_kwargs(fo_kwargs)
    t0 = time.perf_counter()
    root, out = Path(root), Path(out)
    manifest = io.index(root, info_dir=info_dir, progress=progress,
                        modality=modality).reset_index(drop=True)
    keys = _typed(manifest.reindex(columns=[*_KEY, "modality"]))[[*_KEY, "modality"]]

    done = pd.DataFrame(columns=list(FACTOR_COLUMNS))
    if out.exists():
        previous = pd.read_parquet(out)
        if set(FACTOR_COLUMNS) <= set(previous):
            done = _typed(previous.loc[previous["size_px"].notna()])
    done_keys = pd.MultiIndex.from_frame(done[_KEY].astype({"label_value": "Int64"}))
    todo = manifest[~pd.MultiIndex.from_frame(keys[_KEY]).isin(done_keys)]
    n_reused = len(manifest) - len(todo)

    images = todo[["image_path", "label_path"]].drop_duplicates()
    parts = [done]
    skipped: list[tuple[str, str]] = []
    bar = tqdm(total=len(images), desc="factors", unit="image", disable=not progress)
    if scheduler is None:
        for start in range(0, len(images), chunk_images):
            chunk = todo.merge(images.iloc[start : start + chunk_images],
                               on=["image_path", "label_path"])
            rows: list[dict] = []
            for image_rows, image_skipped in _iter_images(chunk, root, fo_kwargs, progress=False):
                rows.extend(image_rows)
                skipped.extend(image_skipped)
                bar.update(1)
            parts.append(_typed(pd.DataFrame(rows)))
            io.atomic_write_parquet(_assemble(keys, parts), out)
    else:
        # Dask (and torch, through the worker plugin module) load only for --scheduler runs.
        from cosmoslib import distributed

        chunks = [todo.merge(images.iloc[start : start + chunk_images], on=["image_path", "label_path"])
                  for start in range(0, len(images), chunk_images)]
        by_chunk: dict[int, list] = {}
        for i, (frame, chunk_skipped) in distributed.map_groups(
                scheduler, chunk_factors, chunks, root, fo_kwargs, threads=threads, progress=False):
            by_chunk[i] = chunk_skipped
            parts.append(frame)
            bar.update(int(chunks[i][["image_path", "label_path"]].drop_duplicates().shape[0]))
            io.atomic_write_parquet(_assemble(keys, parts), out)
        skipped = [s for i in sorted(by_chunk) for s in by_chunk[i]]  # in image order, as in one process
    bar.close()
    table = _assemble(keys, parts)
    io.atomic_write_parquet(table, out)

    skipped_csv = out.with_name(out.stem + ".skipped.csv")
    io.atomic_write_csv(pd.DataFrame(skipped, columns=["file", "reason"]), skipped_csv)
    return FactorsReport(
        out=out,
        n_objects=len(table),
        n_images=len(manifest[["image_path", "label_path"]].drop_duplicates()),
        n_computed=len(todo),
        n_reused=n_reused,
        n_intensity_nan=int((table["intensity_diff"].isna() & table["size_px"].notna()).sum()),
        n_fo_cap=int((table["fo_stopped_by"] == "cap").sum()),
        skipped=skipped,
        skipped_csv=skipped_csv,
        seconds=time.perf_counter() - t0,
        unknown_modality=io.unknown_modalities(manifest),
    )


def chunk_factors(chunk: pd.DataFrame, root: str | Path, fo_kwargs: dict | None = None
                  ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The factor rows of the objects of ``chunk`` (manifest rows of some images) and what failed.

    One work unit of :func:`factors_cli` (in this process, or a Dask task with ``scheduler``).

    Returns
    -------
    (DataFrame, list of (file, reason))
        Rows with the columns of :data:`FACTOR_COLUMNS` (NaN factors where an object failed),
        and the failures in image order.
    """
    rows: list[dict] = []
    skipped: list[tuple[str, str]] = []
    for image_rows, image_skipped in _iter_images(chunk, Path(root), dict(fo_kwargs or {}), progress=False):
        rows.extend(image_rows)
        skipped.extend(image_skipped)
    return _typed(pd.DataFrame(rows)), skipped
