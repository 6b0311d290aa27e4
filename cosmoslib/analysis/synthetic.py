"""Controlled objects for known-answer studies of the object factors (paper 4.8).

The factors of :mod:`cosmoslib.analysis.factors` are only trustworthy if they move the way they
should when we change one property of an object and hold the others fixed. This module draws
such objects honestly, from closed-form shapes:

* :func:`star` -- a star-shaped region with ``k`` lobes, ``r(theta) = R (1 + a cos(k theta))``;
  ``k`` controls boundary complexity (the Fourier order should rise with it),
* :func:`ellipse` -- a smooth, convex region (its Fourier order should be about 1),
* :func:`render` -- a grey image with the object ``contrast`` grey levels brighter (or darker)
  than a flat background, plus Gaussian noise (the intensity difference should follow it),
* :func:`known_answer_set` -- a grid of ``k`` x ``contrast`` cases with random placement;
* :func:`known_answer_study` -- a model's box-prompt DICE on those cases, with their factors.

Coordinates are ``(x, y)`` in pixels (x = column, y = row), as everywhere in cosmoslib.
Randomness comes only from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from skimage import draw

from cosmoslib.analysis import factors, fourier
from cosmoslib.protocol import matching, metrics, prompts


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)`` of an image of ``shape = (H, W)``."""
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1:
        raise ValueError(f"shape must be positive (H, W), got {shape!r}")
    y, x = np.mgrid[0:h, 0:w]
    return x.astype(float), y.astype(float)


def star(
    shape: tuple[int, int],
    k_lobes: int,
    amplitude: float,
    radius: float,
    center: tuple[float, float] | None = None,
    phase: float = 0.0,
) -> np.ndarray:
    """A star-shaped region with ``k_lobes`` lobes.

    A pixel belongs to the region when its centre lies within the polar curve
    ``r(theta) = radius * (1 + amplitude * cos(k_lobes * (theta - phase)))`` around ``center``.

    Parameters
    ----------
    shape : (H, W)
        Image size in pixels.
    k_lobes : int
        Number of lobes ``k >= 0``. ``k = 0`` gives a disk of radius ``radius * (1 + amplitude)``.
    amplitude : float
        Relative lobe depth ``a``, ``0 <= a < 1`` (``a >= 1`` would pinch the shape at the
        centre).
    radius : float
        Mean radius ``R`` in pixels.
    center : (x, y), optional
        Centre in pixels; the image centre by default.
    phase : float
        Rotation of the lobes in radians, measured in the image frame from +x towards +y
        (only the orientation changes, not the shape).

    Returns
    -------
    ndarray of bool, shape (H, W)
        Pixels outside the image are simply cut off.
    """
    if k_lobes < 0 or int(k_lobes) != k_lobes:
        raise ValueError(f"k_lobes must be a non-negative integer, got {k_lobes!r}")
    if not 0.0 <= amplitude < 1.0:
        raise ValueError(f"amplitude must be in [0, 1), got {amplitude!r}")
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius!r}")
    x, y = _grid(shape)
    cx, cy = center if center is not None else ((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0)
    dx, dy = x - cx, y - cy
    theta = np.arctan2(dy, dx)
    r_boundary = radius * (1.0 + amplitude * np.cos(k_lobes * (theta - phase)))
    return np.hypot(dx, dy) <= r_boundary


def ellipse(
    shape: tuple[int, int],
    axes: tuple[float, float],
    center: tuple[float, float] | None = None,
    angle: float = 0.0,
) -> np.ndarray:
    """A filled ellipse, drawn with :func:`skimage.draw.ellipse`.

    Parameters
    ----------
    shape : (H, W)
        Image size in pixels.
    axes : (a_x, a_y)
        Semi-axes in pixels along x and y before rotation.
    center : (x, y), optional
        Centre in pixels; the image centre by default.
    angle : float
        Rotation in degrees, counter-clockwise as in :func:`skimage.draw.ellipse` (which rotates
        in the array's row/column frame).

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    ax_x, ax_y = float(axes[0]), float(axes[1])
    if ax_x <= 0 or ax_y <= 0:
        raise ValueError(f"axes must be positive, got {axes!r}")
    _grid(shape)  # validates shape
    cx, cy = center if center is not None else ((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0)
    rr, cc = draw.ellipse(cy, cx, ax_y, ax_x, shape=tuple(shape[:2]), rotation=np.deg2rad(angle))
    mask = np.zeros(tuple(shape[:2]), dtype=bool)
    mask[rr, cc] = True
    return mask


def render(
    mask: np.ndarray,
    contrast: float,
    noise_sd: float = 0.0,
    background: float = 100.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Grey image of a mask: flat background, object ``contrast`` grey levels apart, noise.

    ``image = clip(round(background + contrast * mask + N(0, noise_sd^2)), 0, 255)``.

    Parameters
    ----------
    mask : bool array (H, W)
    contrast : float
        Object minus background, in grey levels (negative: darker object).
    noise_sd : float
        Standard deviation of i.i.d. Gaussian noise in grey levels (0 = none).
    background : float
        Background grey level.
    rng : numpy.random.Generator
        Required when ``noise_sd > 0``.

    Returns
    -------
    ndarray of uint8, shape (H, W)
        Clipping at 0 and 255 can shrink the realised contrast; keep
        ``background +/- contrast`` well inside ``[0, 255]`` for known-answer work.
    """
    mask = np.asarray(mask, dtype=bool)
    image = np.full(mask.shape, float(background)) + float(contrast) * mask
    if noise_sd > 0:
        if rng is None:
            raise ValueError("render needs an explicit numpy Generator `rng` when noise_sd > 0")
        image = image + rng.normal(0.0, float(noise_sd), size=mask.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def known_answer_set(
    rng: np.random.Generator,
    ks: tuple[int, ...] = (0, 3, 6, 12),
    contrasts: tuple[float, ...] = (10.0, 40.0, 80.0),
    shape: tuple[int, int] = (128, 128),
    radius: float = 30.0,
    amplitude: float = 0.2,
    noise_sd: float = 5.0,
    background: float = 100.0,
    jitter: float = 8.0,
) -> pd.DataFrame:
    """A grid of star objects over lobe count ``k`` and contrast, randomly placed.

    Each case varies one known property (``k`` -> boundary complexity, ``contrast`` ->
    intensity difference) while size stays roughly fixed; the centre is jittered by up to
    ``jitter`` pixels and the lobes get a random phase, so a factor cannot succeed by exploiting
    a fixed position.

    Parameters
    ----------
    rng : numpy.random.Generator
        The only source of randomness (placement, phase, noise).
    ks : tuple of int
        Lobe counts.
    contrasts : tuple of float
        Object minus background in grey levels.
    shape, radius, amplitude, noise_sd, background, jitter
        See :func:`star` and :func:`render`; ``jitter`` in pixels.

    Returns
    -------
    DataFrame
        One row per (k, contrast), columns ``k, contrast, center_x, center_y, phase, image
        (uint8 (H, W)), mask (bool (H, W))``, in the order of ``ks`` x ``contrasts``.
    """
    rows = []
    cx0, cy0 = (shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0
    for k in ks:
        for contrast in contrasts:
            cx = cx0 + rng.uniform(-jitter, jitter)
            cy = cy0 + rng.uniform(-jitter, jitter)
            phase = rng.uniform(0.0, 2.0 * np.pi)
            mask = star(shape, k, amplitude, radius, (cx, cy), phase=phase)
            image = render(mask, contrast, noise_sd, background, rng)
            rows.append(
                dict(k=int(k), contrast=float(contrast), center_x=cx, center_y=cy, phase=phase,
                     image=image, mask=mask)
            )
    return pd.DataFrame(rows)


def known_answer_study(model, cases: pd.DataFrame, patience: int = 12) -> pd.DataFrame:
    """Known-answer study (paper 4.8): box-prompt DICE on objects of controlled difficulty.

    Parameters
    ----------
    model : SamFamilyModel
    cases : DataFrame
        From :func:`known_answer_set` (columns ``k, contrast, image, mask``).
    patience : int
        Orders without gain the patient Fourier-order variant waits before stopping.

    Returns
    -------
    DataFrame
        ``k, contrast, fourier_order, fourier_order_patient, intensity_diff, size_px, dice`` per
        case (DICE in %, tight GT box prompt S5, oracle rule). ``fourier_order`` follows the
        paper's stopping rule exactly; ``fourier_order_patient`` stops on the gain rule only
        after ``patience`` orders without gain. The paper's rule stops a k-fold symmetric star
        at order 2 (orders 2..k-1 add nothing to such a contour), so it cannot rank stars with
        k >= 6 by lobe count; the patient variant can (see :func:`cosmoslib.analysis.fourier.fourier_order`).
    """
    rows = []
    # The model's own batching (one image per encoder call on the CPU, where batches of 4 or 8
    # measured 1.2-1.4x slower for LiteMedSAM; see SamFamilyModel.encode).
    embeddings = model.encode(list(cases["image"])) if len(cases) else []
    for case, emb in zip(cases.itertuples(index=False), embeddings):
        prompt = prompts.make_prompt(case.mask, "S5")
        dec = model.decode(emb, prompt, case.mask.shape)
        m = matching.match(dec.masks, dec.iou_pred, case.mask)
        rows.append(dict(k=case.k, contrast=case.contrast,
                         fourier_order=fourier.fourier_order(case.mask).order,
                         fourier_order_patient=fourier.fourier_order(case.mask, patience=patience).order,
                         intensity_diff=factors.intensity_difference(case.image, case.mask),
                         size_px=int(case.mask.sum()),
                         dice=metrics.evaluate_pair(dec.masks[m.oracle_index], case.mask)["dice"]))
    return pd.DataFrame(rows)
