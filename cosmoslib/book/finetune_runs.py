"""What the book's chapters run for finetuning: chapter 08 and the finetuned models of 01/03/06.

One run per (base model, curriculum) and config, shared by every chapter that asks for it:
the first chapter trains (or resumes) it with chapter 08's settings and split, later ones reuse
it; every table of a finetuned model is computed on the test part only. The aggregations the
chapter plots (:func:`before_after`, :func:`per_class`, :func:`strategy_table`,
:func:`history_table`) are plain functions of the result tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cosmoslib.protocol import evaluate as evaluate_mod
from cosmoslib.protocol import finetune as finetune_mod
from cosmoslib.protocol.finetune import (
    FinetuneResult,
    Settings,
    finetune,
    load_finetuned,
)
from cosmoslib.protocol.splits import DEFAULT_FRACTIONS, Split, split_manifest
from cosmoslib.strategies import PROMPT_STRATEGIES

__all__ = [
    "CHAPTER_FIELDS", "CHAPTER_IOU_WEIGHT", "chapter_settings", "ChapterRuns", "run_chapter", "label_pairs",
    "history_table", "before_after", "per_class", "strategy_table", "chapter_split",
    "chapter_settings_for", "chapter_run", "evaluate_test_part",
]


# ----------------------------------------------------------------------------- the chapter (08_finetune)

#: The finetuning chapter's fields of a run-list Config (see :class:`cosmoslib.book.runlist.Config`):
#: epochs, objects per image per step, validation objects per epoch (0 = all), curricula, and the
#: test images S1 (Everything, the costliest strategy: one decode per grid point) is evaluated on.
CHAPTER_FIELDS = ("finetune_epochs", "finetune_max_objects_per_image", "finetune_max_val_objects",
                  "finetune_curricula", "finetune_s1_max_images")


#: IoU-head loss weight per curriculum in the chapter: ``box`` follows the authors' script
#: exactly; ``mixed`` also trains the IoU head, which the Everything mode (S1) filters by.
CHAPTER_IOU_WEIGHT = {"box": 0.0, "mixed": 1.0}


def chapter_settings(config) -> dict[str, Any]:
    """The finetuning chapter's settings of a run-list Config: its :data:`CHAPTER_FIELDS`."""
    return {k: getattr(config, k) for k in CHAPTER_FIELDS}


@dataclass
class ChapterRuns:
    """Everything the chapter shows: the runs, the split, and the test-split evaluations.

    Attributes
    ----------
    split : Split
    runs : dict
        ``{(base model, curriculum): FinetuneResult}``.
    test : DataFrame
        Manifest rows of the test part.
    results : DataFrame
        Results table (:mod:`cosmoslib.protocol.evaluate`) of every base and finetuned model on the test
        part, with ``base`` and ``curriculum`` columns (``"none"`` for base models).
    pairs : dict
        ``{finetuned model: (base model, curriculum)}``.
    settings : dict
        :func:`chapter_settings` of the config.
    """

    split: Split
    runs: dict
    test: pd.DataFrame
    results: pd.DataFrame
    pairs: dict
    settings: dict


def finetunable(ch) -> tuple[list[str], dict[str, str]]:
    """``(names, skipped)``: the config's models whose decoder the chapter finetunes, and
    ``{name: reason}`` for the others (SAM 2: :func:`cosmoslib.protocol.finetune.unsupported_reason`),
    which every chapter showing finetuned models names."""
    names, skipped = [], {}
    for name in ch.config.models:
        reason = finetune_mod.unsupported_reason(ch.model(name))
        if reason:
            skipped[name] = reason
        else:
            names.append(name)
    return names, skipped


def run_chapter(ch, progress: bool = False) -> ChapterRuns:
    """Train (or reuse) every (base model, curriculum) run of a chapter and evaluate on the test part.

    The ``mixed`` runs also train the IoU head (:data:`CHAPTER_IOU_WEIGHT`). Runs live in
    ``<results>/finetune/<base>-<curriculum>/``; the test evaluations in
    ``<results>/finetune/test/`` (:func:`cosmoslib.protocol.evaluate.evaluate`, keyed by content): every
    model under S2-S6 on every test object (``s2_s6.parquet``), base and ``mixed`` models under
    S1 with the config's grid on ``finetune_s1_max_images`` test images (``s1.parquet``).
    """

    cs = chapter_settings(ch.config)
    manifest = ch.manifest
    split = chapter_split(ch)
    runs, pairs = {}, {}
    for base_name in finetunable(ch)[0]:
        for curriculum in cs["finetune_curricula"]:
            result = chapter_run(ch, base_name, curriculum, split=split, progress=progress)
            runs[(base_name, curriculum)] = result
            pairs[result.name] = (base_name, curriculum)
    test = split.rows(manifest, "test")
    frames = []
    if len(test):
        loaded = {name: load_finetuned(runs[pair].out_dir) for name, pair in pairs.items()}
        bases = [ch.model(b) for b in ch.config.models]
        s1_models = bases + [m for name, m in loaded.items() if pairs[name][1] == "mixed"]
        frames.append(evaluate_test_part(ch, test, bases + list(loaded.values()),
                                         _spread_images(test, int(cs["finetune_s1_max_images"])),
                                         s1_models=s1_models, progress=progress))
    results = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(results):
        results = label_pairs(results, pairs)
    return ChapterRuns(split, runs, test, results, pairs, cs)


def label_pairs(table: pd.DataFrame, pairs: dict) -> pd.DataFrame:
    """``table`` with ``base`` and ``curriculum`` columns from ``pairs`` (``{finetuned model:
    (base, curriculum)}``): a base model is its own base, with curriculum ``"none"``."""
    table = table.copy()
    table["base"] = [pairs.get(m, (m, "none"))[0] for m in table["model"]]
    table["curriculum"] = [pairs.get(m, (m, "none"))[1] for m in table["model"]]
    return table


def _spread_images(manifest: pd.DataFrame, n: int) -> pd.DataFrame:
    """The rows of at most ``n`` images (0 = all), spread evenly over the sorted image list."""
    keys = manifest[["task", "image_id"]].drop_duplicates().sort_values(["task", "image_id"])
    if n and len(keys) > n:
        keys = keys.iloc[np.unique(np.linspace(0, len(keys) - 1, n).round().astype(int))]
    return manifest.merge(keys, on=["task", "image_id"]).reset_index(drop=True)


def history_table(runs: dict) -> pd.DataFrame:
    """Per-epoch train loss and validation DICE of every run: ``base, curriculum`` + history."""
    frames = [r.history.assign(base=b, curriculum=c) for (b, c), r in runs.items()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def before_after(results: pd.DataFrame, pairs: dict, strategy: str = "S5",
                 rule: str = "oracle_dice") -> pd.DataFrame:
    """Per test object: DICE (%) of the base model and of each finetuned model under ``strategy``.

    Returns
    -------
    DataFrame
        ``model, base, curriculum, task, image_id, label_value, object, modality, dice_before,
        dice_after, delta`` (after minus before, DICE points), one row per finetuned model and
        object; unshifted prompts, selection rule ``rule``.
    """
    cols = ["task", "image_id", "label_value", "object", "modality"]
    if len(results) == 0 or not pairs:
        return pd.DataFrame(columns=["model", "base", "curriculum", *cols, "dice_before", "dice_after", "delta"])
    keep = ((results["strategy"] == strategy) & (results["selection_rule"] == rule)
            & (results["shift_level"] == 0))
    df = results[keep]
    out = []
    for name, (base, curriculum) in pairs.items():
        before = df[df["model"] == base][cols + ["dice"]].rename(columns={"dice": "dice_before"})
        after = df[df["model"] == name][cols + ["dice"]].rename(columns={"dice": "dice_after"})
        both = before.merge(after, on=cols)
        out.append(both.assign(model=name, base=base, curriculum=curriculum))
    if not out:
        return pd.DataFrame(columns=["model", "base", "curriculum", *cols, "dice_before", "dice_after", "delta"])
    table = pd.concat(out, ignore_index=True)
    table["delta"] = table["dice_after"] - table["dice_before"]
    return table[["model", "base", "curriculum", *cols, "dice_before", "dice_after", "delta"]]


def per_class(table: pd.DataFrame) -> pd.DataFrame:
    """Fig. 18: mean DICE before/after per object class (``object-modality``) and finetuned model.

    Returns
    -------
    DataFrame
        ``model, base, curriculum, object_modality, n, dice_before, dice_after, delta, improved``.
    """
    df = table.assign(object_modality=table["object"].astype(str) + "-" + table["modality"].astype(str))
    out = (df.groupby(["model", "base", "curriculum", "object_modality"], as_index=False)
             .agg(n=("delta", "size"), dice_before=("dice_before", "mean"), dice_after=("dice_after", "mean")))
    out["delta"] = out["dice_after"] - out["dice_before"]
    out["improved"] = out["delta"] > 0
    return out


def strategy_table(results: pd.DataFrame, pairs: dict, curriculum: str = "mixed",
                   rule: str = "oracle_dice") -> pd.DataFrame:
    """Mean DICE (%) per strategy before and after finetuning with ``curriculum``, on the test part.

    Returns
    -------
    DataFrame
        Index ``(base, strategy)``; columns ``before, after, delta, n``.
    """
    rows = []
    if len(results) == 0:
        results = pd.DataFrame(columns=["model", "strategy", "dice", "selection_rule", "shift_level"])
    keep = (results["selection_rule"] == rule) & (results["shift_level"] == 0)
    df = results[keep]
    for name, (base, cur) in pairs.items():
        if cur != curriculum:
            continue
        for strategy in sorted(set(df.loc[df["model"] == name, "strategy"])):
            b = df[(df["model"] == base) & (df["strategy"] == strategy)]
            a = df[(df["model"] == name) & (df["strategy"] == strategy)]
            rows.append(dict(base=base, strategy=strategy, before=b["dice"].mean(), after=a["dice"].mean(),
                             n=int(len(a))))
    out = pd.DataFrame(rows, columns=["base", "strategy", "before", "after", "n"])
    out["delta"] = out["after"] - out["before"]
    return out.set_index(["base", "strategy"])[["before", "after", "delta", "n"]]


# ----------------------------------------------------------------------------- shared with the other chapters


def chapter_split(ch) -> Split:
    """The split every chapter of a config uses: :func:`split_manifest` of the chapter's manifest
    with :data:`DEFAULT_FRACTIONS` and the config's seed (the same split as ``08_finetune``)."""
    return split_manifest(ch.manifest, DEFAULT_FRACTIONS, ch.config.seed)


def chapter_settings_for(config, curriculum: str) -> Settings:
    """The :class:`Settings` of one curriculum's run in a config (:func:`chapter_settings`, the
    config's seed, :data:`CHAPTER_IOU_WEIGHT`): one definition for ``08_finetune`` and every
    chapter that evaluates a finetuned model."""
    cs = chapter_settings(config)
    return Settings(curriculum=curriculum, epochs=int(cs["finetune_epochs"]), seed=config.seed,
                    max_objects_per_image=int(cs["finetune_max_objects_per_image"]),
                    max_val_objects=int(cs["finetune_max_val_objects"]),
                    iou_weight=CHAPTER_IOU_WEIGHT.get(curriculum, 0.0))


def chapter_run(ch, base_name: str, curriculum: str, split: Split | None = None,
                progress: bool = False) -> FinetuneResult:
    """Train, resume or reuse the run of (``base_name``, ``curriculum``) of a chapter's config.

    The run lives in ``<results>/finetune/<base>-<curriculum>/`` with
    :func:`chapter_settings_for` and :func:`chapter_split`, so whichever chapter asks first
    trains it and every later request of the book (``08_finetune`` included) reuses it
    (:func:`finetune` compares the run key: base signature, data, split, hyper-parameters);
    a folder left by other settings is replaced.
    """
    split = split or chapter_split(ch)
    return finetune(ch.manifest, ch.root, ch.model(base_name),
                    ch.results_dir / "finetune" / f"{base_name}-{curriculum}",
                    chapter_settings_for(ch.config, curriculum), split=split, progress=progress, overwrite=True)


def evaluate_test_part(ch, test: pd.DataFrame, models: Sequence, s1_images: pd.DataFrame | None = None,
                       progress: bool = False, s1_models: Sequence | None = None) -> pd.DataFrame:
    """Results (:func:`cosmoslib.protocol.evaluate.evaluate`) of ``models`` on the test rows ``test``.

    S2-S6 on every row of ``test``, S1 (the config's grid) with ``s1_models`` (default ``models``)
    on the rows of ``s1_images`` (default: all of ``test``), in the files ``08_finetune`` uses (``<results>/finetune/test/s2_s6.parquet``
    and ``s1.parquet``): their parts are keyed by content, model and settings, so what one chapter
    computed the other reuses. Returns both tables concatenated (either may be empty).
    """
    folder = ch.results_dir / "finetune" / "test"
    frames = []
    if len(test):
        res, _ = evaluate_mod.evaluate(test, ch.root, list(models), folder / "s2_s6.parquet",
                                       strategies=PROMPT_STRATEGIES, seed=ch.config.seed, progress=progress)
        frames.append(res)
    s1_images = test if s1_images is None else s1_images
    s1_models = list(models) if s1_models is None else list(s1_models)
    if len(s1_images) and s1_models:
        res, _ = evaluate_mod.evaluate(s1_images, ch.root, s1_models, folder / "s1.parquet", strategies=["S1"],
                                       seed=ch.config.seed, points_per_side=ch.config.s1_points_per_side,
                                       progress=progress)
        frames.append(res)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=evaluate_mod.RESULT_COLUMNS)
