"""The study's named tables: one registry, one store rule.

Every table a chapter shows is ``ch.table(name)`` (:meth:`cosmoslib.book.chapters.Chapter.table`),
and :data:`REGISTRY` says what each name is. A table is computed by the protocol or analysis
function that owns its idea, from the config's manifest, root, models and settings:

========================  =====================================================================
name                      computed by
========================  =====================================================================
``results``               :func:`cosmoslib.protocol.evaluate.evaluate` (S1-S6)
``everything_grid``       the same, S1 at each ``grid_sizes`` m (Table 5)
``randomness``            the same, shifted prompts (Table 8); ``shifted_prompts`` its prompts
``interaction``           :func:`cosmoslib.protocol.interactive.interaction_table` (Fig. 16)
``annotation``            :func:`cosmoslib.protocol.annotation.annotation_table` (Table 7)
``factors``               :func:`cosmoslib.analysis.factors.compute_factors` (Table 6)
``volumes``               :func:`cosmoslib.analysis.volume_summaries.volume_scores` (chapter 09)
``propagation``           :func:`cosmoslib.analysis.volume_summaries.propagation_scores`
``finetune_runs``         :func:`cosmoslib.book.finetune_runs.train` (one row per run)
``finetune_history``      its per-epoch history
``finetuned_results``     :func:`cosmoslib.book.finetune_runs.test_part_results` (test part)
``finetuned_interaction`` :func:`cosmoslib.protocol.interactive.interaction_table` (test part)
``s1_thresholds``         :func:`cosmoslib.protocol.s1_thresholds.s1_threshold_table` (test part)
``int8_tradeoff``         :func:`cosmoslib.analysis.int8_tradeoff.chapter_table` (timing chapter)
========================  =====================================================================

**One store rule.** A table computed in one piece is stored by
:func:`cosmoslib.protocol.store.stored`: one file under ``<results>/tables/<name>/`` named by the
digest of its input objects' content (image and label digests of the manifest), its settings and
its models' signatures, reused only while all three match. The evaluate-backed tables
(``results``, ``everything_grid``, ``randomness``, and the evaluation under ``finetuned_results``)
keep :func:`~cosmoslib.protocol.evaluate.evaluate`'s own store underneath: one part per (model,
image) keyed by the same content, model and settings, so an edited label recomputes only that
image's parts. The finetuning runs are reused by their own run key
(:func:`cosmoslib.protocol.finetune.finetune`: base signature, data, split, settings).

:attr:`Tables.log` records, per table asked, whether it was computed or reused in this process
(an evaluate-backed table counts as computed when any part was).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cosmoslib import paths
from cosmoslib.analysis import factors as factors_mod
from cosmoslib.analysis import int8_tradeoff
from cosmoslib.analysis import volume_summaries
from cosmoslib.book import finetune_runs
from cosmoslib.book.redecode import Redecoder
from cosmoslib.data import dataset
from cosmoslib.models import everything as everything_mod
from cosmoslib.models import registry
from cosmoslib.protocol import annotation, evaluate, finetune, interactive, s1_thresholds, store, volumes
from cosmoslib.protocol.metrics import NSD_TOLERANCE_MM
from cosmoslib.strategies import PROMPT_STRATEGIES


class UnknownTable(KeyError):
    """A table name that is not in :data:`REGISTRY` (the message names the tables)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


@dataclass(frozen=True)
class Table:
    """One named table: ``make(tables)`` computes it (or reads it back) through :class:`Tables`."""

    name: str
    doc: str
    make: Callable[["Tables"], pd.DataFrame]


REGISTRY: dict[str, Table] = {}


def _table(doc: str):
    def register(fn):
        name = fn.__name__.lstrip("_")
        REGISTRY[name] = Table(name, doc, fn)
        return fn
    return register


def names() -> tuple[str, ...]:
    """The table names, in registry order."""
    return tuple(REGISTRY)


# ----------------------------------------------------------------------------- samples of the config


def grid_manifest(manifest: pd.DataFrame, cap: int, min_objects: int = 2) -> pd.DataFrame:
    """The Everything-grid chapter's images: at least ``min_objects`` objects each, at most
    ``cap`` of them (0 = all; chosen evenly over the sorted image list)."""
    counts = manifest.groupby(["task", "image_id"])["label_value"].transform("size")
    multi = manifest[counts >= min_objects]
    keys = multi[["task", "image_id"]].drop_duplicates().sort_values(["task", "image_id"])
    if cap and len(keys) > cap:
        keys = keys.iloc[np.linspace(0, len(keys) - 1, cap).round().astype(int)]
    return multi.merge(keys, on=["task", "image_id"])


def protocol_objects(manifest: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A seeded sample of ``n`` objects spread evenly over the tasks (0 = all;
    :func:`cosmoslib.data.dataset.spread_objects`), in manifest order."""
    if not n or n >= len(manifest):
        return manifest.reset_index(drop=True)
    keys = dataset.spread_objects(manifest, n, np.random.default_rng(seed))
    return manifest.merge(keys[["task", "image_id", "label_value"]],
                          on=["task", "image_id", "label_value"]).reset_index(drop=True)


# ----------------------------------------------------------------------------- the tables of one config


class Tables:
    """The named tables of one config, each computed at most once per process.

    Parameters
    ----------
    study : what a table is a function of: ``config`` (the run-list Config: the settings),
        ``root``, ``manifest`` (the config's objects), ``full_manifest`` (every object under the
        root) and ``model(name)`` (a loaded model); a :class:`~cosmoslib.book.chapters.Chapter`.
    """

    def __init__(self, study):
        self.study = study
        self._memo: dict[str, pd.DataFrame] = {}
        self._state: dict[str, Any] = {}
        #: ``(name, reused)`` per table computed or read in this process, in order.
        self.log: list[tuple[str, bool]] = []

    def __call__(self, name: str) -> pd.DataFrame:
        """The table ``name``.

        Raises
        ------
        UnknownTable (a KeyError)
            ``name`` is not in :data:`REGISTRY` (a misspelt or renamed table is never a silent None).
        """
        if name not in REGISTRY:
            raise UnknownTable(f"no table {name!r}; the tables are {', '.join(REGISTRY)}")
        if name not in self._memo:
            table = REGISTRY[name].make(self)
            if not isinstance(table, pd.DataFrame):
                raise TypeError(f"table {name!r} is a {type(table).__name__}, not a DataFrame")
            self._memo[name] = table
        return self._memo[name]

    # -- what the tables are functions of

    @property
    def config(self):
        return self.study.config

    @property
    def root(self) -> Path:
        return self.study.root

    @property
    def manifest(self) -> pd.DataFrame:
        return self.study.manifest

    @property
    def results_dir(self) -> Path:
        return paths.results_dir(self.config.name)

    def models(self, names=None) -> dict[str, Any]:
        """``{name: loaded model}`` of ``names`` (default: the config's models)."""
        return {n: self.study.model(n) for n in (self.config.models if names is None else names)}

    def stored(self, name: str, inputs: pd.DataFrame, settings: dict, models, compute) -> pd.DataFrame:
        """:func:`cosmoslib.protocol.store.stored` under ``<results>/tables/<name>/``, logged."""
        out = store.stored(self.results_dir / "tables" / name, inputs, settings, list(models), compute)
        self.log.append((name, out.reused))
        return out.table

    def evaluated(self, name: str, manifest: pd.DataFrame, out: Path, models, **settings):
        """:func:`cosmoslib.protocol.evaluate.evaluate` (its part store), logged; ``(results, report)``."""
        results, report = evaluate.evaluate(manifest, self.root, list(models), out, **settings)
        self.log.append((name, report.n_parts_done == 0))
        return results, report

    def redecoder(self, model_name: str | None = None) -> Redecoder:
        """A :class:`~cosmoslib.book.redecode.Redecoder` of the config's S1-S6 run (computed first)."""
        self("results")
        name = model_name or self.config.models[0]
        return Redecoder(self.root, self.manifest, self.study.model(name), self.results_dir / "prompts.parquet")

    def grid_reports(self) -> dict[int, evaluate.EvalReport]:
        """``{m: EvalReport}`` of the Everything-grid run (its stored S1 masks, for Fig. 11)."""
        self("everything_grid")
        return self._state["grid_reports"]

    # -- the finetuning runs and their test part

    def finetune(self) -> finetune_runs.Runs:
        """The config's finetuning runs (trained once per book; :func:`cosmoslib.book.finetune_runs.train`)."""
        if "runs" not in self._state:
            self._state["runs"] = finetune_runs.train(self.config, self.manifest, self.root, self.models(),
                                                      self.results_dir / "finetune")
        return self._state["runs"]

    def finetuned_models(self) -> dict[str, Any]:
        """``{finetuned model: loaded model}`` of :meth:`finetune`."""
        if "tuned" not in self._state:
            self._state["tuned"] = {r.name: finetune.load_finetuned(r.out_dir) for r in self.finetune().runs.values()}
        return self._state["tuned"]

    def test_part(self) -> pd.DataFrame:
        """The manifest rows of the finetuning split's test part."""
        return self.finetune().split.rows(self.manifest, "test")

    def only_test(self, table: pd.DataFrame) -> pd.DataFrame:
        """:func:`cosmoslib.book.finetune_runs.only_test` with the config's split."""
        return finetune_runs.only_test(table, self.finetune().split, self.manifest)


# ----------------------------------------------------------------------------- the registry


@_table("S1-S6 results of the config's objects (the runner's parts, keyed by content).")
def _results(t: Tables) -> pd.DataFrame:
    c = t.config
    return t.evaluated("results", t.manifest, t.results_dir / "results.parquet", t.models().values(), seed=c.seed,
                       points_per_side=c.s1_points_per_side)[0]


@_table("Table 5: S1 results at each grid size m (column points_per_side) on the grid chapter's images.")
def _everything_grid(t: Tables) -> pd.DataFrame:
    c = t.config
    multi = grid_manifest(t.manifest, c.grid_max_images)
    frames, reports = [], {}
    for m in c.grid_sizes:
        res, reports[int(m)] = t.evaluated("everything_grid", multi, t.results_dir / "everything_grid" / f"m{m}.parquet",
                                           t.models().values(), strategies=["S1"], points_per_side=int(m), seed=c.seed)
        frames.append(res.assign(points_per_side=int(m)))
    t._state["grid_reports"] = reports
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*evaluate.RESULT_COLUMNS,
                                                                                      "points_per_side"])


@_table("Table 8: S2-S6 with shifted prompts (shift_level 1-3, repeat 1..n) and unshifted (0, 0).")
def _randomness(t: Tables) -> pd.DataFrame:
    c = t.config
    return t.evaluated("randomness", protocol_objects(t.manifest, c.protocol_max_objects, c.seed),
                       t.results_dir / "randomness" / "results.parquet", t.models().values(),
                       strategies=PROMPT_STRATEGIES, seed=c.seed, shift_levels=c.shift_levels,
                       repeats=c.shift_repeats)[0]


@_table("The prompt rows of the randomness table (every shifted prompt).")
def _shifted_prompts(t: Tables) -> pd.DataFrame:
    t("randomness")
    return pd.read_parquet(t.results_dir / "randomness" / "prompts.parquet")


@_table("Fig. 16: one row per object, method and click on the interaction sample.")
def _interaction(t: Tables) -> pd.DataFrame:
    c = t.config
    objects = protocol_objects(t.manifest, c.interactive_max_objects, c.seed)
    models = t.models()
    table = t.stored("interaction", objects, dict(max_clicks=c.max_clicks, seed=c.seed, classical=True),
                     models.values(),
                     lambda: interactive.interaction_table(objects, t.root, models, c.max_clicks, c.seed, classical=True))
    # the classical methods belong to no model: without a ``model`` column finding 6 compares each
    # SAM with them (with one, it would pair methods only within a model)
    return table.drop(columns="model")


@_table("Table 7: HCE and seconds of each object's S5 mask.")
def _annotation(t: Tables) -> pd.DataFrame:
    models = t.models()
    return t.stored("annotation", t.manifest, dict(strategy="S5", rule="oracle_dice", seed=t.config.seed,
                                                   points_per_side=t.config.s1_points_per_side), models.values(),
                    lambda: annotation.annotation_table(t("results"), {n: t.redecoder(n) for n in models}))


@_table("Table 6's object factors; attrs['skipped'] = objects that could not be measured, with why.")
def _factors(t: Tables) -> pd.DataFrame:
    def compute():
        table = factors_mod.compute_factors(t.manifest, t.root, progress=False)
        table.attrs = {"skipped": [list(map(str, x)) for x in table.attrs.get("skipped", [])]}
        return table

    table = t.stored("factors", t.manifest, {}, [], compute)
    table.attrs["skipped"] = [tuple(x) for x in table.attrs.get("skipped", [])]
    return table


#: The strategies of chapter 09's volume table.
VOLUME_STRATEGIES = ("S5", "S2")


@_table("Chapter 09: every volume in 3D beside the mean of its slices, per model and strategy (mm).")
def _volumes(t: Tables) -> pd.DataFrame:
    models = t.models()
    has = volumes.has_volumes(t.manifest)

    def compute():
        return pd.concat([volume_summaries.volume_scores(t.manifest, t.redecoder(n) if has else None, n, t.root,
                                                         strategies=VOLUME_STRATEGIES, tolerance=NSD_TOLERANCE_MM)
                          for n in models], ignore_index=True)

    return t.stored("volumes", t.manifest, dict(strategies=list(VOLUME_STRATEGIES), tolerance=NSD_TOLERANCE_MM,
                                                seed=t.config.seed), models.values(), compute)


@_table("Chapter 09: SAM 2 propagation through each volume; attrs['skipped'] = (what, why) not propagated.")
def _propagation(t: Tables) -> pd.DataFrame:
    video = [n for n in t.config.models if registry.family(registry.lookup(n).arch) == "sam2"]
    models = t.models(video)
    full = t.study.full_manifest
    inputs = pd.concat([t.manifest, full], ignore_index=True)

    def compute():
        prop, skipped = volume_summaries.propagation_scores(t.manifest, t.root, list(models.values()), t("volumes"),
                                                            stacks_from=full, tolerance=NSD_TOLERANCE_MM)
        prop.attrs = {"skipped": [[str(w), str(y)] for w, y in skipped]}
        return prop

    table = t.stored("propagation", inputs, dict(tolerance=NSD_TOLERANCE_MM, seed=t.config.seed), models.values(),
                     compute)
    table.attrs["skipped"] = [tuple(x) for x in table.attrs.get("skipped", [])]
    return table


@_table("One row per finetuning run of the config (model, base, curriculum, reused, ...); "
        "attrs['skipped'] = {base: why not finetuned}.")
def _finetune_runs(t: Tables) -> pd.DataFrame:
    table = finetune_runs.runs_table(t.finetune())
    t.log.append(("finetune_runs", bool(table["reused"].all())))
    return table


@_table("Per-epoch train loss and validation DICE of every finetuning run.")
def _finetune_history(t: Tables) -> pd.DataFrame:
    return finetune_runs.history_table(t.finetune())


@_table("S1-S6 of the base and finetuned models on the test part only (base, curriculum columns).")
def _finetuned_results(t: Tables) -> pd.DataFrame:
    runs = t.finetune()
    table = finetune_runs.test_part_results(t.config, t.root, t.test_part(), t.models(), t.finetuned_models(),
                                            runs.pairs, t.results_dir / "finetune" / "test")
    return t.only_test(table)


def _finetuned_inputs(t: Tables) -> tuple[dict, dict]:
    """``(pairs, models)``: ``{finetuned: (base, curriculum)}`` and every base and finetuned model."""
    pairs = t.finetune().pairs
    return pairs, t.models() | t.finetuned_models()


@_table("Fig. 16 for the base and finetuned SAM methods on finetuned_interactive_max_objects test objects.")
def _finetuned_interaction(t: Tables) -> pd.DataFrame:
    c = t.config
    pairs, chosen = _finetuned_inputs(t)
    test = t.test_part()
    if not pairs or not len(test):
        return pd.DataFrame(columns=[*interactive.TABLE_COLUMNS, "base", "curriculum"])
    keys = dataset.spread_objects(test, c.finetuned_interactive_max_objects, np.random.default_rng(c.seed))
    objects = test.merge(keys[["task", "image_id", "label_value"]], on=["task", "image_id", "label_value"])
    table = t.stored("finetuned_interaction", objects, dict(max_clicks=c.max_clicks, seed=c.seed, classical=False),
                     chosen.values(), lambda: finetune_runs.label_pairs(
                         interactive.interaction_table(objects, t.root, chosen, c.max_clicks, c.seed, classical=False),
                         pairs))
    return t.only_test(table)


@_table("S1 DICE at the paper's and at own-score thresholds, base and finetuned models, test part.")
def _s1_thresholds(t: Tables) -> pd.DataFrame:
    c = t.config
    quantile, scope = everything_mod.VARIANT_QUANTILE, "run"
    pairs, chosen = _finetuned_inputs(t)
    images = finetune_runs._spread_images(t.test_part(), c.finetuned_grid_max_images)
    if not pairs or not len(images):
        return pd.DataFrame(columns=[*s1_thresholds.COLUMNS, "base", "curriculum"])
    sizes = [int(m) for m in (c.finetuned_grid_sizes or c.grid_sizes)]

    def compute():
        frames = [s1_thresholds.s1_threshold_table(images, t.root, model, m, quantile, scope)
                  for m in sizes for model in chosen.values()]
        return finetune_runs.label_pairs(pd.concat(frames, ignore_index=True), pairs)

    table = t.stored("s1_thresholds", images, dict(grid_sizes=sizes, quantile=quantile, scope=scope), chosen.values(),
                     compute)
    return t.only_test(table)


#: Why a config does not run the int8 comparison (``attrs["missing"]`` of its empty table).
INT8_NOT_IN_SMOKE = ("the smoke config does not run it (quantizing an encoder and evaluating it twice "
                     "costs about 30 s); the demo book shows it")


@_table("The int8 encoder against the float32 one per model and strategy: encode seconds and mask "
        "agreement (timing chapter); empty with attrs['missing'] = why when not run.")
def _int8_tradeoff(t: Tables) -> pd.DataFrame:
    missing = INT8_NOT_IN_SMOKE if t.config.smoke else int8_tradeoff.runtime_missing()
    if missing:
        table = pd.DataFrame(columns=list(int8_tradeoff.CHAPTER_COLUMNS))
        table.attrs["missing"] = missing
        return table
    sizes = int8_tradeoff.CHAPTER_SIZES["demo"]
    models = t.models()
    table = t.stored("int8_tradeoff", t.manifest, dict(sizes, seed=t.config.seed), models.values(),
                     lambda: int8_tradeoff.chapter_table(t.manifest, t.root, list(models.values()),
                                                         t.results_dir / "int8", seed=t.config.seed, **sizes))
    table.attrs["sizes"] = sizes
    return table


#: The order a cluster computes the tables in (``cosmos book --scheduler``): a table reads only tables of
#: earlier waves, so no two workers ever compute the same thing at once (the finetuning runs, above
#: all, are trained by one task before any table of a finetuned model).
WAVES = (("results", "everything_grid", "randomness", "interaction", "factors", "finetune_runs"),
         ("shifted_prompts", "annotation", "volumes", "finetune_history", "finetuned_results",
          "finetuned_interaction", "s1_thresholds"),
         ("propagation", "int8_tradeoff"))


__all__ = ["REGISTRY", "WAVES", "Table", "Tables", "UnknownTable", "VOLUME_STRATEGIES", "grid_manifest", "names",
           "protocol_objects"]
