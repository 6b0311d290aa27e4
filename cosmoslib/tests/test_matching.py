"""Mask matching (paper 3.5): vectorised DICE, oracle and predicted-IoU choices, S1 rules."""

from __future__ import annotations

import numpy as np
import pytest

from cosmoslib.protocol import matching, metrics


def _random_masks(rng, k, shape):
    masks = np.zeros((k, *shape), bool)
    for i in range(k):
        y0, x0 = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        masks[i, y0 : y0 + rng.integers(1, shape[0]), x0 : x0 + rng.integers(1, shape[1])] = True
        masks[i] ^= rng.random(shape) < 0.05
    return masks


def test_dice_many_equals_metrics_dice():
    rng = np.random.default_rng(0)
    for _ in range(20):
        shape = (int(rng.integers(10, 60)), int(rng.integers(10, 60)))
        masks = _random_masks(rng, int(rng.integers(1, 12)), shape)
        masks[0] = False  # an empty candidate is allowed
        gt = _random_masks(rng, 1, shape)[0]
        gt[0, 0] = True
        expected = [metrics.dice(m, gt) for m in masks]
        np.testing.assert_allclose(matching.dice_many(masks, gt), expected, rtol=0, atol=1e-12)


def test_oracle_and_pred_iou_choices():
    rng = np.random.default_rng(1)
    masks = _random_masks(rng, 6, (40, 50))
    gt = masks[3] | masks[4]
    # candidate 3 is the GT minus part of 4; make 5 the GT itself -> oracle must pick 5
    masks[5] = gt
    pred_iou = np.array([0.1, 0.9, 0.3, 0.2, 0.5, 0.4])
    m = matching.match(masks, pred_iou, gt)
    assert m.oracle_index == 5 and m.dices[5] == 100.0
    assert m.pred_iou_index == 1
    assert m.index("oracle_dice") == 5 and m.index("pred_iou") == 1
    assert m.rules() == ("oracle_dice", "pred_iou")


def test_ties_pick_first_index():
    gt = np.zeros((10, 10), bool)
    gt[2:5, 2:5] = True
    masks = np.stack([np.zeros_like(gt), gt, gt, gt])
    m = matching.match(masks, np.array([0.2, 0.7, 0.7, 0.1]), gt)
    assert m.oracle_index == 1 and m.pred_iou_index == 1


def test_everything_has_only_the_oracle_rule():
    gt = np.zeros((10, 10), bool)
    gt[2:5, 2:5] = True
    other = np.zeros_like(gt)
    other[6:9, 6:9] = True
    m = matching.match_everything(np.stack([other, gt]), gt)
    assert m.oracle_index == 1 and m.pred_iou_index is None
    assert m.rules() == ("oracle_dice",)
    with pytest.raises(ValueError, match="not defined"):
        m.index("pred_iou")


def test_no_candidates():
    gt = np.ones((4, 4), bool)
    m = matching.match(np.zeros((0, 4, 4), bool), np.zeros(0), gt)
    assert m.oracle_index is None and m.pred_iou_index is None and m.dices.shape == (0,)
    assert m.index("pred_iou") is None


def test_bad_input():
    gt = np.ones((4, 4), bool)
    with pytest.raises(ValueError, match="empty"):
        matching.match(np.ones((2, 4, 4), bool), None, np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="pred_masks"):
        matching.match(np.ones((2, 4, 5), bool), None, gt)
    with pytest.raises(ValueError, match="pred_iou"):
        matching.match(np.ones((2, 4, 4), bool), np.ones(3), gt)
    with pytest.raises(ValueError, match="rule"):
        matching.match(np.ones((2, 4, 4), bool), np.ones(2), gt).index("best")
