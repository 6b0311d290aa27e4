"""Cluster bootstrap intervals on every cell of the paper's Tables 2-6 and 8 and every bar (issue 13).

The tables of :mod:`cosmoslib.analysis.summaries` and :func:`cosmoslib.analysis.stats.table6` give the paper's
means; the functions here give the same numbers with a seeded 95 % cluster bootstrap interval
that resamples the **independent unit**, the source volume (else the source image), never the
slice (:mod:`cosmoslib.analysis.uncertainty`). Each returns a long table (``mean, low, high, n, n_units``
beside the grouping columns; ``r`` for Table 6) whose ``mean`` equals the summary's number for
the same cell; :func:`cosmoslib.analysis.uncertainty.interval_cells` turns it into the displayed
``mean [low, high]`` cells and :func:`cosmoslib.book.plots.interval_bars` into bars with error bars.
A cell with one unit has no interval and says so (``n=1, no interval``).

The results tables do not carry the source volume: every function takes the ``manifest`` and
joins its ``source`` on ``task, image_id, label_value`` (:func:`with_source`).
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from cosmoslib.analysis import stats, summaries, uncertainty
from cosmoslib.analysis.uncertainty import (
    CI,
    N_RESAMPLES_PARTIAL,
    N_RESAMPLES_TABLES,
    with_source,
)
from cosmoslib.protocol.prompts import SHIFT_LEVELS

_KEY = ["task", "image_id", "label_value"]
_COLS = ["mean", "low", "high", "n", "n_units"]


def _intervals(df: pd.DataFrame, value: str, by: Sequence[str], n_resamples: int, seed: int,
               ci: float) -> pd.DataFrame:
    return uncertainty.with_intervals(df, value, list(by), ci=ci, n_resamples=n_resamples, seed=seed)


def strategy_intervals(results: pd.DataFrame, manifest: pd.DataFrame | None, metrics: Sequence[str] = ("dice", "hd"),
                       rule: str = "oracle_dice", n_resamples: int = N_RESAMPLES_TABLES, seed: int = 0,
                       ci: float = CI) -> pd.DataFrame:
    """Fig. 6 bars: mean DICE (%) and HD (pixels) per model and strategy with intervals.

    Returns
    -------
    DataFrame
        ``metric, model, strategy, mean, low, high, n, n_units``; ``mean`` is
        :func:`cosmoslib.analysis.summaries.strategy_means`'s number.
    """
    df = with_source(summaries.select(results, rule), manifest)
    frames = [_intervals(df, m, ["model", "strategy"], n_resamples, seed, ci).assign(metric=m) for m in metrics]
    out = pd.concat(frames, ignore_index=True)
    return out[["metric", "model", "strategy", *_COLS]]


def object_modality_intervals(results: pd.DataFrame, manifest: pd.DataFrame | None, metric: str = "dice",
                              rule: str = "oracle_dice", n_resamples: int = N_RESAMPLES_TABLES, seed: int = 0,
                              ci: float = CI) -> pd.DataFrame:
    """Tables 2 (DICE, %) and 3 (HD, pixels): per object-modality, model and strategy.

    Returns
    -------
    DataFrame
        ``object_modality, model, strategy, mean, low, high, n, n_units``; ``mean`` is
        :func:`cosmoslib.analysis.summaries.object_modality_table`'s cell.
    """
    df = with_source(summaries.select(results, rule), manifest)
    df = df.assign(object_modality=summaries.object_modality(df))
    return _intervals(df, metric, ["object_modality", "model", "strategy"], n_resamples, seed, ci)


def selection_rule_intervals(results: pd.DataFrame, manifest: pd.DataFrame | None,
                             n_resamples: int = N_RESAMPLES_TABLES, seed: int = 0,
                             ci: float = CI) -> pd.DataFrame:
    """Table 2b: mean DICE (%) under each selection rule and the paired loss, S2-S6.

    The loss is the per-object difference ``oracle_dice - pred_iou`` (same object, same
    strategy), averaged with its own interval: a paired interval, narrower than the two
    rules' intervals suggest.

    Returns
    -------
    DataFrame
        ``model, strategy, column`` (``oracle_dice``, ``pred_iou``, ``loss``), ``mean, low,
        high, n, n_units``; the means are :func:`cosmoslib.analysis.summaries.selection_rule_table`'s
        (the loss on the objects scored under both rules).
    """
    frames = []
    per_rule = {}
    for rule in ("oracle_dice", "pred_iou"):
        df = with_source(summaries.select(results, rule), manifest)
        df = df[df["strategy"] != "S1"]
        per_rule[rule] = df
        frames.append(_intervals(df, "dice", ["model", "strategy"], n_resamples, seed, ci).assign(column=rule))
    keys = ["model", "strategy", *_KEY]
    both = per_rule["oracle_dice"][[*keys, "source", "dice"]].merge(
        per_rule["pred_iou"][[*keys, "dice"]], on=keys, suffixes=("_oracle", "_iou"))
    both = both.assign(loss=both["dice_oracle"] - both["dice_iou"])
    frames.append(_intervals(both, "loss", ["model", "strategy"], n_resamples, seed, ci).assign(column="loss"))
    out = pd.concat(frames, ignore_index=True)
    return out[["model", "strategy", "column", *_COLS]]


def grid_intervals(grid_results: pd.DataFrame, manifest: pd.DataFrame | None, by_object: bool = True,
                   n_resamples: int = N_RESAMPLES_TABLES, seed: int = 0, ci: float = CI) -> pd.DataFrame:
    """Table 5 (``by_object``) and Fig. 11a: S1 DICE (%) per grid size m with intervals.

    Returns
    -------
    DataFrame
        ``[object_modality,] model, points_per_side, mean, low, high, n, n_units``. Unlike
        :func:`cosmoslib.analysis.summaries.grid_table`, which pools the models, each model is its own
        cell; with one model the means are equal.
    """
    df = with_source(grid_results, manifest)
    by = ["model", "points_per_side"]
    if by_object:
        df = df.assign(object_modality=summaries.object_modality(df))
        by = ["object_modality", *by]
    return _intervals(df, "dice", by, n_resamples, seed, ci)


def timing_intervals(results: pd.DataFrame, manifest: pd.DataFrame | None,
                     n_resamples: int = N_RESAMPLES_TABLES, seed: int = 0, ci: float = CI) -> pd.DataFrame:
    """Table 4: mean seconds per model for the embedding (per image) and each strategy.

    The rows averaged are those of :func:`cosmoslib.analysis.summaries.timing_table` (one per image for
    the embedding and S1, one per object for S2-S6); the unit is the source volume, as for
    every other table, so the interval says how the mean time varies with the data sampled
    (not with the load of the machine, which one run cannot tell).

    Returns
    -------
    DataFrame
        ``model, stage`` (``embedding``, ``S1``..``S6``), ``mean, low, high, n, n_units``.
    """
    df = with_source(summaries.select(results, "oracle_dice"), manifest)
    per_image = df.drop_duplicates(["model", "task", "image_id"])
    frames = [_intervals(per_image, "t_embed_s", ["model"], n_resamples, seed, ci).assign(stage="embedding")]
    for strategy in sorted(df["strategy"].unique()):
        part = df[df["strategy"] == strategy]
        if strategy == "S1":
            part = part.drop_duplicates(["model", "task", "image_id"])
        frames.append(_intervals(part, "t_decode_s", ["model"], n_resamples, seed, ci).assign(stage=strategy))
    out = pd.concat(frames, ignore_index=True)
    return out[["model", "stage", *_COLS]]


def shift_pairs(shifted: pd.DataFrame, rule: str = "oracle_dice", by: Sequence[str] = ()) -> pd.DataFrame:
    """Table 8's pairs: one row per object, strategy, model, shift level and repeat with its
    ``drop`` (unshifted DICE minus shifted DICE, percentage points), as
    :func:`cosmoslib.analysis.summaries.table8` forms them (inner join on the unshifted row)."""
    df = shifted[shifted["selection_rule"] == rule]
    keys = ["model", *_KEY, "strategy"]
    extra = [c for c in dict.fromkeys(by) if c not in keys]
    base = df[df["shift_level"] == 0][[*keys, *extra, "dice"]].rename(columns={"dice": "dice0"})
    moved = df[df["shift_level"] > 0][[*keys, "shift_level", "repeat", "dice"]]
    pairs = moved.merge(base, on=keys, how="inner")
    return pairs.assign(drop=pairs["dice0"] - pairs["dice"])


def table8_intervals(shifted: pd.DataFrame, manifest: pd.DataFrame | None, rule: str = "oracle_dice",
                     by: Sequence[str] = (), n_resamples: int = N_RESAMPLES_TABLES, seed: int = 0,
                     ci: float = CI) -> pd.DataFrame:
    """Table 8: the mean DICE drop per run and shift level with intervals.

    Returns
    -------
    DataFrame
        ``model, *by, strategy, shift_level, run`` ("Random k" or "Mean"), ``mean`` (the drop,
        percentage points: :func:`cosmoslib.analysis.summaries.table8`'s ``dice_drop``), ``low, high, n``
        (object x repeat pairs), ``n_units``. The "Mean" row pools every repeat of an object,
        so the unit carries all of them together.
    """
    by = list(dict.fromkeys(by))
    pairs = with_source(shift_pairs(shifted, rule, by), manifest)
    groups = ["model", *by, "strategy", "shift_level"]
    per_run = _intervals(pairs, "drop", [*groups, "repeat"], n_resamples, seed, ci)
    per_run = per_run.assign(run="Random " + per_run["repeat"].astype(str)).drop(columns="repeat")
    mean = _intervals(pairs, "drop", groups, n_resamples, seed, ci).assign(run="Mean")
    out = pd.concat([per_run, mean], ignore_index=True)
    return out[[*groups, "run", *_COLS]]


def table6_intervals(results: pd.DataFrame, factors: pd.DataFrame, manifest: pd.DataFrame | None,
                     factor_cols: Sequence[str] = stats.TABLE6_FACTORS, by: Sequence[str] = ("model", "strategy"),
                     selection_rule: str | None = "oracle_dice", extra_factors: Sequence[str] = (),
                     n_resamples: int = N_RESAMPLES_PARTIAL, seed: int = 0, ci: float = CI) -> pd.DataFrame:
    """Table 6 with a cluster bootstrap interval on every partial correlation.

    The rows, covariates and join are those of :func:`cosmoslib.analysis.stats.table6` (same arguments);
    each cell is :func:`cosmoslib.analysis.uncertainty.partial_spearman_ci` (percentile interval of
    ``n_resamples`` seeded resamples of the source volumes/images).

    Returns
    -------
    DataFrame
        ``*by, factor, r, low, high, n, n_units, n_draws, note``; ``r`` equals
        :func:`cosmoslib.analysis.stats.table6`'s.
    """
    by = list(by)
    factor_cols = list(factor_cols)
    extra_factors = [f for f in extra_factors if f not in factor_cols]
    res = results
    if selection_rule is not None and "selection_rule" in res:
        res = res[res["selection_rule"] == selection_rule]
    fac = factors[[*_KEY, *factor_cols, *extra_factors]].drop_duplicates(_KEY).astype({"label_value": "int64"})
    left = with_source(res[[*_KEY, *by, "dice"]], manifest)
    joined = left.merge(fac, on=_KEY, how="inner")
    tests = [(f, [c for c in factor_cols if c != f]) for f in factor_cols]
    tests += [(f, [c for c in factor_cols if c != stats.REPLACES.get(f)]) for f in extra_factors]
    rows = []
    for group, block in joined.groupby(by, sort=True, dropna=False):
        group = group if isinstance(group, tuple) else (group,)
        for factor, others in tests:
            pc = uncertainty.partial_spearman_ci(block, factor, "dice", others, n_resamples=n_resamples, ci=ci,
                                                 seed=seed)
            rows.append(dict(zip(by, group), factor=factor, **pc._asdict()))
    columns = [*by, "factor", "r", "low", "high", "n", "n_units", "n_draws", "note"]
    return pd.DataFrame(rows, columns=columns)


def table8_cells(t8: pd.DataFrame, model: str, digits: int = 2) -> pd.DataFrame:
    """Table 8 as the paper prints it for one model, each cell ``drop [low, high]``.

    Parameters
    ----------
    t8 : :func:`table8_intervals` (without ``by``).
    model : the model shown.

    Returns
    -------
    DataFrame of str: rows (run, shift range in pixels), columns S2..S6, as
    :func:`cosmoslib.analysis.summaries.table8_wide`.
    """
    part = t8[t8["model"] == model]
    part = part.assign(shift=[f"{SHIFT_LEVELS[int(v)][0]:g}-{SHIFT_LEVELS[int(v)][1]:g}" for v in part["shift_level"]])
    wide = uncertainty.interval_cells(part, ["run", "shift_level", "shift"], "strategy", digits=digits)
    return wide.droplevel("shift_level")
