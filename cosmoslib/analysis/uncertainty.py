"""Uncertainty of the book's numbers: cluster bootstrap intervals, paired tests, Holm (issue 13).

The paper's tables give means over objects (2D slices) without uncertainty. The slices of one
volume are not independent samples: neighbouring slices of one tumour look alike and a model
that fails on one tends to fail on the next. An interval that resamples *slices* treats 30 slices
of one patient as 30 patients and comes out far too narrow. Every interval here therefore
resamples the **independent unit** ("cluster"): the source volume or source file of a slice
(:func:`cluster_key`: ``task`` + ``source``; a 2D image without a recorded source is its own
cluster), and every object or slice of a resampled cluster comes along with it.

* :func:`cluster_bootstrap_ci` -- one statistic (by default the mean over all rows, as the
  tables report it) with a seeded cluster bootstrap interval;
* :func:`mean_with_ci` -- a grouped mean table with interval columns (every table cell, every
  bar);
* :func:`paired_comparisons` -- strategies (or models) compared on the same objects: the mean
  paired difference with its cluster bootstrap interval, and a Wilcoxon signed-rank test on the
  per-cluster mean differences, Holm-corrected across all comparisons of the call;
* :func:`holm` -- Holm's step-down adjusted p-values;
* the book's one interval vocabulary: the resample count of each purpose
  (:data:`N_RESAMPLES_TABLES` for means and differences, :data:`N_RESAMPLES_PARTIAL` for
  partial correlations), one rule for an estimate without interval (:func:`missing_interval`:
  a single independent unit shows ``"n=1, no interval"``), one cell formatter
  (:func:`format_interval`, wide tables with :func:`interval_cells`), its prose form
  (:func:`interval_phrase`) and the caption sentence (:func:`interval_note`).

The bootstrap itself is :func:`scipy.stats.bootstrap`, fed with per-cluster quantities so that
its resampling unit is the cluster; its BCa acceleration then comes from the leave-one-*cluster*-
out jackknife, as it should. Randomness only comes from ``numpy.random.default_rng(seed)``: the
same seed gives the same interval, and each table cell uses the same seed, so a cell's interval
does not depend on which other cells are in the table.

Patients: the datasets the book reads do not say which volumes belong to one patient (e.g.
several MRI sequences of one subject). Pass a ``cluster`` column with a patient id where one is
known; without it the volume is the unit, which is still optimistic when one patient gives
several volumes.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Callable, NamedTuple, Sequence

import numpy as np
import pandas as pd
import pingouin
from scipy import stats as sps

from cosmoslib.analysis import stats

#: Default confidence level, percent.
CI = 95.0
#: Default bootstrap interval; see :func:`cluster_bootstrap_ci`.
METHOD = "BCa"

# The interval vocabulary of the whole book, defined here once and nowhere else:
# how many resamples each kind of interval uses, and what a cell without an interval says.

#: Bootstrap resamples of every mean and every paired difference: table cells, bars, the
#: comparisons and verdicts of the findings chapter (BCa on per-unit sums, cheap per cell;
#: Efron and Tibshirani ask for 1000 or more resamples for interval bounds). The default of
#: :func:`cluster_bootstrap_ci`, :func:`mean_with_ci`, :func:`paired_comparisons` and
#: :func:`with_intervals`.
N_RESAMPLES_TABLES = 2000
#: Bootstrap resamples of the Table 6 partial-correlation intervals: each resample re-ranks the
#: pooled rows and inverts a covariance matrix, so this is kept small enough for the demo book
#: (the default of :func:`partial_spearman_ci`).
N_RESAMPLES_PARTIAL = 400
#: What a cell with a single independent unit shows instead of an interval (the n = 1 rule of
#: :func:`missing_interval`).
ONE_UNIT = "n=1, no interval"
#: What a cell shows when its bounds are missing for another reason (e.g. every bootstrap
#: draw undefined).
NO_INTERVAL = "no interval"


class ClusterCI(NamedTuple):
    """A statistic with its cluster bootstrap interval (unpacks as a 4-tuple).

    Attributes
    ----------
    estimate : float
        The statistic on all rows (NaN when no row has a finite value).
    low, high : float
        Interval bounds, in the unit of the value; NaN with fewer than two clusters.
    n_clusters : int
        Independent units (clusters) with at least one finite value.
    """

    estimate: float
    low: float
    high: float
    n_clusters: int


def cluster_key(df: pd.DataFrame) -> pd.Series:
    """The independent unit of each row: ``"<task>/<source>"``, or ``"<task>/<image_id>"``.

    Parameters
    ----------
    df : DataFrame
        With ``task`` and ``source`` (a manifest, or a results table merged with the
        manifest's ``source``); ``image_id`` is used where ``source`` is null.

    Returns
    -------
    Series of str, named ``"cluster"``, aligned with ``df``. All slices of one source volume
    share a key; so do the sub-images an instance map was split into (same source file).

    Raises
    ------
    KeyError
        ``source`` is missing: resampling rows instead would silently treat the slices of one
        volume as independent, so the caller must say what the unit is.
    """
    if "source" not in df or "task" not in df:
        raise KeyError("cluster_key needs 'task' and 'source' columns (merge the manifest's source into the "
                       "results first, or pass an explicit cluster column)")
    source = df["source"].astype(object)
    fallback = df["image_id"].astype(str) if "image_id" in df else pd.Series(pd.NA, index=df.index)
    unit = source.where(source.notna(), fallback)
    if unit.isna().any():
        raise KeyError("rows without source and image_id: cannot tell their independent unit")
    return (df["task"].astype(str) + "/" + unit.astype(str)).rename("cluster")


def _clusters(df: pd.DataFrame, cluster) -> pd.Series:
    if cluster is None:
        return cluster_key(df)
    if isinstance(cluster, pd.Series):
        return cluster.reindex(df.index)
    cols = [cluster] if isinstance(cluster, str) else list(cluster)
    if missing := [c for c in cols if c not in df]:
        raise KeyError(f"cluster column(s) {missing} not in the table")
    if df[cols].isna().any(axis=None):
        raise ValueError(f"cluster column(s) {cols} have missing values: every row needs its independent unit")
    if len(cols) == 1:
        return df[cols[0]]
    return df[cols].astype(str).agg("/".join, axis=1)


def _is_mean(statistic) -> bool:
    return statistic is np.mean or statistic is np.nanmean or (isinstance(statistic, str) and statistic == "mean")


def cluster_bootstrap_ci(
    df: pd.DataFrame,
    value: str,
    cluster=None,
    statistic: Callable | str = np.mean,
    n_resamples: int = N_RESAMPLES_TABLES,
    ci: float = CI,
    seed: int | np.random.Generator = 0,
    method: str = METHOD,
) -> ClusterCI:
    """Seeded bootstrap interval of a statistic over rows, resampling whole clusters.

    Parameters
    ----------
    df : DataFrame
        One row per observation (object on a slice, volume, ...).
    value : str
        Column to summarise (e.g. ``"dice"``, %; ``"hd95"``, pixels or mm). NaN/inf rows are
        left out (e.g. distances under the ``"nan"`` empty-mask policy).
    cluster : str, list of str, Series or None
        The independent unit: a column, several columns (combined), a Series aligned with
        ``df``, or None for :func:`cluster_key` (source volume/file).
    statistic : callable or "mean"
        Applied to the pooled values of the (resampled) clusters. The mean (``np.mean`` or
        ``"mean"``) is the row-weighted mean, i.e. the number the tables print; it runs
        vectorised on per-cluster sums and counts. Any other callable ``f(1D array) ->
        float`` (e.g. ``np.median``) is evaluated once per resample on the pooled rows.
    n_resamples : int
        Bootstrap resamples (default :data:`N_RESAMPLES_TABLES`).
    ci : float
        Confidence level in percent, 0 < ci < 100.
    seed : int or numpy.random.Generator
        Source of the resampling randomness; same seed, same interval.
    method : {"BCa", "percentile", "basic"}
        Interval of :func:`scipy.stats.bootstrap`. Default BCa (bias-corrected and
        accelerated): DICE is bounded at 100 % and skewed near it, where the percentile
        interval is biased; BCa corrects bias and skewness to second order, with the
        acceleration from the leave-one-cluster-out jackknife. Where BCa is undefined (a
        degenerate jackknife) the percentile interval is returned.

    Returns
    -------
    ClusterCI
        ``(estimate, low, high, n_clusters)``. No finite value: all NaN, 0 clusters. One
        cluster: the estimate with NaN bounds (no between-cluster variation to resample).
        All values equal: ``low == high == estimate``.

    Notes
    -----
    The resampling draws ``n_clusters`` clusters with replacement and pools all their rows, so
    clusters of different sizes keep their weight (the bootstrap of a ratio estimator). The
    interval describes sampling *clusters* from the same population: with few clusters (< ~10)
    any bootstrap interval is too narrow, and n_clusters is returned so tables can show it.
    """
    if not 0 < ci < 100:
        raise ValueError(f"ci must be in (0, 100), got {ci}")
    if value not in df:
        raise KeyError(f"column {value!r} not in the table")
    units = _clusters(df, cluster)
    x = pd.to_numeric(df[value], errors="coerce").astype(float)
    ok = np.isfinite(x.to_numpy())
    x, units = x[ok], units[ok]
    if len(x) == 0:
        return ClusterCI(float("nan"), float("nan"), float("nan"), 0)
    values = x.to_numpy()
    codes, uniques = pd.factorize(units, sort=True)
    k = len(uniques)
    estimate = float(np.mean(values) if _is_mean(statistic) else statistic(values))
    if k < 2:
        return ClusterCI(estimate, float("nan"), float("nan"), k)
    if np.all(values == values[0]):
        return ClusterCI(estimate, estimate, estimate, k)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    # batches bound the memory of the (resamples x clusters) arrays scipy builds
    batch = int(min(n_resamples, max(1, 4_000_000 // k)))
    kwargs = dict(n_resamples=int(n_resamples), confidence_level=ci / 100.0, batch=batch)
    if _is_mean(statistic):
        sums = np.bincount(codes, weights=values, minlength=k)
        counts = np.bincount(codes, minlength=k).astype(float)

        def stat(s, c, axis=-1):
            return np.sum(s, axis=axis) / np.sum(c, axis=axis)

        data, kwargs = (sums, counts), dict(kwargs, paired=True, vectorized=True)
    else:
        order = np.argsort(codes, kind="stable")
        groups = np.split(values[order], np.cumsum(np.bincount(codes, minlength=k))[:-1])

        def stat(idx):
            return statistic(np.concatenate([groups[i] for i in idx]))

        data, kwargs = (np.arange(k),), dict(kwargs, vectorized=False)
    state = rng.bit_generator.state
    res = _bootstrap(sps, data, stat, kwargs, method, rng)
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if method.lower() == "bca" and not (math.isfinite(low) and math.isfinite(high)):
        rng.bit_generator.state = state  # same resamples, percentile interval
        res = _bootstrap(sps, data, stat, kwargs, "percentile", rng)
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return ClusterCI(estimate, low, high, k)


def _bootstrap(sps, data, stat, kwargs, method, rng):
    with warnings.catch_warnings():
        # scipy warns when BCa is undefined (degenerate jackknife); we fall back explicitly
        warnings.simplefilter("ignore", getattr(sps, "DegenerateDataWarning", RuntimeWarning))
        warnings.simplefilter("ignore", RuntimeWarning)
        return sps.bootstrap(data, stat, method=method, rng=rng, **kwargs)


def mean_with_ci(
    df: pd.DataFrame,
    by: Sequence[str] | str,
    value: str | Sequence[str] = "dice",
    cluster=None,
    ci: float = CI,
    n_resamples: int = N_RESAMPLES_TABLES,
    seed: int = 0,
    method: str = METHOD,
) -> pd.DataFrame:
    """Grouped mean table with cluster bootstrap intervals: one row per group.

    Parameters
    ----------
    df : DataFrame
        One row per observation (e.g. the results table merged with the manifest's ``source``).
    by : column(s) to group by (e.g. ``["model", "strategy"]``; ``[]`` for one overall row).
    value : column(s) to average (e.g. ``"dice"``).
    cluster : the independent unit, as for :func:`cluster_bootstrap_ci` (default
        :func:`cluster_key`).
    ci, n_resamples, seed, method : as for :func:`cluster_bootstrap_ci`. Every cell uses the
        same ``seed``.

    Returns
    -------
    DataFrame
        ``*by``, then for each value ``<value>`` (the mean over finite rows),
        ``<value>_low``, ``<value>_high``, then ``n`` (rows with a finite first value) and
        ``n_clusters`` (clusters of the first value). Sorted by ``by``.
    """
    by = [by] if isinstance(by, str) else list(by)
    values = [value] if isinstance(value, str) else list(value)
    units = _clusters(df, cluster).rename("_cluster")
    data = df.assign(_cluster=units.to_numpy())
    groups = data.groupby(by, sort=True, dropna=False) if by else [((), data)]
    rows = []
    for key, block in groups:
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        for i, v in enumerate(values):
            res = cluster_bootstrap_ci(block, v, "_cluster", n_resamples=n_resamples, ci=ci, seed=seed,
                                       method=method)
            row.update({v: res.estimate, f"{v}_low": res.low, f"{v}_high": res.high})
            if i == 0:
                row["n"] = int(np.isfinite(pd.to_numeric(block[v], errors="coerce").astype(float)).sum())
                row["n_clusters"] = res.n_clusters
        rows.append(row)
    columns = [*by, *[c for v in values for c in (v, f"{v}_low", f"{v}_high")], "n", "n_clusters"]
    out = pd.DataFrame(rows, columns=columns)
    return out.astype({"n": "int64", "n_clusters": "int64"})


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control).

    Parameters
    ----------
    pvalues : array_like of float in [0, 1]; NaN entries stay NaN and do not count as tests.

    Returns
    -------
    ndarray of float, same shape: with ``m`` tests sorted ``p_(1) <= ... <= p_(m)``, the
    adjusted ``p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``; reject where ``<= alpha``.
    Computed by :func:`pingouin.multicomp` (``method="holm"``).
    """
    p = np.asarray(pvalues, dtype=float)
    if p.size == 0:
        return p.copy()
    finite = p[~np.isnan(p)]
    if ((finite < 0) | (finite > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    if finite.size == 0:
        return p.copy()
    return np.asarray(pingouin.multicomp(p.ravel(), method="holm")[1], dtype=float).reshape(p.shape)


def smallest_wilcoxon_p(n: int) -> float:
    """The smallest two-sided p-value the exact Wilcoxon signed-rank test can give on ``n`` pairs.

    With ``n`` non-zero differences and no ties there are ``2**n`` equally likely sign patterns
    under the null; the most extreme (all of one sign) has probability ``2**-n`` in each tail,
    so ``p >= 2**(1 - n)``: 0.0625 for 5 pairs, 0.031 for 6. :func:`paired_comparisons` tests the
    per-cluster differences (continuous means, so zeros and ties are rare), so a run with five
    or fewer independent units cannot reach p < 0.05. (``scipy.stats.wilcoxon`` uses this exact
    distribution for small ``n`` without zeros or ties, and a normal approximation otherwise.)

    Parameters
    ----------
    n : number of paired differences (independent units), >= 1.
    """
    if int(n) < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return float(2.0 ** (1 - int(n)))


def paired_comparisons(
    df: pd.DataFrame,
    value: str = "dice",
    between: str = "strategy",
    pairs: Sequence[tuple] | None = None,
    within: Sequence[str] = ("task", "image_id", "label_value"),
    by: Sequence[str] | str = (),
    cluster=None,
    ci: float = CI,
    n_resamples: int = N_RESAMPLES_TABLES,
    seed: int = 0,
    method: str = METHOD,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Compare levels of ``between`` (strategies or models) on the same objects, Holm-corrected.

    Parameters
    ----------
    df : DataFrame
        One row per object and level (e.g. the results table for one selection rule, merged
        with the manifest's ``source``), with ``value``, ``between``, ``within``, ``by`` and the
        cluster column(s).
    value : column compared (e.g. ``"dice"``, %).
    between : column whose levels are compared (``"strategy"`` or ``"model"``).
    pairs : list of ``(a, b)`` levels; default every pair of levels in sorted order.
    within : columns identifying one object (the pairing).
    by : columns fixed within a comparison (e.g. ``"model"`` when comparing strategies);
        comparisons are made in each group.
    cluster : the independent unit (default :func:`cluster_key`); it must be constant within an
        object.
    ci, n_resamples, seed, method : for the interval of the mean difference
        (:func:`cluster_bootstrap_ci`).
    alpha : family-wise level for ``significant``.

    Returns
    -------
    DataFrame
        One row per group and pair: ``*by, a, b, n_objects, n_clusters, mean_a, mean_b, mean_diff,
        diff_low, diff_high, statistic, p, p_holm, significant``. ``mean_diff`` is the mean over
        objects measured under both levels of ``value[a] - value[b]`` (so ``mean_a - mean_b``
        on those objects) with its cluster bootstrap interval. ``p`` is the two-sided Wilcoxon
        signed-rank test (:func:`scipy.stats.wilcoxon`, zero differences dropped) on the
        *per-cluster mean* differences: one number per independent unit, so the slices of one
        volume do not count as independent evidence; ``statistic`` is its W. ``p`` is 1 when
        every cluster difference is zero and NaN without any cluster. ``p_holm`` is Holm's
        adjustment (:func:`holm`) across *all* rows returned (one family per call);
        ``significant`` is ``p_holm < alpha``.

    Raises
    ------
    ValueError
        An object appears twice under one level within a group (e.g. both selection rules left
        in the table: filter first or add the column to ``by``).
    """
    by = [by] if isinstance(by, str) else list(by)
    within = list(within)
    units = _clusters(df, cluster)
    data = df.assign(_cluster=units.to_numpy())
    groups = data.groupby(by, sort=True, dropna=False) if by else [((), data)]
    rows = []
    for key, block in groups:
        key = key if isinstance(key, tuple) else (key,)
        if block.duplicated([*within, between]).any():
            raise ValueError(f"objects repeated under one {between!r} level in group {key}: "
                             "filter the table (e.g. one selection_rule) or add the column to `by`")
        if (block.groupby(within, dropna=False)["_cluster"].nunique() > 1).any():
            raise ValueError("the cluster of an object differs between its rows")
        wide = block.pivot_table(index=[*within, "_cluster"], columns=between, values=value,
                                 aggfunc="first", dropna=False)
        levels = sorted(block[between].dropna().unique().tolist())
        for a, b in (pairs if pairs is not None else itertools.combinations(levels, 2)):
            row = dict(zip(by, key), a=a, b=b)
            if a not in wide or b not in wide:
                both = pd.DataFrame(columns=["a", "b", "_cluster"])
            else:
                both = pd.DataFrame({"a": pd.to_numeric(wide[a], errors="coerce"),
                                     "b": pd.to_numeric(wide[b], errors="coerce")}).reset_index()
                both = both[np.isfinite(both["a"].astype(float)) & np.isfinite(both["b"].astype(float))]
            both = both.assign(d=both["a"].astype(float) - both["b"].astype(float))
            res = cluster_bootstrap_ci(both, "d", "_cluster", n_resamples=n_resamples, ci=ci, seed=seed,
                                       method=method)
            per_cluster = both.groupby("_cluster")["d"].mean().to_numpy()
            if per_cluster.size == 0:
                w, p = float("nan"), float("nan")
            elif np.all(per_cluster == 0):
                w, p = 0.0, 1.0
            else:
                test = sps.wilcoxon(per_cluster, zero_method="wilcox", alternative="two-sided")
                w, p = float(test.statistic), float(test.pvalue)
            row.update(n_objects=len(both), n_clusters=res.n_clusters,
                       mean_a=float(both["a"].mean()) if len(both) else float("nan"),
                       mean_b=float(both["b"].mean()) if len(both) else float("nan"),
                       mean_diff=res.estimate, diff_low=res.low, diff_high=res.high, statistic=w, p=p)
            rows.append(row)
    columns = [*by, "a", "b", "n_objects", "n_clusters", "mean_a", "mean_b", "mean_diff", "diff_low", "diff_high",
               "statistic", "p"]
    out = pd.DataFrame(rows, columns=columns)
    out["p_holm"] = holm(out["p"].to_numpy(dtype=float)) if len(out) else np.array([], dtype=float)
    out["significant"] = (out["p_holm"] < alpha).astype(bool)
    return out.astype({"n_objects": "int64", "n_clusters": "int64"})


# --------------------------------------------------------------------------------------------
# intervals on every table cell and figure bar (issue 13, item 2)
# --------------------------------------------------------------------------------------------


def with_intervals(
    frame: pd.DataFrame,
    value: str,
    by: Sequence[str] | str = (),
    unit=None,
    ci: float = CI,
    n_resamples: int = N_RESAMPLES_TABLES,
    seed: int = 0,
    method: str = METHOD,
) -> pd.DataFrame:
    """Mean of ``value`` per group with its seeded cluster bootstrap interval (long format).

    Parameters
    ----------
    frame : DataFrame
        One row per observation (object on a slice, object x repeat, ...), with ``value``, the
        ``by`` columns and the unit: ``task`` + ``source`` (+ ``image_id``) for the default
        unit, else the column(s) named by ``unit``.
    value : column averaged (e.g. ``"dice"`` in %, ``"hd"`` in pixels, ``"drop"`` in points).
    by : grouping columns; ``()`` for one overall row.
    unit : the independent unit resampled, as ``cluster`` of :func:`cluster_bootstrap_ci`:
        None = :func:`cluster_key` (source volume, else source image).
    ci, n_resamples, seed, method : as for :func:`cluster_bootstrap_ci` (default BCa, 95 %,
        :data:`N_RESAMPLES_TABLES` resamples); every group uses the same seed, so a cell's
        interval does not depend on the other cells.

    Returns
    -------
    DataFrame
        ``*by, mean, low, high, n, n_units``: ``mean`` over the group's finite rows (the number
        the paper's tables print), ``low``/``high`` the interval (NaN when the group has one
        unit: there is no between-unit variation to resample, see :func:`format_interval`),
        ``n`` finite rows, ``n_units`` independent units. Groups without a finite value have
        ``mean`` NaN and ``n`` 0. Sorted by ``by``.
    """
    out = mean_with_ci(frame, by, value, cluster=unit, ci=ci, n_resamples=n_resamples, seed=seed,
                       method=method)
    out = out.rename(columns={value: "mean", f"{value}_low": "low", f"{value}_high": "high",
                              "n_clusters": "n_units"})
    by = [by] if isinstance(by, str) else list(by)
    return out[[*by, "mean", "low", "high", "n", "n_units"]]


def missing_interval(low: float, high: float, n_units: int) -> str | None:
    """Why an estimate has no interval: the one rule every formatter of the book follows.

    Parameters
    ----------
    low, high : the interval's bounds (NaN when none was computed).
    n_units : independent units behind the estimate.

    Returns
    -------
    str or None
        :data:`ONE_UNIT` (``"n=1, no interval"``) when fewer than two independent units lie
        behind the estimate: with one source volume there is no between-unit variation to
        resample, so no interval is made up, whatever the bounds say; :data:`NO_INTERVAL`
        when there are two or more units but a bound is missing or not finite (e.g. every
        bootstrap draw undefined); None when the interval exists.
    """
    if int(n_units) < 2:
        return ONE_UNIT
    if low is None or high is None or not (math.isfinite(float(low)) and math.isfinite(float(high))):
        return NO_INTERVAL
    return None


def format_interval(mean: float, low: float, high: float, n_units: int, digits: int = 1) -> str:
    """One display cell: ``"55.6 [50.1, 60.2]"``; one unit: ``"55.6 (n=1, no interval)"``.

    The book's one interval formatter: every table cell with an interval is made here
    (:func:`interval_cells`, :func:`cosmoslib.analysis.findings.format_ci`).

    Parameters
    ----------
    mean, low, high : the estimate and its interval (same unit as the table).
    n_units : independent units behind the cell.
    digits : decimals.

    Returns
    -------
    str
        ``""`` when the mean is not finite (an empty cell); otherwise the mean followed by
        ``[low, high]``, or by the reason of :func:`missing_interval` in parentheses
        (``"(n=1, no interval)"`` for a single unit, never a made-up interval;
        ``"(no interval)"`` when the bounds are missing for another reason).
    """
    if mean is None or not math.isfinite(float(mean)):
        return ""
    text = f"{float(mean):.{digits}f}"
    why = missing_interval(low, high, n_units)
    if why is not None:
        return f"{text} ({why})"
    return f"{text} [{float(low):.{digits}f}, {float(high):.{digits}f}]"


def interval_phrase(low: float, high: float, n_units: int, ci: float = CI, digits: int = 1) -> str:
    """The interval of :func:`format_interval` in running prose: ``"95 % CI 50.1 to 60.2"``.

    Same rule as the table cells (:func:`missing_interval`): ``"n=1, no interval"`` for a
    single unit, ``"no interval"`` for missing bounds.
    """
    why = missing_interval(low, high, n_units)
    if why is not None:
        return why
    return f"{ci:g} % CI {float(low):.{digits}f} to {float(high):.{digits}f}"


def interval_cells(long: pd.DataFrame, index, columns, digits: int = 1, mean: str = "mean") -> pd.DataFrame:
    """A wide display table of :func:`format_interval` cells from a long interval table.

    Parameters
    ----------
    long : DataFrame with ``index`` and ``columns`` columns and ``mean``/``low``/``high``/
        ``n_units`` (as :func:`with_intervals` returns; ``mean`` may be renamed).
    index, columns : column(s) for the rows and columns of the wide table.
    digits : decimals.

    Returns
    -------
    DataFrame of str, sorted on both axes; cells without a group are ``""``.
    """
    cells = long.assign(_cell=[format_interval(m, lo, hi, k, digits) for m, lo, hi, k in
                               zip(long[mean], long["low"], long["high"], long["n_units"])])
    wide = cells.pivot_table(index=index, columns=columns, values="_cell", aggfunc="first")
    return wide.fillna("").sort_index().sort_index(axis=1)


def interval_note(n_resamples: int = N_RESAMPLES_TABLES, seed: int = 0, ci: float = CI,
                  method: str = METHOD, unit: str = "source volumes (else source images)",
                  what: str = "[brackets]") -> str:
    """The caption sentence that says what an interval is.

    Parameters
    ----------
    n_resamples, seed, ci, method : the interval's settings, as passed to the table function.
    unit : the independent unit resampled, in words.
    what : how the interval is drawn (``"[brackets]"`` in tables, ``"error bars"`` in figures).

    Returns
    -------
    str, e.g. ``"[brackets]: 95 % cluster bootstrap CI (BCa) over source volumes (else source
    images), 2000 resamples, seed 0; n=1: a single unit, no interval."``
    """
    return (f"{what}: {ci:g} % cluster bootstrap CI ({method}) over {unit}, {int(n_resamples)} resamples, "
            f"seed {seed}; {ONE_UNIT.split(',')[0]}: a single unit, no interval.")


class PartialCorrCI(NamedTuple):
    """A Spearman partial correlation with its cluster bootstrap interval.

    Attributes
    ----------
    r : float
        :func:`cosmoslib.analysis.stats.partial_spearman` on all rows (NaN when undefined).
    low, high : float
        Percentile interval of the bootstrap draws; NaN with fewer than two units, when ``r``
        is undefined, or when fewer than half the draws are defined.
    n : int
        Complete rows used by ``r``.
    n_units : int
        Independent units among those rows.
    n_draws : int
        Bootstrap draws with a defined coefficient (a draw whose x or y is constant has none).
    note : str
        Why there is no interval, or ``""``.
    """

    r: float
    low: float
    high: float
    n: int
    n_units: int
    n_draws: int
    note: str


def partial_corr_from_ranks(data: np.ndarray) -> float:
    """Partial correlation of columns 0 and 1 given the others, on average ranks.

    Parameters
    ----------
    data : ndarray (n, p), p >= 2, finite.

    Returns
    -------
    float
        ``-P01 / sqrt(P00 P11)`` with ``P`` the pseudo-inverse of the covariance of the column
        ranks (:func:`scipy.stats.rankdata`, average ties), the computation of
        :func:`pingouin.partial_corr` with ``method="spearman"``. A constant covariate gets a
        zero row in the covariance and so drops out of the pseudo-inverse; NaN when column 0 or
        1 is constant or n < p + 1.
    """
    n, p = data.shape
    if n < p + 1:
        return float("nan")
    ranks = sps.rankdata(data, axis=0)
    if np.ptp(ranks[:, 0]) == 0 or np.ptp(ranks[:, 1]) == 0:
        return float("nan")
    prec = np.linalg.pinv(np.cov(ranks, rowvar=False), hermitian=True)
    denom = prec[0, 0] * prec[1, 1]
    if not denom > 0:
        return float("nan")
    return float(np.clip(-prec[0, 1] / math.sqrt(denom), -1.0, 1.0))


def _unit_weights(codes: np.ndarray, k: int, n_resamples: int, seed) -> np.ndarray:
    """Row weights ``(n_resamples, n_rows)``: how often each row's unit is drawn in each resample."""
    picks = cluster_draws(k, n_resamples, seed)
    counts = np.zeros((len(picks), k))
    np.add.at(counts, (np.arange(len(picks))[:, None], picks), 1.0)
    return counts[:, codes]


def weighted_partial_corr(data: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """:func:`partial_corr_from_ranks` of many weighted copies of one table at once.

    Parameters
    ----------
    data : ndarray (n, p), finite.
    weights : ndarray (B, n) of non-negative integers: row ``i`` appears ``weights[b, i]``
        times in table ``b`` (a bootstrap resample).

    Returns
    -------
    ndarray (B,)
        The partial correlation of columns 0 and 1 given the others on the average ranks of
        each expanded table, equal to :func:`partial_corr_from_ranks` of
        ``np.repeat(data, weights[b], axis=0)``, without building it: ranks come from
        cumulative weights over each column's sorted tie groups, the covariance is weighted.
        NaN where column 0 or 1 is constant or the table has fewer than p + 1 rows.
    """
    n, p = data.shape
    b = weights.shape[0]
    ranks = np.empty((b, n, p))
    for j in range(p):
        order = np.argsort(data[:, j], kind="stable")
        sorted_vals = data[order, j]
        starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
        group = np.empty(n, dtype=np.intp)
        group[order] = np.cumsum(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]]) - 1
        wg = np.add.reduceat(weights[:, order], starts, axis=1)
        rank_g = np.cumsum(wg, axis=1) - wg + (wg + 1.0) / 2.0
        ranks[:, :, j] = rank_g[:, group]
    total = weights.sum(axis=1)
    mean = np.einsum("bn,bnj->bj", weights, ranks) / total[:, None]
    centred = ranks - mean[:, None, :]
    cov = np.einsum("bn,bni,bnj->bij", weights, centred, centred)
    prec = np.linalg.pinv(cov, hermitian=True)
    denom = prec[:, 0, 0] * prec[:, 1, 1]
    ok = (total >= p + 1) & (cov[:, 0, 0] > 1e-12 * total ** 3) & (cov[:, 1, 1] > 1e-12 * total ** 3) & (denom > 0)
    r = np.full(b, np.nan)
    r[ok] = np.clip(-prec[ok, 0, 1] / np.sqrt(denom[ok]), -1.0, 1.0)
    return r


def cluster_draws(k: int, n_resamples: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """The seeded cluster draws of a bootstrap: ``(n_resamples, k)`` cluster indices.

    Row ``b`` is ``rng.integers(0, k, k)`` from ``rng = numpy.random.default_rng(seed)``:
    resample ``b`` holds ``k`` units drawn with replacement, each with all its rows.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return rng.integers(0, k, size=(int(n_resamples), int(k)))


def partial_spearman_ci(
    df: pd.DataFrame,
    x: str,
    y: str,
    covar: Sequence[str] | str,
    unit=None,
    n_resamples: int = N_RESAMPLES_PARTIAL,
    ci: float = CI,
    seed: int = 0,
) -> PartialCorrCI:
    """Spearman partial correlation (Table 6 cell) with a seeded cluster bootstrap interval.

    Parameters
    ----------
    df : DataFrame with ``x``, ``y``, the covariates and the unit column(s).
    x, y, covar : as for :func:`cosmoslib.analysis.stats.partial_spearman` (which gives the estimate
        and decides which covariates are constant and left out, and which rows are complete).
    unit : the independent unit, as ``cluster`` of :func:`cluster_bootstrap_ci` (None =
        :func:`cluster_key`: source volume, else source image).
    n_resamples : bootstrap resamples (default :data:`N_RESAMPLES_PARTIAL`).
    ci : confidence level, percent.
    seed : seed of :func:`cluster_draws`; same seed, same interval.

    Returns
    -------
    PartialCorrCI
        Each resample draws the complete rows' units with replacement
        (:func:`cluster_draws`), pools all their rows (ties from repeated rows get average
        ranks, as pingouin would give the pooled table) and recomputes the coefficient
        (:func:`weighted_partial_corr`, all resamples at once); the interval is the ``(100 - ci) / 2`` and
        ``(100 + ci) / 2`` percentiles of the defined draws (percentile method: the BCa
        jackknife would cost one more coefficient per unit). No interval, with ``note``: r
        undefined, one unit, or fewer than half the draws defined.
    """
    covar = [covar] if isinstance(covar, str) else list(covar)
    if not 0 < ci < 100:
        raise ValueError(f"ci must be in (0, 100), got {ci}")
    pc = stats.partial_spearman(df, x, y, covar)
    used = [c for c in covar if c not in pc.dropped_covariates]
    units = _clusters(df, unit)
    data = df[[x, y, *used]].apply(pd.to_numeric, errors="coerce").astype(float)
    data = data.replace([np.inf, -np.inf], np.nan)
    ok = data.notna().all(axis=1).to_numpy()
    values, units = data.to_numpy()[ok], units[ok]
    codes, uniques = pd.factorize(units, sort=True)
    k = len(uniques)

    def none(note: str) -> PartialCorrCI:
        return PartialCorrCI(pc.r, float("nan"), float("nan"), pc.n, k, 0, note)

    if not math.isfinite(pc.r):
        return none(pc.note or "r undefined")
    if k < 2:
        return none(ONE_UNIT)
    weights = _unit_weights(codes, k, n_resamples, seed)
    step = max(1, 2_000_000 // max(1, values.size))  # bounds the (resamples x rows x columns) rank array
    draws = np.concatenate([weighted_partial_corr(values, weights[i:i + step])
                            for i in range(0, n_resamples, step)])
    good = draws[np.isfinite(draws)]
    if len(good) < n_resamples / 2:
        return PartialCorrCI(pc.r, float("nan"), float("nan"), pc.n, k, len(good),
                             f"only {len(good)} of {n_resamples} bootstrap draws defined")
    low, high = np.percentile(good, [(100 - ci) / 2, (100 + ci) / 2])
    return PartialCorrCI(pc.r, float(low), float(high), pc.n, k, len(good), "")


#: The key of one object in the results and the manifest.
_OBJECT_KEY = ["task", "image_id", "label_value"]


def with_source(table: pd.DataFrame, manifest: pd.DataFrame | None) -> pd.DataFrame:
    """``table`` with the manifest's ``source`` (the unit of each object) joined on the object key.

    Parameters
    ----------
    table : DataFrame keyed by ``task, image_id, label_value``.
    manifest : DataFrame with those keys and ``source``; None when ``table`` has ``source``.

    Returns
    -------
    DataFrame
        ``table`` (``label_value`` int64) with ``source``; an object the manifest lacks, or a
        manifest without ``source``, gets a null source, and its image is then its unit
        (:func:`cosmoslib.analysis.uncertainty.cluster_key`).
    """
    out = table.astype({"label_value": "int64"})
    if "source" in out:
        return out
    if manifest is None or "source" not in manifest:
        return out.assign(source=None)
    src = manifest[[*_OBJECT_KEY, "source"]].astype({"label_value": "int64"}).drop_duplicates(_OBJECT_KEY)
    return out.merge(src, on=_OBJECT_KEY, how="left")
