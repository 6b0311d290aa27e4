"""Cluster bootstrap intervals, paired tests and Holm (cosmoslib.analysis.uncertainty).

Coverage and error rates are checked by simulation against known truths; the resampling unit
against data built so that cluster and row resampling must differ; Holm against statsmodels and
a hand-computed example.
"""

from __future__ import annotations

import inspect

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from cosmoslib.analysis import uncertainty as unc

TRUE_MEAN = 70.0


def clustered(rng: np.random.Generator, n_clusters=30, sd_between=4.0, sd_within=1.5, sizes=(3, 12)):
    """Slices of volumes: a volume effect shared by its slices plus slice noise.

    Volume sizes vary; the effects have mean 0 independent of size, so the row-weighted mean
    has expectation TRUE_MEAN. Intra-cluster correlation 4^2 / (4^2 + 1.5^2) = 0.88.
    """
    rows = []
    for c in range(n_clusters):
        effect = rng.normal(0.0, sd_between)
        for s in range(int(rng.integers(*sizes))):
            rows.append({"task": "t", "source": f"vol{c:03d}.nii.gz", "image_id": f"vol{c:03d}_{s:04d}",
                         "dice": TRUE_MEAN + effect + rng.normal(0.0, sd_within)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("method", ["BCa", "percentile"])
def test_cluster_intervals_cover_the_true_mean_at_about_95_percent(method):
    """200 simulated data sets of 30 volumes: the 95 % cluster interval covers the true mean in
    90-99 % of them (binomial sd at 95 % with 200 runs: 1.5 points; the band also allows the
    known mild under-coverage of bootstrap intervals with 30 clusters). The row bootstrap of the
    same data, which treats slices as independent, covers far less often: the unit matters."""
    rng = np.random.default_rng(2024)
    hits = naive_hits = 0
    n_sim = 200
    for _ in range(n_sim):
        df = clustered(rng)
        est, lo, hi, k = unc.cluster_bootstrap_ci(df, "dice", n_resamples=999, seed=int(rng.integers(1 << 31)),
                                                  method=method)
        assert k == 30 and lo <= est <= hi
        hits += lo <= TRUE_MEAN <= hi
        _, nlo, nhi, nk = unc.cluster_bootstrap_ci(df, "dice", cluster="image_id", n_resamples=999, seed=1,
                                                   method=method)
        assert nk == len(df)
        naive_hits += nlo <= TRUE_MEAN <= nhi
    coverage, naive = hits / n_sim, naive_hits / n_sim
    assert 0.90 <= coverage <= 0.99, coverage
    assert naive < 0.75, naive


# --------------------------------------------------------------------------- resampling unit


def test_resampling_is_by_cluster_identical_slices_equal_one_value_per_volume():
    """Volumes whose 7 slices are identical copies: the interval equals that of the data with
    one value per volume (same seed), to float precision; a row bootstrap would be narrower."""
    rng = np.random.default_rng(5)
    per_volume = pd.DataFrame({"task": "t", "source": [f"v{i}" for i in range(25)],
                               "dice": rng.uniform(40, 95, 25)})
    per_volume["image_id"] = per_volume["source"] + "_0000"
    slices = per_volume.loc[per_volume.index.repeat(7)].reset_index(drop=True)
    slices["image_id"] = slices["source"] + "_" + (slices.groupby("source").cumcount()).astype(str)
    for method in ("BCa", "percentile"):
        a = unc.cluster_bootstrap_ci(per_volume, "dice", seed=11, n_resamples=2999, method=method)
        b = unc.cluster_bootstrap_ci(slices, "dice", seed=11, n_resamples=2999, method=method)
        assert a.n_clusters == b.n_clusters == 25
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-9)
        naive = unc.cluster_bootstrap_ci(slices, "dice", cluster="image_id", seed=11, n_resamples=2999,
                                         method=method)
        # 175 "independent" rows: width shrinks by about sqrt(7)
        ratio = (a.high - a.low) / (naive.high - naive.low)
        assert 2.0 < ratio < 3.4, ratio


def test_fast_mean_path_equals_the_plain_pooled_statistic():
    """The vectorised mean (per-cluster sums / counts) and the literal definition (pool the rows
    of the resampled clusters, take their mean) see the same resamples: identical intervals."""
    df = clustered(np.random.default_rng(8))
    for method in ("BCa", "percentile", "basic"):
        fast = unc.cluster_bootstrap_ci(df, "dice", seed=4, n_resamples=999, method=method)
        slow = unc.cluster_bootstrap_ci(df, "dice", seed=4, n_resamples=999, method=method,
                                        statistic=lambda x: float(np.mean(x)))
        np.testing.assert_allclose(fast, slow, rtol=1e-12)


def test_percentile_interval_matches_a_hand_written_cluster_bootstrap():
    """An independent loop (draw clusters with replacement, pool their rows, mean; percentiles of
    20000 resamples) gives the same interval to within Monte-Carlo error."""
    df = clustered(np.random.default_rng(9))
    groups = [g["dice"].to_numpy() for _, g in df.groupby("source")]
    rng = np.random.default_rng(123)
    boots = np.empty(20000)
    for i in range(boots.size):
        pick = rng.integers(0, len(groups), len(groups))
        boots[i] = np.concatenate([groups[j] for j in pick]).mean()
    lo, hi = np.percentile(boots, [2.5, 97.5])
    res = unc.cluster_bootstrap_ci(df, "dice", seed=0, n_resamples=20000, method="percentile")
    width = hi - lo
    assert abs(res.low - lo) < 0.04 * width and abs(res.high - hi) < 0.04 * width


def test_same_seed_same_interval_and_edge_cases():
    df = clustered(np.random.default_rng(1))
    a = unc.cluster_bootstrap_ci(df, "dice", seed=3, n_resamples=999)
    assert unc.cluster_bootstrap_ci(df, "dice", seed=3, n_resamples=999) == a
    assert unc.cluster_bootstrap_ci(df, "dice", seed=4, n_resamples=999) != a
    assert a.estimate == pytest.approx(df["dice"].mean())
    # NaN rows are left out; one cluster: no interval; constant values: a point
    with_nan = pd.concat([df, df.head(3).assign(dice=np.nan)])
    assert unc.cluster_bootstrap_ci(with_nan, "dice", seed=3, n_resamples=999) == a
    one = df[df.source == df.source.iloc[0]]
    est, lo, hi, k = unc.cluster_bootstrap_ci(one, "dice")
    assert k == 1 and np.isnan(lo) and np.isnan(hi) and est == pytest.approx(one.dice.mean())
    assert tuple(unc.cluster_bootstrap_ci(df.assign(dice=50.0), "dice")) == (50.0, 50.0, 50.0, 30)
    empty = unc.cluster_bootstrap_ci(df.assign(dice=np.nan), "dice")
    assert empty.n_clusters == 0 and np.isnan(empty.estimate)
    with pytest.raises(KeyError, match="source"):
        unc.cluster_bootstrap_ci(df.drop(columns="source"), "dice")
    with pytest.raises(ValueError):
        unc.cluster_bootstrap_ci(df, "dice", ci=100)


def test_cluster_key_uses_source_else_image():
    df = pd.DataFrame({"task": ["a", "a", "a", "b"], "source": ["v.nii", "v.nii", None, "v.nii"],
                       "image_id": ["v_1", "v_2", "img", "v_1"]})
    assert unc.cluster_key(df).tolist() == ["a/v.nii", "a/v.nii", "a/img", "b/v.nii"]


def test_mean_with_ci_table():
    rng = np.random.default_rng(12)
    df = pd.concat([clustered(rng).assign(model=m, strategy=s) for m in ("vit_b", "vit_h") for s in ("S2", "S3")])
    table = unc.mean_with_ci(df, ["model", "strategy"], "dice", n_resamples=499, seed=7)
    assert list(table.columns) == ["model", "strategy", "dice", "dice_low", "dice_high", "n", "n_clusters"]
    assert len(table) == 4 and (table.n_clusters == 30).all()
    for r in table.itertuples():
        block = df[(df.model == r.model) & (df.strategy == r.strategy)]
        ref = unc.cluster_bootstrap_ci(block, "dice", n_resamples=499, seed=7)
        assert (r.dice, r.dice_low, r.dice_high, r.n_clusters) == tuple(ref)
        assert r.n == len(block)


# --------------------------------------------------------------------------- Holm


def test_holm_matches_statsmodels_and_hand_computation(monkeypatch):
    # statsmodels' multipletests calls gc.collect() on every call: ~0.4 s each in a test session
    # holding torch and the demo (27 s for these 50 draws); the collection changes no result.
    import gc

    monkeypatch.setattr(gc, "collect", lambda *a: 0)  # for this test only
    p = np.array([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max
    np.testing.assert_allclose(unc.holm(p), [0.03, 0.06, 0.06, 0.02])
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.uniform(0, 1, int(rng.integers(1, 20))) ** 3
        np.testing.assert_allclose(unc.holm(p), multipletests(p, method="holm")[1], rtol=1e-12)
    out = unc.holm([0.01, np.nan, 0.02])  # NaN: not a test
    assert np.isnan(out[1]) and np.allclose(out[[0, 2]], [0.02, 0.02])
    with pytest.raises(ValueError):
        unc.holm([1.5])


# --------------------------------------------------------------------------- paired comparisons


def paired_data(rng, shift=0.0, n_clusters=20, sd_cluster_diff=2.0):
    """Two strategies on the same objects; the A-B difference has a volume-level component."""
    base = clustered(rng, n_clusters=n_clusters)
    cdiff = {s: rng.normal(shift, sd_cluster_diff) for s in base.source.unique()}
    a = base.assign(strategy="A", label_value=1)
    b = base.assign(strategy="B", label_value=1,
                    dice=base.dice - base.source.map(cdiff) - rng.normal(0, 0.5, len(base)))
    return pd.concat([a, b], ignore_index=True)


def test_paired_comparison_numbers_match_their_definitions():
    df = paired_data(np.random.default_rng(21), shift=3.0)
    out = unc.paired_comparisons(df, "dice", "strategy", n_resamples=999)
    assert list(out.columns) == ["a", "b", "n_objects", "n_clusters", "mean_a", "mean_b", "mean_diff", "diff_low",
                                 "diff_high", "statistic", "p", "p_holm", "significant"]
    r = out.iloc[0]
    wide = df.pivot_table(index=["source", "image_id"], columns="strategy", values="dice").reset_index()
    d = wide.A - wide.B
    assert r.n_objects == len(wide) and r.n_clusters == 20
    assert r.mean_diff == pytest.approx(d.mean()) and r.mean_a - r.mean_b == pytest.approx(d.mean())
    assert r.diff_low < 3.0 < r.diff_high
    per_volume = d.groupby(wide.source).mean()
    ref = sps.wilcoxon(per_volume.to_numpy())
    assert r.statistic == pytest.approx(ref.statistic) and r.p == pytest.approx(ref.pvalue)
    assert r.p < 0.01 and r.significant and r.p_holm == r.p  # one comparison: Holm leaves it


def test_paired_tests_hold_their_level_with_clustered_null_data():
    """No true difference, but a difference shared by the slices of a volume: testing per-volume
    means rejects at about the nominal 5 %; a test on slices, treating them as independent,
    rejects much more often."""
    rng = np.random.default_rng(77)
    n_sim, rej, rej_naive = 200, 0, 0
    for _ in range(n_sim):
        df = paired_data(rng, shift=0.0, n_clusters=15)
        r = unc.paired_comparisons(df, "dice", "strategy", n_resamples=99).iloc[0]
        rej += r.p < 0.05
        rn = unc.paired_comparisons(df, "dice", "strategy", cluster="image_id", n_resamples=99).iloc[0]
        rej_naive += rn.p < 0.05
    assert rej / n_sim <= 0.09, rej / n_sim
    assert rej_naive / n_sim >= 0.3, rej_naive / n_sim


def test_paired_comparisons_groups_pairs_and_holm_family():
    rng = np.random.default_rng(3)
    parts = []
    for model, shift in (("vit_b", 3.0), ("vit_h", 0.0)):
        d = paired_data(rng, shift=shift)
        c = d[d.strategy == "A"].assign(strategy="C")
        parts.append(pd.concat([d, c]).assign(model=model))
    df = pd.concat(parts, ignore_index=True)
    out = unc.paired_comparisons(df, "dice", "strategy", by="model", n_resamples=199)
    assert out[["model", "a", "b"]].values.tolist() == [
        ["vit_b", "A", "B"], ["vit_b", "A", "C"], ["vit_b", "B", "C"],
        ["vit_h", "A", "B"], ["vit_h", "A", "C"], ["vit_h", "B", "C"]]
    np.testing.assert_allclose(out.p_holm, unc.holm(out.p))
    ac = out[(out.a == "A") & (out.b == "C")]
    assert (ac.p == 1.0).all() and (ac.mean_diff == 0).all()  # identical strategies
    only = unc.paired_comparisons(df, "dice", "strategy", pairs=[("B", "A")], by=["model"], n_resamples=199)
    assert len(only) == 2 and (only.a == "B").all()
    with pytest.raises(ValueError, match="repeated"):
        unc.paired_comparisons(df, "dice", "strategy")  # two models' rows for one object


@pytest.mark.parametrize("n", [2, 4, 5, 6, 8])
def test_smallest_wilcoxon_p_is_what_scipy_gives_for_all_one_sign(n):
    """All n differences positive and distinct: the exact two-sided test's smallest p, 2^(1-n)."""
    p = sps.wilcoxon(np.arange(1.0, n + 1), zero_method="wilcox", alternative="two-sided").pvalue
    assert unc.smallest_wilcoxon_p(n) == pytest.approx(p, rel=1e-12)
    assert (unc.smallest_wilcoxon_p(n) < 0.05) == (n >= 6)
    with pytest.raises(ValueError):
        unc.smallest_wilcoxon_p(0)


def test_every_resampling_function_defaults_to_the_one_count_of_its_purpose():
    for fn in (unc.cluster_bootstrap_ci, unc.mean_with_ci, unc.paired_comparisons, unc.with_intervals):
        assert inspect.signature(fn).parameters["n_resamples"].default == unc.N_RESAMPLES_TABLES, fn.__name__
    assert inspect.signature(unc.partial_spearman_ci).parameters["n_resamples"].default == unc.N_RESAMPLES_PARTIAL
    assert unc.interval_note().count(str(unc.N_RESAMPLES_TABLES)) == 1
