"""The runner: every object of every image under strategies S1..S6, from one cached embedding.

Paper sections 3.4-3.5 and 4.3-4.7. For each model and image the embedding comes from the
:mod:`cosmoslib.models.cache` (computed once); prompts come from one seeded prompt table per dataset
(:mod:`cosmoslib.protocol.prompts`), so every model sees identical prompts; each strategy's candidate
masks are matched to the ground truth (:mod:`cosmoslib.protocol.matching`) and scored
(:mod:`cosmoslib.protocol.metrics`).

Output: the tidy *results* table (one row per image, object, model, strategy, prompt shift and
selection rule; columns in ``ARCHITECTURE.md``). S2-S6 give two rows per prompt: ``oracle_dice``
(the paper's Eq. 1, best DICE among SAM's candidates) and ``pred_iou`` (the candidate a user
without ground truth would take: highest predicted IoU). S1 (Everything) gives only
``oracle_dice``: its predicted IoUs rank masks, not objects. Rows of shifted prompts (paper 4.9,
Table 8) carry ``shift_level`` 1-3 and ``repeat`` 1..n; the unshifted prompt has 0 and 0.

Timings: ``t_embed_s`` is the encoder time of the image (measured when the embedding was
computed, stored in the cache); ``t_decode_s`` is prompt encoding + mask decoding (+ upsampling
to the original size) for that object and strategy, including its share of the per-image
decoder preparation (:meth:`SamFamilyModel.prepare`); for S1 it is the time of the whole
Everything pass over the image (the paper's Table 4 reports S1 per image), repeated on each
object row of that image.

Validity and resume: a stored result is valid only for the exact inputs, model and settings that
made it. Results are written into ``<out>.parts/`` atomically, under a folder named by a
fingerprint of the settings and one per model signature. Images are taken in a fixed order
(sorted by task and image id) and grouped into *shards* of ``shard_size`` consecutive images;
one shard of one model is one Parquet file, written when the shard is finished, named by a digest
of the (task, image id, image digest) of its images, where an image's digest covers the image
bytes, the label bytes, the objects evaluated and their prompt rows. The file records those
digests in its metadata (``cosmos_images``). A rerun reuses a shard file when its name matches;
when it does not (an image changed, the manifest grew), the rows of every image whose digest is
recorded in some shard file of the folder are copied, and only the other images are computed:
change one label PNG and exactly that image is recomputed. A shard in which some image failed is
written under the digest of the images it does hold, so the failed image is tried again next
time. The final table is the concatenation of the shards in the fixed order (rows computed in
this run are kept in memory, only resumed shards are read), so a killed and resumed run, or a
run on a Dask cluster (``scheduler=``, :mod:`cosmoslib.protocol.distributed`), gives the identical table.

Bookkeeping per image is independent of the manifest size: prompt rows and objects are grouped
by image once, each image and label is read once for all models, each chosen candidate is scored
once, and a shard's planning costs a ``stat`` (see ``benchmarks/scale.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from segment_anything.utils.amg import rle_to_mask
from tqdm.auto import tqdm

from cosmoslib import __version__, paths
from cosmoslib.data.readers import encode_png, read_image, read_label
from cosmoslib.files import (
    InputError,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_parquet,
    file_digest,
    mask_filename,
    slug,
)
from cosmoslib.models import cache as cache_mod
from cosmoslib.models import everything
from cosmoslib.protocol import matching, metrics, prompts, volumes
from cosmoslib.strategies import PROMPT_STRATEGIES, STRATEGIES
from cosmoslib.strategies import check as check_strategies

RESULT_COLUMNS = [
    "task", "image_id", "label_value", "object", "modality", "model", "strategy", "shift_level",
    "repeat", "selection_rule", "dice", "jac", "hd", "hd95", "assd", "pred_iou", "empty_pred",
    "empty_gt", "n_candidates", "t_embed_s", "t_decode_s",
]
_KEY = ["task", "image_id", "label_value"]


@dataclass
class EvalReport:
    """What one evaluation did."""

    out: Path
    n_images: int = 0
    n_objects: int = 0
    n_rows: int = 0
    n_parts_done: int = 0
    n_parts_resumed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    elapsed: float = 0.0
    models: list[str] = field(default_factory=list)
    strategies: list[str] = field(default_factory=list)
    #: the result shard holding each (model name, task, image_id) evaluated or resumed
    parts: dict[tuple[str, str, str], Path] = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    def s1_masks(self, model: str, task: str, image_id: str) -> list[np.ndarray]:
        """The Everything (S1) masks this run stored for one image (bool ``(H, W)`` each)."""
        return s1_masks(self.parts[(model, task, image_id)].with_suffix(".s1.json"), task, image_id)

    @property
    def skipped_csv(self) -> Path:
        return self.out.with_suffix(".skipped.csv")

    def summary(self) -> str:
        text = (f"Evaluated {self.n_objects} objects on {self.n_images} images with "
                f"{', '.join(self.models)} under {', '.join(self.strategies)}: {self.n_rows} result rows "
                f"({self.n_parts_done} image×model parts computed, {self.n_parts_resumed} resumed) in "
                f"{self.elapsed:.1f} s; {self.n_failed} failed")
        if self.failures:
            text += " (" + "; ".join(f"{f}: {r}" for f, r in self.failures[:5])
            text += ", ..." if self.n_failed > 5 else ""
            text += f"; all in {self.skipped_csv})"
        return text + f". Results: {self.out}."


def _save_mask(save_masks: Path, model: str, strategy: str, row, mask: np.ndarray) -> Path:
    """Write one matched mask as a 0/255 PNG (atomically) for audit."""
    path = save_masks / slug(model) / strategy / str(row.task) / mask_filename(
        row.image_id, row.object, row.label_value)
    return atomic_write_bytes(path, encode_png(mask.astype(np.uint8) * 255))


def with_digests(manifest: pd.DataFrame, root: str | Path) -> pd.DataFrame:
    """``manifest`` with ``image_sha``/``label_sha`` filled in where they are missing.

    :func:`cosmoslib.data.indexer.index` records both; a manifest from elsewhere (an older Parquet, a
    hand-made table) gets them computed here, once per file.
    """
    root = Path(root)
    df = manifest.copy()
    for col, path_col in (("image_sha", "image_path"), ("label_sha", "label_path")):
        if col not in df:
            df[col] = None
        missing = df[col].isna()
        if missing.any():
            digests = {p: file_digest(root / p) for p in df.loc[missing, path_col].unique()}
            df.loc[missing, col] = df.loc[missing, path_col].map(digests)
    return df


def evaluate_image(model, embedding: np.ndarray, t_embed: float, label: np.ndarray,
                   objects: pd.DataFrame, prompt_rows: pd.DataFrame, strategies: Sequence[str],
                   points_per_side: int = 32, save_masks: Path | None = None,
                   everything_kwargs: dict | None = None) -> tuple[list[dict], everything.EverythingResult | None]:
    """Score every object of one image under ``strategies`` from its cached embedding.

    Parameters
    ----------
    model : SamFamilyModel
    embedding : float array ``model.embedding_shape`` from the cache ((256, 64, 64) for SAM;
        SAM 2's packed features (1024, 64, 64), :mod:`cosmoslib.models.sam2`).
    t_embed : encoder seconds of this image (NaN when unknown).
    label : (H, W) uint8 label map of the image (COSMOS layout).
    objects : manifest rows of this image (task, image_id, label_value, object, modality).
    prompt_rows : prompt-table rows of this image (S2-S6, any ``shift_level``/``repeat``).
    strategies : subset of S1..S6.
    points_per_side : S1 grid size m.
    save_masks : folder for the matched masks (oracle rule, unshifted prompts), or None.

    Returns
    -------
    (list of dict, EverythingResult or None)
        Rows of the results table, and the S1 masks of the image when S1 ran.
    """
    size = label.shape[:2]
    rows: list[dict] = []
    base = lambda r: dict(task=r.task, image_id=r.image_id, label_value=int(r.label_value),  # noqa: E731
                          object=r.object, modality=r.modality, model=model.name,
                          t_embed_s=t_embed)
    gts: dict[int, np.ndarray] = {}

    def truth(value) -> np.ndarray:  # the ground-truth mask of one object, computed once
        value = int(value)
        if value not in gts:
            gts[value] = label == value
        return gts[value]

    s1 = None
    if "S1" in strategies:
        start = time.perf_counter()
        s1 = everything.generate_everything(model, embedding, size, points_per_side=points_per_side,
                                            **(everything_kwargs or {}))
        masks = s1.masks  # decoded from RLE once per image, shared by all its objects
        t_s1 = time.perf_counter() - start
        for r in objects.itertuples(index=False):
            gt = truth(r.label_value)
            m = matching.match_everything(masks, gt)
            if m.oracle_index is not None:
                pred, piou = masks[m.oracle_index], float(s1.predicted_iou[m.oracle_index])
            else:  # no mask survived the filters: an empty prediction, scored by the empty policy
                pred, piou = np.zeros(size, bool), float("nan")
            rows.append(dict(base(r), strategy="S1", shift_level=0, repeat=0, selection_rule="oracle_dice",
                             pred_iou=piou, n_candidates=len(s1.rles), t_decode_s=t_s1,
                             **metrics.evaluate_pair(pred, gt)))
            if save_masks is not None:
                _save_mask(save_masks, model.name, "S1", r, pred)
    wanted = [s for s in strategies if s != "S1"]
    prompt_rows = prompt_rows[prompt_rows["strategy"].isin(wanted)] if len(prompt_rows) else prompt_rows
    if wanted and len(prompt_rows):
        # The prompt-independent part of decoding is done once per image and shared by every
        # prompt; its time is spread evenly over this image's decodes so t_decode_s stays the
        # full prompt-encoding + mask-decoding cost.
        start = time.perf_counter()
        prepared = model.prepare(embedding) if hasattr(model, "prepare") else embedding
        t_prepare = (time.perf_counter() - start) / max(1, len(prompt_rows))
        # One sort per image: by object, then strategy (in the requested order), level, repeat.
        order = {s: i for i, s in enumerate(wanted)}
        ranked = prompt_rows.assign(_rank=prompt_rows["strategy"].map(order)).sort_values(
            ["_rank", "shift_level", "repeat"], kind="stable")
        by_object = {int(v): g for v, g in ranked.groupby("label_value", sort=False)}
        for r in objects.itertuples(index=False):
            mine = by_object.get(int(r.label_value))
            if mine is None:
                continue
            gt = truth(r.label_value)
            for prow in mine.itertuples(index=False):
                prompt = prompts.prompt_from_row(prow)
                start = time.perf_counter()
                decoded = model.decode(prepared, prompt, size)
                t_dec = time.perf_counter() - start + t_prepare
                m = matching.match(decoded.masks, decoded.iou_pred, gt)
                # Score each distinct chosen candidate once (one-candidate models choose the same).
                scores = {idx: metrics.evaluate_pair(decoded.masks[idx], gt)
                          for idx in {m.oracle_index, m.pred_iou_index}}
                for rule, idx in (("oracle_dice", m.oracle_index), ("pred_iou", m.pred_iou_index)):
                    rows.append(dict(base(r), strategy=prow.strategy, shift_level=int(prow.shift_level),
                                     repeat=int(prow.repeat), selection_rule=rule,
                                     pred_iou=float(decoded.iou_pred[idx]),
                                     n_candidates=int(len(decoded.masks)), t_decode_s=t_dec,
                                     **scores[idx]))
                if save_masks is not None and int(prow.shift_level) == 0:
                    _save_mask(save_masks, model.name, prow.strategy, r, decoded.masks[m.oracle_index])
    return rows, s1


def _combos(shift_levels: Sequence[int], repeats: int) -> set[tuple[int, int]]:
    """(shift_level, repeat) pairs a prompt table must hold: (0, 0) and each level x repeat."""
    return {(0, 0)} | {(int(lv), r) for lv in shift_levels if int(lv) > 0 for r in range(1, repeats + 1)}


def prompt_table(manifest: pd.DataFrame, root: Path, seed: int, path: Path | None = None,
                 shift_levels: Sequence[int] = (0,), repeats: int = 3, scheduler=None) -> pd.DataFrame:
    """The seeded prompt table of ``manifest`` (S2-S6), keyed by label content.

    Rows stored in ``path`` are reused for an object only when its label file's digest
    (``label_sha``) and the seed match and every requested (strategy, shift level, repeat) is
    there; every other object gets fresh prompts. The table on disk is rewritten (atomically)
    when anything was added.

    With ``scheduler`` (a ``distributed.Client`` or a scheduler text, see
    :func:`cosmoslib.protocol.distributed.client_for`) the new prompts are generated on the workers, in
    groups of images (each object's generator depends only on the seed and the object's key,
    so the table is the same as in one process).

    Returns
    -------
    DataFrame
        :data:`cosmoslib.protocol.prompts.PROMPT_COLUMNS` plus ``label_sha``, for exactly the objects of
        ``manifest`` and the requested shifts.
    """
    manifest = with_digests(manifest, root)
    want = manifest[[*_KEY, "label_sha"]].astype({"label_value": "int64"})
    combos = _combos(shift_levels, repeats)
    n_needed = len(PROMPT_STRATEGIES) * len(combos)
    old = pd.read_parquet(path) if path is not None and path.exists() else None
    reuse = pd.DataFrame()
    if old is not None and "label_sha" in old:
        old = old[(old["seed"] == seed)].astype({"label_value": "int64"})
        old = old[[(int(a), int(b)) in combos for a, b in zip(old["shift_level"], old["repeat"])]]
        reuse = old.merge(want, on=[*_KEY, "label_sha"])
        complete = reuse.groupby(_KEY)["strategy"].transform("size") == n_needed
        reuse = reuse[complete]
    have = reuse[_KEY].drop_duplicates() if len(reuse) else pd.DataFrame(columns=_KEY)
    todo = manifest.merge(have, on=_KEY, how="left", indicator=True)
    todo = todo[todo["_merge"] == "left_only"].drop(columns="_merge")
    parts = [reuse] if len(reuse) else []
    if len(todo):
        kwargs = {} if set(shift_levels) <= {0} else dict(shift_levels=tuple(shift_levels), repeats=repeats)
        if scheduler is None:
            fresh = prompts.make_prompt_table(todo, root, seed=seed, **kwargs)
        else:
            # Dask loads only for --scheduler runs (and cosmoslib.protocol.distributed imports this module).
            from cosmoslib.protocol import distributed

            fresh = distributed.make_prompt_table(scheduler, todo, root, seed, kwargs)
        parts.append(fresh.merge(todo[[*_KEY, "label_sha"]], on=_KEY))
    table = (pd.concat(parts, ignore_index=True) if parts
             else pd.DataFrame(columns=[*prompts.PROMPT_COLUMNS, "label_sha"]))
    table = table[[*prompts.PROMPT_COLUMNS, "label_sha"]].sort_values(
        [*_KEY, "strategy", "shift_level", "repeat"], kind="stable").reset_index(drop=True)
    if path is not None and len(todo):
        keep = old[~old.set_index(_KEY).index.isin(table.set_index(_KEY).index)] \
            if old is not None and "label_sha" in old else None
        stored = pd.concat([table, keep], ignore_index=True) if keep is not None and len(keep) else table
        atomic_write_parquet(stored, path)
    return table


def _settings_fingerprint(**settings) -> str:
    text = json.dumps(dict(settings, version=__version__), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


_PROMPT_KEY = ["label_value", "strategy", "shift_level", "repeat"]
_PROMPT_CELLS = ["points", "point_labels", "box"]


def _prompt_texts(prompt_rows: pd.DataFrame) -> list[str]:
    """One canonical JSON text per prompt row: label value, strategy, level, repeat, the prompt."""
    if not len(prompt_rows):
        return []
    cols = [prompt_rows[c].tolist() for c in _PROMPT_KEY + _PROMPT_CELLS]
    return [json.dumps([int(v), str(s), int(lv), int(r), _plain(p), _plain(pl), _plain(b)])
            for v, s, lv, r, p, pl, b in zip(*cols)]


def _object_texts(objects: pd.DataFrame) -> list[str]:
    return [json.dumps([str(v), str(o), str(m)])
            for v, o, m in zip(objects["label_value"], objects["object"], objects["modality"])]


def _digest_of(image_sha, label_sha, object_texts: list[str], prompt_texts: list[str]) -> str:
    payload = "\n".join([json.dumps([str(image_sha), str(label_sha)]), *object_texts, "|", *prompt_texts])
    return hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()


def _part_digest(objects: pd.DataFrame, prompt_rows: pd.DataFrame) -> str:
    """Digest of everything an image's rows are computed from besides the model and the settings:
    the image and label bytes (their digests), the objects, and the prompt rows."""
    first = objects.iloc[0]
    objects = objects.sort_values("label_value", kind="stable")
    prompt_rows = prompt_rows.sort_values(_PROMPT_KEY, kind="stable") if len(prompt_rows) else prompt_rows
    return _digest_of(first["image_sha"], first["label_sha"], _object_texts(objects), _prompt_texts(prompt_rows))


def _digests(manifest: pd.DataFrame, ptable: pd.DataFrame | None) -> dict[tuple[str, str], str]:
    """:func:`_part_digest` of every image at once: one pass over each table, no per-image
    pandas work (the planning of a million images must not cost a pandas call per image)."""
    m = manifest.sort_values(["task", "image_id", "label_value"], kind="stable")
    texts: dict[tuple[str, str], list] = {}
    for key, sha, lsha, text in zip(zip(m["task"], m["image_id"]), m["image_sha"], m["label_sha"],
                                    _object_texts(m)):
        entry = texts.get(key)
        if entry is None:
            texts[key] = entry = [sha, lsha, [], []]
        entry[2].append(text)
    if ptable is not None and len(ptable):
        pt = ptable.sort_values(["task", "image_id", *_PROMPT_KEY], kind="stable")
        for key, text in zip(zip(pt["task"], pt["image_id"]), _prompt_texts(pt)):
            if key in texts:
                texts[key][3].append(text)
    return {key: _digest_of(*entry) for key, entry in texts.items()}


def _plain(value):
    """Prompt cells as plain Python (lists, floats, ints, None), however pandas/Parquet held them."""
    if isinstance(value, (np.ndarray, list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _s1_record(result: everything.EverythingResult) -> dict:
    """The S1 masks of one image as JSON (uncompressed RLE), for figures that show them."""
    return dict(rles=result.rles, predicted_iou=result.predicted_iou.tolist(),
                stability_score=result.stability_score.tolist(), original_size=list(result.original_size))


def _s1_key(task: str, image_id: str) -> str:
    return f"{task}/{image_id}"


def s1_masks(part_s1: Path, task: str | None = None, image_id: str | None = None) -> list[np.ndarray]:
    """The Everything masks stored beside a result shard (``<shard>.s1.json``; see :func:`evaluate`).

    A shard's file holds the masks of each of its images under ``"<task>/<image_id>"``; give
    ``task`` and ``image_id`` unless the shard holds one image.
    """
    doc = json.loads(Path(part_s1).read_text())
    images = doc.get("images", {})
    if task is None and image_id is None and len(images) == 1:
        record = next(iter(images.values()))
    else:
        record = images[_s1_key(task, image_id)]
    return [rle_to_mask(r).astype(bool) for r in record["rles"]]


def model_folder(parts: Path, model) -> Path:
    """The folder of one model's shards under a settings folder ``parts``."""
    return parts / f"{slug(model.name)}-{model.signature_hash}"


def _shard_name(entries: Sequence[tuple[str, str, str]]) -> str:
    """File name of a shard holding ``entries`` = (task, image id, image digest), in order."""
    digest = hashlib.blake2b(json.dumps([list(e) for e in entries]).encode(), digest_size=10).hexdigest()
    task, image_id, _ = entries[0]
    return f"{slug(task)}__{slug(image_id)}-{len(entries)}-{digest}.parquet"


# --------------------------------------------------------------------------- work units


@dataclass
class ImageJob:
    """One image of the manifest: its objects, its prompt rows and its content digest."""

    rank: int
    task: str
    image_id: str
    image_path: str
    label_path: str
    digest: str
    objects: pd.DataFrame
    prompt_rows: pd.DataFrame

    @property
    def entry(self) -> tuple[str, str, str]:
        return (str(self.task), str(self.image_id), self.digest)


@dataclass
class ShardTodo:
    """What one model still needs for one shard: compute some images, copy the rest."""

    model_index: int
    path: Path                   #: the planned shard file (all images of the shard)
    reuse: dict[int, Path]       #: image rank -> an existing shard file holding its rows


@dataclass
class WorkUnit:
    """A shard of consecutive images and, per model, what to do for it (one Dask task)."""

    index: int
    jobs: list[ImageJob]
    todo: list[ShardTodo]


@dataclass
class RunSettings:
    """Everything a worker needs besides the models to compute a :class:`WorkUnit`."""

    root: Path
    strategies: tuple[str, ...]
    points_per_side: int
    everything_kwargs: dict | None
    save_masks: Path | None
    cache_dir: Path
    use_cache: bool = True   #: False: fused mode, embeddings are computed and dropped


@dataclass
class UnitResult:
    """What :func:`run_unit` did: per todo the shard file written (or None), the rows of the
    new shards (kept only when asked), failures as ``(model index, image rank, file, reason)``."""

    index: int
    written: list[Path | None] = field(default_factory=list)
    tables: list[pa.Table | None] = field(default_factory=list)
    failures: list[tuple[int, int, str, str]] = field(default_factory=list)
    n_computed: int = 0
    n_copied: int = 0


def _shard_table(frames: list[pd.DataFrame]) -> pa.Table:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pa.Table.from_pandas(pd.DataFrame(columns=RESULT_COLUMNS), preserve_index=False)
    return pa.Table.from_pandas(pd.concat(frames, ignore_index=True)[RESULT_COLUMNS], preserve_index=False)


def _read_shard(path: Path) -> pa.Table:
    return pq.read_table(path).replace_schema_metadata(None)


def _write_shard(path: Path, table: pa.Table, entries: list[tuple[str, str, str]]) -> Path:
    """Write one shard atomically, recording the (task, image id, digest) of its images."""
    meta = {b"cosmos_images": json.dumps([list(e) for e in entries]).encode()}
    table = table.replace_schema_metadata(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def shard_entries(path: Path) -> list[tuple[str, str, str]]:
    """The (task, image id, digest) of the images a shard file holds (from its metadata only)."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"cosmos_images")
    return [tuple(e) for e in json.loads(raw)] if raw else []


def _shard_index(folder: Path) -> dict[tuple[str, str, str], Path]:
    """(task, image id, digest) -> a shard file of ``folder`` holding that image's rows."""
    index: dict[tuple[str, str, str], Path] = {}
    if not folder.is_dir():
        return index
    for path in sorted(folder.glob("*.parquet")):
        try:
            for entry in shard_entries(path):
                index.setdefault(entry, path)
        except Exception:  # an unreadable foreign file: its images are recomputed
            continue
    return index


def run_unit(unit: WorkUnit, models: Sequence, settings: RunSettings, keep_tables: bool = True,
             caches: dict | None = None) -> UnitResult:
    """Compute one :class:`WorkUnit`: the same code in one process and on a Dask worker.

    Each image and label is read once for all models; each (model, image) is evaluated with
    :func:`evaluate_image`; bad input is recorded as a failure of that (model, image) and the
    rest goes on. Per model the shard is written atomically with its S1 masks beside it.
    """

    result = UnitResult(index=unit.index)
    caches = {} if caches is None else caches
    compute = {t.model_index: {j.rank for j in unit.jobs if j.rank not in t.reuse} for t in unit.todo}
    rows: dict[tuple[int, int], pd.DataFrame] = {}
    s1s: dict[tuple[int, int], dict] = {}
    failed: set[tuple[int, int]] = set()
    root = settings.root
    for job in unit.jobs:
        mine = [mi for mi in sorted(compute) if job.rank in compute[mi]]
        if not mine:
            continue
        img = label = None
        error: Exception | None = None
        try:
            img = read_image(root / job.image_path)
        except (InputError, OSError, ValueError) as exc:
            error = exc
        for mi in mine:
            model = models[mi]
            try:
                if error is not None:
                    raise error
                if settings.use_cache:
                    key = (model.name, model.signature_hash)
                    if key not in caches:
                        caches[key] = cache_mod.EmbeddingCache(settings.cache_dir, model)
                    emb, t_embed = caches[key].get_with_time(img, source=root / job.image_path)
                else:  # fused (--no-cache): encode, decode below, keep nothing on disk
                    emb, t_embed = fused_embedding(model, img)
                if label is None:
                    label = read_label(root / job.label_path)
                out, s1 = evaluate_image(model, emb, t_embed, label, job.objects, job.prompt_rows,
                                         settings.strategies, points_per_side=settings.points_per_side,
                                         save_masks=settings.save_masks,
                                         everything_kwargs=settings.everything_kwargs)
            except (InputError, OSError, ValueError) as exc:
                result.failures.append((mi, job.rank, f"{model.name}:{job.task}/{job.image_id}", str(exc)))
                failed.add((mi, job.rank))
                continue
            rows[(mi, job.rank)] = pd.DataFrame(out, columns=RESULT_COLUMNS)
            if s1 is not None:
                s1s[(mi, job.rank)] = _s1_record(s1)
            result.n_computed += 1
    with_s1 = "S1" in settings.strategies
    for todo in unit.todo:
        mi = todo.model_index
        sources: dict[Path, pa.Table] = {}
        s1_docs: dict[Path, dict] = {}
        frames, entries, s1_out = [], [], {}
        for job in unit.jobs:
            if (mi, job.rank) in failed:
                continue
            key = _s1_key(job.task, job.image_id)
            if job.rank in todo.reuse:
                src = todo.reuse[job.rank]
                if src not in sources:
                    sources[src] = _read_shard(src).to_pandas()
                    s1_docs[src] = (json.loads(src.with_suffix(".s1.json").read_text()).get("images", {})
                                    if with_s1 else {})
                table = sources[src]
                frames.append(table[(table["task"] == job.task) & (table["image_id"] == job.image_id)])
                if with_s1:
                    s1_out[key] = s1_docs[src][key]
                result.n_copied += 1
            else:
                frames.append(rows[(mi, job.rank)])
                if (mi, job.rank) in s1s:
                    s1_out[key] = s1s[(mi, job.rank)]
            entries.append(job.entry)
        if not entries:
            result.written.append(None)
            result.tables.append(None)
            continue
        complete = len(entries) == len(unit.jobs)
        path = todo.path if complete else todo.path.with_name(_shard_name(entries))
        table = _shard_table(frames)
        if with_s1:  # first the masks, then the shard: a shard on disk always has its masks
            atomic_write_json(path.with_suffix(".s1.json"), {"images": s1_out})
        _write_shard(path, table, entries)
        result.written.append(path)
        result.tables.append(table if keep_tables else None)
    return result


def plan(manifest: pd.DataFrame, models: Sequence, parts: Path,
         ptable: pd.DataFrame | None, shard_size: int) -> tuple[list[WorkUnit], list[ImageJob],
                                                                list[list[tuple[Path, list[int]]]], int]:
    """Split the manifest into shards and decide, per model and shard, what is left to do.

    Returns the work units (only shards with work), all image jobs in order, per model the
    planned ``(shard file, image ranks)`` list, and the number of (model, image) pairs whose
    rows are resumed from a finished shard.
    """
    by_image = {} if ptable is None else dict(iter(ptable.groupby(["task", "image_id"], sort=False)))
    empty = pd.DataFrame(columns=prompts.PROMPT_COLUMNS)
    digests = _digests(manifest, ptable)
    jobs: list[ImageJob] = []
    for rank, ((task, image_id), objects) in enumerate(manifest.groupby(["task", "image_id"], sort=True)):
        prows = by_image.get((task, image_id), empty)
        jobs.append(ImageJob(rank=rank, task=task, image_id=image_id, image_path=objects["image_path"].iat[0],
                             label_path=objects["label_path"].iat[0], digest=digests[(task, image_id)],
                             objects=objects, prompt_rows=prows))
    shard_size = max(1, int(shard_size))
    shards = [jobs[i:i + shard_size] for i in range(0, len(jobs), shard_size)]
    units: dict[int, WorkUnit] = {}
    planned: list[list[tuple[Path, list[int]]]] = []
    n_resumed = 0
    for mi, model in enumerate(models):
        folder = model_folder(parts, model)
        index = None  # read only when some shard is missing
        mine = []
        for si, shard in enumerate(shards):
            path = folder / _shard_name([j.entry for j in shard])
            mine.append((path, [j.rank for j in shard]))
            if path.exists():
                n_resumed += len(shard)
                continue
            if index is None:
                index = _shard_index(folder)
            reuse = {j.rank: index[j.entry] for j in shard if j.entry in index}
            unit = units.setdefault(si, WorkUnit(index=si, jobs=shard, todo=[]))
            unit.todo.append(ShardTodo(model_index=mi, path=path, reuse=reuse))
        planned.append(mine)
    return [units[k] for k in sorted(units)], jobs, planned, n_resumed


def evaluate(manifest: pd.DataFrame, root: str | Path, models: Iterable, out: str | Path,
             strategies: Sequence[str] = STRATEGIES, cache_dir: str | Path | None = None,
             save_masks: str | Path | None = None, seed: int = 0, points_per_side: int = 32,
             everything_kwargs: dict | None = None, shift_levels: Sequence[int] = (0,),
             repeats: int = 3, progress: bool = True, shard_size: int = 1,
             scheduler=None, threads: int = 1, retries: int = 3,
             cache: bool = True) -> tuple[pd.DataFrame, EvalReport]:
    """Evaluate ``models`` on the objects of ``manifest`` and write the results table.

    Parameters
    ----------
    manifest : DataFrame
        Rows to evaluate (see :func:`cosmoslib.data.indexer.index`).
    root : path
        The COSMOS root the manifest's relative paths start from.
    models : iterable of SamFamilyModel
    out : path
        ``results.parquet`` to write; ``<out>.parts/`` holds resumable result shards and
        ``prompts.parquet`` beside ``out`` the prompt table shared by all models. Failures are
        listed in ``<out stem>.skipped.csv`` (rewritten each run, empty when none).
    strategies : subset of ``STRATEGIES``.
    cache_dir : embedding cache folder (default :func:`cosmoslib.paths.embedding_cache_dir`).
    save_masks : write matched masks to ``<dir>/<model>/<strategy>/<task>/<image>__<object>-<value>.png``.
        When the manifest knows source volumes (paper 2.2 slices; :func:`cosmoslib.protocol.volumes.has_volumes`)
        the masks are always kept (in ``<out>.masks/`` unless given) and the volume-level table
        (3D DICE, HD/HD95/ASSD and NSD in mm, beside the per-slice means) is written to
        ``<out stem>.volumes.parquet``.
    seed : prompt sampling seed.
    points_per_side : S1 grid size m.
    shift_levels : prompt shift levels to run besides the unshifted prompt (paper 4.9, Table 8;
        1, 2, 3 = 0-10, 10-20, 20-30 pixels); ``(0,)`` runs the unshifted prompts only.
    repeats : seeded repeats per shift level ("Random 1-3" in Table 8).
    progress : show a progress bar (stderr).
    shard_size : images per result file (and per Dask task). 1 keeps one file per image; at
        COSMOS scale use 64-256 so files grow with shards, not images. The table does not depend on it.
    scheduler : None (one process, here), or a Dask scheduler for :func:`cosmoslib.protocol.distributed.client_for`
        (``"local:N"``, ``"tcp://host:port"``, ``"slurm:cluster.yaml"``, ...) or a
        ``distributed.Client``. Workers load each model once and write the same shards.
    threads : torch threads per Dask worker (ignored without ``scheduler``).
    retries : times a Dask task is retried after an error (a task lost with a killed worker is
        rescheduled by Dask anyway).
    cache : True (default): embeddings come from the embedding cache (computed and stored once).
        False: *fused* mode (``cosmos evaluate --no-cache``): each image is encoded and every
        requested strategy decoded right away, and the embedding is dropped -- no disk, at the
        price of encoding again in every later run. The embedding is rounded to the cache's
        precision (fp16) before decoding, so the table equals the cached path's (same result
        shards; only ``t_embed_s`` is this run's encoder time).

    Returns
    -------
    (DataFrame, EvalReport)
    """
    start = time.perf_counter()
    root, out = Path(root), Path(out)
    strategies = check_strategies(strategies)
    shift_levels = sorted({0, *(int(v) for v in shift_levels)})
    cache_dir = Path(cache_dir) if cache_dir else paths.embedding_cache_dir()
    models = list(models)
    manifest = with_digests(manifest, root)
    volume_sources = volumes.has_volumes(manifest)
    if save_masks is None and volume_sources:
        save_masks = out.with_name(out.name + ".masks")
    save_masks = Path(save_masks) if save_masks else None
    parts = out.with_name(out.name + ".parts") / _settings_fingerprint(
        strategies=sorted(strategies), seed=seed, points_per_side=points_per_side,
        everything=everything_kwargs or {}, shift_levels=shift_levels, repeats=repeats)
    report = EvalReport(out=out, models=[m.name for m in models], strategies=list(strategies))

    need_prompts = any(s in PROMPT_STRATEGIES for s in strategies)
    settings = RunSettings(root=root, strategies=tuple(strategies), points_per_side=points_per_side,
                           everything_kwargs=everything_kwargs, save_masks=save_masks, cache_dir=cache_dir,
                           use_cache=bool(cache))
    if scheduler is None:
        ptable = (prompt_table(manifest, root, seed, out.with_name("prompts.parquet"),
                               shift_levels=shift_levels, repeats=repeats) if need_prompts else None)
        units, jobs, planned, report.n_parts_resumed = plan(manifest, models, parts, ptable,
                                                            shard_size)
        done = []
        caches: dict = {}
        bar = tqdm(units, desc="evaluate", unit="shard", file=sys.stderr, disable=not progress)
        for unit in bar:
            done.append(run_unit(unit, models, settings, keep_tables=True, caches=caches))
    else:
        # Dask loads only for --scheduler runs (and cosmoslib.protocol.distributed imports this module).
        from cosmoslib.protocol import distributed

        with distributed.connect(scheduler, threads=threads) as client:  # one cluster for both steps
            ptable = (prompt_table(manifest, root, seed, out.with_name("prompts.parquet"),
                                   shift_levels=shift_levels, repeats=repeats, scheduler=client)
                      if need_prompts else None)
            units, jobs, planned, report.n_parts_resumed = plan(manifest, models, parts, ptable,
                                                                shard_size)
            done = distributed.run_units(client, units, models, settings, threads=threads,
                                         retries=retries, progress=progress)
    report.n_images, report.n_objects = len(jobs), len(manifest)
    results = _assemble(units, done, planned, jobs, models, report)
    atomic_write_parquet(results, out)
    if volume_sources and len(results):
        _write_volume_table(manifest, root, results, save_masks, out, report)
    atomic_write_csv(pd.DataFrame(report.failures, columns=["file", "reason"]), report.skipped_csv)
    report.n_rows = len(results)
    report.elapsed = time.perf_counter() - start
    return results, report


def _assemble(units: list[WorkUnit], done: list[UnitResult], planned, jobs: list[ImageJob],
              models: Sequence, report: EvalReport) -> pd.DataFrame:
    """The union of the shards in the fixed order (model, then image), every row once.

    Shards computed here come from memory when the unit kept them; resumed ones are read once.
    Fills ``report`` (parts, failures in model-then-image order, counts).
    """
    written: dict[Path, tuple[Path, pa.Table | None]] = {}
    failures = []
    for unit, res in zip(units, done):
        for todo, path, table in zip(unit.todo, res.written, res.tables):
            written[todo.path] = (path, table)
        failures += res.failures
        report.n_parts_done += res.n_computed
        report.n_parts_resumed += res.n_copied
    failed = {(mi, rank) for mi, rank, _, _ in failures}
    report.failures = [(f, r) for _, _, f, r in sorted(failures, key=lambda x: (x[0], x[1]))]
    tables = []
    for mi, model in enumerate(models):
        for path, ranks in planned[mi]:
            actual, table = written.get(path, (path, None))
            if actual is None:  # every image of the shard failed
                continue
            for rank in ranks:
                if (mi, rank) not in failed:
                    job = jobs[rank]
                    report.parts[(model.name, job.task, job.image_id)] = actual
            if table is None:
                table = _read_shard(actual)
            if table.num_rows:
                tables.append(table)
    if not tables:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    return pa.concat_tables(tables).to_pandas()[RESULT_COLUMNS]


def volumes_path(out: str | Path) -> Path:
    """The volume-level table written beside ``out``: ``<out stem>.volumes.parquet``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.volumes.parquet")


def _write_volume_table(manifest, root, results, save_masks, out, report) -> None:
    """Reassemble the saved slice masks into volumes and score them in mm (issue: slice-only
    scoring flatters a model and pixel distances ignore spacing). Volumes whose masks are
    missing are recorded as failures, never dropped silently."""
    evaluated = results[["task", "image_id", "label_value"]].drop_duplicates()
    rows = manifest.astype({"label_value": "int64"}).merge(evaluated.astype({"label_value": "int64"}))
    pred = {(m, s): volumes.saved_masks(save_masks, m, s, rows)
            for m, s in results[["model", "strategy"]].drop_duplicates().itertuples(index=False)}
    try:
        table = volumes.volume_table(rows, pred, root=root)
    except KeyError as exc:  # a saved mask is missing (e.g. the masks folder was removed)
        report.failures.append((str(save_masks), f"volume table not written: {exc}"))
        return
    atomic_write_parquet(table, volumes_path(out))


def fused_embedding(model, image: np.ndarray, dtype: str = "float16") -> tuple[np.ndarray, float]:
    """The embedding of one image computed now and kept in memory only (fused mode).

    Parameters
    ----------
    model : SamFamilyModel
    image : uint8 ``(H, W)`` or ``(H, W, 3)``.
    dtype : the precision the cache would store (default fp16, as :class:`cosmoslib.models.cache.EmbeddingCache`);
        the embedding is rounded to it so that the decoded masks equal the cached path's.

    Returns
    -------
    (float32 ndarray, float)
        The embedding ``model.embedding_shape`` and the encoder seconds of this image.
    """
    start = time.perf_counter()
    emb = model.encode([image], batch_size=1)[0]
    seconds = time.perf_counter() - start
    return np.asarray(emb, dtype=np.float32).astype(dtype).astype(np.float32), seconds
