"""Aggregations of the results table into the paper's tables and figures (paper 4.3-4.7).

Pure functions of a results DataFrame (schema in ``ARCHITECTURE.md``): the chapters call these
and only plot. DICE/JAC in %, distances in pixels, times in seconds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cosmoslib.analysis import paper
from cosmoslib.protocol.interactive import noc
from cosmoslib.protocol.prompts import SHIFT_LEVELS
from cosmoslib.strategies import STRATEGY_NAMES  # noqa: F401  (re-exported for the chapters)

_KEY = ["task", "image_id", "label_value"]

def select(results: pd.DataFrame, rule: str = "oracle_dice") -> pd.DataFrame:
    """Rows of one selection rule (``oracle_dice``, the paper's Eq. 1, or ``pred_iou``), with
    the unshifted prompts only (shifted prompts, Table 8, have their own summaries)."""
    keep = results["selection_rule"] == rule
    if "shift_level" in results:
        keep &= results["shift_level"] == 0
    return results[keep]


def selection_rule_table(results: pd.DataFrame) -> pd.DataFrame:
    """Table 2b: mean DICE (%) per model and strategy under each selection rule, and the loss.

    Returns
    -------
    DataFrame
        Index (model, strategy) for S2-S6; columns ``oracle_dice``, ``pred_iou`` and ``loss``
        (oracle minus predicted-IoU choice: what a user without ground truth gives up).
    """
    df = pd.concat([select(results, r) for r in ("oracle_dice", "pred_iou")])
    df = df[df["strategy"] != "S1"]
    rules = df.pivot_table(index=["model", "strategy"], columns="selection_rule", values="dice", aggfunc="mean")
    rules["loss"] = rules["oracle_dice"] - rules["pred_iou"]
    return rules


def object_modality(df: pd.DataFrame) -> pd.Series:
    """The paper's row label, e.g. ``"Lung Tumor-CT"``."""
    return df["object"].astype(str) + "-" + df["modality"].astype(str)


def strategy_means(results: pd.DataFrame, rule: str = "oracle_dice") -> pd.DataFrame:
    """Fig. 6: mean DICE (%) and HD (pixels) per model and strategy, with counts.

    Returns
    -------
    DataFrame
        Columns model, strategy, dice, hd, n, n_empty_pred (masks where the chosen prediction
        was empty: their distances follow the metrics module's empty-mask policy).
    """
    df = select(results, rule)
    return (df.groupby(["model", "strategy"], as_index=False)
              .agg(dice=("dice", "mean"), hd=("hd", "mean"), n=("dice", "size"),
                   n_empty_pred=("empty_pred", "sum")))


def object_modality_table(results: pd.DataFrame, metric: str = "dice",
                          rule: str = "oracle_dice") -> pd.DataFrame:
    """Tables 2 and 3: mean ``metric`` per object-modality (rows) × model and strategy (columns)."""
    df = select(results, rule).assign(object_modality=lambda d: object_modality(d))
    table = df.pivot_table(index="object_modality", columns=["model", "strategy"], values=metric,
                           aggfunc="mean")
    return table.sort_index(axis=1)


def per_modality(results: pd.DataFrame, strategy: str = "S5", rule: str = "oracle_dice") -> pd.DataFrame:
    """Fig. 10: per-object DICE under one strategy, with modality means (for a box plot)."""
    df = select(results, rule)
    return df[df["strategy"] == strategy][["model", "modality", "object", "dice"]].reset_index(drop=True)


def timing_table(results: pd.DataFrame) -> pd.DataFrame:
    """Table 4: mean seconds per model for the embedding and each strategy's prompt+decode.

    The embedding time is averaged over images (one encoder pass each); S2-S6 over objects (one
    decode per object and strategy; both selection rules share it, so one rule is used); S1 over
    images (one Everything pass per image, repeated on each object row of the results).
    """
    df = select(results, "oracle_dice")
    per_image = df.drop_duplicates(["model", "task", "image_id"])
    out = {"embedding": per_image.groupby("model")["t_embed_s"].mean()}
    for strategy in sorted(df["strategy"].unique()):
        part = df[df["strategy"] == strategy]
        if strategy == "S1":
            part = part.drop_duplicates(["model", "task", "image_id"])
        out[strategy] = part.groupby("model")["t_decode_s"].mean()
    return pd.DataFrame(out)


def grid_table(grid_results: pd.DataFrame) -> pd.DataFrame:
    """Table 5: mean (sd) DICE of S1 per object-modality and grid size m (columns ``m²``)."""
    df = grid_results.assign(object_modality=lambda d: object_modality(d))
    mean = df.pivot_table(index="object_modality", columns="points_per_side", values="dice", aggfunc="mean")
    sd = df.pivot_table(index="object_modality", columns="points_per_side", values="dice", aggfunc="std")
    return pd.concat({"mean": mean, "sd": sd}, axis=1)


def format_mean_sd(mean: pd.DataFrame, sd: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """Cells like ``"55.6 (42.4)"`` for display; NaN sd (single value) shows the mean alone."""
    def cell(m, s):
        if np.isnan(m):
            return ""
        return f"{m:.{digits}f}" + ("" if np.isnan(s) else f" ({s:.{digits}f})")
    return pd.DataFrame([[cell(m, s) for m, s in zip(mr, sr)] for mr, sr in zip(mean.to_numpy(), sd.to_numpy())],
                        index=mean.index, columns=mean.columns)


def beside_paper(results: pd.DataFrame, metric: str = "dice", rule: str = "oracle_dice") -> pd.DataFrame:
    """Our per-object-modality means next to the paper's Table 2 (DICE) or Table 3 (HD).

    Only object-modality pairs that :func:`cosmoslib.analysis.paper.match_object_modality` pairs with a
    row of the paper appear (conservative matching: a wrong pairing is worse than none).

    Returns
    -------
    DataFrame
        Index (object-modality, paper's row, strategy); one column per our model (``ours:
        <model>``) and per paper model (``paper: ViT-B``, ``paper: ViT-H``). Empty when nothing
        matches.
    """
    table = {"dice": "table2_dice", "hd": "table3_hd"}[metric]
    df = select(results, rule)
    ours = df.groupby(["object", "modality", "model", "strategy"], as_index=False)[metric].mean()
    pairs = paper.match_object_modality(ours[["object", "modality"]].drop_duplicates(), table=table)
    pairs = pairs.dropna(subset=["paper_object_modality"])
    if pairs.empty:
        return pd.DataFrame()
    ours = ours.merge(pairs, on=["object", "modality"])
    ours["object_modality"] = object_modality(ours)
    ours_w = ours.pivot_table(index=["object_modality", "paper_object_modality", "strategy"],
                              columns="model", values=metric).add_prefix("ours: ")
    quoted = paper.quoted(table)
    quoted = quoted[quoted["object_modality"].isin(pairs["paper_object_modality"])]
    paper_w = quoted.pivot_table(index=["object_modality", "strategy"], columns="model",
                                 values=metric).add_prefix("paper: ")
    paper_w.index = paper_w.index.set_names(["paper_object_modality", "strategy"])
    out = ours_w.reset_index().merge(paper_w.reset_index(), on=["paper_object_modality", "strategy"],
                                     how="left")
    return out.set_index(["object_modality", "paper_object_modality", "strategy"]).sort_index()


def grid_means(grid_results: pd.DataFrame) -> pd.DataFrame:
    """Fig. 11a: mean S1 DICE (%) per grid size m (rows) and model (columns)."""
    return grid_results.groupby(["model", "points_per_side"])["dice"].mean().unstack(0)


def grid_masks_per_image(grid_results: pd.DataFrame) -> pd.DataFrame:
    """Table 5b: mean number of Everything masks kept per image, per grid size m and model."""
    per_image = grid_results.drop_duplicates(["model", "task", "image_id", "points_per_side"])
    return per_image.groupby(["model", "points_per_side"])["n_candidates"].mean().unstack(0)


def with_factors(results: pd.DataFrame, factors: pd.DataFrame, strategy: str = "S5",
                 rule: str = "oracle_dice") -> pd.DataFrame:
    """Results of one strategy joined with the object factors (Figs. 13-15, 17).

    An inner join on ``task, image_id, label_value``: objects the factors table could not
    measure are left out (their count is in the factors table's ``skipped`` attribute).
    """
    df = select(results, rule)
    df = df[df["strategy"] == strategy].astype({"label_value": "int64"})
    fac = factors.drop(columns=[c for c in ("object", "modality") if c in factors]).astype({"label_value": "int64"})
    return df.merge(fac, on=_KEY)


def dice_bins(df: pd.DataFrame, width: float = 10.0) -> pd.Series:
    """Fig. 14: the DICE interval (width ``width`` %, 0-100) of each row."""
    return pd.cut(df["dice"], bins=np.arange(0, 100 + width, width), include_lowest=True)


def factor_trend(df: pd.DataFrame, factor: str, q: int = 5) -> pd.DataFrame:
    """Fig. 17: mean DICE (%) per quantile bin of ``factor``, per model.

    Parameters
    ----------
    df : results joined with factors (:func:`with_factors`).
    factor : factor column.
    q : number of quantile bins (fewer when the factor has fewer distinct values; equal edges
        are merged).

    Returns
    -------
    DataFrame
        ``model, bin (Interval), mid (bin centre), dice (mean %), n``; empty when the factor is
        constant or missing everywhere.
    """
    data = df.dropna(subset=[factor])
    if data[factor].nunique() < 2:
        return pd.DataFrame(columns=["model", "bin", "mid", "dice", "n"])
    data = data.assign(bin=pd.qcut(data[factor], q=min(q, data[factor].nunique()), duplicates="drop"))
    trend = (data.groupby(["model", "bin"], observed=True)["dice"].agg(["mean", "size"])
             .reset_index().rename(columns={"mean": "dice", "size": "n"}))
    trend["mid"] = [iv.mid for iv in trend["bin"]]
    return trend[["model", "bin", "mid", "dice", "n"]]


def spread(df: pd.DataFrame, column: str, n: int) -> pd.DataFrame:
    """``n`` rows spread evenly over the sorted range of ``column`` (Fig. 15's examples)."""
    ordered = df.sort_values([column, *[c for c in _KEY if c in df]], kind="stable")
    if len(ordered) == 0:
        return ordered
    return ordered.iloc[np.unique(np.linspace(0, len(ordered) - 1, min(n, len(ordered))).round().astype(int))]


def orders_to_draw(raw_order: int) -> list[int]:
    """Fig. 12: the EFD orders to draw for an object whose order search stopped at ``raw_order``."""
    return sorted({o for o in (1, 2, 4, raw_order // 2, raw_order) if 1 <= o <= raw_order})


def fig12_object(factors: pd.DataFrame) -> pd.Series:
    """Fig. 12: the object with the highest Fourier order, preferring single-contour objects.

    Ties are broken by task, image and label value, so the pick is reproducible.
    """
    measured = factors.dropna(subset=["fourier_order"])
    single = measured[measured["n_contours"] == 1]
    pool = single if len(single) else measured
    return pool.sort_values(["fourier_order", *_KEY]).iloc[-1]


def modality_stats(per_object: pd.DataFrame) -> pd.DataFrame:
    """Fig. 10's numbers: mean, sd and count of DICE (%) per model and modality."""
    return per_object.groupby(["model", "modality"])["dice"].agg(["mean", "std", "size"])


def table8(shifted: pd.DataFrame, rule: str = "oracle_dice", by: tuple[str, ...] = ()) -> pd.DataFrame:
    """Table 8: the DICE drop (percentage points) of each shifted prompt against the unshifted one.

    For every object, strategy and model the DICE of each shifted run (``shift_level`` >= 1,
    ``repeat`` >= 1) is subtracted from the same object's unshifted DICE (``shift_level`` 0), so
    a positive drop means the shift hurt; drops are then averaged over objects. ``Mean`` is the
    mean over repeats, as in the paper.

    Parameters
    ----------
    shifted : results with ``shift_level``/``repeat`` (the ``randomness`` table, :mod:`cosmoslib.book.tables`).
    rule : selection rule (the paper's Eq. 1 oracle by default).
    by : extra grouping columns, e.g. ``("object",)`` for the per-class table.

    Returns
    -------
    DataFrame
        Long format: ``model, *by, strategy, shift_level, run`` ("Random k" or "Mean"),
        ``dice_drop`` (mean, percentage points), ``n`` (objects).
    """
    df = shifted[shifted["selection_rule"] == rule]
    keys = ["model", *_KEY, "strategy"]
    base = df[df["shift_level"] == 0][keys + list(dict.fromkeys(by))].assign(
        dice0=df.loc[df["shift_level"] == 0, "dice"])
    moved = df[df["shift_level"] > 0][keys + ["shift_level", "repeat", "dice"]]
    pairs = moved.merge(base, on=keys, how="inner")
    pairs["drop"] = pairs["dice0"] - pairs["dice"]
    groups = ["model", *by, "strategy", "shift_level"]
    per_run = (pairs.groupby(groups + ["repeat"])["drop"].agg(["mean", "size"]).reset_index()
               .rename(columns={"mean": "dice_drop", "size": "n"}))
    per_run["run"] = "Random " + per_run["repeat"].astype(str)
    mean = (pairs.groupby(groups)["drop"].agg(["mean", "size"]).reset_index()
            .rename(columns={"mean": "dice_drop", "size": "n"}).assign(run="Mean"))
    mean["n"] = (pairs.groupby(groups)[_KEY].apply(lambda g: len(g.drop_duplicates()))).to_numpy()
    out = pd.concat([per_run.drop(columns="repeat"), mean], ignore_index=True)
    return out[[*groups[:-1], "shift_level", "run", "dice_drop", "n"]]


def table8_wide(long: pd.DataFrame, model: str) -> pd.DataFrame:
    """Table 8 as the paper prints it for one model: rows (run, shift range), columns S2..S6."""
    part = long[long["model"] == model].copy()
    part["shift"] = [f"{SHIFT_LEVELS[int(v)][0]:g}-{SHIFT_LEVELS[int(v)][1]:g}" for v in part["shift_level"]]
    wide = part.pivot_table(index=["run", "shift_level", "shift"], columns="strategy", values="dice_drop")
    return wide.droplevel("shift_level")


def click_curves(interaction: pd.DataFrame, max_clicks: int) -> pd.DataFrame:
    """Fig. 16: DICE (%) after each click, per object and method, over clicks 1..``max_clicks``.

    A simulation stops once a mask equals the ground truth; its DICE (100) is carried to the
    later clicks, so every object counts at every click.

    Returns
    -------
    DataFrame
        ``method, task, image_id, label_value, object, modality, click, dice``.
    """
    keys = ["method", *_KEY, "object", "modality"]
    frames = []
    for key, part in interaction.groupby(keys, sort=True):
        curve = part.set_index("click")["dice"].reindex(range(1, max_clicks + 1)).ffill()
        frames.append(pd.DataFrame(dict(zip(keys, key)) | {"click": curve.index, "dice": curve.to_numpy()}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*keys, "click", "dice"])


def noc_table(curves: pd.DataFrame, thresholds=(80.0, 90.0)) -> pd.DataFrame:
    """NoC@80/90 per method: mean clicks to reach each DICE threshold (capped at the number
    of clicks simulated; the share of objects that never reached it is reported beside)."""
    rows = []
    max_clicks = int(curves["click"].max())
    for (method, *_), part in curves.groupby(["method", *_KEY], sort=True):
        dice = part.sort_values("click")["dice"].to_numpy()
        row = {"method": method}
        for t in thresholds:
            res = noc(dice, t, max_clicks=max_clicks)
            row[f"NoC@{t:g}"], row[f"reached@{t:g}"] = res.clicks, res.reached
        rows.append(row)
    df = pd.DataFrame(rows)
    out = df.groupby("method").agg(
        **{f"NoC@{t:g}": (f"NoC@{t:g}", "mean") for t in thresholds},
        **{f"not reached@{t:g} (%)": (f"reached@{t:g}", lambda v: 100.0 * (1 - v.mean())) for t in thresholds},
        n=("method", "size"))
    return out


def table7(annotation: pd.DataFrame) -> pd.DataFrame:
    """Table 7 (ours): mean HCE and seconds of the model's S5 masks, per object and per image.

    Per image, HCE and seconds are sums over the image's objects (a human corrects every
    object of an image); per object they are means over objects.
    """
    per_image = annotation.groupby(["model", "task", "image_id"]).agg(hce=("hce", "sum"), seconds=("seconds", "sum"))
    return pd.DataFrame({
        "HCE per object": annotation.groupby("model")["hce"].mean(),
        "seconds per object": annotation.groupby("model")["seconds"].mean(),
        "HCE per image": per_image.groupby("model")["hce"].mean(),
        "seconds per image": per_image.groupby("model")["seconds"].mean(),
        "objects": annotation.groupby("model").size(),
        "images": per_image.groupby("model").size(),
    })
