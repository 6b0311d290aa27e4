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

How a run is told what to do: one :class:`EvalSettings` (frozen, typed; ``evaluate(manifest, root,
models, out, settings)``, or its fields as keywords). Its *computing* fields (strategies, seed, S1
grid, Everything options, prompt shifts) make the fingerprint of the results; its *running*
fields (cache, shard size, scheduler, threads, ...) do not change the table.

Validity and resume: a stored result is valid only for the exact inputs, model and settings that
made it. Results are written into ``<out>.parts/`` atomically, under a folder named by a
fingerprint of the settings (:meth:`EvalSettings.fingerprint`) and one per model signature.
Images are taken in a fixed order (sorted by task and image id) and grouped into *shards* of
``shard_size`` consecutive images; one shard of one model is one Parquet file
(:mod:`cosmoslib.protocol.shards`), written when the shard is finished, named by a digest of the
(task, image id, image digest) of its images, where an image's digest covers the image bytes, the
label bytes, the objects evaluated and their prompt rows. A rerun reuses a shard file when its
name matches; when it does not (an image changed, the manifest grew), the rows of every image
recorded in some shard file of the folder are copied, and only the other images are computed:
change one label PNG and exactly that image is recomputed. A shard in which some image failed is
written under the digest of the images it does hold, so the failed image is tried again next
time. The planning and the computing of shards live in :mod:`cosmoslib.protocol.units`; the final
table is the concatenation of the shards in the fixed order (rows computed in this run are kept
in memory, only resumed shards are read), so a killed and resumed run, or a run on a Dask cluster
(``scheduler=``, :mod:`cosmoslib.protocol.distributed`), gives the identical table.

Bookkeeping per image is independent of the manifest size: prompt rows and objects are grouped
by image once, each image and label is read once for all models, each chosen candidate is scored
once, and a shard's planning costs a ``stat`` (see ``benchmarks/scale.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from cosmoslib import __version__, paths
from cosmoslib.files import atomic_write_csv, atomic_write_parquet, file_digest
from cosmoslib.files import mask_filename  # noqa: F401  (re-exported: the audit masks' file names)
from cosmoslib.protocol import distributed, prompts, shards, units, volumes
# Re-exported from the modules that own them since the runner was split (callers keep working):
# the results columns and the S1 mask store (shards), scoring one image and fused mode (units).
from cosmoslib.protocol.shards import RESULT_COLUMNS, model_folder, s1_masks, shard_entries  # noqa: F401
from cosmoslib.protocol.units import evaluate_image, fused_embedding  # noqa: F401
from cosmoslib.strategies import PROMPT_STRATEGIES, STRATEGIES
from cosmoslib.strategies import check as check_strategies

__all__ = ["EvalSettings", "EvalReport", "evaluate", "prompt_table", "with_digests", "volumes_path",
           "RESULT_COLUMNS", "evaluate_image", "fused_embedding", "s1_masks", "model_folder", "shard_entries",
           "mask_filename"]

_KEY = ["task", "image_id", "label_value"]


@dataclass(frozen=True)
class EvalSettings:
    """What :func:`evaluate` computes and how it runs (frozen, typed; one object instead of a
    long argument list).

    The first six fields decide the numbers and make the fingerprint of the stored results
    (:meth:`fingerprint`); the others only decide where and how fast they are computed -- the
    table is the same for any of their values.

    Attributes
    ----------
    strategies : tuple of str
        Subset of ``S1``..``S6`` (paper 3.3), in the order their rows are produced; any case,
        checked and upper-cased (an unknown name raises ``ValueError``). Default: all six.
    seed : int
        Prompt sampling seed (>= 0): one prompt table per manifest, shared by every model (default 0).
    points_per_side : int
        S1 grid size m: m x m point prompts over the image (paper 3.2, Table 5; default 32, >= 1).
    everything_kwargs : mapping or None
        Extra keyword arguments of :func:`cosmoslib.models.everything.generate_everything`
        (e.g. ``pred_iou_thresh``, ``stability_score_thresh``); None (default): the paper's.
        Stored as a plain ``dict``; read, never changed.
    shift_levels : tuple of int
        Prompt shift levels (paper 4.9, Table 8): 1, 2, 3 shift a prompt by 0-10, 10-20, 20-30
        pixels; 0, the unshifted prompt, always runs. Stored sorted and with 0; default ``(0,)``.
    repeats : int
        Seeded repeats per shift level above 0 ("Random 1-3" in Table 8; default 3, >= 1).
    cache : bool
        True (default): embeddings come from the embedding cache (computed and stored once).
        False: *fused* mode (``cosmos evaluate --no-cache``): each image is encoded, every
        strategy decoded right away and the embedding dropped -- no disk, but every later run
        encodes again. The embedding is rounded to the cache's precision (fp16) first, so the
        table equals the cached path's (only ``t_embed_s`` is this run's encoder time).
    cache_dir : Path or None
        Embedding cache folder; None: :func:`cosmoslib.paths.embedding_cache_dir`.
    save_masks : Path or None
        Write every matched mask (oracle rule, unshifted prompts) as a 0/255 PNG to
        ``<dir>/<model>/<strategy>/<task>/<image>__<object>-<value>.png``. When the manifest
        knows source volumes (:func:`cosmoslib.protocol.volumes.has_volumes`) masks are always
        kept (in ``<out>.masks/`` when None) for the volume table.
    shard_size : int
        Images per result file and per Dask task (default 1: one file per image; 64-256 at
        COSMOS scale so files grow with shards, not images; >= 1).
    scheduler : None, str or distributed.Client
        None (default): compute in this process. Else a Dask scheduler for
        :func:`cosmoslib.protocol.distributed.client_for` (``"local:N"``, ``"tcp://host:port"``,
        ``"slurm:cluster.yaml"``, ...) or a ``distributed.Client``; workers load each model once
        and write the same shards.
    threads : int
        Torch threads per Dask worker (default 1, >= 1; ignored without ``scheduler``).
    retries : int
        Times a Dask task is retried after an error (default 3, >= 0); a task lost with a killed
        worker is rescheduled by Dask anyway.
    progress : bool
        Show a progress bar on stderr (default True).
    """

    strategies: tuple[str, ...] = tuple(STRATEGIES)
    seed: int = 0
    points_per_side: int = 32
    everything_kwargs: Mapping[str, Any] | None = None
    shift_levels: tuple[int, ...] = (0,)
    repeats: int = 3
    cache: bool = True
    cache_dir: Path | None = None
    save_masks: Path | None = None
    shard_size: int = 1
    scheduler: Any = None
    threads: int = 1
    retries: int = 3
    progress: bool = True

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen)
        set_("strategies", tuple(check_strategies(self.strategies)))
        set_("shift_levels", tuple(sorted({0, *(int(v) for v in self.shift_levels)})))
        if self.everything_kwargs is not None:
            set_("everything_kwargs", dict(self.everything_kwargs))
        for name in ("cache_dir", "save_masks"):
            value = getattr(self, name)
            set_(name, Path(value) if value else None)
        for name, low in (("seed", 0), ("points_per_side", 1), ("repeats", 1), ("shard_size", 1), ("threads", 1),
                          ("retries", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < low:
                raise ValueError(f"EvalSettings.{name} must be an integer >= {low}, got {value!r}")
            set_(name, int(value))
        if any(not 0 <= v <= 3 for v in self.shift_levels):
            raise ValueError(f"EvalSettings.shift_levels are 0..3 (0 = unshifted), got {self.shift_levels}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The names of all fields, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> EvalSettings:
        """A copy with ``changes``; a name that is not a field raises ``TypeError`` naming it."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise TypeError(f"unknown evaluation setting(s) {', '.join(map(repr, unknown))}; "
                            f"EvalSettings has {', '.join(self.field_names())}")
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> str:
        """12 hex digits naming the folder of this run's results under ``<out>.parts/``.

        SHA-256 over the computing fields (strategies, sorted; seed; points per side;
        Everything options; shift levels; repeats) and the cosmoslib version: two runs share
        stored results exactly when these agree.
        """
        text = json.dumps(dict(strategies=sorted(self.strategies), seed=self.seed,
                               points_per_side=self.points_per_side, everything=self.everything_kwargs or {},
                               shift_levels=list(self.shift_levels), repeats=self.repeats,
                               version=__version__), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class EvalReport:
    """What one evaluation did.

    Attributes
    ----------
    out : Path
        The results table written.
    n_images, n_objects, n_rows : int
        Images and (image, object) rows of the manifest evaluated; rows of the results table.
    n_parts_done, n_parts_resumed : int
        (model, image) pairs computed in this run, and taken from shards of earlier runs.
    failures : list of (file, reason)
        Inputs that could not be evaluated (also in :attr:`skipped_csv`), in model-then-image order.
    elapsed : float
        Wall-clock seconds of the whole call.
    models, strategies : list of str
        What ran.
    parts : dict
        The result shard holding each ``(model name, task, image_id)`` evaluated or resumed.
    """

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
    parts: dict[tuple[str, str, str], Path] = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    def s1_masks(self, model: str, task: str, image_id: str) -> list[np.ndarray]:
        """The Everything (S1) masks this run stored for one image (bool ``(H, W)`` each)."""
        return shards.s1_masks(self.parts[(model, task, image_id)].with_suffix(".s1.json"), task, image_id)

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


def _combos(shift_levels: Sequence[int], repeats: int) -> set[tuple[int, int]]:
    """(shift_level, repeat) pairs a prompt table must hold: (0, 0) and each level x repeat."""
    return {(0, 0)} | {(int(lv), r) for lv in shift_levels if int(lv) > 0 for r in range(1, repeats + 1)}


def prompt_table(manifest: pd.DataFrame, root: Path, seed: int, path: Path | None = None,
                 shift_levels: Sequence[int] = (0,), repeats: int = 3, scheduler=None,
                 progress: bool = True) -> pd.DataFrame:
    """The seeded prompt table of ``manifest`` (S2-S6), keyed by label content.

    Rows stored in ``path`` are reused for an object only when its label file's digest
    (``label_sha``) and the seed match and every requested (strategy, shift level, repeat) is
    there; every other object gets fresh prompts. The table on disk is rewritten (atomically)
    when anything was added.

    With ``scheduler`` (a ``distributed.Client`` or a scheduler text, see
    :func:`cosmoslib.protocol.distributed.client_for`) the new prompts are generated on the workers, in
    groups of images (each object's generator depends only on the seed and the object's key,
    so the table is the same as in one process). ``progress`` shows the per-image bar of a
    local run (stderr).

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
        # a boolean array, not a list: an empty list would select no *columns* (another seed's table)
        old = old[np.array([(int(a), int(b)) in combos for a, b in zip(old["shift_level"], old["repeat"])],
                           dtype=bool)]
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
            fresh = prompts.make_prompt_table(todo, root, seed=seed, progress=progress, **kwargs)
        else:
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


def evaluate(manifest: pd.DataFrame, root: str | Path, models: Iterable, out: str | Path,
             settings: EvalSettings | None = None, **overrides) -> tuple[pd.DataFrame, EvalReport]:
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
        listed in ``<out stem>.skipped.csv`` (rewritten each run, empty when none). When the
        manifest knows source volumes (paper 2.2 slices) the volume-level table (3D DICE,
        HD/HD95/ASSD and NSD in mm, beside the per-slice means) is written to
        ``<out stem>.volumes.parquet`` (:func:`volumes_path`).
    settings : EvalSettings, optional
        What to compute and how (default: ``EvalSettings()``, all six strategies, seed 0).
    **overrides
        Fields of :class:`EvalSettings` set for this call, e.g. ``strategies=["S5"], seed=1``
        (applied over ``settings``). A name that is not a field raises ``TypeError`` naming it.

    Returns
    -------
    (DataFrame, EvalReport)
        The results table (:data:`RESULT_COLUMNS`) and what the run did.
    """
    start = time.perf_counter()
    if settings is None:
        settings = EvalSettings()
    elif not isinstance(settings, EvalSettings):
        raise TypeError(f"evaluate(): settings must be an EvalSettings, got {type(settings).__name__} "
                        f"(give strategies and the other settings as keywords)")
    if overrides:
        settings = settings.replace(**overrides)
    root, out = Path(root), Path(out)
    models = list(models)
    manifest = with_digests(manifest, root)
    volume_sources = volumes.has_volumes(manifest)
    save_masks = settings.save_masks
    if save_masks is None and volume_sources:
        save_masks = out.with_name(out.name + ".masks")
    parts = out.with_name(out.name + ".parts") / settings.fingerprint()
    report = EvalReport(out=out, models=[m.name for m in models], strategies=list(settings.strategies))

    need_prompts = any(s in PROMPT_STRATEGIES for s in settings.strategies)
    run = units.RunSettings(root=root, strategies=settings.strategies, points_per_side=settings.points_per_side,
                            everything_kwargs=settings.everything_kwargs, save_masks=save_masks,
                            cache_dir=settings.cache_dir or paths.embedding_cache_dir(),
                            use_cache=settings.cache)
    # one cluster for both steps (connect(None) yields None: everything runs here)
    with distributed.connect(settings.scheduler, threads=settings.threads) as client:
        ptable = (prompt_table(manifest, root, settings.seed, out.with_name("prompts.parquet"),
                               shift_levels=settings.shift_levels, repeats=settings.repeats, scheduler=client,
                               progress=settings.progress)
                  if need_prompts else None)
        work, jobs, planned, report.n_parts_resumed = units.plan(manifest, models, parts, ptable,
                                                                 settings.shard_size)
        if client is None:
            caches: dict = {}
            bar = tqdm(work, desc="evaluate", unit="shard", file=sys.stderr, disable=not settings.progress)
            done = [units.run_unit(unit, models, run, keep_tables=True, caches=caches) for unit in bar]
        else:
            done = distributed.run_units(client, work, models, run, threads=settings.threads,
                                         retries=settings.retries, progress=settings.progress)
    report.n_images, report.n_objects = len(jobs), len(manifest)
    results = _assemble(work, done, planned, jobs, models, report)
    atomic_write_parquet(results, out)
    if volume_sources and len(results):
        _write_volume_table(manifest, root, results, save_masks, out, report)
    atomic_write_csv(pd.DataFrame(report.failures, columns=["file", "reason"]), report.skipped_csv)
    report.n_rows = len(results)
    report.elapsed = time.perf_counter() - start
    return results, report


def _assemble(work: list[units.WorkUnit], done: list[units.UnitResult], planned,
              jobs: list[units.ImageJob], models: Sequence, report: EvalReport) -> pd.DataFrame:
    """The union of the shards in the fixed order (model, then image), every row once.

    Shards computed here come from memory when the unit kept them; resumed ones are read once.
    Fills ``report`` (parts, failures in model-then-image order, counts).
    """
    written: dict[Path, tuple[Path, pa.Table | None]] = {}
    failures = []
    for unit, res in zip(work, done):
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
                table = shards.read_shard(actual)
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
