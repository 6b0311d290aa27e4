"""Dataset preprocessing specification (paper 2.2): raw dataset -> COSMOS layout.

:func:`prepare` turns the raw image/label pairs of one task (found as the task's descriptor
says, see :mod:`cosmoslib.data.catalog`) into ``OUT/<task>/{images,labels}/<name>.png`` plus
``OUT/<task>.json`` (see :mod:`cosmoslib.data`), one source item at a time:

**3D volumes** (NIfTI, NRRD, MHA/MHD via :func:`cosmoslib.data.readers.read_volume`)

1. reset the label values to the descriptor's fixed values (:func:`reset_labels`);
2. cut 2D slices along the descriptor's main plane (:func:`slices`);
3. keep only the objects with more than 50 pixels on a slice and drop slices with no object
   left (:func:`retain_objects`); optionally sample the kept slices evenly
   (``sampling.max_slices_per_volume``, deterministic: used to size the demo);
4. min-max normalise each kept image slice to 0..255 (:func:`minmax_normalize`), optionally
   after percentile clipping;
5. save image and label as PNG, named ``<source-stem>_<slice:04d>``; the task json records
   for each slice its ``source``, ``slice_index``, ``plane`` and ``spacing``: the pixel size in
   mm as ``[row, column, slice]`` (:func:`slice_spacing`), so :mod:`cosmoslib.protocol.volumes` can put
   the slices back into a volume and measure distances in mm. 2D sources have no spacing
   (``slice_index`` -1, no ``plane``/``spacing``).

**4D volumes** ``(N, ...)``: N 3D volumes, each through the same flow, named
``<source-stem>_t<frame:03d>_<slice:04d>``.

**2D images** (PNG/BMP/JPG/TIF): steps 1, 3 and 5 (the paper lists no normalisation for 2D
images: 8-bit images are kept as they are; 16-bit or float images, e.g. microscopy TIFFs, are
min-max normalised like slices). Grey stays grey (``uint8 (H, W)``), RGB stays RGB; an RGB file
whose three channels are equal is stored as grey.

**Instance maps** (format ``instances``, cell data): every instance is an object of the same
name; instances with <= 50 pixels are dropped, the rest numbered 1..n, and when n > 255 the image
is split into several sub-images (:func:`split_instances`).

Retention rules
---------------
The paper says "retain slices with the sum of the pixel values of their labels greater than 50";
the authors' code instead removes, on each 2D image, every label value that covers 50 pixels or
fewer, then drops images left empty. Both are available (descriptor ``retention.rule``):

* ``per_object`` (default, the authors' code): an object is kept on a slice only if it has more
  than ``min_pixels`` pixels;
* ``label_sum`` (the paper's literal words): a slice is kept, with all its objects, if the sum
  of its *raw* label values exceeds ``min_pixels`` (for 0/1 masks: more than 50 labelled
  pixels in total); tiny objects survive on kept slices.

Robustness
----------
Bad input never loses data silently. A corrupt/unreadable file, an image/label shape mismatch,
a label value the descriptor does not list, a constant or NaN volume or an empty label raise
:class:`cosmoslib.files.InputError` naming the file; :func:`prepare` catches it per source item,
records ``(file, reason)`` in ``OUT/skipped.csv`` (merged with earlier runs, atomically) and goes
on. A constant *slice* inside a good volume is recorded the same way and only that slice is left
out. Progress is resumable: after each finished source item, a line is appended to the task's
ledger ``OUT/.cosmos/prepare/<task>.jsonl``; a rerun skips the items listed there. The ledger
starts with a fingerprint of the processing-relevant descriptor fields: when the descriptor
changes, the task's earlier outputs are removed and the task is prepared again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cosmoslib import files
from cosmoslib.data import layout, readers
from cosmoslib.data.catalog import Descriptor, load_descriptor
# the paper's min-max rule lives with the readers, which apply it to a wider-than-8-bit COSMOS image
from cosmoslib.data.readers import minmax_normalize
from cosmoslib.files import InputError

#: Bumped when the output of :func:`prepare` changes for the same input (invalidates ledgers).
#: 2: per-image provenance of volume slices records ``plane`` and ``spacing``.
PREPARE_VERSION = 2

# --------------------------------------------------------------------------------------------
# the single rules
# --------------------------------------------------------------------------------------------


def slices(volume: np.ndarray, plane: str) -> np.ndarray:
    """The 2D slices of a 3D volume along ``plane``, as a ``(n, H, W)`` view.

    Parameters
    ----------
    volume : ``(S, P, L)`` array as returned by :func:`cosmoslib.data.readers.read_volume`.
    plane : ``"axial"`` (``volume[k]``: rows anterior -> posterior, columns right -> left),
        ``"coronal"`` (``volume[:, k]``, flipped so superior is up; columns right -> left) or
        ``"sagittal"`` (``volume[:, :, k]``, flipped so superior is up; columns anterior ->
        posterior).

    Returns
    -------
    ndarray ``(n, H, W)``: ``slices(v, plane)[k]`` is slice ``k`` (a view, no copy).
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"slices() needs a 3D volume, got shape {volume.shape}")
    if plane == "axial":
        return volume
    if plane == "coronal":
        return volume.transpose(1, 0, 2)[:, ::-1, :]
    if plane == "sagittal":
        return volume.transpose(2, 0, 1)[:, ::-1, :]
    raise ValueError(f"unknown plane {plane!r}; expected axial, coronal or sagittal")


def slice_spacing(spacing, plane: str) -> list[float]:
    """Pixel size of the slices :func:`slices` cuts, in mm: ``[row, column, slice]``.

    Parameters
    ----------
    spacing : the ``(S, P, L)`` voxel size (mm) that :func:`cosmoslib.data.readers.read_volume` returns
        with the volume (same order as its axes).
    plane : ``"axial"``, ``"coronal"`` or ``"sagittal"``, as for :func:`slices`.

    Returns
    -------
    list of 3 float
        ``[row spacing, column spacing, slice spacing]``: the distance between neighbouring
        rows and columns of a slice, and between neighbouring slices (slice ``k`` and
        ``k + 1``). Axial slices ``volume[k]`` have rows along P and columns along L, slices
        along S; coronal slices rows along S (flipped; spacing unchanged), columns along L,
        slices along P; sagittal slices rows along S, columns along P, slices along L. Values
        are rounded to 1e-6 mm (NIfTI stores float32 sizes: 0.7 rather than 0.699999988).
    """
    sup, post, left = (round(float(v), 6) for v in spacing)
    if plane == "axial":
        return [post, left, sup]
    if plane == "coronal":
        return [sup, left, post]
    if plane == "sagittal":
        return [sup, post, left]
    raise ValueError(f"unknown plane {plane!r}; expected axial, coronal or sagittal")


def retain_objects(label: np.ndarray, rule: str = "per_object", min_pixels: int = 50, raw=None) -> np.ndarray:
    """Apply the paper's "> 50 pixels" retention to one 2D label map.

    Parameters
    ----------
    label : 2D integer label map (any values; 0 = background).
    rule : ``"per_object"`` -- zero every value covering ``<= min_pixels`` pixels (authors'
        code); ``"label_sum"`` -- keep the whole map if the sum of label values exceeds
        ``min_pixels``, else return all zeros (the paper's wording).
    min_pixels : threshold in pixels (the paper: 50). An object needs *more* than this.
    raw : the raw (source-valued) label for ``label_sum``; the paper sums the original label
        values, not our reset ones (default: ``label``).

    Returns
    -------
    A new array, same shape and dtype; ``.any()`` is False when the slice should be dropped.
    """
    label = np.asarray(label)
    if rule == "per_object":
        counts = np.bincount(label.ravel().astype(np.int64, copy=False))
        small = np.flatnonzero(counts <= min_pixels)
        small = small[small > 0]
        if small.size == 0:
            return label.copy()
        return np.where(np.isin(label, small), 0, label).astype(label.dtype)
    if rule == "label_sum":
        total = np.asarray(label if raw is None else raw).sum(dtype=np.float64)
        return label.copy() if total > min_pixels else np.zeros_like(label)
    raise ValueError(f"unknown retention rule {rule!r}; expected per_object or label_sum")


def reset_labels(label: np.ndarray, objects, ignore_values=(), path=None) -> np.ndarray:
    """Map raw label values to the descriptor's fixed COSMOS values (1..255).

    Parameters
    ----------
    label : integer label map (2D or 3D; float arrays holding whole numbers are accepted).
    objects : iterable of :class:`cosmoslib.data.catalog.ObjectSpec` (``source_values`` -> ``value``).
        Objects sharing a name and value merge ("Left Lung" + "Right Lung" -> "Lung").
    ignore_values : raw values deliberately turned into background (excluded structures).
    path : file named in the error.

    Returns
    -------
    uint8 array of the same shape.

    Raises
    ------
    InputError
        A raw value that neither an object nor ``ignore_values`` lists (the message lists
        them), or non-integer / negative values.
    """
    label = readers.as_label_values(label, path)
    present = np.unique(label)
    present = present[present > 0]
    mapping = {}
    for obj in objects:
        for v in obj.source_values or ():
            mapping[int(v)] = int(obj.value)
    for v in ignore_values:
        mapping[int(v)] = 0
    unknown = [int(v) for v in present if int(v) not in mapping]
    if unknown:
        shown = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
        raise InputError(path, f"label value(s) {shown} not in the descriptor (known: {sorted(mapping)})")
    size = max([int(present.max()) if present.size else 0] + list(mapping)) + 1
    lut = np.zeros(size, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut[label]


def split_instances(label: np.ndarray, max_value: int = 255) -> list[np.ndarray]:
    """Renumber an instance map 1..n and split it into maps of at most ``max_value`` instances.

    The paper "reconstructs each image and label into several sub-figures" when a cell image has
    more instances than a PNG label can hold. We split the *instances*, not the image: every
    sub-figure is a full copy of the image whose label holds one group of instances. Tiles were
    rejected because they cut cells at tile borders (changing their size and shape, which the
    factor analysis measures) and crop away context that SAM sees. Instances are numbered in
    increasing raw value and cut into ``ceil(n / max_value)`` consecutive groups of near-equal
    size (``numpy.array_split``), so 300 instances give 150 + 150, not 255 + 45.

    Parameters
    ----------
    label : 2D integer instance map, 0 = background, each instance one value.
    max_value : most instances per sub-image (255 for uint8 PNG labels).

    Returns
    -------
    list of uint8 maps (same shape), each numbering its instances 1..k; ``[]`` when the map is
    empty; one map when n <= ``max_value``.
    """
    label = readers.as_label_values(label)
    values = np.unique(label)
    values = values[values > 0]
    if values.size == 0:
        return []
    n_parts = -(-values.size // max_value)
    out = []
    for group in np.array_split(values, n_parts):
        lut = np.zeros(int(values.max()) + 1, dtype=np.uint8)
        lut[group] = np.arange(1, group.size + 1, dtype=np.uint8)
        out.append(lut[label])
    return out


# --------------------------------------------------------------------------------------------
# finding source items
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceItem:
    """One image file of a source folder and its label file(s).

    ``key`` is the image path relative to the source folder (POSIX): the ledger key and the
    ``source`` recorded in the manifest. ``stem`` names the outputs (unique within the task).
    """

    key: str
    image: Path
    label: Path | None
    label_files: tuple[tuple[str, tuple[Path, ...]], ...] = ()
    stem: str = ""


def _name_regex(pattern_name: str) -> re.Pattern:
    """Regex for the file-name part of a glob; the first ``*`` is captured as ``{stem}``.

    Hand-written (fnmatch.translate gives no capture groups); character classes ``[...]`` are
    matched literally here, which only affects ``{stem}`` extraction, not the glob itself.
    """
    out, captured = [], False
    for part in re.split(r"(\*|\?)", pattern_name):
        if part == "*":
            out.append(".*" if captured else "(.*)")
            captured = True
        elif part == "?":
            out.append(".")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out), re.DOTALL)


def find_pairs(source, descriptor: Descriptor) -> tuple[list[SourceItem], list[tuple[str, str]]]:
    """Match the descriptor's ``pairs`` patterns in ``source`` (a folder, or one image file).

    Returns
    -------
    items : sorted list of :class:`SourceItem` whose label file(s) exist.
    missing : ``(image file, reason)`` for images whose label file(s) are missing.

    Raises
    ------
    InputError
        ``source`` does not exist.
    """
    source = Path(source)
    pairs = descriptor.pairs
    if source.is_file():
        base, files = source.parent, [source]
    elif source.is_dir():
        base = source
        files = sorted(p for p in source.glob(pairs.image)
                       if p.is_file() and not any(s.startswith(".") for s in p.relative_to(source).parts))
    else:
        raise InputError(source, "source folder/file not found")
    regex = _name_regex(Path(pairs.image).name)
    items, missing = [], []
    for f in files:
        m = regex.fullmatch(f.name)
        name = readers.file_stem(f)
        stem = m.group(1) if (m and m.groups()) else name
        rel_dir = f.parent.relative_to(base).as_posix() if f.parent != base else "."
        fill = {"stem": stem, "name": name, "dir": rel_dir}
        try:
            if pairs.label is not None:
                label = base / pairs.label.format(**fill)
                label_files = ()
                needed = [label]
            else:
                label = None
                label_files = tuple((obj, tuple(base / t.format(**fill) for t in temps))
                                    for obj, temps in pairs.label_files)
                needed = [p for _, ps in label_files for p in ps]
        except (KeyError, IndexError, ValueError) as exc:
            raise InputError(descriptor.path, f"bad pairs.label template ({exc}); use {{stem}}, {{name}}, {{dir}}") from None
        absent = [p for p in needed if not p.is_file()]
        if absent:
            missing.append((str(f), f"no label file: {absent[0]} not found"))
            continue
        items.append(SourceItem(key=f.relative_to(base).as_posix(), image=f, label=label,
                                label_files=label_files, stem=name))
    # output names must be unique within the task: fall back to the relative path when stems clash
    counts: dict[str, int] = {}
    for it in items:
        counts[it.stem] = counts.get(it.stem, 0) + 1
    items = [it if counts[it.stem] == 1 else
             SourceItem(it.key, it.image, it.label, it.label_files,
                        readers.file_stem(it.key.replace("/", "__")))
             for it in items]
    return sorted(items, key=lambda it: it.key), missing


# --------------------------------------------------------------------------------------------
# one source item -> images
# --------------------------------------------------------------------------------------------


@dataclass
class _Output:
    image_id: str
    image: np.ndarray
    label: np.ndarray
    provenance: dict


def _check_intensities(arr: np.ndarray, path) -> None:
    if arr.dtype.kind == "f":
        bad = int((~np.isfinite(arr)).sum())
        if bad:
            raise InputError(path, f"{bad} of {arr.size} voxel(s) are NaN/infinite")
    if arr.size == 0:
        raise InputError(path, "empty image (no voxels)")
    if arr.min() == arr.max():
        raise InputError(path, f"constant image (every value = {arr.min()})")


def _mask_from_files(files, shape, pairs, reader, label_path_for_error):
    """Per-object probability/mask files -> boolean mask (sum / value_max > threshold)."""
    total = None
    for p in files:
        arr = reader(p)
        if arr.shape != shape:
            raise InputError(p, f"mask shape {arr.shape} != image shape {shape}")
        arr = np.asarray(arr, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise InputError(p, "mask holds NaN/infinite values")
        total = arr if total is None else total + arr
    return total / pairs.value_max > pairs.threshold


def _labels_for_item(item: SourceItem, d: Descriptor, shape, reader, label_reader):
    """Return (reset uint8 label, raw label for label_sum, path named in errors)."""
    if item.label is not None:
        raw = label_reader(item.label)
        if raw.shape != shape:
            raise InputError(item.label, f"label shape {raw.shape} != image shape {shape}")
        return reset_labels(raw, d.objects, d.ignore_values, path=item.label), raw, item.label
    by_name = {}
    for obj in d.objects:
        by_name.setdefault(obj.name, obj.value)
    label = np.zeros(shape, dtype=np.uint8)
    for obj_name, obj_files in item.label_files:
        mask = _mask_from_files(obj_files, shape, d.pairs, reader, obj_files[0])
        overlap = mask & (label > 0)
        if overlap.any():
            raise InputError(obj_files[0], f"{obj_name} overlaps another object on {int(overlap.sum())} voxel(s)")
        label[mask] = by_name[obj_name]
    # label_sum over per-object masks: the raw labels are 0/1 masks, so the sum is the pixel count
    return label, (label > 0).astype(np.int64), item.label_files[0][1][0]


def _even_sample(n: int, k: int | None) -> list[int]:
    """Indices of ``k`` evenly spaced picks out of ``n`` (first and last included); all if k is None."""
    if k is None or n <= k:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


def _volume_outputs(item: SourceItem, d: Descriptor, notes: list):
    image, spacing = readers.read_volume(item.image)
    want = 4 if d.format == "volume4d" else 3
    if image.ndim != want:
        raise InputError(item.image, f"{image.ndim}-D volume; format {d.format!r} expects {want}-D")
    _check_intensities(image, item.image)

    def read_label_volume(p):
        return readers.read_volume(p)[0]

    if d.format == "volume4d" and item.label is not None:
        # a 3D label with a 4D image: the same label for every frame
        probe = readers.read_volume(item.label)[0]
        if probe.ndim == 3 and probe.shape == image.shape[1:]:
            probe = np.broadcast_to(probe, image.shape)

        def label_reader(_p):
            return readers.as_label_values(probe, item.label)
    else:
        def label_reader(p):
            return readers.as_label_values(read_label_volume(p), p)

    label, raw, label_path = _labels_for_item(item, d, image.shape, read_label_volume, label_reader)
    if not label.any():
        raise InputError(label_path, "empty label (no object in the whole volume)")
    frames = [(None, image, label, raw)] if image.ndim == 3 else \
        [(n, image[n], label[n], raw[n]) for n in range(image.shape[0])]
    # provenance of every slice: its plane and pixel size [row, column, slice] in mm
    spacing_rcs = slice_spacing(spacing, d.main_plane)
    out = []
    for frame, img3, lab3, raw3 in frames:
        img_s, lab_s, raw_s = slices(img3, d.main_plane), slices(lab3, d.main_plane), slices(raw3, d.main_plane)
        kept = []
        for k in np.flatnonzero(lab_s.reshape(lab_s.shape[0], -1).any(axis=1)):
            lab2 = retain_objects(lab_s[k], d.retention_rule, d.min_pixels, raw=raw_s[k])
            if lab2.any():
                kept.append((int(k), lab2))
        for i in _even_sample(len(kept), d.max_slices_per_volume):
            k, lab2 = kept[i]
            where = f"slice {k}" if frame is None else f"frame {frame} slice {k}"
            try:
                img2 = minmax_normalize(img_s[k], d.clip_percentiles, path=item.image)
            except InputError as exc:
                notes.append((str(item.image), f"{where}: {exc.problem}; slice left out"))
                continue
            image_id = f"{item.stem}_{k:04d}" if frame is None else f"{item.stem}_t{frame:03d}_{k:04d}"
            prov = {"source": item.key, "slice_index": k, "plane": d.main_plane, "spacing": spacing_rcs}
            if frame is not None:
                prov["frame"] = int(frame)
            out.append(_Output(image_id, np.ascontiguousarray(img2), np.ascontiguousarray(lab2, dtype=np.uint8), prov))
    return out


def _to_uint8_image(arr: np.ndarray, d: Descriptor, path) -> np.ndarray:
    if arr.ndim == 3 and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
        arr = arr[..., 0]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    return minmax_normalize(arr, d.clip_percentiles, path=path)


def _image_outputs(item: SourceItem, d: Descriptor, notes: list):
    image = readers.read_raw_image(item.image)
    _check_intensities(image, item.image)
    shape = image.shape[:2]

    def mask_reader(p):
        arr = readers.read_raw_image(p)
        return arr if arr.ndim == 2 else arr[..., 0]

    if d.format == "instances":
        if item.label is None:
            raise InputError(d.path, "format 'instances' needs a single label template")
        raw = readers.read_raw_label(item.label)
        if raw.shape != shape:
            raise InputError(item.label, f"label shape {raw.shape} != image shape {shape}")
        if not raw.any():
            raise InputError(item.label, "empty label (no instance)")
        kept = retain_objects(raw, d.retention_rule, d.min_pixels)
        parts = split_instances(kept)
        if not parts:
            return []
        img8 = _to_uint8_image(image, d, item.image)
        out = []
        for p, part in enumerate(parts):
            image_id = item.stem if len(parts) == 1 else f"{item.stem}_part{p:02d}"
            prov = {"source": item.key, "slice_index": -1}
            if len(parts) > 1:
                prov.update(part=p, n_parts=len(parts))
            out.append(_Output(image_id, img8, part, prov))
        return out

    label, raw, label_path = _labels_for_item(item, d, shape, mask_reader, readers.read_raw_label)
    if not label.any():
        raise InputError(label_path, "empty label (no object)")
    label = retain_objects(label, d.retention_rule, d.min_pixels, raw=raw)
    if not label.any():
        return []
    img8 = _to_uint8_image(image, d, item.image)
    return [_Output(item.stem, img8, label, {"source": item.key, "slice_index": -1})]


def prepare_item(item: SourceItem, descriptor: Descriptor, notes: list | None = None) -> list:
    """Run one source item through the flow of the module docstring, in memory.

    Returns a list of outputs with ``image_id``, ``image`` (uint8), ``label`` (uint8) and
    ``provenance``; slice-level problems are appended to ``notes`` as ``(file, reason)``.

    Raises
    ------
    InputError
        Bad input (see the module docstring), naming the file.
    """
    notes = [] if notes is None else notes
    if descriptor.format in ("volume", "volume4d"):
        return _volume_outputs(item, descriptor, notes)
    return _image_outputs(item, descriptor, notes)


# --------------------------------------------------------------------------------------------
# the batch
# --------------------------------------------------------------------------------------------


@dataclass
class PrepareReport:
    """What :func:`prepare` (or :func:`cosmoslib.data.demo.build_demo`) did.

    Attributes
    ----------
    n_sources : source items found (image files matching ``pairs.image``).
    n_done : items prepared in this run.
    n_resumed : items skipped because an earlier run finished them.
    n_images, n_objects : images and (image, object) masks the task(s) now hold in ``out``
        (this run and earlier ones together).
    n_skipped : rows added to ``skipped.csv`` by this run (failed items and left-out slices).
    skipped : those ``(file, reason)`` rows.
    out : the COSMOS root written into.
    tasks : the task(s) prepared.
    note : an extra sentence for :meth:`summary` (e.g. "nothing to do").
    """

    n_sources: int = 0
    n_done: int = 0
    n_resumed: int = 0
    n_images: int = 0
    n_objects: int = 0
    n_skipped: int = 0
    skipped: list = field(default_factory=list)
    out: Path | None = None
    tasks: tuple = ()
    note: str = ""

    def summary(self) -> str:
        """One paragraph: counts, skipped, where the outputs are."""
        tasks = ", ".join(self.tasks) if self.tasks else "no task"
        n_failed = self.n_sources - self.n_done - self.n_resumed
        text = (f"Prepared {tasks}: {self.n_sources} source item(s), {self.n_done} processed now, "
                f"{self.n_resumed} already done earlier (resumed), {n_failed} failed. "
                f"The output holds {self.n_images} image(s) with {self.n_objects} object mask(s) in {self.out}.")
        if self.note:
            text += f" {self.note}"
        if self.n_skipped:
            f, r = self.skipped[0]
            text += (f" {self.n_skipped} item(s) skipped (e.g. {f}: {r}); see "
                     f"{Path(self.out) / 'skipped.csv' if self.out else 'skipped.csv'}.")
        else:
            text += " Nothing was skipped."
        return text

    def __add__(self, other: "PrepareReport") -> "PrepareReport":
        return PrepareReport(
            n_sources=self.n_sources + other.n_sources, n_done=self.n_done + other.n_done,
            n_resumed=self.n_resumed + other.n_resumed, n_images=self.n_images + other.n_images,
            n_objects=self.n_objects + other.n_objects, n_skipped=self.n_skipped + other.n_skipped,
            skipped=self.skipped + other.skipped, out=self.out or other.out,
            tasks=tuple(self.tasks) + tuple(other.tasks),
            note=" ".join(n for n in (self.note, other.note) if n),
        )


def descriptor_fingerprint(d: Descriptor) -> str:
    """Hash of the descriptor fields that change what :func:`prepare` writes."""
    keep = ("objects", "task", "format", "main_plane", "pairs", "retention_rule", "min_pixels",
            "clip_percentiles", "max_slices_per_volume", "ignore_values")
    fields = {k: v for k, v in asdict(d).items() if k in keep}
    fields["version"] = PREPARE_VERSION
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def ledger_path(out, task: str) -> Path:
    """Where :func:`prepare` records the finished source items of ``task``."""
    return Path(out) / ".cosmos" / "prepare" / f"{task}.jsonl"


def _read_ledger(path: Path, fingerprint: str):
    """Return (records by source key, header matches, damaged). Torn lines are ignored."""
    if not path.exists():
        return {}, False, False
    records, header, damaged = {}, None, False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            damaged = True  # a line cut by a crash: that item is simply redone
            continue
        if header is None:
            header = rec
            continue
        if isinstance(rec, dict) and "source" in rec:
            records[rec["source"]] = rec
    ok = isinstance(header, dict) and header.get("fingerprint") == fingerprint
    return records, ok, damaged


def _write_ledger(path: Path, header: dict, records: dict) -> None:
    lines = [json.dumps(header, sort_keys=True)]
    lines += [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in records.values()]
    files.atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))


def _append_line(path: Path, obj) -> None:
    # Appending one line is the atomic unit of the ledger (a torn line is ignored on read),
    # which keeps each update O(1) instead of rewriting the whole ledger per source.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, sort_keys=True, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _task_json(out: Path, d: Descriptor, records: dict) -> Path:
    images = {}
    max_instance = 0
    for rec in records.values():
        images.update(rec["images"])
        max_instance = max([max_instance] + [max(v) for v in rec.get("values", {}).values() if v])
    if d.format == "instances":
        name = d.objects[0].name
        objects = {v: name for v in range(1, max(max_instance, 1) + 1)}
    else:
        objects = d.value_names()
    return layout.write_task(out, d.task, objects, dataset=d.name, modality=d.modality,
                         images=dict(sorted(images.items())), extra={"format": d.format})


def prepare(source, descriptor, out, progress: bool = True) -> PrepareReport:
    """Prepare one task: raw image/label pairs in ``source`` -> COSMOS layout in ``out``.

    Parameters
    ----------
    source : folder holding the raw data (``pairs`` patterns are relative to it), or one file.
    descriptor : :class:`cosmoslib.data.catalog.Descriptor` or the path of its YAML file.
    out : COSMOS root to write into (created). Several tasks may share one root.
    progress : tqdm bar over source items (stderr).

    Returns
    -------
    PrepareReport
        Its :meth:`~PrepareReport.summary` is one paragraph for the user.

    Raises
    ------
    InputError
        Only for problems that stop the whole task: unreadable descriptor, a descriptor that
        does not say how to prepare the data, a missing source folder. Per-item problems are
        recorded in ``out/skipped.csv`` instead.
    """
    d = descriptor if isinstance(descriptor, Descriptor) else load_descriptor(descriptor)
    if not d.preparable:
        raise InputError(d.path, "descriptor has no task/format/pairs: catalog-only, cannot prepare")
    out = Path(out)
    items, missing = find_pairs(source, d)
    fingerprint = descriptor_fingerprint(d)
    lpath = ledger_path(out, d.task)
    records, ok, damaged = _read_ledger(lpath, fingerprint)
    header = {"fingerprint": fingerprint, "task": d.task}
    if not ok:
        if records:
            warnings.warn(f"{d.task}: descriptor changed since the last run; preparing the task again", stacklevel=2)
            for rec in records.values():
                for image_id in rec["images"]:
                    for sub in ("images", "labels"):
                        (out / d.task / sub / f"{image_id}.png").unlink(missing_ok=True)
            records = {}
        _write_ledger(lpath, header, records)
    elif damaged:  # drop the torn line so that appended lines stay whole
        _write_ledger(lpath, header, records)

    skipped = list(missing)
    succeeded = []
    n_done = n_resumed = 0
    since_json = 0
    for item in tqdm(items, desc=f"prepare {d.task}", unit="src", disable=not progress):
        if item.key in records:
            n_resumed += 1
            continue
        notes: list = []
        try:
            outputs = prepare_item(item, d, notes)
        except InputError as exc:
            skipped.append((exc.path or str(item.image), exc.problem))
            continue
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a library failing on odd data must not stop the batch either
            skipped.append((str(item.image), f"unexpected {type(exc).__name__}: {exc}"))
            continue
        values = {}
        for o in outputs:
            layout.write_pair(out, d.task, o.image_id, o.image, o.label)
            values[o.image_id] = [int(v) for v in np.unique(o.label) if v]
        rec = {"source": item.key, "images": {o.image_id: o.provenance for o in outputs}, "values": values}
        _append_line(lpath, rec)
        records[item.key] = rec
        skipped.extend(notes)
        succeeded.extend([str(item.image), str(item.label)] if item.label else [str(item.image)])
        n_done += 1
        since_json += 1
        if since_json >= 50:  # keep the json usable during long runs without rewriting it per item
            _task_json(out, d, records)
            since_json = 0
    _task_json(out, d, records)
    files.merge_skipped_csv(out / "skipped.csv", skipped, drop_files=[s for s in succeeded if s not in {f for f, _ in skipped}])
    n_images = sum(len(r["images"]) for r in records.values())
    n_objects = sum(len(v) for r in records.values() for v in r.get("values", {}).values())
    note = "Nothing to do: every source item was already prepared." if items and n_resumed == len(items) else ""
    return PrepareReport(n_sources=len(items) + len(missing), n_done=n_done, n_resumed=n_resumed,
                         n_images=n_images, n_objects=n_objects, n_skipped=len(skipped),
                         skipped=[(str(f), r) for f, r in skipped], out=out, tasks=(d.task,), note=note)
