"""What makes an object hard: the five object factors of paper section 4.8.

For every (image, object) the paper records five properties and correlates each with SAM's
DICE (Table 6, computed in :mod:`cosmoslib.analysis.stats`):

``size_px`` -- :func:`size`
    Pixel area of the ground-truth (GT) mask, in pixels.
``aspect_ratio`` -- :func:`aspect_ratio`
    Short side / long side of the tight GT bounding box (0..1]; sides are counted inclusively
    in pixels, so a one-pixel-wide object has side 1.
``intensity_diff`` -- :func:`contrast`
    Contrast magnitude ``|mean inside - mean of surroundings|``, the paper's reading ("poor ...
    with low contrast" is about magnitude). The surroundings are the bounding box enlarged
    outward by 0.1 x its width on the left and on the right and 0.1 x its height at the top
    and at the bottom (each margin rounded *up* to whole pixels, so every object gets at least
    a one-pixel ring), clipped to the image, without the object itself. Units: grey levels of
    the 0..255 normalised image; RGB is first turned into luma with ITU-R BT.601 weights
    (0.299 R + 0.587 G + 0.114 B, as PIL's ``'L'`` mode, kept as float). NaN when the
    surroundings are empty (the object fills its enlarged box, e.g. the whole image).
``intensity_diff_signed`` -- :func:`intensity_difference`
    The same difference with its sign (positive = object brighter), kept as its own column.
``modality_code`` -- :func:`modality_code`
    A fixed integer per modality (:data:`MODALITY_CODES`, from :mod:`cosmoslib.vocabulary`:
    the paper's 18 modalities in alphabetical order, "unknown" 18), stable across runs.
``fourier_order`` -- :func:`fourier_order`
    Boundary complexity as the elliptic-Fourier order needed to redraw the object's outer
    contour (Eq. 2-3), DICE taken against the region that contour encloses (holes filled), as
    the paper defines it. ``fourier_order_mask`` is the same search with DICE against the whole
    mask (holes and other parts penalised); :func:`fo_reference_effect` compares the two.

:func:`compute_factors` applies them to a manifest and :func:`factors_cli` backs
``cosmos factors ROOT --out factors.parquet``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cosmoslib import files, vocabulary
from cosmoslib.analysis.fourier import count_holes, fourier_order
from cosmoslib.data import indexer, readers
from cosmoslib.masks import box_sides, margin_box, object_mask, tight_box

#: Re-exported from :mod:`cosmoslib.vocabulary` (the one modality vocabulary): the paper's 18
#: modalities in case-insensitive alphabetical order, then "unknown" (18).
MODALITY_CODES: dict[str, int] = vocabulary.MODALITY_CODES

#: ITU-R BT.601 luma weights (R, G, B), the ones PIL uses for mode "L".
LUMA_BT601 = (0.299, 0.587, 0.114)

#: Columns of the factors table, in order.
FACTOR_COLUMNS = (
    "task", "image_id", "label_value", "object", "modality", "size_px", "aspect_ratio",
    "intensity_diff", "intensity_diff_signed", "modality_code", "fourier_order",
    "fourier_order_raw", "efd_dice", "n_contours", "n_holes", "fo_stopped_by",
    "fourier_order_mask", "efd_dice_mask",
)

_KEY = ["task", "image_id", "label_value"]


# --------------------------------------------------------------------------------------------
# Simple factors
# --------------------------------------------------------------------------------------------


def size(mask: np.ndarray) -> int:
    """Object size: number of mask pixels.

    Raises
    ------
    ValueError
        For an empty or non-2-D mask.
    """
    return int(object_mask(mask).sum())


def aspect_ratio(mask: np.ndarray) -> float:
    """Short side / long side of the tight bounding box, in ``(0, 1]``.

    Sides are counted inclusively in pixels (``x1 - x0 + 1``), so a 1 x 20 line gives 0.05
    and a single pixel gives 1.
    """
    w, h = box_sides(tight_box(mask))
    return min(w, h) / max(w, h)


def to_grey(image: np.ndarray) -> np.ndarray:
    """Float grey levels of an image: (H, W) as is, (H, W, 3) RGB -> BT.601 luma.

    RGBA (H, W, 4) drops the alpha channel first.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        return image.astype(float)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return image[..., :3].astype(float) @ np.asarray(LUMA_BT601)
    raise ValueError(f"image must be (H, W) or (H, W, 3), got shape {image.shape}")


def intensity_difference(image: np.ndarray, mask: np.ndarray, ratio: float = 0.1) -> float:
    """Mean intensity inside the object minus mean over its surroundings (grey levels).

    Parameters
    ----------
    image : (H, W) or (H, W, 3) array
        The 0..255 normalised image; RGB is reduced to BT.601 luma (see :func:`to_grey`).
    mask : (H, W) bool array
        The object.
    ratio : float
        Outward growth of the bounding box per side, as a fraction of that side (paper: 0.1),
        rounded up to whole pixels (see :func:`cosmoslib.masks.margin_box`).

    Returns
    -------
    float
        ``mean(object) - mean(enlarged box minus object)``; positive when the object is
        brighter. NaN when that surrounding region is empty. Other objects inside the enlarged
        box count as surroundings.
    """
    mask = object_mask(mask)
    grey = to_grey(image)
    if grey.shape != mask.shape:
        raise ValueError(f"image {grey.shape} and mask {mask.shape} differ in size")
    x0, y0, x1, y1 = (int(v) for v in margin_box(mask, ratio))
    region = np.zeros_like(mask)
    region[y0 : y1 + 1, x0 : x1 + 1] = True
    surround = region & ~mask
    if not surround.any():
        return float("nan")
    return float(grey[mask].mean() - grey[surround].mean())


def contrast(image: np.ndarray, mask: np.ndarray, ratio: float = 0.1) -> float:
    """Contrast magnitude ``|intensity_difference(image, mask, ratio)|`` in grey levels.

    The paper's reading of the intensity factor ("SAM performs poorly ... with low contrast"
    is about how far the object's grey level is from its surroundings, in either direction):
    the ``intensity_diff`` column of the factors table. NaN where
    :func:`intensity_difference` is NaN (empty surroundings).
    """
    return abs(intensity_difference(image, mask, ratio))


def modality_code(modality: str | None) -> int:
    """The fixed integer code of a modality name (:func:`cosmoslib.vocabulary.modality_code`).

    Matching ignores case and every non-alphanumeric character and knows a few aliases
    ("Ultrasound" -> US, "X ray" -> X-ray, "MR" -> MRI, "T1W" -> T1W MRI, ...). The paper's 18
    modalities get 0..17 (:data:`MODALITY_CODES`), the vocabulary's extra names (PET, OCT, ...)
    19 and up; anything else, including None/NaN/"unknown", is ``MODALITY_CODES["unknown"]``
    (18).
    """
    return vocabulary.modality_code(modality)


# --------------------------------------------------------------------------------------------
# A manifest's factors
# --------------------------------------------------------------------------------------------


_FO_KWARGS = ("n", "dice_stop", "min_gain", "max_order", "patience")


def _check_fo_kwargs(fo_kwargs: dict) -> None:
    if bad := sorted(set(fo_kwargs) - set(_FO_KWARGS)):
        raise TypeError(
            f"unexpected Fourier-order option(s) {bad}; allowed: {list(_FO_KWARGS)} (the table "
            "always holds both references: fourier_order (outer) and fourier_order_mask)")


def object_factors(image: np.ndarray, mask: np.ndarray, modality: str | None = None,
                   **fo_kwargs) -> dict:
    """All factors of one object as a dict of the factor columns (no key columns).

    ``fourier_order``, ``fourier_order_raw``, ``efd_dice`` and ``fo_stopped_by`` use the
    paper's reference (:func:`fourier_order` with ``reference='outer'``);
    ``fourier_order_mask`` and ``efd_dice_mask`` the whole mask (computed only when the mask
    has more than one boundary; otherwise the two are the same numbers).
    ``intensity_diff`` is the contrast magnitude (:func:`contrast`) and
    ``intensity_diff_signed`` the signed :func:`intensity_difference`.
    ``fo_kwargs``: ``n, dice_stop, min_gain, max_order, patience`` of :func:`fourier_order`.
    """
    _check_fo_kwargs(fo_kwargs)
    fo = fourier_order(mask, **fo_kwargs)
    fo_mask = fourier_order(mask, reference="mask", **fo_kwargs) if fo.n_contours > 1 else fo
    signed = intensity_difference(image, mask)
    return dict(
        size_px=size(mask),
        aspect_ratio=aspect_ratio(mask),
        intensity_diff=abs(signed),
        intensity_diff_signed=signed,
        modality_code=modality_code(modality),
        fourier_order=fo.order,
        fourier_order_raw=fo.raw_order,
        efd_dice=fo.dice,
        n_contours=fo.n_contours,
        n_holes=count_holes(mask) if fo.n_contours > 1 else 0,
        fo_stopped_by=fo.stopped_by,
        fourier_order_mask=fo_mask.order,
        efd_dice_mask=fo_mask.dice,
    )


def _iter_images(manifest: pd.DataFrame, root: Path, fo_kwargs: dict, progress: bool):
    """Yield ``(rows, skipped)`` per image: factor dicts (with the manifest row number in
    ``_row``) for its objects, and ``(file, reason)`` pairs for the objects that failed."""


    groups = manifest.groupby(["image_path", "label_path"], sort=False, dropna=False)
    for (image_path, label_path), group in tqdm(
        groups, total=groups.ngroups, desc="factors", unit="image", disable=not progress
    ):
        keys = []
        for row_number, rec in zip(group.index, group.to_dict("records")):
            keys.append({c: rec.get(c) for c in ("task", "image_id", "label_value", "object",
                                                "modality")} | {"_row": row_number})
        rows = [dict(k, modality_code=modality_code(k["modality"])) for k in keys]
        skipped: list[tuple[str, str]] = []
        try:
            image = readers.read_image(root / image_path)
            label = readers.read_label(root / label_path)
        except Exception as exc:  # noqa: BLE001 -- a bad file must not stop a batch
            where = getattr(exc, "path", None) or root / image_path
            skipped.extend((str(where), f"{type(exc).__name__}: {exc}") for _ in keys)
            yield rows, skipped
            continue
        for row in rows:
            try:
                mask = label == int(row["label_value"])
                row.update(object_factors(image, mask, row["modality"], **fo_kwargs))
            except Exception as exc:  # noqa: BLE001 -- one bad object must not stop a batch
                skipped.append((str(root / label_path),
                                f"label {row['label_value']}: {type(exc).__name__}: {exc}"))
        yield rows, skipped


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """The factors columns in order, with nullable integers where a value may be missing."""
    df = df.reindex(columns=list(FACTOR_COLUMNS))
    for col in ("label_value", "size_px", "modality_code", "fourier_order_raw", "n_contours",
                "n_holes"):
        df[col] = df[col].astype("Int64")
    for col in ("aspect_ratio", "intensity_diff", "intensity_diff_signed", "fourier_order",
                "efd_dice", "fourier_order_mask", "efd_dice_mask"):
        df[col] = df[col].astype(float)
    for col in ("task", "image_id", "object", "modality", "fo_stopped_by"):
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    return df


def compute_factors(
    manifest: pd.DataFrame,
    root: str | Path,
    *,
    progress: bool = True,
    **fo_kwargs,
) -> pd.DataFrame:
    """The factors table of a manifest: one row per manifest row, in manifest order.

    Each image and label is read once (:func:`cosmoslib.data.readers.read_image`,
    :func:`cosmoslib.data.readers.read_label`); the object is ``label == label_value``.

    Parameters
    ----------
    manifest : DataFrame
        Needs ``task, image_id, label_value, image_path, label_path``; ``object`` and
        ``modality`` are copied when present. Paths are relative to ``root``.
    root : path
        The COSMOS root.
    progress : bool
        Show a tqdm bar over images (stderr).
    **fo_kwargs
        Passed to :func:`fourier_order` (``n, dice_stop, min_gain, max_order, patience``).

    Returns
    -------
    DataFrame
        Columns :data:`FACTOR_COLUMNS`. An unreadable image or a failing object gives NaN
        factors (the key columns stay) and is recorded in ``df.attrs["skipped"]`` as a list of
        ``(file, reason)``; it never stops the batch. ``df.attrs["unknown_modality"]`` is
        ``{task: n_objects}`` for the tasks whose modality the vocabulary does not know
        (``modality_code`` 18; see :func:`cosmoslib.data.indexer.unknown_modalities`).
    """

    _check_fo_kwargs(fo_kwargs)
    missing = {"task", "image_id", "label_value", "image_path", "label_path"} - set(manifest)
    if missing:
        raise ValueError(f"manifest lacks columns {sorted(missing)}")
    manifest = manifest.reset_index(drop=True)
    rows: list[dict] = []
    skipped: list[tuple[str, str]] = []
    for image_rows, image_skipped in _iter_images(manifest, Path(root), fo_kwargs, progress):
        rows.extend(image_rows)
        skipped.extend(image_skipped)
    # groupby visits images in first-appearance order; restore the manifest's row order.
    rows.sort(key=lambda r: r["_row"])
    df = _typed(pd.DataFrame(rows))
    df.attrs["skipped"] = skipped
    df.attrs["unknown_modality"] = indexer.unknown_modalities(df) if "modality" in manifest else {}
    return df


def fo_reference_effect(factors: pd.DataFrame, by: str | list[str] = "object") -> pd.DataFrame:
    """How much the Fourier-order reference moves FO, for the objects where it can.

    The two references of :func:`fourier_order` differ only for masks with more than one
    boundary (``n_contours > 1``: holes, or several parts). For those objects, per group:

    ``n`` (objects with more than one boundary), ``n_holed`` (of which with at least one
    hole), ``fo_median`` (the paper's FO, decoded contour vs filled outer region),
    ``fo_mask_median`` (vs the whole mask), ``shift_median`` and ``shift_max`` (of
    ``fourier_order_mask - fourier_order``), ``efd_dice_median`` and
    ``efd_dice_mask_median`` (DICE % at the stopping order).

    Parameters
    ----------
    factors : DataFrame
        A factors table of :func:`compute_factors` (needs ``n_contours, n_holes,
        fourier_order, fourier_order_mask, efd_dice, efd_dice_mask`` and the ``by`` columns).
    by : str or list of str
        Grouping columns (default ``object``; e.g. ``["object", "modality"]``).

    Returns
    -------
    DataFrame
        One row per group, sorted by ``shift_median`` descending; empty (with these columns)
        when no object has more than one boundary. Objects whose factors could not be
        computed (NaN FO) are left out.
    """
    by = [by] if isinstance(by, str) else list(by)
    need = {"n_contours", "n_holes", "fourier_order", "fourier_order_mask", "efd_dice",
            "efd_dice_mask", *by}
    if missing := sorted(need - set(factors)):
        raise KeyError(f"fo_reference_effect: factors table lacks columns {missing} "
                       "(recompute it with this version of cosmoslib.analysis.factors)")
    columns = [*by, "n", "n_holed", "fo_median", "fo_mask_median", "shift_median", "shift_max",
               "efd_dice_median", "efd_dice_mask_median"]
    multi = factors[(factors["n_contours"] > 1).fillna(False)
                    & factors["fourier_order"].notna() & factors["fourier_order_mask"].notna()]
    if multi.empty:
        return pd.DataFrame(columns=columns)
    multi = multi.assign(_shift=multi["fourier_order_mask"] - multi["fourier_order"],
                         _holed=(multi["n_holes"] > 0).astype(int))
    out = multi.groupby(by, sort=True, dropna=False).agg(
        n=("_shift", "size"), n_holed=("_holed", "sum"),
        fo_median=("fourier_order", "median"), fo_mask_median=("fourier_order_mask", "median"),
        shift_median=("_shift", "median"), shift_max=("_shift", "max"),
        efd_dice_median=("efd_dice", "median"), efd_dice_mask_median=("efd_dice_mask", "median"),
    ).reset_index()
    return out.sort_values(["shift_median", *by], ascending=[False] + [True] * len(by),
                           kind="stable").reset_index(drop=True)[columns]


@dataclass
class FactorsReport:
    """What :func:`factors_cli` did."""

    out: Path
    n_objects: int
    n_images: int
    n_computed: int
    n_reused: int
    n_intensity_nan: int
    n_fo_cap: int
    skipped: list[tuple[str, str]]
    skipped_csv: Path
    seconds: float
    unknown_modality: dict = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        """Objects whose factors could not be computed in this run."""
        return len(self.skipped)

    def summary(self) -> str:
        """One paragraph for the command line."""
        text = (
            f"Factors of {self.n_objects} objects in {self.n_images} images written to "
            f"{self.out} ({self.n_computed} computed, {self.n_reused} reused from an earlier "
            f"run, {self.seconds:.1f} s). Intensity difference undefined (object fills its "
            f"enlarged box) for {self.n_intensity_nan}; the Fourier-order search hit the order "
            f"cap for {self.n_fo_cap}."
        )
        if self.skipped:
            text += (f" Skipped {self.n_skipped} objects (NaN factors), listed in "
                     f"{self.skipped_csv}.")
        else:
            text += " Nothing skipped."
        if self.unknown_modality:
            tasks = ", ".join(f"{t} ({n})" for t, n in self.unknown_modality.items())
            text += (f" Modality unknown (modality_code {MODALITY_CODES['unknown']}) for "
                     f"{sum(self.unknown_modality.values())} objects of task(s) {tasks}; "
                     "name it with modality={task: name} (cosmos factors --modality TASK=NAME).")
        return text


def _assemble(keys: pd.DataFrame, parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Factor rows for the manifest ``keys``, in manifest order (later parts win).

    ``keys`` holds the key columns and ``modality``: the modality (and its code) always come
    from the current manifest, so a rerun with another ``--modality`` updates reused rows.
    """
    parts = [p for p in parts if len(p)]
    if not parts:
        return _typed(pd.DataFrame(columns=list(FACTOR_COLUMNS)))
    table = _typed(pd.concat([_typed(p) for p in parts], ignore_index=True))
    table = table.drop_duplicates(_KEY, keep="last").drop(columns=["modality", "modality_code"])
    # An inner merge keeps the left (manifest) order.
    merged = keys.merge(table, on=_KEY, how="inner")
    merged["modality_code"] = [modality_code(m) for m in merged["modality"]]
    return _typed(merged)


def factors_cli(
    root: str | Path,
    out: str | Path,
    info_dir: str | Path | None = None,
    *,
    modality: dict[str, str] | None = None,
    chunk_images: int = 200,
    progress: bool = True,
    scheduler=None,
    threads: int = 1,
    **fo_kwargs,
) -> FactorsReport:
    """``cosmos factors``: index a COSMOS root, compute the factors, write Parquet.

    Parameters
    ----------
    root : path
        The COSMOS root, indexed with :func:`cosmoslib.data.indexer.index`.
    out : path
        The factors Parquet file to write.
    info_dir : path, optional
        Folder of the ``<task>.json`` files, passed to the indexer.
    modality : dict, optional
        ``{task: modality name}`` overriding every other source of a task's modality
        (passed to :func:`cosmoslib.data.indexer.index`; ``cosmos factors --modality TASK=NAME``).
    chunk_images : int
        Rewrite ``out`` (atomically) after every this many images; with ``scheduler`` also the
        images of one Dask task.
    progress : bool
        tqdm bar over images on stderr.
    scheduler : None (this process), or a Dask scheduler (``"local:N"``, ``"tcp://HOST:PORT"``,
        ``"slurm:cluster.yaml"``, or a ``distributed.Client``; see
        :func:`cosmoslib.protocol.distributed.client_for`): the chunks are computed on its workers and
        ``out`` is rewritten as each finishes. The table and the skipped list are the same.
    threads : threads per Dask worker made here (ignored without ``scheduler``).
    **fo_kwargs
        Passed to :func:`fourier_order`.

    Returns
    -------
    FactorsReport
        Counts and the problems met. Resumable: rows already in ``out`` whose image could be
        read (``size_px`` present) are kept, not recomputed, so an interrupted run loses at most
        one chunk; ``modality`` and ``modality_code`` of reused rows are refreshed from the
        current index. Problems of this run go to ``<out stem>.skipped.csv``
        (``file, reason``) next to ``out``.
    """


    _check_fo_kwargs(fo_kwargs)
    t0 = time.perf_counter()
    root, out = Path(root), Path(out)
    manifest = indexer.index(root, info_dir=info_dir, progress=progress,
                        modality=modality).reset_index(drop=True)
    keys = _typed(manifest.reindex(columns=[*_KEY, "modality"]))[[*_KEY, "modality"]]

    done = pd.DataFrame(columns=list(FACTOR_COLUMNS))
    if out.exists():
        previous = pd.read_parquet(out)
        if set(FACTOR_COLUMNS) <= set(previous):
            done = _typed(previous.loc[previous["size_px"].notna()])
    done_keys = pd.MultiIndex.from_frame(done[_KEY].astype({"label_value": "Int64"}))
    todo = manifest[~pd.MultiIndex.from_frame(keys[_KEY]).isin(done_keys)]
    n_reused = len(manifest) - len(todo)

    images = todo[["image_path", "label_path"]].drop_duplicates()
    parts = [done]
    skipped: list[tuple[str, str]] = []
    bar = tqdm(total=len(images), desc="factors", unit="image", disable=not progress)
    if scheduler is None:
        for start in range(0, len(images), chunk_images):
            chunk = todo.merge(images.iloc[start : start + chunk_images],
                               on=["image_path", "label_path"])
            rows: list[dict] = []
            for image_rows, image_skipped in _iter_images(chunk, root, fo_kwargs, progress=False):
                rows.extend(image_rows)
                skipped.extend(image_skipped)
                bar.update(1)
            parts.append(_typed(pd.DataFrame(rows)))
            files.atomic_write_parquet(_assemble(keys, parts), out)
    else:
        # Dask (and torch, through the worker plugin module) load only for --scheduler runs.
        from cosmoslib.protocol import distributed

        chunks = [todo.merge(images.iloc[start : start + chunk_images], on=["image_path", "label_path"])
                  for start in range(0, len(images), chunk_images)]
        by_chunk: dict[int, list] = {}
        for i, (frame, chunk_skipped) in distributed.map_groups(
                scheduler, chunk_factors, chunks, root, fo_kwargs, threads=threads, progress=False):
            by_chunk[i] = chunk_skipped
            parts.append(frame)
            bar.update(int(chunks[i][["image_path", "label_path"]].drop_duplicates().shape[0]))
            files.atomic_write_parquet(_assemble(keys, parts), out)
        skipped = [s for i in sorted(by_chunk) for s in by_chunk[i]]  # in image order, as in one process
    bar.close()
    table = _assemble(keys, parts)
    files.atomic_write_parquet(table, out)

    skipped_csv = out.with_name(out.stem + ".skipped.csv")
    files.atomic_write_csv(pd.DataFrame(skipped, columns=["file", "reason"]), skipped_csv)
    return FactorsReport(
        out=out,
        n_objects=len(table),
        n_images=len(manifest[["image_path", "label_path"]].drop_duplicates()),
        n_computed=len(todo),
        n_reused=n_reused,
        n_intensity_nan=int((table["intensity_diff"].isna() & table["size_px"].notna()).sum()),
        n_fo_cap=int((table["fo_stopped_by"] == "cap").sum()),
        skipped=skipped,
        skipped_csv=skipped_csv,
        seconds=time.perf_counter() - t0,
        unknown_modality=indexer.unknown_modalities(manifest),
    )


def chunk_factors(chunk: pd.DataFrame, root: str | Path, fo_kwargs: dict | None = None
                  ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The factor rows of the objects of ``chunk`` (manifest rows of some images) and what failed.

    One work unit of :func:`factors_cli` (in this process, or a Dask task with ``scheduler``).

    Returns
    -------
    (DataFrame, list of (file, reason))
        Rows with the columns of :data:`FACTOR_COLUMNS` (NaN factors where an object failed),
        and the failures in image order.
    """
    rows: list[dict] = []
    skipped: list[tuple[str, str]] = []
    for image_rows, image_skipped in _iter_images(chunk, Path(root), dict(fo_kwargs or {}), progress=False):
        rows.extend(image_rows)
        skipped.extend(image_skipped)
    return _typed(pd.DataFrame(rows)), skipped
