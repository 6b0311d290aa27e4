"""Multi-round interactive segmentation with simulated clicks (paper 4.11, Fig. 16).

A *click simulator* plays the user: it looks at the current prediction and the GT mask and
clicks where the prediction is most wrong; a *segmenter* turns the clicks so far into a mask.
Any method can be plugged in through :class:`InteractiveSegmenter` (one method,
``segment(image, clicks, previous)``); SAM-family models (:class:`SamSegmenter`), OpenCV's
GrabCut (:class:`GrabCutSegmenter`) and scikit-image's random walker
(:class:`RandomWalkerSegmenter`) are provided, so all methods see the same clicks.

The click rule (the paper's, made exact)
----------------------------------------
* Click 1 is the S2 point of :mod:`cosmoslib.protocol.prompts` (the GT centre of mass when it lies in
  the object, else the first "even" sample; always an object pixel), label 1 (positive).
* Each following click goes into the **largest error region** of the current prediction: the
  false-negative pixels (GT and not predicted) and the false-positive pixels (predicted, not
  GT) are split into 4-connected components (``scipy.ndimage.label``'s default; two error
  pixels touching only at a corner are separate regions), and the component with the most
  pixels is chosen. A false-negative region gives a **positive** click (label 1), a
  false-positive region a **negative** click (label 0). Ties in area go to the
  false-negative region, then to the component whose first pixel comes first in row-major
  order.
* Inside that region the click is at the pixel **farthest from the region's boundary**
  (``scipy.ndimage.distance_transform_edt``), computed on the region padded with one pixel
  of background, so the **image border counts as boundary**: a user clicks in the middle of
  the wrong area they see, not on the image edge, also when the object is cut by the edge
  (this is also how the RITM / FocalClick / SimpleClick evaluation code pads). Ties go to the
  first pixel in row-major order.
* So every click lands on a pixel that the current prediction has wrong (click 1: before
  any prediction, every object pixel is wrong), and its label is the GT value there.
* Rounds go on up to ``max_clicks`` (:data:`MAX_CLICKS` = 10, as in Fig. 16) and stop early
  when the prediction equals the GT (no error pixel left). A segmenter that ignores a click
  may be clicked at the same pixel again.

DICE is :func:`cosmoslib.protocol.metrics.dice`, in percent. The number of clicks needed to reach a
DICE threshold (NoC@80, NoC@90; the interactive-segmentation field's standard measure) is
:func:`noc`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, Sequence, runtime_checkable

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.segmentation import random_walker
from tqdm.auto import tqdm

from cosmoslib import paths
from cosmoslib.data import readers
from cosmoslib.masks import object_mask
from cosmoslib.models import cache as cache_mod
from cosmoslib.protocol import metrics
from cosmoslib.protocol.prompts import Prompt, make_prompt

#: Clicks per object in Fig. 16 (and the cap of NoC).
MAX_CLICKS = 10
#: DICE thresholds (%) of NoC@80 and NoC@90.
NOC_THRESHOLDS = (80.0, 90.0)
#: Radius (pixels) of the seed disk painted around each click by GrabCut and the random walker.
SEED_RADIUS = 5
#: Columns of :func:`run_interaction`'s table.
INTERACTION_COLUMNS = ["click", "dice", "x", "y", "label"]

#: One click: ``(x, y, label)``: column and row (pixels), label 1 positive / 0 negative.
Click = tuple[int, int, int]


@dataclass(frozen=True)
class Round:
    """What a segmenter returns for one round.

    Attributes
    ----------
    mask : (H, W) bool array, the predicted object.
    state : anything the segmenter wants back in the next round (``previous.state``), e.g.
        SAM's low-res logits; None if it keeps nothing.
    """

    mask: np.ndarray
    state: Any = None


@runtime_checkable
class InteractiveSegmenter(Protocol):
    """Anything with ``segment(image, clicks, previous) -> mask``.

    ``image`` is the (H, W) or (H, W, 3) uint8 image, ``clicks`` the list of all
    :data:`Click` s so far (oldest first), ``previous`` the :class:`Round` of the previous
    round (None in round 1). Return the (H, W) bool mask, or a :class:`Round` to keep state
    for the next round. A wrapper of FocalClick, SimpleClick or any other click model needs
    nothing else.
    """

    def segment(self, image: np.ndarray, clicks: Sequence[Click],
                previous: Round | None) -> np.ndarray | Round: ...


# ----------------------------------------------------------------------------- the clicks


def first_click(gt: np.ndarray) -> Click:
    """Click 1: the S2 point of :mod:`cosmoslib.protocol.prompts`, positive.

    Parameters
    ----------
    gt : (H, W) bool array, the object (non-empty).

    Returns
    -------
    Click
        ``(x, y, 1)`` in pixels; ``gt[y, x]`` is True.
    """
    x, y = make_prompt(object_mask(gt), "S2").points[0]
    return int(x), int(y), 1


def _largest_component(err: np.ndarray) -> tuple[np.ndarray | None, int]:
    labels, n = ndi.label(err)
    if n == 0:
        return None, 0
    sizes = np.bincount(labels.ravel())[1:]
    best = int(np.argmax(sizes))  # first of equal sizes: lowest label = first in raster order
    return labels == best + 1, int(sizes[best])


def next_click(pred: np.ndarray, gt: np.ndarray) -> Click | None:
    """The next simulated click for prediction ``pred`` (rule in the module docstring).

    Parameters
    ----------
    pred : (H, W) bool array, the current prediction.
    gt : (H, W) bool array, the object.

    Returns
    -------
    Click or None
        ``(x, y, label)``: the pixel farthest from the boundary (image border included) of
        the largest 4-connected error region; label 1 in a false-negative region, 0 in a
        false-positive one. None when ``pred`` equals ``gt``.

    Raises
    ------
    ValueError
        Shapes differ or are not 2D.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must be the same (H, W)")
    fn, fn_size = _largest_component(gt & ~pred)
    fp, fp_size = _largest_component(pred & ~gt)
    if fn is None and fp is None:
        return None
    region, label = (fn, 1) if fn_size >= fp_size else (fp, 0)
    depth = ndi.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return int(x), int(y), label


def _as_round(result, shape: tuple[int, int]) -> Round:
    if not isinstance(result, Round):
        result = Round(np.asarray(result))
    mask = np.asarray(result.mask)
    if mask.shape != shape:
        raise ValueError(f"segmenter returned a mask of shape {mask.shape}, expected {shape}")
    return Round(mask.astype(bool, copy=False), result.state)


def run_interaction(segmenter: InteractiveSegmenter, image: np.ndarray, gt: np.ndarray,
                    max_clicks: int = MAX_CLICKS):
    """Simulate up to ``max_clicks`` rounds of clicking on one object.

    Parameters
    ----------
    segmenter : InteractiveSegmenter
    image : (H, W) or (H, W, 3) array, passed to the segmenter as is.
    gt : (H, W) bool array, the object (non-empty).
    max_clicks : positive int.

    Returns
    -------
    pandas.DataFrame
        :data:`INTERACTION_COLUMNS`, one row per round: ``click`` 1..n, ``dice`` (%) of the
        mask predicted from clicks 1..click, and ``x``, ``y``, ``label`` of click number
        ``click``. n < ``max_clicks`` only if a round's mask equalled the GT (DICE 100).

    Raises
    ------
    ValueError
        Empty or non-2D ``gt``, ``image`` of another size, ``max_clicks < 1``, or a segmenter
        mask of the wrong shape.
    """

    gt = object_mask(gt)
    if tuple(np.shape(image)[:2]) != gt.shape:
        raise ValueError(f"image {np.shape(image)} and gt {gt.shape} differ in size")
    if isinstance(max_clicks, bool) or int(max_clicks) != max_clicks or max_clicks < 1:
        raise ValueError(f"max_clicks must be a positive integer; got {max_clicks!r}")
    clicks: list[Click] = [first_click(gt)]
    previous: Round | None = None
    rows = []
    for k in range(1, int(max_clicks) + 1):
        result = _as_round(segmenter.segment(image, list(clicks), previous), gt.shape)
        x, y, label = clicks[-1]
        rows.append({"click": k, "dice": metrics.dice(result.mask, gt), "x": x, "y": y,
                     "label": label})
        if k == max_clicks:
            break
        click = next_click(result.mask, gt)
        if click is None:
            break
        clicks.append(click)
        previous = result
    return pd.DataFrame(rows, columns=INTERACTION_COLUMNS)


class NoC(NamedTuple):
    """Number of clicks to reach a DICE threshold.

    Attributes
    ----------
    clicks : int, 1..max_clicks; ``max_clicks`` when the threshold was not reached.
    reached : bool, whether DICE reached the threshold within ``max_clicks`` clicks.
    """

    clicks: int
    reached: bool


def noc(dice_curve, threshold: float, max_clicks: int = MAX_CLICKS) -> NoC:
    """Clicks needed to reach ``threshold`` DICE (NoC@80 / NoC@90), capped at ``max_clicks``.

    Parameters
    ----------
    dice_curve : sequence of float
        DICE after 1, 2, ... clicks, in the units of ``threshold`` (% for
        :func:`run_interaction`'s ``dice``). Values past ``max_clicks`` are ignored; NaN
        never reaches the threshold.
    threshold : float, e.g. 80 or 90 (%); reached when DICE >= threshold.
    max_clicks : positive int.

    Returns
    -------
    NoC
        ``(k, True)`` for the first click k whose DICE is >= ``threshold``; otherwise
        ``(max_clicks, False)``, the field's convention (the cap counts as the clicks spent),
        with ``reached`` telling it apart from reaching it at the last click. A curve that
        stopped early because the mask was perfect (DICE 100) has reached any threshold.

    Raises
    ------
    ValueError
        An empty curve or ``max_clicks < 1``.
    """
    if isinstance(max_clicks, bool) or int(max_clicks) != max_clicks or max_clicks < 1:
        raise ValueError(f"max_clicks must be a positive integer; got {max_clicks!r}")
    curve = np.asarray(dice_curve, dtype=np.float64).reshape(-1)[: int(max_clicks)]
    if curve.size == 0:
        raise ValueError("empty DICE curve")
    hit = np.flatnonzero(curve >= threshold)  # NaN compares False
    if hit.size:
        return NoC(int(hit[0]) + 1, True)
    return NoC(int(max_clicks), False)


# ----------------------------------------------------------------------------- segmenters


def _split_clicks(clicks: Sequence[Click]) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray([(c[0], c[1]) for c in clicks], dtype=np.float64).reshape(-1, 2)
    labels = np.asarray([int(c[2]) for c in clicks], dtype=np.int64)
    if arr.shape[0] == 0:
        raise ValueError("no clicks")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"click labels must be 0 or 1; got {sorted(set(labels.tolist()))}")
    return arr, labels


def _paint_clicks(seeds: np.ndarray, clicks: Sequence[Click], radius: int,
                  values: dict[int, int]) -> np.ndarray:
    """Paint a disk of ``radius`` pixels per click (label -> value), in click order, then
    each click's own pixel again, so a click's pixel always carries its own label."""
    h, w = seeds.shape
    yy, xx = np.ogrid[:h, :w]
    pts, labels = _split_clicks(clicks)
    pix = np.rint(pts).astype(np.int64)
    if np.any(pix < 0) or np.any(pix[:, 0] >= w) or np.any(pix[:, 1] >= h):
        raise ValueError(f"clicks must lie inside the {h} x {w} image")
    for (x, y), lab in zip(pix, labels):
        seeds[(xx - x) ** 2 + (yy - y) ** 2 <= radius**2] = values[int(lab)]
    for (x, y), lab in zip(pix, labels):
        seeds[y, x] = values[int(lab)]
    return seeds


def _as_uint8_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W) or (H, W, 3); got {img.shape}")
    if img.dtype != np.uint8:
        # not 8-bit: min-max to 0..255 (GrabCut needs 8-bit, 3-channel input)
        f = img.astype(np.float64)
        span = f.max() - f.min()
        img = np.zeros(f.shape, np.uint8) if span == 0 else np.rint(
            (f - f.min()) / span * 255).astype(np.uint8)
    return np.ascontiguousarray(img)


class SamSegmenter:
    """A SAM-family model decoding all clicks so far from one cached image embedding.

    Each round decodes the points of all clicks (labels 1/0) with
    :meth:`cosmoslib.models.SamFamilyModel.decode`; with ``use_previous_logits=True`` the
    previous round's low-res logits (256 x 256) go in as the mask prompt, as in SAM's own
    interactive loop. With several candidate masks (multimask output), the one with the
    highest *predicted* IoU is taken: the interaction must not use the GT to choose (a real
    user gets one mask back), unlike the oracle choice of the paper's single-prompt tables.
    SAM's paper decodes later clicks with a single output; pass ``multimask=False`` for that.

    Parameters
    ----------
    model : cosmoslib.models.SamFamilyModel
    embedding : the image's embedding (256, 64, 64) (e.g. from the embedding cache) or a
        ``PreparedEmbedding``; prepared once here.
    use_previous_logits : bool
    multimask : bool, optional, default the model's (SAM True, LiteMedSAM/MedSAM False).

    Notes
    -----
    Models trained with boxes only (LiteMedSAM, MedSAM) decode points with a warning (from
    the model, once) and their masks from points are not meaningful.
    """

    def __init__(self, model, embedding, use_previous_logits: bool = False,
                 multimask: bool | None = None):
        self.model = model
        self.embedding = model.prepare(embedding)
        self.use_previous_logits = bool(use_previous_logits)
        self.multimask = multimask

    @property
    def name(self) -> str:
        return f"{self.model.name}" + (" + previous logits" if self.use_previous_logits else "")

    def segment(self, image: np.ndarray, clicks: Sequence[Click],
                previous: Round | None = None) -> Round:
        """Decode all clicks (and optionally ``previous.state``, the low-res logits).

        Returns
        -------
        Round
            ``mask`` (H, W) bool at the image size; ``state`` the chosen candidate's
            (1, 256, 256) float32 low-res logits.
        """
        pts, labels = _split_clicks(clicks)
        mask_input = None
        if self.use_previous_logits and previous is not None and previous.state is not None:
            mask_input = previous.state
        prompt = Prompt(points=pts, point_labels=labels, mask_input=mask_input)
        decoded = self.model.decode(self.embedding, prompt, np.shape(image)[:2],
                                    multimask=self.multimask)
        best = int(np.argmax(decoded.iou_pred))
        return Round(mask=np.asarray(decoded.masks[best], bool),
                     state=decoded.low_res_logits[best : best + 1])


class GrabCutSegmenter:
    """OpenCV's GrabCut (``cv2.grabCut``, mask initialisation) seeded with the clicks.

    Seeds: a disk of ``radius`` pixels around each positive click is *sure foreground*
    (``GC_FGD``), around each negative click *sure background* (``GC_BGD``); later clicks
    paint over earlier ones and each click's own pixel keeps its label. Every other pixel is
    *probable foreground* (``GC_PR_FGD``) where the previous round's mask was, else *probable
    background* (``GC_PR_BGD``): round 1 starts from "nothing is the object but the click",
    and each round refines the last one, as a user of an interactive GrabCut tool does.
    GrabCut's colour models are initialised by k-means with OpenCV's global random number
    generator; it is reseeded with ``seed`` before every call (``cv2.setRNGSeed``), so the
    results are deterministic.

    Parameters
    ----------
    radius : int, seed disk radius in pixels (>= 0).
    iterations : int, GrabCut iterations per round.
    seed : int, for ``cv2.setRNGSeed``.

    Notes
    -----
    Images that are not uint8 are min-max scaled to 0..255; grey images are repeated into 3
    channels. If OpenCV refuses (too few pixels of one kind to fit its 5-component colour
    models, e.g. seeds covering a tiny image), the mask is the sure-foreground seeds alone.
    """

    name = "GrabCut"

    def __init__(self, radius: int = SEED_RADIUS, iterations: int = 5, seed: int = 0):
        if int(radius) < 0 or int(iterations) < 1:
            raise ValueError(f"need radius >= 0 and iterations >= 1; got {radius}, {iterations}")
        self.radius, self.iterations, self.seed = int(radius), int(iterations), int(seed)

    def segment(self, image: np.ndarray, clicks: Sequence[Click],
                previous: Round | None = None) -> np.ndarray:
        """The GrabCut mask (H, W) bool for these clicks."""

        img = _as_uint8_rgb(image)
        h, w = img.shape[:2]
        mask = np.full((h, w), cv2.GC_PR_BGD, np.uint8)
        if previous is not None:
            mask[np.asarray(previous.mask, bool)] = cv2.GC_PR_FGD
        _paint_clicks(mask, clicks, self.radius, {1: cv2.GC_FGD, 0: cv2.GC_BGD})
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(self.seed)
        try:
            cv2.grabCut(img, mask, None, bgd, fgd, self.iterations, cv2.GC_INIT_WITH_MASK)
        except cv2.error:
            return mask == cv2.GC_FGD
        return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


#: The random walker solves exactly (sparse LU, skimage ``mode="bf"``) up to this many pixels
#: (1024 x 1024, skimage's advice), iteratively above (memory grows fast with the LU's fill-in).
DIRECT_SOLVE_MAX_PIXELS = 1024 * 1024


class RandomWalkerSegmenter:
    """scikit-image's random walker (``skimage.segmentation.random_walker``) on the clicks.

    Seeds: label 1 (object) in a disk of ``radius`` pixels around each positive click; label 2
    (background) around each negative click **and on the one-pixel image border**, because the
    walker needs a background seed from round 1 on, when the only click is positive. Later
    clicks paint over earlier ones and over the border, and each click's own pixel keeps its
    label. An object that touches the image edge therefore starts with wrong background seeds
    there; only clicks can correct that. Every other pixel goes to the label its random walk
    reaches first with the higher probability. The previous round is not used (the walker is
    solved from the seeds every round); the result is deterministic.

    Parameters
    ----------
    radius : int, seed disk radius in pixels (>= 0).
    beta : float, edge weight penalty (skimage's default 130; skimage divides it by 10x the
        image standard deviation).
    mode : str, skimage's solver. ``"auto"`` (default): ``"bf"`` -- a direct sparse LU solve
        of the Laplacian system, the exact solution -- for images of at most
        :data:`DIRECT_SOLVE_MAX_PIXELS` pixels (skimage's advice: fast below ~1024 x 1024),
        else ``"cg_j"`` (conjugate gradient with a Jacobi preconditioner, to ``tol``). On
        cosmos-demo images (~200 x 230 px) the direct solve takes 0.2 s where ``cg_j`` at
        tol 1e-5 took 1-4 s, and the two differ by < 5e-4 in probability (at most one pixel's
        label flipped per call, measured on three images).
    tol : float, the iterative solvers' tolerance; skimage's default 1e-3 leaves probabilities
        outside [0, 1] (with a warning) on high-contrast images, 1e-5 does not.

    Notes
    -----
    The image is used as float in [0, 1] (uint8 / 255; other types min-max scaled); RGB
    images use all three channels. A constant image has no edges to follow: the mask is then
    the positive seeds alone.
    """

    name = "random walker"

    def __init__(self, radius: int = SEED_RADIUS, beta: float = 130.0, mode: str = "auto",
                 tol: float = 1e-5):
        if int(radius) < 0:
            raise ValueError(f"radius must be >= 0; got {radius}")
        self.radius, self.beta, self.mode, self.tol = int(radius), float(beta), mode, float(tol)

    def segment(self, image: np.ndarray, clicks: Sequence[Click],
                previous: Round | None = None) -> np.ndarray:
        """The random-walker mask (H, W) bool for these clicks."""

        img = np.asarray(image)
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[..., 0]
        if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
            raise ValueError(f"image must be (H, W) or (H, W, 3); got {img.shape}")
        if img.dtype == np.uint8:
            data = img.astype(np.float64) / 255.0
        else:
            data = img.astype(np.float64)
            span = data.max() - data.min()
            data = data - data.min() if span == 0 else (data - data.min()) / span
        h, w = img.shape[:2]
        seeds = np.zeros((h, w), np.int32)
        seeds[[0, -1], :] = 2
        seeds[:, [0, -1]] = 2
        _paint_clicks(seeds, clicks, self.radius, {1: 1, 0: 2})
        if data.std() == 0 or not (seeds == 1).any() or (seeds == 0).sum() == 0:
            return seeds == 1
        mode = self.mode
        if mode == "auto":
            mode = "bf" if h * w <= DIRECT_SOLVE_MAX_PIXELS else "cg_j"
        labels = random_walker(data, seeds, beta=self.beta, mode=mode, tol=self.tol,
                               channel_axis=-1 if data.ndim == 3 else None)
        return labels == 1


#: Columns of :func:`interaction_table`: the click rows plus the object and the method.
TABLE_COLUMNS = [*INTERACTION_COLUMNS, "task", "image_id", "label_value", "object", "modality", "method", "model"]


def interaction_table(objects: pd.DataFrame, root, models, max_clicks: int = MAX_CLICKS, seed: int = 0,
                      classical: bool = True, cache_dir=None, progress: bool = False) -> pd.DataFrame:
    """Fig. 16: :func:`run_interaction` for every object of ``objects`` and every method.

    The one interaction loop of the book, for base and finetuned models alike. Each model is
    run twice (:class:`SamSegmenter` without and with the previous round's logits as mask
    prompt: methods ``"<model>"`` and ``"<model> + previous logits"``); with ``classical``,
    GrabCut (:class:`GrabCutSegmenter`, seeded) and the random walker
    (:class:`RandomWalkerSegmenter`) once, on the same clicks (they do not depend on a model).

    Parameters
    ----------
    objects : manifest rows (``task, image_id, label_value, object, modality, image_path,
        label_path``), paths relative to ``root``.
    root : the COSMOS root.
    models : ``{name: SamFamilyModel}`` (insertion order = row order).
    max_clicks : clicks per object (>= 1).
    seed : GrabCut's seed.
    classical : also run the two classical methods.
    cache_dir : the embedding cache (default :func:`cosmoslib.paths.embedding_cache_dir`); each
        image is encoded at most once per model content.
    progress : a progress bar on stderr.

    Returns
    -------
    DataFrame
        :data:`TABLE_COLUMNS`: one row per object, method and click; ``model`` is the SAM model
        of the method, or the classical method's own name. Empty (same columns) for no object.
    """
    root = Path(root)
    cache_dir = paths.embedding_cache_dir() if cache_dir is None else cache_dir
    groups = list(objects.groupby(["task", "image_id"], sort=True))
    frames = []
    for i, (name, model) in enumerate(models.items()):
        cache = cache_mod.EmbeddingCache(cache_dir, model)
        for (task, image_id), rows in tqdm(groups, desc=f"interaction {name}", unit="img", disable=not progress):
            first = rows.iloc[0]
            image = readers.read_image(root / first["image_path"])
            label = readers.read_label(root / first["label_path"])
            embedding = cache.get(root / first["image_path"])
            methods = {name: (name, SamSegmenter(model, embedding, use_previous_logits=False)),
                       f"{name} + previous logits": (name, SamSegmenter(model, embedding, use_previous_logits=True))}
            if classical and i == 0:
                methods |= {"GrabCut": ("GrabCut", GrabCutSegmenter(seed=seed)),
                            "random walker": ("random walker", RandomWalkerSegmenter())}
            for r in rows.itertuples(index=False):
                for method, (owner, segmenter) in methods.items():
                    curve = run_interaction(segmenter, image, label == r.label_value, max_clicks=max_clicks)
                    frames.append(curve.assign(task=task, image_id=image_id, label_value=int(r.label_value),
                                               object=r.object, modality=r.modality, method=method, model=owner))
    if not frames:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    return pd.concat(frames, ignore_index=True)[TABLE_COLUMNS]
