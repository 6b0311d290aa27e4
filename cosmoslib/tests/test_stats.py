"""Spearman partial correlation and Table 6 against independent math."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from cosmoslib.analysis import stats as S


def _reference_partial_spearman(df, x, y, covar):
    """Independent: Pearson on ranks after regressing the ranked covariates out (lstsq)."""
    data = df[[x, y, *covar]].dropna()
    ranks = data.rank(method="average")
    n, k = len(data), len(covar)
    design = np.column_stack([np.ones(n), ranks[covar].to_numpy()])
    res = []
    for col in (x, y):
        v = ranks[col].to_numpy()
        beta, *_ = np.linalg.lstsq(design, v, rcond=None)
        res.append(v - design @ beta)
    r = float(np.corrcoef(res[0], res[1])[0, 1])
    dof = n - 2 - k
    t = r * math.sqrt(dof / (1 - r**2))
    p = float(2 * sps.t.sf(abs(t), dof))
    return r, p, n


def _frame(rng, n=300):
    z1 = rng.normal(size=n)
    z2 = rng.integers(0, 5, size=n).astype(float)  # ties
    x = z1 + 0.5 * z2 + rng.normal(size=n)
    y = -0.8 * z1 + 0.3 * x + rng.normal(size=n)
    return pd.DataFrame({"x": np.round(x, 1), "y": y, "z1": z1, "z2": z2,
                         "unused": rng.normal(size=n)})


def test_partial_spearman_equals_rank_regression():
    df = _frame(np.random.default_rng(0))
    got = S.partial_spearman(df, "x", "y", ["z1", "z2"])
    r, p, n = _reference_partial_spearman(df, "x", "y", ["z1", "z2"])
    assert got.r == pytest.approx(r, abs=1e-9)
    assert got.p == pytest.approx(p, abs=1e-9, rel=1e-9)
    assert (got.n, got.n_dropped) == (n, 0)


def test_partial_spearman_drops_and_counts_missing_rows():
    df = _frame(np.random.default_rng(1))
    df.loc[[3, 10, 11], "x"] = np.nan
    df.loc[[10, 40], "z2"] = np.nan
    df.loc[[50], "y"] = np.inf
    df.loc[[7, 8], "unused"] = np.nan  # not an input: must not be dropped
    got = S.partial_spearman(df, "x", "y", ["z1", "z2"])
    assert got.n_dropped == 5  # rows 3, 10, 11, 40, 50
    assert got.n == len(df) - 5
    clean = df.drop(index=[3, 10, 11, 40, 50])
    r, p, n = _reference_partial_spearman(clean, "x", "y", ["z1", "z2"])
    assert (got.r, got.n) == (pytest.approx(r, abs=1e-9), n)
    assert got.p == pytest.approx(p, abs=1e-9, rel=1e-9)


def test_partial_spearman_without_covariates_is_spearman():
    df = _frame(np.random.default_rng(2))
    got = S.partial_spearman(df, "x", "y", [])
    ref = sps.spearmanr(df["x"], df["y"])
    assert got.r == pytest.approx(ref.statistic, abs=1e-9)
    assert got.p == pytest.approx(ref.pvalue, rel=1e-6)


def test_partial_spearman_too_few_rows_and_bad_columns():
    df = _frame(np.random.default_rng(3), n=4)
    got = S.partial_spearman(df, "x", "y", ["z1", "z2"])  # n = 4 < k + 3 = 5
    assert math.isnan(got.r) and math.isnan(got.p) and got.n == 4
    with pytest.raises(KeyError):
        S.partial_spearman(df, "x", "nope", ["z1"])
    with pytest.raises(ValueError):
        S.partial_spearman(df, "x", "y", ["x"])


def _tables(rng, n_obj=400):
    """Factors where DICE falls with Fourier order and rises with the contrast magnitude
    (dark and bright objects alike), rest is noise."""
    keys = pd.DataFrame({"task": rng.choice(["a", "b"], n_obj),
                         "image_id": [f"im{i // 3}" for i in range(n_obj)],
                         "label_value": np.arange(n_obj) % 3 + 1})
    signed = rng.normal(0, 30, n_obj)
    factors = keys.assign(
        size_px=rng.integers(50, 5000, n_obj),
        intensity_diff=np.abs(signed),
        intensity_diff_signed=signed,
        fourier_order=rng.gamma(2.0, 5.0, n_obj),
        modality_code=rng.integers(0, 19, n_obj),
        aspect_ratio=rng.uniform(0.1, 1, n_obj),
    )
    rows = []
    for model in ("vit_b", "vit_h"):
        for strategy in ("S2", "S5"):
            dice = (80 - 1.0 * factors["fourier_order"] + 0.3 * factors["intensity_diff"]
                    + rng.normal(0, 5, n_obj))
            rows.append(keys.assign(model=model, strategy=strategy,
                                    selection_rule="oracle_dice", dice=dice))
            # pred_iou rows carry the opposite relation: they must be filtered out.
            rows.append(keys.assign(model=model, strategy=strategy, selection_rule="pred_iou",
                                    dice=factors["fourier_order"] * 3))
    return pd.concat(rows, ignore_index=True), factors


def test_table6_long_format_and_known_signs():
    results, factors = _tables(np.random.default_rng(4))
    t6 = S.table6(results, factors)
    assert list(t6.columns) == ["model", "strategy", "factor", "r", "p", "n", "n_dropped",
                                "significant", "dropped_covariates", "reading", "note"]
    assert len(t6) == 2 * 2 * 5
    assert list(t6["factor"].unique()) == list(S.TABLE6_FACTORS)
    fo = t6[t6["factor"] == "fourier_order"]
    inten = t6[t6["factor"] == "intensity_diff"]
    assert (fo["r"] < -0.5).all() and fo["significant"].all()
    assert (inten["r"] > 0.5).all() and inten["significant"].all()
    noise = t6[t6["factor"].isin(["modality_code", "aspect_ratio", "size_px"])]
    assert (noise["r"].abs() < 0.2).all()
    assert (t6["n"] == 400).all()
    assert (t6["dropped_covariates"] == "").all() and (t6["note"] == "").all()
    assert "paper's reading" in inten["reading"].iloc[0]


def test_table6_rows_equal_partial_spearman_on_the_hand_joined_block():
    results, factors = _tables(np.random.default_rng(5))
    factors.loc[factors.index[:7], "aspect_ratio"] = np.nan
    results = results[~((results["image_id"] == "im0") & (results["label_value"] == 1))]
    t6 = S.table6(results, factors)
    block = results[(results["model"] == "vit_h") & (results["strategy"] == "S5")
                    & (results["selection_rule"] == "oracle_dice")]
    block = block.merge(factors, on=["task", "image_id", "label_value"])
    cols = list(S.TABLE6_FACTORS)
    for factor in cols:
        ref = S.partial_spearman(block, factor, "dice", [c for c in cols if c != factor])
        row = t6[(t6["model"] == "vit_h") & (t6["strategy"] == "S5") & (t6["factor"] == factor)]
        assert row["r"].item() == pytest.approx(ref.r, abs=1e-12)
        assert row["n"].item() == ref.n == 399 - 6  # one result row removed, 7 - 1 NaN factors
        assert row["n_dropped"].item() == 6


def test_table6_signed_contrast_row_and_missing_columns():
    results, factors = _tables(np.random.default_rng(6))
    t6 = S.table6(results, factors, extra_factors=("intensity_diff_signed",))
    assert len(t6) == 2 * 2 * 6
    magnitude = t6[t6["factor"] == "intensity_diff"]
    signed = t6[t6["factor"] == "intensity_diff_signed"]
    # DICE follows the magnitude: the magnitude row finds it, the signed row (half the objects
    # darker than their surroundings) cannot.
    assert (magnitude["r"] > 0.5).all() and (signed["r"].abs() < 0.2).all()
    assert signed["reading"].str.contains("not the paper's reading").all()
    # The signed row replaces the magnitude among the covariates (the paper's other four).
    block = results[(results["model"] == "vit_b") & (results["strategy"] == "S2")
                    & (results["selection_rule"] == "oracle_dice")].merge(factors)
    ref = S.partial_spearman(block, "intensity_diff_signed", "dice",
                             ["size_px", "fourier_order", "modality_code", "aspect_ratio"])
    got = signed[(signed["model"] == "vit_b") & (signed["strategy"] == "S2")]["r"].item()
    assert got == pytest.approx(ref.r, abs=1e-12)
    # A signed table in the magnitude column is refused, not silently used.
    old = factors.assign(intensity_diff=factors["intensity_diff_signed"])
    with pytest.raises(ValueError, match="negative"):
        S.table6(results, old)
    with pytest.raises(KeyError, match="intensity_diff_signed"):
        S.table6(results, factors.drop(columns="intensity_diff_signed"),
                 extra_factors=("intensity_diff_signed",))
    with pytest.raises(KeyError, match="dice"):
        S.table6(results.drop(columns="dice"), factors)
    with pytest.raises(KeyError, match="fourier_order"):
        S.table6(results, factors.drop(columns="fourier_order"))


# ------------------------------------------------------------------------------------------
# constant covariates and the notes that explain NaN cells
# ------------------------------------------------------------------------------------------


def test_constant_covariate_is_dropped_and_matches_the_rank_regression_without_it():
    df = _frame(np.random.default_rng(8)).assign(modality_code=18)
    got = S.partial_spearman(df, "x", "y", ["z1", "modality_code", "z2"])
    r, p, n = _reference_partial_spearman(df, "x", "y", ["z1", "z2"])
    assert got.dropped_covariates == ("modality_code",) and got.note == ""
    assert got.r == pytest.approx(r, abs=1e-9)
    assert got.p == pytest.approx(p, abs=1e-9, rel=1e-9)  # dof counts the two used covariates
    assert (got.n, got.n_dropped) == (n, 0)


def test_covariate_constant_only_after_incomplete_rows_go_and_all_missing_covariate():
    df = _frame(np.random.default_rng(9))
    df["z3"] = 1.0
    df.loc[:9, "z3"] = np.arange(10.0)
    df.loc[:9, "z1"] = np.nan  # the rows where z3 varies lack z1
    df["z4"] = np.nan  # never measured
    got = S.partial_spearman(df, "x", "y", ["z1", "z3", "z4", "z2"])
    assert got.dropped_covariates == ("z4", "z3")
    r, p, n = _reference_partial_spearman(df, "x", "y", ["z1", "z2"])
    assert (got.r, got.n, got.n_dropped) == (pytest.approx(r, abs=1e-9), n, 10)


def test_nan_coefficients_always_say_why():
    df = _frame(np.random.default_rng(10))
    const_x = S.partial_spearman(df.assign(x=2.0), "x", "y", ["z1"])
    assert math.isnan(const_x.r) and "factor x constant in this block" in const_x.note
    const_y = S.partial_spearman(df.assign(y=70.0), "x", "y", ["z1"])
    assert math.isnan(const_y.r) and "outcome y constant" in const_y.note
    few = S.partial_spearman(df.head(4), "x", "y", ["z1", "z2"])
    assert math.isnan(few.r) and "fewer than k+3 = 5 complete rows (n = 4" in few.note
    same = S.partial_spearman(df.assign(z3=df["x"]), "x", "y", ["z1", "z3"])
    assert math.isnan(same.r) and "z3 has the same ranks as x" in same.note
    monotone = S.partial_spearman(df.assign(z3=np.exp(df["y"])), "x", "y", ["z3"])
    assert math.isnan(monotone.r) and "same ranks as y" in monotone.note
    collinear = S.partial_spearman(df.assign(z3=2 * df["z1"]), "x", "y", ["z1", "z3"])
    assert math.isfinite(collinear.r) and "collinear" in collinear.note


def test_table6_on_one_modality_names_the_dropped_covariate_and_the_constant_factor():
    results, factors = _tables(np.random.default_rng(11))
    factors["modality_code"] = 18  # every object "unknown": the authors' release without hints
    factors.loc[factors["task"] == "a", "aspect_ratio"] = np.nan
    t6 = S.table6(results, factors)
    mod = t6[t6["factor"] == "modality_code"]
    assert mod["r"].isna().all()
    assert mod["note"].str.contains("factor modality_code constant in this block").all()
    rest = t6[t6["factor"] != "modality_code"]
    assert rest["r"].notna().all()
    assert (rest["dropped_covariates"] == "modality_code").all()
    # Every NaN r has a note, and each finite r equals the independent rank regression.
    assert (t6.loc[t6["r"].isna(), "note"] != "").all()
    block = results[(results["model"] == "vit_h") & (results["strategy"] == "S2")
                    & (results["selection_rule"] == "oracle_dice")].merge(factors)
    for factor in ("size_px", "intensity_diff", "fourier_order", "aspect_ratio"):
        covar = [c for c in ("size_px", "intensity_diff", "fourier_order", "aspect_ratio")
                 if c != factor]
        r, p, n = _reference_partial_spearman(block, factor, "dice", covar)
        row = rest[(rest["model"] == "vit_h") & (rest["strategy"] == "S2")
                   & (rest["factor"] == factor)]
        assert row["r"].item() == pytest.approx(r, abs=1e-9)
        assert row["n"].item() == n
