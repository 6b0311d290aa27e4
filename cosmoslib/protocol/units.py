"""Work units of the runner: what to compute for which images, and computing one unit.

The run of :func:`cosmoslib.protocol.evaluate.evaluate` is planned here (:func:`plan`): images in a
fixed order (sorted by task and image id) become :class:`ImageJob` s with a content digest each
(image and label bytes, the objects evaluated and their prompt rows; :func:`image_digests`), and
consecutive images are grouped into shards of ``shard_size``. Per model and shard the plan looks
at the shard folder (:mod:`cosmoslib.protocol.shards`): a shard whose file exists is resumed,
images recorded in some other shard file are copied from it, the rest are computed. Every shard
with work is one :class:`WorkUnit`.

:func:`run_unit` computes one unit -- in this process, or as one Dask task on a worker
(:func:`cosmoslib.protocol.distributed.run_units`), the very same function: each image and label
is read once for all models, the embedding comes from the cache (or is computed and dropped in
fused mode, :func:`fused_embedding`), every object is scored under every strategy by
:func:`evaluate_image`, and per model the shard is written atomically with its S1 masks beside it.
Bad input is recorded as a failure of that (model, image) and the rest goes on.

This module knows nothing of schedulers or of the prompt table's storage; it imports neither
:mod:`~cosmoslib.protocol.evaluate` nor :mod:`~cosmoslib.protocol.distributed` (both import it).
Planning costs are independent of the manifest size per image (``benchmarks/scale.py``).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from cosmoslib.data.readers import encode_png, read_image, read_label
from cosmoslib.files import InputError, atomic_write_bytes, atomic_write_json, mask_filename, slug
from cosmoslib.models import cache as cache_mod
from cosmoslib.models import everything
from cosmoslib.protocol import matching, metrics, prompts, shards
from cosmoslib.protocol.shards import RESULT_COLUMNS

__all__ = ["ImageJob", "ShardTodo", "WorkUnit", "RunSettings", "UnitResult", "evaluate_image",
           "fused_embedding", "part_digest", "image_digests", "plan", "run_unit"]


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


@dataclass(frozen=True)
class RunSettings:
    """Everything a worker needs besides the models to compute a :class:`WorkUnit`.

    Made by :func:`cosmoslib.protocol.evaluate.evaluate` from its
    :class:`~cosmoslib.protocol.evaluate.EvalSettings` (paths resolved), and pickled to Dask
    workers. ``everything_kwargs`` is read, never changed.
    """

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


def part_digest(objects: pd.DataFrame, prompt_rows: pd.DataFrame) -> str:
    """Digest of everything an image's rows are computed from besides the model and the settings:
    the image and label bytes (their digests), the objects, and the prompt rows."""
    first = objects.iloc[0]
    objects = objects.sort_values("label_value", kind="stable")
    prompt_rows = prompt_rows.sort_values(_PROMPT_KEY, kind="stable") if len(prompt_rows) else prompt_rows
    return _digest_of(first["image_sha"], first["label_sha"], _object_texts(objects), _prompt_texts(prompt_rows))


def image_digests(manifest: pd.DataFrame, ptable: pd.DataFrame | None) -> dict[tuple[str, str], str]:
    """:func:`part_digest` of every image at once: one pass over each table, no per-image
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


def _save_mask(save_masks: Path, model: str, strategy: str, row, mask: np.ndarray) -> Path:
    """Write one matched mask as a 0/255 PNG (atomically) for audit."""
    path = save_masks / slug(model) / strategy / str(row.task) / mask_filename(
        row.image_id, row.object, row.label_value)
    return atomic_write_bytes(path, encode_png(mask.astype(np.uint8) * 255))


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
                s1s[(mi, job.rank)] = shards.s1_record(s1)
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
            key = shards.s1_key(job.task, job.image_id)
            if job.rank in todo.reuse:
                src = todo.reuse[job.rank]
                if src not in sources:
                    sources[src] = shards.read_shard(src).to_pandas()
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
        path = todo.path if complete else todo.path.with_name(shards.shard_name(entries))
        table = shards.shard_table(frames)
        if with_s1:  # first the masks, then the shard: a shard on disk always has its masks
            atomic_write_json(path.with_suffix(".s1.json"), {"images": s1_out})
        shards.write_shard(path, table, entries)
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
    digests = image_digests(manifest, ptable)
    jobs: list[ImageJob] = []
    for rank, ((task, image_id), objects) in enumerate(manifest.groupby(["task", "image_id"], sort=True)):
        prows = by_image.get((task, image_id), empty)
        jobs.append(ImageJob(rank=rank, task=task, image_id=image_id, image_path=objects["image_path"].iat[0],
                             label_path=objects["label_path"].iat[0], digest=digests[(task, image_id)],
                             objects=objects, prompt_rows=prows))
    shard_size = max(1, int(shard_size))
    batches = [jobs[i:i + shard_size] for i in range(0, len(jobs), shard_size)]
    units: dict[int, WorkUnit] = {}
    planned: list[list[tuple[Path, list[int]]]] = []
    n_resumed = 0
    for mi, model in enumerate(models):
        folder = shards.model_folder(parts, model)
        index = None  # read only when some shard is missing
        mine = []
        for si, shard in enumerate(batches):
            path = folder / shards.shard_name([j.entry for j in shard])
            mine.append((path, [j.rank for j in shard]))
            if path.exists():
                n_resumed += len(shard)
                continue
            if index is None:
                index = shards.shard_index(folder)
            reuse = {j.rank: index[j.entry] for j in shard if j.entry in index}
            unit = units.setdefault(si, WorkUnit(index=si, jobs=shard, todo=[]))
            unit.todo.append(ShardTodo(model_index=mi, path=path, reuse=reuse))
        planned.append(mine)
    return [units[k] for k in sorted(units)], jobs, planned, n_resumed
