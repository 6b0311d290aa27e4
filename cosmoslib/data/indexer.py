"""Index a COSMOS-layout folder -- ours or the authors' release -- into the manifest (paper 2.2).

One row per (image, object) with dataset, task, modality, object name, label value, paths,
source volume and slice, area, size, content digests (``image_sha``, ``label_sha``) and voxel
spacing, and whether the image was min-max normalised from more than 8 bits (``rescaled``).
Every image is decoded with the readers of :mod:`cosmoslib.data.readers`, so a file ``index``
accepts is one ``embed`` and ``evaluate`` can read, with the same pixels; anything else is
skipped and recorded as ``(file, reason)``.

The modality of a task comes from, first that gives one: an explicit ``{task: modality}``
override (``index(..., modality=...)``), the json key ``"modality"``, the catalog
(:func:`modality_from_catalog`: the descriptor whose ``task`` matches, or -- for the authors'
``<number>_<Name>`` task names -- descriptors matching the name part or the json's object names,
when they all agree on one modality), a modality token in the task name
(:func:`modality_from_task_name`), else ``"unknown"``; objects left unknown are counted and
named (:func:`unknown_modalities`, one warning, :class:`IndexReport`). Names are those of
:mod:`cosmoslib.vocabulary`. The dataset comes from the json key ``"dataset"``, the catalog,
else the task name.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cosmoslib import vocabulary
from cosmoslib.data import catalog
from cosmoslib.data.layout import _files_by_stem, find_tasks, read_task_json
from cosmoslib.data.readers import IMAGE_SUFFIXES, decode_image, read_label
from cosmoslib.files import (
    InputError,
    atomic_write_csv,
    atomic_write_parquet,
    file_digest,
)

MANIFEST_COLUMNS = [
    "dataset", "task", "modality", "object", "label_value", "image_id", "image_path",
    "label_path", "source", "slice_index", "area_px", "height", "width",
    "image_sha", "label_sha", "plane", "spacing_row", "spacing_col", "spacing_slice", "rescaled",
]

#: Bumped when :func:`index` gives another manifest for the same files (a stored manifest of an
#: older version is stale). 2: wider-than-8-bit images are min-max normalised and indexed (column
#: ``rescaled``) instead of skipped.
MANIFEST_VERSION = 2




#: Every modality name the vocabulary knows (re-exported from :mod:`cosmoslib.vocabulary`).
KNOWN_MODALITIES = vocabulary.KNOWN_MODALITIES

#: The authors' task names start with a number (``22_Heart``, ``6_Pancreas``, ``139_BrainTumor``).
_NUMERIC_PREFIX = re.compile(r"^\d+[\s_\-.]+(?=\S)")


def modality_from_task_name(task: str) -> str | None:
    """Find a modality token in a task name, or None.

    The name is split on ``_``, ``-``, ``.`` and spaces; runs of up to three consecutive tokens
    are joined and given to :func:`cosmoslib.vocabulary.canonical_modality` (vocabulary names
    and aliases such as ``xray``, ``ultrasound``, ``mr``, ``t1``, ``t2``, ``flair``, compared
    case-, space- and hyphen-insensitively). Longer runs win, then the leftmost. Tokens must
    match whole, so ``us`` is not found inside ``busi``.

    >>> modality_from_task_name("acdc_cine-mri")
    'Cine-MRI'
    >>> modality_from_task_name("brats_t1w_mri")
    'T1W MRI'
    """
    tokens = [t for t in re.split(r"[\s_\-.]+", task) if t]
    for n in (3, 2, 1):
        for i in range(len(tokens) - n + 1):
            name = vocabulary.canonical_modality("".join(tokens[i:i + n]))
            if name is not None:
                return name
    return None


@dataclass(frozen=True)
class CatalogMatch:
    """What the catalog says about a task (:func:`modality_from_catalog`).

    Attributes
    ----------
    modality : str or None
        The one modality all matching descriptors share; None when nothing matched or the
        matches disagree.
    dataset : str or None
        The one dataset name of the matching descriptors, else None.
    rule : str
        Which rule matched: ``'catalog task'``, ``'catalog dataset name'``,
        ``'catalog objects'``, ``'catalog object name'``, or ``''`` (none).
    candidates : tuple of (dataset name, tuple of modalities)
        The matching descriptors, for messages when they disagree.
    """

    modality: str | None
    dataset: str | None
    rule: str
    candidates: tuple = ()

    def describe(self) -> str:
        """``'ACDC (Cine-MRI); M&Ms (CMR)'``, or ``'no catalog match'``."""
        if not self.candidates:
            return "no catalog match"
        return "; ".join(f"{name} ({', '.join(mods) or 'modality not given'})"
                         for name, mods in self.candidates)


def _descriptor_modalities(desc) -> tuple[str, ...]:
    mods = (desc.modality,) if desc.modality else tuple(desc.modalities)
    return tuple(dict.fromkeys(vocabulary.canonical_modality(m) or m for m in mods))


def modality_from_catalog(task: str, objects=(), descriptors=None) -> CatalogMatch:
    """Dataset and modality of a task from the catalog (:func:`cosmoslib.data.catalog.load_catalog`).

    Rules, first that finds descriptors wins:

    1. ``catalog task``: a descriptor whose ``task`` is exactly ``task`` (our own layout).
    2. The authors' release names tasks ``<number>_<Name>`` (``22_Heart``, ``6_Pancreas``,
       ``139_BrainTumor``). No published table maps the numbers to datasets (the paper's
       Table 1 has 53 rows, the release uses 139), so the number is dropped and only the name
       part is matched (compared by :func:`cosmoslib.vocabulary.modality_key`: case, spaces
       and punctuation ignored):

       a. ``catalog dataset name``: descriptors whose dataset ``name`` is the name part
          (``1_ACDC`` -> ACDC);
       b. ``catalog objects``: descriptors listing every object name of the task json
          (``LeftVentricle, LeftVentricularMyocardium, RightVentricle`` -> ACDC, M&Ms);
       c. ``catalog object name``: descriptors listing the name part as an object and sharing
          at least one object with the task json, when it names any (``6_Pancreas`` with
          objects Pancreas, PancreaticMass -> AbdomenCT-1K, AMOS 2022; a ``Heart`` task whose
          objects the catalog's heart datasets do not list matches nothing).

    The modality is resolved only when all matching descriptors give one and the same
    modality (a descriptor's ``modality`` when set, else its ``modalities``): a ``Polyp`` task
    (CVC-ClinicDB, EndoTect 2020, ETIS-Larib, Kvasir-SEG) gives Colonoscopy, while ``22_Heart`` (ACDC Cine-MRI or M&Ms CMR) and ``6_Pancreas``
    (AbdomenCT-1K CT, AMOS CT/MRI) stay unresolved -- the catalog cannot tell, and a guess
    would put a wrong code into Table 6. Limits: only the catalog's objects are known (an
    object the catalog does not list, e.g. "PancreaticMass", defeats rule b), and a name part
    that is neither a dataset nor an object name matches nothing.

    Parameters
    ----------
    task : str
        The task (folder) name.
    objects : iterable of str
        Object names of the task json (may be empty).
    descriptors : list of Descriptor, optional
        The catalog (default: :func:`cosmoslib.data.catalog.load_catalog`).

    Returns
    -------
    CatalogMatch
    """
    if descriptors is None:
        descriptors = _load_descriptors()
    key = vocabulary.modality_key
    exact = [d for d in descriptors if d.task and d.task == task]
    if exact and exact[0].modality:
        d = exact[0]
        return CatalogMatch(vocabulary.canonical_modality(d.modality) or d.modality, d.name,
                            "catalog task", ((d.name, _descriptor_modalities(d)),))
    name_key = key(_NUMERIC_PREFIX.sub("", task))
    object_keys = {key(o) for o in objects} - {""}

    def object_names(d):
        return {key(o.name) for o in d.objects}

    rules = (
        ("catalog dataset name", lambda d: key(d.name) == name_key),
        ("catalog objects", lambda d: bool(object_keys) and object_keys <= object_names(d)),
        ("catalog object name", lambda d: bool(name_key) and name_key in object_names(d)
         and (not object_keys or bool(object_keys & object_names(d)))),
    )
    for rule, test in rules:
        found = [d for d in descriptors if test(d)]
        if not found:
            continue
        by_name: dict[str, tuple[str, ...]] = {}
        for d in found:
            by_name[d.name] = tuple(dict.fromkeys(by_name.get(d.name, ()) + _descriptor_modalities(d)))
        mods = {m for ms in by_name.values() for m in ms}
        modality = mods.pop() if len(mods) == 1 else None
        dataset = next(iter(by_name)) if len(by_name) == 1 else None
        return CatalogMatch(modality, dataset, rule, tuple(sorted(by_name.items())))
    return CatalogMatch(None, exact[0].name if exact else None, "catalog task" if exact else "")


def _load_descriptors() -> list:
    try:

        return catalog.load_catalog()
    except Exception as exc:  # the catalog is an optional hint here, never a reason to fail
        warnings.warn(f"catalog not available for dataset/modality inference ({exc})", stacklevel=3)
        return []


def _modality_overrides(modality, tasks, root) -> dict[str, str]:
    """Check a ``{task: modality}`` override against the tasks found; vocabulary names out.

    Raises
    ------
    InputError
        A task that is not under ``root`` or a name the vocabulary does not know.
    """
    if not modality:
        return {}
    if not hasattr(modality, "items"):
        raise InputError(root, f"modality override must map task -> modality, got {type(modality).__name__}")
    by_fold: dict[str, list[str]] = {}
    for t in tasks:
        by_fold.setdefault(t.casefold(), []).append(t)
    out = {}
    for task, name in modality.items():
        task = str(task).strip()
        target = task if task in tasks else (by_fold.get(task.casefold(), [None])[0]
                                             if len(by_fold.get(task.casefold(), [])) == 1 else None)
        if target is None:
            raise InputError(root, f"modality override for task {task!r}: no such task (tasks: "
                                   f"{', '.join(tasks) or 'none'})")
        canonical = vocabulary.canonical_modality(name)
        if canonical is None:
            raise InputError(root, f"modality override {task}={name!r}: not a known modality (known: "
                                   f"{', '.join(KNOWN_MODALITIES)})")
        out[target] = canonical
    return out


def _resolve_task(task, info, override, descriptors):
    """``(dataset, modality, source, detail)`` of one task, by the precedence of :func:`index`."""
    dataset, modality, source, detail = info.dataset, None, "", ""
    if task in override:
        modality, source = override[task], "override"
    elif info.modality:
        # a recognised spelling is stored as the vocabulary name, anything else as written
        modality, source = vocabulary.canonical_modality(info.modality) or info.modality, "json"
    match = None
    if dataset is None or modality is None:
        match = modality_from_catalog(task, info.names.values(), descriptors())
        dataset = dataset or match.dataset or task
    if modality is None and match.modality is not None:
        modality, source = match.modality, match.rule
    if modality is None:
        modality = modality_from_task_name(task)
        source = "task name" if modality is not None else "unknown"
        if modality is None:
            modality = vocabulary.UNKNOWN
            detail = (f"catalog candidates disagree: {match.describe()}" if match.candidates
                      else "no catalog match and no modality token in the task name")
    return dataset, modality, source, detail


def unknown_modalities(manifest) -> dict[str, int]:
    """Tasks whose objects have no modality the vocabulary knows: ``{task: n_objects}``.

    "Unknown" means :func:`cosmoslib.vocabulary.canonical_modality` returns None: the value
    ``"unknown"`` (nothing resolved it), missing, or a name outside the vocabulary (e.g. a
    json saying ``"M"``). Such objects get ``modality_code`` 18 in the factors table.

    Parameters
    ----------
    manifest : DataFrame
        Needs ``task`` and ``modality`` (a manifest, a factors or a results table).

    Returns
    -------
    dict
        Sorted by task; empty when every object's modality is known.
    """
    if missing := sorted({"task", "modality"} - set(manifest.columns)):
        raise KeyError(f"unknown_modalities: table lacks columns {missing}")
    pairs = manifest[["task", "modality"]].astype(object)
    known = {m: vocabulary.canonical_modality(m) is not None for m in pairs["modality"].dropna().unique()}
    bad = pairs[~pairs["modality"].map(known).fillna(False).astype(bool)]
    return {str(t): int(n) for t, n in sorted(bad.groupby("task").size().items())}


def _modality_message(unknown: dict, sources: dict) -> str:
    parts = []
    for task, n in unknown.items():
        modality, source, detail = sources.get(task, (None, "", ""))
        why = detail if source == "unknown" else f"{modality!r} from {source or 'the table'} is not a vocabulary name"
        parts.append(f"{task} ({n} object(s); {why})")
    return (f"modality unknown for {sum(unknown.values())} object(s) in {len(unknown)} task(s): "
            + ", ".join(parts) + "; their modality_code is 'unknown' (18). Name them with "
            "modality={task: name} (cosmos index/factors --modality TASK=NAME).")


def _attach_modality_info(df, sources: dict) -> dict:
    """Put the modality provenance into ``df.attrs`` and warn once; return the unknown tasks."""
    unknown = unknown_modalities(df)
    df.attrs["modality_source"] = {t: s for t, (_, s, _) in sorted(sources.items())}
    df.attrs["unknown_modality"] = unknown
    df.attrs["unknown_modality_tasks"] = list(unknown)
    if unknown:
        warnings.warn(_modality_message(unknown, sources), stacklevel=3)
    return unknown


def _scan(root, info_dir=None, progress=False, modality=None):
    """Build manifest rows; returns (rows, skipped, n_tasks, n_images, modality_sources, rescaled).

    ``modality`` is the ``{task: name}`` override of :func:`index`; ``modality_sources`` is
    ``{task: (modality, source, detail)}`` (see :func:`_resolve_task`); ``rescaled`` lists
    ``(image file, stored dtype)`` of the images min-max normalised to 0..255.
    """

    root = Path(root)
    tasks = find_tasks(root)
    override = _modality_overrides(modality, [t for t, _ in tasks], root)
    loaded: list = []  # the catalog, loaded on first need, once

    def descriptors():
        if not loaded:
            loaded.append(_load_descriptors())
        return loaded[0]

    sources: dict = {}
    rows, skipped = [], []
    rescaled: list[tuple[Path, str]] = []
    n_images = 0
    todo = []
    for task, folder in tasks:
        try:
            info = read_task_json(root, task, info_dir=info_dir, task_dir=folder)
        except InputError as exc:
            skipped.append((exc.path, exc.problem))
            continue
        dataset, modality, source, detail = _resolve_task(task, info, override, descriptors)
        sources[task] = (modality, source, detail)
        labels = _files_by_stem(folder / "labels", (".png",) + IMAGE_SUFFIXES[1:])
        for stem, ipath in _files_by_stem(folder / "images", IMAGE_SUFFIXES).items():
            todo.append((task, folder, info, dataset, modality, stem, ipath, labels.get(stem)))

    for task, folder, info, dataset, modality, stem, ipath, lpath in tqdm(
        todo, desc="index", unit="img", disable=not progress
    ):
        if lpath is None:
            skipped.append((ipath, "image without label"))
            continue
        # One verdict on input: the image is decoded by the same reader every later verb uses,
        # so a truncated file or a constant 16-bit image is skipped here, with its reason, rather
        # than accepted now and refused by `embed`/`evaluate` later, and a 16-bit image is
        # min-max normalised here exactly as there (a full decode costs about as much as the
        # label decode below; measured in the architecture notes).
        try:
            decoded = decode_image(ipath)
        except InputError as exc:
            skipped.append((exc.path, exc.problem))
            continue
        height, width = decoded.pixels.shape[:2]
        try:
            label = read_label(lpath)
        except InputError as exc:
            skipped.append((exc.path, exc.problem))
            continue
        if label.shape != (height, width):
            skipped.append((lpath, f"label {label.shape[1]}x{label.shape[0]} != image {width}x{height} (W x H)"))
            continue
        n_images += 1
        if decoded.rescaled:
            rescaled.append((ipath, decoded.stored_dtype))
        counts = np.bincount(label.ravel(), minlength=256)
        present = np.flatnonzero(counts[1:]) + 1
        if present.size == 0:
            skipped.append((lpath, "label has no object (all background)"))
            continue
        prov = info.images.get(stem, {}) if isinstance(info.images.get(stem), dict) else {}
        slice_index = prov.get("slice_index")
        spacing = prov.get("spacing") if isinstance(prov.get("spacing"), (list, tuple)) else ()
        spacing = [float(v) for v in spacing][:3] + [None] * (3 - len(spacing[:3]))
        digests = {"image_sha": file_digest(ipath), "label_sha": file_digest(lpath)}
        for value in present:
            value = int(value)
            if value not in info.names:
                skipped.append((lpath, f"label value {value} absent from {info.path.name}"))
                continue
            rows.append({
                "dataset": dataset,
                "task": task,
                "modality": modality,
                "object": info.names[value],
                "label_value": value,
                "image_id": stem,
                "image_path": ipath.relative_to(root).as_posix(),
                "label_path": lpath.relative_to(root).as_posix(),
                "source": prov.get("source"),
                "slice_index": None if slice_index is None else int(slice_index),
                "area_px": int(counts[value]),
                "height": int(height),
                "width": int(width),
                **digests,
                "plane": prov.get("plane"),
                "spacing_row": spacing[0],
                "spacing_col": spacing[1],
                "spacing_slice": spacing[2],
                "rescaled": bool(decoded.rescaled),
            })
    return rows, skipped, len(tasks), n_images, sources, rescaled


def _manifest_frame(rows):

    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    for col in ("label_value", "area_px", "height", "width"):
        df[col] = df[col].astype("int64")
    df["slice_index"] = df["slice_index"].astype("Int64")
    df["source"] = df["source"].astype(object).where(df["source"].notna(), None)
    df["plane"] = df["plane"].astype(object).where(df["plane"].notna(), None)
    df["rescaled"] = df["rescaled"].astype(bool)
    for col in ("spacing_row", "spacing_col", "spacing_slice"):
        df[col] = df[col].astype("float64")
    return df.sort_values(["task", "image_id", "label_value"], kind="stable").reset_index(drop=True)


def index(root, info_dir=None, progress: bool = False, modality=None):
    """Read a COSMOS-layout folder into the manifest.

    Parameters
    ----------
    root : folder in the COSMOS layout (ours or the authors' release).
    info_dir : folder holding the ``<task>.json`` files, when they are not beside the tasks.
    progress : show a tqdm bar (stderr).
    modality : dict, optional
        ``{task: modality name}`` (``cosmos index/factors --modality TASK=NAME``); names are
        read by :func:`cosmoslib.vocabulary.canonical_modality` and stored in its spelling.
        Overrides every other source.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`MANIFEST_COLUMNS`, one row per (image, object) present in the label PNG,
        sorted by task, image_id, label_value. ``image_path``/``label_path`` are relative to
        ``root`` (POSIX separators); ``area_px`` is the object's pixel count; ``source`` and
        ``slice_index`` come from the json's per-image provenance (null when absent; -1 marks a
        2D source image). ``rescaled`` is True for an image stored wider than 8 bits (a 16-bit
        PNG, an int16 TIFF) whose values were min-max normalised to 0..255
        (:func:`cosmoslib.data.readers.decode_image`, the paper's preprocessing rule); every
        later verb reads it the same way. Items that cannot be read are left out (with a
        warning); use :func:`index_to_parquet` to get the skipped list.

        A task's modality comes from, first that gives one: the ``modality`` override; the
        task json's ``"modality"``; the catalog (:func:`modality_from_catalog`: the task, or
        for the authors' ``<number>_<Name>`` tasks the name part / json objects, when every
        match agrees on one modality); a modality token in the task name
        (:func:`modality_from_task_name`); else ``"unknown"``. The dataset: json
        ``"dataset"``, the catalog, else the task name. ``attrs["modality_source"]`` records
        ``{task: 'override' | 'json' | 'catalog ...' | 'task name' | 'unknown'}``;
        ``attrs["unknown_modality"]`` is :func:`unknown_modalities` (``{task: n_objects}``)
        and ``attrs["unknown_modality_tasks"]`` its tasks; when any, one warning names them
        with the catalog candidates.

    Raises
    ------
    InputError
        ``root`` missing, or a ``modality`` override naming a task that is not under ``root``
        or a modality the vocabulary does not know.
    """
    rows, skipped, _, _, sources, _ = _scan(root, info_dir=info_dir, progress=progress, modality=modality)
    if skipped:
        warnings.warn(f"index({root}): {len(skipped)} item(s) skipped, first: {skipped[0][0]}: {skipped[0][1]}; "
                      f"fix or remove them (`cosmos index {root} --out manifest.parquet` lists every one "
                      f"in manifest.skipped.csv)", stacklevel=2)
    df = _manifest_frame(rows)
    _attach_modality_info(df, sources)
    return df


@dataclass
class IndexReport:
    """Result of :func:`index_to_parquet`."""

    root: Path
    out: Path
    n_tasks: int
    n_images: int
    n_rows: int
    n_skipped: int
    skipped: list
    skipped_csv: Path | None
    #: ``{task: n_objects}`` whose modality is unknown (:func:`unknown_modalities`).
    unknown_modality: dict = field(default_factory=dict)
    #: ``{task: source}`` of each task's modality (see :func:`index`).
    modality_source: dict = field(default_factory=dict)
    #: ``(image file, stored dtype)`` of the images wider than 8 bits that were min-max
    #: normalised to 0..255 (manifest column ``rescaled``).
    rescaled: list = field(default_factory=list)

    @property
    def n_unknown_modality(self) -> int:
        """Objects whose modality is unknown."""
        return sum(self.unknown_modality.values())

    def summary(self) -> str:
        """One paragraph: counts, skipped, where the outputs are."""
        text = (f"Indexed {self.root}: {self.n_tasks} task(s), {self.n_images} image(s), "
                f"{self.n_rows} (image, object) row(s) written to {self.out}.")
        if self.n_skipped:
            first = self.skipped[0]
            text += (f" {self.n_skipped} item(s) skipped (e.g. {first[0]}: {first[1]}); "
                     f"the full list is in {self.skipped_csv}.")
        else:
            text += " Nothing was skipped."
        if self.rescaled:
            dtypes = ", ".join(sorted({d for _, d in self.rescaled}))
            text += (f" {len(self.rescaled)} image(s) stored wider than 8 bits ({dtypes}; e.g. "
                     f"{self.rescaled[0][0]}) were min-max normalised to 0..255 as in the paper's "
                     "preprocessing (manifest column rescaled).")
        if self.unknown_modality:
            tasks = ", ".join(f"{t} ({n})" for t, n in self.unknown_modality.items())
            text += (f" Modality unknown for {self.n_unknown_modality} object(s) of task(s) {tasks}; "
                     "name it with --modality TASK=NAME.")
        else:
            text += " Every object has a known modality."
        return text


def index_to_parquet(root, out, info_dir=None, progress: bool = True, modality=None) -> IndexReport:
    """Index ``root`` (see :func:`index`) and write the manifest to ``out`` (Parquet, atomic).

    The skipped items ``(file, reason)`` go to ``<out stem>.skipped.csv`` next to ``out``
    (replaced on every run: the index is always rebuilt whole). ``modality`` is the
    ``{task: name}`` override of :func:`index`; unknown modalities are warned about once and
    named in :meth:`IndexReport.summary`.
    """

    out = Path(out)
    rows, skipped, n_tasks, n_images, sources, rescaled = _scan(root, info_dir=info_dir, progress=progress,
                                                                modality=modality)
    df = _manifest_frame(rows)
    unknown = _attach_modality_info(df, sources)
    atomic_write_parquet(df, out)
    skipped_csv = out.with_name(f"{out.stem}.skipped.csv")
    atomic_write_csv(pd.DataFrame([(str(f), r) for f, r in skipped], columns=["file", "reason"]), skipped_csv)
    return IndexReport(root=Path(root), out=out, n_tasks=n_tasks, n_images=n_images, n_rows=len(df),
                       n_skipped=len(skipped), skipped=[(str(f), r) for f, r in skipped],
                       skipped_csv=skipped_csv, unknown_modality=unknown,
                       modality_source=dict(df.attrs["modality_source"]),
                       rescaled=[(str(f), d) for f, d in rescaled])
