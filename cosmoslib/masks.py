"""Mask geometry shared by prompts, factors and the interaction simulator.

Every object is a 2D boolean mask in an ``(H, W)`` image; boxes are ``[x0, y0, x1, y1]`` in
inclusive pixel indices (x = column, y = row), the project's convention. Two different boxes
grow from the tight box, and their names say which:

* :func:`scaled_box` -- the tight box scaled ``ratio`` times around its centre. The paper's S4
  draws its negative points between the object and this box (ratio 2, paper 3.3).
* :func:`margin_box` -- the tight box with a margin of a fraction of each side added outward.
  The factors chapter measures the background intensity in this ring (paper 4.7, Table 6).
"""

from __future__ import annotations

import math

import numpy as np


def object_mask(mask: np.ndarray) -> np.ndarray:
    """A non-empty 2D object mask as bool (the input every prompt and factor needs).

    Raises
    ------
    ValueError
        The mask is not 2D (H, W), or has no object pixel.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D (H, W); got shape {mask.shape}")
    mask = mask.astype(bool, copy=False)
    if not mask.any():
        raise ValueError("mask is empty: no object pixels")
    return mask


def tight_box(mask: np.ndarray) -> np.ndarray:
    """Tight bounding box ``[x0, y0, x1, y1]`` (inclusive pixel indices, int64) of all object pixels.

    Raises
    ------
    ValueError
        For an empty or non-2D mask.
    """
    mask = object_mask(mask)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.int64)


def box_sides(box) -> tuple[int, int]:
    """Width and height of an inclusive box in pixels (``x1 - x0 + 1``, ``y1 - y0 + 1``)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return x1 - x0 + 1, y1 - y0 + 1


def scaled_box(box, shape: tuple[int, int], ratio: float = 2) -> np.ndarray:
    """The box scaled ``ratio`` times around its centre, clipped to an image of ``shape``.

    Each side moves out by ``ceil((ratio - 1) * w / 2)`` pixels horizontally and the same with
    ``h`` vertically, so the result is at least ``ratio`` times as wide and high before
    clipping (one pixel more when the extra size is odd: an integer box cannot grow by half a
    pixel on each side).

    Parameters
    ----------
    box : [x0, y0, x1, y1], inclusive pixel indices.
    shape : (H, W) of the image, pixels.
    ratio : scale factor, >= 1 (the paper's S4 uses 2).
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    h, w = shape
    bw, bh = box_sides(box)
    pad_x = math.ceil((ratio - 1) * bw / 2)
    pad_y = math.ceil((ratio - 1) * bh / 2)
    return np.array(
        [max(x0 - pad_x, 0), max(y0 - pad_y, 0), min(x1 + pad_x, w - 1), min(y1 + pad_y, h - 1)],
        dtype=np.int64,
    )


def _margin(side: int, fraction: float) -> int:
    # ceil(fraction * side) with a tolerance, so 0.1 * 30 = 3.0000000000000004 gives 3, not 4.
    return int(math.ceil(fraction * side - 1e-9))


def margin_box(mask: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """The tight box of ``mask`` grown outward by ``ceil(fraction * side)`` pixels, clipped.

    The width's margin goes left and right, the height's top and bottom; returns
    ``[x0, y0, x1, y1]`` inclusive (int64).

    Raises
    ------
    ValueError
        For an empty or non-2D mask.
    """
    mask = object_mask(mask)
    x0, y0, x1, y1 = (int(v) for v in tight_box(mask))
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    mx, my = _margin(bw, fraction), _margin(bh, fraction)
    h, w = mask.shape
    return np.array([max(x0 - mx, 0), max(y0 - my, 0), min(x1 + mx, w - 1), min(y1 + my, h - 1)],
                    dtype=np.int64)
