"""The chapters evaluate the finetuning chapter's run: trained once per book, reused by 08, and
scored on the test part of the split only."""

from __future__ import annotations

import pandas as pd
import pytest

from cosmoslib.book import chapters, finetune_runs, runlist
from cosmoslib.models import everything, registry
from cosmoslib.protocol import finetune, s1_thresholds, splits
from cosmoslib.tests.test_finetune import _build_root


KEY = ["task", "image_id"]


@pytest.fixture()
def book(tmp_path, monkeypatch):
    root = tmp_path / "root"
    _build_root(root)  # 4 volumes x 2 slices of bright ellipses, one object each
    monkeypatch.setenv("COSMOS_DATA", str(tmp_path / "generated"))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(chapters, "_MODELS", {})
    monkeypatch.setattr(chapters, "_INDEXED", {})
    epochs = {"n": 0}
    real = finetune._Trainer.train_epoch

    def counted(self, epoch):
        epochs["n"] += 1
        return real(self, epoch)

    monkeypatch.setattr(finetune._Trainer, "train_epoch", counted)
    cfg = runlist.Config(name="unit", data_root=str(root), s1_points_per_side=2, grid_sizes=(2,),
                         finetune_epochs=1, finetune_max_objects_per_image=1, finetune_max_val_objects=1,
                         finetune_curricula=("mixed",), finetune_s1_max_images=1,
                         finetuned_grid_max_images=1, finetuned_interactive_max_objects=1, max_clicks=2)
    return cfg, epochs


def _images(table):
    return set(map(tuple, table[KEY].drop_duplicates().to_numpy().tolist()))


@pytest.mark.slow
def test_trained_once_reused_by_the_finetuning_chapter_and_scored_on_the_test_part_only(book):
    cfg, epochs = book
    ch = chapters.Chapter("01_strategies", cfg)
    runs = ch.table("finetune_runs")
    assert finetune_runs.pairs_of(runs) == {"litemedsam-ft-mixed": ("litemedsam", "mixed")}
    assert epochs["n"] == 1 and not runs["reused"].any()
    split = finetune_runs.chapter_split(ch.manifest, cfg.seed)
    parts = {p: _images(split.rows(ch.manifest, p)) for p in splits.PARTS}
    assert all(parts.values()) and not (parts["test"] & (parts["train"] | parts["val"]))

    res = ch.table("finetuned_results")
    assert _images(res) == parts["test"]  # every test image, and no training or validation image
    for name in ("litemedsam", "litemedsam-ft-mixed"):
        assert set(res.loc[res["model"] == name, "strategy"]) == {"S1", "S2", "S3", "S4", "S5", "S6"}
    assert set(res["curriculum"]) == {"none", "mixed"}
    assert "test part only" in finetune_runs.note(cfg, ch.manifest, runs)

    # chapter 08 asks for the same run: reused, not retrained, same weights, the same table
    ch8 = chapters.Chapter("08_finetune", cfg)
    again = ch8.table("finetune_runs")
    assert again["reused"].all() and epochs["n"] == 1
    assert again["checkpoint_sha256"].tolist() == runs["checkpoint_sha256"].tolist()
    assert again["out_dir"].tolist() == runs["out_dir"].tolist()
    assert "reused from an earlier chapter" in finetune_runs.note(cfg, ch8.manifest, again)
    pd.testing.assert_frame_equal(ch8.table("finetuned_results"), res)
    assert set(ch8.table("finetune_history")["model"]) == {"litemedsam-ft-mixed"}

    # a later chapter of the book (a fresh Chapter) reuses it too
    later = chapters.Chapter("03_everything_grid", cfg)
    assert later.table("finetune_runs")["reused"].all() and epochs["n"] == 1
    s1 = later.table("s1_thresholds")
    assert _images(s1) <= parts["test"] and len(_images(s1)) == 1
    assert set(s1["model"]) == {"litemedsam", "litemedsam-ft-mixed"}
    assert set(s1["thresholds"]) == {s1_thresholds.PAPER, s1_thresholds.variant_label(everything.VARIANT_QUANTILE)}

    inter = chapters.Chapter("06_interactive", cfg).table("finetuned_interaction")
    assert _images(inter) <= parts["test"] and inter[["task", "image_id", "label_value"]].drop_duplicates().shape[0] == 1
    assert set(inter["method"]) == {"litemedsam", "litemedsam + previous logits", "litemedsam-ft-mixed",
                                    "litemedsam-ft-mixed + previous logits"}

    # the guard every test-part table goes through refuses a training image
    with pytest.raises(RuntimeError, match="training or validation"):
        finetune_runs.only_test(split.rows(ch.manifest, "train"), split, ch.manifest)


def test_no_curriculum_means_no_training(book):
    cfg, epochs = book
    import dataclasses

    ch = chapters.Chapter("01_strategies", dataclasses.replace(cfg, finetune_curricula=()))
    runs = ch.table("finetune_runs")
    assert runs.empty and len(ch.table("finetuned_results")) == 0 and len(ch.table("s1_thresholds")) == 0
    assert len(ch.table("finetuned_interaction")) == 0
    assert epochs["n"] == 0 and finetune_runs.note(ch.config, ch.manifest, runs).startswith(
        "This config evaluates no finetuned model")
