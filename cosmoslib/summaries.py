"""Aggregations of the results table into the paper's tables and figures (paper 4.3-4.7).

Pure functions of a results DataFrame (schema in ``ARCHITECTURE.md``): the chapters call these
and only plot. DICE/JAC in %, distances in pixels, times in seconds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

STRATEGY_NAMES = {
    "S1": "Everything",
    "S2": "1 positive point",
    "S3": "5 positive points",
    "S4": "5 positive + 5 negative points",
    "S5": "box",
    "S6": "box + 1 positive point",
}


def select(results: pd.DataFrame, rule: str = "oracle_dice") -> pd.DataFrame:
    """Rows of one selection rule (``oracle_dice``, the paper's Eq. 1, or ``pred_iou``)."""
    return results[results["selection_rule"] == rule]


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

    Only object-modality pairs that :func:`cosmoslib.paper.match_object_modality` pairs with a
    row of the paper appear (conservative matching: a wrong pairing is worse than none).

    Returns
    -------
    DataFrame
        Index (object-modality, paper's row, strategy); one column per our model (``ours:
        <model>``) and per paper model (``paper: ViT-B``, ``paper: ViT-H``). Empty when nothing
        matches.
    """
    from cosmoslib import paper

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
