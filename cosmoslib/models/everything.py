"""The automatic *Everything* mode S1, run on a cached image embedding (paper 3.2, 4.7).

SAM segments "everything" by prompting the mask decoder with every point of an ``m x m`` grid
over the image, then keeps the confident, stable, non-duplicate masks (predicted-IoU threshold,
stability score under a jitter of the binarisation threshold, box non-maximum suppression).

:class:`segment_anything.SamAutomaticMaskGenerator` does this but always re-encodes the image
(``predictor.set_image``). :func:`generate_everything` is the same logic for the single-crop
case (``crop_n_layers=0``), starting from an embedding that was computed once and cached
(paper 3.4), and going through the model adapter (:class:`cosmoslib.models.SamFamilyModel`), so
every SAM-family model works. The helpers of :mod:`segment_anything.utils.amg` are used as is
(grid, batching, stability score, boxes, RLE, ``MaskData``); only the loop is re-written.

Differences from ``SamAutomaticMaskGenerator`` (none changes the output):

* the predicted-IoU filter runs on the decoder's low-resolution output, *before* the masks are
  upsampled to the original size, and the survivors are upsampled in chunks of bounded memory
  (upsampling is per mask, so the result is identical and large ``m`` / images fit in memory);
* the "box near the crop edge" filter is left out: with one crop equal to the whole image it
  never removes anything (``is_box_near_crop_edge`` excludes boxes near the image edge);
* masks are kept as uncompressed RLE until the end, as SAM does; :attr:`EverythingResult.masks`
  decodes them on demand.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import (
    MaskData,
    area_from_rle,
    batch_iterator,
    batched_mask_to_box,
    build_point_grid,
    calculate_stability_score,
    mask_to_rle_pytorch,
    rle_to_mask,
)
from torchvision.ops.boxes import batched_nms
from tqdm.auto import tqdm

#: SAM's defaults (ViT-H automatic mask generator), used by the paper.
DEFAULTS = {
    "points_per_side": 32,
    "points_per_batch": 64,
    "pred_iou_thresh": 0.88,
    "stability_score_thresh": 0.95,
    "stability_score_offset": 1.0,
    "box_nms_thresh": 0.7,
    "min_mask_region_area": 0,
}

# SamAutomaticMaskGenerator's crop_nms_thresh default; with one crop it only matters as the
# NMS threshold after min_mask_region_area post-processing (max(box_nms_thresh, this)).
_CROP_NMS_THRESH = 0.7

# Upper bound on the float32 logits held at the original resolution at once (bytes).
_UPSAMPLE_BUDGET = 256 * 2**20


@dataclass
class EverythingResult:
    """The masks SAM finds in one image without prompts, after filtering.

    Attributes
    ----------
    rles : list of dict
        Each mask as SAM's uncompressed RLE (``{"size": [H, W], "counts": [...]}``), in the
        order of decreasing predicted IoU left by the NMS.
    predicted_iou : (K,) float32, the decoder's quality estimate of each mask.
    stability_score : (K,) float32, IoU of the masks binarised at ``threshold +- offset``.
    boxes : (K, 4) float, ``[x0, y0, x1, y1]`` (inclusive pixel indices) of each mask.
    point_coords : (K, 2) float, the grid point (x, y) in original pixels that produced it.
    original_size : (H, W).
    params : the settings used (points_per_side, thresholds, ...).
    """

    rles: list
    predicted_iou: np.ndarray
    stability_score: np.ndarray
    boxes: np.ndarray
    point_coords: np.ndarray
    original_size: tuple[int, int]
    params: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rles)

    def mask(self, i: int) -> np.ndarray:
        """Mask ``i`` as a bool ``(H, W)`` array."""
        return rle_to_mask(self.rles[i])

    @functools.cached_property
    def masks(self) -> np.ndarray:
        """All masks as one bool ``(K, H, W)`` array (decoded once, then cached; K may be 0)."""
        h, w = self.original_size
        out = np.zeros((len(self.rles), h, w), dtype=bool)
        for i in range(len(self.rles)):
            out[i] = self.mask(i)
        return out

    @property
    def areas(self) -> np.ndarray:
        """(K,) int, pixel count of every mask (from the RLE, no decoding)."""
        return np.array([area_from_rle(r) for r in self.rles], dtype=np.int64)


def _as_embedding(embedding, model):
    sam = getattr(model, "sam", None)
    dtype = next(sam.mask_decoder.parameters()).dtype if sam is not None else torch.float32
    emb = torch.as_tensor(np.asarray(embedding) if not torch.is_tensor(embedding) else embedding)
    if emb.ndim == 3:
        emb = emb[None]
    if emb.ndim != 4 or emb.shape[0] != 1:
        raise ValueError(f"embedding must be (C, h, w) or (1, C, h, w); got {tuple(emb.shape)}")
    return emb.to(device=model.device, dtype=dtype)


def generate_everything(
    model,
    embedding,
    original_size: tuple[int, int],
    points_per_side: int = DEFAULTS["points_per_side"],
    points_per_batch: int = DEFAULTS["points_per_batch"],
    pred_iou_thresh: float = DEFAULTS["pred_iou_thresh"],
    stability_score_thresh: float = DEFAULTS["stability_score_thresh"],
    stability_score_offset: float = DEFAULTS["stability_score_offset"],
    box_nms_thresh: float = DEFAULTS["box_nms_thresh"],
    min_mask_region_area: int = DEFAULTS["min_mask_region_area"],
    progress: bool = False,
) -> EverythingResult:
    """S1: all masks SAM proposes for an image, from its cached embedding.

    Parameters
    ----------
    model : SamFamilyModel
        Needs ``transform_coords``, ``predict_torch``, ``postprocess_masks``, ``mask_threshold``
        and ``device`` (see :mod:`cosmoslib.models`).
    embedding : (C, h, w) or (1, C, h, w) array or tensor
        The image embedding (e.g. (256, 64, 64)); cast to the mask decoder's dtype (so a float16
        cache works with a float32 model).
    original_size : (H, W) of the image in pixels.
    points_per_side : m, the grid has m x m points (paper 4.7 uses 8 .. 256).
    points_per_batch : grid points decoded together (memory vs speed; no effect on results).
    pred_iou_thresh : keep masks with predicted IoU ``>`` this (0 disables the filter).
    stability_score_thresh : keep masks with stability ``>=`` this (0 disables the filter).
    stability_score_offset : logit offset of the stability jitter.
    box_nms_thresh : box IoU above which the less confident mask is dropped.
    min_mask_region_area : if > 0, remove holes and islands smaller than this (pixels) and re-run
        NMS, as SAM does (needs OpenCV).
    progress : show a tqdm bar over the batches.

    Returns
    -------
    EverythingResult
        Possibly empty (``len(result) == 0``) when no mask passes the filters.
    """
    if int(points_per_side) < 1 or int(points_per_batch) < 1:
        raise ValueError("points_per_side and points_per_batch must be positive")
    orig_h, orig_w = (int(v) for v in original_size)
    device = model.device
    emb = _as_embedding(embedding, model)
    threshold = float(model.mask_threshold)
    chunk = max(1, _UPSAMPLE_BUDGET // (4 * orig_h * orig_w))

    # Grid points in original pixels, (x, y): x scaled by the width, y by the height.
    points = build_point_grid(int(points_per_side)) * np.array([[orig_w, orig_h]])
    n_batches = -(-len(points) // int(points_per_batch))
    data = MaskData()
    with torch.inference_mode():
        batches = batch_iterator(int(points_per_batch), points)
        for (batch,) in tqdm(batches, total=n_batches, desc="everything", unit="batch",
                             disable=not progress, leave=False):
            coords = torch.as_tensor(model.transform_coords(batch, (orig_h, orig_w)), device=device)
            labels = torch.ones(coords.shape[0], dtype=torch.int, device=device)
            # (emb, point_coords, point_labels, boxes, mask_input, multimask)
            low_res, iou_pred = model.predict_torch(
                emb, coords[:, None, :], labels[:, None], None, None, True
            )
            k = low_res.shape[1]
            low_res = low_res.flatten(0, 1)  # (B*k, 256, 256)
            iou_pred = iou_pred.flatten(0, 1)
            pts = torch.as_tensor(np.repeat(batch, k, axis=0))
            if pred_iou_thresh > 0.0:
                keep = iou_pred > pred_iou_thresh
                low_res, iou_pred, pts = low_res[keep], iou_pred[keep], pts[keep.cpu()]
            for start in range(0, low_res.shape[0], chunk):
                logits = model.postprocess_masks(low_res[start : start + chunk, None], (orig_h, orig_w))[:, 0]
                part = MaskData(
                    masks=logits,
                    iou_preds=iou_pred[start : start + chunk],
                    points=pts[start : start + chunk],
                )
                part["stability_score"] = calculate_stability_score(
                    part["masks"], threshold, stability_score_offset
                )
                if stability_score_thresh > 0.0:
                    part.filter(part["stability_score"] >= stability_score_thresh)
                part["masks"] = part["masks"] > threshold
                part["boxes"] = batched_mask_to_box(part["masks"])
                part["rles"] = mask_to_rle_pytorch(part["masks"])
                del part["masks"]
                data.cat(part)
                del logits, part

    if len(data.items()) == 0 or len(data["rles"]) == 0:
        result = _empty(orig_h, orig_w)
    else:
        keep = batched_nms(
            data["boxes"].float(),
            data["iou_preds"].float(),
            torch.zeros(len(data["boxes"]), device=data["boxes"].device),
            iou_threshold=box_nms_thresh,
        )
        data.filter(keep)
        data.to_numpy()
        if min_mask_region_area > 0:
            data = SamAutomaticMaskGenerator.postprocess_small_regions(
                data, int(min_mask_region_area), max(box_nms_thresh, _CROP_NMS_THRESH)
            )
        result = EverythingResult(
            rles=list(data["rles"]),
            predicted_iou=np.asarray(data["iou_preds"], dtype=np.float32),
            stability_score=np.asarray(data["stability_score"], dtype=np.float32),
            boxes=np.asarray(data["boxes"], dtype=np.float64).reshape(-1, 4),
            point_coords=np.asarray(data["points"], dtype=np.float64).reshape(-1, 2),
            original_size=(orig_h, orig_w),
        )
    result.params = {
        "points_per_side": int(points_per_side),
        "points_per_batch": int(points_per_batch),
        "pred_iou_thresh": float(pred_iou_thresh),
        "stability_score_thresh": float(stability_score_thresh),
        "stability_score_offset": float(stability_score_offset),
        "box_nms_thresh": float(box_nms_thresh),
        "min_mask_region_area": int(min_mask_region_area),
    }
    return result


def _empty(h: int, w: int) -> EverythingResult:
    return EverythingResult(
        rles=[],
        predicted_iou=np.zeros(0, np.float32),
        stability_score=np.zeros(0, np.float32),
        boxes=np.zeros((0, 4)),
        point_coords=np.zeros((0, 2)),
        original_size=(h, w),
    )
