"""What the book's chapters run for finetuning: chapter 08 and the finetuned models of 01/03/06/10.

One run per (base model, curriculum of ``Config.finetune_curricula``) and config, shared by every
chapter: the first chapter that asks trains (or resumes) it with chapter 08's settings and split,
later ones reuse it (:func:`cosmoslib.protocol.finetune.finetune` compares its run key). Every
table of a finetuned model is computed on the test part only (:func:`only_test`). The functions
take the config, manifest, root and models explicitly; the named tables built on them
(``finetune_runs``, ``finetune_history``, ``finetuned_results``, ``finetuned_interaction``,
``s1_thresholds``) are in :mod:`cosmoslib.book.tables`. The aggregations chapter 08 plots
(:func:`before_after`, :func:`per_class`, :func:`strategy_table`, :func:`history_table`) are
plain functions of those tables, and :func:`note` is the honesty note of every chapter that shows
a finetuned model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cosmoslib.protocol import evaluate as evaluate_mod
from cosmoslib.protocol import finetune as finetune_mod
from cosmoslib.protocol.finetune import FinetuneResult, Settings, finetune
from cosmoslib.protocol.splits import DEFAULT_FRACTIONS, Split, split_manifest
from cosmoslib.strategies import PROMPT_STRATEGIES

__all__ = [
    "CHAPTER_FIELDS", "CHAPTER_IOU_WEIGHT", "Runs", "before_after", "chapter_run", "chapter_settings",
    "chapter_settings_for", "chapter_split", "evaluate_test_part", "finetunable", "history_table",
    "label_pairs", "note", "only_test", "pairs_of", "per_class", "runs_table", "strategy_table",
    "test_part_results", "train",
]


#: The finetuning chapter's fields of a run-list Config (see :class:`cosmoslib.book.runlist.Config`):
#: epochs, objects per image per step, validation objects per epoch (0 = all), curricula, and the
#: test images S1 (Everything, the costliest strategy: one decode per grid point) is evaluated on.
CHAPTER_FIELDS = ("finetune_epochs", "finetune_max_objects_per_image", "finetune_max_val_objects",
                  "finetune_curricula", "finetune_s1_max_images")


#: IoU-head loss weight per curriculum in the chapter: ``box`` follows the authors' script
#: exactly; ``mixed`` also trains the IoU head, which the Everything mode (S1) filters by.
CHAPTER_IOU_WEIGHT = {"box": 0.0, "mixed": 1.0}

#: Columns of :func:`runs_table`.
RUN_COLUMNS = ["model", "base", "curriculum", "best_epoch", "best_val_dice", "train_seconds", "reused", "out_dir",
               "checkpoint_sha256"]


def chapter_settings(config) -> dict[str, Any]:
    """The finetuning chapter's settings of a run-list Config: its :data:`CHAPTER_FIELDS`."""
    return {k: getattr(config, k) for k in CHAPTER_FIELDS}


def finetunable(models: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """``(names, skipped)``: the models (``{registry name: model}``) whose decoder the chapters
    finetune, and ``{name: reason}`` for the others (SAM 2:
    :func:`cosmoslib.protocol.finetune.unsupported_reason`), which every chapter showing
    finetuned models names."""
    names, skipped = [], {}
    for name, model in models.items():
        reason = finetune_mod.unsupported_reason(model)
        if reason:
            skipped[name] = reason
        else:
            names.append(name)
    return names, skipped


def chapter_split(manifest: pd.DataFrame, seed: int) -> Split:
    """The split every chapter of a config uses: :func:`split_manifest` of the config's manifest
    with :data:`DEFAULT_FRACTIONS` and the config's seed (the same split as ``08_finetune``)."""
    return split_manifest(manifest, DEFAULT_FRACTIONS, seed)


def chapter_settings_for(config, curriculum: str) -> Settings:
    """The :class:`Settings` of one curriculum's run in a config (:func:`chapter_settings`, the
    config's seed, :data:`CHAPTER_IOU_WEIGHT`): one definition for ``08_finetune`` and every
    chapter that evaluates a finetuned model."""
    cs = chapter_settings(config)
    return Settings(curriculum=curriculum, epochs=int(cs["finetune_epochs"]), seed=config.seed,
                    max_objects_per_image=int(cs["finetune_max_objects_per_image"]),
                    max_val_objects=int(cs["finetune_max_val_objects"]),
                    iou_weight=CHAPTER_IOU_WEIGHT.get(curriculum, 0.0))


def chapter_run(config, manifest: pd.DataFrame, root: str | Path, base_name: str, base_model, curriculum: str,
                folder: str | Path, split: Split | None = None, progress: bool = False) -> FinetuneResult:
    """Train, resume or reuse the run of (``base_name``, ``curriculum``) of a config.

    The run lives in ``<folder>/<base>-<curriculum>/`` with :func:`chapter_settings_for` and
    :func:`chapter_split`, so whichever chapter asks first trains it and every later request of
    the book reuses it (:func:`finetune` compares the run key: base signature, data, split,
    hyper-parameters); a folder left by other settings is replaced.
    """
    split = split or chapter_split(manifest, config.seed)
    return finetune(manifest, root, base_model, Path(folder) / f"{base_name}-{curriculum}",
                    chapter_settings_for(config, curriculum), split=split, progress=progress, overwrite=True)


@dataclass
class Runs:
    """The config's finetuning runs.

    Attributes
    ----------
    split : Split
    runs : dict
        ``{(base model, curriculum): FinetuneResult}``, bases in config order.
    skipped : dict
        ``{base model: why its decoder is not finetuned}``.
    """

    split: Split
    runs: dict
    skipped: dict

    @property
    def pairs(self) -> dict[str, tuple[str, str]]:
        """``{finetuned model: (base model, curriculum)}``."""
        return {r.name: key for key, r in self.runs.items()}


def train(config, manifest: pd.DataFrame, root: str | Path, models: Mapping[str, Any], folder: str | Path,
          progress: bool = False) -> Runs:
    """Train (or reuse) every (base model, curriculum of ``config.finetune_curricula``) run.

    Parameters
    ----------
    config : the run-list Config.
    manifest : the config's objects (split by :func:`chapter_split`).
    root : the COSMOS root.
    models : ``{registry name: base model}`` (the config's models; SAM 2 is skipped, with why).
    folder : the config's ``finetune`` folder (``<results>/finetune``).
    """
    split = chapter_split(manifest, config.seed)
    names, skipped = finetunable(models)
    runs = {}
    for base in names:
        for curriculum in config.finetune_curricula:
            runs[(base, curriculum)] = chapter_run(config, manifest, root, base, models[base], curriculum, folder,
                                                   split=split, progress=progress)
    return Runs(split, runs, skipped)


def runs_table(runs: Runs) -> pd.DataFrame:
    """One row per run (:data:`RUN_COLUMNS`: ``model`` is the finetuned model's registry name,
    ``reused`` whether this call trained nothing); ``attrs["skipped"]`` = ``{base: why not}``."""
    rows = [dict(model=r.name, base=b, curriculum=c, best_epoch=r.best_epoch,
                 best_val_dice=float(r.provenance["best_val_dice"]), train_seconds=float(r.provenance["train_seconds"]),
                 reused=bool(r.reused), out_dir=str(r.out_dir), checkpoint_sha256=str(r.provenance["checkpoint_sha256"]))
            for (b, c), r in runs.runs.items()]
    table = pd.DataFrame(rows, columns=RUN_COLUMNS)
    table.attrs["skipped"] = dict(runs.skipped)
    return table


def pairs_of(runs_table: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """``{finetuned model: (base model, curriculum)}`` of a :func:`runs_table`."""
    return {m: (b, c) for m, b, c in runs_table[["model", "base", "curriculum"]].itertuples(index=False)}


def only_test(table: pd.DataFrame, split: Split, manifest: pd.DataFrame) -> pd.DataFrame:
    """``table`` unchanged after checking that each of its images is in the split's test part.

    Raises
    ------
    RuntimeError
        A row of a training or validation image: no finetuned model (nor its base beside it)
        is ever reported on the images the decoder was trained or selected on.
    """
    if not len(table):
        return table
    seen = {(t, i) for part in ("train", "val")
            for t, i in split.rows(manifest, part)[["task", "image_id"]].itertuples(index=False)}
    bad = [(t, i) for t, i in table[["task", "image_id"]].drop_duplicates().itertuples(index=False) if (t, i) in seen]
    if bad:
        raise RuntimeError(f"{len(bad)} image(s) of the training or validation part in a test-part table, "
                           f"e.g. {bad[0]}")
    return table


def evaluate_test_part(config, root: str | Path, test: pd.DataFrame, models: Sequence, folder: str | Path,
                       s1_images: pd.DataFrame | None = None, s1_models: Sequence | None = None,
                       progress: bool = False) -> pd.DataFrame:
    """Results (:func:`cosmoslib.protocol.evaluate.evaluate`) of ``models`` on the test rows ``test``.

    S2-S6 on every row of ``test``, S1 (the config's ``s1_points_per_side``) with ``s1_models``
    (default ``models``) on the rows of ``s1_images`` (default: all of ``test``), in
    ``<folder>/s2_s6.parquet`` and ``<folder>/s1.parquet`` (parts keyed by content, model and
    settings). Returns both tables concatenated (either may be empty).
    """
    folder = Path(folder)
    frames = []
    if len(test):
        res, _ = evaluate_mod.evaluate(test, root, list(models), folder / "s2_s6.parquet",
                                       strategies=PROMPT_STRATEGIES, seed=config.seed, progress=progress)
        frames.append(res)
    s1_images = test if s1_images is None else s1_images
    s1_models = list(models) if s1_models is None else list(s1_models)
    if len(s1_images) and s1_models:
        res, _ = evaluate_mod.evaluate(s1_images, root, s1_models, folder / "s1.parquet", strategies=["S1"],
                                       seed=config.seed, points_per_side=config.s1_points_per_side,
                                       progress=progress)
        frames.append(res)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=evaluate_mod.RESULT_COLUMNS)


def test_part_results(config, root: str | Path, test: pd.DataFrame, bases: Mapping[str, Any], tuned: Mapping[str, Any],
                 pairs: Mapping[str, tuple[str, str]], folder: str | Path, progress: bool = False) -> pd.DataFrame:
    """The finetuned test-part results of a config (chapters 01, 08 and 10 read the same table).

    Every base and finetuned model under S2-S6 on every test object; the base models and the
    ``mixed`` runs (the curriculum that trains the IoU head S1 filters by) under S1 on
    ``finetune_s1_max_images`` test images spread over the sorted test part. Results columns
    plus ``base`` and ``curriculum`` (``"none"`` for a base model); empty (same columns) when
    nothing is finetuned or the test part is empty.
    """
    if not tuned or not len(test):
        return pd.DataFrame(columns=[*evaluate_mod.RESULT_COLUMNS, "base", "curriculum"])
    s1_models = list(bases.values()) + [m for name, m in tuned.items() if pairs[name][1] == "mixed"]
    results = evaluate_test_part(config, root, test, [*bases.values(), *tuned.values()], folder,
                                 _spread_images(test, int(config.finetune_s1_max_images)), s1_models,
                                 progress=progress)
    return label_pairs(results, pairs)


def note(config, manifest: pd.DataFrame, runs: pd.DataFrame) -> str:
    """The honesty note of every chapter that shows a finetuned model (glued, never hand-written).

    Parameters
    ----------
    config : the run-list Config.
    manifest : the config's objects.
    runs : the ``finetune_runs`` table (:func:`runs_table`; ``attrs["skipped"]`` names the bases
        not finetuned and why).
    """
    skipped = "".join(f" {name} is not finetuned: {why}." for name, why in runs.attrs.get("skipped", {}).items())
    if not len(runs):
        return "This config evaluates no finetuned model." + skipped
    split = chapter_split(manifest, config.seed)
    counts = {p: split.rows(manifest, p) for p in ("train", "val", "test")}
    n_img = {p: int(rows[["task", "image_id"]].drop_duplicates().shape[0]) for p, rows in counts.items()}
    names = ", ".join(f"**{m}** ({b} with its mask decoder finetuned on `{c}` prompts)"
                      for m, b, c in runs[["model", "base", "curriculum"]].itertuples(index=False))
    reused = int(runs["reused"].sum())
    made = ("reused from an earlier chapter of this book" if reused == len(runs)
            else "trained now" if not reused else f"{reused} of {len(runs)} reused, the rest trained now")
    verb = "is" if len(runs) == 1 else "are"
    return (f"{names} {verb} the finetuning chapter's run{'s' if len(runs) > 1 else ''} ({made}), trained on "
            f"{len(counts['train'])} objects of {n_img['train']} images and selected on {len(counts['val'])} "
            f"validation objects of {n_img['val']} images. {'It is' if len(runs) == 1 else 'They are'} evaluated "
            f"here, beside the base model, on the **test part only**: {len(counts['test'])} objects of "
            f"{n_img['test']} images whose source volumes or files were never used for training or validation "
            f"(split by {split.rule}). No finetuned model is reported on its own training images." + skipped)


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


def history_table(runs: Runs) -> pd.DataFrame:
    """Per-epoch train loss and validation DICE of every run: ``model, base, curriculum`` + history
    (empty, with those columns, when nothing is finetuned)."""
    frames = [r.history.assign(model=r.name, base=b, curriculum=c) for (b, c), r in runs.runs.items()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["model", "base", "curriculum"])


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
