"""Aggregations of the results table (Fig. 6, Tables 2-5) on hand-made results."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cosmoslib.analysis import paper, summaries, timing


def _results():
    rows = []
    for img, n_obj in (("a", 2), ("b", 1)):
        for v in range(1, n_obj + 1):
            for s, base in (("S1", 40.0), ("S5", 90.0)):
                for rule, delta in (("oracle_dice", 0.0), ("pred_iou", -10.0)):
                    if s == "S1" and rule == "pred_iou":
                        continue
                    rows.append(dict(task="t", image_id=img, label_value=v, object=f"o{v}", modality="CT",
                                     model="m", strategy=s, selection_rule=rule, dice=base + delta + v,
                                     jac=0.0, hd=10.0 / v, hd95=0.0, assd=0.0, pred_iou=0.9,
                                     empty_pred=False, empty_gt=False, n_candidates=3,
                                     t_embed_s={"a": 2.0, "b": 4.0}[img],
                                     t_decode_s={"S1": {"a": 6.0, "b": 10.0}[img], "S5": 0.1 * v}[s]))
    return pd.DataFrame(rows)


def test_strategy_means_use_the_selection_rule():
    means = summaries.strategy_means(_results()).set_index("strategy")
    assert means.loc["S5", "dice"] == pytest.approx(np.mean([91, 92, 91]))
    assert means.loc["S5", "n"] == 3
    worse = summaries.strategy_means(_results(), rule="pred_iou").set_index("strategy")
    assert worse.loc["S5", "dice"] == pytest.approx(means.loc["S5", "dice"] - 10)
    assert "S1" not in worse.index


def test_object_modality_table_pivots_models_and_strategies():
    t = summaries.object_modality_table(_results(), "hd")
    assert t.loc["o1-CT", ("m", "S5")] == pytest.approx(10.0)
    assert t.loc["o2-CT", ("m", "S1")] == pytest.approx(5.0)


def test_timing_table_counts_images_for_embedding_and_s1_objects_for_prompts():
    t = summaries.timing_table(_results())
    assert t.loc["m", "embedding"] == pytest.approx(3.0)   # images a (2 s) and b (4 s), not objects
    assert t.loc["m", "S1"] == pytest.approx(8.0)          # per image, not per object row
    assert t.loc["m", "S5"] == pytest.approx((0.1 + 0.2 + 0.1) / 3)


def test_reuse_speedup_tends_to_the_number_of_strategies():
    row = pd.Series({"embedding": 10.0, "S2": 0.0, "S3": 0.0, "S5": 0.0})
    assert timing.reuse_speedup(row) == pytest.approx(3.0)
    row = pd.Series({"embedding": 1.0, "S2": 1.0, "S5": 1.0})
    assert timing.reuse_speedup(row) == pytest.approx((2 * 1 + 2) / 3)


def test_grid_table_and_formatting():
    g = pd.DataFrame(dict(object=["o"] * 4, modality=["CT"] * 4, points_per_side=[8, 8, 16, 16],
                          dice=[10.0, 20.0, 30.0, 30.0]))
    t = summaries.grid_table(g)
    assert t[("mean", 8)]["o-CT"] == pytest.approx(15.0)
    assert t[("sd", 16)]["o-CT"] == pytest.approx(0.0)
    f = summaries.format_mean_sd(t["mean"], t["sd"])
    assert f.loc["o-CT", 8] == "15.0 (7.1)"


def test_device_description_names_the_device():
    text = timing.device_description()
    assert text.startswith(("CPU:", "GPU:")) and "torch" in text


def test_beside_paper_joins_our_means_to_the_quoted_rows():

    res = _results()
    res["object"] = res["object"].map({"o1": "Lung Tumor", "o2": "Unheard-of Thing"})
    side = summaries.beside_paper(res, "dice")
    assert set(side.index.get_level_values("object_modality")) == {"Lung Tumor-CT"}
    quoted = paper.quoted("table2_dice")
    q = quoted[(quoted.object_modality == "Lung Tumor-CT") & (quoted.strategy == "S5")]
    row = side.loc[("Lung Tumor-CT", "Lung Tumor-CT", "S5")]
    assert row["paper: ViT-B"] == pytest.approx(float(q[q.model == "ViT-B"].dice.iloc[0]))
    assert row["paper: ViT-H"] == pytest.approx(float(q[q.model == "ViT-H"].dice.iloc[0]))
    assert row["ours: m"] == pytest.approx(91.0)   # o1 rows under S5, oracle rule
