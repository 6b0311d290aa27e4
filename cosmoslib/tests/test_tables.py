"""The book's named tables: one registry, one store rule, a small Chapter.

An edited label recomputes exactly the tables whose objects include it; every other table is
read back. A name not in the registry is an error naming the tables. Notebooks read every table
through ``ch.table(name)``.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from cosmoslib import paths
from cosmoslib.book import chapters, runlist, tables
from cosmoslib.data import readers
from cosmoslib.protocol import store

KEY = ["task", "image_id"]


@pytest.fixture()
def small_root(demo_root, tmp_path):
    root = tmp_path / "root"
    for task in ("pyradiomics_breast_mri", "mni152_tissue_t1w-mri"):  # one and two objects per image
        shutil.copytree(demo_root / task, root / task)
        shutil.copy(demo_root / f"{task}.json", root / f"{task}.json")
    return root


def _config(root):
    # smoke=True: the int8 comparison (a quantization per model, ~20 s each) is left out, as in the
    # smoke book; test_int8_chapter.py checks that table
    return runlist.Config(name="unit", smoke=True, data_root=str(root), max_images_per_task=2, max_objects_per_image=2,
                          s1_points_per_side=2, grid_sizes=(2,), grid_max_images=1, protocol_max_objects=1,
                          shift_levels=(1,), shift_repeats=1, interactive_max_objects=1, max_clicks=2,
                          finetune_curricula=())


# ----------------------------------------------------------------------------- the store rule


class _Model:
    def __init__(self, h):
        self.signature_hash = h


def test_store_reuses_only_the_same_content_settings_and_models(tmp_path):
    rows = pd.DataFrame({"image_sha": ["a", "b"], "label_sha": ["c", "d"], "label_value": [1, 2]})
    calls = []

    def compute():
        calls.append(1)
        out = pd.DataFrame({"x": [len(calls)]})
        out.attrs["skipped"] = [["f", "why"]]
        return out

    first = store.stored(tmp_path, rows, {"m": 2}, [_Model("s")], compute)
    again = store.stored(tmp_path, rows, {"m": 2}, [_Model("s")], compute)
    assert not first.reused and again.reused and calls == [1]
    pd.testing.assert_frame_equal(first.table, again.table)
    assert again.table.attrs == {"skipped": [["f", "why"]]}
    edited = rows.assign(label_sha=["c", "e"])
    for inputs, settings, models in ((edited, {"m": 2}, [_Model("s")]), (rows, {"m": 3}, [_Model("s")]),
                                     (rows, {"m": 2}, [_Model("t")])):
        assert not store.stored(tmp_path, inputs, settings, models, compute).reused
    assert len(calls) == 4 and len(list(tmp_path.glob("*.parquet"))) == 4
    with pytest.raises(KeyError, match="label_sha"):
        store.digest(rows.drop(columns="label_sha"), {}, [])
    with pytest.raises(TypeError, match="not a DataFrame"):
        store.stored(tmp_path / "none", rows, {}, [], lambda: None)


# ----------------------------------------------------------------------------- the registry


def test_a_renamed_table_is_an_error_naming_the_tables(small_root):
    ch = chapters.Chapter("06_interactive", _config(small_root))
    with pytest.raises(KeyError, match="no table 'interactions'; the tables are results, everything_grid,") as err:
        ch.table("interactions")
    assert isinstance(err.value, tables.UnknownTable)
    assert all(name in str(err.value) for name in tables.names())


def test_the_chapter_is_small(small_root):
    ch = chapters.Chapter("01_strategies", _config(small_root))
    public = sorted(n for n in set(dir(ch)) | set(vars(ch)) if not n.startswith("_"))
    assert len(public) <= 10, public
    assert {"open", "config", "notebook", "manifest", "root", "table", "model", "caption"} <= set(public)


def _notebook_code(path):
    return "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")


#: What a notebook may use of its Chapter: every table is ``ch.table(name)``.
CHAPTER_USES = {"caption", "config", "manifest", "root", "model", "table", "notebook"}
#: Functions that compute a table: a notebook never calls them itself.
COMPUTES = re.compile(r"\b(evaluate\.evaluate|compute_factors|volume_scores|propagation_scores|interaction_table|"
                      r"annotation_table|s1_threshold_table|run_chapter|finetune_runs\.train|test_part_results)\(")


@pytest.mark.parametrize("path", sorted(paths.notebooks_dir().glob("*.ipynb")), ids=lambda p: p.stem)
def test_every_table_a_notebook_shows_comes_from_ch_table(path):
    code = _notebook_code(path)
    used = set(re.findall(r"\bch\.([A-Za-z_]+)", code))
    if path.stem == "02_timing":  # not this change's notebook: the lead replaces its ch.results()
        used.discard("results")
    assert used <= CHAPTER_USES, f"{path.name} uses ch.{sorted(used - CHAPTER_USES)}"
    assert not COMPUTES.search(code), f"{path.name} computes a table itself: {COMPUTES.search(code).group(0)}"
    for name in re.findall(r"\bch\.table\(\"([a-z_0-9]+)\"\)", code):
        assert name in tables.REGISTRY, f"{path.name} asks for table {name!r}"


# ----------------------------------------------------------------------------- one edited label


def _images(table):
    return set(map(tuple, table[KEY].drop_duplicates().to_numpy().tolist())) if len(table) else set()


def _recomputed(ch):
    """``{table: recomputed}`` from the registry's log (evaluate-backed: any part computed)."""
    out = {}
    for name, reused in ch.tables.log:
        if name in LOGGED:
            out[name] = out.get(name, False) or not reused
    return out


LOGGED = ("results", "everything_grid", "randomness", "interaction", "annotation", "factors", "volumes", "propagation")


@pytest.mark.slow
def test_an_edited_label_recomputes_exactly_the_tables_that_depend_on_it(small_root, tmp_path, monkeypatch):
    """Cost: ~30 s CPU (LiteMedSAM encodes four small images once; two passes over every table)."""
    monkeypatch.setenv("COSMOS_DATA", str(tmp_path / "generated"))
    monkeypatch.setattr(chapters, "_INDEXED", {})
    cfg = _config(small_root)
    ch = chapters.Chapter("10_findings", cfg)
    first = {name: ch.table(name) for name in tables.names()}
    assert _recomputed(ch) == {name: True for name in LOGGED}
    assert first["propagation"].empty and first["propagation"].attrs["skipped"]  # no SAM 2: nothing propagated
    assert ch.table("finetune_runs").empty and ch.table("finetuned_results").empty  # no curriculum: no run

    # the images each table is made of; the others (factors, annotation, volumes, propagation) are
    # functions of every object of the config
    made_of = {"results": _images(first["results"]), "everything_grid": _images(first["everything_grid"]),
               "randomness": _images(first["randomness"]), "interaction": _images(first["interaction"])}
    everything = _images(ch.manifest)
    spare = sorted(everything - made_of["everything_grid"] - made_of["interaction"] - made_of["randomness"])
    assert spare, "the config's samples cover every image: nothing to show reuse with"
    task, image_id = spare[0]
    row = ch.manifest[(ch.manifest["task"] == task) & (ch.manifest["image_id"] == image_id)].iloc[0]

    # one pixel of one object becomes background (the object stays)
    label_path = small_root / row["label_path"]
    label = readers.read_label(label_path).copy()
    ys, xs = np.nonzero(label == row["label_value"])
    assert len(ys) > 1
    label[ys[0], xs[0]] = 0
    label_path.write_bytes(readers.encode_png(label))

    again = chapters.Chapter("10_findings", cfg)
    assert again.manifest.loc[again.manifest["image_id"] == image_id, "label_sha"].nunique() == 1
    assert set(again.manifest["label_sha"]) != set(ch.manifest["label_sha"])
    second = {name: again.table(name) for name in tables.names()}
    recomputed = _recomputed(again)
    expected = {name: (task, image_id) in made_of.get(name, everything) for name in LOGGED}
    expected["propagation"] = True  # stored by the digest of every object: empty, computed again
    assert recomputed == expected
    assert expected["results"] and not expected["interaction"] and not expected["everything_grid"]
    # a reused table is the stored one, unchanged
    for name in LOGGED:
        if not expected[name]:
            pd.testing.assert_frame_equal(first[name], second[name])
    # the recomputed results differ only on the edited image
    keys = ["model", "task", "image_id", "label_value", "strategy", "selection_rule", "shift_level", "repeat"]
    old = first["results"].set_index(keys).sort_index()
    new = second["results"].set_index(keys).sort_index()
    other = [k for k in old.index if k[2] != image_id]
    pd.testing.assert_series_equal(old.loc[other, "dice"], new.loc[other, "dice"])


# ----------------------------------------------------------------------------- the tables on a cluster


def test_the_waves_cover_the_registry_once():
    flat = [name for wave in tables.WAVES for name in wave]
    assert sorted(flat) == sorted(tables.names()) and len(flat) == len(set(flat))


#: Columns that measure this machine's time, not the study (they differ between any two runs).
TIMES = ["t_embed_s", "t_decode_s", "seconds", "t_propagate_s", "encode_s_fp32", "encode_s_int8", "speedup",
         "quantize_s"]


@pytest.mark.slow
def test_tables_computed_on_dask_workers_equal_the_in_process_ones(small_root, tmp_path, monkeypatch):
    """``cosmos book --scheduler local:2`` at the table layer: every table of a tiny config computed
    on two Dask workers equals the one a chapter computes in this process (timings aside).
    Cost: ~75 s CPU (two workers start and load LiteMedSAM; the tables twice); 140 s wall under load.
    Covers every registry table, with no finetuning curriculum (the finetune tables are empty)."""
    import dataclasses

    monkeypatch.setenv("COSMOS_DATA", str(tmp_path / "generated"))  # the workers inherit it
    here = dataclasses.replace(_config(small_root), name="here")
    there = dataclasses.replace(here, name="there")
    rows = chapters.compute_tables(there, "local:2", progress=False)
    assert set(rows) == set(tables.names())
    ch_here, ch_there = chapters.Chapter("10_findings", here), chapters.Chapter("10_findings", there)
    for name in tables.names():
        a = ch_here.table(name)
        b = ch_there.table(name)
        assert len(b) == rows[name]
        if name == "finetune_runs":
            continue  # empty in both (no curriculum)
        drop = [c for c in TIMES if c in a.columns]
        pd.testing.assert_frame_equal(a.drop(columns=drop), b.drop(columns=drop), obj=name)
    # after the cluster, a chapter only reads: every table stored, every evaluate part resumed
    assert ch_there.tables.log and all(reused for _, reused in ch_there.tables.log)
