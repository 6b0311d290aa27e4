"""Intervals on every table cell and bar (cosmoslib.analysis.uncertainty.with_intervals,
partial_spearman_ci; cosmoslib.analysis.interval_tables).

Coverage is checked by simulation against known truths, the resampling unit with data built so
that unit and row resampling must differ, the partial-correlation draws against pingouin on the
same resampled tables, and the table functions against the summaries they add intervals to.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pingouin
import pytest

from cosmoslib.analysis import interval_tables, stats, summaries
from cosmoslib.analysis import uncertainty as unc

TRUE_MEAN = 70.0


def clustered(rng, n_units=30, sd_between=4.0, sd_within=1.5, sizes=(3, 12), groups=("a", "b")):
    """Slices of volumes in two groups: a volume effect shared by its slices plus slice noise."""
    rows = []
    for g in groups:
        for c in range(n_units):
            effect = rng.normal(0.0, sd_between)
            for s in range(int(rng.integers(*sizes))):
                rows.append({"group": g, "task": "t", "source": f"{g}{c:03d}.nrrd", "image_id": f"{g}{c:03d}_{s}",
                             "dice": TRUE_MEAN + effect + rng.normal(0.0, sd_within)})
    return pd.DataFrame(rows)


def test_with_intervals_cover_the_true_mean_at_about_the_nominal_rate():
    """120 simulated data sets x 2 groups of 30 volumes: each group's 95 % interval covers the
    true mean in 89-99 % of the 240 cells (binomial sd 1.4 points), while resampling slices as
    if independent covers far less often."""
    rng = np.random.default_rng(13)
    hits = naive = cells = 0
    for _ in range(120):
        df = clustered(rng)
        out = unc.with_intervals(df, "dice", "group", n_resamples=499, seed=int(rng.integers(1 << 31)))
        assert list(out.columns) == ["group", "mean", "low", "high", "n", "n_units"]
        assert (out["n_units"] == 30).all()
        hits += int(((out["low"] <= TRUE_MEAN) & (TRUE_MEAN <= out["high"])).sum())
        rows = unc.with_intervals(df, "dice", "group", unit="image_id", n_resamples=499, seed=1)
        naive += int(((rows["low"] <= TRUE_MEAN) & (TRUE_MEAN <= rows["high"])).sum())
        cells += len(out)
    assert 0.89 <= hits / cells <= 0.99, hits / cells
    assert naive / cells < 0.75, naive / cells


def test_with_intervals_resamples_units_not_rows():
    """Volumes whose 6 slices are identical copies give the interval of one value per volume;
    the mean and counts are those of the rows."""
    rng = np.random.default_rng(3)
    vol = pd.DataFrame({"task": "t", "source": [f"v{i}" for i in range(20)], "dice": rng.uniform(30, 95, 20)})
    slices = vol.loc[vol.index.repeat(6)].reset_index(drop=True)
    slices["image_id"] = slices["source"] + "_" + slices.groupby("source").cumcount().astype(str)
    vol["image_id"] = vol["source"] + "_0"
    a = unc.with_intervals(vol, "dice", n_resamples=999, seed=4)
    b = unc.with_intervals(slices, "dice", n_resamples=999, seed=4)
    np.testing.assert_allclose(b[["mean", "low", "high"]].to_numpy(), a[["mean", "low", "high"]].to_numpy(),
                               atol=1e-9)
    assert int(b["n"].iloc[0]) == 120 and int(b["n_units"].iloc[0]) == 20
    rows = unc.with_intervals(slices, "dice", unit="image_id", n_resamples=999, seed=4)
    assert rows["high"].iloc[0] - rows["low"].iloc[0] < 0.6 * (b["high"].iloc[0] - b["low"].iloc[0])


def test_with_intervals_is_seeded():
    df = clustered(np.random.default_rng(8), n_units=12)
    a = unc.with_intervals(df, "dice", "group", n_resamples=299, seed=5)
    b = unc.with_intervals(df, "dice", "group", n_resamples=299, seed=5)
    c = unc.with_intervals(df, "dice", "group", n_resamples=299, seed=6)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["low"], c["low"])


def test_one_unit_cells_say_so_instead_of_an_interval():
    df = pd.DataFrame({"task": "t", "source": ["only.nii.gz"] * 4 + ["x.nii", "y.nii"],
                       "image_id": list("abcdef"), "g": ["one"] * 4 + ["two"] * 2,
                       "dice": [60.0, 70.0, 80.0, 90.0, 50.0, 55.0]})
    out = unc.with_intervals(df, "dice", "g", n_resamples=199).set_index("g")
    assert out.loc["one", "n_units"] == 1 and math.isnan(out.loc["one", "low"])
    assert out.loc["one", "mean"] == pytest.approx(75.0)
    cells = unc.interval_cells(out.reset_index().assign(col="dice"), "g", "col")
    assert cells.loc["one", "dice"] == "75.0 (n=1, no interval)"
    assert cells.loc["two", "dice"].startswith("52.5 [")
    assert unc.format_interval(float("nan"), 1, 2, 5) == ""
    assert unc.format_interval(3.0, float("nan"), float("nan"), 4) == "3.0 (no interval)"


def test_one_n1_rule_for_cells_and_prose():
    """missing_interval is the rule; the cell and the prose forms follow it (one unit: no
    interval even when bounds were passed; missing bounds: "no interval")."""
    assert unc.missing_interval(1.0, 2.0, 5) is None
    assert unc.missing_interval(1.0, 2.0, 1) == unc.ONE_UNIT == "n=1, no interval"
    assert unc.missing_interval(float("nan"), 2.0, 5) == unc.NO_INTERVAL
    assert unc.missing_interval(None, None, 3) == unc.NO_INTERVAL
    assert unc.format_interval(55.61, 50.12, 60.24, 12) == "55.6 [50.1, 60.2]"
    assert unc.format_interval(55.61, 50.12, 60.24, 1) == "55.6 (n=1, no interval)"
    assert unc.format_interval(55.61, 50.12, 60.24, 12, digits=2) == "55.61 [50.12, 60.24]"
    assert unc.interval_phrase(50.12, 60.24, 12) == "95 % CI 50.1 to 60.2"
    assert unc.interval_phrase(50.12, 60.24, 12, ci=90) == "90 % CI 50.1 to 60.2"
    assert unc.interval_phrase(50.12, 60.24, 1) == "n=1, no interval"
    assert unc.interval_phrase(float("nan"), float("nan"), 3) == "no interval"
    assert "n=1: a single unit, no interval" in unc.interval_note()


# --------------------------------------------------------------------------- partial correlation


def factor_data(rng, n_units=30, per_unit=(4, 10), beta=0.0):
    """Objects in volumes: factor x, covariates c1, c2 and dice y. x and y each carry an
    independent volume effect (so rows of a volume are correlated), y depends on c1 and, with
    ``beta``, on x."""
    rows = []
    for u in range(n_units):
        ax_, ay = rng.normal(0, 1.5), rng.normal(0, 1.5)
        for s in range(int(rng.integers(*per_unit))):
            c1, c2 = rng.normal(), rng.normal()
            x = ax_ + 0.5 * c2 + rng.normal(0, 0.5)
            y = ay + beta * x + 0.8 * c1 + rng.normal(0, 0.5)
            rows.append(dict(task="t", source=f"v{u}", image_id=f"v{u}_{s}", x=x, y=y, c1=c1, c2=c2))
    return pd.DataFrame(rows)


def test_partial_spearman_ci_draws_match_pingouin_on_the_same_resamples():
    """Every bootstrap draw equals pingouin's partial_corr (spearman) on the pooled rows of the
    same resampled volumes (the documented draw scheme), so the interval is that of pingouin."""
    rng = np.random.default_rng(21)
    df = factor_data(rng, n_units=12, beta=0.4)
    n_res, seed = 40, 9
    res = unc.partial_spearman_ci(df, "x", "y", ["c1", "c2"], n_resamples=n_res, seed=seed)
    ref_r = float(pingouin.partial_corr(data=df, x="x", y="y", covar=["c1", "c2"], method="spearman")["r"].iloc[0])
    assert res.r == pytest.approx(ref_r, abs=1e-10)
    assert res.n == len(df) and res.n_units == 12 and res.n_draws == n_res
    codes, _ = pd.factorize(unc.cluster_key(df), sort=True)
    draws = []
    for picks in unc.cluster_draws(12, n_res, seed):
        pooled = pd.concat([df[codes == c] for c in picks], ignore_index=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = pingouin.partial_corr(data=pooled, x="x", y="y", covar=["c1", "c2"], method="spearman")
        draws.append(float(out["r"].iloc[0]))
    low, high = np.percentile(draws, [2.5, 97.5])
    assert res.low == pytest.approx(low, abs=1e-9) and res.high == pytest.approx(high, abs=1e-9)


def test_partial_spearman_ci_covers_zero_at_about_the_nominal_rate():
    """x and y independent given the covariates (true partial rho 0) but each clustered by
    volume: the volume bootstrap covers 0 in 87-99 % of 120 data sets; resampling rows as if
    independent covers far less often."""
    rng = np.random.default_rng(5)
    hits = naive = 0
    n_sim = 120
    for _ in range(n_sim):
        df = factor_data(rng)
        res = unc.partial_spearman_ci(df, "x", "y", ["c1", "c2"], n_resamples=200, seed=int(rng.integers(1 << 31)))
        hits += res.low <= 0 <= res.high
        rows = unc.partial_spearman_ci(df, "x", "y", ["c1", "c2"], unit="image_id", n_resamples=200, seed=1)
        naive += rows.low <= 0 <= rows.high
    assert 0.87 <= hits / n_sim <= 0.99, hits / n_sim
    assert naive / n_sim < 0.8, naive / n_sim


def test_partial_spearman_ci_seeded_and_one_unit():
    df = factor_data(np.random.default_rng(2), n_units=10, beta=0.5)
    a = unc.partial_spearman_ci(df, "x", "y", ["c1"], n_resamples=100, seed=3)
    assert a == unc.partial_spearman_ci(df, "x", "y", ["c1"], n_resamples=100, seed=3)
    assert a.low < a.r < a.high
    one = unc.partial_spearman_ci(df.assign(source="same"), "x", "y", ["c1"], n_resamples=100)
    assert one.r == pytest.approx(a.r) and math.isnan(one.low) and one.note == unc.ONE_UNIT


# --------------------------------------------------------------------------- table functions


@pytest.fixture(scope="module")
def fake_run():
    """A results table of 2 models x S1, S2, S5 x 2 rules on 3 tasks (one of them a single
    volume), with its manifest; DICE drawn per object."""
    rng = np.random.default_rng(0)
    man, res = [], []
    for task, obj, mod, n_src in (("a", "liver", "CT", 4), ("b", "brain", "MRI", 1), ("c", "cell", "Microscopy", 5)):
        for v in range(n_src):
            for s in range(3):
                image_id = f"{task}{v}_{s}"
                man.append(dict(task=task, image_id=image_id, label_value=1, object=obj, modality=mod,
                                source=f"{task}{v}.nii.gz"))
                for model in ("m1", "m2"):
                    for strategy in ("S1", "S2", "S5"):
                        for rule in ("oracle_dice", "pred_iou"):
                            res.append(dict(task=task, image_id=image_id, label_value=1, object=obj, modality=mod,
                                            model=model, strategy=strategy, selection_rule=rule, shift_level=0,
                                            dice=float(rng.uniform(20, 95)), hd=float(rng.uniform(2, 40)),
                                            t_embed_s=float(rng.uniform(0.1, 0.2)),
                                            t_decode_s=float(rng.uniform(0.01, 0.02)), empty_pred=False))
    return pd.DataFrame(res), pd.DataFrame(man)


def test_table_intervals_match_the_summaries_and_flag_single_volumes(fake_run):
    results, manifest = fake_run
    t2 = interval_tables.object_modality_intervals(results, manifest, "dice", n_resamples=199)
    ref = summaries.object_modality_table(results, "dice").stack(["model", "strategy"], future_stack=True)
    got = t2.set_index(["object_modality", "model", "strategy"])["mean"]
    pd.testing.assert_series_equal(got.sort_index(), ref.sort_index(), check_names=False, atol=1e-9)
    brain = t2[t2["object_modality"] == "brain-MRI"]
    assert (brain["n_units"] == 1).all() and brain["low"].isna().all()
    liver = t2[t2["object_modality"] == "liver-CT"]
    assert (liver["n_units"] == 4).all() and (liver["low"] <= liver["mean"]).all()
    cells = unc.interval_cells(t2, "object_modality", ["model", "strategy"])
    assert cells.loc["brain-MRI"].str.endswith("(n=1, no interval)").all()

    fig6 = interval_tables.strategy_intervals(results, manifest, n_resamples=199)
    means = summaries.strategy_means(results).set_index(["model", "strategy"])
    for metric in ("dice", "hd"):
        part = fig6[fig6["metric"] == metric].set_index(["model", "strategy"])
        np.testing.assert_allclose(part["mean"], means.loc[part.index, metric], atol=1e-9)
        assert (part["n_units"] == 10).all()

    rules = interval_tables.selection_rule_intervals(results, manifest, n_resamples=199)
    table = summaries.selection_rule_table(results)
    for column in ("oracle_dice", "pred_iou", "loss"):
        part = rules[rules["column"] == column].set_index(["model", "strategy"])
        np.testing.assert_allclose(part["mean"], table.loc[part.index, column], atol=1e-9)

    t4 = interval_tables.timing_intervals(results, manifest, n_resamples=199).set_index(["model", "stage"])
    ref4 = summaries.timing_table(results)
    for (model, stage), row in t4.iterrows():
        assert row["mean"] == pytest.approx(ref4.loc[model, stage])


def test_table8_intervals_match_table8(fake_run):
    results, manifest = fake_run
    base = results[(results["strategy"] != "S1")]
    rng = np.random.default_rng(1)
    shifted = [base]
    for level in (1, 2):
        for rep in (1, 2):
            shifted.append(base.assign(shift_level=level, repeat=rep,
                                       dice=base["dice"] - rng.uniform(0, 10 * level, len(base))))
    shifted = pd.concat(shifted, ignore_index=True)
    shifted["repeat"] = shifted["repeat"].fillna(0).astype(int)
    got = interval_tables.table8_intervals(shifted, manifest, n_resamples=199)
    ref = summaries.table8(shifted)
    keys = ["model", "strategy", "shift_level", "run"]
    merged = got.merge(ref, on=keys)
    assert len(merged) == len(ref) == len(got)
    np.testing.assert_allclose(merged["mean"], merged["dice_drop"], atol=1e-9)
    assert (merged["n_units"] == 10).all() and (merged["low"] <= merged["mean"]).all()


def test_table6_intervals_match_table6(fake_run):
    results, manifest = fake_run
    keys = results[["task", "image_id", "label_value"]].drop_duplicates()
    rng = np.random.default_rng(4)
    factors = keys.assign(size_px=rng.uniform(10, 1000, len(keys)), intensity_diff=rng.uniform(0, 50, len(keys)),
                          fourier_order=rng.uniform(2, 20, len(keys)), aspect_ratio=rng.uniform(1, 3, len(keys)),
                          modality_code=keys["task"].map({"a": 1, "b": 2, "c": 3}))
    ref = stats.table6(results, factors)
    got = interval_tables.table6_intervals(results, factors, manifest, n_resamples=60)
    merged = got.merge(ref, on=["model", "strategy", "factor"], suffixes=("", "_ref"))
    assert len(merged) == len(ref)
    np.testing.assert_allclose(merged["r"], merged["r_ref"], atol=1e-10)
    assert (merged["n_units"] == 10).all()
    ok = merged["low"].notna()
    assert ok.all() and (merged["low"] <= merged["r"] + 1e-12).all() and (merged["r"] <= merged["high"] + 1e-12).all()


def test_weighted_partial_corr_equals_the_expanded_table_with_ties():
    """Integer weights give the coefficient of the table with each row repeated that often,
    ties (repeated rows and equal values) included; a constant x gives NaN."""
    rng = np.random.default_rng(7)
    data = np.column_stack([rng.integers(0, 6, 40), rng.normal(size=40), rng.integers(0, 3, 40), rng.normal(size=40)])
    weights = rng.integers(0, 4, size=(25, 40)).astype(float)
    got = unc.weighted_partial_corr(data, weights)
    for w, r in zip(weights, got):
        expanded = np.repeat(data, w.astype(int), axis=0)
        assert r == pytest.approx(unc.partial_corr_from_ranks(expanded), abs=1e-10)
    flat = data.copy()
    flat[:, 0] = 2.0
    assert np.isnan(unc.weighted_partial_corr(flat, weights)).all()
