"""Prompt strategies S2..S6 (paper 3.3): labels always right, exact counts, determinism."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cosmoslib import masks
from cosmoslib.files import InputError
from cosmoslib.protocol import prompts
from cosmoslib.protocol.prompts import make_prompt

EXPECTED_N = {"S2": (1, 0), "S3": (5, 0), "S4": (5, 5), "S5": (0, 0), "S6": (1, 0)}


def check_prompt(mask: np.ndarray, strategy: str, prompt: prompts.Prompt) -> None:
    """Every property a correct prompt has; raises AssertionError otherwise."""
    mask = mask.astype(bool)
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], float)
    want_pos, want_neg = EXPECTED_N[strategy]
    if strategy in ("S5", "S6"):
        np.testing.assert_array_equal(prompt.box, box)
    else:
        assert prompt.box is None
    if strategy == "S5":
        assert prompt.points is None and prompt.point_labels is None
        return
    pts, labels = prompt.points, prompt.point_labels
    assert pts.ndim == 2 and pts.shape[1] == 2 and labels.shape == (len(pts),)
    assert set(np.unique(labels)) <= {0, 1}
    assert np.all(pts == np.round(pts)), "points are pixel centres"
    x, y = pts[:, 0].astype(int), pts[:, 1].astype(int)
    assert np.all((x >= 0) & (x < w) & (y >= 0) & (y < h))
    assert len({(a, b) for a, b in zip(x, y)}) == len(pts), "no duplicate points"
    inside = mask[y, x]
    assert np.all(inside[labels == 1]), "every positive point lies in the mask"
    assert not np.any(inside[labels == 0]), "every negative point lies outside the mask"
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    # exact counts whenever there are enough pixels to choose from
    assert n_pos == min(want_pos, mask.sum())
    if want_neg:
        bw, bh = box[2] - box[0] + 1, box[3] - box[1] + 1
        ex = np.array([box[0] - math.ceil(bw / 2), box[1] - math.ceil(bh / 2),
                       box[2] + math.ceil(bw / 2), box[3] + math.ceil(bh / 2)])
        ex = np.clip(ex, 0, [w - 1, h - 1, w - 1, h - 1]).astype(int)
        region = np.zeros_like(mask)
        region[ex[1] : ex[3] + 1, ex[0] : ex[2] + 1] = True
        assert np.all(region[y[labels == 0], x[labels == 0]]), "negatives inside the enlarged box"
        assert n_neg == min(want_neg, int((region & ~mask).sum()))
    else:
        assert n_neg == 0
    assert np.all(labels[:n_pos] == 1), "positives come first"


def ring(shape=(40, 40), r0=8, r1=12):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r = np.hypot(yy - shape[0] / 2, xx - shape[1] / 2)
    return (r >= r0) & (r <= r1)


def random_mask(seed: int) -> np.ndarray:
    """Blobs, rings, multi-component, border-touching and tiny masks, from a seed."""
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(3, 50)), int(rng.integers(3, 50))
    kind = seed % 5
    yy, xx = np.mgrid[:h, :w]
    if kind == 0:
        mask = rng.random((h, w)) < rng.uniform(0.02, 0.9)
    elif kind == 1:
        r = np.hypot(yy - rng.uniform(0, h), xx - rng.uniform(0, w))
        r0 = rng.uniform(1, max(h, w) / 2)
        mask = (r >= r0) & (r <= r0 + rng.uniform(1, 4))
    elif kind == 2:
        mask = np.zeros((h, w), bool)
        for _ in range(rng.integers(2, 5)):
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            mask[y0 : y0 + rng.integers(1, 6), x0 : x0 + rng.integers(1, 6)] = True
    elif kind == 3:  # touching the border
        cy, cx = rng.choice([0, h - 1]), rng.choice([0, w - 1])
        mask = np.hypot(yy - cy, xx - cx) <= rng.uniform(0.5, max(h, w))
    else:  # tiny: 1..6 pixels
        mask = np.zeros((h, w), bool)
        flat = rng.choice(h * w, size=min(h * w, int(rng.integers(1, 7))), replace=False)
        mask.flat[flat] = True
    if not mask.any():
        mask[rng.integers(0, h), rng.integers(0, w)] = True
    return mask


# ---- the two defects of the authors' code, caught by check_prompt --------------------------

def _authors_points(mask):
    """Re-statement of the authors' find_center_from_mask_new point logic (positives only)."""
    ys, xs = np.nonzero(mask)
    m = mask.sum()
    centre = [int(xs.sum() / m), int(ys.sum() / m)]
    fg = np.column_stack([xs, ys])
    fg = fg[:: len(fg) // 5]
    pts = np.concatenate([[centre], fg[1:]])
    labels = np.concatenate([np.ones(5), np.zeros(len(pts) - 5)])
    return prompts.Prompt(points=pts.astype(float), point_labels=labels.astype(int))


def test_check_prompt_rejects_the_authors_rule():
    # a 23-pixel bar: [::4] gives 6 points, the sixth (a foreground pixel) is labelled negative
    mask = np.zeros((10, 30), bool)
    mask[5, 2:25] = True
    assert len(_authors_points(mask).points) == 6
    with pytest.raises(AssertionError, match="negative point lies outside"):
        check_prompt(mask, "S3", _authors_points(mask))
    # ring: the centroid is background but is labelled positive
    with pytest.raises(AssertionError, match="positive point lies in the mask"):
        check_prompt(ring(), "S3", _authors_points(ring()))


# ---- properties -----------------------------------------------------------------------------

@pytest.mark.parametrize("sampling", ["even", "random"])
@pytest.mark.parametrize("strategy", prompts.STRATEGIES)
def test_ring_multicomponent_border(strategy, sampling):
    rng = np.random.default_rng(0)
    two = np.zeros((30, 30), bool)
    two[2:6, 2:6] = two[20:28, 22:29] = True
    corner = np.zeros((20, 30), bool)
    corner[:5, 22:] = True
    for mask in (ring(), two, corner):
        check_prompt(mask, strategy, make_prompt(mask, strategy, rng=rng, sampling=sampling))
    assert prompts.centre_of_mass(ring()) is None and prompts.centre_of_mass(two) is None
    # one box spans both components
    np.testing.assert_array_equal(masks.tight_box(two), [2, 2, 28, 27])


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10**6), strategy=st.sampled_from(prompts.STRATEGIES),
       sampling=st.sampled_from(prompts.SAMPLINGS))
def test_random_masks(seed, strategy, sampling):
    mask = random_mask(seed)
    check_prompt(mask, strategy, make_prompt(mask, strategy, np.random.default_rng(seed), sampling))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask=arrays(bool, st.tuples(st.integers(1, 12), st.integers(1, 12))).filter(np.any),
       strategy=st.sampled_from(prompts.STRATEGIES))
def test_arbitrary_masks(mask, strategy):
    check_prompt(mask, strategy, make_prompt(mask, strategy))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), sampling=st.sampled_from(prompts.SAMPLINGS))
def test_strategies_nest(seed, sampling):
    """S2's point is S3's first and S6's point; S3's points are S4's positives."""
    mask = random_mask(seed)
    p = {s: make_prompt(mask, s, np.random.default_rng(seed), sampling) for s in prompts.STRATEGIES}
    np.testing.assert_array_equal(p["S3"].points[:1], p["S2"].points)
    np.testing.assert_array_equal(p["S6"].points, p["S2"].points)
    np.testing.assert_array_equal(p["S4"].points[p["S4"].point_labels == 1], p["S3"].points)
    np.testing.assert_array_equal(p["S6"].box, p["S5"].box)


def test_centre_is_first_point_when_inside():
    mask = np.zeros((21, 31), bool)
    mask[5:16, 10:21] = True  # square, centre (15, 10)
    assert prompts.centre_of_mass(mask) == (15, 10)
    np.testing.assert_array_equal(make_prompt(mask, "S2").points, [[15, 10]])


def test_even_sampling_spreads_over_strata():
    """'even' picks one point from each fifth of the raster-ordered foreground."""
    mask = ring((60, 60), 10, 20)  # centroid outside: all five sampled
    flat = np.flatnonzero(mask)
    pts = make_prompt(mask, "S3").points.astype(int)
    pos = np.searchsorted(flat, pts[:, 1] * 60 + pts[:, 0])
    strata = pos * 5 // len(flat)
    np.testing.assert_array_equal(strata, np.arange(5))


def test_random_sampling_is_seeded():
    mask = ring((60, 60), 10, 20)
    a = make_prompt(mask, "S4", np.random.default_rng(1), "random").points
    b = make_prompt(mask, "S4", np.random.default_rng(1), "random").points
    c = make_prompt(mask, "S4", np.random.default_rng(2), "random").points
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="Generator"):
        make_prompt(mask, "S3", None, "random")


def test_small_mask_gives_fewer_points():
    mask = np.zeros((5, 5), bool)
    mask[2, 1:4] = True  # 3 pixels
    p = make_prompt(mask, "S4")
    assert (p.point_labels == 1).sum() == 3 and (p.point_labels == 0).sum() == 5
    full = np.ones((4, 4), bool)  # no background in the enlarged box
    p = make_prompt(full, "S4")
    assert (p.point_labels == 1).sum() == 5 and (p.point_labels == 0).sum() == 0


def test_bad_input():
    with pytest.raises(ValueError, match="empty"):
        make_prompt(np.zeros((4, 4), bool), "S2")
    with pytest.raises(ValueError, match="strategy"):
        make_prompt(np.ones((4, 4), bool), "S7")
    with pytest.raises(ValueError, match="sampling"):
        make_prompt(np.ones((4, 4), bool), "S3", sampling="grid")


# ---- the prompts table ------------------------------------------------------------------------

@pytest.fixture
def cosmos_root(tmp_path):
    """Three label PNGs with several objects each, and their manifest rows."""
    from PIL import Image

    rows = []
    for i in range(3):
        label = np.zeros((48, 64), np.uint8)
        label[ring((48, 64), 6, 10)] = 1
        label[30 + i : 40, 5:20] = 2
        label[0:5, 50:64] = 7
        rel = f"task{i % 2}/labels/img{i}.png"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label).save(tmp_path / rel)
        for v, name in ((1, "ring"), (2, "block"), (7, "corner")):
            rows.append({"task": f"task{i % 2}", "image_id": f"img{i}", "label_value": v,
                         "object": name, "label_path": rel})
    return tmp_path, pd.DataFrame(rows)


def test_table_columns_and_labels(cosmos_root):
    root, manifest = cosmos_root
    table = prompts.make_prompt_table(manifest, root, seed=3)
    assert list(table.columns) == prompts.PROMPT_COLUMNS
    assert len(table) == len(manifest) * 5
    assert (table.seed == 3).all() and (table.shift_level == 0).all() and (table["repeat"] == 0).all()
    from PIL import Image

    for row in table.itertuples(index=False):
        path = manifest.query("image_id == @row.image_id").label_path.iloc[0]
        mask = np.asarray(Image.open(root / path)) == row.label_value
        check_prompt(mask, row.strategy, prompts.prompt_from_row(row))
        check_prompt(mask, row.strategy, prompts.prompt_from_row(row._asdict()))


@pytest.mark.parametrize("sampling", ["even", "random"])
def test_table_independent_of_order_and_subset(cosmos_root, sampling):
    root, manifest = cosmos_root
    full = prompts.make_prompt_table(manifest, root, seed=5, sampling=sampling)
    shuffled = manifest.sample(frac=1.0, random_state=0)
    again = prompts.make_prompt_table(shuffled, root, seed=5, sampling=sampling)
    assert full.equals(again)
    sub = manifest.iloc[[4, 1]]
    part = prompts.make_prompt_table(sub, root, seed=5, strategies=("S4",), sampling=sampling)
    keyed = full.set_index(["image_id", "label_value", "strategy"])
    for row in part.itertuples(index=False):
        assert keyed.loc[(row.image_id, row.label_value, row.strategy), "points"] == row.points
    if sampling == "random":
        other = prompts.make_prompt_table(manifest, root, seed=6, sampling=sampling)
        assert not full["points"].equals(other["points"])


def test_table_parquet_roundtrip(cosmos_root, tmp_path):
    root, manifest = cosmos_root
    table = prompts.make_prompt_table(manifest, root)
    table.to_parquet(tmp_path / "p.parquet")
    back = pd.read_parquet(tmp_path / "p.parquet")
    for a, b in zip(table.to_dict("records"), back.to_dict("records")):
        pa, pb = prompts.prompt_from_row(a), prompts.prompt_from_row(b)
        for field in ("points", "point_labels", "box"):
            va, vb = getattr(pa, field), getattr(pb, field)
            assert (va is None and vb is None) or np.array_equal(va, vb)


def test_table_bad_input(cosmos_root):

    root, manifest = cosmos_root
    bad = manifest.copy()
    bad.loc[0, "label_value"] = 9
    with pytest.raises(InputError, match="label value 9"):
        prompts.make_prompt_table(bad, root)
    skipped = []
    table = prompts.make_prompt_table(bad, root, skipped=skipped)
    assert len(skipped) == 1 and "img0.png" in skipped[0][0]
    assert "img0" not in set(table.image_id) and len(table) == (len(manifest) - 3) * 5
    with pytest.raises(InputError, match="lacks columns"):
        prompts.make_prompt_table(manifest.drop(columns="label_path"), root)


# ---- shifted prompts (Table 8) ----------------------------------------------------------------

TOL = 1e-6  # pixels; shifted coordinates are computed in float64


def _corners(shape):
    h, w = shape
    return np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], float)


def check_shift(orig: prompts.Prompt, shifted: prompts.Prompt, level: int, shape,
                strict: bool = False) -> None:
    """The documented contract of a shifted prompt (prompts module docstring).

    Every point and box edge lies inside the image and moved by a distance in the level's
    [lo, hi) pixels; the only exceptions are the documented size-limited cases, checked
    exactly. ``strict=True`` asserts that no exception applies (the geometry allows a move in
    range everywhere).
    """
    lo, hi = prompts.SHIFT_LEVELS[level]
    h, w = shape
    top = np.array([w - 1, h - 1], float)
    if orig.points is None:
        assert shifted.points is None and shifted.point_labels is None
    else:
        p, q = np.asarray(orig.points, float), np.asarray(shifted.points, float)
        assert q.shape == p.shape
        np.testing.assert_array_equal(shifted.point_labels, orig.point_labels)  # labels kept
        assert np.all(q >= 0) and np.all(q <= top), "every shifted point inside the image"
        d = np.hypot(*(q - p).T)
        for pi, qi, di in zip(p, q, d):
            gaps = np.hypot(*(_corners(shape) - pi).T)
            if gaps.max() >= lo:
                assert lo - TOL <= di < hi + TOL, f"point moved {di:.3f} px, level {level}"
            else:  # image too small: moved to the farthest corner
                assert not strict
                np.testing.assert_allclose(qi, _corners(shape)[np.argmax(gaps)], atol=TOL)
    if orig.box is None:
        assert shifted.box is None
        return
    b, c = np.asarray(orig.box, float), np.asarray(shifted.box, float)
    assert 0 <= c[0] <= c[2] <= w - 1 and 0 <= c[1] <= c[3] <= h - 1, "valid box in the image"
    centre = [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2] * 2
    border = [0, 0, w - 1, h - 1]
    for k in range(4):
        room_out, room_in = abs(b[k] - border[k]), abs(centre[k] - b[k])
        move = abs(c[k] - b[k])
        outward = (c[k] - b[k]) * (1 if k >= 2 else -1) > 0
        if max(room_out, room_in) > lo:
            assert lo - TOL <= move < hi + TOL, f"edge {k} moved {move:.3f} px, level {level}"
            assert move <= (room_out if outward else room_in) + TOL
        else:  # no room for a move in range: as far as it can go
            assert not strict
            assert move == pytest.approx(max(room_out, room_in), abs=TOL)


def padded_mask(seed: int, margin_lo: int = 21) -> np.ndarray:
    """A random mask with at least ``margin_lo`` pixels of background on every side."""
    rng = np.random.default_rng(seed + 1)
    mask = random_mask(seed)
    pads = rng.integers(margin_lo, margin_lo + 20, size=4)
    return np.pad(mask, ((pads[0], pads[1]), (pads[2], pads[3])))


def test_shift_levels():
    assert prompts.SHIFT_LEVELS == {0: (0, 0), 1: (0, 10), 2: (10, 20), 3: (20, 30)}
    p = make_prompt(ring(), "S6")
    same = prompts.shift_prompt(p, 0, (40, 40), np.random.default_rng(0))
    np.testing.assert_array_equal(same.points, p.points)
    np.testing.assert_array_equal(same.box, p.box)


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 10**6), strategy=st.sampled_from(prompts.STRATEGIES),
       level=st.sampled_from([1, 2, 3]), sampling=st.sampled_from(prompts.SAMPLINGS))
def test_shift_within_range_and_inside(seed, strategy, level, sampling):
    """With >= 21 px of background around the object every move is in the level's range."""
    mask = padded_mask(seed)
    p = make_prompt(mask, strategy, np.random.default_rng(seed), sampling)
    q = prompts.shift_prompt(p, level, mask.shape, np.random.default_rng(seed))
    check_shift(p, q, level, mask.shape, strict=True)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10**6), strategy=st.sampled_from(prompts.STRATEGIES),
       level=st.sampled_from([1, 2, 3]))
def test_shift_small_images_stay_inside(seed, strategy, level):
    """3..50 px images, objects on the border: inside, valid, in range where room allows."""
    mask = random_mask(seed)
    p = make_prompt(mask, strategy)
    q = prompts.shift_prompt(p, level, mask.shape, np.random.default_rng(seed))
    check_shift(p, q, level, mask.shape)


def test_shift_small_image_fallbacks():
    # 9 x 9 image, point in the centre (4, 4): every corner is sqrt(32) = 5.66 px away, below
    # level 2's 10 px, so the point goes to the farthest corner (the first of the four ties).
    q = prompts.shift_points([[4, 4]], 2, (9, 9), np.random.default_rng(0))
    np.testing.assert_allclose(q, [[0, 0]])
    # box [2, 2, 6, 6] in a 9 x 9 image at level 3: every edge has 2 px of room outward and
    # 2 px inward (to the centre 4): it moves 2 px outward, to the image border.
    b = prompts.shift_box([2, 2, 6, 6], 3, (9, 9), np.random.default_rng(0))
    np.testing.assert_allclose(b, [0, 0, 8, 8])


def test_shift_point_near_corner_keeps_the_distance():
    # (1, 1) in a 100 x 100 image at level 3: ~3/4 of the directions leave the image; the
    # point is still 20..30 px away and inside, for every draw.
    for s in range(200):
        q = prompts.shift_points([[1, 1]], 3, (100, 100), np.random.default_rng(s))[0]
        assert 20 - TOL <= np.hypot(q[0] - 1, q[1] - 1) < 30 + TOL
        assert np.all(q >= 0) and np.all(q <= 99)


def test_shift_distribution():
    """Distance uniform in [lo, hi), direction uniform, box edges outward and inward."""
    rng = np.random.default_rng(7)
    p = np.full((4000, 2), 100.0)
    q = prompts.shift_points(p, 2, (201, 201), rng)
    d = np.hypot(*(q - p).T)
    assert d.min() >= 10 - TOL and d.max() < 20 + TOL
    # uniform on [10, 20): mean 15, sd 10 / sqrt(12) = 2.89; 4000 draws: se of the mean 0.05
    assert abs(d.mean() - 15) < 0.25 and abs(d.std() - 10 / np.sqrt(12)) < 0.15
    angle = np.arctan2(q[:, 1] - 100, q[:, 0] - 100)
    counts = np.histogram(angle, bins=4, range=(-np.pi, np.pi))[0]
    assert counts.min() > 900  # 1000 expected per quadrant
    box = np.array([60.0, 60.0, 140.0, 140.0])  # 40 px room both ways
    moves = np.array([prompts.shift_box(box, 3, (201, 201), np.random.default_rng(s)) - box
                      for s in range(200)])
    grow = np.concatenate([-moves[:, :2], moves[:, 2:]], axis=1) > 0
    assert 0.35 < grow.mean() < 0.65, "outward and inward about equally often"


def test_shift_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="shift level"):
        prompts.shift_points([[1, 1]], 4, (10, 10), rng)
    with pytest.raises(ValueError, match="inside"):
        prompts.shift_points([[10, 1]], 1, (10, 10), rng)
    with pytest.raises(ValueError, match="valid box"):
        prompts.shift_box([5, 1, 4, 3], 1, (10, 10), rng)


def test_object_rng_without_keys_is_unchanged():
    """Unshifted prompts keep the Generator they always had; keys give new streams."""
    h = prompts._stable_hash
    want = np.random.default_rng(np.random.SeedSequence([3, h("t"), h("i"), 2])).random(4)
    np.testing.assert_array_equal(prompts.object_rng(3, "t", "i", 2).random(4), want)
    a = prompts.object_rng(3, "t", "i", 2, "S2", 1, 1).random(4)
    np.testing.assert_array_equal(a, prompts.object_rng(3, "t", "i", 2, "S2", 1, 1).random(4))
    for other in (("S2", 1, 2), ("S3", 1, 1), ("S2", 2, 1)):
        assert not np.array_equal(a, prompts.object_rng(3, "t", "i", 2, *other).random(4))
    with pytest.raises(ValueError, match="non-negative"):
        prompts.object_rng(3, "t", "i", 2, -1)


def test_table_shifted_rows(cosmos_root):
    from PIL import Image

    root, manifest = cosmos_root
    default = prompts.make_prompt_table(manifest, root, seed=3)
    table = prompts.make_prompt_table(manifest, root, seed=3, shift_levels=(1, 2, 3), repeats=3)
    assert list(table.columns) == prompts.PROMPT_COLUMNS
    assert len(table) == len(manifest) * 5 * (1 + 3 * 3)
    # the unshifted rows are the default table, row for row
    unshifted = table[table.shift_level == 0].reset_index(drop=True)
    assert unshifted.equals(default)
    assert (unshifted["repeat"] == 0).all()
    shifted = table[table.shift_level > 0]
    assert set(zip(shifted.shift_level, shifted["repeat"])) == {
        (lv, r) for lv in (1, 2, 3) for r in (1, 2, 3)}
    # (0, 1, 2, 3) is the same table: level 0 is always there once
    assert table.equals(prompts.make_prompt_table(
        manifest, root, seed=3, shift_levels=(0, 1, 2, 3), repeats=3))
    keyed = default.set_index(["image_id", "label_value", "strategy"])
    for row in shifted.itertuples(index=False):
        path = manifest.query("image_id == @row.image_id").label_path.iloc[0]
        shape = np.asarray(Image.open(root / path)).shape
        orig = prompts.prompt_from_row(keyed.loc[(row.image_id, row.label_value, row.strategy)])
        check_shift(orig, prompts.prompt_from_row(row), row.shift_level, shape)


def test_table_shifts_reproducible_and_distinct(cosmos_root):
    root, manifest = cosmos_root
    kw = {"shift_levels": (1, 3), "repeats": 2}
    a = prompts.make_prompt_table(manifest, root, seed=0, **kw)
    again = prompts.make_prompt_table(manifest.sample(frac=1.0, random_state=1), root, seed=0, **kw)
    assert a.equals(again)
    b = prompts.make_prompt_table(manifest, root, seed=1, **kw)
    key = ["image_id", "label_value", "strategy", "shift_level", "repeat"]
    a, b = a.set_index(key), b.set_index(key)
    level0 = a.index.get_level_values("shift_level") == 0
    # even sampling: the seed leaves the unshifted prompts alone and moves every shifted one
    assert a[level0].points.equals(b[level0].points)
    for col in ("points", "box"):
        va, vb = a.loc[~level0, col].dropna(), b.loc[~level0, col].dropna()
        assert len(va) > 0 and all(x != y for x, y in zip(va, vb))
    # repeats differ from each other
    r1 = a.xs(1, level="repeat").points.dropna()
    r2 = a.xs(2, level="repeat").points.dropna()
    assert all(x != y for x, y in zip(r1, r2.loc[r1.index]))


def test_table_shift_bad_input(cosmos_root):
    root, manifest = cosmos_root
    with pytest.raises(ValueError, match="shift level"):
        prompts.make_prompt_table(manifest, root, shift_levels=(1, 5))
    with pytest.raises(ValueError, match="repeats"):
        prompts.make_prompt_table(manifest, root, shift_levels=(1,), repeats=0)
