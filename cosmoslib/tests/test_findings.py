"""The paper's eight findings read from tables (cosmoslib.analysis.findings) and the volume chapter's
summaries (cosmoslib.analysis.volume_summaries).

Every verdict rule is run on small synthetic tables whose answer is known by construction --
one that holds, one that does not, one the data cannot decide -- including the interval-based
readings (a difference whose interval excludes 0, one bounded within the margin, one too
uncertain). Synthetic objects come in clusters (volumes) sharing an effect, as slices do.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from cosmoslib import paths
from cosmoslib.analysis import findings as fd
from cosmoslib.analysis import stats, uncertainty
from cosmoslib.analysis import volume_summaries as vs
from cosmoslib.protocol import metrics

N_BOOT = 999  # resamples in the tests (the chapter uses uncertainty.N_RESAMPLES_TABLES)


# --------------------------------------------------------------------------------------------
# synthetic tables
# --------------------------------------------------------------------------------------------


def objects(n_clusters=12, per_cluster=3, objects_=("Liver",), seed=0):
    """Objects on slices of volumes: ``n_clusters`` volumes per object name, ``per_cluster`` slices each."""
    rng = np.random.default_rng(seed)
    rows = []
    for o, name in enumerate(objects_):
        for c in range(n_clusters):
            effect = rng.normal()
            for s in range(per_cluster):
                rows.append({"task": f"t{o}", "image_id": f"{name}{c:02d}_{s:03d}", "label_value": 1,
                             "object": name, "modality": "CT", "source": f"{name}{c:02d}.nii.gz", "effect": effect})
    return pd.DataFrame(rows)


def results(means, n_clusters=12, per_cluster=3, sd_between=3.0, sd_within=0.3, seed=0, objects_=None):
    """A results table: DICE = mean[(model, strategy[, object])] + volume effect + slice noise, in [0, 100].

    The volume effect is shared by every model and strategy of an object (as real hard cases
    are), so paired differences carry only the slice noise.
    """
    names = objects_ or sorted({k[2] for k in means if len(k) == 3}) or ["Liver"]
    obj = objects(n_clusters, per_cluster, tuple(names), seed)
    rng = np.random.default_rng(seed + 1)
    rows = []
    for key, mean in means.items():
        model, strategy = key[:2]
        part = obj if len(key) == 2 else obj[obj["object"] == key[2]]
        dice = mean + sd_between * part["effect"].to_numpy() + rng.normal(0, sd_within, len(part))
        rows.append(part.drop(columns="effect").assign(
            model=model, strategy=strategy, shift_level=0, repeat=0, selection_rule="oracle_dice",
            dice=np.clip(dice, 0, 100), hd=np.clip(100 - dice, 0, None)))
    return pd.concat(rows, ignore_index=True)


def manifest_of(table):
    return table[["task", "image_id", "label_value", "source"]].drop_duplicates()


# --------------------------------------------------------------------------------------------
# the building blocks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("low, high, p, expected", [
    (0.5, 3.0, 0.01, "greater"),
    (0.5, 3.0, 0.20, "unclear"),        # interval above 0, test not significant after Holm
    (-3.0, -0.5, 0.01, "less"),
    (-0.4, 0.6, 0.50, "equivalent"),    # inside +-1 point
    (-0.4, 1.6, 0.50, "unclear"),
    (0.2, 0.8, 0.01, "greater"),        # greater wins over equivalent
    (float("nan"), 1.0, 0.01, "unclear"),
    (0.5, 3.0, float("nan"), "unclear"),
])
def test_compare_reads_an_interval_and_a_holm_p(low, high, p, expected):
    assert fd.compare(low, high, p) == expected


def test_compare_with_five_or_fewer_units_decides_nothing():
    """No two-sided Wilcoxon test on 5 units reaches 0.05: neither a difference nor an
    equivalence is read from so few units (their bootstrap interval is too narrow)."""
    assert fd.compare(-0.4, 0.6, 0.5, n_units=5) == "unclear"
    assert fd.compare(-0.4, 0.6, 0.5, n_units=6) == "equivalent"
    assert fd.compare(0.5, 3.0, 0.01, n_units=5) == "unclear"
    assert fd.compare(0.5, 3.0, 0.01, n_units=6) == "greater"
    assert fd.compare(-0.4, 0.6, 0.5) == "equivalent"  # units not given: not checked


def test_compare_margin_zero_never_says_equivalent():
    assert fd.compare(-0.1, 0.1, 0.9, margin=0.0) == "unclear"


def test_combine_needs_every_model_to_hold():
    assert fd.combine({"a": fd.HOLDS, "b": fd.HOLDS}) == fd.HOLDS
    assert fd.combine({"a": fd.HOLDS, "b": fd.DOES_NOT_HOLD}) == fd.DOES_NOT_HOLD
    assert fd.combine({"a": fd.HOLDS, "b": fd.CANNOT_DECIDE}) == fd.CANNOT_DECIDE
    assert fd.combine({}) == fd.CANNOT_DECIDE


def test_verdict_refuses_an_unknown_word():
    with pytest.raises(ValueError):
        fd.Verdict(1, "x", "maybe", "", "")


def test_fisher_ci_matches_the_hand_computed_interval():
    # r = 0.5, n = 103, no covariate: atanh(0.5) = 0.5493, se = 1/sqrt(100) = 0.1, z = 1.95996
    lo, hi = fd.fisher_ci(0.5, 103, 0)
    assert lo == pytest.approx(math.tanh(0.549306 - 0.195996), abs=1e-5)
    assert hi == pytest.approx(math.tanh(0.549306 + 0.195996), abs=1e-5)
    assert lo == pytest.approx(0.3393, abs=1e-3) and hi == pytest.approx(0.6322, abs=1e-3)
    lo4, hi4 = fd.fisher_ci(0.5, 103, 4)  # four covariates: fewer degrees of freedom, wider
    assert lo4 < lo and hi4 > hi
    assert all(math.isnan(v) for v in fd.fisher_ci(0.5, 7, 4))


def test_paper_findings_are_quoted_verbatim_from_the_abstract():
    text_path = paths.paper_text()
    if text_path is None:
        pytest.skip("the paper's text is not available (COSMOS_PAPER_TEXT or shared/seed)")
    text = text_path.read_text()
    abstract = text[text.index("ABSTRACT"):text.index("1. Introduction")].replace("*", "")
    for i, claim in enumerate(fd.PAPER_FINDINGS, start=1):
        assert f"{i}) {claim}" in re.sub(r"\s+", " ", abstract), i


def test_every_finding_has_a_rule():
    assert sorted(fd.RULES) == list(range(1, 9))


# --------------------------------------------------------------------------------------------
# intervals on the main table
# --------------------------------------------------------------------------------------------


def test_strategy_table_resamples_volumes_not_slices():
    """Copying every slice 10 times within its volume adds no independent evidence: the cluster
    interval is unchanged, while the row count grows tenfold."""
    base = results({("m", "S5"): 70.0, ("m", "S2"): 40.0}, per_cluster=1, sd_within=2.0)
    copies = pd.concat([base.assign(image_id=base["image_id"] + f"_{k}") for k in range(10)], ignore_index=True)
    one = fd.strategy_table(base, None, n_resamples=N_BOOT, seed=3)
    ten = fd.strategy_table(copies, None, n_resamples=N_BOOT, seed=3)
    assert (ten["n"] == 10 * one["n"]).all() and (ten["n_clusters"] == one["n_clusters"]).all()
    assert (one["n_clusters"] == 12).all()
    np.testing.assert_allclose(ten[["dice", "dice_low", "dice_high"]], one[["dice", "dice_low", "dice_high"]],
                               atol=1e-9)
    row = one.set_index("strategy").loc["S5"]
    assert row["dice_low"] < row["dice"] < row["dice_high"]


def test_strategy_table_takes_source_from_the_manifest_and_is_seeded():
    res = results({("m", "S5"): 70.0})
    man = manifest_of(res)
    a = fd.strategy_table(res.drop(columns="source"), man, n_resamples=N_BOOT, seed=1)
    b = fd.strategy_table(res.drop(columns="source"), man, n_resamples=N_BOOT, seed=1)
    pd.testing.assert_frame_equal(a, b)
    assert a["n_clusters"].iloc[0] == 12


def test_strategy_table_ignores_shifted_rows_and_the_other_rule():
    res = results({("m", "S5"): 70.0})
    noise = res.assign(shift_level=3, dice=0.0)
    other = res.assign(selection_rule="pred_iou", dice=0.0)
    t = fd.strategy_table(pd.concat([res, noise, other]), None, n_resamples=N_BOOT)
    assert t["dice"].iloc[0] == pytest.approx(res["dice"].mean())


def test_strategy_comparisons_are_holm_corrected_and_read():
    res = results({("m", "S5"): 70.0, ("m", "S2"): 40.0, ("m", "S3"): 40.2})
    comp = fd.strategy_comparisons(res, None, n_resamples=N_BOOT).set_index(["a", "b"])
    assert comp.loc[("S2", "S5"), "reading"] == "less"
    assert comp.loc[("S3", "S5"), "reading"] == "less"
    assert comp.loc[("S2", "S3"), "reading"] in ("equivalent", "less")  # 0.2 points apart, tight interval
    assert (comp["p_holm"] >= comp["p"]).all()


def test_format_ci_cells_follow_the_one_interval_rule():
    """The same cells as uncertainty.format_interval: one unit says so, missing bounds say so."""
    t = pd.DataFrame({"dice": [55.61, 3.0, 4.0, float("nan")], "dice_low": [50.12, float("nan"), float("nan"), 1.0],
                      "dice_high": [60.24, float("nan"), float("nan"), 2.0], "n_clusters": [12, 1, 5, 0]})
    assert fd.format_ci(t, "dice").tolist() == ["55.6 [50.1, 60.2]", "3.0 (n=1, no interval)",
                                                "4.0 (no interval)", ""]
    rows = t[["dice", "dice_low", "dice_high", "n_clusters"]].itertuples(index=False)
    assert fd.format_ci(t, "dice").tolist() == [uncertainty.format_interval(*r) for r in rows]
    # a one-unit row with bounds (they cannot be trusted) still shows no interval
    t1 = pd.DataFrame({"v": [70.0], "v_low": [60.0], "v_high": [80.0], "n_clusters": [1]})
    assert fd.format_ci(t1, "v").tolist() == ["70.0 (n=1, no interval)"]
    with pytest.raises(KeyError, match="n_clusters"):
        fd.format_ci(t.drop(columns="n_clusters"), "dice")


def test_strategy_table_cells_say_n1_for_a_single_volume():
    res = results({("m", "S5"): 70.0}, n_clusters=1)
    t = fd.strategy_table(res, None, n_resamples=N_BOOT)
    assert int(t["n_clusters"].iloc[0]) == 1
    assert fd.format_ci(t, "dice").iloc[0].endswith("(n=1, no interval)")


def test_module_resample_count_is_the_books_one_count():
    assert fd.N_RESAMPLES == uncertainty.N_RESAMPLES_TABLES


def test_why_unclear_names_the_reason():
    row = dict(n_objects=12, n_clusters=4, diff_low=1.0, diff_high=9.0, p_holm=0.125)
    assert "smallest possible p is 0.125" in fd.why_unclear(row)
    row.update(n_clusters=12, diff_low=-1.5, diff_high=4.0, p_holm=0.3)
    assert "neither show a difference" in fd.why_unclear(row)
    assert "no interval" in fd.why_unclear(dict(row, n_clusters=1))
    assert "no object" in fd.why_unclear(dict(row, n_objects=0, n_clusters=0))


# --------------------------------------------------------------------------------------------
# finding 1
# --------------------------------------------------------------------------------------------


def test_finding1_holds_when_one_object_is_remarkable_and_another_fails():
    res = results({("m", "S5", "Liver"): 93.0, ("m", "S5", "Tumor"): 20.0}, sd_between=2.0)
    v = fd.finding1(res, None, n_resamples=N_BOOT)
    assert v.verdict == fd.HOLDS
    reading = v.evidence.set_index("object")["reading"]
    assert reading["Liver"] == "remarkable" and reading["Tumor"] == "failing"


def test_finding1_does_not_hold_when_every_object_is_middling():
    res = results({("m", "S5", "Liver"): 65.0, ("m", "S5", "Tumor"): 60.0}, sd_between=2.0)
    v = fd.finding1(res, None, n_resamples=N_BOOT)
    assert v.verdict == fd.DOES_NOT_HOLD
    assert "none reaches 80 %" in v.reason


def test_finding1_cannot_decide_without_intervals():
    # one volume per object: no between-volume variation to build an interval from
    res = results({("m", "S5", "Liver"): 93.0, ("m", "S5", "Tumor"): 20.0}, n_clusters=1)
    assert fd.finding1(res, None, n_resamples=N_BOOT).verdict == fd.CANNOT_DECIDE
    assert fd.finding1(res[res["strategy"] != "S5"], None).verdict == fd.CANNOT_DECIDE


def test_finding1_needs_it_for_every_model():
    res = results({("a", "S5", "Liver"): 93.0, ("a", "S5", "Tumor"): 20.0,
                   ("b", "S5", "Liver"): 65.0, ("b", "S5", "Tumor"): 60.0}, sd_between=2.0)
    assert fd.finding1(res, None, n_resamples=N_BOOT).verdict == fd.DOES_NOT_HOLD


# --------------------------------------------------------------------------------------------
# finding 2
# --------------------------------------------------------------------------------------------


def _backbones(gain):
    means = {}
    for s, m in {"S1": 30.0, "S2": 50.0, "S5": 80.0}.items():
        means[(fd.SMALL_MODEL, s)] = m
        means[(fd.LARGE_MODEL, s)] = m + gain
    return results(means)


def test_finding2_holds_when_vit_h_is_better():
    v = fd.finding2(_backbones(5.0), None, n_resamples=N_BOOT)
    assert v.verdict == fd.HOLDS
    overall = v.evidence.iloc[0]
    assert overall["strategy"] == "all" and overall["mean_diff"] == pytest.approx(5.0, abs=0.3)
    assert set(v.evidence["strategy"]) == {"all", "S1", "S2", "S5"}


@pytest.mark.parametrize("gain", [0.0, -5.0])
def test_finding2_does_not_hold_when_vit_h_is_not_better(gain):
    v = fd.finding2(_backbones(gain), None, n_resamples=N_BOOT)
    assert v.verdict == fd.DOES_NOT_HOLD
    assert v.evidence.iloc[0]["reading"] == ("equivalent" if gain == 0 else "less")


def test_finding2_cannot_decide_with_one_model_or_few_volumes():
    one = results({("litemedsam", "S5"): 80.0})
    v = fd.finding2(one, None)
    assert v.verdict == fd.CANNOT_DECIDE and "needs both" in v.reason
    few = _backbones(5.0)
    few = few[few["source"].str[-9:-7].astype(int) < 4]  # 4 volumes: Wilcoxon cannot reach 0.05
    assert fd.finding2(few, None, n_resamples=N_BOOT).verdict == fd.CANNOT_DECIDE


# --------------------------------------------------------------------------------------------
# finding 3
# --------------------------------------------------------------------------------------------


def _strategies(s1=5.0, points=(40.0, 45.0, 47.0), s5=80.0, **kw):
    means = {("m", "S1"): s1, ("m", "S5"): s5}
    means.update({("m", s): p for s, p in zip(("S2", "S3", "S4"), points)})
    return results(means, **kw)


def test_finding3_holds_when_the_box_beats_everything_and_points():
    v = fd.finding3(_strategies(), None, n_resamples=N_BOOT)
    assert v.verdict == fd.HOLDS
    assert (v.evidence["reading"] == "greater").all() and len(v.evidence) == 4


def test_finding3_does_not_hold_when_a_point_strategy_matches_the_box():
    v = fd.finding3(_strategies(points=(40.0, 80.0, 47.0)), None, n_resamples=N_BOOT)
    assert v.verdict == fd.DOES_NOT_HOLD


def test_finding3_does_not_hold_when_everything_matches_the_box():
    v = fd.finding3(_strategies(s1=80.0, points=(40.0, 45.0, 47.0)), None, n_resamples=N_BOOT)
    assert v.verdict == fd.DOES_NOT_HOLD


def test_finding3_cannot_decide_on_few_volumes_or_without_s1():
    assert fd.finding3(_strategies(n_clusters=4), None, n_resamples=N_BOOT).verdict == fd.CANNOT_DECIDE
    res = _strategies()
    v = fd.finding3(res[res["strategy"] != "S1"], None)
    assert v.verdict == fd.CANNOT_DECIDE and "S1" in v.reason


# --------------------------------------------------------------------------------------------
# finding 4
# --------------------------------------------------------------------------------------------


def _study(hce_gain, time_gain, seed=0):
    obj = objects(12, 3, seed=seed)
    rng = np.random.default_rng(seed)
    n = len(obj)
    manual_hce = 5 + obj["effect"].to_numpy()
    manual_s = 60 + 5 * obj["effect"].to_numpy()
    return obj.drop(columns="effect").assign(
        hce=rng.uniform(4, 6, n), dice=80.0, seconds=0.5,
        hce_manual=manual_hce, hce_assisted=manual_hce - hce_gain + rng.normal(0, 0.05, n),
        seconds_manual=manual_s, seconds_assisted=manual_s - time_gain + rng.normal(0, 0.5, n))


def test_finding4_cannot_decide_without_a_human_study():
    assert fd.finding4(None).verdict == fd.CANNOT_DECIDE
    own = _study(0, 0).drop(columns=list(fd.STUDY_COLUMNS))
    v = fd.finding4(own, None, n_resamples=N_BOOT)
    assert v.verdict == fd.CANNOT_DECIDE
    assert f"{own['hce'].mean():.2f}" in v.reason and "no human study" in v.reason


def test_finding4_holds_when_assisted_annotation_is_better_and_faster():
    v = fd.finding4(_study(0.3, 20.0), None, n_resamples=N_BOOT)
    assert v.verdict == fd.HOLDS


def test_finding4_does_not_hold_when_assistance_is_slower():
    v = fd.finding4(_study(0.3, -20.0), None, n_resamples=N_BOOT)
    assert v.verdict == fd.DOES_NOT_HOLD


# --------------------------------------------------------------------------------------------
# finding 5
# --------------------------------------------------------------------------------------------


def _shifted(drops, repeats=3, n_clusters=12, seed=0):
    """Randomness table: drops[strategy] = (drop at level 1, 2, 3); repeats scatter around it."""
    base = results({("m", s): 70.0 for s in drops}, n_clusters=n_clusters, seed=seed)
    rng = np.random.default_rng(seed + 7)
    parts = [base]
    for s, levels in drops.items():
        b = base[base["strategy"] == s]
        for level, drop in enumerate(levels, start=1):
            for rep in range(repeats):
                parts.append(b.assign(shift_level=level, repeat=rep,
                                      dice=b["dice"] - drop + rng.normal(0, 0.3, len(b))))
    return pd.concat(parts, ignore_index=True)


def test_finding5_holds_with_significant_and_serious_drops():
    v = fd.finding5(_shifted({"S2": (3, 7, 15), "S5": (3, 10, 24)}), None, n_resamples=N_BOOT)
    assert v.verdict == fd.HOLDS
    top = v.evidence[v.evidence["b"] == 3].set_index("strategy")
    assert top.loc["S5", "mean_diff"] == pytest.approx(24, abs=0.5)


def test_finding5_does_not_hold_when_drops_are_small():
    v = fd.finding5(_shifted({"S2": (1, 2, 3), "S5": (1, 2, 4)}), None, n_resamples=N_BOOT)
    assert v.verdict == fd.DOES_NOT_HOLD  # significant but every interval below 10 points


def test_finding5_does_not_hold_when_the_point_is_insensitive():
    v = fd.finding5(_shifted({"S2": (0, 0, 0), "S5": (3, 10, 24)}), None, n_resamples=N_BOOT)
    assert v.verdict == fd.DOES_NOT_HOLD
    assert v.evidence.query("strategy == 'S2' and b == 3")["reading"].iloc[0] == "equivalent"


def test_finding5_cannot_decide_without_the_table_or_on_few_volumes():
    assert fd.finding5(None).verdict == fd.CANNOT_DECIDE
    few = _shifted({"S2": (3, 7, 15), "S5": (3, 10, 24)}, n_clusters=4)
    assert fd.finding5(few, None, n_resamples=N_BOOT).verdict == fd.CANNOT_DECIDE
    only_s5 = _shifted({"S5": (3, 10, 24)})
    assert fd.finding5(only_s5, None).verdict == fd.CANNOT_DECIDE


# --------------------------------------------------------------------------------------------
# finding 6
# --------------------------------------------------------------------------------------------


def _clicks(sam_curve, other_curve, n_clusters=12, seed=0):
    obj = objects(n_clusters, 3, seed=seed)
    rng = np.random.default_rng(seed)
    rows = []
    for method, curve in (("sam", sam_curve), ("sam+logits", sam_curve), ("grabcut", other_curve),
                          ("random_walker", [c - 5 for c in other_curve])):
        for click, mean in enumerate(curve, start=1):
            rows.append(obj.drop(columns="effect").assign(
                method=method, click=click,
                dice=np.clip(mean + 3 * obj["effect"] + rng.normal(0, 0.3, len(obj)), 0, 100)))
    return pd.concat(rows, ignore_index=True)


def test_finding6_holds_when_sam_starts_ahead_and_is_overtaken():
    v = fd.finding6(_clicks([60, 65, 66], [30, 60, 85]), None, n_resamples=N_BOOT)
    assert v.verdict == fd.HOLDS
    assert set(v.evidence["click"]) == {1, 3} and set(v.evidence["b"]) == {"grabcut", "random_walker"}


def test_finding6_does_not_hold_when_sam_stays_ahead():
    v = fd.finding6(_clicks([60, 70, 90], [30, 60, 80]), None, n_resamples=N_BOOT)
    assert v.verdict == fd.DOES_NOT_HOLD


def test_finding6_does_not_hold_when_sam_starts_behind():
    v = fd.finding6(_clicks([20, 40, 50], [30, 60, 85]), None, n_resamples=N_BOOT)
    assert v.verdict == fd.DOES_NOT_HOLD


def test_finding6_cannot_decide_without_methods_or_volumes():
    assert fd.finding6(None).verdict == fd.CANNOT_DECIDE
    t = _clicks([60, 65, 66], [30, 60, 85])
    assert fd.finding6(t[t["method"].str.startswith("sam")], None).verdict == fd.CANNOT_DECIDE
    few = _clicks([60, 65, 66], [30, 60, 85], n_clusters=4)
    assert fd.finding6(few, None, n_resamples=N_BOOT).verdict == fd.CANNOT_DECIDE


# --------------------------------------------------------------------------------------------
# finding 7
# --------------------------------------------------------------------------------------------


def _table6(r_fo, r_int, n, p_fo, p_int, models=("m",)):
    rows = []
    for model in models:
        for s in ("S2", "S3", "S4", "S5", "S6"):
            rows.append(dict(model=model, strategy=s, factor="fourier_order", r=r_fo, p=p_fo, n=n,
                             dropped_covariates=""))
            rows.append(dict(model=model, strategy=s, factor="intensity_diff", r=r_int, p=p_int, n=n,
                             dropped_covariates=""))
            rows.append(dict(model=model, strategy=s, factor="size_px", r=0.3, p=1e-5, n=n, dropped_covariates=""))
    return pd.DataFrame(rows)


def test_finding7_holds_with_the_papers_signs():
    v = fd.finding7(_table6(-0.5, 0.5, 300, 1e-9, 1e-9))
    assert v.verdict == fd.HOLDS
    assert set(v.evidence["factor"]) == {"fourier_order", "intensity_diff"}


def test_finding7_does_not_hold_when_a_factor_is_tightly_near_zero_or_reversed():
    assert fd.finding7(_table6(-0.5, 0.01, 2000, 1e-9, 0.6)).verdict == fd.DOES_NOT_HOLD
    assert fd.finding7(_table6(0.5, 0.5, 300, 1e-9, 1e-9)).verdict == fd.DOES_NOT_HOLD  # FO positive


def test_finding7_cannot_decide_on_small_samples():
    v = fd.finding7(_table6(-0.15, 0.15, 30, 0.4, 0.4))
    assert v.verdict == fd.CANNOT_DECIDE
    assert fd.finding7(None).verdict == fd.CANNOT_DECIDE


def test_finding7_on_a_real_table6():
    """DICE built to fall with the Fourier order and rise with the intensity difference: the
    partial correlations of stats.table6 pick that up and the finding holds."""
    rng = np.random.default_rng(5)
    n = 400
    fac = pd.DataFrame({"task": "t", "image_id": [f"i{k}" for k in range(n)], "label_value": 1,
                        "size_px": rng.uniform(100, 5000, n), "intensity_diff": rng.uniform(0, 80, n),
                        "fourier_order": rng.uniform(1, 40, n), "modality_code": rng.integers(0, 3, n),
                        "aspect_ratio": rng.uniform(0.2, 1, n)})
    rows = []
    for s in ("S2", "S3", "S4", "S5", "S6"):
        dice = 60 - fac["fourier_order"] + 0.5 * fac["intensity_diff"] + rng.normal(0, 5, n)
        rows.append(fac[["task", "image_id", "label_value"]].assign(model="m", strategy=s,
                                                                     selection_rule="oracle_dice", dice=dice))
    t6 = stats.table6(pd.concat(rows, ignore_index=True), fac)
    assert fd.finding7(t6).verdict == fd.HOLDS


# --------------------------------------------------------------------------------------------
# finding 8
# --------------------------------------------------------------------------------------------


def _finetuned(gain):
    return results({("base", "S5"): 70.0, ("base_ft", "S5"): 70.0 + gain, ("base", "S2"): 30.0,
                    ("base_ft", "S2"): 30.0})


def test_finding8_holds_when_the_finetuned_model_is_better():
    v = fd.finding8(_finetuned(5.0), None, {"base_ft": "base"}, n_resamples=N_BOOT)
    assert v.verdict == fd.HOLDS
    assert v.evidence["mean_diff"].iloc[0] == pytest.approx(5.0, abs=0.3)


@pytest.mark.parametrize("gain", [0.0, -3.0])
def test_finding8_does_not_hold_when_finetuning_does_not_help(gain):
    assert fd.finding8(_finetuned(gain), None, {"base_ft": "base"}, n_resamples=N_BOOT).verdict == fd.DOES_NOT_HOLD


def test_finding8_cannot_decide_without_a_pair_and_respects_the_test_split():
    res = _finetuned(5.0)
    assert fd.finding8(res, None, None).verdict == fd.CANNOT_DECIDE
    assert fd.finding8(res, None, {"other": "base"}).verdict == fd.CANNOT_DECIDE
    held_out = res[res["source"].str[-9:-7].astype(int) < 3][["task", "image_id", "label_value"]]
    v = fd.finding8(res, None, {"base_ft": "base"}, objects=held_out, n_resamples=N_BOOT)
    assert v.evidence["n_clusters"].iloc[0] == 3 and v.verdict == fd.CANNOT_DECIDE


# --------------------------------------------------------------------------------------------
# all of them
# --------------------------------------------------------------------------------------------


def test_all_findings_in_order_with_missing_tables_undecided():
    res = _strategies()
    verdicts = fd.all_findings(res, manifest_of(res), n_resamples=N_BOOT)
    assert [v.number for v in verdicts] == list(range(1, 9))
    assert [v.claim for v in verdicts] == list(fd.PAPER_FINDINGS)
    by = {v.number: v for v in verdicts}
    assert by[3].verdict == fd.HOLDS
    for k in (2, 4, 5, 6, 7, 8):
        assert by[k].verdict == fd.CANNOT_DECIDE
    table = fd.verdict_table(verdicts)
    assert table["finding"].tolist() == list(range(1, 9)) and set(table["verdict"]) <= set(fd.VERDICTS)


def test_all_findings_judges_finding8_on_the_finetuned_test_part():
    """The chapter's finetuned results (base rows with curriculum "none", the finetuned model's
    rows with its base and curriculum) decide finding 8; the run's own results never do."""
    run = _strategies()
    tuned = _finetuned(5.0).assign(base="base", curriculum=lambda t: np.where(t["model"] == "base_ft", "mixed", "none"))
    verdicts = fd.all_findings(run, None, finetuned_results=tuned, n_resamples=N_BOOT)
    v8 = verdicts[7]
    assert v8.verdict == fd.HOLDS and "on the test part" in v8.reason
    assert v8.evidence[["a", "b"]].values.tolist() == [["base_ft", "base"]]
    assert v8.evidence["mean_diff"].iloc[0] == pytest.approx(5.0, abs=0.3)
    for empty in (None, tuned.iloc[:0]):
        v = fd.all_findings(run, None, finetuned_results=empty, n_resamples=N_BOOT)[7]
        assert v.verdict == fd.CANNOT_DECIDE and "no finetuned model" in v.reason


def test_finding8_on_few_test_units_says_why_it_cannot_decide():
    tuned = _finetuned(5.0)
    few = tuned[tuned["source"].str[-9:-7].astype(int) < 4]
    v = fd.finding8(few, None, {"base_ft": "base"}, n_resamples=N_BOOT, scope="the test part")
    assert v.verdict == fd.CANNOT_DECIDE
    assert "4 independent units" in v.reason and "smallest possible p is 0.125" in v.reason


def test_finetuned_of_reads_base_and_curriculum():
    t = pd.DataFrame({"model": ["lite", "lite_mixed", "lite_box", "lite_mixed"],
                      "base": ["lite", "lite", "lite", "lite"], "curriculum": ["none", "mixed", "box", "mixed"]})
    assert fd.finetuned_of(t) == {"lite_mixed": "lite", "lite_box": "lite"}
    assert fd.finetuned_of(t.iloc[:0]) == {} and fd.finetuned_of(None) == {}
    with pytest.raises(KeyError, match="curriculum"):
        fd.finetuned_of(t.drop(columns="curriculum"))


class _Chapter:
    def randomness(self):
        return pd.DataFrame({"x": [1]})

    def annotation(self):
        return None


def test_chapter_table_reads_a_method_and_fails_loudly_on_a_missing_one():
    assert fd.chapter_table(_Chapter(), "randomness")["x"].tolist() == [1]
    with pytest.raises(fd.MissingTable, match="interaction.*finding 6"):
        fd.chapter_table(_Chapter(), "interaction")
    with pytest.raises(ValueError, match="no table 'randomnes'"):
        fd.chapter_table(_Chapter(), "randomnes")
    with pytest.raises(TypeError, match="NoneType"):
        fd.chapter_table(_Chapter(), "annotation")


def test_chapter_table_prefers_a_registry_of_named_tables():
    class Named(_Chapter):
        def table(self, name):
            if name != "interaction":
                raise KeyError(name)
            return pd.DataFrame({"y": [2]})

    assert fd.chapter_table(Named(), "interaction")["y"].tolist() == [2]
    with pytest.raises(KeyError):
        fd.chapter_table(Named(), "randomness")  # the registry's own error is not swallowed


def test_finding6_with_two_models_compares_each_with_the_classical_methods_only():
    """The chapter layer names each model's curves after the model: the second model and its
    previous-logits variant are SAMs, not interactive methods."""
    t = _clicks([60, 65, 66], [30, 60, 85])
    t = t.replace({"method": {"sam": "litemedsam", "sam+logits": "litemedsam + previous logits"}})
    other = t[t["method"].str.startswith("litemedsam")].replace(
        {"method": {"litemedsam": "mobilesam", "litemedsam + previous logits": "mobilesam + previous logits"}})
    t = pd.concat([t, other], ignore_index=True)
    run = results({("litemedsam", "S5"): 80.0, ("mobilesam", "S5"): 70.0})
    v = fd.all_findings(run, None, interaction=t, n_resamples=N_BOOT)[5]
    assert set(v.evidence["a"]) == {"litemedsam", "mobilesam"}
    assert set(v.evidence["b"]) == {"grabcut", "random_walker"}
    assert v.verdict == fd.HOLDS
    assert "litemedsam:" in v.reason and "mobilesam:" in v.reason


# --------------------------------------------------------------------------------------------
# volume summaries
# --------------------------------------------------------------------------------------------


def _volume(shift_rows=2):
    gt = np.zeros((8, 24, 20), bool)
    gt[2:6, 6:16, 5:14] = True
    pred = np.roll(gt, shift_rows, axis=1)
    rows = [{"task": "t", "image_id": f"v_{k:03d}", "label_value": 1, "object": "Box", "modality": "CT",
             "source": "v.nii.gz", "slice_index": k, "height": 24, "width": 20, "plane": "axial",
             "spacing_row": 0.7, "spacing_col": 0.9, "spacing_slice": 3.0} for k in range(2, 6)]
    return pd.DataFrame(rows), gt, pred


def test_volume_scores_put_redecoded_slices_back_and_score_in_mm():
    manifest, gt, pred = _volume()
    calls = []

    def redecode(task, image_id, label_value, strategy):
        k = int(image_id.split("_")[1])
        calls.append((image_id, strategy))
        mask = pred[k] if strategy == "S5" else np.zeros_like(pred[k])
        return None, gt[k], None, mask, float("nan")

    gt_masks = {("t", f"v_{k:03d}", 1): gt[k] for k in range(2, 6)}
    vt = vs.volume_scores(manifest, redecode, "m", root=None, gt=gt_masks)
    assert sorted(set(s for _, s in calls)) == ["S2", "S5"] and len(calls) == 8
    s5 = vt[vt["strategy"] == "S5"].iloc[0]
    expected = metrics.evaluate_mm(pred[:6], gt[:6], (3.0, 0.7, 0.9))
    for m in ("dice", "hd95", "assd", "nsd"):
        assert s5[m] == pytest.approx(expected[m]), m
    s2 = vt[vt["strategy"] == "S2"].iloc[0]
    assert s2["dice"] == 0 and s2["empty_pred"]


def test_volume_scores_without_volumes_is_empty():
    manifest = pd.DataFrame({"task": ["t"], "image_id": ["a"], "label_value": [1], "source": [None],
                             "slice_index": [-1], "height": [4], "width": [4]})
    out = vs.volume_scores(manifest, lambda *a: None, "m", root=None)
    assert out.empty and "dice" in out and "slice_dice" in out
    assert vs.side_by_side(out).empty and list(vs.side_by_side(out)) == vs.SIDE_COLUMNS


def test_side_by_side_pairs_3d_with_slice_means_over_the_same_volumes():
    vt = pd.DataFrame({
        "model": "m", "strategy": "S5", "task": "t", "source": [f"v{k}" for k in range(6)], "label_value": 1,
        "dice": [80, 70, 60, 90, 85, 75.0], "slice_dice": [82, 74, 61, 92, 88, 79.0],
        "nsd": [90, 80, float("nan"), 95, 85, 70.0], "slice_nsd": [88, 79, 50, 93, 84, 69.0],
        "hd95": [3, 4, float("nan"), 2, 3, 5.0], "slice_hd95": [2, 3, 9, 2, 2, 4.0],
        "assd": [1, 1.5, float("nan"), 0.8, 1, 2.0]})
    side = vs.side_by_side(vt, n_resamples=N_BOOT).set_index("metric")
    assert side.loc["DICE", "n_volumes"] == 6 and side.loc["NSD", "n_volumes"] == 5
    assert side.loc["DICE", "volume_3d"] == pytest.approx(vt["dice"].mean())
    assert side.loc["DICE", "slice_minus_volume"] == pytest.approx((vt["slice_dice"] - vt["dice"]).mean())
    keep = vt["nsd"].notna()
    assert side.loc["NSD", "slice_2d"] == pytest.approx(vt.loc[keep, "slice_nsd"].mean())  # same volumes only
    assert side.loc["DICE", "diff_low"] > 0  # every volume's slices look better than the volume
    assert math.isnan(side.loc["ASSD", "slice_2d"])


def test_gap_sentence_follows_the_numbers():
    gap = pd.DataFrame({"model": "m", "strategy": ["S5", "S2"], "n_volumes": [4, 4], "n_slices": [20, 20],
                        "slice_dice": [84.1, 30.0], "volume_dice": [80.3, 30.2]})
    assert vs.gap_sentence(gap, "S5") == ("the slice mean (84.1 %) exceeds the volume DICE (80.3 %) by 3.8 points "
                                          "over 4 volumes (20 slices)")
    assert "about equal" in vs.gap_sentence(gap, "S2")
    assert vs.gap_sentence(gap, "S6").startswith("no volume")
    lower = gap.assign(slice_dice=[70.0, 30.0])
    assert "falls below" in vs.gap_sentence(lower, "S5")


def test_cluster_unit_of_results_is_the_volume():
    res = results({("m", "S5"): 70.0})
    keys = uncertainty.cluster_key(uncertainty.with_source(res.drop(columns="source"), manifest_of(res)))
    assert keys.nunique() == 12


def test_status_and_metric_sentences_follow_the_tables():
    manifest, gt, pred = _volume()
    gt_masks = {("t", f"v_{k:03d}", 1): gt[k] for k in range(2, 6)}
    redecode = lambda task, image_id, lv, s: (None, None, None, pred[int(image_id.split("_")[1])], 0.0)
    vt = vs.volume_scores(manifest, redecode, "m", root=None, gt=gt_masks)
    assert vs.status_sentence(manifest, vt) == ("This config has 1 object volume in 1 source volume of 1 task, "
                                                "reassembled from 4 slices.")
    sampled = vt.assign(slice_gaps=2)
    assert "1 of them miss slices" in vs.status_sentence(manifest, sampled)
    assert vs.status_sentence(manifest, vt.iloc[:0]).startswith("This config has no volume source")
    side = vs.side_by_side(vt, n_resamples=N_BOOT)
    text = vs.metric_sentence(side, "S5", "DICE")
    assert text.startswith(f"DICE is {vt['dice'].iloc[0]:.1f} % in 3D (no interval)") and "1 volume" in text
    assert vs.metric_sentence(side, "S1", "DICE").startswith("no volume")
