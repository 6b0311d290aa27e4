"""Which of the paper's eight findings hold on the data at hand (issue 13, closing chapter).

The paper's abstract (and, in nearly the same words, its conclusion) lists eight findings
(:data:`PAPER_FINDINGS`, quoted verbatim). For each, a function here returns a :class:`Verdict`:
one of :data:`HOLDS`, :data:`DOES_NOT_HOLD` or :data:`CANNOT_DECIDE`, the sentence that says why
(its numbers come from the tables, never from this file), the decision rule in words, and the
evidence table the sentence was read from. A table the run did not compute is passed as None
and the verdict is then :data:`CANNOT_DECIDE`, saying which table is missing.

How a comparison is read
------------------------
Every comparison "A is better than B" is the mean paired difference A - B over the objects
measured under both, with its cluster bootstrap interval (the independent unit is the source
volume or source image, :func:`cosmoslib.analysis.uncertainty.cluster_key`) and a Wilcoxon signed-rank
test on the per-cluster mean differences, Holm-corrected within the call
(:func:`cosmoslib.analysis.uncertainty.paired_comparisons`). :func:`compare` turns one such row into a
word:

* ``"greater"``: the whole interval lies above 0 **and** the Holm-adjusted p-value is below
  :data:`ALPHA` (0.05);
* ``"less"``: the whole interval lies below 0 and Holm p < :data:`ALPHA`;
* ``"equivalent"``: the whole interval lies inside ``(-margin, +margin)``; for DICE the margin
  is :data:`MARGIN` = 1 percentage point (a difference the interval bounds below one DICE point
  is no advantage worth the name);
* ``"unclear"``: anything else (too few independent units, a wide interval, a test that does
  not reach significance). With five or fewer clusters the two-sided Wilcoxon test cannot reach
  p < 0.05 at all, so such runs never decide a comparison.

A finding about "SAM" is read for every model of the run: it **holds** when it holds for every
model, it **does not hold** when it fails for at least one model, and otherwise the run cannot
decide (:func:`combine`). The individual rules are in each function's docstring and in
:data:`RULES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from cosmoslib import models as models_mod
from cosmoslib.analysis import uncertainty
from cosmoslib.analysis.uncertainty import with_source

#: The three verdicts.
HOLDS = "holds"
DOES_NOT_HOLD = "does not hold"
CANNOT_DECIDE = "cannot decide on this run"
VERDICTS = (HOLDS, DOES_NOT_HOLD, CANNOT_DECIDE)

#: The paper's eight findings, verbatim from its abstract (Huang et al., MedIA 2024).
PAPER_FINDINGS = (
    "SAM showed remarkable performance in some specific objects but was unstable, imperfect, or even "
    "totally failed in other situations.",
    "SAM with the large ViT-H showed better overall performance than that with the small ViT-B.",
    "SAM performed better with manual hints, especially box, than the Everything mode.",
    "SAM could help human annotation with high labeling quality and less time.",
    "SAM was sensitive to the randomness in the center point and tight box prompts, and may suffer from a "
    "serious performance drop.",
    "SAM performed better than interactive methods with one or a few points, but will be outpaced as the "
    "number of points increases.",
    "SAM's performance correlated to different factors, including boundary complexity, intensity "
    "differences, etc.",
    "Finetuning the SAM on specific medical tasks could improve its average DICE performance by 4.39% and "
    "6.68% for ViT-B and ViT-H, respectively.",
)

#: Family-wise level of the Holm-corrected tests.
ALPHA = 0.05
#: Equivalence margin for DICE differences, percentage points (see :func:`compare`).
MARGIN = 1.0
#: Finding 1: an object-modality is "remarkable" when its mean DICE interval lies at or above
#: this (%), and "imperfect or failing" when its interval lies at or below :data:`FAILING_DICE`.
REMARKABLE_DICE = 80.0
FAILING_DICE = 50.0
#: Finding 5: a "serious performance drop" is at least this many DICE points (%).
SERIOUS_DROP = 10.0
#: Finding 7: |r| below this is "no correlation" (the paper calls 0.2 <= rho < 0.4 weak).
WEAK_R = 0.2
#: Finding 7: significance of a partial correlation (the paper bolds p < 0.001).
TABLE6_ALPHA = 0.001
#: Finding 2: the registry names of SAM's small and large backbones.
SMALL_MODEL = "sam_vit_b"
LARGE_MODEL = "sam_vit_h"
#: Finding 7: the factors the finding names and the sign of their correlation with DICE in the
#: paper's Table 6 (boundary complexity = Fourier order, negative; intensity difference, positive).
NAMED_FACTORS = {"fourier_order": -1, "intensity_diff": +1}
#: Finding 4: columns of a human annotation study (one row per object), if a user has one.
STUDY_COLUMNS = ("hce_manual", "hce_assisted", "seconds_manual", "seconds_assisted")
#: Default number of bootstrap resamples of this module (moderate, for a CPU book).
N_RESAMPLES = 2000

#: Each finding's decision rule, in words (the notebook prints them).
RULES = {
    1: (f"Per model, mean DICE under the box prompt (S5) per object-modality with its cluster 95 % CI. "
        f"Holds when at least one object-modality's interval lies at or above {REMARKABLE_DICE:g} % and "
        f"another's at or below {FAILING_DICE:g} %. Does not hold when every object-modality has an "
        f"interval and all of them lie below {REMARKABLE_DICE:g} % (nothing remarkable) or all above "
        f"{FAILING_DICE:g} % (nothing fails). Object-modalities with one independent unit have no interval."),
    2: (f"Per object, mean DICE over the strategies both {SMALL_MODEL} and {LARGE_MODEL} ran; paired "
        f"difference {LARGE_MODEL} - {SMALL_MODEL}. Holds when it is 'greater' (CI above 0, p < {ALPHA:g}); "
        f"does not hold when 'less' or 'equivalent' (CI within +-{MARGIN:g} pp). Needs both models in the run."),
    3: ("Per model, paired differences S5 - S1 and S5 - each point strategy (S2-S4), Holm over the family. "
        "Holds when all are 'greater'; does not hold when S5 - S1 is 'less' or 'equivalent', or a point "
        "strategy is 'equivalent' to or better than S5."),
    4: (f"Needs a human study: per object HCE and seconds of manual and SAM-assisted annotation "
        f"({', '.join(STUDY_COLUMNS)}). Holds when assisted - manual is 'less' for both HCE and time (Holm over "
        f"the two); does not hold when either is 'greater' (assisted worse). The book runs no human study."),
    5: (f"Per model, DICE drop (unshifted minus mean over repeats) of the centre point (S2) and the tight box "
        f"(S5) at the largest shift level. Holds when both drops are 'greater' than 0 and at least one "
        f"drop's CI lies at or above {SERIOUS_DROP:g} points; does not hold when either drop is 'equivalent' "
        f"or 'less', or both CIs lie below {SERIOUS_DROP:g} points."),
    6: ("Per object, SAM's DICE minus each interactive method's at the first and at the last click, Holm "
        "over the family. Holds when SAM is 'greater' than every method at the first click and 'less' than "
        "at least one at the last; does not hold when SAM is 'less' or 'equivalent' to a method at the "
        "first click, or 'greater' or 'equivalent' to every method at the last."),
    7: (f"Table 6 (Spearman partial correlation) per model, strategies S2-S6: a factor 'correlates' in a "
        f"strategy when p < {TABLE6_ALPHA:g} with the paper's sign (Fourier order negative, intensity "
        f"difference positive), and 'does not' when its Fisher-z 95 % CI lies inside +-{WEAK_R:g} or it is "
        f"significant with the other sign. Holds when both named factors correlate in more than half the "
        f"strategies for every model; does not hold when a factor does not in more than half."),
    8: ("Per finetuned model and its base, paired difference of S5 DICE (finetuned - base) on the objects "
        "given (the held-out split). Holds when 'greater' for every pair; does not hold when 'less' or "
        "'equivalent' for one. The paper's +4.39 / +6.68 points are quoted, not required."),
}

_KEY = ["task", "image_id", "label_value"]


# --------------------------------------------------------------------------------------------
# the verdict and its building blocks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What the run says about one of the paper's findings.

    Attributes
    ----------
    number : int
        1-8, the paper's numbering.
    claim : str
        The finding, quoted from the paper (:data:`PAPER_FINDINGS`).
    verdict : str
        One of :data:`VERDICTS`.
    reason : str
        Why, with the numbers (DICE in %, differences in percentage points, intervals at 95 %)
        read from ``evidence``.
    rule : str
        The decision rule in words (:data:`RULES`).
    evidence : DataFrame
        The rows the verdict was read from (empty when a table is missing).
    """

    number: int
    claim: str
    verdict: str
    reason: str
    rule: str
    evidence: pd.DataFrame = field(default_factory=pd.DataFrame, compare=False, repr=False)

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


def _verdict(number: int, verdict: str, reason: str, evidence: pd.DataFrame | None = None) -> Verdict:
    return Verdict(number, PAPER_FINDINGS[number - 1], verdict, reason, RULES[number],
                   pd.DataFrame() if evidence is None else evidence.reset_index(drop=True))


def compare(low: float, high: float, p_holm: float = float("nan"), alpha: float = ALPHA,
            margin: float = MARGIN) -> str:
    """Read one paired difference A - B from its interval and its Holm-adjusted p-value.

    Parameters
    ----------
    low, high : float
        Bounds of the difference's confidence interval (unit of the value, e.g. DICE points).
    p_holm : float
        Holm-adjusted p-value of the difference (NaN: no test, never significant).
    alpha : float
        Family-wise level.
    margin : float
        Equivalence margin (same unit); 0 disables ``"equivalent"``.

    Returns
    -------
    str
        ``"greater"`` (low > 0 and p_holm < alpha), ``"less"`` (high < 0 and p_holm < alpha),
        ``"equivalent"`` (-margin < low and high < margin), else ``"unclear"`` (also for NaN
        bounds).
    """
    if not (math.isfinite(low) and math.isfinite(high)):
        return "unclear"
    significant = bool(p_holm < alpha) if not (p_holm is None or math.isnan(p_holm)) else False
    if low > 0 and significant:
        return "greater"
    if high < 0 and significant:
        return "less"
    if -margin < low and high < margin:
        return "equivalent"
    return "unclear"


def combine(per_model: Mapping[str, str]) -> str:
    """A finding about SAM from the verdicts of each model of the run.

    Returns
    -------
    str
        :data:`HOLDS` when every model's verdict holds, :data:`DOES_NOT_HOLD` when at least one
        model's does not, else :data:`CANNOT_DECIDE` (also for no model).
    """
    values = list(per_model.values())
    if values and all(v == HOLDS for v in values):
        return HOLDS
    if any(v == DOES_NOT_HOLD for v in values):
        return DOES_NOT_HOLD
    return CANNOT_DECIDE


def _prompted(results: pd.DataFrame, rule: str) -> pd.DataFrame:
    keep = pd.Series(True, index=results.index)
    if "selection_rule" in results:
        keep &= results["selection_rule"] == rule
    if "shift_level" in results:
        keep &= results["shift_level"] == 0
    return results[keep]


def _pp(x: float) -> str:
    return f"{x:+.1f}" if math.isfinite(x) else "n/a"


def _ci(low: float, high: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "no interval"
    return f"95 % CI {low:.1f} to {high:.1f}"


def _p(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "no test"
    return f"Holm p = {p:.2g}" if p >= 0.001 else "Holm p < 0.001"


def describe_difference(row: Mapping, label: str | None = None, unit: str = "points") -> str:
    """One paired-comparison row in words: ``"S5 - S1 = +42.0 points (95 % CI ..., Holm p = ...;
    12 units)"``."""
    label = label or f"{row['a']} - {row['b']}"
    value = f"{_pp(float(row['mean_diff']))} {unit}".strip()
    return (f"{label} = {value} ({_ci(float(row['diff_low']), float(row['diff_high']))}, "
            f"{_p(float(row['p_holm']))}; {int(row['n_clusters'])} units)")


def _compare_row(row: Mapping, alpha: float, margin: float) -> str:
    return compare(float(row["diff_low"]), float(row["diff_high"]), float(row["p_holm"]), alpha, margin)


# --------------------------------------------------------------------------------------------
# intervals on the main table (Fig. 6 / Table 2 style)
# --------------------------------------------------------------------------------------------


def strategy_table(results: pd.DataFrame, manifest: pd.DataFrame | None, rule: str = "oracle_dice",
                   values: Sequence[str] = ("dice", "hd"), ci: float = 95.0,
                   n_resamples: int = N_RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """Mean DICE (%) and HD (pixels) per model and strategy with cluster bootstrap intervals.

    Parameters
    ----------
    results : DataFrame
        The results table; the unshifted rows of selection rule ``rule`` are used.
    manifest : DataFrame
        For each object's ``source`` (the resampled unit); None when ``results`` has it.
    rule : ``"oracle_dice"`` (the paper's Eq. 1) or ``"pred_iou"``.
    values : columns to average.
    ci, n_resamples, seed : interval level (%), bootstrap resamples, seed
        (:func:`cosmoslib.analysis.uncertainty.mean_with_ci`, BCa).

    Returns
    -------
    DataFrame
        ``model, strategy``, then per value ``<v>, <v>_low, <v>_high``, then ``n`` (objects)
        and ``n_clusters`` (independent units: source volumes or images).
    """
    df = with_source(_prompted(results, rule), manifest)
    return uncertainty.mean_with_ci(df, ["model", "strategy"], list(values), ci=ci,
                                    n_resamples=n_resamples, seed=seed)


def strategy_comparisons(results: pd.DataFrame, manifest: pd.DataFrame | None, rule: str = "oracle_dice",
                         pairs: Sequence[tuple[str, str]] | None = None, value: str = "dice",
                         ci: float = 95.0, n_resamples: int = N_RESAMPLES, seed: int = 0,
                         alpha: float = ALPHA) -> pd.DataFrame:
    """Paired comparisons between strategies per model, Holm-corrected over the whole table.

    Parameters
    ----------
    results, manifest, rule : as for :func:`strategy_table`.
    pairs : ``(a, b)`` strategy pairs; default every pair of the strategies present.
    value : compared column (DICE, %).
    ci, n_resamples, seed, alpha : see :func:`cosmoslib.analysis.uncertainty.paired_comparisons`.

    Returns
    -------
    DataFrame
        :func:`cosmoslib.analysis.uncertainty.paired_comparisons`'s table (``model, a, b, ..., mean_diff,
        diff_low, diff_high, p, p_holm, significant``) plus ``reading`` (:func:`compare` with
        :data:`MARGIN`).
    """
    df = with_source(_prompted(results, rule), manifest)
    out = uncertainty.paired_comparisons(df, value=value, between="strategy", pairs=pairs, by="model",
                                         ci=ci, n_resamples=n_resamples, seed=seed, alpha=alpha)
    out["reading"] = [_compare_row(r, alpha, MARGIN) for r in out.to_dict("records")]
    return out


def format_ci(table: pd.DataFrame, value: str, digits: int = 1) -> pd.Series:
    """Cells like ``"55.6 [50.1, 60.2]"`` (mean and interval) for display; no interval: mean alone."""
    def cell(m, lo, hi):
        if not math.isfinite(m):
            return ""
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return f"{m:.{digits}f}"
        return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
    return pd.Series([cell(float(m), float(lo), float(hi)) for m, lo, hi in
                      zip(table[value], table[f"{value}_low"], table[f"{value}_high"])], index=table.index)


# --------------------------------------------------------------------------------------------
# the eight findings
# --------------------------------------------------------------------------------------------


def finding1(results: pd.DataFrame, manifest: pd.DataFrame | None, strategy: str = "S5",
             remarkable: float = REMARKABLE_DICE, failing: float = FAILING_DICE,
             rule: str = "oracle_dice", n_resamples: int = N_RESAMPLES, seed: int = 0) -> Verdict:
    """Finding 1: remarkable on some objects, imperfect or failing on others.

    Rule (per model, under ``strategy``, the box prompt by default): the mean DICE (%) of each
    object-modality with its cluster bootstrap 95 % interval. The model shows the finding when
    one object-modality's interval lies at or above ``remarkable`` and another's at or below
    ``failing``; it contradicts it when every object-modality has an interval and all lie below
    ``remarkable`` (nothing remarkable) or all above ``failing`` (nothing fails). An
    object-modality with a single independent unit has no interval: it can show existence of
    neither, and its presence blocks the "does not hold" reading (a universal statement).

    Returns
    -------
    Verdict
        Evidence: ``model, object, modality, dice, dice_low, dice_high, n, n_clusters, reading``
        (``remarkable``, ``failing``, ``between`` or ``no interval``).
    """
    df = with_source(_prompted(results, rule), manifest)
    df = df[df["strategy"] == strategy]
    if df.empty:
        return _verdict(1, CANNOT_DECIDE, f"This run has no {strategy} results.")
    tab = uncertainty.mean_with_ci(df, ["model", "object", "modality"], "dice", n_resamples=n_resamples, seed=seed)
    has = tab["dice_low"].notna() & tab["dice_high"].notna()
    tab["reading"] = np.select([~has, tab["dice_low"] >= remarkable, tab["dice_high"] <= failing],
                               ["no interval", "remarkable", "failing"], "between")
    per, reasons = {}, []
    for model, t in tab.groupby("model", sort=True):
        good, bad = t[t["reading"] == "remarkable"], t[t["reading"] == "failing"]
        usable = t[t["reading"] != "no interval"]
        best = t.loc[t["dice"].idxmax()]
        worst = t.loc[t["dice"].idxmin()]
        span = (f"{len(t)} object-modalities, from {worst['object']}-{worst['modality']} "
                f"{worst['dice']:.1f} % ({_ci(worst['dice_low'], worst['dice_high'])}) to "
                f"{best['object']}-{best['modality']} {best['dice']:.1f} % ({_ci(best['dice_low'], best['dice_high'])})")
        if len(good) and len(bad):
            per[model] = HOLDS
            reasons.append(f"{model}: {len(good)} object-modalities lie at or above {remarkable:g} % and "
                           f"{len(bad)} at or below {failing:g} % ({span}).")
        elif len(usable) == len(t) and len(t) >= 2 and ((t["dice_high"] < remarkable).all()
                                                       or (t["dice_low"] > failing).all()):
            per[model] = DOES_NOT_HOLD
            what = (f"none reaches {remarkable:g} %" if (t["dice_high"] < remarkable).all()
                    else f"none falls to {failing:g} %")
            reasons.append(f"{model}: {what} ({span}).")
        else:
            per[model] = CANNOT_DECIDE
            reasons.append(f"{model}: {len(usable)} of {len(t)} object-modalities have an interval, "
                           f"{len(good)} remarkable and {len(bad)} failing ({span}).")
    return _verdict(1, combine(per), " ".join(reasons), tab)


def finding2(results: pd.DataFrame, manifest: pd.DataFrame | None, small: str = SMALL_MODEL,
             large: str = LARGE_MODEL, rule: str = "oracle_dice", margin: float = MARGIN,
             alpha: float = ALPHA, n_resamples: int = N_RESAMPLES, seed: int = 0) -> Verdict:
    """Finding 2: the large ViT-H beats the small ViT-B overall.

    Rule: for every object both models ran, its mean DICE over the strategies both models ran
    ("overall performance", as Fig. 6 summarises all strategies), and the paired difference
    ``large - small`` with its cluster interval and Wilcoxon test (:func:`compare`). Holds when
    ``"greater"``; does not hold when ``"less"`` or ``"equivalent"`` (within ``margin``). Each
    strategy's own difference is in the evidence, Holm-corrected over the strategies.

    Returns
    -------
    Verdict
        Evidence: the overall row (``strategy == "all"``) then one row per strategy
        (:func:`cosmoslib.analysis.uncertainty.paired_comparisons` columns plus ``reading``).
    """
    df = with_source(_prompted(results, rule), manifest)
    present = sorted(df["model"].unique().tolist())
    if small not in present or large not in present:
        return _verdict(2, CANNOT_DECIDE, f"Comparing {large} with {small} needs both models in the run; "
                                          f"this run has {', '.join(present) or 'none'}.")
    df = df[df["model"].isin([small, large])]
    common = sorted(set(df.loc[df["model"] == small, "strategy"]) & set(df.loc[df["model"] == large, "strategy"]))
    df = df[df["strategy"].isin(common)]
    per_strategy = uncertainty.paired_comparisons(df, "dice", "model", pairs=[(large, small)], by="strategy",
                                                  n_resamples=n_resamples, seed=seed, alpha=alpha)
    wide = df.pivot_table(index=[*_KEY, "model"], columns="strategy", values="dice", aggfunc="mean")
    wide = wide.dropna()
    overall = wide.mean(axis=1).rename("dice").reset_index()
    overall = with_source(overall.assign(strategy="all"), df[[*_KEY, "source"]].drop_duplicates(_KEY))
    row = uncertainty.paired_comparisons(overall, "dice", "model", pairs=[(large, small)], by="strategy",
                                         n_resamples=n_resamples, seed=seed, alpha=alpha)
    evidence = pd.concat([row, per_strategy], ignore_index=True)
    evidence["reading"] = [_compare_row(r, alpha, margin) for r in evidence.to_dict("records")]
    r = evidence.iloc[0]
    reading = r["reading"]
    verdict = {"greater": HOLDS, "less": DOES_NOT_HOLD, "equivalent": DOES_NOT_HOLD}.get(reading, CANNOT_DECIDE)
    reason = (f"Mean DICE over {', '.join(common)}: "
              + describe_difference(r, f"{large} - {small}")
              + f", read as '{reading}'.")
    return _verdict(2, verdict, reason, evidence)


def finding3(results: pd.DataFrame, manifest: pd.DataFrame | None, box: str = "S5", everything: str = "S1",
             points: Sequence[str] = ("S2", "S3", "S4"), rule: str = "oracle_dice", margin: float = MARGIN,
             alpha: float = ALPHA, n_resamples: int = N_RESAMPLES, seed: int = 0) -> Verdict:
    """Finding 3: manual hints, especially the box, beat the Everything mode.

    Rule (per model): paired differences ``box - everything`` and ``box - p`` for each point
    strategy ``p`` present, Holm over all of them (one family for the run). Holds when every one
    is ``"greater"``. Does not hold when ``box - everything`` is ``"less"`` or ``"equivalent"``,
    or when a point strategy is ``"equivalent"`` to or better than the box (``box - p`` is
    ``"equivalent"`` or ``"less"``: then the box is not "especially" good). Otherwise (or when
    the run lacks the box, the Everything mode or every point strategy) it cannot decide.

    Returns
    -------
    Verdict
        Evidence: paired comparisons ``model, a, b, ...`` with ``reading``.
    """
    df = with_source(_prompted(results, rule), manifest)
    strategies = set(df["strategy"].unique())
    if box not in strategies or everything not in strategies:
        missing = [s for s in (box, everything) if s not in strategies]
        return _verdict(3, CANNOT_DECIDE, f"This run has no {' or '.join(missing)} results.")
    pairs = [(box, everything)] + [(box, p) for p in points if p in strategies]
    evidence = uncertainty.paired_comparisons(df, "dice", "strategy", pairs=pairs, by="model",
                                              n_resamples=n_resamples, seed=seed, alpha=alpha)
    evidence["reading"] = [_compare_row(r, alpha, margin) for r in evidence.to_dict("records")]
    per, reasons = {}, []
    for model, ev in evidence.groupby("model", sort=True):
        main = ev[ev["b"] == everything].iloc[0]
        pts = ev[ev["b"] != everything]
        if main["reading"] in ("less", "equivalent") or pts["reading"].isin(["less", "equivalent"]).any():
            per[model] = DOES_NOT_HOLD
        elif main["reading"] == "greater" and len(pts) and (pts["reading"] == "greater").all():
            per[model] = HOLDS
        else:
            per[model] = CANNOT_DECIDE
        parts = [describe_difference(r) + f" '{r['reading']}'" for r in ev.to_dict("records")]
        reasons.append(f"{model}: " + "; ".join(parts) + ".")
    return _verdict(3, combine(per), " ".join(reasons), evidence)


def finding4(annotation: pd.DataFrame | None, manifest: pd.DataFrame | None = None,
             alpha: float = ALPHA, n_resamples: int = N_RESAMPLES, seed: int = 0) -> Verdict:
    """Finding 4: SAM helps human annotation (better quality, less time).

    Rule: only a human study decides it: per object the HCE and the seconds of manual and of
    SAM-assisted annotation (:data:`STUDY_COLUMNS`). The paired differences ``assisted -
    manual`` of HCE and of time (Holm over the two, no equivalence margin) must both be
    ``"less"`` for the finding to hold; either one ``"greater"`` (assisted worse or slower)
    means it does not hold. Without those columns (the book's annotation chapter scores only
    SAM's own masks: ``hce``, ``seconds``) the run cannot decide; the reason then reports SAM's
    mean HCE and time with their intervals.

    Returns
    -------
    Verdict
        Evidence: the paired comparisons (``quantity, a, b, ...``), or SAM's own means.
    """
    if annotation is None or len(annotation) == 0:
        return _verdict(4, CANNOT_DECIDE, "This run did not compute the annotation table.")
    df = with_source(annotation, manifest)
    if not all(c in df for c in STUDY_COLUMNS):
        own = [c for c in ("hce", "seconds") if c in df]
        if not own:
            return _verdict(4, CANNOT_DECIDE, "The annotation table has neither a human study nor SAM's HCE.")
        tab = uncertainty.mean_with_ci(df, [], own, n_resamples=n_resamples, seed=seed)
        said = []
        if "hce" in tab:
            r = tab.iloc[0]
            said.append(f"SAM's own masks need an HCE of {r['hce']:.2f} per object ({_ci(r['hce_low'], r['hce_high'])})")
        if "seconds" in tab:
            r = tab.iloc[0]
            said.append(f"take {r['seconds']:.2f} s per object ({_ci(r['seconds_low'], r['seconds_high'])})")
        return _verdict(4, CANNOT_DECIDE,
                        "The finding compares doctors annotating with and without SAM; this run has no human "
                        "study, only " + " and ".join(said) + f" over {int(tab.iloc[0]['n'])} objects.", tab)
    long = []
    for quantity in ("hce", "seconds"):
        for arm in ("manual", "assisted"):
            long.append(df[[*_KEY, "source"]].assign(quantity=quantity, arm=arm,
                                                     value=pd.to_numeric(df[f"{quantity}_{arm}"], errors="coerce")))
    long = pd.concat(long, ignore_index=True)
    ev = uncertainty.paired_comparisons(long, "value", "arm", pairs=[("assisted", "manual")], by="quantity",
                                        n_resamples=n_resamples, seed=seed, alpha=alpha)
    ev["reading"] = [_compare_row(r, alpha, 0.0) for r in ev.to_dict("records")]
    readings = dict(zip(ev["quantity"], ev["reading"]))
    if all(v == "less" for v in readings.values()):
        verdict = HOLDS
    elif any(v == "greater" for v in readings.values()):
        verdict = DOES_NOT_HOLD
    else:
        verdict = CANNOT_DECIDE
    parts = [describe_difference(r, f"{r['quantity']} assisted - manual", unit="") + f" '{r['reading']}'"
             for r in ev.to_dict("records")]
    return _verdict(4, verdict, "; ".join(parts) + ".", ev)


def finding5(randomness: pd.DataFrame | None, manifest: pd.DataFrame | None = None,
             strategies: Sequence[str] = ("S2", "S5"), serious: float = SERIOUS_DROP,
             rule: str = "oracle_dice", margin: float = MARGIN, alpha: float = ALPHA,
             n_resamples: int = N_RESAMPLES, seed: int = 0) -> Verdict:
    """Finding 5: sensitive to shifted centre points and boxes, with possibly serious drops.

    Rule (per model): for each object and strategy, the DICE drop at each shift level is the
    unshifted DICE minus the mean DICE over that level's repeats (Table 8). The drops of the
    centre point (S2) and the tight box (S5) at the largest level are read with
    :func:`compare` (paired, Holm over every level and strategy of the call). Holds when both
    are ``"greater"`` than 0 and at least one drop's interval lies at or above ``serious``
    points. Does not hold when either is ``"equivalent"`` or ``"less"`` (insensitive), or when
    both intervals lie below ``serious`` (no serious drop). Otherwise cannot decide.

    Returns
    -------
    Verdict
        Evidence: ``model, strategy, a (0), b (level), ..., mean_diff (the drop), ...``.
    """
    if randomness is None or len(randomness) == 0:
        return _verdict(5, CANNOT_DECIDE, "This run did not compute the prompt-randomness table (Table 8).")
    df = randomness
    if "selection_rule" in df:
        df = df[df["selection_rule"] == rule]
    df = with_source(df, manifest)
    levels = sorted(int(v) for v in df["shift_level"].unique())
    have = set(df.loc[df["shift_level"] > 0, "strategy"])
    missing = [s for s in strategies if s not in have]
    if 0 not in levels or len(levels) < 2 or missing:
        return _verdict(5, CANNOT_DECIDE, "The randomness table lacks the unshifted prompts, a shifted level, "
                                          f"or the strategies {', '.join(missing) or strategies}.")
    df = df[df["strategy"].isin(strategies)]
    agg = (df.groupby(["model", "strategy", *_KEY, "shift_level"], as_index=False, dropna=False)
             .agg(dice=("dice", "mean"), source=("source", "first")))
    top = levels[-1]
    ev = uncertainty.paired_comparisons(agg, "dice", "shift_level", pairs=[(0, lv) for lv in levels[1:]],
                                        by=["model", "strategy"], n_resamples=n_resamples, seed=seed, alpha=alpha)
    ev["reading"] = [_compare_row(r, alpha, margin) for r in ev.to_dict("records")]
    per, reasons = {}, []
    for model, e in ev[ev["b"] == top].groupby("model", sort=True):
        e = e.set_index("strategy")
        if set(strategies) - set(e.index):
            per[model] = CANNOT_DECIDE
            reasons.append(f"{model}: not every strategy was shifted.")
            continue
        readings = e["reading"]
        if readings.isin(["less", "equivalent"]).any() or (e["diff_high"] < serious).all():
            per[model] = DOES_NOT_HOLD
        elif (readings == "greater").all() and (e["diff_low"] >= serious).any():
            per[model] = HOLDS
        else:
            per[model] = CANNOT_DECIDE
        parts = [describe_difference(r, f"{s} drop at level {top}") + f" '{r['reading']}'"
                 for s, r in e.iterrows()]
        reasons.append(f"{model}: " + "; ".join(parts) + ".")
    return _verdict(5, combine(per), " ".join(reasons), ev)


def finding6(interaction: pd.DataFrame | None, manifest: pd.DataFrame | None = None, sam: str = "sam",
             margin: float = MARGIN, alpha: float = ALPHA, n_resamples: int = N_RESAMPLES,
             seed: int = 0) -> Verdict:
    """Finding 6: SAM beats interactive methods with one click and is outpaced with more.

    Rule: the interactive methods are every ``method`` not starting with ``"sam"``; ``sam`` is
    the SAM variant compared (default plain multi-round SAM). Per object, SAM's DICE minus each
    method's at the first and at the last click, Holm over all those differences (per model
    when the table has a ``model`` column). Holds when SAM is ``"greater"`` than every method
    at the first click and ``"less"`` than at least one at the last. Does not hold when SAM is
    ``"less"`` than or ``"equivalent"`` to some method at the first click, or ``"greater"``
    than or ``"equivalent"`` to every method at the last click. Otherwise cannot decide.

    Returns
    -------
    Verdict
        Evidence: ``[model,] click, a (sam), b (method), ..., reading``.
    """
    if interaction is None or len(interaction) == 0:
        return _verdict(6, CANNOT_DECIDE, "This run did not compute the interaction table (Fig. 16).")
    df = with_source(interaction, manifest)
    methods = sorted(df["method"].unique().tolist())
    others = [m for m in methods if not str(m).startswith(sam)]  # SAM and its variants are not "others"
    first, last = int(df["click"].min()), int(df["click"].max())
    if sam not in methods or not others or first == last:
        return _verdict(6, CANNOT_DECIDE, f"The interaction table needs method {sam!r}, at least one "
                                          f"interactive method and more than one click; it has {', '.join(methods)} "
                                          f"at clicks {first}-{last}.")
    df = df[df["click"].isin([first, last])]
    by = ["model", "click"] if "model" in df else ["click"]
    ev = uncertainty.paired_comparisons(df, "dice", "method", pairs=[(sam, o) for o in others], by=by,
                                        n_resamples=n_resamples, seed=seed, alpha=alpha)
    ev["reading"] = [_compare_row(r, alpha, margin) for r in ev.to_dict("records")]
    groups = ev.groupby("model", sort=True) if "model" in ev else [("SAM", ev)]
    per, reasons = {}, []
    for model, e in groups:
        a = e[e["click"] == first]["reading"]
        b = e[e["click"] == last]["reading"]
        if a.isin(["less", "equivalent"]).any() or b.isin(["greater", "equivalent"]).all():
            per[model] = DOES_NOT_HOLD
        elif (a == "greater").all() and (b == "less").any():
            per[model] = HOLDS
        else:
            per[model] = CANNOT_DECIDE
        parts = [describe_difference(r, f"{r['a']} - {r['b']} at click {int(r['click'])}") + f" '{r['reading']}'"
                 for r in e.to_dict("records")]
        reasons.append(f"{model}: " + "; ".join(parts) + ".")
    return _verdict(6, combine(per), " ".join(reasons), ev)


def fisher_ci(r: float, n: int, k: int, ci: float = 95.0) -> tuple[float, float]:
    """Fisher-z interval of a (partial) correlation.

    Parameters
    ----------
    r : coefficient in [-1, 1].
    n : complete rows used.
    k : covariates partialled out (0 for a plain correlation).
    ci : level in percent.

    Returns
    -------
    (low, high) : ``tanh(atanh(r) -+ z / sqrt(n - 3 - k))``; NaN when ``n - 3 - k < 1`` or ``r``
    is NaN; ``(r, r)`` when ``|r| == 1``.
    """

    dof = n - 3 - k
    if not math.isfinite(r) or dof < 1:
        return float("nan"), float("nan")
    if abs(r) >= 1:
        return float(r), float(r)
    z = float(sps.norm.ppf(0.5 + ci / 200.0))
    half = z / math.sqrt(dof)
    zr = math.atanh(r)
    return math.tanh(zr - half), math.tanh(zr + half)


def finding7(table6: pd.DataFrame | None, strategies: Sequence[str] = ("S2", "S3", "S4", "S5", "S6"),
             named: Mapping[str, int] | None = None, weak: float = WEAK_R, alpha: float = TABLE6_ALPHA,
             n_factors: int = 5) -> Verdict:
    """Finding 7: DICE correlates with boundary complexity and intensity difference.

    Rule (per model, on Table 6 of :func:`cosmoslib.analysis.stats.table6`): in each strategy a named
    factor (``named``: factor -> the paper's sign; default :data:`NAMED_FACTORS`)
    ``correlates`` when ``p < alpha`` with the paper's sign, and ``does not`` when its Fisher-z
    95 % interval (:func:`fisher_ci`, with ``n_factors - 1`` covariates minus the dropped ones)
    lies inside ``(-weak, weak)`` or it is significant with the other sign; otherwise it is
    ``unclear``. A factor holds for a model when it correlates in more than half of the
    strategies with a coefficient, and fails when it does not in more than half. The finding
    holds when both factors hold for every model and does not hold when one fails.

    Returns
    -------
    Verdict
        Evidence: the Table 6 rows of the named factors with ``r_low, r_high, expected_sign,
        reading``.
    """
    named = dict(NAMED_FACTORS if named is None else named)
    if table6 is None or len(table6) == 0:
        return _verdict(7, CANNOT_DECIDE, "This run did not compute Table 6 (object factors).")
    t = table6[table6["factor"].isin(named) & table6["strategy"].isin(strategies)].copy()
    t = t[np.isfinite(pd.to_numeric(t["r"], errors="coerce").astype(float))]
    if t.empty:
        return _verdict(7, CANNOT_DECIDE, "Table 6 has no coefficient for the named factors in S2-S6 "
                                          "(too few objects, or a factor constant in the data).")
    lows, highs, readings = [], [], []
    for r in t.to_dict("records"):
        dropped = [c for c in str(r.get("dropped_covariates") or "").split(",") if c]
        lo, hi = fisher_ci(float(r["r"]), int(r["n"]), n_factors - 1 - len(dropped))
        sign = named[r["factor"]]
        significant = float(r["p"]) < alpha
        if significant and np.sign(r["r"]) == sign:
            reading = "correlates"
        elif (significant and np.sign(r["r"]) == -sign) or (lo > -weak and hi < weak):
            reading = "does not"
        else:
            reading = "unclear"
        lows.append(lo); highs.append(hi); readings.append(reading)
    t["r_low"], t["r_high"], t["reading"] = lows, highs, readings
    t["expected_sign"] = t["factor"].map(named)
    per, reasons = {}, []
    for model, m in t.groupby("model", sort=True):
        verdicts, parts = [], []
        for factor in named:
            f = m[m["factor"] == factor]
            k = len(f)
            yes, no = int((f["reading"] == "correlates").sum()), int((f["reading"] == "does not").sum())
            if k and yes > k / 2:
                verdicts.append(HOLDS)
            elif k and no > k / 2:
                verdicts.append(DOES_NOT_HOLD)
            else:
                verdicts.append(CANNOT_DECIDE)
            rs = ", ".join(f"{s} {v:+.2f}" for s, v in zip(f["strategy"], f["r"]))
            parts.append(f"{factor} correlates in {yes} of {k} strategies ({rs or 'no coefficient'})")
        per[model] = combine(dict(enumerate(verdicts)))
        reasons.append(f"{model}: " + "; ".join(parts) + ".")
    return _verdict(7, combine(per), " ".join(reasons), t)


def finding8(results: pd.DataFrame, manifest: pd.DataFrame | None, finetuned: Mapping[str, str] | None,
             strategy: str = "S5", objects: pd.DataFrame | None = None, rule: str = "oracle_dice",
             margin: float = MARGIN, alpha: float = ALPHA, n_resamples: int = N_RESAMPLES,
             seed: int = 0) -> Verdict:
    """Finding 8: finetuning the mask decoder raises mean DICE.

    Rule: for each ``finetuned -> base`` pair whose two models are in the run, the paired
    difference of ``strategy`` DICE (the box prompt the paper finetuned with), ``finetuned -
    base``, over ``objects`` (pass the held-out split: objects the model trained on would
    flatter it), Holm over the pairs. Holds when ``"greater"`` for every pair; does not hold
    when ``"less"`` or ``"equivalent"`` for one. The size of the gain is reported, not tested
    against the paper's +4.39 / +6.68 points.

    Parameters
    ----------
    finetuned : mapping ``{finetuned model: base model}``; None or empty: cannot decide.
    objects : DataFrame with ``task, image_id, label_value``; None: every object of the run.

    Returns
    -------
    Verdict
        Evidence: one paired comparison per pair (``a`` finetuned, ``b`` base).
    """
    present = set(results["model"].unique())
    pairs = [(ft, base) for ft, base in (finetuned or {}).items() if ft in present and base in present]
    if not pairs:
        return _verdict(8, CANNOT_DECIDE, "This run evaluated no finetuned model beside its base model "
                                          f"(models: {', '.join(sorted(present))}).")
    df = with_source(_prompted(results, rule), manifest)
    df = df[df["strategy"] == strategy]
    if objects is not None:
        df = df.merge(objects[_KEY].astype({"label_value": "int64"}).drop_duplicates(), on=_KEY)
    ev = uncertainty.paired_comparisons(df, "dice", "model", pairs=pairs, n_resamples=n_resamples, seed=seed,
                                        alpha=alpha)
    ev["reading"] = [_compare_row(r, alpha, margin) for r in ev.to_dict("records")]
    if (ev["reading"] == "greater").all():
        verdict = HOLDS
    elif ev["reading"].isin(["less", "equivalent"]).any():
        verdict = DOES_NOT_HOLD
    else:
        verdict = CANNOT_DECIDE
    parts = [describe_difference(r) + f" '{r['reading']}'" for r in ev.to_dict("records")]
    return _verdict(8, verdict, f"{strategy} DICE: " + "; ".join(parts) + ".", ev)


# --------------------------------------------------------------------------------------------
# all of them
# --------------------------------------------------------------------------------------------


def _sam_method(interaction: pd.DataFrame | None, results: pd.DataFrame) -> str:
    """The interaction table's name for the SAM-family model: ``"sam"``, or the run's first model
    (the chapter layer names the model's curves after it, e.g. ``"litemedsam"``)."""
    if interaction is None or "sam" in set(interaction["method"]):
        return "sam"
    for name in results["model"].drop_duplicates():
        if name in set(interaction["method"]):
            return str(name)
    return "sam"


def all_findings(results: pd.DataFrame, manifest: pd.DataFrame | None, *, table6: pd.DataFrame | None = None,
                 randomness: pd.DataFrame | None = None, interaction: pd.DataFrame | None = None,
                 annotation: pd.DataFrame | None = None, finetuned: Mapping[str, str] | None = None,
                 finetune_objects: pd.DataFrame | None = None, n_resamples: int = N_RESAMPLES,
                 seed: int = 0) -> list[Verdict]:
    """The eight verdicts, in the paper's order (tables not computed: None).

    Parameters
    ----------
    results : the run's S1-S6 results table.
    manifest : for the ``source`` of every object (the bootstrap's unit).
    table6 : :func:`cosmoslib.analysis.stats.table6` of the run.
    randomness : results with ``shift_level`` 0..3 and ``repeat`` (Table 8).
    interaction : ``task, image_id, label_value, method, click, dice`` (Fig. 16).
    annotation : ``task, image_id, label_value, hce, seconds`` (and, from a human study,
        :data:`STUDY_COLUMNS`).
    finetuned, finetune_objects : see :func:`finding8`.
    n_resamples, seed : of every bootstrap.
    """
    kw = dict(n_resamples=n_resamples, seed=seed)
    return [
        finding1(results, manifest, **kw),
        finding2(results, manifest, **kw),
        finding3(results, manifest, **kw),
        finding4(annotation, manifest, **kw),
        finding5(randomness, manifest, **kw),
        finding6(interaction, manifest, sam=_sam_method(interaction, results), **kw),
        finding7(table6),
        finding8(results, manifest, finetuned, objects=finetune_objects, **kw),
    ]


def verdict_table(verdicts: Sequence[Verdict]) -> pd.DataFrame:
    """One row per finding: ``finding, claim, verdict, reason``."""
    return pd.DataFrame([{"finding": v.number, "claim": v.claim, "verdict": v.verdict, "reason": v.reason}
                         for v in verdicts], columns=["finding", "claim", "verdict", "reason"])


def optional_table(chapter, method: str):
    """``chapter.<method>()`` when the chapter layer has that method, else None.

    The findings chapter reads the tables other chapters compute (``randomness``,
    ``interaction``, ``annotation``, ``factors``) when the installed chapter layer provides them;
    a run without one gets "cannot decide" for the findings that need it.
    """
    fn = getattr(chapter, method, None)
    return fn() if callable(fn) else None


def finetuned_pairs(model_names: Sequence[str]) -> dict[str, str]:
    """``{finetuned model: base model}`` for the run's models whose registry entry names its base.

    A registry entry (:func:`cosmoslib.models.registered_models`) with a non-empty ``base``
    attribute is a finetuned model of that base; both must be among ``model_names``. Entries
    without the attribute (today every built-in one) give an empty mapping.
    """

    registry = models_mod.registered_models()
    names = set(model_names)
    out = {}
    for name in model_names:
        base = getattr(registry.get(name), "base", None)
        if base and base in names:
            out[name] = base
    return out


__all__ = [
    "ALPHA", "CANNOT_DECIDE", "DOES_NOT_HOLD", "FAILING_DICE", "HOLDS", "LARGE_MODEL", "MARGIN",
    "NAMED_FACTORS", "N_RESAMPLES", "PAPER_FINDINGS", "REMARKABLE_DICE", "RULES", "SERIOUS_DROP",
    "SMALL_MODEL", "STUDY_COLUMNS", "VERDICTS", "Verdict", "WEAK_R", "all_findings", "combine", "compare",
    "describe_difference", "finding1", "finding2", "finding3", "finding4", "finding5", "finding6",
    "finding7", "finding8", "finetuned_pairs", "fisher_ci", "format_ci", "optional_table",
    "strategy_comparisons", "strategy_table", "verdict_table", "with_source",
]
