"""Reading and writing medical images and the COSMOS release layout (paper 2.2).

Three jobs live here:

1. **Reading raw data** for :mod:`cosmoslib.preprocess`: :func:`read_volume` (NIfTI/MGH
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

import io as _stdio
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cosmoslib.files import (  # noqa: F401  (re-exported: io was their first home)
    InputError,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_parquet,
    file_digest,
    merge_skipped_csv,
)

# --------------------------------------------------------------------------------------------
# small shared helpers
# --------------------------------------------------------------------------------------------

#: Image suffixes the reader accepts in ``images/`` (labels: ``.png`` first, then these).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: Suffixes of 3D/4D volumes that :func:`read_volume` reads.
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz", ".mgh")

MANIFEST_COLUMNS = [
    "dataset", "task", "modality", "object", "label_value", "image_id", "image_path",
    "label_path", "source", "slice_index", "area_px", "height", "width",
    "image_sha", "label_sha", "plane", "spacing_row", "spacing_col", "spacing_slice",
]


def file_stem(path: str | os.PathLike) -> str:
    """File name without its extension; double extensions ``.nii.gz`` count as one.

    >>> file_stem("a/case 01.nii.gz")
    'case 01'
    """
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES + IMAGE_SUFFIXES:
        if len(name) > len(suffix) and name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, ...]]:
    """Read a 3D or 4D medical volume in a fixed anatomical orientation.

    Parameters
    ----------
    path : NIfTI (``.nii``, ``.nii.gz``), MGH (``.mgz``), NRRD (``.nrrd``, ``.nhdr``) or
        MetaImage (``.mha``, ``.mhd``) file.

    Returns
    -------
    array : ndarray
        3D: ``(S, P, L)`` -- axis 0 runs inferior -> superior, axis 1 anterior -> posterior,
        axis 2 patient right -> left. An axial slice ``array[k]`` is therefore shown in the
        radiological convention (anterior at the top, patient right on the left). 4D:
        ``(N, S, P, L)``, one 3D volume per index of the fourth file axis (the paper's
        ``(N, W, H, D)``). Trailing singleton axes beyond the third (``(x, y, z, 1)``) are
        dropped. The dtype is the file's (after the file's intensity scaling), never converted.
    spacing : tuple of float
        Voxel size in mm along the three spatial array axes, same order as ``array``.

    Raises
    ------
    InputError
        Missing or unreadable file, vector (multi-component) voxels, or not 3D/4D.

    Notes
    -----
    NIfTI and MGH files are read with nibabel and reoriented to the closest canonical (RAS+)
    axes, then reversed and flipped to ``(S, P, L)``: nibabel keeps NaN voxels (SimpleITK's NIfTI
    reader turns them into 0, which would hide a broken volume) and accepts the non-orthonormal
    direction cosines SimpleITK refuses. NRRD and MetaImage go through SimpleITK, reoriented to
    LPS with ``DICOMOrient`` (``GetArrayFromImage`` then yields ``(S, P, L)``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    if path.name.lower().endswith((".nii", ".nii.gz", ".mgz", ".mgh")):
        return _read_volume_nibabel(path)

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"unreadable volume ({_first_line(exc)})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, f"{image.GetNumberOfComponentsPerPixel()}-component voxels, expected a scalar volume")
    size = list(image.GetSize())
    while len(size) > 3 and size[-1] == 1:  # (x, y, z, 1): a 3D volume stored as 4D
        extract = sitk.ExtractImageFilter()
        extract.SetSize(size[:-1] + [0])
        extract.SetIndex([0] * len(size))
        extract.SetDirectionCollapseToStrategy(sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
        image = extract.Execute(image)
        size = size[:-1]
    dim = image.GetDimension()
    if dim == 3:
        oriented = sitk.DICOMOrient(image, "LPS")
        return sitk.GetArrayFromImage(oriented), tuple(float(s) for s in oriented.GetSpacing()[::-1])
    if dim == 4:
        extract = sitk.ExtractImageFilter()
        extract.SetSize(size[:3] + [0])
        extract.SetDirectionCollapseToStrategy(sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
        frames, spacing = [], None
        for t in range(size[3]):
            extract.SetIndex([0, 0, 0, t])
            frame = sitk.DICOMOrient(extract.Execute(image), "LPS")
            frames.append(sitk.GetArrayFromImage(frame))
            spacing = tuple(float(s) for s in frame.GetSpacing()[::-1])
        return np.stack(frames), spacing
    raise InputError(path, f"{dim}-D image, expected a 3D or 4D volume")


def _read_volume_nibabel(path: Path):

    try:
        img = nib.load(str(path))
        while len(img.shape) > 3 and img.shape[-1] == 1:  # (x, y, z, 1): a 3D volume stored as 4D
            img = img.slicer[..., 0]
        if len(img.shape) not in (3, 4):
            raise InputError(path, f"{len(img.shape)}-D image of shape {img.shape}, expected a 3D or 4D volume")
        img = nib.as_closest_canonical(img)
        data = np.asanyarray(img.dataobj)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"unreadable volume ({_first_line(exc)})") from None
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])[::-1]
    # RAS+ (x: left->right, y: posterior->anterior, z: inferior->superior) to (S, P, L):
    # reverse the spatial axes, then flip P and L.
    if data.ndim == 3:
        return np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1]), zooms
    return np.ascontiguousarray(data.transpose(3, 2, 1, 0)[:, :, ::-1, ::-1]), zooms


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages put the useful sentence last; keep them short.
    return (lines[-1] if lines else type(exc).__name__)[:200]


def read_raw_image(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D image as stored: ``(H, W)`` or ``(H, W, 3)``, any dtype.

    TIFF goes through tifffile (keeps 16-bit and float data), everything else through Pillow.
    Alpha channels are dropped, palette images become RGB, ``(3|4, H, W)`` TIFFs are moved to
    channels-last.

    Raises
    ------
    InputError
        Missing, unreadable or not a 2D grey/RGB image.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    if path.suffix.lower() in (".tif", ".tiff"):

        try:
            arr = np.asarray(tifffile.imread(path))
        except Exception as exc:
            raise InputError(path, f"unreadable TIFF ({_first_line(exc)})") from None
        if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
            arr = np.moveaxis(arr, 0, -1)
    else:

        try:
            with Image.open(path) as im:
                im.load()
                if im.mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                    im = im.convert("RGB")
                arr = np.asarray(im)
        except Exception as exc:
            raise InputError(path, f"unreadable image ({_first_line(exc)})") from None
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 3 and arr.shape[-1] in (2, 4):  # grey+alpha or RGBA: drop alpha
        arr = arr[..., :1][..., 0] if arr.shape[-1] == 2 else arr[..., :3]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
        raise InputError(path, f"array of shape {arr.shape}: expected a 2D grey (H, W) or RGB (H, W, 3) image")
    return np.ascontiguousarray(arr)


def read_raw_label(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D label map as stored, as a non-negative integer array ``(H, W)``.

    Palette PNGs give their palette indices (the usual way label maps are stored). An RGB label
    whose three channels are equal is read as grey.

    Raises
    ------
    InputError
        Unreadable; RGB with differing channels (a colour-coded map: convert it to values
        first); negative or non-integer values.
    """
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        arr = read_raw_image(path)
    else:

        if not path.is_file():
            raise InputError(path, "file not found")
        try:
            with Image.open(path) as im:
                im.load()
                if im.mode in ("RGBA", "LA"):
                    im = im.convert(im.mode[:-1])
                arr = np.asarray(im)  # palette mode "P": the indices are the label values
        except Exception as exc:
            raise InputError(path, f"unreadable label image ({_first_line(exc)})") from None
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)
    if arr.ndim == 3:
        if arr.shape[-1] >= 3 and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
            arr = arr[..., 0]
        else:
            raise InputError(path, "RGB label with differing channels (colour-coded); expected one value per object")
    return as_label_values(arr, path)


def as_label_values(arr: np.ndarray, path=None) -> np.ndarray:
    """Check that ``arr`` holds non-negative integer label values and return it as an int array.

    Float label volumes (common in NIfTI) are accepted when every value is a whole number.

    Raises
    ------
    InputError
        Non-finite, fractional or negative values (names ``path``).
    """
    arr = np.asarray(arr)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InputError(path, "label holds NaN or infinite values")
        if not np.array_equal(arr, np.round(arr)):
            raise InputError(path, "label holds fractional values; expected integer label values")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        raise InputError(path, f"label of dtype {arr.dtype}; expected integers")
    if arr.size and arr.min() < 0:
        raise InputError(path, f"label holds negative values (min {arr.min()})")
    return arr


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a COSMOS-layout image: ``uint8`` ``(H, W)`` grey or ``(H, W, 3)`` RGB.

    Integer images whose values already lie in 0..255 (e.g. a 16-bit PNG holding 8-bit data) are
    converted losslessly; anything else (real 16-bit or float data) is refused rather than
    silently rescaled -- run such data through :func:`cosmoslib.preprocess.prepare`.

    Raises
    ------
    InputError
        Missing/unreadable file, or not representable as uint8 without rescaling.
    """
    arr = read_raw_image(path)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind in "iu" and arr.size and arr.min() >= 0 and arr.max() <= 255:
        return arr.astype(np.uint8)
    lo, hi = (arr.min(), arr.max()) if arr.size else (0, 0)
    raise InputError(path, f"{arr.dtype} image with values {lo}..{hi}; expected an 8-bit image")


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a COSMOS-layout label PNG: ``uint8`` ``(H, W)``, 0 = background.

    Raises
    ------
    InputError
        Unreadable, colour-coded RGB, or values outside 0..255.
    """
    arr = read_raw_label(path)
    if arr.size and arr.max() > 255:
        raise InputError(path, f"label value {arr.max()} > 255; a COSMOS label holds values 0..255")
    return arr.astype(np.uint8, copy=False)


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``(H, W)`` or ``(H, W, 3)`` array (deterministic: no timestamps)."""

    arr = np.ascontiguousarray(arr)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"PNG writer expects uint8 (H, W) or (H, W, 3), got {arr.dtype} {arr.shape}")
    buf = _stdio.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


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


import nibabel as nib
import pandas as pd
import SimpleITK as sitk
import tifffile
from PIL import Image
from tqdm.auto import tqdm

from cosmoslib import catalog
from cosmoslib import vocabulary as _vocabulary  # noqa: E402  (no cosmoslib imports: no cycle)

#: Every modality name the vocabulary knows (re-exported from :mod:`cosmoslib.vocabulary`).
KNOWN_MODALITIES = _vocabulary.KNOWN_MODALITIES

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
            name = _vocabulary.canonical_modality("".join(tokens[i:i + n]))
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
    return tuple(dict.fromkeys(_vocabulary.canonical_modality(m) or m for m in mods))


def modality_from_catalog(task: str, objects=(), descriptors=None) -> CatalogMatch:
    """Dataset and modality of a task from the catalog (:func:`cosmoslib.catalog.load_catalog`).

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
        The catalog (default: :func:`cosmoslib.catalog.load_catalog`).

    Returns
    -------
    CatalogMatch
    """
    if descriptors is None:
        descriptors = _load_descriptors()
    key = _vocabulary.modality_key
    exact = [d for d in descriptors if d.task and d.task == task]
    if exact and exact[0].modality:
        d = exact[0]
        return CatalogMatch(_vocabulary.canonical_modality(d.modality) or d.modality, d.name,
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
        canonical = _vocabulary.canonical_modality(name)
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
        modality, source = _vocabulary.canonical_modality(info.modality) or info.modality, "json"
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
            modality = _vocabulary.UNKNOWN
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
    known = {m: _vocabulary.canonical_modality(m) is not None for m in pairs["modality"].dropna().unique()}
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
    """Build manifest rows; returns (rows, skipped, n_tasks, n_images, modality_sources).

    ``modality`` is the ``{task: name}`` override of :func:`index`; ``modality_sources`` is
    ``{task: (modality, source, detail)}`` (see :func:`_resolve_task`).
    """

    root = Path(root)
    tasks = find_tasks(root)
    override = _modality_overrides(modality, [t for t, _ in tasks], root)
    catalog: list = []  # loaded on first need, once

    def descriptors():
        if not catalog:
            catalog.append(_load_descriptors())
        return catalog[0]

    sources: dict = {}
    rows, skipped = [], []
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
        # so a truncated file or a 16-bit image is skipped here, with its reason, rather than
        # accepted now and refused by `embed`/`evaluate` later (a full decode costs about as much
        # as the label decode below; measured in the architecture notes).
        try:
            height, width = read_image(ipath).shape[:2]
        except InputError as exc:
            skipped.append((exc.path, exc.problem))
            continue
        try:
            label = read_label(lpath)
        except InputError as exc:
            skipped.append((exc.path, exc.problem))
            continue
        if label.shape != (height, width):
            skipped.append((lpath, f"label {label.shape[1]}x{label.shape[0]} != image {width}x{height} (W x H)"))
            continue
        n_images += 1
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
            })
    return rows, skipped, len(tasks), n_images, sources


def _manifest_frame(rows):

    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    for col in ("label_value", "area_px", "height", "width"):
        df[col] = df[col].astype("int64")
    df["slice_index"] = df["slice_index"].astype("Int64")
    df["source"] = df["source"].astype(object).where(df["source"].notna(), None)
    df["plane"] = df["plane"].astype(object).where(df["plane"].notna(), None)
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
        2D source image). Items that cannot be read are left out (with a warning); use
        :func:`index_to_parquet` to get the skipped list.

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
    rows, skipped, _, _, sources = _scan(root, info_dir=info_dir, progress=progress, modality=modality)
    if skipped:
        warnings.warn(f"index({root}): {len(skipped)} item(s) skipped, first: {skipped[0][0]}: {skipped[0][1]}",
                      stacklevel=2)
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
    rows, skipped, n_tasks, n_images, sources = _scan(root, info_dir=info_dir, progress=progress,
                                                      modality=modality)
    df = _manifest_frame(rows)
    unknown = _attach_modality_info(df, sources)
    atomic_write_parquet(df, out)
    skipped_csv = out.with_name(f"{out.stem}.skipped.csv")
    atomic_write_csv(pd.DataFrame([(str(f), r) for f, r in skipped], columns=["file", "reason"]), skipped_csv)
    return IndexReport(root=Path(root), out=out, n_tasks=n_tasks, n_images=n_images, n_rows=len(df),
                       n_skipped=len(skipped), skipped=[(str(f), r) for f, r in skipped],
                       skipped_csv=skipped_csv, unknown_modality=unknown,
                       modality_source=dict(df.attrs["modality_source"]))
