"""Fourier order: how complex an object's boundary is (paper 4.8, Eq. 2-3).

The paper describes an object's boundary by its elliptic Fourier descriptors (EFD, Kuhl and
Giardina 1982; computed with :mod:`pyefd`) and calls *Fourier order* the smallest order whose
redrawn contour matches the object: DICE between the filled redrawn contour and the reference
region reaches a stop value. The paper's reference is the region the object's outer contour
encloses (holes filled; :data:`FO_REFERENCES` ``"outer"``); ``"mask"`` compares with the whole
mask instead (holes and other parts penalised), a variant the factors chapter shows beside it.
Contours come from :func:`skimage.measure.find_contours`; rasterising the redrawn polygon is
written by hand (:func:`fill_polygon`) because the search evaluates many orders per object and
needs an exact, fast scan-line fill at the mask's resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyefd
from scipy import ndimage
from skimage import measure

from cosmoslib.masks import object_mask, tight_box

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
        self.x0, self.y0, x1, y1 = (int(v) for v in tight_box(mask))
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


