"""Known-answer generators: the shapes and images are what their formulas say."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import draw, measure

from cosmoslib.analysis import synthetic as syn


def test_star_without_lobes_is_the_disk_of_skimage():
    # k = 0: r(theta) = R (1 + a) everywhere; compare with skimage's own disk.
    mask = syn.star((96, 96), 0, 0.15, 20.0, center=(47.0, 45.0))
    rr, cc = draw.disk((45.0, 47.0), 20.0 * 1.15, shape=(96, 96))
    ref = np.zeros((96, 96), bool)
    ref[rr, cc] = True
    assert (mask != ref).sum() <= 4  # pixels exactly on the circle may go either way


def test_star_area_matches_the_polar_area_formula():
    # area = 1/2 int r^2 dtheta = pi R^2 (1 + a^2 / 2)
    R, a = 40.0, 0.3
    mask = syn.star((128, 128), 5, a, R)
    expected = np.pi * R**2 * (1 + a**2 / 2)
    assert mask.sum() == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("k", [3, 5, 8])
def test_star_has_k_lobes(k):
    # A circle of radius R crosses the boundary twice per lobe.
    R = 30.0
    mask = syn.star((128, 128), k, 0.25, R, center=(63.5, 63.5), phase=0.3)
    theta = np.linspace(0, 2 * np.pi, 2000, endpoint=False)
    xs = np.rint(63.5 + R * np.cos(theta)).astype(int)
    ys = np.rint(63.5 + R * np.sin(theta)).astype(int)
    ring = mask[ys, xs]
    crossings = np.count_nonzero(ring != np.roll(ring, 1))
    assert crossings == 2 * k
    assert measure.label(mask).max() == 1


def test_star_rejects_bad_parameters():
    with pytest.raises(ValueError):
        syn.star((32, 32), -1, 0.1, 5)
    with pytest.raises(ValueError):
        syn.star((32, 32), 3, 1.0, 5)
    with pytest.raises(ValueError):
        syn.star((32, 32), 3, 0.1, 0)


def test_ellipse_area_and_extent():
    mask = syn.ellipse((100, 120), (30, 10), center=(60, 50), angle=0)
    assert mask.sum() == pytest.approx(np.pi * 30 * 10, rel=0.02)
    rows, cols = np.nonzero(mask)
    assert cols.max() - cols.min() + 1 in (59, 60, 61)  # 2 * 30 (+1 inclusive)
    assert rows.max() - rows.min() + 1 in (19, 20, 21)
    turned = syn.ellipse((100, 120), (30, 10), center=(60, 50), angle=90)
    rows, cols = np.nonzero(turned)
    assert rows.max() - rows.min() > cols.max() - cols.min()


def test_render_contrast_noise_and_determinism():
    mask = syn.star((80, 80), 0, 0.0, 20)
    img = syn.render(mask, contrast=-30, noise_sd=4.0, background=120,
                     rng=np.random.default_rng(1))
    assert img.dtype == np.uint8
    assert img[mask].mean() - img[~mask].mean() == pytest.approx(-30, abs=0.5)
    assert img[~mask].std() == pytest.approx(4.0, rel=0.1)
    again = syn.render(mask, -30, 4.0, 120, np.random.default_rng(1))
    assert np.array_equal(img, again)
    flat = syn.render(mask, 50, 0.0, 10)
    assert set(np.unique(flat)) == {10, 60}
    with pytest.raises(ValueError):
        syn.render(mask, 10, 2.0)  # noise without a generator


def test_render_clips_to_uint8_range():
    mask = np.ones((4, 4), bool)
    assert syn.render(mask, 300, 0.0, 100).max() == 255


def test_known_answer_set_grid_and_seed():
    ks, contrasts = (0, 4, 9), (20.0, 60.0)
    a = syn.known_answer_set(np.random.default_rng(3), ks=ks, contrasts=contrasts,
                             shape=(64, 64), radius=15)
    b = syn.known_answer_set(np.random.default_rng(3), ks=ks, contrasts=contrasts,
                             shape=(64, 64), radius=15)
    c = syn.known_answer_set(np.random.default_rng(4), ks=ks, contrasts=contrasts,
                             shape=(64, 64), radius=15)
    assert list(zip(a["k"], a["contrast"])) == [(k, c_) for k in ks for c_ in contrasts]
    assert all(np.array_equal(x, y) for x, y in zip(a["image"], b["image"]))
    assert not all(np.array_equal(x, y) for x, y in zip(a["image"], c["image"]))
    for img, mask, contrast in zip(a["image"], a["mask"], a["contrast"]):
        assert img.shape == mask.shape == (64, 64)
        assert img[mask].mean() - img[~mask].mean() == pytest.approx(contrast, abs=2.0)
