"""Metrics against medpy (independent implementation) and direct set computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from cosmoslib import metrics

medpy_binary = pytest.importorskip("medpy.metric.binary")


def random_blob(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A random non-empty mask: smoothed-noise blobs, ellipses, thin lines or scattered pixels.

    Sizes range from one pixel to most of the image; many touch the border, many have several
    components.
    """
    h, w = shape
    kind = rng.integers(0, 5)
    if kind == 0:  # smooth noise thresholded: irregular, often multi-component
        sigma = rng.uniform(1.0, 6.0)
        field = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
        mask = field > np.quantile(field, rng.uniform(0.5, 0.98))
    elif kind == 1:  # ellipse, possibly cut by the border
        yy, xx = np.mgrid[:h, :w]
        cy, cx = rng.uniform(-0.1, 1.1) * h, rng.uniform(-0.1, 1.1) * w
        ry, rx = rng.uniform(0.5, 0.6 * h), rng.uniform(0.5, 0.6 * w)
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    elif kind == 2:  # a few random rectangles (multi-component, border-touching)
        mask = np.zeros(shape, bool)
        for _ in range(rng.integers(1, 4)):
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            mask[y0 : y0 + rng.integers(1, h // 2 + 2), x0 : x0 + rng.integers(1, w // 2 + 2)] = True
    elif kind == 3:  # scattered single pixels
        mask = rng.random(shape) < rng.uniform(0.001, 0.05)
    else:  # ring
        yy, xx = np.mgrid[:h, :w]
        r = np.hypot(yy - rng.uniform(0, h), xx - rng.uniform(0, w))
        r0 = rng.uniform(2, max(h, w) / 2)
        mask = (r >= r0) & (r <= r0 + rng.uniform(1, 6))
    if not mask.any():
        mask[rng.integers(0, h), rng.integers(0, w)] = True
    return mask


def test_agrees_with_medpy_on_random_pairs():
    """1200 random non-empty pairs: HD, HD95, ASSD equal medpy's to 1e-9."""
    rng = np.random.default_rng(12345)
    n_border = n_multi = 0
    for _ in range(1200):
        shape = (int(rng.integers(8, 72)), int(rng.integers(8, 72)))
        pred = random_blob(rng, shape)
        # GT either independent or a perturbed copy of pred (to get realistic, close pairs)
        if rng.random() < 0.5:
            gt = random_blob(rng, shape)
        else:
            gt = ndi.binary_dilation(pred, iterations=int(rng.integers(1, 3))) ^ (rng.random(shape) < 0.02)
            if not gt.any():
                gt = pred.copy()
        n_border += bool(pred[0].any() or pred[-1].any() or pred[:, 0].any() or pred[:, -1].any())
        n_multi += ndi.label(pred)[1] > 1
        got = metrics.evaluate_pair(pred, gt)
        assert got["hd"] == pytest.approx(medpy_binary.hd(pred, gt), abs=1e-9)
        assert got["hd95"] == pytest.approx(medpy_binary.hd95(pred, gt), abs=1e-9)
        assert got["assd"] == pytest.approx(medpy_binary.assd(pred, gt), abs=1e-9)
        assert got["dice"] == pytest.approx(100 * medpy_binary.dc(pred, gt), abs=1e-9)
        assert got["jac"] == pytest.approx(100 * medpy_binary.jc(pred, gt), abs=1e-9)
        assert not got["empty_pred"] and not got["empty_gt"]
    # the generator really produced the hard cases
    assert n_border > 200 and n_multi > 200


def test_dice_jac_match_set_computation():
    rng = np.random.default_rng(7)
    for _ in range(200):
        shape = (int(rng.integers(4, 40)), int(rng.integers(4, 40)))
        pred, gt = random_blob(rng, shape), random_blob(rng, shape)
        p = {tuple(ix) for ix in np.argwhere(pred)}
        g = {tuple(ix) for ix in np.argwhere(gt)}
        assert metrics.dice(pred, gt) == pytest.approx(200 * len(p & g) / (len(p) + len(g)))
        assert metrics.jac(pred, gt) == pytest.approx(100 * len(p & g) / len(p | g))


def test_known_distances():
    # Two single pixels 3 rows and 4 columns apart: every distance is 5.
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[1, 1] = True
    b[4, 5] = True
    got = metrics.evaluate_pair(a, b)
    assert got["hd"] == got["hd95"] == got["assd"] == 5.0
    assert got["dice"] == 0.0
    # identical masks: perfect scores
    got = metrics.evaluate_pair(a | b, a | b)
    assert (got["dice"], got["jac"], got["hd"], got["assd"]) == (100.0, 100.0, 0.0, 0.0)


def test_single_metric_functions_agree_with_evaluate_pair():
    rng = np.random.default_rng(3)
    pred, gt = random_blob(rng, (30, 40)), random_blob(rng, (30, 40))
    got = metrics.evaluate_pair(pred, gt)
    for name in metrics.METRIC_NAMES:
        assert getattr(metrics, name)(pred, gt) == got[name]


def test_boundary_distances_do_not_depend_on_padding():
    """Cropping to the union box is exact: padding the image with background changes nothing."""
    rng = np.random.default_rng(11)
    for _ in range(50):
        pred, gt = random_blob(rng, (25, 25)), random_blob(rng, (25, 25))
        small = metrics.evaluate_pair(pred, gt)
        big = metrics.evaluate_pair(np.pad(pred, 7), np.pad(gt, 7))
        for name in ("dice", "jac", "hd", "hd95", "assd"):
            assert big[name] == pytest.approx(small[name], abs=1e-12)


def test_empty_policy_worst():
    gt = np.zeros((30, 40), bool)
    gt[5:10, 5:10] = True
    empty = np.zeros_like(gt)
    diag = math.hypot(29, 39)
    for pred, truth, flags in ((empty, gt, (True, False)), (gt, empty, (False, True))):
        got = metrics.evaluate_pair(pred, truth)
        assert (got["empty_pred"], got["empty_gt"]) == flags
        assert got["dice"] == got["jac"] == 0.0
        assert got["hd"] == got["hd95"] == got["assd"] == pytest.approx(diag)
    got = metrics.evaluate_pair(empty, empty)
    assert got["empty_pred"] and got["empty_gt"]
    assert (got["dice"], got["jac"], got["hd"], got["hd95"], got["assd"]) == (100, 100, 0, 0, 0)


def test_worst_distance_bounds_every_real_distance():
    """The penalty for an empty mask is never better than any real prediction's HD."""
    rng = np.random.default_rng(5)
    for _ in range(100):
        shape = (int(rng.integers(5, 40)), int(rng.integers(5, 40)))
        got = metrics.evaluate_pair(random_blob(rng, shape), random_blob(rng, shape))
        assert got["hd"] <= metrics.worst_distance(shape) + 1e-12


def test_empty_policy_nan():
    gt = np.zeros((20, 20), bool)
    gt[3:6, 3:6] = True
    empty = np.zeros_like(gt)
    got = metrics.evaluate_pair(empty, gt, policy="nan")
    assert got["dice"] == 0.0 and got["jac"] == 0.0 and got["empty_pred"]
    assert all(math.isnan(got[k]) for k in ("hd", "hd95", "assd"))
    got = metrics.evaluate_pair(empty, empty, policy="nan")
    assert all(math.isnan(got[k]) for k in metrics.METRIC_NAMES)


def test_empty_counts():
    pd = pytest.importorskip("pandas")
    gt = np.zeros((8, 8), bool)
    gt[2:4, 2:4] = True
    empty = np.zeros_like(gt)
    pairs = ((gt, gt), (empty, gt), (empty, gt), (empty, empty), (gt, empty))
    rows = [metrics.evaluate_pair(p, g) for p, g in pairs]
    counts = metrics.empty_counts(pd.DataFrame(rows))
    assert counts == {"n": 5, "empty_pred_only": 2, "empty_gt_only": 1, "both_empty": 1}


def test_bad_input():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.evaluate_pair(np.ones((3, 4)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="2D"):
        metrics.evaluate_pair(np.ones((2, 3, 4)), np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="policy"):
        metrics.evaluate_pair(np.ones((3, 3)), np.ones((3, 3)), policy="zero")
    with pytest.raises(ValueError, match="empty"):
        metrics.surface_distances(np.zeros((3, 3)), np.ones((3, 3)))
