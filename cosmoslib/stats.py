"""Statistics of section 4.8: Spearman partial correlation (Table 6) and bootstrap intervals.

Table 6 of the paper correlates each of five object factors (size, intensity difference,
Fourier order, modality, aspect ratio; see :mod:`cosmoslib.factors`) with SAM's DICE, for
each model and strategy, *controlling for the other four*: Spearman's rank partial
correlation, i.e. Pearson's correlation between the ranks of the factor and of DICE after
the ranks of the four covariates are regressed out. Values with ``p < 0.001`` are "bold" in
the paper; here they are ``significant``.

* :func:`partial_spearman` -- one coefficient, via :func:`pingouin.partial_corr`;
* :func:`table6` -- the long-format Table 6 from a results and a factors table;
* :func:`bootstrap_ci` -- bias-corrected and accelerated (BCa) bootstrap confidence intervals via
  :func:`scipy.stats.bootstrap`, for the later chapters.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd

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
        Spearman partial correlation coefficient in [-1, 1]; NaN when undefined (fewer than
        ``k + 3`` complete rows, a constant column, or a covariate identical to x or y).
    p : float
        Two-sided p-value from the t distribution with ``n - 2 - k`` degrees of freedom.
    n : int
        Complete rows used.
    n_dropped : int
        Rows dropped because x, y or a covariate was missing (NaN/None/inf).
    """

    r: float
    p: float
    n: int
    n_dropped: int


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
        Rows where any of the columns is missing or infinite are dropped and counted in
        ``n_dropped``. Computed by :func:`pingouin.partial_corr` with ``method='spearman'``
        (ranks with average ties, then the inverse covariance matrix of the ranks).
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
    complete = data.dropna()
    n, k = len(complete), len(covar)
    n_dropped = len(data) - n
    if n < k + 3:
        return PartialCorr(float("nan"), float("nan"), n, n_dropped)
    import pingouin

    with warnings.catch_warnings():
        # pingouin warns on a rank-deficient covariance; it still returns its best estimate.
        warnings.simplefilter("ignore", UserWarning)
        try:
            out = pingouin.partial_corr(data=complete, x=x, y=y, covar=covar or None,
                                        method="spearman")
        except ValueError:  # a covariate numerically identical to x or y
            return PartialCorr(float("nan"), float("nan"), n, n_dropped)
    pcol = "p_val" if "p_val" in out else "p-val"
    return PartialCorr(float(out["r"].iloc[0]), float(out[pcol].iloc[0]), n, n_dropped)


def table6(
    results: pd.DataFrame,
    factors: pd.DataFrame,
    factor_cols: Sequence[str] = TABLE6_FACTORS,
    by: Sequence[str] = ("model", "strategy"),
    selection_rule: str | None = "oracle_dice",
    abs_intensity: bool = False,
    alpha: float = ALPHA,
) -> pd.DataFrame:
    """Table 6: each factor vs DICE, controlling for the other factors, per model x strategy.

    Parameters
    ----------
    results : DataFrame
        The results table (``task, image_id, label_value, model, strategy, selection_rule,
        dice, ...``; DICE in %).
    factors : DataFrame
        The factors table of :func:`cosmoslib.factors.compute_factors`.
    factor_cols : sequence of str
        Factors to correlate; each one is tested with the others as covariates.
    by : sequence of str
        Grouping columns of ``results`` (one block of rows per group).
    selection_rule : str or None
        Keep only results rows with this ``selection_rule`` (the paper reports the oracle
        choice among SAM's candidate masks); None keeps all rows.
    abs_intensity : bool
        Use ``|intensity_diff|`` (contrast magnitude) instead of the signed difference. The
        paper does not say which it used; its conclusion ("poor ... with low contrast")
        reads like the magnitude, while the factors table stores the signed value.
    alpha : float
        Significance level for the ``significant`` column (paper: 0.001).

    Returns
    -------
    DataFrame
        Long format, one row per group x factor: ``*by, factor, r, p, n, n_dropped,
        significant``. Results rows without a factors row (inner join on ``task, image_id,
        label_value``) are not counted; rows with a missing factor or DICE are dropped per
        test and counted in ``n_dropped``.
    """
    by = list(by)
    factor_cols = list(factor_cols)
    need_r = set(_KEY) | set(by) | {"dice"}
    need_f = set(_KEY) | set(factor_cols)
    if missing := sorted(need_r - set(results)):
        raise KeyError(f"table6: results table lacks columns {missing}")
    if missing := sorted(need_f - set(factors)):
        raise KeyError(f"table6: factors table lacks columns {missing}")

    res = results
    if selection_rule is not None and "selection_rule" in res:
        res = res[res["selection_rule"] == selection_rule]
    fac = factors[[*_KEY, *factor_cols]].drop_duplicates(_KEY)
    if abs_intensity and "intensity_diff" in factor_cols:
        fac = fac.assign(intensity_diff=fac["intensity_diff"].abs())
    left = res[[*_KEY, *by, "dice"]]
    # Align key dtypes (label_value may be int64 in one table and Int64 in the other).
    left = left.astype({"label_value": "int64"})
    fac = fac.astype({"label_value": "int64"})
    joined = left.merge(fac, on=_KEY, how="inner")

    rows = []
    for group, block in joined.groupby(by, sort=True, dropna=False):
        group = group if isinstance(group, tuple) else (group,)
        for factor in factor_cols:
            others = [c for c in factor_cols if c != factor]
            pc = partial_spearman(block, factor, "dice", others)
            rows.append(dict(zip(by, group), factor=factor, r=pc.r, p=pc.p, n=pc.n,
                             n_dropped=pc.n_dropped, significant=bool(pc.p < alpha)))
    columns = [*by, "factor", "r", "p", "n", "n_dropped", "significant"]
    return pd.DataFrame(rows, columns=columns)


@dataclass(frozen=True)
class BootstrapCI:
    """A statistic with its bootstrap confidence interval.

    Attributes
    ----------
    estimate : float
        The statistic on the data.
    low, high : float
        Interval bounds (NaN for fewer than two values).
    ci : float
        Confidence level in percent.
    n : int
        Finite values used.
    n_dropped : int
        NaN/inf values left out.
    """

    estimate: float
    low: float
    high: float
    ci: float
    n: int
    n_dropped: int


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    stat: Callable = np.mean,
    n_boot: int = 9999,
    ci: float = 95.0,
    rng: np.random.Generator | int = 0,
    method: str = "BCa",
) -> BootstrapCI:
    """Bootstrap confidence interval of a one-sample statistic (:func:`scipy.stats.bootstrap`).

    Parameters
    ----------
    values : 1-D array-like
        Sample; NaN and inf are dropped and counted.
    stat : callable
        Statistic, e.g. ``np.mean`` or ``np.median``; vectorised use if it takes ``axis``.
    n_boot : int
        Number of resamples.
    ci : float
        Confidence level in percent (0 < ci < 100).
    rng : numpy.random.Generator or int
        Source of resampling randomness (an int is a seed); same seed, same interval.
    method : str
        ``'BCa'`` (default), ``'percentile'`` or ``'basic'``.

    Returns
    -------
    BootstrapCI
        With fewer than two values the bounds are NaN; when all values are equal the
        interval collapses to that value (the bootstrap distribution is degenerate).
    """
    if not 0 < ci < 100:
        raise ValueError(f"ci must be in (0, 100), got {ci}")
    x = np.asarray(values, dtype=float).ravel()
    finite = x[np.isfinite(x)]
    n, n_dropped = len(finite), len(x) - len(finite)
    if n == 0:
        return BootstrapCI(float("nan"), float("nan"), float("nan"), ci, 0, n_dropped)
    estimate = float(stat(finite))
    if n < 2:
        return BootstrapCI(estimate, float("nan"), float("nan"), ci, n, n_dropped)
    if np.all(finite == finite[0]):
        return BootstrapCI(estimate, estimate, estimate, ci, n, n_dropped)
    from scipy import stats as sps

    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    res = sps.bootstrap((finite,), stat, n_resamples=n_boot, confidence_level=ci / 100.0,
                        method=method, rng=rng)
    return BootstrapCI(estimate, float(res.confidence_interval.low),
                       float(res.confidence_interval.high), ci, n, n_dropped)
