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
  p < 0.05 at all, so such runs never decide a comparison: neither a difference nor (their
  bootstrap interval being too narrow to trust) an equivalence.

A finding about "SAM" is read for every model of the run: it **holds** when it holds for every
model, it **does not hold** when it fails for at least one model, and otherwise the run cannot
decide (:func:`combine`). The individual rules are in each function's docstring and in
:data:`RULES`. Intervals are shown in the book's one vocabulary
(:func:`cosmoslib.analysis.uncertainty.format_interval`, :func:`format_ci`; one independent unit
gives ``"n=1, no interval"``) with the book's one resample count
(:data:`cosmoslib.analysis.uncertainty.N_RESAMPLES_TABLES`).

Where the tables come from
--------------------------
Finding 8 is judged on the finetuned models' results on the held-out test part only
(:func:`all_findings`'s ``finetuned_results``). The chapter's tables are read with
:func:`chapter_table`, which fails loudly (:class:`MissingTable`) when the chapter layer has no
such table, instead of turning a finding silently into "cannot decide".

The book's own question
-----------------------
:func:`general_vs_medical` compares the run's general-purpose and medical models (natures from
the model registry) with the same paired rule, per strategy and per object-modality. It is the
book's question, not one of the paper's eight, and is labelled so (:data:`OWN_QUESTION_LABEL`);
it answers :data:`NOT_APPLICABLE` with a sentence when the run lacks one of the two natures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from cosmoslib import models as models_mod
from cosmoslib.analysis import summaries, uncertainty
from cosmoslib.analysis.uncertainty import CI, N_RESAMPLES_TABLES, with_source
from cosmoslib.strategies import STRATEGY_PROMPTS

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
#: Bootstrap resamples of every interval here: the book's one count for means and paired
#: differences, :data:`cosmoslib.analysis.uncertainty.N_RESAMPLES_TABLES` (this name is the same
#: number, kept for the chapters that read it from this module).
N_RESAMPLES = N_RESAMPLES_TABLES

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
    8: ("Per finetuned model and its base, paired difference of S5 DICE (finetuned - base) on the held-out "
        "test part of the finetuning split only (objects whose source volumes were never used for training "
        "or validation), Holm over the pairs. Holds when 'greater' for every pair; does not hold when 'less' "
        "or 'equivalent' for one. The paper's +4.39 / +6.68 points are quoted, not required."),
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
            margin: float = MARGIN, n_units: int | None = None) -> str:
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
    n_units : int, optional
        Independent units behind the difference. With so few that no two-sided Wilcoxon test
        can reach ``alpha`` (:func:`cosmoslib.analysis.uncertainty.smallest_wilcoxon_p`: five
        or fewer at 0.05) nothing is decided, an equivalence no more than a difference: a
        bootstrap interval over so few units is too narrow to bound a difference. None: not
        checked (the caller's responsibility).

    Returns
    -------
    str
        ``"greater"`` (low > 0 and p_holm < alpha), ``"less"`` (high < 0 and p_holm < alpha),
        ``"equivalent"`` (-margin < low and high < margin), else ``"unclear"`` (also for NaN
        bounds and too few units).
    """
    if not (math.isfinite(low) and math.isfinite(high)):
        return "unclear"
    if n_units is not None and (int(n_units) < 1 or uncertainty.smallest_wilcoxon_p(int(n_units)) >= alpha):
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


def _ci(low: float, high: float, n_units: int) -> str:
    return uncertainty.interval_phrase(low, high, n_units)


def _p(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "no test"
    return f"Holm p = {p:.2g}" if p >= 0.001 else "Holm p < 0.001"


def describe_difference(row: Mapping, label: str | None = None, unit: str = "points") -> str:
    """One paired-comparison row in words: ``"S5 - S1 = +42.0 points (95 % CI ..., Holm p = ...;
    12 units)"``."""
    label = label or f"{row['a']} - {row['b']}"
    value = f"{_pp(float(row['mean_diff']))} {unit}".strip()
    n = int(row["n_clusters"])
    return (f"{label} = {value} ({_ci(float(row['diff_low']), float(row['diff_high']), n)}, "
            f"{_p(float(row['p_holm']))}; {n} {'unit' if n == 1 else 'units'})")


def _compare_row(row: Mapping, alpha: float, margin: float) -> str:
    return compare(float(row["diff_low"]), float(row["diff_high"]), float(row["p_holm"]), alpha, margin,
                   n_units=int(row["n_clusters"]))


def why_unclear(row: Mapping, alpha: float = ALPHA, margin: float = MARGIN) -> str:
    """Why a paired comparison reads ``"unclear"``, in words (never an empty reason).

    Parameters
    ----------
    row : one row of :func:`cosmoslib.analysis.uncertainty.paired_comparisons`.
    alpha, margin : as for :func:`compare`.

    Returns
    -------
    str
        In this order: no object measured under both; a single independent unit (no interval,
        no test); too few units for the Wilcoxon test to reach ``alpha`` at all
        (:func:`cosmoslib.analysis.uncertainty.smallest_wilcoxon_p`), which no amount of
        difference can overcome; else the interval is too wide or the Holm-adjusted test not
        significant, with the numbers.
    """
    n = int(row["n_clusters"])
    if int(row["n_objects"]) == 0:
        return "no object was measured under both"
    if n < 2:
        return f"{n} independent unit: no interval and no test"
    floor = uncertainty.smallest_wilcoxon_p(n)
    if floor >= alpha:  # the rule of compare(): too few units decide nothing
        return (f"with {n} independent units no two-sided Wilcoxon test can reach p < {alpha:g} (the smallest "
                f"possible p is {floor:.3g}), so the run decides neither a difference, however large, nor an "
                f"equivalence")
    return (f"the interval ({_ci(float(row['diff_low']), float(row['diff_high']), n)}) and the test "
            f"({_p(float(row['p_holm']))}) neither show a difference (interval clear of 0 and Holm p < {alpha:g}) "
            f"nor bound it within +-{margin:g}")


# --------------------------------------------------------------------------------------------
# intervals on the main table (Fig. 6 / Table 2 style)
# --------------------------------------------------------------------------------------------


def strategy_table(results: pd.DataFrame, manifest: pd.DataFrame | None, rule: str = "oracle_dice",
                   values: Sequence[str] = ("dice", "hd"), ci: float = CI,
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
                         ci: float = CI, n_resamples: int = N_RESAMPLES, seed: int = 0,
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


def format_ci(table: pd.DataFrame, value: str, digits: int = 1, units: str = "n_clusters") -> pd.Series:
    """Display cells of a wide interval table (``<value>, <value>_low, <value>_high``).

    Each cell is :func:`cosmoslib.analysis.uncertainty.format_interval` (the book's one
    formatter): ``"55.6 [50.1, 60.2]"``, ``"3.0 (n=1, no interval)"`` for a single independent
    unit, ``"3.0 (no interval)"`` for missing bounds, ``""`` for no mean.

    Parameters
    ----------
    table : DataFrame with the three value columns and ``units``.
    value : the value's column name.
    digits : decimals.
    units : column with the independent units behind each row (:func:`strategy_table`'s and
        :func:`cosmoslib.analysis.uncertainty.mean_with_ci`'s ``n_clusters``).

    Raises
    ------
    KeyError
        ``units`` is not a column: without it the n = 1 rule cannot be applied.
    """
    if units not in table:
        raise KeyError(f"format_ci needs the column {units!r} (independent units per row) to apply the n = 1 rule")
    return pd.Series([uncertainty.format_interval(m, lo, hi, k, digits) for m, lo, hi, k in
                      zip(table[value], table[f"{value}_low"], table[f"{value}_high"], table[units])],
                     index=table.index, dtype=object)


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
                f"{worst['dice']:.1f} % ({_ci(worst['dice_low'], worst['dice_high'], worst['n_clusters'])}) to "
                f"{best['object']}-{best['modality']} {best['dice']:.1f} % "
                f"({_ci(best['dice_low'], best['dice_high'], best['n_clusters'])})")
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
            said.append(f"SAM's own masks need an HCE of {r['hce']:.2f} per object "
                        f"({_ci(r['hce_low'], r['hce_high'], r['n_clusters'])})")
        if "seconds" in tab:
            r = tab.iloc[0]
            said.append(f"take {r['seconds']:.2f} s per object "
                        f"({_ci(r['seconds_low'], r['seconds_high'], r['n_clusters'])})")
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


def finding6(interaction: pd.DataFrame | None, manifest: pd.DataFrame | None = None,
             sam: str | Sequence[str] = "sam", margin: float = MARGIN, alpha: float = ALPHA,
             n_resamples: int = N_RESAMPLES, seed: int = 0) -> Verdict:
    """Finding 6: SAM beats interactive methods with one click and is outpaced with more.

    Rule: ``sam`` names the SAM-family method(s) compared (default plain multi-round SAM; the
    chapter layer names each model's curves after the model, so a run of two models passes
    both names); the interactive methods are every ``method`` that starts with none of them
    (a SAM with its previous logits is a SAM variant, not an "other" method). Per object, each
    SAM's DICE minus each interactive method's at the first and at the last click, Holm over
    all those differences (per model when the table has a ``model`` column). A SAM shows the
    finding when it is ``"greater"`` than every method at the first click and ``"less"`` than
    at least one at the last; it contradicts it when it is ``"less"`` than or ``"equivalent"``
    to some method at the first click, or ``"greater"`` than or ``"equivalent"`` to every
    method at the last click. The finding holds when it holds for every SAM (:func:`combine`).

    Returns
    -------
    Verdict
        Evidence: ``[model,] click, a (sam), b (method), ..., reading``.
    """
    if interaction is None or len(interaction) == 0:
        return _verdict(6, CANNOT_DECIDE, "This run did not compute the interaction table (Fig. 16).")
    sams = [sam] if isinstance(sam, str) else list(sam)
    df = with_source(interaction, manifest)
    methods = sorted(df["method"].unique().tolist())
    # SAM and its variants are not "others"
    others = [m for m in methods if not any(str(m).startswith(name) for name in sams)]
    first, last = int(df["click"].min()), int(df["click"].max())
    present = [name for name in sams if name in methods]
    if not present or not others or first == last:
        return _verdict(6, CANNOT_DECIDE, f"The interaction table needs method {' or '.join(map(repr, sams))}, at "
                                          f"least one interactive method and more than one click; it has "
                                          f"{', '.join(methods)} at clicks {first}-{last}.")
    df = df[df["click"].isin([first, last])]
    by = ["model", "click"] if "model" in df else ["click"]
    ev = uncertainty.paired_comparisons(df, "dice", "method", pairs=[(s, o) for s in present for o in others],
                                        by=by, n_resamples=n_resamples, seed=seed, alpha=alpha)
    ev = ev[ev["n_objects"] > 0].reset_index(drop=True)  # a model's table holds only its own SAM
    if ev.empty:
        return _verdict(6, CANNOT_DECIDE, "No object was measured by a SAM and an interactive method alike.")
    ev["reading"] = [_compare_row(r, alpha, margin) for r in ev.to_dict("records")]
    keys = ["model", "a"] if "model" in ev else ["a"]
    per, reasons = {}, []
    for key, e in ev.groupby(keys, sort=True):
        name = " / ".join(map(str, key)) if isinstance(key, tuple) else str(key)
        a = e[e["click"] == first]["reading"]
        b = e[e["click"] == last]["reading"]
        if a.isin(["less", "equivalent"]).any() or b.isin(["greater", "equivalent"]).all():
            per[name] = DOES_NOT_HOLD
        elif (a == "greater").all() and (b == "less").any():
            per[name] = HOLDS
        else:
            per[name] = CANNOT_DECIDE
        parts = [describe_difference(r, f"{r['a']} - {r['b']} at click {int(r['click'])}") + f" '{r['reading']}'"
                 for r in e.to_dict("records")]
        reasons.append(f"{name}: " + "; ".join(parts) + ".")
    return _verdict(6, combine(per), " ".join(reasons), ev)


def fisher_ci(r: float, n: int, k: int, ci: float = CI) -> tuple[float, float]:
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
             seed: int = 0, scope: str = "the objects given") -> Verdict:
    """Finding 8: finetuning the mask decoder raises mean DICE.

    Rule: for each ``finetuned -> base`` pair whose two models are in the run, the paired
    difference of ``strategy`` DICE (the box prompt the paper finetuned with), ``finetuned -
    base``, over ``objects`` (pass the held-out split: objects the model trained on would
    flatter it), Holm over the pairs. Holds when ``"greater"`` for every pair; does not hold
    when ``"less"`` or ``"equivalent"`` for one. The size of the gain is reported, not tested
    against the paper's +4.39 / +6.68 points.

    Parameters
    ----------
    results : results table holding the finetuned models and their bases (e.g. a chapter's
        finetuned results on the test part, see :func:`finetuned_of`).
    finetuned : mapping ``{finetuned model: base model}``; None or empty: cannot decide.
    objects : DataFrame with ``task, image_id, label_value``; None: every object of ``results``.
    scope : what the objects are, in words, for the reason (e.g. ``"the test part"``).

    Returns
    -------
    Verdict
        Evidence: one paired comparison per pair (``a`` finetuned, ``b`` base). When no pair
        is decided, the reason says why (e.g. too few independent units for the test).
    """
    present = set(results["model"].unique()) if "model" in results else set()
    pairs = [(ft, base) for ft, base in (finetuned or {}).items() if ft in present and base in present]
    if not pairs:
        return _verdict(8, CANNOT_DECIDE, "This run evaluated no finetuned model beside its base model "
                                          f"(models: {', '.join(sorted(present)) or 'none'}).")
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
    parts = []
    for r in ev.to_dict("records"):
        part = describe_difference(r) + f" '{r['reading']}'"
        if r["reading"] == "unclear":
            part += f" ({why_unclear(r, alpha, margin)})"
        parts.append(part)
    return _verdict(8, verdict, f"{strategy} DICE on {scope}: " + "; ".join(parts) + ".", ev)


def finetuned_of(finetuned_results: pd.DataFrame) -> dict[str, str]:
    """``{finetuned model: base model}`` read from a finetuned-results table.

    Parameters
    ----------
    finetuned_results : results with ``model``, ``base`` and ``curriculum`` columns, as the
        chapter layer's ``finetuned_results()`` returns them (``curriculum`` is ``"none"`` on
        the base models' rows).

    Returns
    -------
    dict
        One entry per model whose ``curriculum`` is not ``"none"``; empty for an empty table.

    Raises
    ------
    KeyError
        A non-empty table without ``base`` or ``curriculum``: which model is finetuned from
        which cannot be guessed.
    """
    if finetuned_results is None or len(finetuned_results) == 0:
        return {}
    missing = [c for c in ("model", "base", "curriculum") if c not in finetuned_results]
    if missing:
        raise KeyError(f"a finetuned-results table needs the columns {missing}")
    rows = finetuned_results[finetuned_results["curriculum"].astype(str) != "none"]
    pairs = rows[["model", "base"]].drop_duplicates()
    return {str(m): str(b) for m, b in pairs.itertuples(index=False)}


# --------------------------------------------------------------------------------------------
# the book's own question: a general SAM beside a medical model
# --------------------------------------------------------------------------------------------

#: The book's own question, asked wherever a run has a general-purpose and a medical model: the
#: paper asks how a general SAM does on medical images; a medical model beside it says what
#: medical training changes. Not one of the paper's eight findings.
GENERAL_VS_MEDICAL = ("Does a model trained on medical images segment these objects better than a "
                      "general-purpose SAM, under the prompts both models were trained with?")
#: How the question is labelled wherever it is shown.
OWN_QUESTION_LABEL = "The book's own question (not one of the paper's eight findings)"
#: Its answers: the three readings of the paired difference medical - general, and the two
#: that say the run cannot give one.
MEDICAL_BETTER = "the medical model is better"
GENERAL_BETTER = "the general model is better"
NO_DIFFERENCE = "no difference worth a DICE point"
NOT_APPLICABLE = "not applicable"
ANSWERS = (MEDICAL_BETTER, GENERAL_BETTER, NO_DIFFERENCE, CANNOT_DECIDE, NOT_APPLICABLE)
#: The answer each reading of ``medical - general`` (:func:`compare`) gives.
DIRECTION = {"greater": MEDICAL_BETTER, "less": GENERAL_BETTER, "equivalent": NO_DIFFERENCE,
             "unclear": CANNOT_DECIDE}

GENERAL_VS_MEDICAL_RULE = (
    f"Each model's nature (general or medical) is read from the model registry; finetuned models and models "
    f"of unstated nature are left out. For every (medical, general) pair: per object the paired difference "
    f"medical - general of DICE (oracle rule, unshifted prompts), with its cluster bootstrap 95 % CI over "
    f"source volumes and a Wilcoxon test on the per-unit differences, read like every finding (greater: CI "
    f"above 0 and Holm p < {ALPHA:g}; less: below 0 likewise; equivalent: CI within +-{MARGIN:g} point). "
    f"The answer reads the per-object mean over the strategies whose prompts both models were trained with "
    f"(registry trained_prompts; S1-S4 give points, S5 a box, S6 a box and a point), so that neither model "
    f"is judged on a prompt it never learnt; Holm over the pairs. 'The medical model is better' when greater "
    f"for every pair, 'the general model is better' when less for every pair, 'no difference' when "
    f"equivalent for every pair; otherwise the run cannot decide, and the reason says why (e.g. too few "
    f"independent units for any test to reach {ALPHA:g}). Every strategy (Holm over pairs x strategies) and "
    f"every object-modality x strategy (Holm over those cells) is shown with its own reading. Not applicable "
    f"when the run has no general or no medical model.")

#: Columns of the general-vs-medical evidence (:attr:`Answer.evidence`).
COMPARISON_COLUMNS = ["part", "strategy", "medical", "general", "in_answer", "n_objects", "n_clusters",
                      "medical_dice", "general_dice", "mean_diff", "diff_low", "diff_high", "statistic", "p",
                      "p_holm", "significant", "reading", "answer"]
#: Columns of the per-object-modality table (:attr:`Answer.by_object`).
OBJECT_COMPARISON_COLUMNS = ["strategy", "object_modality", *COMPARISON_COLUMNS[2:]]


@dataclass(frozen=True)
class Answer:
    """The run's answer to one of the book's own questions (not a paper finding).

    Attributes
    ----------
    question : str
        The question (:data:`GENERAL_VS_MEDICAL`).
    answer : str
        One of :data:`ANSWERS`.
    reason : str
        Why, with the numbers (DICE points, 95 % intervals, Holm p, independent units), or why
        the run cannot answer.
    rule : str
        The decision rule in words.
    evidence : DataFrame
        :data:`COMPARISON_COLUMNS`: the rows the answer was read from (``part == "answer"``)
        and one row per pair and strategy (``part == "strategy"``; ``in_answer`` marks the
        strategies the answer reads). Empty (with these columns) when not applicable.
    by_object : DataFrame
        :data:`OBJECT_COMPARISON_COLUMNS`: one row per pair, strategy and object-modality.
    label : str
        :data:`OWN_QUESTION_LABEL`.
    """

    question: str
    answer: str
    reason: str
    rule: str
    evidence: pd.DataFrame = field(default_factory=pd.DataFrame, compare=False, repr=False)
    by_object: pd.DataFrame = field(default_factory=pd.DataFrame, compare=False, repr=False)
    label: str = OWN_QUESTION_LABEL

    def __post_init__(self):
        if self.answer not in ANSWERS:
            raise ValueError(f"answer must be one of {ANSWERS}, got {self.answer!r}")


def model_natures(names: Sequence[str]) -> dict[str, str]:
    """Each model's nature from the registry: ``"general"``, ``"medical"``, ``"unknown"``, or
    ``"finetuned"`` for an entry finetuned from a base model (registered with ``base``), and
    ``"unregistered"`` for a name the registry does not know."""
    registry = models_mod.registered_models()
    out = {}
    for name in names:
        entry = registry.get(name)
        if entry is None:
            out[name] = "unregistered"
        elif getattr(entry, "base", None):
            out[name] = "finetuned"
        else:
            out[name] = str(entry.nature)
    return out


def _answer_strategies(medical: str, general: str, present: Sequence[str]) -> list[str]:
    """The strategies of ``present`` whose every prompt kind both models were trained with."""
    registry = models_mod.registered_models()
    both = set(registry[medical].trained_prompts) & set(registry[general].trained_prompts)
    return [s for s in present if s in STRATEGY_PROMPTS and set(STRATEGY_PROMPTS[s]) <= both]


def _as_comparison(ev: pd.DataFrame, alpha: float, margin: float) -> pd.DataFrame:
    ev = ev.rename(columns={"a": "medical", "b": "general", "mean_a": "medical_dice", "mean_b": "general_dice"})
    ev["reading"] = [_compare_row(r, alpha, margin) for r in ev.to_dict("records")]
    ev["answer"] = ev["reading"].map(DIRECTION)
    return ev


def general_vs_medical(results: pd.DataFrame, manifest: pd.DataFrame | None, *,
                       strategies: Sequence[str] | None = None, unavailable: Sequence[str] = (),
                       rule: str = "oracle_dice", margin: float = MARGIN, alpha: float = ALPHA,
                       n_resamples: int = N_RESAMPLES, seed: int = 0) -> Answer:
    """The book's own question: is the run's medical model better than its general SAM?

    Not one of the paper's eight findings (:data:`OWN_QUESTION_LABEL`). Uses the same paired
    rule and intervals as they do (:func:`cosmoslib.analysis.uncertainty.paired_comparisons`,
    :func:`compare`); the rule in words is :data:`GENERAL_VS_MEDICAL_RULE`.

    Parameters
    ----------
    results : the run's S1-S6 results table (unshifted rows of selection rule ``rule`` are used).
    manifest : for the ``source`` of every object (the bootstrap's unit); None when
        ``results`` has it.
    strategies : the strategies the answer reads (a named variant, e.g. every strategy); default
        None: for each pair, those whose prompt kinds both models were trained with
        (:data:`STRATEGY_PROMPTS` against the registry's ``trained_prompts``), so that neither
        model is judged on a prompt it never learnt. Every strategy is in the evidence anyway.
    unavailable : models the run wanted but could not run (named in a "not applicable" reason).
    rule, margin, alpha, n_resamples, seed : as for the findings.

    Returns
    -------
    Answer
        ``answer`` is :data:`NOT_APPLICABLE` (with a sentence naming the missing nature) when
        the run has no general or no medical model.
    """
    df = with_source(_prompted(results, rule), manifest)
    names = [str(m) for m in df["model"].drop_duplicates()]
    nature = model_natures(names)
    medical = sorted(n for n in names if nature[n] == "medical")
    general = sorted(n for n in names if nature[n] == "general")
    empty = pd.DataFrame(columns=COMPARISON_COLUMNS)
    if not medical or not general:
        lacking = " and no ".join(w for w, group in (("general", general), ("medical", medical)) if not group)
        said = ", ".join(f"{n} ({nature[n]})" for n in names) or "none"
        reason = f"Not applicable: this run has no {lacking} model (its models: {said})."
        if unavailable:
            wanted = model_natures(list(unavailable))
            reason += (" The config also asked for " + ", ".join(f"{n} ({wanted[n]})" for n in unavailable)
                       + ", which could not run here.")
        reason += " The comparison needs a general-purpose SAM and a medical model in one run."
        by_object = pd.DataFrame(columns=OBJECT_COMPARISON_COLUMNS)
        return Answer(GENERAL_VS_MEDICAL, NOT_APPLICABLE, reason, GENERAL_VS_MEDICAL_RULE, empty, by_object)
    left_out = [n for n in names if n not in medical + general]
    pairs = [(m, g) for m in medical for g in general]
    df = df[df["model"].isin(medical + general)]
    kw = dict(n_resamples=n_resamples, seed=seed, alpha=alpha)

    # the answer: per pair, the per-object mean over the strategies both models were trained for
    overall, chosen, reasons = [], {}, []
    for m, g in pairs:
        ran = sorted(set(df.loc[df["model"] == m, "strategy"]) & set(df.loc[df["model"] == g, "strategy"]))
        use = _answer_strategies(m, g, ran) if strategies is None else [s for s in strategies if s in ran]
        chosen[(m, g)] = use
        if not use:
            reasons.append(f"{m} and {g} share no strategy " + ("whose prompts both were trained with" if strategies
                                                               is None else f"among {', '.join(strategies)}")
                           + f" (they ran {', '.join(ran) or 'none'}).")
            continue
        part = df[df["model"].isin([m, g]) & df["strategy"].isin(use)]
        wide = part.pivot_table(index=[*_KEY, "model"], columns="strategy", values="dice", aggfunc="mean").dropna()
        mean = wide.mean(axis=1).rename("dice").reset_index()
        mean = with_source(mean.assign(strategy="+".join(use)), part[[*_KEY, "source"]].drop_duplicates(_KEY))
        overall.append(uncertainty.paired_comparisons(mean, "dice", "model", pairs=[(m, g)], by="strategy", **kw))
    if overall:
        answer_rows = pd.concat(overall, ignore_index=True)
        answer_rows["p_holm"] = uncertainty.holm(answer_rows["p"].to_numpy(dtype=float))  # one family: the pairs
        answer_rows["significant"] = (answer_rows["p_holm"] < alpha).astype(bool)
        answer_rows = _as_comparison(answer_rows, alpha, margin).assign(part="answer", in_answer=True)
    else:
        answer_rows = empty.copy()

    # every strategy, and every object-modality within it
    per_strategy = uncertainty.paired_comparisons(df, "dice", "model", pairs=pairs, by="strategy", **kw)
    per_strategy = per_strategy[per_strategy["n_objects"] > 0]
    per_strategy = _as_comparison(per_strategy, alpha, margin).assign(part="strategy")
    per_strategy["in_answer"] = [s in chosen[(m, g)] for s, m, g in
                                 zip(per_strategy["strategy"], per_strategy["medical"], per_strategy["general"])]
    by_object = uncertainty.paired_comparisons(df.assign(object_modality=summaries.object_modality(df)), "dice",
                                               "model", pairs=pairs, by=["strategy", "object_modality"], **kw)
    by_object = by_object[by_object["n_objects"] > 0]
    by_object = _as_comparison(by_object, alpha, margin).assign(in_answer=lambda t: [
        s in chosen[(m, g)] for s, m, g in zip(t["strategy"], t["medical"], t["general"])])
    frames = [f for f in (answer_rows, per_strategy) if len(f)]
    evidence = pd.concat(frames, ignore_index=True)[COMPARISON_COLUMNS] if frames else empty

    answers = []
    for r in answer_rows.to_dict("records"):
        answers.append(r["answer"])
        over = r["strategy"].replace("+", ", ")
        text = (f"{r['medical']} (medical) - {r['general']} (general), mean DICE over {over}"
                + (" (the prompts both were trained with)" if strategies is None else "") + ": "
                + describe_difference(r, "difference") + f", read as '{r['reading']}'")
        if r["reading"] == "unclear":
            text += f": {why_unclear(r, alpha, margin)}"
        reasons.append(text + ".")
    if len(answers) == len(pairs) and len(set(answers)) == 1:
        verdict = answers[0]
    else:
        verdict = CANNOT_DECIDE
        if len(set(answers)) > 1:
            reasons.append("The pairs disagree.")
    if len(per_strategy):
        short = {"greater": "medical better", "less": "general better", "equivalent": "no difference",
                 "unclear": "undecided"}
        several = len(pairs) > 1
        items = [(f"{r['medical']} vs {r['general']} " if several else "") + f"{r['strategy']} {short[r['reading']]} "
                 f"({_pp(float(r['mean_diff']))} points, {int(r['n_clusters'])} units)"
                 for r in per_strategy.to_dict("records")]
        reasons.append("Per strategy (medical - general): " + "; ".join(items) + ".")
    if left_out:
        reasons.append("Left out: " + ", ".join(f"{n} ({nature[n]})" for n in left_out) + ".")
    return Answer(GENERAL_VS_MEDICAL, verdict, " ".join(reasons), GENERAL_VS_MEDICAL_RULE, evidence,
                  by_object[OBJECT_COMPARISON_COLUMNS].reset_index(drop=True))


def comparison_cells(table: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """A general-vs-medical table for display: the difference as one interval cell.

    Parameters
    ----------
    table : :attr:`Answer.evidence` or :attr:`Answer.by_object`.
    digits : decimals.

    Returns
    -------
    DataFrame of the identifying columns (``part``, ``strategy``, ``object_modality``,
    ``medical``, ``general`` where present), ``medical DICE``, ``general DICE``, ``medical -
    general`` (:func:`cosmoslib.analysis.uncertainty.format_interval`: mean [95 % CI], or the
    n = 1 text), ``units``, ``Holm p`` and ``answer``.
    """
    ids = [c for c in ("part", "strategy", "object_modality", "medical", "general") if c in table]
    out = table[ids].copy()
    out["medical DICE"] = [f"{v:.{digits}f}" if math.isfinite(v) else "" for v in table["medical_dice"].astype(float)]
    out["general DICE"] = [f"{v:.{digits}f}" if math.isfinite(v) else "" for v in table["general_dice"].astype(float)]
    out["medical - general"] = [uncertainty.format_interval(d, lo, hi, k, digits) for d, lo, hi, k in
                                zip(table["mean_diff"], table["diff_low"], table["diff_high"], table["n_clusters"])]
    out["units"] = table["n_clusters"].astype("int64")
    out["Holm p"] = [_p(float(p)).replace("Holm p = ", "").replace("Holm p ", "") for p in table["p_holm"]]
    out["answer"] = table["answer"]
    return out.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# all of them
# --------------------------------------------------------------------------------------------


def _sam_methods(interaction: pd.DataFrame | None, results: pd.DataFrame) -> list[str]:
    """The interaction table's names for the SAM-family models: ``["sam"]``, or the run's models
    that have curves (the chapter layer names each model's curves after it, e.g.
    ``"litemedsam"``, ``"mobilesam"``)."""
    if interaction is None or "sam" in set(interaction["method"]):
        return ["sam"]
    methods = set(interaction["method"])
    names = [str(m) for m in results["model"].drop_duplicates() if m in methods]
    return names or ["sam"]


def all_findings(results: pd.DataFrame, manifest: pd.DataFrame | None, *, table6: pd.DataFrame | None = None,
                 randomness: pd.DataFrame | None = None, interaction: pd.DataFrame | None = None,
                 annotation: pd.DataFrame | None = None, finetuned_results: pd.DataFrame | None = None,
                 n_resamples: int = N_RESAMPLES, seed: int = 0) -> list[Verdict]:
    """The eight verdicts, in the paper's order (tables not computed: None, and the verdict says so).

    Parameters
    ----------
    results : the run's S1-S6 results table.
    manifest : for the ``source`` of every object (the bootstrap's unit).
    table6 : :func:`cosmoslib.analysis.stats.table6` of the run.
    randomness : results with ``shift_level`` 0..3 and ``repeat`` (Table 8).
    interaction : ``task, image_id, label_value, method, click, dice`` (Fig. 16).
    annotation : ``task, image_id, label_value, hce, seconds`` (and, from a human study,
        :data:`STUDY_COLUMNS`).
    finetuned_results : the base models' and their finetuned models' results on the **test
        part** of the finetuning split only, with ``base`` and ``curriculum`` columns (the
        chapter layer's ``finetuned_results()``); finding 8 is judged on it
        (:func:`finding8`, pairs from :func:`finetuned_of`). None or empty: no finetuned model
        ran, and finding 8 cannot be decided.
    n_resamples, seed : of every bootstrap.
    """
    kw = dict(n_resamples=n_resamples, seed=seed)
    tuned = finetuned_results if finetuned_results is not None and len(finetuned_results) else None
    return [
        finding1(results, manifest, **kw),
        finding2(results, manifest, **kw),
        finding3(results, manifest, **kw),
        finding4(annotation, manifest, **kw),
        finding5(randomness, manifest, **kw),
        finding6(interaction, manifest, sam=_sam_methods(interaction, results), **kw),
        finding7(table6),
        finding8(results if tuned is None else tuned, manifest, finetuned_of(tuned), scope="the test part", **kw),
    ]


def verdict_table(verdicts: Sequence[Verdict]) -> pd.DataFrame:
    """One row per finding: ``finding, claim, verdict, reason``."""
    return pd.DataFrame([{"finding": v.number, "claim": v.claim, "verdict": v.verdict, "reason": v.reason}
                         for v in verdicts], columns=["finding", "claim", "verdict", "reason"])


#: The tables the findings chapter reads from the chapter layer, and the finding each decides.
CHAPTER_TABLES = {"annotation": 4, "randomness": 5, "interaction": 6, "finetuned_results": 8}


class MissingTable(LookupError):
    """The chapter layer provides no table of a name the findings read: an error, never a
    silent None (which would quietly turn a finding into "cannot decide")."""


def chapter_table(chapter, name: str) -> pd.DataFrame:
    """The table ``name`` of the chapter layer, for a finding.

    Parameters
    ----------
    chapter : the chapter object a notebook opened (duck-typed: this layer does not import the
        book layer). A chapter with a ``table(name)`` method (one registry of named tables) is
        asked through it; otherwise through its method ``name()``.
    name : one of :data:`CHAPTER_TABLES`.

    Returns
    -------
    DataFrame
        The table (it may be empty: e.g. no finetuned model in the config, which the finding
        then states).

    Raises
    ------
    ValueError
        ``name`` is not a table the findings read (a typo fails here, not as a missing verdict).
    MissingTable
        The chapter layer has no such table: the chapter must compute it, or the notebook must
        say that the finding is not judged.
    TypeError
        The chapter returned something other than a DataFrame (None included).
    """
    if name not in CHAPTER_TABLES:
        raise ValueError(f"the findings read no table {name!r}; they read {', '.join(sorted(CHAPTER_TABLES))}")
    named = getattr(chapter, "table", None)
    if callable(named):
        out = named(name)
    else:
        method = getattr(chapter, name, None)
        if not callable(method):
            raise MissingTable(f"the chapter layer ({type(chapter).__name__}) computes no {name!r} table, which "
                               f"finding {CHAPTER_TABLES[name]} needs")
        out = method()
    if not isinstance(out, pd.DataFrame):
        raise TypeError(f"the chapter's {name!r} table is a {type(out).__name__}, not a DataFrame")
    return out


__all__ = [
    "ALPHA", "ANSWERS", "Answer", "CANNOT_DECIDE", "CHAPTER_TABLES", "COMPARISON_COLUMNS", "DIRECTION",
    "DOES_NOT_HOLD", "FAILING_DICE", "GENERAL_BETTER", "GENERAL_VS_MEDICAL", "GENERAL_VS_MEDICAL_RULE", "HOLDS",
    "LARGE_MODEL", "MARGIN", "MEDICAL_BETTER", "MissingTable", "NAMED_FACTORS", "NOT_APPLICABLE", "NO_DIFFERENCE",
    "N_RESAMPLES", "OBJECT_COMPARISON_COLUMNS", "OWN_QUESTION_LABEL", "PAPER_FINDINGS", "REMARKABLE_DICE",
    "RULES", "SERIOUS_DROP",
    "SMALL_MODEL", "STRATEGY_PROMPTS", "STUDY_COLUMNS", "VERDICTS", "Verdict", "WEAK_R", "all_findings",
    "chapter_table", "combine", "compare", "comparison_cells", "describe_difference", "finding1", "finding2",
    "finding3", "finding4", "finding5", "finding6", "finding7", "finding8", "finetuned_of", "fisher_ci",
    "format_ci", "general_vs_medical", "model_natures", "strategy_comparisons", "strategy_table",
    "verdict_table", "why_unclear", "with_source",
]
