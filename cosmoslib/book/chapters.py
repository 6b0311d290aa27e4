"""The chapter layer: the one object a notebook opens, and the computations chapters share.

A chapter notebook is a parameters cell, one :meth:`Chapter.open`, then calls that return a
table or a figure, and glue. Everything a chapter needs comes from its :class:`Chapter`:

* the typed, frozen :class:`cosmoslib.book.runlist.Config` of the run (no dict in between);
* the COSMOS root as an explicit path (``Chapter.root``) -- never carried in ``DataFrame.attrs``;
* the manifest, indexed **once per config** and stored beside the results
  (``results/<config>/manifest.parquet``), reused while no file under the root changed (see
  :func:`indexed`);
* each model, loaded **once per process** (:func:`model`);
* the results of the config (:meth:`Chapter.results`, :meth:`Chapter.everything_grid`),
  computed once and reused by every chapter (the runner keys them by content);
* figure helpers that re-decode single objects from the cached embeddings
  (:class:`Redecoder`, :meth:`Chapter.gallery`, :meth:`Chapter.everything_example`);
* :meth:`Chapter.caption`, which ends every caption with the notebook and config that made it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cosmoslib import __version__, files, paths
from cosmoslib import models as models_mod
from cosmoslib.book import finetune_runs, plots
from cosmoslib.book.runlist import Config
from cosmoslib.book.runlist import config as config_named
from cosmoslib.analysis import factors as factors_mod
from cosmoslib.data import dataset, indexer, readers
from cosmoslib.models import cache as cache_mod
from cosmoslib.models import everything as everything_mod
from cosmoslib.protocol import (
    annotation,
    evaluate,
    finetune,
    interactive,
    matching,
    prompts,
    s1_thresholds,
    splits,
)
from cosmoslib.strategies import PROMPT_STRATEGIES

# Per-process memory: each model is loaded, and each root indexed, at most once per process.
_MODELS: dict[tuple[str, str], Any] = {}
_INDEXED: dict[tuple[str, str], pd.DataFrame] = {}


def model(name: str, device: str | None = None):
    """The registry model ``name``, loaded at most once per process (and per device), with
    ``backend="auto"`` (the fastest encoder runtime that passed a parity probe here, else
    torch; :mod:`cosmoslib.models.backend_probe`)."""
    key = (name, str(device))
    if key not in _MODELS:
        _MODELS[key] = models_mod.load_model(name, device=device, backend="auto")
    return _MODELS[key]


def data_fingerprint(root: str | Path) -> str:
    """A digest of every file's relative path, size and modification time under ``root``.

    Cheap (a directory walk, no file is opened) and changes whenever a file is added, removed,
    or rewritten, so a stored manifest is reused only while the data are untouched; the
    manifest itself records each file's content digest for the results built on it.
    """
    root = Path(root)
    digest = hashlib.blake2b(digest_size=16)
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            stat = path.stat()
            digest.update(f"{path.relative_to(root).as_posix()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def indexed(root: str | Path, store: Path | None = None) -> pd.DataFrame:
    """The manifest of ``root`` (:func:`cosmoslib.data.indexer.index`), computed once while ``root`` is unchanged.

    Parameters
    ----------
    root : a COSMOS-layout folder.
    store : ``manifest.parquet`` to keep it in across processes; its fingerprint (see
        :func:`data_fingerprint`) is stored in ``<store>.fingerprint``.
    """
    root = Path(root).resolve()
    # the manifest's own format is part of it: a manifest stored by an older indexer is rebuilt
    fingerprint = f"{data_fingerprint(root)}-v{indexer.MANIFEST_VERSION}"
    key = (str(root), fingerprint)
    if key in _INDEXED:
        return _INDEXED[key]
    stamp = store.with_name(store.name + ".fingerprint") if store is not None else None
    if store is not None and store.exists() and stamp.exists() and stamp.read_text().strip() == fingerprint:
        manifest = pd.read_parquet(store)
    else:
        manifest = indexer.index(root)
        if store is not None:
            files.atomic_write_parquet(manifest, store)
            files.atomic_write_bytes(stamp, fingerprint.encode())
            manifest = pd.read_parquet(store)  # the same dtypes as every later reader gets
    _INDEXED[key] = manifest
    return manifest


@dataclass(frozen=True)
class GalleryItem:
    """One object of the Fig. 9 gallery: image, GT, and per-strategy prompt + matched mask."""

    title: str
    image: np.ndarray
    gt: np.ndarray
    panels: tuple  # of (strategy, Prompt, mask bool (H, W), dice %)


class Redecoder:
    """Re-decode single objects of a finished config for figures (Figs. 9 and 15).

    Decoding from the cached embedding is cheap, so figures recompute masks instead of storing
    every candidate; the prompts are the same rows of the config's prompt table.
    """

    def __init__(self, chapter: "Chapter", model_name: str | None = None):
        self.root = chapter.root
        self.model = model(model_name or chapter.config.models[0])
        self.cache = cache_mod.EmbeddingCache(paths.embedding_cache_dir(), self.model)
        table = pd.read_parquet(chapter.results_dir / "prompts.parquet")
        self.prompts = table[table["shift_level"] == 0].set_index(
            ["task", "image_id", "label_value", "strategy"]).sort_index()
        self.manifest = chapter.manifest.set_index(["task", "image_id", "label_value"]).sort_index()

    def __call__(self, task: str, image_id: str, label_value: int, strategy: str):
        """Returns ``(image, gt, prompt, matched mask, DICE %)`` for one object and strategy."""
        row = self.manifest.loc[(task, image_id, int(label_value))]
        image = readers.read_image(self.root / row["image_path"])
        gt = readers.read_label(self.root / row["label_path"]) == int(label_value)
        prow = self.prompts.loc[(task, image_id, int(label_value), strategy)]
        prompt = prompts.prompt_from_row(prow)
        dec = self.model.decode(self.cache.get(self.root / row["image_path"]), prompt, gt.shape)
        m = matching.match(dec.masks, dec.iou_pred, gt)
        return image, gt, prompt, dec.masks[m.oracle_index], float(m.dices[m.oracle_index])


class Chapter:
    """What one chapter notebook works with (see the module docstring).

    Parameters
    ----------
    notebook : the notebook stem, e.g. ``"01_strategies"`` (named in every caption).
    config : the run's :class:`~cosmoslib.book.runlist.Config`.
    """

    def __init__(self, notebook: str, config: Config):
        self.notebook = notebook
        self.config = config
        self._grid_reports: dict[int, evaluate.EvalReport] = {}

    @classmethod
    def open(cls, notebook: str, config: str, smoke: bool | None = None,
             settings: Mapping[str, Any] | None = None) -> "Chapter":
        """The chapter of ``notebook`` under the run-list config ``config``.

        Parameters
        ----------
        notebook : notebook stem.
        config : config name (the notebook's ``config`` parameter).
        smoke : the notebook's ``smoke`` parameter; must agree with the config.
        settings : the config's fields as papermill injected them (the notebook's ``settings``
            parameter); empty or None = the run list's config of that name. Unknown or
            misspelt fields are an error.
        """
        cfg = Config.from_parameters(settings) if settings else config_named(config)
        if cfg.name != config:
            raise ValueError(f"settings are for config {cfg.name!r}, the notebook was given {config!r}")
        if smoke is not None and bool(smoke) != cfg.smoke:
            raise ValueError(f"smoke={smoke} disagrees with config {config!r} (smoke={cfg.smoke})")
        return cls(notebook, cfg)

    # ------------------------------------------------------------------ data

    @cached_property
    def root(self) -> Path:
        """The COSMOS root of the config (cosmos-demo, built on first use, when none is given)."""
        return dataset.resolve_root(self.config.data_root)

    @property
    def results_dir(self) -> Path:
        return paths.results_dir(self.config.name)

    @cached_property
    def full_manifest(self) -> pd.DataFrame:
        """Every object under the root (indexed once per config, see :func:`indexed`)."""
        return indexed(self.root, self.results_dir / "manifest.parquet")

    @cached_property
    def manifest(self) -> pd.DataFrame:
        """The objects this config evaluates (the config's subsample of :attr:`full_manifest`)."""
        c = self.config
        return dataset.subsample(self.full_manifest, c.max_images_per_task, c.max_objects_per_image, c.seed,
                                 object_sampling=c.object_sampling)

    def model(self, name: str | None = None):
        """A model of the config (default: the first), loaded once per process."""
        return model(name or self.config.models[0])

    @property
    def models(self) -> list:
        return [self.model(name) for name in self.config.models]

    # ------------------------------------------------------------------ results

    @cached_property
    def _results(self) -> pd.DataFrame:
        out = self.results_dir / "results.parquet"
        results, _ = evaluate.evaluate(self.manifest, self.root, self.models, out, seed=self.config.seed,
                                       points_per_side=self.config.s1_points_per_side)
        return results

    def results(self) -> pd.DataFrame:
        """Results of the config's S1-S6 run (computed once, resumable, keyed by content)."""
        return self._results

    def prompt_table(self) -> pd.DataFrame:
        """The config's prompt table (unshifted rows), as the runner stored it."""
        self.results()
        table = pd.read_parquet(self.results_dir / "prompts.parquet")
        return table[table["shift_level"] == 0].reset_index(drop=True)

    def grid_manifest(self, min_objects: int = 2) -> pd.DataFrame:
        """The Everything-grid chapter's images: at least ``min_objects`` objects each, at most
        ``grid_max_images`` of them (chosen evenly over the sorted image list)."""
        manifest = self.manifest
        counts = manifest.groupby(["task", "image_id"])["label_value"].transform("size")
        multi = manifest[counts >= min_objects]
        keys = multi[["task", "image_id"]].drop_duplicates().sort_values(["task", "image_id"])
        cap = self.config.grid_max_images
        if cap and len(keys) > cap:
            keys = keys.iloc[np.linspace(0, len(keys) - 1, cap).round().astype(int)]
        return multi.merge(keys, on=["task", "image_id"])

    def everything_grid(self, min_objects: int = 2) -> pd.DataFrame:
        """Table 5: S1 results at each grid size m of the config, with a ``points_per_side`` column."""
        multi = self.grid_manifest(min_objects)
        frames = []
        for m in self.config.grid_sizes:
            out = self.results_dir / "everything_grid" / f"m{m}.parquet"
            res, report = evaluate.evaluate(multi, self.root, self.models, out, strategies=["S1"],
                                            points_per_side=int(m), seed=self.config.seed)
            self._grid_reports[int(m)] = report
            frames.append(res.assign(points_per_side=int(m)))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    # ------------------------------------------------------------------ protocols (4.9-4.11)

    def protocol_objects(self, n: int) -> pd.DataFrame:
        """A seeded sample of ``n`` objects of the config spread evenly over its tasks (0 = all).

        Objects are shuffled within each task with the config's seed, then taken one per task in
        turn (tasks in name order) until ``n`` are chosen, so small tasks are never crowded out.
        """
        manifest = self.manifest
        if not n or n >= len(manifest):
            return manifest.reset_index(drop=True)
        keys = dataset.spread_objects(manifest, n, np.random.default_rng(self.config.seed))
        return manifest.merge(keys[["task", "image_id", "label_value"]],
                              on=["task", "image_id", "label_value"]).reset_index(drop=True)

    @cached_property
    def _randomness(self) -> pd.DataFrame:
        c = self.config
        out = self.results_dir / "randomness" / "results.parquet"
        results, _ = evaluate.evaluate(self.protocol_objects(c.protocol_max_objects), self.root, self.models, out,
                                       strategies=PROMPT_STRATEGIES, seed=c.seed,
                                       shift_levels=c.shift_levels, repeats=c.shift_repeats)
        return results

    def randomness(self) -> pd.DataFrame:
        """Table 8: S2-S6 results with shifted prompts (``shift_level`` 1-3, ``repeat`` 1..n) and
        the unshifted prompt (0, 0), on the config's protocol sample (computed once, by content)."""
        return self._randomness

    def shifted_prompts(self) -> pd.DataFrame:
        """The prompt rows of :meth:`randomness` (every shifted prompt, inspectable)."""
        self.randomness()
        return pd.read_parquet(self.results_dir / "randomness" / "prompts.parquet")

    def _stored(self, kind: str, rows: pd.DataFrame, **settings) -> Path:
        """Where a chapter table lives: named by a digest of its objects' content, the models'
        signatures and the settings, so it is reused only for exactly the inputs that made it."""
        payload = json.dumps(dict(settings, models=[m.signature_hash for m in self.models], version=__version__,
                                  objects=rows[["image_sha", "label_sha", "label_value"]].astype(str)
                                  .to_numpy().tolist()), sort_keys=True, default=str)
        return self.results_dir / kind / f"{hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()}.parquet"

    def interaction_segmenters(self, name: str, embedding) -> dict[str, Any]:
        """The methods of the interaction chapter for one image: the model without and with the
        previous round's logits as mask prompt, GrabCut and the random walker (same clicks)."""
        model = self.model(name)
        return {name: interactive.SamSegmenter(model, embedding, use_previous_logits=False),
                f"{name} + previous logits": interactive.SamSegmenter(model, embedding, use_previous_logits=True),
                "GrabCut": interactive.GrabCutSegmenter(seed=self.config.seed),
                "random walker": interactive.RandomWalkerSegmenter()}

    @cached_property
    def _interaction(self) -> pd.DataFrame:
        c = self.config
        objects = self.protocol_objects(c.interactive_max_objects)
        path = self._stored("interaction", objects, max_clicks=c.max_clicks, seed=c.seed)
        if path.exists():
            return pd.read_parquet(path)
        frames = []
        groups = list(objects.groupby(["task", "image_id"], sort=True))
        for name in c.models:
            emb_cache = cache_mod.EmbeddingCache(paths.embedding_cache_dir(), self.model(name))
            for (task, image_id), rows in tqdm(groups, desc=f"interaction {name}", unit="img", file=sys.stderr):
                first = rows.iloc[0]
                image = readers.read_image(self.root / first["image_path"])
                label = readers.read_label(self.root / first["label_path"])
                methods = self.interaction_segmenters(name, emb_cache.get(self.root / first["image_path"]))
                if name != c.models[0]:  # the classical methods do not depend on the model
                    methods = {k: v for k, v in methods.items() if k.startswith(name)}
                for r in rows.itertuples(index=False):
                    for method, segmenter in methods.items():
                        curve = interactive.run_interaction(segmenter, image, label == r.label_value,
                                                            max_clicks=c.max_clicks)
                        frames.append(curve.assign(task=task, image_id=image_id, label_value=int(r.label_value),
                                                   object=r.object, modality=r.modality, method=method))
        table = pd.concat(frames, ignore_index=True)
        files.atomic_write_parquet(table, path)
        return table

    def interaction(self) -> pd.DataFrame:
        """Fig. 16: one row per object, method and click (``click, dice, x, y, label``), from
        :func:`cosmoslib.protocol.interactive.run_interaction` on the config's interaction sample."""
        return self._interaction

    def annotation(self) -> pd.DataFrame:
        """Table 7: HCE of each object's S5 mask (the model's box prediction, oracle rule) with
        the seconds it cost (encoder share + decode), per object of the config (stored by the
        digest of its objects, models and version: computed once per book)."""
        path = self._stored("annotation", self.manifest, strategy="S5", rule="oracle_dice")
        if not path.exists():
            files.atomic_write_parquet(self._annotation(), path)
        return pd.read_parquet(path)  # the same dtypes on the first call as on every later one

    def factors(self) -> pd.DataFrame:
        """The object factors of Table 6 (:func:`cosmoslib.analysis.factors.compute_factors`) of
        the config's objects, stored by the digest of their content (computed once per book).
        ``attrs["skipped"]`` (objects that could not be measured, with why) is stored beside it."""
        path = self._stored("factors", self.manifest)
        side = path.with_name(path.stem + ".skipped.parquet")
        if not (path.exists() and side.exists()):
            table = factors_mod.compute_factors(self.manifest, self.root, progress=False)
            skipped = pd.DataFrame([tuple(map(str, x)) for x in table.attrs.get("skipped", [])],
                                   columns=["what", "why"])
            files.atomic_write_parquet(skipped, side)
            files.atomic_write_parquet(table, path)
        # read back even when just written: the first call and every later one see the same dtypes
        table = pd.read_parquet(path)
        table.attrs["skipped"] = list(pd.read_parquet(side).itertuples(index=False, name=None))
        return table

    #: The chapter layer's named tables: ``ch.table(name)`` (notebooks and the findings read them
    #: by name; an unknown name is an error).
    TABLES = ("results", "everything_grid", "randomness", "interaction", "annotation", "factors",
              "finetuned_results", "finetuned_interaction", "s1_thresholds")

    def table(self, name: str) -> pd.DataFrame:
        """The named table ``name`` of this config (one of :attr:`TABLES`), computed once and stored.

        Raises
        ------
        KeyError
            ``name`` is not a table of the chapter layer (a typo never turns into a silent None).
        """
        if name not in self.TABLES:
            raise KeyError(f"no table {name!r}; the chapter layer's tables are {', '.join(self.TABLES)}")
        return getattr(self, name)()

    def _annotation(self) -> pd.DataFrame:
        results = self.results()
        s5 = results[(results["strategy"] == "S5") & (results["selection_rule"] == "oracle_dice")
                     & (results["shift_level"] == 0)]
        rows = []
        for name, part in s5.groupby("model", sort=False):
            redecode = self.redecoder(name)
            n_obj = part.groupby(["task", "image_id"])["label_value"].transform("size")
            for r, objects_in_image in zip(part.itertuples(index=False), n_obj):
                _, gt, _, mask, dice = redecode(r.task, r.image_id, r.label_value, "S5")
                rows.append(dict(model=name, task=r.task, image_id=r.image_id, label_value=int(r.label_value),
                                 object=r.object, modality=r.modality, dice=dice,
                                 hce=annotation.hce(mask, gt),
                                 seconds=float(r.t_decode_s) + float(r.t_embed_s) / objects_in_image))
        return pd.DataFrame(rows)

    # ------------------------------------------------------------------ figures

    def redecoder(self, model_name: str | None = None) -> Redecoder:
        self.results()
        return Redecoder(self, model_name)

    def gallery(self, results: pd.DataFrame, n_per_task: int = 1,
                strategies: Sequence[str] = ("S2", "S3", "S4", "S5", "S6"),
                model_name: str | None = None) -> list[GalleryItem]:
        """Fig. 9: per task, ``n_per_task`` objects spread over the S5 DICE range, each strategy drawn."""
        name = model_name or self.config.models[0]
        redecode = self.redecoder(name)
        s5 = results[(results["model"] == name) & (results["strategy"] == "S5")
                     & (results["shift_level"] == 0) & (results["selection_rule"] == "oracle_dice")]
        items = []
        for _, part in s5.groupby("task", sort=True):
            part = part.sort_values(["dice", "image_id", "label_value"]).reset_index(drop=True)
            picks = part.iloc[np.linspace(0, len(part) - 1, min(n_per_task, len(part))).round().astype(int)]
            for r in picks.itertuples(index=False):
                panels, image, gt = [], None, None
                for strategy in strategies:
                    image, gt, prompt, mask, dice = redecode(r.task, r.image_id, r.label_value, strategy)
                    panels.append((strategy, prompt, mask, dice))
                items.append(GalleryItem(f"{r.object} ({r.modality}) {r.image_id}", image, gt, tuple(panels)))
        return items

    def everything_example(self, grid: pd.DataFrame, model_name: str | None = None):
        """Fig. 11: the Everything masks of the image with most objects in ``grid``, for each m.

        The masks are the ones the grid run stored beside its result parts (never recomputed).

        Returns
        -------
        (title, image, {m: list of bool (H, W) masks})
        """
        name = model_name or self.config.models[0]
        if not self._grid_reports:
            self.everything_grid()
        sub = grid[grid["model"] == name]
        counts = sub.drop_duplicates(["task", "image_id", "label_value"]).groupby(["task", "image_id"]).size()
        task, image_id = counts.sort_values(ascending=False, kind="stable").index[0]
        row = self.manifest[(self.manifest["task"] == task) & (self.manifest["image_id"] == image_id)].iloc[0]
        image = readers.read_image(self.root / row["image_path"])
        masks = {m: report.s1_masks(name, task, image_id) for m, report in sorted(self._grid_reports.items())}
        return f"{task}/{image_id} ({row['modality']})", image, masks

    # ------------------------------------------------------------------ prose

    def provenance(self) -> str:
        return plots.provenance(self.notebook, self.config.name)

    def caption(self, text: str) -> None:
        """Show ``text`` as a caption ending with the notebook and config that produced it."""
        # IPython comes with the optional [book] extra: only a notebook kernel needs it.
        from IPython.display import Markdown, display

        display(Markdown(f"{text} {self.provenance()}"))

    # ------------------------------------------------------------------ finetuned models (test part only)

    @cached_property
    def finetune_split(self) -> splits.Split:
        """The finetuning split of the config (:func:`cosmoslib.protocol.finetune.chapter_split`)."""
        return finetune_runs.chapter_split(self)

    def test_part(self) -> pd.DataFrame:
        """The manifest rows of the split's test part: the only objects a finetuned model is scored on."""
        return self.finetune_split.rows(self.manifest, "test")

    def only_test(self, table: pd.DataFrame) -> pd.DataFrame:
        """``table`` unchanged after checking that each of its images is in the test part.

        Raises
        ------
        RuntimeError
            A row of a training or validation image: no finetuned model (nor its base beside it)
            is ever reported on the images the decoder was trained or selected on.
        """
        if not len(table):
            return table
        seen = {(t, i) for part in ("train", "val")
                for t, i in self.finetune_split.rows(self.manifest, part)[["task", "image_id"]].itertuples(index=False)}
        bad = [(t, i) for t, i in table[["task", "image_id"]].drop_duplicates().itertuples(index=False) if (t, i) in seen]
        if bad:
            raise RuntimeError(f"{len(bad)} image(s) of the training or validation part in a test-part table, "
                               f"e.g. {bad[0]}")
        return table

    @cached_property
    def _finetuned(self) -> dict:
        split = self.finetune_split if self.config.finetuned_curricula else None
        runs = {}
        for base in finetune_runs.finetunable(self)[0]:
            for curriculum in self.config.finetuned_curricula:
                result = finetune_runs.chapter_run(self, base, curriculum, split=split)
                runs[result.name] = (base, curriculum, result)
        return runs

    def finetuned(self) -> dict[str, tuple[str, str]]:
        """``{finetuned model: (base model, curriculum)}`` of the config's ``finetuned_curricula``.

        The first call trains each run or reuses it (:func:`cosmoslib.protocol.finetune.chapter_run`: the
        run of the finetuning chapter, same settings and split, trained once per book).
        """
        return {name: (base, curriculum) for name, (base, curriculum, _) in self._finetuned.items()}

    def finetune_runs(self) -> dict:
        """``{finetuned model: FinetuneResult}`` (provenance, history, ``reused``)."""
        return {name: result for name, (_, _, result) in self._finetuned.items()}

    @cached_property
    def _finetuned_models(self) -> dict:
        return {name: finetune.load_finetuned(result.out_dir) for name, (_, _, result) in self._finetuned.items()}

    def finetuned_model(self, name: str):
        """The finetuned model ``name`` (loaded once per chapter from its run folder)."""
        return self._finetuned_models[name]

    def _label_pairs(self, table: pd.DataFrame) -> pd.DataFrame:
        return finetune_runs.label_pairs(table, self.finetuned())

    @cached_property
    def _finetuned_results(self) -> pd.DataFrame:
        names = list(self.finetuned())
        test = self.test_part()
        if not names or not len(test):
            return pd.DataFrame(columns=[*evaluate.RESULT_COLUMNS, "base", "curriculum"])
        tuned = finetune_runs.evaluate_test_part(self, test, [self.finetuned_model(n) for n in names])
        # the base models' rows of the same objects: the config's run already scored them with
        # the same prompts (the prompt table is seeded per object) and settings
        keys = test[["task", "image_id", "label_value"]].astype({"label_value": "int64"})
        base = self.results().astype({"label_value": "int64"}).merge(keys, on=["task", "image_id", "label_value"])
        base = base[base["model"].isin(self.config.models)]
        table = pd.concat([base, tuned], ignore_index=True)
        return self.only_test(self._label_pairs(table))

    def finetuned_results(self) -> pd.DataFrame:
        """S1-S6 results of the base models and their finetuned models on the **test part only**.

        Results table columns plus ``base`` and ``curriculum`` (``"none"`` for a base model).
        Empty when the config names no ``finetuned_curricula`` or the test part is empty.
        """
        return self._finetuned_results

    def finetuned_note(self) -> str:
        """The honesty note of every chapter that shows a finetuned model (glued, never hand-written)."""
        pairs = self.finetuned()
        skipped = "".join(f" {name} is not finetuned: {why}." for name, why in finetune_runs.finetunable(self)[1].items())
        if not pairs:
            return "This config evaluates no finetuned model." + skipped
        split = self.finetune_split
        counts = {p: split.rows(self.manifest, p) for p in ("train", "val", "test")}
        n_img = {p: int(rows[["task", "image_id"]].drop_duplicates().shape[0]) for p, rows in counts.items()}
        names = ", ".join(f"**{n}** ({b} with its mask decoder finetuned on `{c}` prompts)" for n, (b, c) in pairs.items())
        reused = sum(r.reused for r in self.finetune_runs().values())
        made = ("reused from an earlier chapter of this book" if reused == len(pairs)
                else "trained now" if not reused else f"{reused} of {len(pairs)} reused, the rest trained now")
        return (f"{names} is the finetuning chapter's run ({made}), trained on {len(counts['train'])} objects of {n_img['train']} images and selected "
                f"on {len(counts['val'])} validation objects of {n_img['val']} images. It is evaluated here, beside "
                f"its base model, on the **test part only**: {len(counts['test'])} objects of {n_img['test']} "
                f"images whose source volumes or files were never used for training or validation "
                f"(split by {split.rule}). No finetuned model is reported on its own training images." + skipped)

    def s1_thresholds(self, quantile: float | None = None, scope: str = "run") -> pd.DataFrame:
        """S1 DICE at the paper's thresholds and at the own-score variant (:mod:`cosmoslib.protocol.s1_thresholds`)
        for the base and finetuned models, on ``finetuned_grid_max_images`` test images spread over
        the sorted test part, at each of ``finetuned_grid_sizes`` (default ``grid_sizes``).

        Each (model, grid size) table is stored under a digest of its objects, model signature and
        settings, so a rerun reuses it. Columns of :func:`cosmoslib.protocol.s1_thresholds.s1_threshold_table`
        plus ``base`` and ``curriculum``; empty without finetuned models or test images.
        """
        c = self.config
        quantile = everything_mod.VARIANT_QUANTILE if quantile is None else float(quantile)
        names = list(self.finetuned())
        images = finetune_runs._spread_images(self.test_part(), c.finetuned_grid_max_images)
        if not names or not len(images):
            return pd.DataFrame(columns=[*s1_thresholds.COLUMNS, "base", "curriculum"])
        chosen = [self.model(n) for n in c.models] + [self.finetuned_model(n) for n in names]
        frames = []
        for m in (c.finetuned_grid_sizes or c.grid_sizes):
            for mdl in chosen:
                path = self._stored("s1_thresholds", images, model=mdl.signature_hash, points_per_side=int(m),
                                    quantile=quantile, scope=scope)
                if path.exists():
                    table = pd.read_parquet(path)
                else:
                    table = s1_thresholds.s1_threshold_table(images, self.root, mdl, int(m), quantile, scope)
                    files.atomic_write_parquet(table, path)
                frames.append(table)
        return self.only_test(self._label_pairs(pd.concat(frames, ignore_index=True)))

    @cached_property
    def _finetuned_interaction(self) -> pd.DataFrame:
        c = self.config
        names = list(self.finetuned())
        test = self.test_part()
        if not names or not len(test):
            return pd.DataFrame()
        keys = dataset.spread_objects(test, c.finetuned_interactive_max_objects, np.random.default_rng(c.seed))
        objects = test.merge(keys[["task", "image_id", "label_value"]], on=["task", "image_id", "label_value"])
        chosen = {n: self.model(n) for n in c.models} | {n: self.finetuned_model(n) for n in names}
        path = self._stored("interaction_finetuned", objects, max_clicks=c.max_clicks, seed=c.seed,
                            compared=[m.signature_hash for m in chosen.values()])
        if path.exists():
            return pd.read_parquet(path)
        frames = []
        groups = list(objects.groupby(["task", "image_id"], sort=True))
        for name, mdl in chosen.items():
            emb_cache = cache_mod.EmbeddingCache(paths.embedding_cache_dir(), mdl)
            for (task, image_id), rows in tqdm(groups, desc=f"interaction {name}", unit="img", file=sys.stderr):
                first = rows.iloc[0]
                image = readers.read_image(self.root / first["image_path"])
                label = readers.read_label(self.root / first["label_path"])
                embedding = emb_cache.get(self.root / first["image_path"])
                for r in rows.itertuples(index=False):
                    for method, previous in ((name, False), (f"{name} + previous logits", True)):
                        segmenter = interactive.SamSegmenter(mdl, embedding, use_previous_logits=previous)
                        curve = interactive.run_interaction(segmenter, image, label == r.label_value,
                                                            max_clicks=c.max_clicks)
                        frames.append(curve.assign(task=task, image_id=image_id, label_value=int(r.label_value),
                                                   object=r.object, modality=r.modality, method=method,
                                                   model=name))
        table = self.only_test(self._label_pairs(pd.concat(frames, ignore_index=True)))
        files.atomic_write_parquet(table, path)
        return table

    def finetuned_interaction(self) -> pd.DataFrame:
        """Fig. 16 for the base and finetuned SAM methods (without / with previous logits) on
        ``finetuned_interactive_max_objects`` test objects spread over the tasks; the classical
        methods are not rerun. Columns of :meth:`interaction` plus ``model, base, curriculum``."""
        return self._finetuned_interaction


__all__ = ["Chapter", "GalleryItem", "Redecoder", "data_fingerprint", "indexed", "model"]
