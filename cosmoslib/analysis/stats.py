"""Statistics of section 4.8: Spearman partial correlation (Table 6).

Table 6 of the paper correlates each of five object factors (size, intensity difference,
Fourier order, modality, aspect ratio; see :mod:`cosmoslib.analysis.factors`) with SAM's DICE, for
each model and strategy, *controlling for the other four*: Spearman's rank partial
correlation, i.e. Pearson's correlation between the ranks of the factor and of DICE after
the ranks of the four covariates are regressed out. Values with ``p < 0.001`` are "bold" in
the paper; here they are ``significant``.

A covariate that is constant in the data at hand (all objects of one modality) is left out of
that test and named; a NaN coefficient always comes with a ``note`` saying why. These checks
are made here, not left to pingouin, whose handling changed between versions (0.7 returns NaN
for a constant column and refuses a covariate equal to x; 0.5 returns a number for both).
Tested with pingouin 0.5.4, 0.5.5, 0.6.0 and 0.7.0 (``pingouin>=0.5.4,<0.8``).

* :func:`partial_spearman` -- one coefficient, via :func:`pingouin.partial_corr`;
* :func:`table6` -- the long-format Table 6 from a results and a factors table.

Intervals (cluster bootstrap over source volumes, for every table cell and Table 6 itself)
live in :mod:`cosmoslib.analysis.uncertainty`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import pingouin

#: The five factor columns of Table 6, in the paper's column order.
TABLE6_FACTORS = ("size_px", "intensity_diff", "fourier_order", "modality_code", "aspect_ratio")

#: Significance level used for Table 6 (the paper bolds p < 0.001).
ALPHA = 0.001

_KEY = ["task", "image_id", "label_value"]


@dataclass(frozen=True)
class PartialCorr:
    """One partial correlation.

    Attributes
    ----------
    r : float
        Spearman partial correlation coefficient in [-1, 1]; NaN when undefined, and then
        ``note`` says why.
    p : float
        Two-sided p-value from the t distribution with ``n - 2 - k`` degrees of freedom
        (``k`` = covariates actually used); NaN with ``r``.
    n : int
        Complete rows used.
    n_dropped : int
        Rows dropped because x, y or a used covariate was missing (NaN/None/inf).
    dropped_covariates : tuple of str
        Covariates left out because they have fewer than two distinct values where x and y
        are present (constant or entirely missing), or in the complete rows: a constant
        column has no rank variance to regress out, and pingouin returns NaN for the whole
        coefficient when one is present.
    note : str
        Why ``r`` is NaN, or a caveat about a finite ``r`` (collinear covariates); ``""`` when
        there is nothing to say.
    """

    r: float
    p: float
    n: int
    n_dropped: int
    dropped_covariates: tuple[str, ...] = ()
    note: str = ""


def _constant(values: pd.Series) -> bool:
    return values.nunique(dropna=True) < 2


def partial_spearman(df: pd.DataFrame, x: str, y: str, covar: Sequence[str] | str) -> PartialCorr:
    """Spearman rank partial correlation of ``x`` and ``y`` given ``covar``.

    Parameters
    ----------
    df : DataFrame
        Holds the numeric columns ``x``, ``y`` and ``covar``.
    x, y : str
        Column names.
    covar : str or sequence of str
        Covariates to control for (may be empty: then the plain Spearman correlation).

    Returns
    -------
    PartialCorr
        Rows where x, y or a covariate is missing or infinite are dropped and counted in
        ``n_dropped``. A covariate with fewer than two distinct values (e.g. the modality code
        of a root whose objects share one modality, or a column that is all missing) carries
        no information and is left out, named in ``dropped_covariates``, before rows are
        selected; a covariate that becomes constant in the complete rows is left out too and
        the rows re-selected without it, until no used covariate is constant. Computed by
        :func:`pingouin.partial_corr` with ``method='spearman'`` (ranks with average ties,
        then the inverse covariance matrix of the ranks).

        ``r`` and ``p`` are NaN, with ``note`` saying why, when x or y is constant in the
        complete rows, when there are fewer than ``k + 3`` complete rows (``k`` covariates
        used), or when a covariate has the same ranks as x or y. Collinear covariates
        (a rank-deficient covariance) still give pingouin's pseudo-inverse estimate, with a
        note.

    Raises
    ------
    KeyError
        A column is not in ``df``.
    ValueError
        x, y and the covariates are not all different.
    """
    covar = [covar] if isinstance(covar, str) else list(covar)
    cols = [x, y, *covar]
    missing = [c for c in cols if c not in df]
    if missing:
        raise KeyError(f"partial_spearman: columns {missing} are not in the table")
    if len(set(cols)) != len(cols):
        raise ValueError(f"partial_spearman: x, y and covariates must differ, got {cols}")
    data = df[cols].apply(pd.to_numeric, errors="coerce").astype(float)
    data = data.replace([np.inf, -np.inf], np.nan)

    # Leave out covariates with fewer than two distinct values where x and y are present, then
    # any that become constant once rows missing another covariate are dropped.
    has_xy = data[[x, y]].notna().all(axis=1)
    used = [c for c in covar if not _constant(data.loc[has_xy, c])]
    dropped = [c for c in covar if c not in used]
    while True:
        complete = data[[x, y, *used]].dropna()
        const = [c for c in used if _constant(complete[c])]
        if not const or len(complete) < len(used) + 3:
            break
        dropped += const
        used = [c for c in used if c not in const]
    n, k = len(complete), len(used)
    n_dropped = len(data) - n
    dropped_t = tuple(dropped)

    def undefined(note: str) -> PartialCorr:
        return PartialCorr(float("nan"), float("nan"), n, n_dropped, dropped_t, note)

    if n < k + 3:
        return undefined(f"fewer than k+3 = {k + 3} complete rows (n = {n}, k = {k} covariates)")
    for col, what in ((x, "factor"), (y, "outcome")):
        if _constant(complete[col]):
            return undefined(f"{what} {col} constant in this block (all {n} values "
                             f"{complete[col].iloc[0]:g})")
    ranks = complete.rank(method="average")
    for c in used:
        for col in (x, y):
            if np.allclose(ranks[c].to_numpy(), ranks[col].to_numpy()):
                # Checked here, on ranks: pingouin >= 0.7 refuses equal values, older
                # versions return a meaningless number.
                return undefined(f"covariate {c} has the same ranks as {col}: partial "
                                 "correlation undefined")

    with warnings.catch_warnings():
        # pingouin >= 0.7 warns on a rank-deficient covariance; that is checked below for
        # every version and said in the note.
        warnings.simplefilter("ignore", UserWarning)
        try:
            out = pingouin.partial_corr(data=complete, x=x, y=y, covar=used or None,
                                        method="spearman")
        except ValueError as exc:  # pingouin's own identity check, as a fallback
            return undefined(f"undefined: {exc}")
    pcol = "p_val" if "p_val" in out else "p-val"
    r, p = float(out["r"].iloc[0]), float(out[pcol].iloc[0])
    note = ""
    if np.linalg.matrix_rank(ranks[[x, y, *used]].cov().to_numpy()) < k + 2:
        note = "covariates collinear (rank-deficient covariance): r from a pseudo-inverse"
    if not (np.isfinite(r) and np.isfinite(p)):
        return undefined(f"pingouin {pingouin.__version__} returned r = {r}, p = {p}"
                         + (f" ({note})" if note else ""))
    return PartialCorr(r, p, n, n_dropped, dropped_t, note)


#: What each factor row of :func:`table6` measures, for the ``reading`` column.
READINGS = {
    "intensity_diff": "contrast magnitude |object - surroundings| (the paper's reading)",
    "intensity_diff_signed": "signed object - surroundings (not the paper's reading)",
    "fourier_order": "DICE vs the filled outer contour (the paper's definition)",
    "fourier_order_mask": "DICE vs the whole mask, holes penalised (not the paper's definition)",
}

#: Factor an extra row replaces among the covariates (see ``extra_factors`` of :func:`table6`).
REPLACES = {"intensity_diff_signed": "intensity_diff", "fourier_order_mask": "fourier_order"}


def table6(
    results: pd.DataFrame,
    factors: pd.DataFrame,
    factor_cols: Sequence[str] = TABLE6_FACTORS,
    by: Sequence[str] = ("model", "strategy"),
    selection_rule: str | None = "oracle_dice",
    extra_factors: Sequence[str] = (),
    alpha: float = ALPHA,
) -> pd.DataFrame:
    """Table 6: each factor vs DICE, controlling for the other factors, per model x strategy.

    Parameters
    ----------
    results : DataFrame
        The results table (``task, image_id, label_value, model, strategy, selection_rule,
        dice, ...``; DICE in %).
    factors : DataFrame
        The factors table of :func:`cosmoslib.analysis.factors.compute_factors`; ``intensity_diff`` is
        the contrast magnitude (never negative; a table with negative values predates that
        and is refused).
    factor_cols : sequence of str
        Factors to correlate; each one is tested with the others as covariates.
    by : sequence of str
        Grouping columns of ``results`` (one block of rows per group).
    selection_rule : str or None
        Keep only results rows with this ``selection_rule`` (the paper reports the oracle
        choice among SAM's candidate masks); None keeps all rows.
    extra_factors : sequence of str
        Further factor columns, each tested in an extra row per block *in place of* the factor
        it varies (:data:`REPLACES`: ``intensity_diff_signed`` replaces ``intensity_diff``,
        ``fourier_order_mask`` replaces ``fourier_order``; the replaced one is not a covariate
        of that row), with the other factors as covariates. Use
        ``("intensity_diff_signed",)`` to show the signed contrast beside the paper's
        magnitude.
    alpha : float
        Significance level for the ``significant`` column (paper: 0.001).

    Returns
    -------
    DataFrame
        Long format, one row per group x factor (factors, then extra factors): ``*by, factor,
        r, p, n, n_dropped, significant, dropped_covariates, reading, note``.
        ``dropped_covariates`` names (comma-separated) the covariates left out of that test
        because they were constant in the block (e.g. ``modality_code`` when every object
        shares one modality); ``reading`` says what an intensity or Fourier-order row
        measures (:data:`READINGS`); ``note`` explains every NaN ``r`` in words (factor
        constant in this block, fewer than k+3 complete rows, ...). Results rows without a
        factors row (inner join on ``task, image_id, label_value``) are not counted; rows
        with a missing factor or DICE are dropped per test and counted in ``n_dropped``.

    Raises
    ------
    KeyError
        A needed column is missing from ``results`` or ``factors``.
    ValueError
        ``intensity_diff`` has negative values (a signed, pre-magnitude factors table).
    """
    by = list(by)
    factor_cols = list(factor_cols)
    extra_factors = [f for f in extra_factors if f not in factor_cols]
    need_r = set(_KEY) | set(by) | {"dice"}
    need_f = set(_KEY) | set(factor_cols) | set(extra_factors)
    if missing := sorted(need_r - set(results)):
        raise KeyError(f"table6: results table lacks columns {missing}")
    if missing := sorted(need_f - set(factors)):
        raise KeyError(f"table6: factors table lacks columns {missing}")
    if "intensity_diff" in factors and (pd.to_numeric(factors["intensity_diff"],
                                                      errors="coerce") < 0).any():
        raise ValueError("table6: the factors table's intensity_diff has negative values: it is "
                         "a signed table from an older cosmoslib; recompute it (cosmos factors), "
                         "which stores the magnitude in intensity_diff and the signed value in "
                         "intensity_diff_signed")

    res = results
    if selection_rule is not None and "selection_rule" in res:
        res = res[res["selection_rule"] == selection_rule]
    fac = factors[[*_KEY, *factor_cols, *extra_factors]].drop_duplicates(_KEY)
    left = res[[*_KEY, *by, "dice"]]
    # Align key dtypes (label_value may be int64 in one table and Int64 in the other).
    left = left.astype({"label_value": "int64"})
    fac = fac.astype({"label_value": "int64"})
    joined = left.merge(fac, on=_KEY, how="inner")

    tests = [(f, [c for c in factor_cols if c != f]) for f in factor_cols]
    tests += [(f, [c for c in factor_cols if c != REPLACES.get(f)]) for f in extra_factors]
    rows = []
    for group, block in joined.groupby(by, sort=True, dropna=False):
        group = group if isinstance(group, tuple) else (group,)
        for factor, others in tests:
            pc = partial_spearman(block, factor, "dice", others)
            rows.append(dict(zip(by, group), factor=factor, r=pc.r, p=pc.p, n=pc.n,
                             n_dropped=pc.n_dropped, significant=bool(pc.p < alpha),
                             dropped_covariates=",".join(pc.dropped_covariates),
                             reading=READINGS.get(factor, ""), note=pc.note))
    columns = [*by, "factor", "r", "p", "n", "n_dropped", "significant", "dropped_covariates",
               "reading", "note"]
    return pd.DataFrame(rows, columns=columns)
