"""The COSMOS release layout: writing it and finding its tasks, images and json (paper 2.2).

Three jobs live here:

1. **Reading raw data** for :mod:`cosmoslib.data.preprocess`: :func:`read_volume` (NIfTI/MGH
   through nibabel, NRRD and MHA/MHD through SimpleITK), :func:`read_raw_image` and
   :func:`read_raw_label` (PNG/BMP/JPG/TIF, any bit depth).
2. **Writing the COSMOS layout**: :func:`write_pair` and :func:`write_task`.
3. **Reading a COSMOS-layout folder** -- ours or the authors' release -- into the manifest:
   :func:`index`, :func:`index_to_parquet`, :func:`list_images`, :func:`read_image`,
   :func:`read_label`, :func:`read_task_json`.

The COSMOS layout
-----------------
::

    ROOT/<task>/images/<image_id>.png     uint8, (H, W) grey or (H, W, 3) RGB
    ROOT/<task>/labels/<image_id>.png     uint8 (H, W); 0 = background, one value per object
    ROOT/<task>.json                      {"info": {"1": "Left Ventricle", ...},
                                           "color": {"1": 85, ...}}

``info`` maps an object id (a string key) to the object's name, ``color`` maps the same id to
the object's pixel value in the label PNG -- the format of the authors' release. Several ids may
carry the same name (left and right kidney: two values, one name "Kidney"; cell instances: 255
values named "Cell"). Our writer adds optional keys that readers must not require:
``"task"``, ``"dataset"``, ``"modality"``, ``"format"`` and ``"images"`` (per-image provenance:
``{"<image_id>": {"source": "<path relative to the source folder>", "slice_index": k}}``, with
``"frame"`` for 4D data and ``"part"`` for split instance maps). Image names are
``<source-stem>_<slice:04d>`` for slices of volumes and ``<source-stem>`` for 2D images.

Reading is lenient where it is safe and loud where it is not:

* tasks are the folders below ROOT (at any depth) that hold an ``images`` folder; the json may
  sit in ``info_dir/<task>.json``, ``ROOT/<task>.json``, ``ROOT/<task>/<task>.json`` or next to a
  nested task folder (file names compared case-insensitively);
* images may be ``.png``, ``.jpg``, ``.jpeg``, ``.bmp`` or ``.tif``; labels are looked up by the
  same stem (``.png`` first); grey or RGB images, names with spaces or any unicode;
* json keys are strings (``"1"``) or numbers, ``color`` values ints or numeric strings; a json
  without ``color`` is read as id == pixel value (with a warning);
* an image without label, a size mismatch, an unreadable PNG, a label value absent from the json
  or a task without json never stop the reader: the item is left out of the manifest and
  recorded as ``(file, reason)`` in the skipped list (``*.skipped.csv`` for
  :func:`index_to_parquet`). A json whose two ids give one pixel value two different names is
  ambiguous and fails the task loudly.

Indexing such a folder into the manifest is :mod:`cosmoslib.data.indexer`.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cosmoslib.data.readers import IMAGE_SUFFIXES, encode_png
from cosmoslib.files import (
    InputError,
    atomic_write_bytes,
    atomic_write_json,
)

# --------------------------------------------------------------------------------------------
# writing the COSMOS layout
# --------------------------------------------------------------------------------------------


def write_pair(root, task: str, image_id: str, image: np.ndarray, label: np.ndarray) -> tuple[Path, Path]:
    """Write one image and its label map as ``ROOT/<task>/{images,labels}/<image_id>.png``.

    Both files are written atomically; the image must be uint8 (H, W) or (H, W, 3), the label
    uint8 (H, W) of the same height and width.
    """
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"label must be uint8 (H, W), got {label.dtype} {label.shape}")
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image.shape[:2]} and label {label.shape} differ in size")
    task_dir = Path(root) / task
    ipath = atomic_write_bytes(task_dir / "images" / f"{image_id}.png", encode_png(image))
    lpath = atomic_write_bytes(task_dir / "labels" / f"{image_id}.png", encode_png(label))
    return ipath, lpath


def write_task(root, task: str, objects, *, dataset=None, modality=None, images=None, extra=None) -> Path:
    """Write ``ROOT/<task>.json`` in the authors' format, plus our optional keys.

    Parameters
    ----------
    objects : mapping ``{pixel value: object name}``
        Object ids are assigned ``1..n`` in increasing pixel value, so the json is the same for
        the same objects.
    dataset, modality : str, optional
        Stored as ``"dataset"``/``"modality"``.
    images : mapping ``{image_id: {"source": str, "slice_index": int, ...}}``, optional
        Per-image provenance, stored as ``"images"``.
    extra : mapping, optional
        More top-level keys (e.g. ``{"format": "instances"}``).

    Returns
    -------
    Path of the json (written atomically).
    """
    values = sorted(int(v) for v in objects)
    if any(not 1 <= v <= 255 for v in values):
        raise ValueError(f"object pixel values must lie in 1..255, got {values}")
    doc = {
        "info": {str(i): str(objects[v]) for i, v in enumerate(values, start=1)},
        "color": {str(i): v for i, v in enumerate(values, start=1)},
        "task": task,
    }
    if dataset is not None:
        doc["dataset"] = dataset
    if modality is not None:
        doc["modality"] = modality
    if images is not None:
        doc["images"] = {str(k): dict(v) for k, v in images.items()}
    if extra:
        doc.update(extra)
    return atomic_write_json(Path(root) / f"{task}.json", doc)


# --------------------------------------------------------------------------------------------
# reading the COSMOS layout
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskInfo:
    """What a ``<task>.json`` says.

    Attributes
    ----------
    task : the task (folder) name.
    names : ``{pixel value: object name}``.
    dataset, modality : from the json, or None when absent.
    images : per-image provenance ``{image_id: {...}}`` (empty when absent).
    path : the json file.
    """

    task: str
    names: dict
    dataset: str | None = None
    modality: str | None = None
    images: dict = field(default_factory=dict)
    path: Path | None = None


def _as_int(value, path, what) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(path, f"{what} {value!r} is not a number") from None
    if not f.is_integer():
        raise InputError(path, f"{what} {value!r} is not an integer")
    return int(f)


def find_task_json(root, task: str, info_dir=None, task_dir=None) -> Path | None:
    """Locate ``<task>.json``: ``info_dir``, ``ROOT``, ``ROOT/<task>``, next to ``task_dir``.

    Names are compared case-insensitively (``Task.json`` is found for task ``task``).
    Returns None when there is none.
    """
    root = Path(root)
    task_dir = Path(task_dir) if task_dir is not None else root / task
    folders = [Path(info_dir)] if info_dir is not None else []
    folders += [root, task_dir, task_dir.parent]
    wanted = f"{task}.json"
    for folder in folders:
        exact = folder / wanted
        if exact.is_file():
            return exact
        if folder.is_dir():
            for candidate in sorted(folder.iterdir()):
                if candidate.name.casefold() == wanted.casefold() and candidate.is_file():
                    return candidate
    return None


def read_task_json(root, task: str, info_dir=None, task_dir=None) -> TaskInfo:
    """Read the info/color json of ``task`` (see :func:`find_task_json` for where it may sit).

    Raises
    ------
    InputError
        No json, unreadable json, no ``info``, non-numeric ids/values, values outside 1..255,
        or one pixel value given two different names.
    """
    path = find_task_json(root, task, info_dir=info_dir, task_dir=task_dir)
    if path is None:
        where = Path(task_dir) if task_dir is not None else Path(root) / task
        raise InputError(where, f"no {task}.json (looked in info_dir, ROOT, the task folder and its parent)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"unreadable json ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("info"), dict):
        raise InputError(path, 'no "info" mapping (object id -> name)')
    info = doc["info"]
    color = doc.get("color")
    if not isinstance(color, dict):
        warnings.warn(f'{path}: no "color" mapping; reading object ids as pixel values', stacklevel=2)
        color = {k: k for k in info}
    color_by_id = {str(k).strip(): v for k, v in color.items()}
    names: dict[int, str] = {}
    for key, name in info.items():
        key = str(key).strip()
        if key not in color_by_id:
            raise InputError(path, f'object id {key!r} ({name}) has no "color" entry')
        value = _as_int(color_by_id[key], path, f"pixel value of id {key!r}")
        if not 1 <= value <= 255:
            raise InputError(path, f"pixel value {value} of id {key!r} outside 1..255")
        name = str(name).strip()
        if value in names and names[value] != name:
            raise InputError(path, f"pixel value {value} named both {names[value]!r} and {name!r}")
        names[value] = name
    images = doc.get("images") if isinstance(doc.get("images"), dict) else {}
    return TaskInfo(
        task=task,
        names=dict(sorted(names.items())),
        dataset=doc.get("dataset") if isinstance(doc.get("dataset"), str) else None,
        modality=doc.get("modality") if isinstance(doc.get("modality"), str) else None,
        images=images,
        path=path,
    )


def find_tasks(root) -> list[tuple[str, Path]]:
    """The task folders below ``root``: every folder (at any depth) holding an ``images`` folder.

    Returns sorted ``(task name, folder)`` pairs; the task name is the folder's name.
    Hidden folders (``.name``) are not searched.

    Raises
    ------
    InputError
        ``root`` missing, or two task folders with the same name (their ids would collide).
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "COSMOS root folder not found")
    found: dict[str, Path] = {}
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if "images" in dirnames and Path(dirpath) != root:
            folder = Path(dirpath)
            if folder.name in found:
                raise InputError(folder, f"task name {folder.name!r} also used by {found[folder.name]}")
            found[folder.name] = folder
            dirnames[:] = []  # a task folder's subfolders are its images/labels
    return sorted(found.items())


def _files_by_stem(folder: Path, suffixes) -> dict[str, Path]:
    """``{stem: path}`` for files in ``folder`` with one of ``suffixes`` (earlier suffix wins)."""
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    rank = {s: i for i, s in enumerate(suffixes)}
    for p in sorted(folder.iterdir()):
        suffix = p.suffix.lower()
        if p.name.startswith(".") or suffix not in rank or not p.is_file():
            continue
        if p.stem not in out or rank[suffix] < rank[out[p.stem].suffix.lower()]:
            out[p.stem] = p
    return out


def list_images(root) -> list[tuple[str, str, Path]]:
    """All images of a COSMOS-layout folder: sorted ``(task, image_id, absolute image path)``.

    ``image_id`` is the file stem. Images without a label are listed too (the manifest, not this
    list, decides what is evaluated).
    """
    out = []
    for task, folder in find_tasks(root):
        for stem, path in _files_by_stem(folder / "images", IMAGE_SUFFIXES).items():
            out.append((task, stem, path.resolve()))
    return sorted(out, key=lambda t: (t[0], t[1]))

