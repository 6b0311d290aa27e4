"""Metrics against medpy (independent implementation) and direct set computations."""

from __future__ import annotations

import math

import medpy.metric.binary as medpy_binary
import monai.metrics as monai_metrics
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage as ndi

from cosmoslib.protocol import metrics


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


# --------------------------------------------------------------------------- spacing-aware, 3D, NSD


def random_volume(rng: np.random.Generator, shape) -> np.ndarray:
    """A random non-empty 3D mask: thresholded smooth noise, an ellipsoid, or boxes."""
    kind = rng.integers(0, 3)
    if kind == 0:
        field = ndi.gaussian_filter(rng.standard_normal(shape), rng.uniform(1.0, 3.0))
        mask = field > np.quantile(field, rng.uniform(0.6, 0.97))
    elif kind == 1:
        grid = np.indices(shape).astype(float)
        centre = [rng.uniform(0.0, n) for n in shape]
        radii = [rng.uniform(1.0, 0.6 * n) for n in shape]
        mask = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1
    else:
        mask = np.zeros(shape, bool)
        for _ in range(rng.integers(1, 3)):
            lo = [rng.integers(0, n) for n in shape]
            mask[tuple(slice(a, a + rng.integers(1, n // 2 + 2)) for a, n in zip(lo, shape))] = True
    if not mask.any():
        mask[tuple(rng.integers(0, n) for n in shape)] = True
    return mask


def random_volume_pair(rng, shape):
    pred = random_volume(rng, shape)
    if rng.random() < 0.5:
        return pred, random_volume(rng, shape)
    gt = ndi.binary_dilation(pred, iterations=int(rng.integers(0, 2))) ^ (rng.random(shape) < 0.03)
    if not gt.any():
        gt = pred.copy()
    return pred, gt


def brute_force_surface(mask: np.ndarray, spacing) -> np.ndarray:
    """Boundary voxel centres in mm, found without erosion: foreground voxels with at least one
    face neighbour in the background, the outside of the array counting as background."""
    padded = np.pad(mask, 1)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    boundary = np.zeros_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            boundary |= mask & ~np.roll(padded, step, axis=axis)[inner]
    return np.argwhere(boundary) * np.asarray(spacing, float)


def brute_force_nsd(pred, gt, spacing, tolerance) -> float:
    """NSD (%) from nearest-neighbour distances between boundary voxel centres (k-d tree)."""
    from scipy.spatial import cKDTree

    sp, sg = brute_force_surface(pred, spacing), brute_force_surface(gt, spacing)
    d_pg = cKDTree(sg).query(sp)[0]
    d_gp = cKDTree(sp).query(sg)[0]
    return 100.0 * ((d_pg <= tolerance).sum() + (d_gp <= tolerance).sum()) / (len(sp) + len(sg))


def test_evaluate_mm_with_unit_spacing_equals_evaluate_pair():
    rng = np.random.default_rng(31)
    for _ in range(300):
        shape = (int(rng.integers(6, 50)), int(rng.integers(6, 50)))
        pred, gt = random_blob(rng, shape), random_blob(rng, shape)
        if rng.random() < 0.1:
            pred = np.zeros(shape, bool)
        got, ref = metrics.evaluate_mm(pred, gt), metrics.evaluate_pair(pred, gt)
        for k in metrics.METRIC_NAMES:
            assert got[k] == pytest.approx(ref[k], abs=1e-12), k
        assert got["empty_pred"] == ref["empty_pred"]
    assert metrics.worst_distance_mm((30, 41)) == metrics.worst_distance((30, 41))


@pytest.mark.parametrize("spacing", [(3.0, 0.8, 0.8), (2.5, 0.7, 0.9), (1.0, 1.0, 1.0), (0.5, 4.0, 1.2)])
def test_3d_dice_and_distances_in_mm_match_medpy_voxelspacing(spacing):
    """Anisotropic volumes: DICE = medpy dc, HD/HD95/ASSD = medpy hd/hd95/assd with voxelspacing."""
    rng = np.random.default_rng(int(sum(spacing) * 1000))
    for _ in range(25):
        shape = (int(rng.integers(4, 14)), int(rng.integers(10, 36)), int(rng.integers(10, 36)))
        pred, gt = random_volume_pair(rng, shape)
        got = metrics.evaluate_mm(pred, gt, spacing)
        assert got["dice"] == pytest.approx(100 * medpy_binary.dc(pred, gt), abs=1e-9)
        assert got["jac"] == pytest.approx(100 * medpy_binary.jc(pred, gt), abs=1e-9)
        assert got["hd"] == pytest.approx(medpy_binary.hd(pred, gt, voxelspacing=spacing), abs=1e-9)
        assert got["hd95"] == pytest.approx(medpy_binary.hd95(pred, gt, voxelspacing=spacing), abs=1e-9)
        assert got["assd"] == pytest.approx(medpy_binary.assd(pred, gt, voxelspacing=spacing), abs=1e-9)
        assert got["hd"] <= metrics.worst_distance_mm(shape, spacing) + 1e-9
        d1, d2 = metrics.surface_distances_mm(pred, gt, spacing)
        assert got["nsd"] == pytest.approx(
            100 * ((d1 <= 2.0).sum() + (d2 <= 2.0).sum()) / (d1.size + d2.size))


@pytest.mark.parametrize("ndim", [2, 3])
def test_nsd_matches_brute_force(ndim):
    rng = np.random.default_rng(40 + ndim)
    for _ in range(60):
        if ndim == 2:
            shape = (int(rng.integers(8, 50)), int(rng.integers(8, 50)))
            pred, gt = random_blob(rng, shape), random_blob(rng, shape)
            spacing = tuple(rng.uniform(0.3, 2.0, 2))
        else:
            shape = (int(rng.integers(4, 12)), int(rng.integers(10, 30)), int(rng.integers(10, 30)))
            pred, gt = random_volume_pair(rng, shape)
            spacing = (rng.uniform(1.5, 5.0), *rng.uniform(0.4, 1.2, 2))
        tol = float(rng.choice([0.0, 0.5, 1.0, 2.0, 3.0, 5.0]))
        assert metrics.nsd(pred, gt, tol, spacing) == pytest.approx(brute_force_nsd(pred, gt, spacing, tol), abs=1e-9)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation notices
def test_nsd_and_assd_match_monai():
    """MONAI's compute_surface_dice (boundary voxels counted once, KD-tree distances) and its
    symmetric average surface distance, on anisotropic 3D and 2D masks."""
    rng = np.random.default_rng(50)
    for i in range(40):
        if i % 2:
            shape = (int(rng.integers(4, 12)), int(rng.integers(10, 30)), int(rng.integers(10, 30)))
            pred, gt = random_volume_pair(rng, shape)
            spacing = (3.0, 0.8, 0.8)
        else:
            shape = (int(rng.integers(8, 50)), int(rng.integers(8, 50)))
            pred, gt = random_blob(rng, shape), random_blob(rng, shape)
            spacing = (0.6, 1.4)
        yp = torch.from_numpy(pred[None, None].astype(np.float32))
        yg = torch.from_numpy(gt[None, None].astype(np.float32))
        ref = float(monai_metrics.compute_surface_dice(yp, yg, class_thresholds=[2.0], include_background=True,
                                                       spacing=list(spacing))[0, 0])
        assert metrics.nsd(pred, gt, 2.0, spacing) == pytest.approx(100 * ref, abs=1e-4)
        ref_assd = float(monai_metrics.compute_average_surface_distance(
            yp, yg, include_background=True, symmetric=True, spacing=list(spacing))[0, 0])
        # MONAI pools both directed sets before averaging, as medpy does
        assert metrics.evaluate_mm(pred, gt, spacing)["assd"] == pytest.approx(ref_assd, rel=1e-5, abs=1e-5)


def test_nsd_known_answers_tolerance_and_empty_policy():
    gt = np.zeros((6, 20, 20), bool)
    gt[1:5, 4:14, 4:14] = True
    assert metrics.nsd(gt, gt, 0.0, (3.0, 0.8, 0.8)) == 100.0
    # one slice further along axis 0 (3 mm): NSD grows with the tolerance and reaches 100 exactly
    # at the Hausdorff distance
    shifted = np.roll(gt, 1, axis=0)
    hd = metrics.evaluate_mm(shifted, gt, (3.0, 0.8, 0.8))["hd"]
    at = [metrics.nsd(shifted, gt, t, (3.0, 0.8, 0.8)) for t in (0.0, 0.8, 2.0, hd - 1e-9, hd, 2 * hd)]
    assert 0 < at[0] and all(a <= b for a, b in zip(at, at[1:])) and at[3] < at[4] == at[5] == 100.0
    # the same shift with 1 mm slices is within the default 2 mm tolerance
    assert metrics.nsd(shifted, gt, spacing=(1.0, 0.8, 0.8)) == 100.0
    empty = np.zeros_like(gt)
    assert metrics.nsd(empty, gt) == 0.0 and metrics.nsd(gt, empty, policy="nan") == 0.0
    assert metrics.nsd(empty, empty) == 100.0 and math.isnan(metrics.nsd(empty, empty, policy="nan"))
    got = metrics.evaluate_mm(empty, gt, (3.0, 0.8, 0.8))
    assert got["dice"] == 0 and got["nsd"] == 0 and got["empty_pred"] and not got["empty_gt"]
    assert got["hd"] == got["hd95"] == got["assd"] == pytest.approx(math.sqrt(15 ** 2 + 2 * 15.2 ** 2))
    got = metrics.evaluate_mm(empty, gt, (3.0, 0.8, 0.8), policy="nan")
    assert math.isnan(got["hd"]) and got["nsd"] == 0
    with pytest.raises(ValueError, match="spacing"):
        metrics.evaluate_mm(gt, gt, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        metrics.nsd(gt, gt, 2.0, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        metrics.nsd(gt, gt, -1.0)
