"""S1 through the fast decoder in batches (issue 22, item 3) == segment_anything's
SamAutomaticMaskGenerator from the same image: the same masks (count and order exactly; pixels
up to float32 rounding flips, at most 1 in 1e5), scores and boxes.

:func:`cosmoslib.models.everything.generate_everything` decodes the grid through
:meth:`SamFamilyModel.decode_points` (the fast decoder, a few prompts at a time, the
predicted-IoU filter before the output upscaling). The reference is the stock automatic mask
generator on the same model, which encodes the image itself and decodes with the stock
``MaskDecoder``. Compared on real images (cosmos-demo, real LiteMedSAM weights) and on a
shrunk model (a one-convolution image encoder, a stock one-block ``MaskDecoder`` with random
weights), at the paper's thresholds and at thresholds taken from the candidates' own scores
(LiteMedSAM's single-point IoU predictions stay below the paper's 0.88, so at the paper's
thresholds it keeps nothing and the comparison would have no mask to compare).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from cosmoslib import models
from cosmoslib.data import indexer, readers
from cosmoslib.models import everything, mobilesam
from cosmoslib.models.decoder import _FastMaskDecoder


class _ConvEncoder(torch.nn.Module):
    """3 x 256 x 256 -> 256 x 64 x 64 in one strided convolution (random weights)."""

    img_size = 256

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 256, kernel_size=4, stride=4)

    def forward(self, x):
        return torch.tanh(self.conv(x) / 4)


@pytest.fixture(scope="module")
def shrunk():
    """A SamFamilyModel with a tiny encoder and a stock one-block MaskDecoder (random weights,
    the decoder the fast path re-arranges), on the CPU."""
    torch.manual_seed(3)
    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                   input_image_size=(256, 256), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3,
                          iou_head_hidden_dim=64,
                          transformer=TwoWayTransformer(depth=1, embedding_dim=256, mlp_dim=256,
                                                        num_heads=8))
    sam = Sam(image_encoder=_ConvEncoder(), prompt_encoder=prompt_encoder,
              mask_decoder=decoder).eval()
    return models.SamFamilyModel(name="shrunk", arch="vit_b", sam=sam,
                                 checkpoint_path=Path("<random>"), checkpoint_sha256="",
                                 device=torch.device("cpu"), supports_points=True,
                                 default_multimask=True)


def _demo_image(demo_root, rank: int = 0) -> np.ndarray:
    """The image of the ``rank``-th largest object of cosmos-demo (one per image)."""
    manifest = indexer.index(demo_root)
    rows = manifest.sort_values(["area_px", "image_path"], ascending=[False, True])
    path = rows.drop_duplicates("image_path").iloc[rank]["image_path"]
    return readers.read_image(demo_root / path)


def _rgb(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)


def _assert_same_as_amg(model, image, params, min_masks=1):
    """generate_everything on model.encode(image) vs the stock generator on the image."""
    embedding = model.encode([image])[0]
    ours = everything.generate_everything(model, embedding, image.shape[:2], **params)
    with torch.inference_mode():
        ref = SamAutomaticMaskGenerator(model.sam, **params).generate(_rgb(image))
    assert len(ours) == len(ref) >= min_masks
    differing = compared = 0
    for i, ann in enumerate(ref):  # same order
        # Pixels: the fast decoder's logits equal the stock decoder's up to float32 rounding
        # (~1e-5 for logits of +-40), so a pixel whose logit sits within that of the threshold
        # may flip (measured on a 32 x 32 grid with 704 masks kept: 60 of ~3e7 pixels).
        differing += int((ours.mask(i) != ann["segmentation"]).sum())
        compared += ann["segmentation"].size
        assert ours.predicted_iou[i] == pytest.approx(ann["predicted_iou"], abs=1e-5)
        assert ours.stability_score[i] == pytest.approx(ann["stability_score"], abs=1e-4)
        np.testing.assert_allclose(ours.point_coords[i], ann["point_coords"][0], atol=1e-6)
        x, y, w, h = ann["bbox"]
        np.testing.assert_allclose(ours.boxes[i], [x, y, x + w, y + h], rtol=0, atol=1)
    assert differing <= 1e-5 * compared
    return ours


def _own_thresholds(model, image, points_per_side, quantile):
    """(pred_iou_thresh, stability_thresh) at a quantile of the candidates' own scores."""
    cands = everything.everything_candidates(model, model.encode([image])[0], image.shape[:2],
                                             points_per_side=points_per_side).nonempty()
    return everything.quantile_thresholds(cands.predicted_iou, cands.stability_score, quantile)


def test_litemedsam_demo_own_thresholds(litemedsam, demo_root):
    """Real weights, a real image, thresholds that keep some masks: identical to SAM's AMG."""
    image = _demo_image(demo_root)
    iou, stab = _own_thresholds(litemedsam, image, 4, 0.5)
    _assert_same_as_amg(litemedsam, image, {"points_per_side": 4, "pred_iou_thresh": iou,
                                            "stability_score_thresh": stab}, min_masks=2)


def test_litemedsam_demo_no_filter(litemedsam, demo_root):
    """Every candidate kept, NMS as the paper's: count, order and pixels as SAM's AMG."""
    image = _demo_image(demo_root, rank=1)
    _assert_same_as_amg(litemedsam, image, {"points_per_side": 3, "pred_iou_thresh": 0.0,
                                            "stability_score_thresh": 0.0}, min_masks=3)


@pytest.mark.parametrize("quantile,nms", [(0.0, 1.0), (0.7, 0.7)])
def test_shrunk_model_matches_amg(shrunk, quantile, nms):
    """A shrunk model without filters (NMS off: every candidate compared) and with filters at
    the 0.7 quantile of its own scores and the paper's NMS."""
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    if quantile == 0.0:
        params = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    else:
        iou, stab = _own_thresholds(shrunk, image, 4, quantile)
        params = {"pred_iou_thresh": iou, "stability_score_thresh": stab}
    _assert_same_as_amg(shrunk, image, {"points_per_side": 4, "box_nms_thresh": nms, **params})


def test_upscales_only_prompts_with_a_kept_mask(shrunk, monkeypatch):
    """The predicted-IoU filter runs before the output upscaling: only prompts with a mask
    above the threshold are upscaled, and the batch size changes nothing."""
    image = np.random.default_rng(1).integers(0, 256, (64, 80), dtype=np.uint8)
    embedding = shrunk.encode([image])[0]
    grid = 4
    coords = torch.as_tensor(shrunk.transform_coords(
        everything.build_point_grid(grid) * np.array([[80, 64]]), (64, 80)))
    low_all, iou_all = shrunk.predict_torch(embedding, coords[:, None].float(),
                                            torch.ones(grid * grid, 1, dtype=torch.int64),
                                            multimask=True)
    cut = float(torch.quantile(iou_all.flatten(), 0.8))
    calls = []
    upscale = _FastMaskDecoder.upscale

    def counting(self, keys, hyper):
        calls.append(keys.shape[0])
        return upscale(self, keys, hyper)

    monkeypatch.setattr(_FastMaskDecoder, "upscale", counting)
    for batch in (1, 3):
        calls.clear()
        out = list(shrunk.decode_points(embedding, coords, True, cut, batch))
        prompt = torch.cat([o[0] for o in out])
        low = torch.cat([o[1] for o in out])
        iou = torch.cat([o[2] for o in out])
        keep = iou_all > cut
        expected = torch.arange(grid * grid)[:, None].expand_as(keep)[keep]
        torch.testing.assert_close(prompt, expected, rtol=0, atol=0)
        torch.testing.assert_close(iou, iou_all[keep], rtol=0, atol=1e-6)
        torch.testing.assert_close(low, low_all[keep], rtol=0, atol=1e-4)
        assert sum(calls) == int(keep.any(dim=1).sum()) < grid * grid


def test_litemedsam_keeps_nothing_at_the_paper_thresholds_like_amg(litemedsam, demo_root):
    """The paper's thresholds (predicted IoU > 0.88, stability >= 0.95, SAM's defaults) on the
    largest demo image: LiteMedSAM, trained with boxes, keeps none of its single-point masks,
    and the batched path agrees (an 8 x 8 grid: the answer does not depend on the grid, and the
    paper's thresholds with real masks kept are checked on MobileSAM below)."""
    _assert_same_as_amg(litemedsam, _demo_image(demo_root, 0), {"points_per_side": 8}, min_masks=0)


@pytest.fixture(scope="module")
def mobile():
    """The general MobileSAM (real weights): it keeps masks at the paper's thresholds."""
    if not mobilesam.available():
        pytest.skip(f"MobileSAM weights not available in {mobilesam.source_dir()}: {mobilesam.how_to_get()}")
    return models.load_model("mobilesam", device="cpu")


@pytest.mark.slow
def test_mobilesam_paper_thresholds_across_amg_batches(mobile, demo_root):
    """The paper's thresholds with masks kept: a general SAM on a real microscopy image of
    cosmos-demo (stardist's nuclei: 18 masks kept), an 8 x 8 grid decoded in AMG batches of
    16 points (four batches, so filtering and NMS across batches are compared): the same masks,
    count, order and pixels, as SAM's AMG. (It replaces a 32 x 32 run on LiteMedSAM that kept no
    mask at all, 100 s, and then a 16 x 16 run on a CT slice that kept 8 masks in 40 s: the same
    four batches with a quarter of the decodes.)"""
    manifest = indexer.index(demo_root)
    path = sorted(manifest[manifest["task"] == "stardist_nuclei_microscopy"]["image_path"].unique())[0]
    _assert_same_as_amg(mobile, readers.read_image(demo_root / path),
                        {"points_per_side": 8, "points_per_batch": 16}, min_masks=10)
