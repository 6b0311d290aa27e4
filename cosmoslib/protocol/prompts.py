"""Prompt strategies S2..S6: points and boxes simulated from the GT mask (paper 3.3).

The paper's rule, for one object (GT mask ``G``):

* **positive points** - a) compute the centre of mass of ``G``; b) if it lies inside ``G`` it
  is the first positive point; c) the other positive points come from "uniform sampling" of
  the flattened ``G``; d) if the centre lies outside ``G`` all positive points come from c).
* **negative points** - "even sampling" of the non-GT pixels inside the GT bounding box
  enlarged two times.
* **box** - the tight bounding box of ``G``.

The five strategies are S2 one positive point, S3 five positive points, S4 five positive and
five negative points, S5 the box, S6 the box and the S2 point. All of them are prefixes of one
ordered *plan* per object (:func:`point_plan`), so S2's point is S3's first point and S6's, and
S3's points are S4's positives.

Choices made here, where the paper leaves room or the authors' code is wrong
---------------------------------------------------------------------------
* The centre of mass is rounded to the nearest pixel (halves up) and accepted only if that
  pixel is in ``G``. The authors' ``find_center_from_mask_new`` truncates it and never checks
  it, so a ring-shaped, C-shaped or multi-part object got a *background* pixel as a "positive"
  point.
* The authors take ``points[::len // 5]``, which yields six points whenever the count is not a
  multiple of five; their five "positive" labels then shift and one positive point is labelled
  negative in most masks. Here every strategy has exactly 1, 5 or 5 + 5 points whenever the mask
  (and the background in the enlarged box) has enough pixels, and every label is right: each
  positive point is in ``G``, each negative point outside it, no point repeats.
* Sampling (``sampling=``): ``"even"`` (default) takes the flattened (row-major) foreground
  indices, without the centre pixel, and picks the middle index of each of ``n`` equal parts:
  position ``floor((k + 1/2) L / n)``, ``k = 0..n-1`` of ``L`` indices. This is the authors'
  evenly-spaced rule made exact (always ``n`` distinct points) and centred in each stratum, so
  it does not always start at the top-left boundary pixel. ``"random"`` draws ``n`` indices
  uniformly without replacement with the seeded ``numpy.random.Generator``. The default is
  ``"even"`` because it is the rule the authors ran and it depends on the mask alone, so
  prompts are identical across runs, machines and seeds ("repeatability"); the points are
  still arbitrary with respect to the anatomy. ``"random"`` is there to measure how much the
  results depend on which pixels happen to be chosen.
* Negative points use the same sampling over the non-GT pixels of the enlarged box. The box
  grows by ``ceil(w / 2)`` pixels on the left and the right and ``ceil(h / 2)`` at the top and
  the bottom (``w``, ``h``: tight-box width and height in pixels), so it keeps its centre and
  is ``2w`` (``w`` even) or ``2w + 1`` (``w`` odd) wide, then it is clipped to the image.
* Objects with several components get one box spanning all of them, as in the paper.
* Small objects: a mask with fewer foreground pixels than requested points yields all of its
  pixels (fewer points, all labelled correctly); likewise for negatives when the enlarged box
  has fewer than five background pixels (none when the object fills it).

Shifted prompts (paper 4.10, Table 8)
-------------------------------------
The paper says only that it "enlarge[s]/move[s] the boxes/points randomly in 0-10, 10-20 and
20-30 pixels". The exact rule here (:func:`shift_prompt`), for level ``L`` with pixel range
``[lo, hi)`` = :data:`SHIFT_LEVELS` ``[L]`` (level 0 = the unshifted prompt):

* **points** - each point (positive and negative, in order) moves by a distance ``d`` drawn
  uniformly in ``[lo, hi)`` pixels, in a direction drawn uniformly in ``[0, 2 pi)``. The
  image is the rectangle of pixel centres ``0 <= x <= W - 1``, ``0 <= y <= H - 1``; a
  direction that leaves it is drawn again, up to :data:`N_DIRECTION_DRAWS` times; if none of
  them lands inside, the point moves by ``d`` towards the image corner farthest from it (the
  segment to that corner lies in the image). When that corner is nearer than ``hi``, ``d`` is
  drawn in ``[lo, corner distance)`` instead, so the shift stays in range whenever the image
  allows one. Only when the farthest corner is nearer than ``lo`` (an image whose half
  diagonal is below ``lo``: at most 29 x 29 pixels for level 3, 15 x 15 for level 2) does
  the point go to that corner, the largest shift the image allows, *below* the level's range.
  Shifted points are real-valued (not rounded to pixels: rounding would move them by up to
  0.71 pixel more) and keep their labels, even when a positive point leaves the object - as
  a real click would.
* **box** - each edge, in the order x0, y0, x1, y1, independently moves *outward* (enlarging)
  or *inward* (shrinking), each with probability 1/2, by a distance drawn uniformly in
  ``[lo, hi)``. Outward an edge may go as far as the image border; inward as far as the box
  centre (so the box never inverts: ``x0 <= x1``, ``y0 <= y1`` always). A direction whose
  limit is not beyond ``lo`` is not taken (the other one is), and the distance is drawn in
  ``[lo, min(hi, limit))``. If neither direction's limit exceeds ``lo`` (a box hugging the
  border that is also too narrow to shrink), the edge moves to the farther limit, a shift
  below the level's range. At level 3 (20-30 pixels) a box narrower than 40 pixels can
  therefore only grow.

So a shifted prompt always lies inside the image (and its box is valid); every move is in the
level's range except in the two size-limited cases above. Each shifted prompt has its own
Generator, :func:`object_rng` of (seed, task, image_id, label_value, strategy, level, repeat),
so it is reproducible from the seed, differs across seeds, repeats and strategies, and does
not depend on the rest of the table. The points are drawn before the box, point by point, so
for S6 the point's shift is the same as it would be without the box.

Coordinates are ``(x, y)`` = (column, row) in original-image pixels; boxes are
``[x0, y0, x1, y1]`` inclusive pixel indices.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from cosmoslib.data.readers import read_label
from cosmoslib.files import InputError
from cosmoslib.masks import object_mask, scaled_box, tight_box

STRATEGIES = ("S2", "S3", "S4", "S5", "S6")
N_POSITIVE = 5
N_NEGATIVE = 5
BOX_RATIO = 2
EVEN = "even"
RANDOM = "random"
SAMPLINGS = (EVEN, RANDOM)
#: Default point sampling; see the module docstring for why.
DEFAULT_SAMPLING = EVEN

#: Shift levels of Table 8: level -> ``(lo, hi)``, the pixel range ``[lo, hi)`` of every move
#: of a point or box edge (module docstring). Level 0 is the unshifted prompt.
SHIFT_LEVELS = {0: (0.0, 0.0), 1: (0.0, 10.0), 2: (10.0, 20.0), 3: (20.0, 30.0)}
#: Directions drawn per point before the point is moved towards the farthest image corner.
N_DIRECTION_DRAWS = 64

PROMPT_COLUMNS = [
    "task", "image_id", "label_value", "object", "strategy", "seed", "shift_level", "repeat",
    "points", "point_labels", "box",
]


@dataclass(frozen=True)
class Prompt:
    """One prompt for one object, in original-image pixel coordinates.

    Attributes
    ----------
    points : (N, 2) float array of (x, y), or None.
    point_labels : (N,) int array, 1 = positive (foreground), 0 = negative, or None.
    box : (4,) float array ``[x0, y0, x1, y1]`` (inclusive pixel indices), or None.
    mask_input : (1, 256, 256) float32 low-res logits from a previous round, or None.
    """

    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    box: np.ndarray | None = None
    mask_input: np.ndarray | None = None


@dataclass(frozen=True)
class PointPlan:
    """All points one object can be prompted with, in strategy order.

    Attributes
    ----------
    positives : (P, 2) int array of (x, y), P <= 5; the first is the centre of mass when it
        lies inside the mask.
    negatives : (Q, 2) int array of (x, y), Q <= 5.
    box : (4,) int array, the tight box ``[x0, y0, x1, y1]``.
    centre_inside : bool, whether ``positives[0]`` is the centre of mass.
    """

    positives: np.ndarray
    negatives: np.ndarray
    box: np.ndarray
    centre_inside: bool


def centre_of_mass(mask: np.ndarray) -> tuple[int, int] | None:
    """The GT centre of mass as an (x, y) pixel if that pixel is in the mask, else None.

    The centroid (``scipy.ndimage.center_of_mass``) is rounded to the nearest pixel, halves up.
    """
    mask = object_mask(mask)
    r, c = ndi.center_of_mass(mask)
    row, col = math.floor(r + 0.5), math.floor(c + 0.5)
    return (col, row) if mask[row, col] else None


def _sample(n_avail: int, n: int, sampling: str, rng: np.random.Generator | None) -> np.ndarray:
    """Positions (into a list of ``n_avail`` candidates) of ``min(n, n_avail)`` distinct picks."""
    if n_avail <= n:
        return np.arange(n_avail)
    if sampling == EVEN:
        # middle of each of n equal strata; integer arithmetic, strictly increasing as L > n
        k = np.arange(n)
        return ((2 * k + 1) * n_avail) // (2 * n)
    return rng.choice(n_avail, size=n, replace=False)


def _flat_to_xy(flat: np.ndarray, width: int) -> np.ndarray:
    rows, cols = np.divmod(flat, width)
    return np.stack([cols, rows], axis=1).astype(np.int64)


def point_plan(
    mask: np.ndarray,
    rng: np.random.Generator | None = None,
    sampling: str = DEFAULT_SAMPLING,
    n_positive: int = N_POSITIVE,
    n_negative: int = N_NEGATIVE,
) -> PointPlan:
    """Positive points, negative points and the box for one object (paper 3.3).

    Parameters
    ----------
    mask : (H, W) bool array, the GT object (non-empty).
    rng : numpy Generator, required for ``sampling="random"`` (positives are drawn first,
        then negatives, so the same rng state always gives the same plan).
    sampling : {"even", "random"}
    n_positive, n_negative : number of points wanted (fewer for small masks, see module doc).

    Returns
    -------
    PointPlan

    Raises
    ------
    ValueError
        Empty or non-2D mask, unknown sampling, or ``"random"`` without an rng.
    """
    mask = object_mask(mask)
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; choose one of {SAMPLINGS}")
    if sampling == RANDOM and rng is None:
        raise ValueError("sampling='random' needs a seeded numpy Generator (rng=)")
    w = mask.shape[1]

    centre = centre_of_mass(mask)
    fg = np.flatnonzero(mask)  # row-major flattening of the GT mask
    if centre is not None:
        fg = fg[fg != centre[1] * w + centre[0]]
    n_sample = n_positive - (1 if centre is not None else 0)
    sampled = fg[_sample(fg.size, n_sample, sampling, rng)]
    positives = _flat_to_xy(sampled, w)
    if centre is not None:
        positives = np.concatenate([np.array([centre], dtype=np.int64), positives])

    box = tight_box(mask)
    ex0, ey0, ex1, ey1 = scaled_box(box, mask.shape, BOX_RATIO)
    window = ~mask[ey0 : ey1 + 1, ex0 : ex1 + 1]
    bg = np.flatnonzero(window)  # row-major inside the enlarged box
    picked = bg[_sample(bg.size, n_negative, sampling, rng)]
    negatives = _flat_to_xy(picked, window.shape[1]) + np.array([ex0, ey0])
    return PointPlan(positives, negatives, box, centre is not None)


def make_prompt(
    mask: np.ndarray,
    strategy: str,
    rng: np.random.Generator | None = None,
    sampling: str = DEFAULT_SAMPLING,
) -> Prompt:
    """The prompt of one strategy (``"S2"`` .. ``"S6"``) for one GT object.

    Parameters
    ----------
    mask : (H, W) bool array, the object (non-empty; several components allowed).
    strategy : one of :data:`STRATEGIES`.
    rng : numpy Generator, needed only for ``sampling="random"``.
    sampling : {"even", "random"}, see the module docstring.

    Returns
    -------
    Prompt
        ``points`` float (N, 2) (x, y) and ``point_labels`` int (N,) (1 positive, 0 negative),
        or None for S5; ``box`` float ``[x0, y0, x1, y1]`` for S5/S6, else None. N is 1 (S2,
        S6), 5 (S3) or 10 (S4) unless the mask is too small (module docstring).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown prompt strategy {strategy!r}; choose one of {STRATEGIES}")
    plan = point_plan(mask, rng=rng, sampling=sampling)
    box = plan.box.astype(np.float64)
    if strategy == "S5":
        return Prompt(box=box)
    pos = plan.positives[:1] if strategy in ("S2", "S6") else plan.positives
    neg = plan.negatives if strategy == "S4" else plan.negatives[:0]
    pts = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)])
    return Prompt(
        points=pts.astype(np.float64),
        point_labels=labels,
        box=box if strategy == "S6" else None,
    )


def _stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same in every process (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _entropy(key) -> int:
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        if int(key) < 0:
            raise ValueError(f"integer rng keys must be non-negative; got {key}")
        return int(key)
    return _stable_hash(str(key))


def object_rng(seed: int, task: str, image_id: str, label_value: int, *keys) -> np.random.Generator:
    """The Generator for one object: depends on (seed, task, image_id, label_value, *keys) only.

    So a prompt never depends on which other objects are in the table or in which order.

    Parameters
    ----------
    seed : non-negative int
    task, image_id : str
    label_value : non-negative int
    *keys : str or non-negative int
        More keys, e.g. ``strategy, level, repeat`` for a shifted prompt. Strings enter through
        a stable 64-bit hash, integers as they are. Without keys the Generator is the one the
        unshifted prompts have always used.

    Raises
    ------
    ValueError
        A negative seed or integer key.
    """
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed}")
    seq = np.random.SeedSequence(
        [int(seed), _stable_hash(str(task)), _stable_hash(str(image_id)), int(label_value)]
        + [_entropy(k) for k in keys]
    )
    return np.random.default_rng(seq)


# ---- shifted prompts (Table 8) ----------------------------------------------------------------


def _level_range(level: int) -> tuple[float, float]:
    if isinstance(level, bool) or int(level) != level or int(level) not in SHIFT_LEVELS:
        raise ValueError(f"unknown shift level {level!r}; choose one of {sorted(SHIFT_LEVELS)}")
    return SHIFT_LEVELS[int(level)]


def _image_size(shape) -> tuple[int, int]:
    h, w = (int(v) for v in tuple(shape)[:2])
    if h <= 0 or w <= 0:
        raise ValueError(f"image shape must be positive (H, W); got {tuple(shape)}")
    return h, w


def shift_points(points: np.ndarray, level: int, shape, rng: np.random.Generator) -> np.ndarray:
    """Points moved by the rule of the module docstring ("Shifted prompts").

    Parameters
    ----------
    points : (N, 2) array of (x, y) in pixels (N may be 0).
    level : int, a key of :data:`SHIFT_LEVELS`; 0 returns the points unchanged.
    shape : (H, W, ...) of the image, pixels.
    rng : numpy Generator.

    Returns
    -------
    (N, 2) float64 array
        Each point at a distance in the level's ``[lo, hi)`` pixels from its original and
        inside ``[0, W - 1] x [0, H - 1]``; the distance is below ``lo`` only when no pixel
        centre of the image is ``lo`` away (half diagonal < ``lo``).

    Raises
    ------
    ValueError
        Unknown level, bad shape, or a point outside the image.
    """
    lo, hi = _level_range(level)
    h, w = _image_size(shape)
    pts = np.array(points, dtype=np.float64).reshape(-1, 2)
    top = np.array([w - 1, h - 1], dtype=np.float64)
    if np.any(pts < 0) or np.any(pts > top):
        raise ValueError(f"points must lie inside the {h} x {w} image")
    if level == 0:
        return pts
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], dtype=np.float64)
    out = np.empty_like(pts)
    for i, p in enumerate(pts):
        gaps = np.hypot(*(corners - p).T)
        far = int(np.argmax(gaps))
        d_max = float(gaps[far])
        if d_max < lo:  # no pixel centre is lo away: the largest shift the image allows
            out[i] = corners[far]
            continue
        d = rng.uniform(lo, min(hi, d_max))
        theta = rng.uniform(0.0, 2.0 * np.pi, N_DIRECTION_DRAWS)
        cand = p + d * np.stack([np.cos(theta), np.sin(theta)], axis=1)
        inside = np.all((cand >= 0) & (cand <= top), axis=1)
        if inside.any():
            out[i] = cand[int(np.argmax(inside))]
        else:  # towards the farthest corner: that segment lies in the (convex) image
            out[i] = p + d * (corners[far] - p) / d_max
    # rounding only (the cases above are inside up to ~1e-13 pixel)
    return np.clip(out, 0.0, top)


def shift_box(box: np.ndarray, level: int, shape, rng: np.random.Generator) -> np.ndarray:
    """A box whose edges moved by the rule of the module docstring ("Shifted prompts").

    Parameters
    ----------
    box : (4,) ``[x0, y0, x1, y1]`` in pixels, inside the image, ``x0 <= x1``, ``y0 <= y1``.
    level : int, a key of :data:`SHIFT_LEVELS`; 0 returns the box unchanged.
    shape : (H, W, ...) of the image, pixels.
    rng : numpy Generator.

    Returns
    -------
    (4,) float64 array
        Still inside the image with ``x0 <= x1`` and ``y0 <= y1``. Each edge moved by a
        distance in the level's ``[lo, hi)`` pixels, outward or inward, unless neither the
        room to the image border nor the room to the box centre exceeds ``lo``; then the edge
        moves as far as it can (to the farther of the two limits).

    Raises
    ------
    ValueError
        Unknown level, bad shape, or an invalid box.
    """
    lo, hi = _level_range(level)
    h, w = _image_size(shape)
    b = np.array(box, dtype=np.float64).reshape(4)
    x0, y0, x1, y1 = b
    if not (0 <= x0 <= x1 <= w - 1 and 0 <= y0 <= y1 <= h - 1):
        raise ValueError(f"box {b.tolist()} is not a valid box inside the {h} x {w} image")
    if level == 0:
        return b
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    # (edge index, outward sign, room outward to the border, room inward to the centre)
    edges = ((0, -1.0, x0, cx - x0), (1, -1.0, y0, cy - y0),
             (2, 1.0, (w - 1) - x1, x1 - cx), (3, 1.0, (h - 1) - y1, y1 - cy))
    out = b.copy()
    for k, sign, room_out, room_in in edges:
        options = [(s, room) for s, room in ((sign, room_out), (-sign, room_in)) if room > lo]
        if not options:  # too little room either way: as far as it can go
            s, room = (sign, room_out) if room_out >= room_in else (-sign, room_in)
            out[k] = b[k] + s * room
            continue
        s, room = options[int(rng.integers(len(options)))] if len(options) > 1 else options[0]
        out[k] = b[k] + s * rng.uniform(lo, min(hi, room))
    return np.clip(out, 0.0, [w - 1, h - 1, w - 1, h - 1])


def shift_prompt(prompt: Prompt, level: int, shape, rng: np.random.Generator) -> Prompt:
    """A prompt with its points, then its box, shifted (:func:`shift_points`, :func:`shift_box`).

    Point labels are kept (a positive point moved off the object stays positive);
    ``mask_input`` is dropped. Level 0 returns the same points and box as float arrays.

    Parameters
    ----------
    prompt : Prompt
    level : int, a key of :data:`SHIFT_LEVELS`.
    shape : (H, W, ...) of the image, pixels.
    rng : numpy Generator (the points draw from it first, then the box).

    Returns
    -------
    Prompt
    """
    pts = None if prompt.points is None else shift_points(prompt.points, level, shape, rng)
    box = None if prompt.box is None else shift_box(prompt.box, level, shape, rng)
    labels = None if prompt.point_labels is None else np.array(prompt.point_labels, dtype=np.int64)
    return Prompt(points=pts, point_labels=labels, box=box)


def _check_levels(shift_levels, repeats) -> tuple[list[int], int]:
    """The shifted levels (> 0, sorted, unique) and the repeat count (checked if any level)."""
    for level in shift_levels:
        _level_range(level)  # raises on an unknown level
    levels = sorted({int(level) for level in shift_levels} - {0})
    if levels and (isinstance(repeats, bool) or int(repeats) != repeats or int(repeats) < 1):
        raise ValueError(f"repeats must be a positive integer; got {repeats!r}")
    return levels, int(repeats)


def _table_row(task, image_id, obj, strategy, seed, level, repeat, p: Prompt) -> dict:
    return {
        "task": task,
        "image_id": image_id,
        "label_value": int(obj.label_value),
        "object": obj.object,
        "strategy": strategy,
        "seed": int(seed),
        "shift_level": int(level),
        "repeat": int(repeat),
        "points": None if p.points is None else p.points.tolist(),
        "point_labels": None if p.point_labels is None else p.point_labels.tolist(),
        "box": None if p.box is None else p.box.tolist(),
    }


def make_prompt_table(
    manifest,
    root,
    seed: int = 0,
    strategies=STRATEGIES,
    sampling: str = DEFAULT_SAMPLING,
    skipped: list | None = None,
    shift_levels=(0,),
    repeats: int = 3,
    progress: bool = True,
):
    """Prompts of every object in a manifest under every strategy (the prompts table).

    Parameters
    ----------
    manifest : pandas.DataFrame
        Needs ``task, image_id, label_value, object, label_path`` (one row per object).
    root : path of the COSMOS root that ``label_path`` is relative to.
    seed : non-negative int, recorded in the ``seed`` column; each object's rng comes from
        :func:`object_rng`, so the table is the same for any row order or subset.
    strategies : iterable of "S2".."S6".
    sampling : {"even", "random"} (with "even" the seed changes nothing but the column).
    skipped : list, optional
        If given, bad label files are recorded here as ``(path, reason)`` and skipped;
        otherwise the :class:`cosmoslib.files.InputError` propagates.
    shift_levels : iterable of keys of :data:`SHIFT_LEVELS`
        For each level > 0, ``repeats`` more rows per (object, strategy): the unshifted
        prompt shifted by :func:`shift_prompt` with the Generator
        ``object_rng(seed, task, image_id, label_value, strategy, level, repeat)``. The
        unshifted rows (level 0) are always there, so ``(0,)`` (the default) gives the
        unshifted table alone and ``(1, 2, 3)`` equals ``(0, 1, 2, 3)``.
    repeats : positive int, shifted repeats per level (the paper's "Random 1-3": 3); not
        used (nor checked) when no level is above 0.
    progress : bool
        Show a progress bar (per image) on stderr.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`PROMPT_COLUMNS`, one row per (object, strategy, level, repeat), sorted
        by task, image_id, label_value, strategy, shift_level, repeat. ``points`` is a list of
        [x, y] floats or None, ``point_labels`` a list of 0/1 or None, ``box``
        ``[x0, y0, x1, y1]`` floats or None. Unshifted rows have ``shift_level = 0`` and
        ``repeat = 0``; shifted rows ``shift_level`` 1..3 and ``repeat`` 1..``repeats``.

    Raises
    ------
    cosmoslib.files.InputError
        A missing manifest column, an unreadable label file, or a label value not present.
    ValueError
        Unknown strategy or shift level, or ``repeats < 1`` with a level above 0.
    """

    strategies = tuple(strategies)
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ValueError(f"unknown prompt strategies {bad}; choose from {STRATEGIES}")
    levels, repeats = _check_levels(shift_levels, repeats)
    need = {"task", "image_id", "label_value", "object", "label_path"}
    missing = need - set(manifest.columns)
    if missing:
        raise InputError(None, f"manifest lacks columns {sorted(missing)}")
    root = Path(root)

    rows = []
    groups = manifest.groupby(["task", "image_id", "label_path"], sort=True)
    for (task, image_id, label_path), objects in tqdm(groups, desc="prompts", unit="image", disable=not progress):
        path = root / label_path
        image_rows = []
        try:
            label = np.asarray(read_label(path))
            if label.ndim != 2:
                raise InputError(path, f"label map must be 2D; got shape {label.shape}")
            for obj in objects.sort_values("label_value").itertuples(index=False):
                mask = label == obj.label_value
                if not mask.any():
                    raise InputError(path, f"label value {obj.label_value} ({obj.object}) not present")
                for strategy in strategies:
                    rng = object_rng(seed, task, image_id, obj.label_value)
                    p = make_prompt(mask, strategy, rng=rng, sampling=sampling)
                    image_rows.append(_table_row(task, image_id, obj, strategy, seed, 0, 0, p))
                    for level in levels:
                        for repeat in range(1, repeats + 1):
                            shift_rng = object_rng(seed, task, image_id, obj.label_value,
                                                   strategy, level, repeat)
                            q = shift_prompt(p, level, mask.shape, shift_rng)
                            image_rows.append(
                                _table_row(task, image_id, obj, strategy, seed, level, repeat, q))
        except InputError as exc:
            if skipped is None:
                raise
            skipped.append((str(exc.path or path), exc.problem))
            continue
        rows.extend(image_rows)
    table = pd.DataFrame(rows, columns=PROMPT_COLUMNS)
    table = table.sort_values(
        ["task", "image_id", "label_value", "strategy", "shift_level", "repeat"], kind="stable")
    return table.reset_index(drop=True)


def _none_if_missing(value):
    # pandas may hold a missing list cell as None or as a float NaN
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def prompt_from_row(row) -> Prompt:
    """The :class:`Prompt` stored in one row of the prompts table.

    ``row`` may be a dict, a pandas Series or a named tuple from ``DataFrame.itertuples``;
    rows read back from Parquet work too (lists become numpy object arrays there).
    """
    get = row.__getitem__ if hasattr(row, "keys") else lambda k: getattr(row, k)
    points, labels, box = (_none_if_missing(get(k)) for k in ("points", "point_labels", "box"))
    if points is not None and len(points) > 0:
        pts = np.array([np.asarray(p, dtype=np.float64) for p in points]).reshape(-1, 2)
        lab = np.asarray(labels, dtype=np.int64).reshape(-1)
        if lab.shape[0] != pts.shape[0]:
            raise ValueError(f"{pts.shape[0]} points but {lab.shape[0]} labels in prompt row")
    else:
        pts, lab = None, None
    b = None if box is None else np.asarray(box, dtype=np.float64).reshape(4)
    return Prompt(points=pts, point_labels=lab, box=b)
