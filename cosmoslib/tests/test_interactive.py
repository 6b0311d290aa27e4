"""Multi-round interaction (paper 4.11, Fig. 16): click simulator, adapters, NoC."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.measure import label as sk_label

from cosmoslib.protocol import interactive as it
from cosmoslib.protocol import prompts
from cosmoslib.protocol.prompts import Prompt
from cosmoslib.tests.test_prompts import random_mask, ring


class Recorder:
    """Wraps a segmenter; keeps (clicks, previous, mask) of every round."""

    def __init__(self, inner):
        self.inner, self.log = inner, []

    def segment(self, image, clicks, previous):
        out = self.inner.segment(image, clicks, previous)
        mask = out.mask if isinstance(out, it.Round) else out
        self.log.append((list(clicks), previous, np.asarray(mask, bool).copy()))
        return out


class Fixed:
    """Returns the masks it was given, one per round (the last one repeated)."""

    def __init__(self, *masks):
        self.masks = masks

    def segment(self, image, clicks, previous):
        return self.masks[min(len(clicks), len(self.masks)) - 1]


def scene(kind: str, seed: int = 0):
    """A noisy 8-bit image (80 x 120) and the GT of an easy synthetic object.

    "twins": two equal bright ellipses, the GT is the left one (a colour model takes both);
    "halves": one bright rectangle, the GT is its left half (no edge between the halves).
    """
    rng = np.random.default_rng(seed)
    h, w = 80, 120
    yy, xx = np.mgrid[:h, :w]
    if kind == "twins":
        gt = (yy - 40) ** 2 / 15**2 + (xx - 30) ** 2 / 20**2 <= 1
        bright = gt | ((yy - 40) ** 2 / 15**2 + (xx - 90) ** 2 / 20**2 <= 1)
    else:
        bright = np.zeros((h, w), bool)
        bright[20:60, 20:100] = True
        gt = bright.copy()
        gt[:, 60:] = False
    img = np.clip(np.where(bright, 180, 60) + rng.normal(0, 12, (h, w)), 0, 255)
    return img.astype(np.uint8), gt


def check_clicks(log, gt):
    """Click rule and honoured clicks, round by round, from a Recorder's log."""
    first = prompts.make_prompt(gt, "S2").points[0]
    clicks = log[-1][0]
    assert clicks[0] == (int(first[0]), int(first[1]), 1), "click 1 is the S2 point"
    for k in range(1, len(clicks)):
        x, y, label = clicks[k]
        pred = log[k - 1][2]  # the mask the user looked at before click k + 1
        assert pred[y, x] != gt[y, x], "no click on an already-correct pixel"
        assert label == int(gt[y, x]), "FN -> positive (1), FP -> negative (0)"


# ---- the click simulator ---------------------------------------------------------------------


def test_first_click_is_the_s2_point():
    gt = ring((40, 40), 8, 12)  # centre of mass is background: S2 takes an 'even' sample
    rec = Recorder(Fixed(np.zeros_like(gt)))
    table = it.run_interaction(rec, np.zeros(gt.shape, np.uint8), gt, max_clicks=3)
    x, y = prompts.make_prompt(gt, "S2").points[0]
    assert (table.x[0], table.y[0], table.label[0]) == (x, y, 1)
    assert gt[int(y), int(x)]
    assert it.first_click(gt) == (int(x), int(y), 1)


def test_next_click_hand_made():
    gt = np.zeros((20, 20), bool)
    gt[3:12, 3:12] = True  # 9 x 9 square, rows/cols 3..11

    # a 5 x 5 hole (rows/cols 5..9, FN, 25 px) and a 3 x 3 FP block (9 px): the click is
    # positive, at the hole's centre (7, 7), 3 px from the nearest non-hole pixel (row/col 4)
    pred = gt.copy()
    pred[5:10, 5:10] = False
    pred[15:18, 15:18] = True
    assert it.next_click(pred, gt) == (7, 7, 1)

    # a 3 x 3 hole (9 px) and a 5 x 5 FP block (rows/cols 13..17, 25 px): negative, at the
    # block's centre (15, 15)
    pred = gt.copy()
    pred[6:9, 6:9] = False
    pred[13:18, 13:18] = True
    assert it.next_click(pred, gt) == (15, 15, 0)

    # equal areas (9 px each): the FN region wins the tie
    pred = gt.copy()
    pred[6:9, 6:9] = False
    pred[15:18, 15:18] = True
    assert it.next_click(pred, gt) == (7, 7, 1)

    # a region of 2 components touching only at a corner counts as two regions (4-connected)
    pred = gt.copy()
    pred[13:16, 13:16] = True  # 9 px
    pred[16:19, 16:19] = True  # 9 px, diagonal neighbour of the first
    pred[5:8, 5:9] = False  # FN 12 px: larger than either FP part, smaller than both
    assert it.next_click(pred, gt)[2] == 1

    assert it.next_click(gt, gt) is None


def test_next_click_image_border_counts_as_boundary():
    # a 3-row FN band along the top edge: with the border as boundary the click is on the
    # band's middle row (y = 1), not on the image edge (y = 0)
    gt = np.zeros((10, 20), bool)
    gt[0:3, :] = True
    x, y, label = it.next_click(np.zeros_like(gt), gt)
    assert (y, label) == (1, 1) and 1 <= x <= 18


def brute_depth(region: np.ndarray) -> np.ndarray:
    """Euclidean distance of each region pixel to the nearest pixel outside the region,
    where the ring of pixels just outside the image counts as outside (brute force)."""
    h, w = region.shape
    padded = np.pad(region, 1)
    oy, ox = np.nonzero(~padded)
    depth = np.zeros(region.shape)
    for y, x in zip(*np.nonzero(region)):
        depth[y, x] = np.min(np.hypot(oy - (y + 1), ox - (x + 1)))
    return depth


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_next_click_random_pairs(seed):
    """Largest error region (4-connectivity), deepest pixel, label = GT value there."""
    gt = random_mask(seed)
    rng = np.random.default_rng(seed)
    pred = gt ^ (rng.random(gt.shape) < rng.uniform(0.02, 0.5))
    click = it.next_click(pred, gt)
    if np.array_equal(pred, gt):
        assert click is None
        return
    x, y, label = click
    assert pred[y, x] != gt[y, x] and label == int(gt[y, x])
    best = 0
    for err in (gt & ~pred, pred & ~gt):
        lab = sk_label(err, connectivity=1)
        if lab.max():
            best = max(best, np.bincount(lab.ravel())[1:].max())
    err = (gt & ~pred) if label == 1 else (pred & ~gt)
    lab = sk_label(err, connectivity=1)
    region = lab == lab[y, x]
    assert region.sum() == best, "the click is in a largest error region"
    depth = brute_depth(region)
    assert depth[y, x] == pytest.approx(depth.max()), "farthest from the region boundary"


def test_run_interaction_stops_and_passes_previous():
    img, gt = scene("halves")
    # perfect at once: one round, DICE 100
    table = it.run_interaction(Fixed(gt), img, gt)
    assert list(table.columns) == it.INTERACTION_COLUMNS
    assert len(table) == 1 and table.dice[0] == pytest.approx(100.0)

    class Stateful:
        def segment(self, image, clicks, previous):
            self.seen = getattr(self, "seen", []) + [previous]
            return it.Round(np.zeros(gt.shape, bool), state=len(clicks))

    seg = Stateful()
    table = it.run_interaction(seg, img, gt, max_clicks=4)
    assert len(table) == 4 and list(table.click) == [1, 2, 3, 4]
    assert seg.seen[0] is None and [p.state for p in seg.seen[1:]] == [1, 2, 3]
    assert (table.dice == 0).all() and (table.label == 1).all()


def test_run_interaction_bad_input():
    img, gt = scene("halves")
    with pytest.raises(ValueError, match="empty"):
        it.run_interaction(Fixed(gt), img, np.zeros_like(gt))
    with pytest.raises(ValueError, match="max_clicks"):
        it.run_interaction(Fixed(gt), img, gt, max_clicks=0)
    with pytest.raises(ValueError, match="differ in size"):
        it.run_interaction(Fixed(gt), img[:10], gt)
    with pytest.raises(ValueError, match="shape"):
        it.run_interaction(Fixed(gt[:10]), img, gt)


# ---- NoC -------------------------------------------------------------------------------------


def test_noc_hand_made_curves():
    curve = [50.0, 70.0, 85.0, 92.0]
    assert it.noc(curve, 80) == (3, True)  # first DICE >= 80 after click 3
    assert it.noc(curve, 90) == (4, True)
    assert it.noc(curve, 95) == (10, False)  # never: capped at max_clicks, flagged
    assert it.noc(curve, 95, max_clicks=20) == (20, False)
    assert it.noc([95.0], 90) == (1, True)
    assert it.noc([79.99, 80.0], 80) == (2, True)  # reached means >=
    assert it.noc([0.0] * 10 + [100.0], 80) == (10, False)  # click 11 is past the cap
    assert it.noc([math.nan, 85.0], 80) == (2, True)
    assert it.noc([60.0, 100.0], 90, max_clicks=10) == (2, True)  # stopped early: perfect
    with pytest.raises(ValueError, match="empty"):
        it.noc([], 80)
    with pytest.raises(ValueError, match="max_clicks"):
        it.noc([90.0], 80, max_clicks=0)


# ---- GrabCut and random walker ---------------------------------------------------------------


@pytest.mark.parametrize("make", [it.GrabCutSegmenter, it.RandomWalkerSegmenter])
@pytest.mark.parametrize("kind", ["twins", "halves"])
def test_classic_segmenters_honour_the_clicks(make, kind):
    img, gt = scene(kind)
    rec = Recorder(make())
    table = it.run_interaction(rec, img, gt)
    check_clicks(rec.log, gt)
    for clicks, _, mask in rec.log:
        for x, y, label in clicks:
            assert mask[y, x] == bool(label), "positive click in the mask, negative not"
    if kind == "halves":  # the scene needs negative clicks; they are made and obeyed
        assert (table.label == 0).any()
    assert table.dice.iloc[-1] > 90


def test_grabcut_negative_click_removes_the_twin():
    img, gt = scene("twins")
    seg = it.GrabCutSegmenter()
    first = it.first_click(gt)
    one = seg.segment(img, [first], None)
    twin = np.zeros_like(gt)
    twin[:, 60:] = True
    assert (one & twin).sum() > 0.8 * gt.sum(), "one positive click takes both bright blobs"
    again = seg.segment(img, [first], None)
    np.testing.assert_array_equal(one, again)  # reseeded: deterministic
    two = seg.segment(img, [first, (90, 40, 0)], it.Round(one))
    assert (two & twin).sum() < (one & twin).sum()
    assert not two[40, 90]


def test_random_walker_rgb_and_grey_agree():
    img, gt = scene("twins")
    seg = it.RandomWalkerSegmenter()
    clicks = [it.first_click(gt)]
    grey = seg.segment(img, clicks, None)
    rgb = seg.segment(np.stack([img] * 3, axis=-1), clicks, None)
    assert (grey != rgb).mean() < 0.01
    assert grey[gt].mean() > 0.9 and (grey & ~gt).sum() < 0.01 * gt.sum()


def test_random_walker_direct_solve_is_the_iterative_answer(monkeypatch):
    """``mode="auto"`` solves small images exactly (sparse LU) and agrees with the conjugate
    gradient at a tight tolerance; above the size limit it goes iterative."""
    img, gt = scene("twins")
    clicks = [it.first_click(gt), (90, 40, 0)]
    exact = it.RandomWalkerSegmenter().segment(img, clicks, None)
    iterative = it.RandomWalkerSegmenter(mode="cg_j", tol=1e-8).segment(img, clicks, None)
    assert (exact != iterative).sum() <= 2 and exact[gt].mean() > 0.9
    used = []
    real = it.random_walker
    monkeypatch.setattr(it, "random_walker", lambda *a, **k: used.append(k["mode"]) or real(*a, **k))
    it.RandomWalkerSegmenter().segment(img, clicks, None)
    monkeypatch.setattr(it, "DIRECT_SOLVE_MAX_PIXELS", img.shape[0] * img.shape[1] - 1)
    it.RandomWalkerSegmenter().segment(img, clicks, None)
    assert used == ["bf", "cg_j"]


def test_bad_clicks():
    img, gt = scene("twins")
    with pytest.raises(ValueError, match="inside"):
        it.GrabCutSegmenter().segment(img, [(500, 1, 1)], None)
    with pytest.raises(ValueError, match="labels"):
        it.RandomWalkerSegmenter().segment(img, [(5, 1, 2)], None)


# ---- SAM (LiteMedSAM on CPU, one small image) --------------------------------------------------


def test_sam_segmenter(litemedsam):

    img, gt = scene("twins")
    rgb = np.stack([img] * 3, axis=-1)
    emb = litemedsam.encode([rgb])[0]
    c1, c2 = it.first_click(gt), (90, 40, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LiteMedSAM is box-trained: it warns about points
        plain = it.SamSegmenter(litemedsam, emb, use_previous_logits=False)
        chained = it.SamSegmenter(litemedsam, emb, use_previous_logits=True)
        r1 = chained.segment(rgb, [c1], None)
        assert r1.mask.shape == gt.shape and r1.mask.dtype == bool
        assert r1.state.shape == (1, 256, 256)
        pts = np.array([[c1[0], c1[1]], [c2[0], c2[1]]], float)
        lab = np.array([1, 0])
        # with previous logits: exactly the decode of all clicks plus r1's logits
        r2 = chained.segment(rgb, [c1, c2], r1)
        want = litemedsam.decode(emb, Prompt(pts, lab, mask_input=r1.state), gt.shape)
        np.testing.assert_array_equal(r2.mask, want.masks[int(np.argmax(want.iou_pred))])
        # without: the previous round is ignored
        r2_plain = plain.segment(rgb, [c1, c2], r1)
        want = litemedsam.decode(emb, Prompt(pts, lab), gt.shape)
        np.testing.assert_array_equal(r2_plain.mask, want.masks[0])
        assert np.abs(r2.state - r2_plain.state).max() > 1e-3, "mask prompt changes the logits"
        # multimask: the candidate with the best predicted IoU (no GT inside the loop)
        multi = it.SamSegmenter(litemedsam, emb, multimask=True)
        r = multi.segment(rgb, [c1], None)
        want = litemedsam.decode(emb, Prompt(pts[:1], lab[:1]), gt.shape, multimask=True)
        best = int(np.argmax(want.iou_pred))
        assert len(want.iou_pred) == 3
        np.testing.assert_array_equal(r.mask, want.masks[best])
        np.testing.assert_allclose(r.state, want.low_res_logits[best : best + 1], atol=1e-5)
        table = it.run_interaction(chained, rgb, gt, max_clicks=3)
    assert len(table) <= 3 and table.x[0] == c1[0] and table.y[0] == c1[1]
    assert table.dice.between(0, 100).all()
