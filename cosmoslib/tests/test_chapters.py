"""The chapter layer: one index and one load per model, a stored manifest reused while the data
are unchanged, and a typed config end to end."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from cosmoslib import models, paths
from cosmoslib.book import chapters, figures, runlist, tables
from cosmoslib.data import indexer


@pytest.fixture()
def counted(monkeypatch):
    """Count real calls of indexer.index and models.load_model (they still do their work)."""
    calls = {"index": 0, "load_model": 0}
    real_index, real_load = indexer.index, models.load_model

    def index(*a, **k):
        calls["index"] += 1
        return real_index(*a, **k)

    def load_model(*a, **k):
        calls["load_model"] += 1
        return real_load(*a, **k)

    monkeypatch.setattr(indexer, "index", index)
    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setattr(chapters, "_MODELS", {})
    monkeypatch.setattr(chapters, "_INDEXED", {})
    return calls


@pytest.fixture()
def small_root(demo_root, tmp_path):
    root = tmp_path / "root"
    for task in ("pyradiomics_breast_mri", "pyradiomics_brain_mri"):
        shutil.copytree(demo_root / task, root / task)
        shutil.copy(demo_root / f"{task}.json", root / f"{task}.json")
    return root


def _config(root, name="unit"):
    return runlist.Config(name=name, data_root=str(root), max_images_per_task=2, max_objects_per_image=2,
                          s1_points_per_side=2, grid_sizes=(2,), grid_max_images=1)


def test_all_chapters_of_a_config_index_once_and_load_each_model_once(counted, small_root, monkeypatch, tmp_path):
    monkeypatch.setenv("COSMOS_DATA", str(tmp_path / "generated"))
    cfg = _config(small_root)
    for notebook in runlist.CHAPTERS:
        ch = chapters.Chapter(notebook, cfg)
        ch.manifest
        ch.table("results")
    ch.table("everything_grid")
    figures.redecoder(ch)
    assert counted == {"index": 1, "load_model": 1}
    assert (paths.results_dir("unit") / "manifest.parquet").exists()


def test_stored_manifest_is_reused_until_a_file_changes(counted, small_root, tmp_path):
    store = tmp_path / "manifest.parquet"
    first = chapters.indexed(small_root, store)
    chapters._INDEXED.clear()                      # as in a new process
    again = chapters.indexed(small_root, store)
    assert counted["index"] == 1
    pd.testing.assert_frame_equal(first, again)
    label = small_root / first.iloc[0]["label_path"]
    label.write_bytes(label.read_bytes())          # rewritten: new modification time
    chapters._INDEXED.clear()
    chapters.indexed(small_root, store)
    assert counted["index"] == 2


def test_open_checks_the_injected_settings(small_root):
    settings = _config(small_root).as_parameters()
    ch = chapters.Chapter.open("01_strategies", "unit", False, settings)
    assert ch.config == _config(small_root) and ch.root == small_root.resolve()
    with pytest.raises(TypeError, match="unknown config field"):
        chapters.Chapter.open("01_strategies", "unit", False, {**settings, "grid_size": [2]})
    with pytest.raises(ValueError, match="smoke"):
        chapters.Chapter.open("01_strategies", "unit", True, settings)
    assert chapters.Chapter.open("00_dataset", "demo").config == runlist.config("demo")


def test_named_tables_are_stored_once_and_an_unknown_name_is_an_error(small_root, tmp_path, monkeypatch):
    """``ch.table(name)``: the factors and annotation tables are computed once and stored by the
    digest of their objects (a second chapter reads them back equal); a misspelt name raises."""
    monkeypatch.setenv("COSMOS_DATA", str(tmp_path / "generated"))
    cfg = _config(small_root)
    first = chapters.Chapter("04_factors", cfg)
    calls = []
    real = tables.factors_mod.compute_factors
    monkeypatch.setattr(tables.factors_mod, "compute_factors", lambda *a, **k: calls.append(1) or real(*a, **k))
    fac = first.table("factors")
    again = chapters.Chapter("10_findings", cfg).table("factors")
    assert calls == [1] and len(fac) == len(first.manifest)
    pd.testing.assert_frame_equal(fac, again)
    assert again.attrs["skipped"] == fac.attrs["skipped"] == []
    with pytest.raises(KeyError, match="no table 'factor'; the tables are results, everything_grid"):
        first.table("factor")
