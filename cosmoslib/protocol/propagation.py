"""3D by propagation: one box per object, carried through the slices by SAM 2 (issue 23).

The paper prompts every slice of a volume on its own (S2-S6: one prompt per slice that holds
the object, taken from that slice's ground truth). SAM 2 and its medical descendants (MedSAM2)
segment a volume from one prompt instead: the slices are read as the frames of a video, one
slice is prompted, and the video predictor's memory carries the mask to the other slices.
This module scores that way of working beside the per-slice protocol, on the same objects:

1. **The slice stack** of each source volume, in slice order (:func:`slice_stack`): from the
   source volume itself when its folder is given (every slice, normalised as
   :func:`cosmoslib.data.preprocess.prepare` did and checked against the layout's images), else
   from the COSMOS layout when the layout holds an unbroken run of the volume's slices. A
   volume that cannot be stacked -- sampled slices with gaps (the demo's MNI tasks), a 4D
   source, a source file that is missing or differs from the layout -- is listed with why,
   never scored on a broken stack.
2. **One prompt per object** (:data:`PROMPT_SLICES`): the tight GT box on the slice where the
   object's area is largest (``"largest"``; ties: the first), or, as a named alternative, on
   the object's slice nearest the middle of its extent (``"middle"``).
3. **Propagation both ways** from that slice (:func:`propagate_object`): forward to the last
   slice, then backward to the first, with SAM 2's own video predictor
   (:class:`cosmoslib.models.sam2.SliceVideo`); every slice of the stack gets a mask.
4. **Scoring in 3D** through the volume table (:func:`cosmoslib.protocol.volumes.volume_table`,
   mm, NSD) as runs ``P-largest`` / ``P-middle``. The object's slices are scored as the
   per-slice protocol's; every other slice of the stack is an *extra slice* whose GT is empty
   (under the slice-only protocol the model is never asked about it), so a mask there is a
   leaked, false-positive slice (``n_extra_fp``).

:func:`propagation_table` sets each propagated object beside its per-slice S5 (box) row of the
same volume table: the DICE gap, the leaked slices, and the prompts spent (1 against one box per
object slice).

The predictor is anything with the four methods of :class:`cosmoslib.models.sam2.SliceVideo`
(``init_state``, ``add_box``, ``propagate``, ``reset``); a model offers one through
``model.video()``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cosmoslib import files, masks
from cosmoslib.data import preprocess, readers
from cosmoslib.files import InputError
from cosmoslib.protocol import evaluate, volumes

#: Where the one prompt of an object goes: the slice of largest area, or the middle slice.
PROMPT_SLICES = ("largest", "middle")

#: The volume-table strategy name of each prompt-slice rule.
RUN_NAMES = {"largest": "P-largest", "middle": "P-middle"}

#: Columns of :func:`propagation_table`.
PROPAGATION_COLUMNS = [
    "model", "strategy", "task", "source", "label_value", "object", "modality", "stack_origin",
    "n_stack", "n_slices", "prompt_slice", "prompts", "prompts_per_slice", "dice", "nsd", "hd95",
    "slice_dice_s5", "dice_s5", "nsd_s5", "hd95_s5", "dice_gap", "leaked_slices", "missed_slices",
    "t_propagate_s",
]


# --------------------------------------------------------------------------------------------
# the slice stack
# --------------------------------------------------------------------------------------------


@dataclass
class Stack:
    """The ordered slices of one source volume.

    Attributes
    ----------
    task, source : str
    slice_index : int array (N,), strictly increasing by 1 (no gaps).
    image_ids : list of str, the layout's name of each slice (made up as
        ``<source stem>_<slice:04d>`` for slices the layout does not hold).
    images : list of uint8 arrays (H, W) or (H, W, 3), in slice order.
    origin : ``"volume"`` (read from the source file) or ``"layout"`` (the layout's images).
    """

    task: str
    source: str
    slice_index: np.ndarray
    image_ids: list[str]
    images: list[np.ndarray] = field(repr=False)
    origin: str

    def __len__(self) -> int:
        return len(self.image_ids)

    def position(self, slice_index: int) -> int:
        """Position in the stack of a slice index."""
        return int(slice_index) - int(self.slice_index[0])


def _stem(image_id: str, k: int) -> str:
    suffix = f"_{int(k):04d}"
    return image_id[: -len(suffix)] if image_id.endswith(suffix) else image_id.rsplit("_", 1)[0]


def slice_stack(rows: pd.DataFrame, root, source_dir=None,
                clip_percentiles: Sequence[float] | None = None) -> Stack | str:
    """The full slice stack of one source volume, or the reason there is none.

    Parameters
    ----------
    rows : DataFrame
        Manifest rows of *one* source volume (any objects): ``task, image_id, image_path,
        source, slice_index, plane`` (and ``frame`` for 4D sources).
    root : the COSMOS root.
    source_dir : path, optional
        The folder the task was prepared from (``source`` is relative to it). When it holds
        the source file, every slice is read from it along the manifest's ``plane`` and
        min-max normalised with ``clip_percentiles`` (the task descriptor's), then the slices
        the layout holds are compared with the layout's images.
    clip_percentiles : (low, high), optional

    Returns
    -------
    Stack, or str
        The reason when no unbroken stack can be made.
    """
    root = Path(root)
    if "frame" in rows and rows["frame"].notna().any():
        return "4D source (frames): propagation through time is not supported"
    task, source = str(rows["task"].iloc[0]), str(rows["source"].iloc[0])
    layout = (rows.assign(slice_index=rows["slice_index"].astype("int64"))
              .drop_duplicates("slice_index").sort_values("slice_index"))
    idx = layout["slice_index"].to_numpy()
    path = Path(source_dir) / source if source_dir is not None else None
    if path is not None and path.is_file():
        return _volume_stack(layout, root, path, task, source, clip_percentiles)
    missing = int(idx.max() - idx.min() + 1 - len(idx))
    if missing:
        where = f"{path} not found; " if path is not None else ""
        return (f"{where}the layout holds {len(idx)} of the {idx.max() - idx.min() + 1} slices "
                f"{idx.min()}..{idx.max()} ({missing} missing: sampled slices); give the source "
                f"folder to read the whole volume")
    images = [readers.read_image(root / p) for p in layout["image_path"]]
    return Stack(task, source, idx, list(layout["image_id"]), images, "layout")


def _volume_stack(layout, root, path, task, source, clip) -> Stack | str:
    try:
        volume, _ = readers.read_volume(path)
    except InputError as exc:
        return f"source volume unreadable: {exc.problem}"
    if volume.ndim != 3:
        return f"source volume is {volume.ndim}-D, not 3-D"
    plane = layout["plane"].dropna().iloc[0] if "plane" in layout and layout["plane"].notna().any() else None
    if plane is None:
        return "the manifest has no plane for this volume"
    cut = preprocess.slices(volume, str(plane))
    images = []
    for k in range(cut.shape[0]):
        try:
            images.append(preprocess.minmax_normalize(cut[k], clip, path=path))
        except InputError:  # a constant slice (e.g. padding at the ends): all black
            images.append(np.zeros(cut.shape[1:], np.uint8))
    for r in layout.itertuples(index=False):
        k = int(r.slice_index)
        stored = readers.read_image(Path(root) / r.image_path)
        if k >= len(images) or stored.shape != images[k].shape or not np.array_equal(stored, images[k]):
            return (f"source volume {path.name} slice {k} differs from the layout's image {r.image_id} "
                    f"(another file, plane or normalisation: clip percentiles {clip})")
    names = dict(zip(layout["slice_index"].astype(int), layout["image_id"]))
    stem = _stem(str(layout["image_id"].iloc[0]), int(layout["slice_index"].iloc[0]))
    ids = [names.get(k, f"{stem}_{k:04d}") for k in range(len(images))]
    return Stack(task, source, np.arange(len(images)), ids, images, "volume")


# --------------------------------------------------------------------------------------------
# one object
# --------------------------------------------------------------------------------------------


def prompt_slice(areas: dict[int, int], rule: str = "largest") -> int:
    """The slice index that gets the one prompt of an object.

    Parameters
    ----------
    areas : ``{slice_index: object area in pixels}`` over the object's slices (all > 0).
    rule : ``"largest"`` (largest area; ties: the lowest index) or ``"middle"`` (the object's
        slice nearest ``(first + last) / 2``; ties: the lower).
    """
    if not areas:
        raise ValueError("prompt_slice: no slices")
    if rule == "largest":
        return min(areas, key=lambda k: (-areas[k], k))
    if rule == "middle":
        mid = (min(areas) + max(areas)) / 2
        return min(areas, key=lambda k: (abs(k - mid), k))
    raise ValueError(f"unknown prompt-slice rule {rule!r}; choose from {PROMPT_SLICES}")


def propagate_object(video, state, stack: Stack, start: int, box) -> np.ndarray:
    """Masks of one object on every slice of ``stack``, propagated from one box.

    Parameters
    ----------
    video : a predictor with ``add_box``, ``propagate``, ``reset`` (module docstring).
    state : its inference state over ``stack.images``.
    start : slice index (not position) of the prompted slice.
    box : ``[x0, y0, x1, y1]`` on that slice, original pixels.

    Returns
    -------
    bool array (N, H, W)
        In stack order. Forward from ``start`` to the last slice, then backward to the first
        (SAM 2 visits ``start`` in both passes and skips the backward pass from the first slice);
        the start slice keeps its forward mask.

    Raises
    ------
    RuntimeError
        The predictor skipped a slice or went the wrong way (a slice out of order).
    """
    pos = stack.position(start)
    video.reset(state)
    video.add_box(state, pos, box)
    out: dict[int, np.ndarray] = {}
    for reverse in (False, True):
        # SAM 2 visits the start slice in both passes, and skips the backward pass from slice 0.
        expected = (list(range(pos, -1, -1)) if pos > 0 else []) if reverse else list(range(pos, len(stack)))
        got = []
        for k, logits in video.propagate(state, pos, reverse):
            got.append(k)
            out.setdefault(k, np.asarray(logits) > 0)
        if got != expected:
            raise RuntimeError(f"propagation {'backward' if reverse else 'forward'} from slice {pos} "
                               f"visited {got[:8]}..., expected {expected[:8]}...")
    return np.stack([out[k] for k in range(len(stack))])


# --------------------------------------------------------------------------------------------
# a run
# --------------------------------------------------------------------------------------------


@dataclass
class PropagationRun:
    """What :func:`propagate` produced.

    Attributes
    ----------
    masks : ``{(model, strategy): {(task, image_id, label_value): mask}}`` -- providers for
        :func:`cosmoslib.protocol.volumes.volume_table`.
    extra : ``{(model, strategy): DataFrame}`` -- the stack slices without the object
        (``extra_slices`` of the volume table).
    info : DataFrame -- one row per (model, strategy, object): stack origin and size, prompt
        slice, seconds.
    skipped : list of ``(what, reason)``: volumes or models that were not propagated.
    """

    masks: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    info: pd.DataFrame = field(default_factory=pd.DataFrame)
    skipped: list = field(default_factory=list)


def propagate(manifest: pd.DataFrame, root, models: Sequence, rules: Sequence[str] = PROMPT_SLICES,
              source_dir=None, clip_percentiles=None, stacks_from: pd.DataFrame | None = None,
              progress: bool = False) -> PropagationRun:
    """Propagate every volume object of ``manifest`` with every model that has a video predictor.

    Parameters
    ----------
    manifest : DataFrame
        The objects to propagate (e.g. the evaluated ones); only volume slices are used.
    root : the COSMOS root.
    models : loaded models; those without ``video()`` (SAM, LiteMedSAM) are listed in
        ``skipped``.
    rules : prompt-slice rules (:data:`PROMPT_SLICES`).
    source_dir, clip_percentiles : see :func:`slice_stack`.
    stacks_from : DataFrame, optional
        Manifest rows the stacks are built from (default ``manifest``); pass the whole
        manifest when ``manifest`` is a subsample, so the layout's other objects' slices count.
    progress : tqdm bar over volumes.

    Returns
    -------
    PropagationRun
    """
    for rule in rules:
        prompt_slice({0: 1}, rule)  # unknown rule: fail before any work
    root = Path(root)
    run = PropagationRun()
    vrows = volumes.volume_rows(manifest)
    pool = volumes.volume_rows(stacks_from if stacks_from is not None else manifest)
    videos = []
    for model in models:
        if hasattr(model, "video"):
            videos.append((model.name, model.video()))
        else:
            run.skipped.append((model.name, "no video predictor (propagation needs a SAM 2 model)"))
    info = []
    groups = list(vrows.groupby(["task", "source"], sort=True))
    for (task, source), objects in tqdm(groups, desc="propagate", unit="vol", disable=not progress):
        if not videos:
            break
        stack = slice_stack(pool[(pool["task"] == task) & (pool["source"] == source)], root,
                            source_dir, clip_percentiles)
        if isinstance(stack, str):
            run.skipped.append((f"{task}/{source}", stack))
            continue
        for name, video in videos:
            state = video.init_state(stack.images)
            for value, rows in objects.groupby("label_value", sort=True):
                gt = {int(r.slice_index): readers.read_label(root / r.label_path) == int(value)
                      for r in rows.itertuples(index=False)}
                areas = {k: int(m.sum()) for k, m in gt.items() if m.any()}
                if not areas:
                    run.skipped.append((f"{task}/{source}/{value}", "object absent from its slices"))
                    continue
                inside = set(rows["slice_index"].astype(int))
                extra = pd.DataFrame([{"task": task, "source": source, "label_value": int(value),
                                       "slice_index": int(k), "image_id": i}
                                      for k, i in zip(stack.slice_index, stack.image_ids) if int(k) not in inside])
                for rule in rules:
                    start = prompt_slice(areas, rule)
                    began = time.perf_counter()
                    pred = propagate_object(video, state, stack, start, masks.tight_box(gt[start]))
                    seconds = time.perf_counter() - began
                    key = (name, RUN_NAMES[rule])
                    provider = run.masks.setdefault(key, {})
                    for k, image_id, m in zip(stack.slice_index, stack.image_ids, pred):
                        provider[(task, image_id, int(value))] = m
                    run.extra[key] = pd.concat([run.extra.get(key), extra], ignore_index=True)
                    info.append({"model": name, "strategy": RUN_NAMES[rule], "task": task, "source": source,
                                 "label_value": int(value), "stack_origin": stack.origin,
                                 "n_stack": len(stack), "prompt_slice": int(start), "prompts": 1,
                                 "missed_slices": int(sum(not pred[stack.position(k)].any() for k in inside)),
                                 "t_propagate_s": seconds})
    run.info = pd.DataFrame(info)
    return run


def volume_rows_with(run: PropagationRun, manifest: pd.DataFrame, root, **kwargs) -> pd.DataFrame:
    """The volume-table rows of the propagation runs (one call of
    :func:`cosmoslib.protocol.volumes.volume_table` per run: each has its own extra slices)."""
    parts = []
    for key, provider in run.masks.items():
        done = run.info[(run.info["model"] == key[0]) & (run.info["strategy"] == key[1])]
        objects = manifest.astype({"label_value": "int64"}).merge(
            done[["task", "source", "label_value"]].drop_duplicates())
        parts.append(volumes.volume_table(objects, {key: provider}, root=root,
                                          extra_slices=run.extra.get(key), **kwargs))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def propagation_table(volume_table: pd.DataFrame, info: pd.DataFrame) -> pd.DataFrame:
    """Each propagated object beside the per-slice protocol's S5 (box) row of the same volume.

    Parameters
    ----------
    volume_table : the volume table holding both the ``P-*`` rows and the per-slice rows.
    info : :attr:`PropagationRun.info`.

    Returns
    -------
    DataFrame, columns :data:`PROPAGATION_COLUMNS`
        ``dice, nsd, hd95``: the propagated volume in 3D (%, %, mm); ``*_s5``: the S5 run of
        the same model on the same object (NaN when S5 was not run); ``dice_gap`` = ``dice -
        dice_s5`` (percentage points; negative: propagation is worse); ``leaked_slices``:
        stack slices without the object where the propagated mask is not empty;
        ``missed_slices``: object slices where it is empty; ``prompts`` 1 against
        ``prompts_per_slice`` = one box per object slice.
    """
    key = ["model", "task", "source", "label_value"]
    prop = volume_table[volume_table["strategy"].isin(RUN_NAMES.values())]
    s5 = volume_table[volume_table["strategy"] == "S5"][[*key, "slice_dice", "dice", "nsd", "hd95"]]
    s5 = s5.rename(columns={"slice_dice": "slice_dice_s5", "dice": "dice_s5", "nsd": "nsd_s5", "hd95": "hd95_s5"})
    out = prop.merge(info, on=[*key, "strategy"], how="left").merge(s5, on=key, how="left")
    out["prompts_per_slice"] = out["n_slices"]
    out["leaked_slices"] = out["n_extra_fp"]
    out["dice_gap"] = out["dice"] - out["dice_s5"]
    return out[PROPAGATION_COLUMNS].reset_index(drop=True)


def propagation_path(out) -> Path:
    """``<out stem>.propagation.parquet`` beside the results table ``out``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.propagation.parquet")


def run_propagation(manifest: pd.DataFrame, root, models: Sequence, out, stacks_from=None,
                    rules: Sequence[str] = PROMPT_SLICES, source_dir=None, clip_percentiles=None,
                    progress: bool = False) -> tuple[pd.DataFrame, list]:
    """``cosmos evaluate --propagate``: add the propagation rows to the volume table beside ``out``.

    Reads ``<stem>.volumes.parquet`` (the per-slice rows :func:`cosmoslib.protocol.evaluate.evaluate`
    wrote), drops any earlier ``P-*`` rows, appends this run's, rewrites it, and writes
    :func:`propagation_table` to ``<stem>.propagation.parquet`` and what was not propagated, with
    why, to ``<stem>.propagation-skipped.csv``.

    Returns
    -------
    (DataFrame, list)
        The propagation table, and ``(what, reason)`` for every volume or model not propagated.
    """
    run = propagate(manifest, root, models, rules, source_dir, clip_percentiles, stacks_from, progress)
    vpath = evaluate.volumes_path(out)
    old = pd.read_parquet(vpath) if vpath.exists() else pd.DataFrame()
    if len(old):
        old = old[~old["strategy"].isin(RUN_NAMES.values())]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # spacing notes were given by the per-slice table
        new = volume_rows_with(run, manifest, root)
    if not volumes.has_volumes(manifest):
        run.skipped.append(("(all)", "no volume sources in the manifest: nothing to propagate"))
    if len(old) or len(new):
        table = pd.concat([t for t in (old, new) if len(t)], ignore_index=True)
        files.atomic_write_parquet(table, vpath)
    else:
        table = pd.DataFrame()
    summary = propagation_table(table, run.info) if len(run.info) else pd.DataFrame(columns=PROPAGATION_COLUMNS)
    files.atomic_write_parquet(summary, propagation_path(out))
    files.atomic_write_csv(pd.DataFrame(run.skipped, columns=["what", "reason"]), skipped_path(out))
    return summary, run.skipped


def skipped_path(out) -> Path:
    """``<out stem>.propagation-skipped.csv``: the volumes and models not propagated, with why."""
    out = Path(out)
    return out.with_name(f"{out.stem}.propagation-skipped.csv")
