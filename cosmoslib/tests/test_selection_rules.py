"""The two selection rules (paper 3.5): the oracle (highest DICE, Eq. 1) is never worse than the
highest predicted IoU, on candidates where the two rules really can disagree.

A one-candidate model (LiteMedSAM) makes both rules pick the same mask, so a test on it cannot
fail. Here the property is checked on constructed candidates, including ones whose highest
predicted IoU is not the best DICE, and on SAM ViT-B (random weights, three candidates per
prompt) through the runner's :func:`cosmoslib.protocol.evaluate.evaluate_image`; each test also requires
that the rules disagree somewhere, so it is not vacuous. DICE is recomputed here independently.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cosmoslib import models
from cosmoslib.protocol import evaluate, matching, prompts


def dice_pct(a: np.ndarray, b: np.ndarray) -> float:
    """DICE in percent, written here (not cosmoslib's); 100 when both are empty."""
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 100.0 if total == 0 else 200.0 * int((a & b).sum()) / total


def _square(shape, y0, x0, y1, x1) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


# --------------------------------------------------------------------------- constructed


def test_highest_predicted_iou_is_not_the_best_mask():
    """SAM-like whole / part / sub-part candidates with chosen predicted IoUs."""
    shape = (40, 40)
    gt = _square(shape, 10, 10, 30, 30)
    whole, part, sub = gt.copy(), _square(shape, 10, 10, 30, 20), _square(shape, 10, 10, 20, 20)
    masks = np.stack([whole, part, sub])
    expected = [dice_pct(m, gt) for m in masks]  # 100, 66.7, 40
    # The decoder is most confident in the part: the rules disagree, the oracle is better.
    m = matching.match(masks, np.array([0.80, 0.95, 0.60]), gt)
    assert (m.oracle_index, m.pred_iou_index) == (0, 1)
    np.testing.assert_allclose(m.dices, expected, rtol=0, atol=1e-9)
    assert m.dices[m.index("oracle_dice")] - m.dices[m.index("pred_iou")] == pytest.approx(100 - 200 / 3)
    # Confident in the sub-part: worse still.
    m = matching.match(masks, np.array([0.1, 0.2, 0.3]), gt)
    assert (m.oracle_index, m.pred_iou_index) == (0, 2) and m.dices[2] == pytest.approx(40.0)
    # Confident in the whole: the rules agree.
    m = matching.match(masks, np.array([0.9, 0.5, 0.1]), gt)
    assert m.oracle_index == m.pred_iou_index == 0


def test_oracle_is_never_worse_on_random_candidates():
    """Random candidate sets (2-6 masks near a GT, random predicted IoUs): per object, oracle
    DICE = the best candidate's DICE >= the DICE of the highest predicted IoU; and in a good
    share of the cases the two rules pick masks of different DICE."""
    rng = np.random.default_rng(0)
    n_cases, n_differ = 300, 0
    for _ in range(n_cases):
        shape = (int(rng.integers(12, 48)), int(rng.integers(12, 48)))
        y0, x0 = int(rng.integers(0, shape[0] // 2)), int(rng.integers(0, shape[1] // 2))
        gt = _square(shape, y0, x0, int(rng.integers(y0 + 2, shape[0] + 1)),
                     int(rng.integers(x0 + 2, shape[1] + 1)))
        k = int(rng.integers(2, 7))
        # Candidates: the GT shifted, cropped and salted, so DICE spreads over (0, 100].
        masks = np.stack([np.roll(gt, (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), (0, 1))
                          & (rng.random(shape) > rng.uniform(0, 0.5)) for _ in range(k)])
        pred_iou = rng.random(k)
        m = matching.match(masks, pred_iou, gt)
        dices = np.array([dice_pct(c, gt) for c in masks])
        np.testing.assert_allclose(m.dices, dices, rtol=0, atol=1e-9)
        assert m.pred_iou_index == int(np.argmax(pred_iou))
        assert dices[m.oracle_index] >= dices.max() - 1e-9
        assert dices[m.oracle_index] >= dices[m.pred_iou_index] - 1e-9
        n_differ += dices[m.oracle_index] > dices[m.pred_iou_index] + 1e-9
    assert n_differ >= n_cases // 4, n_differ  # not vacuous: the rules often disagree


# --------------------------------------------------------------------------- SAM ViT-B


def _label_and_objects(root):
    """A 120 x 160 label map with four objects of different size and shape, in COSMOS layout."""
    h, w = 120, 160
    yy, xx = np.mgrid[:h, :w]
    label = np.zeros((h, w), np.uint8)
    label[((xx - 50) / 30.0) ** 2 + ((yy - 55) / 22.0) ** 2 <= 1] = 1  # ellipse
    label[15:45, 105:150] = 2                                            # rectangle
    ring = (np.hypot(xx - 120, yy - 90) <= 20) & (np.hypot(xx - 120, yy - 90) > 10)
    label[ring] = 3                                                      # ring
    label[95:103, 20:30] = 4                                             # small square
    (root / "t" / "labels").mkdir(parents=True)
    Image.fromarray(label).save(root / "t" / "labels" / "img.png")
    objects = pd.DataFrame({"task": "t", "image_id": "img", "label_value": [1, 2, 3, 4],
                            "object": ["ellipse", "rectangle", "ring", "square"],
                            "modality": "CT", "label_path": "t/labels/img.png"})
    return label, objects


def test_oracle_is_never_worse_on_sam_vit_b(vit_b, tmp_path):
    """S2-S6 prompts on four objects, decoded by random ViT-B from a random embedding (the
    encoder plays no part in the rule), scored by the runner. Per (object, strategy) the
    oracle row's DICE >= the predicted-IoU row's; both equal an independent recomputation from
    the decoded candidates; and the rules disagree for at least one prompt."""
    assert vit_b.default_multimask
    label, objects = _label_and_objects(tmp_path)
    table = prompts.make_prompt_table(objects, tmp_path, seed=0)
    emb = torch.randn(256, 64, 64, generator=torch.Generator().manual_seed(1)).numpy()
    rows, s1 = evaluate.evaluate_image(vit_b, emb, float("nan"), label, objects, table,
                                       strategies=prompts.STRATEGIES)
    assert s1 is None
    res = pd.DataFrame(rows)
    assert len(res) == 2 * len(table) == 2 * 4 * len(prompts.STRATEGIES)
    assert (res["n_candidates"] == 3).all()
    wide = res.pivot_table(index=["label_value", "strategy"], columns="selection_rule",
                           values="dice")
    assert (wide["oracle_dice"] >= wide["pred_iou"] - 1e-9).all()
    differ = wide["oracle_dice"] > wide["pred_iou"] + 1e-9
    print(f"ViT-B (random): rules disagree for {int(differ.sum())} of {len(wide)} prompts; "
          f"mean DICE oracle {wide['oracle_dice'].mean():.1f}, pred IoU {wide['pred_iou'].mean():.1f}")
    assert differ.any()
    # Independent recomputation of both choices from the three candidates of each prompt.
    prepared = vit_b.prepare(emb)
    for prow in table.itertuples(index=False):
        decoded = vit_b.decode(prepared, prompts.prompt_from_row(prow), label.shape)
        gt = label == prow.label_value
        dices = np.array([dice_pct(m, gt) for m in decoded.masks])
        got = res[(res.label_value == prow.label_value) & (res.strategy == prow.strategy)]
        got = got.set_index("selection_rule")
        by_iou = int(np.argmax(decoded.iou_pred))
        assert got.loc["oracle_dice", "dice"] == pytest.approx(dices.max(), abs=1e-6)
        assert got.loc["pred_iou", "dice"] == pytest.approx(dices[by_iou], abs=1e-6)
        assert got.loc["pred_iou", "pred_iou"] == pytest.approx(decoded.iou_pred.max(), abs=1e-6)
