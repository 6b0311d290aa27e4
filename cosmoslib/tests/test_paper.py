"""Quoted numbers of the paper (``data/paper/*.csv``) and their loader ``cosmoslib.analysis.paper``.

Structural checks always run. When the paper's full text is available, every number of the
quoted tables is compared with the text, re-parsed here independently of how the CSV files
were made (regular expressions on the raw lines, not the transcription code).
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cosmoslib import paths
from cosmoslib.analysis import paper
from cosmoslib.files import InputError

PAPER_TEXT = paths.paper_text()  # $COSMOS_PAPER_TEXT or ../shared/seed/*.txt beside the checkout
needs_text = pytest.mark.skipif(PAPER_TEXT is None, reason="the paper text is not available: set COSMOS_PAPER_TEXT or place it in ../shared/seed/ beside the checkout")

MODELS = ["ViT-B", "ViT-H"]
STRATEGIES = [f"S{i}" for i in range(1, 7)]
#: The 18 modalities of Fig. 1's caption plus Table 1's "T1-FLAIR MRI".
PAPER_MODALITIES = {
    "CT", "MRI", "T1W MRI", "T2W MRI", "ADC MRI", "Cine-MRI", "CMR", "DW MRI", "T1-GD MRI",
    "T2-FLAIR MRI", "T1-FLAIR MRI", "Histopathology", "Electron Microscopy", "US", "X-ray",
    "Fundus", "Colonoscopy", "Dermoscopy", "Microscopy",
}


@pytest.fixture(scope="module")
def text() -> str:
    return PAPER_TEXT.read_text(encoding="utf-8")


def table_lines(text: str, caption: str) -> list[str]:
    """The tab-separated lines after the line starting with ``caption`` (up to the first
    line without a tab once the block has begun)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(caption))
    block = []
    for line in lines[start + 1:]:
        if "\t" in line:
            block.append(line)
        elif block:
            break
    return block


def numbers(cells: list[str]) -> list[float]:
    return [float(c) for c in cells]


# --- loader ---------------------------------------------------------------------------------

def test_every_csv_file_is_a_named_table():
    on_disk = {p.stem for p in paper.paper_dir().glob("*.csv")}
    assert on_disk == set(paper.available())
    for required in ["table2_dice", "table3_hd", "table4_time", "table5_everything_grid",
                     "table6_partial_corr", "fig6_means"]:
        assert required in on_disk


def test_unknown_name_lists_available_names():
    with pytest.raises(InputError) as err:
        paper.quoted("table9")
    message = str(err.value)
    assert "table9" in message
    for name in paper.available():
        assert name in message


def test_attrs_and_note_name_the_source():
    df = paper.quoted("table3_hd")
    assert df.attrs["source"] == "Table 3"
    assert "Table 3" in df.attrs["note"] and "not recomputed" in df.attrs["note"]
    assert "not recomputed" in paper.QUOTED_NOTE and "\n" not in paper.QUOTED_NOTE


def test_loader_reads_via_cosmos_home_and_rejects_bad_files(tmp_path, monkeypatch):
    (tmp_path / "_config.yml").write_text("title: x\n")
    target = tmp_path / "data" / "paper"
    target.mkdir(parents=True)
    monkeypatch.setenv("COSMOS_HOME", str(tmp_path))
    with pytest.raises(InputError, match="missing"):
        paper.quoted("table4_time")
    src = Path(__file__).resolve().parents[2] / "data" / "paper" / "table4_time.csv"
    shutil.copy(src, target / "table4_time.csv")
    assert len(paper.quoted("table4_time")) == 14
    (target / "table4_time.csv").write_text("model,stage,secs\nViT-B,S1,1\n")
    with pytest.raises(InputError, match=r"table4_time\.csv.*columns"):
        paper.quoted("table4_time")
    (target / "table4_time.csv").write_text("model,stage,seconds\nViT-B,S1,fast\n")
    with pytest.raises(InputError, match=r"table4_time\.csv"):
        paper.quoted("table4_time")


# --- Tables 2 and 3 ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,col", [("table2_dice", "dice"), ("table3_hd", "hd")])
def test_table23_shape(name, col):
    df = paper.quoted(name)
    n_rows = df["object_modality"].nunique()
    assert len(df) == n_rows * len(MODELS) * len(STRATEGIES)
    assert not df.duplicated(["object_modality", "model", "strategy"]).any()
    assert set(df["model"]) == set(MODELS) and set(df["strategy"]) == set(STRATEGIES)
    assert df[col].notna().all()
    # the label is object + "-" + modality, and the modality is one the paper uses
    assert (df["object"] + "-" + df["modality"] == df["object_modality"]).all()
    assert set(df["modality"]) <= PAPER_MODALITIES
    changed = df.loc[df["object"] != df["object_normalized"], ["object", "object_normalized"]]
    assert set(map(tuple, changed.drop_duplicates().to_numpy())) == {("Arota", "Aorta")}


@needs_text
@pytest.mark.parametrize("caption,name", [("Table 2:", "table2_dice"), ("Table 3:", "table3_hd")])
def test_table23_row_count_from_text(text, caption, name):
    block = table_lines(text, caption)
    data = [line for line in block if re.match(r"[A-Z][^\t]*-[^\t]+\t[\d.]", line)]
    assert len(block) == len(data) + 2  # two header lines
    assert len(data) == 46  # not the "40 objects" of section 4.3; see data/paper/README.md
    assert len(paper.quoted(name)) == len(data) * 12


@needs_text
def test_pancreas_ct_spot_check(text):
    line = re.search(r"^Pancreas-CT\t(.+)$", text, flags=re.M).group(1)
    expected = numbers(line.split("\t"))
    assert len(expected) == 12
    df = paper.quoted("table2_dice").set_index(["object_modality", "model", "strategy"])
    got = [df.at[("Pancreas-CT", m, s), "dice"] for m in MODELS for s in STRATEGIES]
    assert got == expected


@needs_text
@pytest.mark.parametrize("caption,name,col",
                         [("Table 2:", "table2_dice", "dice"), ("Table 3:", "table3_hd", "hd")])
def test_table23_every_number_matches_text(text, caption, name, col):
    df = paper.quoted(name)
    wide = df.pivot(index="object_modality", columns=["model", "strategy"], values=col)
    wide = wide[[(m, s) for m in MODELS for s in STRATEGIES]]
    seen = []
    for line in table_lines(text, caption)[2:]:
        label, *cells = line.split("\t")
        seen.append(label)
        assert wide.loc[label].tolist() == numbers(cells), label
    assert sorted(seen) == sorted(wide.index)
    # and the files keep the paper's row order
    assert list(dict.fromkeys(df["object_modality"])) == seen


def test_table23_value_ranges_and_same_rows():
    dice = paper.quoted("table2_dice")
    hd = paper.quoted("table3_hd")
    assert dice["dice"].between(0, 100).all()
    assert (hd["hd"] >= 0).all()
    keys = ["object_modality", "object", "modality", "object_normalized", "model", "strategy"]
    assert dice[keys].equals(hd[keys])


@needs_text
def test_section_4_5_brain_tumor_ranges(text):
    """Section 4.5 quotes Brain Tumor's box-prompt (S5, ViT-B) range across modalities."""
    m = re.search(r"ranges from ([\d.]+)% to ([\d.]+)% in DICE and ([\d.]+) pixels to "
                  r"([\d.]+) pixels in HD", text)
    lo_d, hi_d, lo_h, hi_h = map(float, m.groups())
    for name, col, lo, hi in [("table2_dice", "dice", lo_d, hi_d), ("table3_hd", "hd", lo_h, hi_h)]:
        df = paper.quoted(name)
        sel = df[(df["object"] == "Brain Tumor") & (df["model"] == "ViT-B")
                 & (df["strategy"] == "S5")]
        assert (sel[col].min(), sel[col].max()) == (lo, hi)


# --- Table 4 ------------------------------------------------------------------------------------

@needs_text
def test_table4_matches_text(text):
    df = paper.quoted("table4_time").set_index(["model", "stage"])["seconds"]
    assert len(df) == 14 and (df > 0).all()
    for line in table_lines(text, "Table 4:")[2:]:
        model, *cells = line.split("\t")
        got = [df[(model, stage)] for stage in ["embedding", *STRATEGIES]]
        assert got == numbers(cells)
    # section 4.6: "ViT-H takes nearly four times the embedding time of ViT-B"
    assert 3 < df[("ViT-H", "embedding")] / df[("ViT-B", "embedding")] < 4


# --- Table 5 ------------------------------------------------------------------------------------

@needs_text
def test_table5_matches_text(text):
    df = paper.quoted("table5_everything_grid")
    block = table_lines(text, "Table 5:")
    grids = [int(g) for g in re.findall(r"\t(\d+) ²", block[0])]
    assert grids == [8, 16, 32, 64, 128, 256]
    assert len(df) == (len(block) - 1) * len(grids) == 24
    for line in block[1:]:
        label, *cells = line.split("\t")
        sel = df[df["object"] == label].set_index("grid")
        for g, cell in zip(grids, cells):
            main, sub = re.fullmatch(r"([\d.]+) _\{([\d.]+)\}", cell.strip()).groups()
            assert (sel.at[g, "dice"], sel.at[g, "subscript"]) == (float(main), float(sub))
    assert df["model"].isna().all()


def test_table5_subscript_is_not_a_dice_sd():
    """README claim: some subscripts exceed the largest possible SD of values in 0..100
    with that mean (Bhatia-Davis: var <= m (100 - m)), so they are not SDs of DICE."""
    df = paper.quoted("table5_everything_grid")
    assert df["dice"].between(0, 100).all()
    bound = np.sqrt(df["dice"] * (100 - df["dice"]))
    assert (df["subscript"] > bound).any()
    # DICE rises with the grid in every dataset (section 4.7)
    for _, g in df.sort_values("grid").groupby("object"):
        assert g["dice"].is_monotonic_increasing


# --- Table 6 ------------------------------------------------------------------------------------

@needs_text
def test_table6_matches_text(text):
    df = paper.quoted("table6_partial_corr")
    assert len(df) == 6 * 5 * 2
    assert not df.duplicated(["model", "strategy", "factor"]).any()
    block = table_lines(text, "Table 6:")
    factor_header = [h for h in block[0].split("\t")[1:] if h]
    assert factor_header == ["Size", "Intensity Difference", "Fourier Order", "Modality",
                             "Aspect Ratio"]
    factors = [h.lower().replace(" ", "_") for h in factor_header]
    assert block[1].split("\t")[1:] == MODELS * 5
    rho = df.set_index(["model", "strategy", "factor"])["rho"]
    for i, line in enumerate(block[2:], start=1):
        cells = numbers(line.split("\t")[1:])
        expected = {(m, f"S{i}", f): v for (f, m), v in
                    zip([(f, m) for f in factors for m in MODELS], cells)}
        for key, value in expected.items():
            assert rho[key] == value, key


def test_table6_ranges_and_unknown_cells():
    df = paper.quoted("table6_partial_corr")
    assert (df["rho"].abs() <= 1).all()
    # bold type and p-values are not in the text: unknown, never guessed
    assert df["bold"].isna().all() and df["p"].isna().all() and df["p_text"].isna().all()
    # section 4.8: moderate correlation with FO and intensity difference in most strategies
    moderate = df[df["factor"].isin(["fourier_order", "intensity_difference"])]
    assert (moderate["rho"].abs() >= 0.4).mean() > 0.5


# --- Tables 7 and 8 -------------------------------------------------------------------------------

@needs_text
def test_table7_matches_text_and_means(text):
    df = paper.quoted("table7_annotation")
    block = table_lines(text, "Table 7:")
    first = block[2].split("\t")
    sam = df[df["annotator"] == "SAM"].iloc[0]
    assert (sam["hce"], sam["time"], sam["time_unit"]) == (float(first[0]), float(first[1]), "s")
    t = df.set_index(["annotator", "condition"])
    for line in block[2:]:
        cells = line.split("\t")
        who = cells[2]
        assert (t.at[(who, "human"), "hce"], t.at[(who, "human"), "time"]) == \
            (float(cells[3]), float(cells[4]))
        assert (t.at[(who, "human_with_sam"), "hce"], t.at[(who, "human_with_sam"), "time"]) == \
            (float(cells[5]), float(cells[6]))
    doctors = df[df["annotator"].str.startswith("Doctor")]
    for cond, g in doctors.groupby("condition"):
        mean = t.loc[("Mean", cond)]
        assert math.isclose(g["hce"].mean(), mean["hce"], abs_tol=0.006)
        assert math.isclose(g["time"].mean(), mean["time"], abs_tol=0.006)


@needs_text
def test_table8_matches_text_and_means(text):
    df = paper.quoted("table8_prompt_shift")
    assert len(df) == 4 * 3 * 5
    block = table_lines(text, "Table 8:")
    assert block[1].split("\t")[2:] == ["S_2", "S_3", "S_4", "S_5", "S_6"]
    d = df.set_index(["run", "shift", "strategy"])["dice_drop"]
    run = None
    for line in block[2:]:
        cells = line.split("\t")
        run = cells[0] or run
        assert [d[(run, cells[1], s)] for s in STRATEGIES[1:]] == numbers(cells[2:])
    runs = df[df["run"] != "Mean"].groupby(["shift", "strategy"])["dice_drop"].mean()
    mean = df[df["run"] == "Mean"].set_index(["shift", "strategy"])["dice_drop"]
    assert np.allclose(runs.loc[mean.index], mean, atol=0.006)
    # section 4.10: S2 dropped by 2.67%, 7.38% and 14.62% as the shift grew
    drops = re.search(r"dropped by ([\d.]+)%, ([\d.]+)%, and ([\d.]+)%", text).groups()
    assert mean.xs("S2", level="strategy").sort_index().tolist() == [float(x) for x in drops]


# --- statements in the text ---------------------------------------------------------------------

@needs_text
@pytest.mark.parametrize("name", ["fig6_means", "sec4_12_finetune"])
def test_quoted_sentences_are_in_text(text, name):
    df = paper.quoted(name)
    for row in df.itertuples():
        assert row.quote in text
        digits = f"{abs(row.value):g}" if row.value % 1 == 0 else f"{abs(row.value):.2f}"
        assert digits in row.quote, (row.value, row.quote)


def test_fig6_means_schema():
    df = paper.quoted("fig6_means")
    assert set(df["kind"]) <= {"mean", "difference", "abs_difference"}
    assert set(df["model"]) <= set(MODELS) and set(df["strategy"]) <= set(STRATEGIES)
    assert set(df["metric"]) <= {"dice", "hd"}
    means = df[df["kind"] == "mean"]
    assert means["ref_model"].isna().all() and means["value"].between(0, 100).all()
    assert df.loc[df["kind"] != "mean", ["ref_model", "ref_strategy"]].notna().all().all()
    assert (df.loc[df["kind"] == "abs_difference", "value"] >= 0).all()


# --- matching our names to the paper's rows --------------------------------------------------

def test_match_object_modality_rules():
    ours = pd.DataFrame(
        {"object": ["aorta", "ARota", "Gallbladder", "Left Ventricle", "Brain Tumor",
                    "Prostate", "Prostate", "Brain", "Lung", "Thyroid Nodules", "Liver",
                    None, "Neural Structures"],
         "modality": ["CT", "mri", "MRI", "MRI", "MRI", "T2W MRI", "ADC MRI", "T1W MRI",
                      "X-Ray", "Ultrasound", "PET", "CT", "Microscopy"],
         "extra": range(13)},
        index=[f"r{i}" for i in range(13)],
    )
    out = paper.match_object_modality(ours)
    assert list(out.index) == list(ours.index) and out["extra"].tolist() == list(range(13))
    expected = ["Arota-CT", "Arota-MRI", "Gall Bladder-MRI", "Left Ventricle-Cine-MRI", None,
                "Prostate-MRI", "Prostate-ADC MRI", "Brain-T1W MRI", "Lung-X-ray",
                "Thyroid Nodules-US", None, None, None]
    got = [None if pd.isna(v) else v for v in out["paper_object_modality"]]
    assert got == expected
    rules = [None if pd.isna(v) else v for v in out["match_rule"]]
    assert rules == ["exact", "exact", "exact", "family_unique", None, "paper_generic", "exact",
                     "exact", "exact", "exact", None, None, None]
    assert out.at["r3", "paper_modality"] == "Cine-MRI"
    assert out.at["r3", "paper_object"] == "Left Ventricle"


def test_match_joins_with_quoted_values():
    ours = pd.DataFrame({"object": ["Pancreas"], "modality": ["CT"]})
    m = paper.match_object_modality(ours, table="table3_hd")
    hd = paper.quoted("table3_hd")
    joined = m.merge(hd, left_on="paper_object_modality", right_on="object_modality")
    assert len(joined) == 12 and joined["hd"].notna().all()


def test_every_paper_row_matches_itself():
    dice = paper.quoted("table2_dice")
    rows = dice[["object", "modality", "object_modality"]].drop_duplicates()
    out = paper.match_object_modality(rows[["object", "modality"]])
    assert (out["paper_object_modality"].to_numpy() == rows["object_modality"].to_numpy()).all()
    assert (out["match_rule"] == "exact").all()


def test_match_rejects_bad_input():
    with pytest.raises(InputError, match="object"):
        paper.match_object_modality(pd.DataFrame({"object": ["Liver"]}))
    with pytest.raises(InputError):
        paper.match_object_modality([("Liver", "CT")])


def test_normalization():
    assert paper.normalize_name(" Gall-BLADDER ") == paper.normalize_name("Gallbladder")
    assert paper.normalize_name("Arota") == paper.normalize_name("Aorta") == "aorta"
    assert paper.normalize_modality("Ultrasound") == paper.normalize_modality("US")
    assert paper.modality_family("CMR") == paper.modality_family("T1-GD MRI") == "mri"
    assert paper.modality_family("Electron Microscopy") != paper.modality_family("Microscopy")
