"""S1 at the paper's thresholds and at thresholds from the model's own scores (variant):
candidates decoded once, filtered twice; quantile thresholds; the per-object table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import mask_to_rle_pytorch

from cosmoslib.data import indexer, layout
from cosmoslib.models import everything
from cosmoslib.protocol import s1_thresholds
from cosmoslib.tests.test_everything import SMALL, Adapter, _embed, make_image, tiny_sam



def _candidates(masks, iou, stab, size=(40, 40)) -> everything.Candidates:
    """Constructed candidates: bool masks with the given predicted IoU and stability."""
    m = torch.as_tensor(np.asarray(masks, bool))
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
    return everything.Candidates(rles=mask_to_rle_pytorch(m), predicted_iou=np.asarray(iou, np.float32),
                                 stability_score=np.asarray(stab, np.float32), boxes=np.asarray(boxes, float),
                                 point_coords=np.zeros((len(masks), 2)), original_size=size)


def _square(y0, x0, side, size=(40, 40)):
    mask = np.zeros(size, bool)
    mask[y0:y0 + side, x0:x0 + side] = True
    return mask


def test_filter_candidates_thresholds_and_nms_on_constructed_candidates():
    a, a_dup, b, c = _square(2, 2, 10), _square(2, 3, 10), _square(20, 20, 8), _square(5, 25, 6)
    cands = _candidates([a, a_dup, b, c], iou=[0.90, 0.95, 0.88, 0.99], stab=[0.95, 0.97, 0.99, 0.94])
    paper = everything.filter_candidates(cands)  # IoU > 0.88, stability >= 0.95, NMS 0.7
    # b sits exactly at 0.88 (strict >: out), c below 0.95 (out); a_dup overlaps a (box IoU 0.83)
    # and is more confident, so NMS keeps a_dup and drops a
    assert len(paper) == 1
    np.testing.assert_array_equal(paper.masks[0], a_dup)
    assert paper.predicted_iou[0] == pytest.approx(0.95) and paper.params["pred_iou_thresh"] == 0.88
    loose = everything.filter_candidates(cands, 0.0, 0.0, box_nms_thresh=1.0)  # nothing filtered
    assert len(loose) == 4 and list(loose.predicted_iou) == sorted(loose.predicted_iou, reverse=True)
    stab_at = everything.filter_candidates(cands, 0.0, 0.99, box_nms_thresh=1.0)  # >=: b kept at 0.99
    assert len(stab_at) == 1 and np.array_equal(stab_at.masks[0], b)
    none = everything.filter_candidates(cands, 0.995, 0.0)
    assert len(none) == 0 and none.masks.shape == (0, 40, 40)


def test_quantile_thresholds_known_values_and_bad_input():
    iou = np.linspace(0.0, 1.0, 11)
    stab = np.linspace(0.5, 1.0, 11)
    t_iou, t_stab = everything.quantile_thresholds(iou, stab, 0.9)
    assert t_iou == pytest.approx(0.9) and t_stab == pytest.approx(0.95)
    assert everything.quantile_thresholds([0.2, 0.4], [0.6, 0.8], 0.5) == pytest.approx((0.3, 0.7))
    for bad in (dict(predicted_iou=[], stability_score=[]), dict(predicted_iou=[np.nan], stability_score=[1.0])):
        with pytest.raises(ValueError):
            everything.quantile_thresholds(**bad)
    with pytest.raises(ValueError, match="quantile"):
        everything.quantile_thresholds(iou, stab, 1.0)


@pytest.fixture(scope="module")
def setup():
    sam = tiny_sam(**SMALL)
    image = make_image()
    return sam, Adapter(sam), image, _embed(sam, image)


def test_candidates_filtered_equal_generate_everything_and_sam(setup):
    """One decoding pass filtered at any thresholds == generate_everything at those thresholds,
    and == segment_anything's SamAutomaticMaskGenerator (an independent implementation)."""
    sam, model, image, embedding = setup
    cands = everything.everything_candidates(model, embedding, image.shape[:2], points_per_side=8)
    assert len(cands) == 3 * 64
    q_iou, q_stab = everything.quantile_thresholds(cands.predicted_iou, cands.stability_score, 0.6)
    for t_iou, t_stab in ((0.0, 0.0), (q_iou, 0.0), (0.0, q_stab), (q_iou, q_stab), (0.88, 0.95)):
        ours = everything.filter_candidates(cands, t_iou, t_stab)
        ref = everything.generate_everything(model, embedding, image.shape[:2], points_per_side=8,
                                             pred_iou_thresh=t_iou, stability_score_thresh=t_stab)
        assert len(ours) == len(ref)
        np.testing.assert_array_equal(ours.masks, ref.masks)
        np.testing.assert_allclose(ours.predicted_iou, ref.predicted_iou, atol=1e-6)
        np.testing.assert_allclose(ours.stability_score, ref.stability_score, atol=1e-6)
        sam_ref = SamAutomaticMaskGenerator(sam, points_per_side=8, pred_iou_thresh=t_iou,
                                            stability_score_thresh=t_stab).generate(image)
        assert len(sam_ref) == len(ours)
    # the quantile variant keeps some masks, fewer than no filter at all
    assert 0 < len(everything.filter_candidates(cands, q_iou, q_stab)) < len(everything.filter_candidates(cands, 0, 0))


# ----------------------------------------------------------------------------- the per-object table


class _Cache:
    """Stand-in embedding cache: the table only passes the embedding on to everything_candidates."""

    def __init__(self, *a, **k):
        pass

    def get(self, image):
        return np.zeros((1,))


@pytest.fixture()
def two_images(tmp_path, monkeypatch):
    """Two images with one square object each; candidates constructed per image (no model):
    image a: the object's exact mask with low scores, a far mask with high ones;
    image b: the object's mask with middling scores and a distractor."""
    root = tmp_path / "root"
    obj = {"a": _square(4, 4, 12), "b": _square(20, 18, 10)}
    for name, mask in obj.items():
        layout.write_pair(root, "t", name, (mask * 200 + 20).astype(np.uint8), mask.astype(np.uint8))
    layout.write_task(root, "t", {1: "Square"}, dataset="t", modality="CT")
    cands = {
        "a": _candidates([obj["a"], _square(30, 30, 6)], iou=[0.50, 0.70], stab=[0.80, 0.90]),
        "b": _candidates([obj["b"], _square(0, 30, 5)], iou=[0.60, 0.40], stab=[0.85, 0.70]),
    }
    seen = []

    def fake(model, embedding, size, points_per_side=32, **k):
        image_id = ["a", "b"][len(seen) % 2]
        seen.append(image_id)
        return cands[image_id]

    monkeypatch.setattr(s1_thresholds.cache_mod, "EmbeddingCache", _Cache)
    monkeypatch.setattr(everything, "everything_candidates", fake)
    return root, indexer.index(root)


class _Model:
    name = "toy"


def test_table_paper_keeps_nothing_variant_pools_over_the_run(two_images):
    root, manifest = two_images
    table = s1_thresholds.s1_threshold_table(manifest, root, _Model(), 4, quantile=0.5, scope="run", progress=False)
    assert len(table) == 4 and set(table["thresholds"]) == {s1_thresholds.PAPER, s1_thresholds.variant_label(0.5)}
    paper = table[table["thresholds"] == s1_thresholds.PAPER].set_index("image_id")
    # every score is below 0.88: the paper's filters keep no mask, both objects score 0 (empty)
    assert (paper["dice"] == 0).all() and paper["empty_pred"].all() and (paper["n_masks"] == 0).all()
    var = table[table["thresholds"] != s1_thresholds.PAPER].set_index("image_id")
    # pooled over both images: IoU median of (0.5, 0.7, 0.6, 0.4) = 0.55, stability median 0.825
    assert var["pred_iou_thresh"].tolist() == pytest.approx([0.55, 0.55])
    assert var["stability_thresh"].tolist() == pytest.approx([0.825, 0.825])
    # image a: its object's mask (0.50) falls below the pooled IoU threshold, only the far mask stays
    assert var.loc["a", "dice"] == 0 and var.loc["a", "n_masks"] == 1 and not var.loc["a", "empty_pred"]
    # image b: the object's mask passes (0.60 > 0.55, 0.85 >= 0.825) and is matched exactly
    assert var.loc["b", "dice"] == pytest.approx(100.0) and var.loc["b", "n_masks"] == 1
    means = s1_thresholds.threshold_means(table)
    assert means.loc[("toy", 4, s1_thresholds.PAPER), "dice"] == 0
    assert means.loc[("toy", 4, s1_thresholds.variant_label(0.5)), "dice"] == pytest.approx(50.0)


def test_table_per_image_scope_uses_each_image_own_scores(two_images):
    root, manifest = two_images
    table = s1_thresholds.s1_threshold_table(manifest, root, _Model(), 4, quantile=0.5, scope="image",
                                             progress=False)
    var = table[table["thresholds"] == s1_thresholds.variant_label(0.5, "image")].set_index("image_id")
    assert var.loc["a", "pred_iou_thresh"] == pytest.approx(0.60) and var.loc["b", "pred_iou_thresh"] == pytest.approx(0.50)
    # b: median IoU 0.5 keeps its object's mask (0.6), stability median 0.775 too: DICE 100
    assert var.loc["b", "dice"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="scope"):
        s1_thresholds.s1_threshold_table(manifest, root, _Model(), 4, scope="book", progress=False)


def test_empty_candidates_never_enter_the_variant(tmp_path, monkeypatch):
    """Empty masks (stability 0) are left out of the pool; a pool of empty masks keeps nothing, says so."""
    root = tmp_path / "root"
    mask = _square(4, 4, 12)
    layout.write_pair(root, "t", "a", (mask * 200 + 20).astype(np.uint8), mask.astype(np.uint8))
    layout.write_task(root, "t", {1: "Square"}, dataset="t", modality="CT")
    full = _candidates([mask, _square(30, 30, 5)], iou=[0.5, 0.6], stab=[0.9, 0.9])
    cands = everything.Candidates(rles=full.rles + mask_to_rle_pytorch(torch.zeros(3, 40, 40, dtype=torch.bool)),
                                  predicted_iou=np.r_[full.predicted_iou, [0.1, 0.1, 0.1]].astype(np.float32),
                                  stability_score=np.r_[full.stability_score, [0, 0, 0]].astype(np.float32),
                                  boxes=np.r_[full.boxes, np.zeros((3, 4))], point_coords=np.zeros((5, 2)),
                                  original_size=(40, 40))
    assert len(cands.nonempty()) == 2 and list(cands.areas) == [144, 25, 0, 0, 0]
    monkeypatch.setattr(s1_thresholds.cache_mod, "EmbeddingCache", _Cache)
    monkeypatch.setattr(everything, "everything_candidates", lambda *a, **k: cands)
    table = s1_thresholds.s1_threshold_table(indexer.index(root), root, _Model(), 4, quantile=0.5, progress=False)
    var = table[table["thresholds"] == s1_thresholds.variant_label(0.5)].iloc[0]
    # quantiles of the two non-empty candidates only (with the empty ones they would be 0.1 and 0)
    assert var["pred_iou_thresh"] == pytest.approx(0.55) and var["stability_thresh"] == pytest.approx(0.9)
    assert var["n_masks"] == 1 and var["dice"] == 0  # the far square: IoU 0.6 > 0.55
    only_empty = everything.Candidates(rles=cands.rles[2:], predicted_iou=cands.predicted_iou[2:],
                                       stability_score=cands.stability_score[2:], boxes=cands.boxes[2:],
                                       point_coords=cands.point_coords[2:], original_size=(40, 40))
    monkeypatch.setattr(everything, "everything_candidates", lambda *a, **k: only_empty)
    table = s1_thresholds.s1_threshold_table(indexer.index(root), root, _Model(), 4, quantile=0.5, progress=False)
    var = table[table["thresholds"] == s1_thresholds.variant_label(0.5)].iloc[0]
    assert np.isnan(var["pred_iou_thresh"]) and "no non-empty candidate" in var["note"]
    assert var["n_masks"] == 0 and var["dice"] == 0 and var["empty_pred"]
