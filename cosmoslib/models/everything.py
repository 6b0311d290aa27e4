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

* the grid goes through :meth:`cosmoslib.models.SamFamilyModel.decode_points`: the fast
  decoder (:mod:`cosmoslib.models.decoder`) a few prompts at a time, with the predicted-IoU
  filter applied on the IoU head's output *before* the decoder's output upscaling, so a mask
  that fails it is never computed at all (a mask is its own hypernetwork vector times the
  prompt's upscaled features: the kept masks are those of the full decode). The survivors are
  upsampled to the original size in chunks of bounded memory and filtered on stability there,
  all on tensors (no per-mask Python); large ``m`` / images fit in memory. The masks are
  SAM's in count and order; their pixels are SAM's up to the fast decoder's float32 rounding
  (logits within ~1e-5 of the stock decoder's: on a 32 x 32 grid of LiteMedSAM with 704 masks
  kept, 60 of ~3e7 pixels flipped; ``cosmoslib/tests/test_everything_batched.py``). Measured
  (``benchmarks/strategies.py --s1``, 32 x 32, paper thresholds, LiteMedSAM, one shared
  2-core machine at load ~1.7): 10.4x ``SamAutomaticMaskGenerator.generate`` at 1 thread,
  9.2x at 2 threads; with thresholds 0.15 / 0 that keep 704 masks 6.8x and 7.2x;
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

# Grid points through the fast decoder's transformer together, per device type (an upper bound
# on ``points_per_batch``): on a CPU a few prompts' (4096, 256) image tokens stay in cache
# (measured, LiteMedSAM, 1 thread: 4 prompts 15 ms each, 16 prompts 29 ms each).
_FAST_POINTS_PER_BATCH = {"cpu": 4}


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
    decoder = getattr(getattr(model, "sam", None), "mask_decoder", None)  # SAM 2: sam_mask_decoder
    dtype = next(decoder.parameters()).dtype if decoder is not None else torch.float32
    emb = torch.as_tensor(np.asarray(embedding) if not torch.is_tensor(embedding) else embedding)
    if emb.ndim == 3:
        emb = emb[None]
    if emb.ndim != 4 or emb.shape[0] != 1:
        raise ValueError(f"embedding must be (C, h, w) or (1, C, h, w); got {tuple(emb.shape)}")
    return emb.to(device=model.device, dtype=dtype)


def _points_fallback(model, embedding, coords, multimask, min_iou, batch):
    """:meth:`SamFamilyModel.decode_points` for a model without it (``predict_torch`` only)."""
    labels = torch.ones(len(coords), 1, dtype=torch.int, device=coords.device)
    for start in range(0, len(coords), batch):
        stop = min(start + batch, len(coords))
        low, iou = model.predict_torch(embedding, coords[start:stop, None], labels[start:stop],
                                       None, None, multimask)
        keep = iou > min_iou if min_iou is not None else torch.ones_like(iou, dtype=torch.bool)
        index = torch.arange(start, stop, device=coords.device)[:, None].expand_as(keep)
        if bool(keep.any()):
            yield index[keep], low[keep], iou[keep]


def _decode_grid(model, embedding, original_size, points_per_side, points_per_batch,
                 stability_score_offset, pred_iou_thresh, stability_score_thresh, progress, desc):
    """Decode the point grid; the candidates passing both thresholds (0 disables one), as
    ``MaskData`` with ``rles, iou_preds, stability_score, boxes, points`` (original pixels).

    The predicted-IoU filter runs before any upscaling (with the fast decoder, before the
    decoder's own output upscaling: :meth:`SamFamilyModel.decode_points`); the masks that pass
    are upsampled to the original size in chunks and filtered on stability there, all on
    tensors. Candidates keep SAM's order (grid point, then decoder output).
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
    coords = torch.as_tensor(model.transform_coords(points, (orig_h, orig_w)), device=device)
    points = torch.as_tensor(points)
    min_iou = float(pred_iou_thresh) if pred_iou_thresh > 0.0 else None
    if hasattr(model, "decode_points"):
        batch = min(int(points_per_batch), _FAST_POINTS_PER_BATCH.get(device.type, 64))
        decoded = model.decode_points(emb, coords, True, min_iou, batch)
    else:
        decoded = _points_fallback(model, emb, coords, True, min_iou, int(points_per_batch))
    parts = []
    with torch.inference_mode():
        for prompt, low_res, iou_pred in tqdm(decoded, desc=desc, unit="batch",
                                              disable=not progress, leave=False):
            for start in range(0, low_res.shape[0], chunk):
                logits = model.postprocess_masks(low_res[start:start + chunk, None],
                                                 (orig_h, orig_w))[:, 0]
                part = MaskData(masks=logits, iou_preds=iou_pred[start:start + chunk],
                                points=points[prompt[start:start + chunk].cpu()])
                part["stability_score"] = calculate_stability_score(
                    part["masks"], threshold, stability_score_offset)
                if stability_score_thresh > 0.0:
                    part.filter(part["stability_score"] >= stability_score_thresh)
                part["masks"] = part["masks"] > threshold
                part["boxes"] = batched_mask_to_box(part["masks"])
                part["rles"] = mask_to_rle_pytorch(part["masks"])
                del part["masks"]
                parts.append(part)
                del logits
    data = MaskData()
    for part in parts:
        data.cat(part)
    return data


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
    orig_h, orig_w = (int(v) for v in original_size)
    data = _decode_grid(model, embedding, (orig_h, orig_w), points_per_side, points_per_batch,
                        stability_score_offset, pred_iou_thresh, stability_score_thresh,
                        progress, "everything")

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


# ----------------------------------------------------------------------------- thresholds from the model itself
#
# A variant of S1, shown beside the paper's (predicted IoU > 0.88, stability >= 0.95): the same
# candidates filtered at thresholds taken from the model's *own* distribution of predicted IoU and
# stability. A model whose IoU head was never trained for point prompts (LiteMedSAM: boxes only)
# may never reach 0.88, so the paper's filters keep nothing and S1 scores 0 whatever the masks;
# the variant asks what the Everything mode finds when the filters keep the model's most
# confident candidates instead.

#: Default quantile of the variant: keep candidates above the 0.9 quantile of the pooled
#: predicted IoU and at or above the 0.9 quantile of the pooled stability score.
VARIANT_QUANTILE = 0.9


@dataclass
class Candidates(EverythingResult):
    """Every mask the decoder proposes for one image's grid, before any filter.

    The S1 loop of :func:`generate_everything` without its predicted-IoU and stability filters
    and without NMS; :func:`filter_candidates` applies them afterwards, so one decoding pass
    serves several threshold settings.

    Attributes
    ----------
    rles : list of dict
        Each candidate as SAM's uncompressed RLE, in decoding order (grid point, then output).
    predicted_iou, stability_score : (N,) float32
        The decoder's quality estimate and the stability score (IoU of the masks binarised at
        ``threshold +- offset``), of every candidate.
    boxes : (N, 4) float, ``[x0, y0, x1, y1]`` of each candidate (inclusive pixel indices).
    point_coords : (N, 2) float, the grid point (x, y) in original pixels.
    original_size : (H, W).
    params : the settings used (points_per_side, stability offset, ...).

    Fields, ``mask``, ``masks`` and ``areas`` come from :class:`EverythingResult`.
    """

    def nonempty(self) -> "Candidates":
        """The candidates whose mask has at least one pixel (in the same order).

        An empty candidate (every logit below the mask threshold) has stability 0 or NaN and is
        no segmentation; the paper's stability filter never keeps it, and the own-score variant
        leaves it out of its pool and of what it keeps.
        """
        idx = np.flatnonzero(self.areas > 0)
        return Candidates(rles=[self.rles[i] for i in idx], predicted_iou=self.predicted_iou[idx],
                          stability_score=self.stability_score[idx], boxes=self.boxes[idx].reshape(-1, 4),
                          point_coords=self.point_coords[idx].reshape(-1, 2), original_size=self.original_size,
                          params=dict(self.params))


def everything_candidates(
    model,
    embedding,
    original_size: tuple[int, int],
    points_per_side: int = DEFAULTS["points_per_side"],
    points_per_batch: int = DEFAULTS["points_per_batch"],
    stability_score_offset: float = DEFAULTS["stability_score_offset"],
    progress: bool = False,
) -> Candidates:
    """All S1 candidates of an image (no threshold, no NMS), from its cached embedding.

    Parameters are those of :func:`generate_everything`. Every candidate is upsampled to the
    original size (the paper-threshold path upsamples only those above the predicted-IoU
    threshold), so this costs somewhat more per grid point; the decoder pass is the same.

    Returns
    -------
    Candidates
        ``3 * points_per_side ** 2`` candidates for a multimask decoder (every output kept).
    """
    orig_h, orig_w = (int(v) for v in original_size)
    data = _decode_grid(model, embedding, (orig_h, orig_w), points_per_side, points_per_batch,
                        stability_score_offset, 0.0, 0.0, progress, "candidates")
    data.to_numpy()
    return Candidates(
        rles=list(data["rles"]),
        predicted_iou=np.asarray(data["iou_preds"], dtype=np.float32).reshape(-1),
        stability_score=np.asarray(data["stability_score"], dtype=np.float32).reshape(-1),
        boxes=np.asarray(data["boxes"], dtype=np.float64).reshape(-1, 4),
        point_coords=np.asarray(data["points"], dtype=np.float64).reshape(-1, 2),
        original_size=(orig_h, orig_w),
        params={"points_per_side": int(points_per_side), "points_per_batch": int(points_per_batch),
                "stability_score_offset": float(stability_score_offset)},
    )


def filter_candidates(
    candidates: Candidates,
    pred_iou_thresh: float = DEFAULTS["pred_iou_thresh"],
    stability_score_thresh: float = DEFAULTS["stability_score_thresh"],
    box_nms_thresh: float = DEFAULTS["box_nms_thresh"],
) -> EverythingResult:
    """SAM's S1 filters applied to :class:`Candidates`: the masks :func:`generate_everything` keeps.

    Keeps candidates with predicted IoU ``>`` ``pred_iou_thresh`` (0 disables) and stability
    ``>=`` ``stability_score_thresh`` (0 disables), then box NMS at ``box_nms_thresh`` by
    predicted IoU -- the order and comparisons of :func:`generate_everything` (without
    ``min_mask_region_area``), so at the same thresholds both give the same masks.

    Returns
    -------
    EverythingResult
        Empty when nothing passes; ``params`` records the thresholds used.
    """
    h, w = candidates.original_size
    keep = np.ones(len(candidates), dtype=bool)
    if pred_iou_thresh > 0.0:
        keep &= candidates.predicted_iou > np.float32(pred_iou_thresh)
    if stability_score_thresh > 0.0:
        keep &= candidates.stability_score >= np.float32(stability_score_thresh)
    idx = np.flatnonzero(keep)
    if len(idx) == 0:
        result = _empty(h, w)
    else:
        order = batched_nms(torch.as_tensor(candidates.boxes[idx]).float(),
                            torch.as_tensor(candidates.predicted_iou[idx]).float(),
                            torch.zeros(len(idx)), iou_threshold=box_nms_thresh).numpy()
        idx = idx[order]
        result = EverythingResult(
            rles=[candidates.rles[i] for i in idx],
            predicted_iou=candidates.predicted_iou[idx].astype(np.float32),
            stability_score=candidates.stability_score[idx].astype(np.float32),
            boxes=candidates.boxes[idx].astype(np.float64).reshape(-1, 4),
            point_coords=candidates.point_coords[idx].astype(np.float64).reshape(-1, 2),
            original_size=(h, w),
        )
    result.params = dict(candidates.params, pred_iou_thresh=float(pred_iou_thresh),
                         stability_score_thresh=float(stability_score_thresh),
                         box_nms_thresh=float(box_nms_thresh), min_mask_region_area=0)
    return result


def quantile_thresholds(predicted_iou, stability_score, quantile: float = VARIANT_QUANTILE) -> tuple[float, float]:
    """The variant's thresholds: the ``quantile`` of the model's own predicted IoU and stability.

    Parameters
    ----------
    predicted_iou, stability_score : array-like of float
        The scores of the pooled candidates (e.g. every candidate of a run, or of one image;
        :class:`Candidates`), unitless in [0, 1].
    quantile : float in [0, 1)
        ``0.9`` keeps roughly the top 10 % by predicted IoU (strictly above its threshold, as SAM
        compares) and by stability (at or above) -- fewer after both, then NMS.

    Returns
    -------
    (pred_iou_thresh, stability_score_thresh) : floats for :func:`filter_candidates`
        (``numpy.quantile``, linear interpolation).

    Raises
    ------
    ValueError
        No candidates, a non-finite score, or ``quantile`` outside [0, 1).
    """
    if not 0.0 <= float(quantile) < 1.0:
        raise ValueError(f"quantile must be in [0, 1), got {quantile!r}")
    iou = np.asarray(predicted_iou, dtype=np.float64).reshape(-1)
    stab = np.asarray(stability_score, dtype=np.float64).reshape(-1)
    if iou.size == 0 or stab.size == 0:
        raise ValueError("no candidates to take thresholds from")
    if not (np.isfinite(iou).all() and np.isfinite(stab).all()):
        raise ValueError("predicted IoU and stability scores must be finite")
    return float(np.quantile(iou, quantile)), float(np.quantile(stab, quantile))
