"""The book's own question: the run's medical model against its general SAM
(cosmoslib.analysis.findings.general_vs_medical).

The models are real registry names, so their natures and training prompts come from the
registry as in the book: ``litemedsam`` and ``medsam`` are medical and box-trained,
``mobilesam`` and ``sam_vit_b`` general and trained with points and boxes. The DICE values are
generated with a known answer (see ``cosmoslib.tests.test_findings.results``: a volume effect shared
by every model and strategy of an object, plus slice noise).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cosmoslib.analysis import findings as fd
from cosmoslib.tests.test_findings import N_BOOT, manifest_of, results

MED, GEN = "litemedsam", "mobilesam"


def _run(s5_medical, s5_general, points_medical=20.0, points_general=60.0, objects_=None, **kw):
    """S1, S2 (points) and S5, S6 (box) for a medical and a general model."""
    means = {}
    names = objects_ or ["Liver"]
    for obj in names:
        for model, s5, pts in ((MED, s5_medical, points_medical), (GEN, s5_general, points_general)):
            for s, m in (("S1", pts - 10), ("S2", pts), ("S5", s5), ("S6", s5 + 1)):
                means[(model, s, obj) if objects_ else (model, s)] = m
    return results(means, objects_=objects_, **kw)


def test_a_clearly_better_medical_model_is_found_on_the_box():
    res = _run(80.0, 70.0)
    a = fd.general_vs_medical(res.drop(columns="source"), manifest_of(res), n_resamples=N_BOOT)
    assert a.answer == fd.MEDICAL_BETTER and a.label == fd.OWN_QUESTION_LABEL
    assert a.question == fd.GENERAL_VS_MEDICAL
    top = a.evidence[a.evidence["part"] == "answer"].iloc[0]
    # the answer reads S5 only: S6 adds a point, which litemedsam was never trained with
    assert top["strategy"] == "S5" and (top["medical"], top["general"]) == (MED, GEN)
    assert top["mean_diff"] == pytest.approx(10.0, abs=0.3) and top["reading"] == "greater"
    per = a.evidence[a.evidence["part"] == "strategy"].set_index("strategy")
    assert per.loc["S5", "in_answer"] and not per.loc["S2", "in_answer"] and not per.loc["S6", "in_answer"]
    # on points the general model is better: shown, but not what the answer reads
    assert per.loc["S2", "answer"] == fd.GENERAL_BETTER and per.loc["S2", "mean_diff"] == pytest.approx(-40, abs=0.5)
    assert per.loc["S5", "answer"] == fd.MEDICAL_BETTER
    assert (per["p_holm"] >= per["p"]).all()
    assert "S2 general better" in a.reason and "S5 medical better" in a.reason
    assert a.evidence.columns.tolist() == fd.COMPARISON_COLUMNS


def test_a_clearly_better_general_model_gives_the_other_direction():
    a = fd.general_vs_medical(_run(70.0, 80.0), None, n_resamples=N_BOOT)
    assert a.answer == fd.GENERAL_BETTER
    assert a.evidence[a.evidence["part"] == "answer"]["mean_diff"].iloc[0] == pytest.approx(-10.0, abs=0.3)


def test_equal_models_on_few_volumes_cannot_be_decided_and_say_why():
    a = fd.general_vs_medical(_run(75.0, 75.0, n_clusters=4), None, n_resamples=N_BOOT)
    assert a.answer == fd.CANNOT_DECIDE
    assert "4 independent units" in a.reason and "smallest possible p is 0.125" in a.reason


def test_equal_models_on_many_volumes_show_no_difference():
    # per-object differences carry only slice noise (sd 0.3 * sqrt 2): the interval lies within +-1 point
    a = fd.general_vs_medical(_run(75.0, 75.0, n_clusters=12), None, n_resamples=N_BOOT)
    assert a.answer == fd.NO_DIFFERENCE


def test_a_large_difference_on_few_volumes_is_still_undecided():
    a = fd.general_vs_medical(_run(90.0, 50.0, n_clusters=5), None, n_resamples=N_BOOT)
    assert a.answer == fd.CANNOT_DECIDE and "5 independent units" in a.reason


@pytest.mark.parametrize("models, missing", [((MED,), "general"), ((GEN,), "medical")])
def test_one_nature_only_is_not_applicable_and_says_so(models, missing):
    res = _run(80.0, 70.0)
    res = res[res["model"].isin(models)]
    a = fd.general_vs_medical(res, None, unavailable=[m for m in (MED, GEN) if m not in models], n_resamples=N_BOOT)
    assert a.answer == fd.NOT_APPLICABLE
    assert a.reason.startswith(f"Not applicable: this run has no {missing} model")
    assert f"{models[0]} (" in a.reason and "could not run here" in a.reason
    assert a.evidence.empty and a.evidence.columns.tolist() == fd.COMPARISON_COLUMNS
    assert a.by_object.empty and a.by_object.columns.tolist() == fd.OBJECT_COMPARISON_COLUMNS


def test_unregistered_models_are_left_out_by_name():
    res = pd.concat([_run(80.0, 70.0), results({("my_model", "S5"): 60.0})], ignore_index=True)
    a = fd.general_vs_medical(res, None, n_resamples=N_BOOT)
    assert a.answer == fd.MEDICAL_BETTER and "Left out: my_model (unregistered)" in a.reason
    only = fd.general_vs_medical(results({("my_model", "S5"): 60.0}), None)
    assert only.answer == fd.NOT_APPLICABLE and "no general and no medical model" in only.reason


def test_per_object_modality_rows_have_their_own_reading():
    res = _run(80.0, 70.0, objects_=["Liver", "Tumor"])
    tumor = (res["object"] == "Tumor") & (res["model"] == MED) & (res["strategy"] == "S5")
    res.loc[tumor, "dice"] -= 20.0  # the medical model fails on tumours: 60 vs 70
    a = fd.general_vs_medical(res, None, n_resamples=N_BOOT)
    by = a.by_object[a.by_object["strategy"] == "S5"].set_index("object_modality")
    assert by.loc["Liver-CT", "answer"] == fd.MEDICAL_BETTER
    assert by.loc["Tumor-CT", "answer"] == fd.GENERAL_BETTER
    assert by.loc["Tumor-CT", "mean_diff"] == pytest.approx(-10.0, abs=0.3)
    # the pooled answer is about the average object: +10 and -10 points cancel
    assert a.evidence[a.evidence["part"] == "answer"]["mean_diff"].iloc[0] == pytest.approx(0.0, abs=0.3)
    # Holm over every (strategy, object-modality) cell: p_holm >= p, at least one cell adjusted
    assert (a.by_object["p_holm"] >= a.by_object["p"]).all()


def _general_copy():
    run = _run(80.0, 70.0)
    return run[run["model"] == GEN].assign(model="sam_vit_b")


def test_several_models_per_nature_are_compared_pairwise_with_holm():
    res = pd.concat([_run(80.0, 70.0),
                     _general_copy()], ignore_index=True)
    a = fd.general_vs_medical(res, None, n_resamples=N_BOOT)
    top = a.evidence[a.evidence["part"] == "answer"]
    assert sorted(top["general"]) == ["mobilesam", "sam_vit_b"] and (top["medical"] == MED).all()
    assert (top["p_holm"] >= top["p"]).all() and a.answer == fd.MEDICAL_BETTER


def test_the_answer_strategies_are_a_named_variant():
    a = fd.general_vs_medical(_run(80.0, 70.0), None, strategies=["S2"], n_resamples=N_BOOT)
    assert a.answer == fd.GENERAL_BETTER
    assert a.evidence[a.evidence["part"] == "answer"]["strategy"].tolist() == ["S2"]
    none = fd.general_vs_medical(_run(80.0, 70.0), None, strategies=["S4"], n_resamples=N_BOOT)
    assert none.answer == fd.CANNOT_DECIDE and "share no strategy among S4" in none.reason


def test_comparison_cells_use_the_one_interval_formatter():
    a = fd.general_vs_medical(_run(80.0, 70.0), None, n_resamples=N_BOOT)
    cells = fd.comparison_cells(a.evidence)
    row = cells[(cells["part"] == "answer")].iloc[0]
    top = a.evidence[a.evidence["part"] == "answer"].iloc[0]
    assert row["medical - general"] == (f"{top['mean_diff']:.1f} [{top['diff_low']:.1f}, {top['diff_high']:.1f}]")
    assert row["units"] == 12 and row["answer"] == fd.MEDICAL_BETTER
    assert list(cells.columns) == ["part", "strategy", "medical", "general", "medical DICE", "general DICE",
                                   "medical - general", "units", "Holm p", "answer"]
    one = fd.general_vs_medical(_run(80.0, 70.0, n_clusters=1), None, n_resamples=N_BOOT)
    assert one.answer == fd.CANNOT_DECIDE
    assert fd.comparison_cells(one.evidence)["medical - general"].str.endswith("(n=1, no interval)").all()
    assert np.isfinite(one.evidence["mean_diff"]).all()
