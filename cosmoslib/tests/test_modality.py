"""Modality of every object: the vocabulary, the catalog rules, the precedence of the indexer,
and Table 6 on a root in the authors' release layout where nothing names the modality."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from cosmoslib import vocabulary
from cosmoslib.analysis import factors, paper, stats
from cosmoslib.analysis import synthetic as syn
from cosmoslib.data import catalog, indexer, layout
from cosmoslib.files import InputError

# ------------------------------------------------------------------------------------------
# the vocabulary
# ------------------------------------------------------------------------------------------


def test_paper_tables_use_exactly_the_paper_modalities():
    """Independent source: the modalities of the paper's own Tables 2 and 3."""
    for table in ("table2_dice", "table3_hd"):
        names = set(paper.quoted(table)["modality"].dropna())
        assert names == set(vocabulary.PAPER_MODALITIES)
        assert {vocabulary.canonical_modality(m) for m in names} == names


def test_catalog_modalities_are_vocabulary_names():
    for d in catalog.load_catalog():
        for m in (*d.modalities, *([d.modality] if d.modality else [])):
            assert vocabulary.canonical_modality(m) == m, (d.path, m)


@pytest.mark.parametrize(
    "spelling, name",
    [("t1w-mri", "T1W MRI"), ("Ultrasound", "US"), ("X ray", "X-ray"), ("MR", "MRI"),
     ("cine mri", "Cine-MRI"), ("DWI", "DW MRI"), ("DWI MRI", "DW MRI"),
     ("T2 FLAIR MRI", "T2-FLAIR MRI"), ("ＣＴ", "CT"), ("computed tomography", "CT"),
     ("pet", "PET"), ("T1-FLAIR MRI", "T1-FLAIR MRI")],
)
def test_canonical_modality_spellings(spelling, name):
    assert vocabulary.canonical_modality(spelling) == name


@pytest.mark.parametrize("text", [None, float("nan"), "", "  ", "unknown", "PETS", "cxr mri",
                                  "busi", "M"])
def test_canonical_modality_refuses_non_names(text):
    assert vocabulary.canonical_modality(text) is None
    assert vocabulary.modality_code(text) == vocabulary.MODALITY_CODES["unknown"] == 18


def test_codes_are_unique_and_every_known_name_has_one():
    codes = vocabulary.MODALITY_CODES | vocabulary.EXTRA_MODALITY_CODES
    assert len(set(codes.values())) == len(codes)
    assert set(codes) == set(vocabulary.KNOWN_MODALITIES) | {"unknown"}
    for name in vocabulary.KNOWN_MODALITIES:
        assert factors.modality_code(name) == codes[name]
    assert indexer.KNOWN_MODALITIES == vocabulary.KNOWN_MODALITIES


# ------------------------------------------------------------------------------------------
# the catalog rules for the authors' "<number>_<Name>" tasks
# ------------------------------------------------------------------------------------------

#: Object names of the authors' released json files (data_infor_json/ of their repository).
AUTHORS_JSON = {
    "22_Heart": {"1": "LeftVentricle", "2": "LeftVentricularMyocardium", "3": "RightVentricle"},
    "6_Pancreas": {"1": "Pancreas", "2": "PancreaticMass"},
}
AUTHORS_COLOR = {"22_Heart": {"1": 85, "2": 170, "3": 255}, "6_Pancreas": {"1": 150, "2": 255}}


def test_catalog_rules():
    heart = indexer.modality_from_catalog("22_Heart", AUTHORS_JSON["22_Heart"].values())
    assert (heart.modality, heart.rule) == (None, "catalog objects")
    assert dict(heart.candidates) == {"ACDC": ("Cine-MRI",), "M&Ms": ("CMR",)}
    assert heart.describe() == "ACDC (Cine-MRI); M&Ms (CMR)"
    pancreas = indexer.modality_from_catalog("6_Pancreas", AUTHORS_JSON["6_Pancreas"].values())
    assert (pancreas.modality, pancreas.rule) == (None, "catalog object name")
    assert dict(pancreas.candidates) == {"AbdomenCT-1K": ("CT",), "AMOS 2022": ("CT", "MRI")}
    polyp = indexer.modality_from_catalog("3_Polyp", ["Polyp"])
    assert (polyp.modality, polyp.dataset, polyp.rule) == ("Colonoscopy", None, "catalog objects")
    acdc = indexer.modality_from_catalog("1_ACDC", ["whatever"])
    assert (acdc.modality, acdc.dataset, acdc.rule) == ("Cine-MRI", "ACDC", "catalog dataset name")
    own = indexer.modality_from_catalog("pyradiomics_lung_ct", ["Thing"])
    assert (own.modality, own.dataset, own.rule) == ("CT", "PyRadiomics test cases", "catalog task")
    nothing = indexer.modality_from_catalog("22_Heart", ["Myocardium", "Cyst"])
    assert (nothing.modality, nothing.rule, nothing.describe()) == (None, "", "no catalog match")


# ------------------------------------------------------------------------------------------
# the indexer: precedence, override, counting and naming the unknown
# ------------------------------------------------------------------------------------------


def _release_root(tmp_path, n_images=6, extra_json=None):
    """A root in the authors' layout: test_data/<task>/{images,labels}, json in info/."""
    root, info = tmp_path / "test_data", tmp_path / "info"
    info.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shape = (64, 80)
    for t, task in enumerate(AUTHORS_JSON):
        for sub in ("images", "labels"):
            (root / task / sub).mkdir(parents=True)
        doc = {"info": AUTHORS_JSON[task], "color": AUTHORS_COLOR[task]}
        doc.update((extra_json or {}).get(task, {}))
        (info / f"{task}.json").write_text(json.dumps(doc))
        values = list(AUTHORS_COLOR[task].values())
        for i in range(n_images):
            label = np.zeros(shape, np.uint8)
            k = int(rng.integers(0, 5))
            label[syn.star(shape, k, 0.25, 10 + i, center=(22 + 2 * t, 30), phase=i)] = values[0]
            label[syn.ellipse(shape, (6 + i % 3, 4 + t), center=(60, 28 + i))] = values[1]
            image = np.full(shape, 100.0)
            image[label == values[0]] = 100 + rng.uniform(-80, 80)
            image[label == values[1]] = 100 + rng.uniform(-80, 80)
            image = np.clip(image + rng.normal(0, 3, shape), 0, 255).astype(np.uint8)
            from PIL import Image

            Image.fromarray(image).save(root / task / "images" / f"{task}_{i}_{t + 3}.png")
            Image.fromarray(label).save(root / task / "labels" / f"{task}_{i}_{t + 3}.png")
    return root, info


def test_unknown_modality_is_counted_named_and_warned_once(tmp_path):
    root, info = _release_root(tmp_path, n_images=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        man = indexer.index(root, info_dir=info)
    mod_warnings = [w for w in caught if "modality unknown" in str(w.message)]
    assert len(mod_warnings) == 1
    text = str(mod_warnings[0].message)
    assert "22_Heart" in text and "ACDC (Cine-MRI); M&Ms (CMR)" in text and "6_Pancreas" in text
    assert "--modality TASK=NAME" in text
    assert set(man["modality"]) == {"unknown"}
    expected = man.groupby("task").size().to_dict()
    assert indexer.unknown_modalities(man) == expected == man.attrs["unknown_modality"]
    assert man.attrs["unknown_modality_tasks"] == ["22_Heart", "6_Pancreas"]
    assert man.attrs["modality_source"] == {"22_Heart": "unknown", "6_Pancreas": "unknown"}

    report = indexer.index_to_parquet(root, tmp_path / "m.parquet", info_dir=info, progress=False)
    assert report.unknown_modality == expected
    assert report.n_unknown_modality == len(man)
    summary = report.summary()
    assert f"Modality unknown for {len(man)} object(s)" in summary
    assert "22_Heart" in summary and "--modality TASK=NAME" in summary


def test_precedence_override_json_catalog_task_name(tmp_path):
    root, info = _release_root(tmp_path, n_images=1,
                               extra_json={"6_Pancreas": {"modality": "Computed Tomography"}})
    # a third task: nothing in its json, but the catalog knows its objects (Colonoscopy), and
    # a fourth whose only hint is a modality token in its name
    for task, obj in (("3_Polyp", "Polyp"), ("liver_ct", "Thing")):
        image, label = np.full((20, 20), 90, np.uint8), np.zeros((20, 20), np.uint8)
        label[5:12, 6:14] = 255
        layout.write_pair(root, task, "a", image, label)
        (info / f"{task}.json").write_text(json.dumps({"info": {"1": obj}, "color": {"1": 255}}))
    man = indexer.index(root, info_dir=info, modality={"22_heart": "cine mri"})
    by_task = man.groupby("task")["modality"].agg(set).to_dict()
    assert by_task == {"22_Heart": {"Cine-MRI"}, "6_Pancreas": {"CT"},
                       "3_Polyp": {"Colonoscopy"}, "liver_ct": {"CT"}}
    assert man.attrs["modality_source"] == {"22_Heart": "override", "3_Polyp": "catalog objects",
                                            "6_Pancreas": "json", "liver_ct": "task name"}
    assert man.attrs["unknown_modality"] == {}
    # The override beats the json too.
    over = indexer.index(root, info_dir=info, modality={"22_Heart": "CMR", "6_Pancreas": "MRI"})
    assert set(over.loc[over["task"] == "6_Pancreas", "modality"]) == {"MRI"}
    assert over.attrs["modality_source"]["6_Pancreas"] == "override"
    # A json modality outside the vocabulary is kept as written but counted as unknown.
    (info / "3_Polyp.json").write_text(json.dumps({"info": {"1": "Polyp"}, "color": {"1": 255},
                                                   "modality": "Endoscopic video"}))
    with pytest.warns(UserWarning, match="'Endoscopic video' from json is not a vocabulary name"):
        odd = indexer.index(root, info_dir=info, modality={"22_Heart": "CMR"})
    assert odd.attrs["unknown_modality"] == {"3_Polyp": 1}


def test_bad_overrides_name_the_problem(tmp_path):
    root, info = _release_root(tmp_path, n_images=1)
    with pytest.raises(InputError, match="'23_Heart': no such task"):
        indexer.index(root, info_dir=info, modality={"23_Heart": "CT"})
    with pytest.raises(InputError, match="22_Heart='Cine MRX': not a known modality"):
        indexer.index(root, info_dir=info, modality={"22_Heart": "Cine MRX"})


# ------------------------------------------------------------------------------------------
# Table 6 on the authors' layout: all-unknown modality, then named
# ------------------------------------------------------------------------------------------


def _results_from(fac, rng):
    """DICE that falls with Fourier order and rises with contrast magnitude, plus noise."""
    keys = fac[["task", "image_id", "label_value"]]
    rows = []
    for strategy in ("S2", "S5"):
        dice = (85 - 0.8 * fac["fourier_order"] + 0.15 * fac["intensity_diff"]
                + rng.normal(0, 2, len(fac)))
        rows.append(keys.assign(model="vit_b", strategy=strategy, selection_rule="oracle_dice",
                                dice=dice.clip(0, 100)))
    return pd.concat(rows, ignore_index=True)


def test_table6_on_an_all_unknown_release_root(tmp_path):
    root, info = _release_root(tmp_path, n_images=6)
    with pytest.warns(UserWarning, match="modality unknown"):
        man = indexer.index(root, info_dir=info)
    fac = factors.compute_factors(man, root, progress=False)
    assert (fac["modality_code"] == 18).all() and fac["size_px"].notna().all()
    results = _results_from(fac, np.random.default_rng(1))
    t6 = stats.table6(results, fac, extra_factors=("intensity_diff_signed",))
    assert len(t6) == 2 * 6 and (t6["n"] == len(fac)).all()
    mod = t6[t6["factor"] == "modality_code"]
    assert mod["r"].isna().all() and mod["note"].str.contains("constant in this block").all()
    rest = t6[t6["factor"] != "modality_code"]
    assert rest["r"].notna().all() and rest["p"].notna().all()
    assert (rest["dropped_covariates"] == "modality_code").all()
    assert (t6.loc[t6["r"].isna(), "note"] != "").all()
    fo = rest[rest["factor"] == "fourier_order"]
    assert (fo["r"] < 0).all()

    # Named per task, modality varies and is a covariate again.
    named = indexer.index(root, info_dir=info, modality={"22_Heart": "Cine-MRI", "6_Pancreas": "CT"})
    fac2 = factors.compute_factors(named, root, progress=False)
    assert set(fac2["modality_code"]) == {vocabulary.MODALITY_CODES["Cine-MRI"],
                                          vocabulary.MODALITY_CODES["CT"]}
    t6b = stats.table6(results, fac2)
    assert t6b["r"].notna().all() and (t6b["dropped_covariates"] == "").all()
    assert not math.isnan(t6b.loc[t6b["factor"] == "modality_code", "r"].iloc[0])
