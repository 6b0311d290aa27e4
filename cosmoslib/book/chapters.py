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
from cosmoslib.book import plots
from cosmoslib.book.runlist import Config
from cosmoslib.book.runlist import config as config_named
from cosmoslib.data import dataset, indexer, readers
from cosmoslib.models import cache as cache_mod
from cosmoslib.protocol import annotation, evaluate, interactive, matching, prompts
from cosmoslib.strategies import PROMPT_STRATEGIES

# Per-process memory: each model is loaded, and each root indexed, at most once per process.
_MODELS: dict[tuple[str, str], Any] = {}
_INDEXED: dict[tuple[str, str], pd.DataFrame] = {}


def model(name: str, device: str | None = None):
    """The registry model ``name``, loaded at most once per process (and per device)."""
    key = (name, str(device))
    if key not in _MODELS:
        _MODELS[key] = models_mod.load_model(name, device=device)
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
    fingerprint = data_fingerprint(root)
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
        the seconds it cost (encoder share + decode), per object of the config."""
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


__all__ = ["Chapter", "GalleryItem", "Redecoder", "data_fingerprint", "indexed", "model"]
