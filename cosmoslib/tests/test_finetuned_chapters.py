"""The chapters evaluate the finetuning chapter's run: trained once per book, reused by 08, and
scored on the test part of the split only."""

from __future__ import annotations

import numpy as np
import pytest

from cosmoslib.book import chapters, finetune_runs, runlist
from cosmoslib.models import registry
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
                         finetune_curricula=("mixed",), finetune_s1_max_images=1, finetuned_curricula=("mixed",),
                         finetuned_grid_max_images=1, finetuned_interactive_max_objects=1, max_clicks=2)
    return cfg, epochs


def _images(table):
    return set(map(tuple, table[KEY].drop_duplicates().to_numpy().tolist()))


@pytest.mark.slow
def test_trained_once_reused_by_the_finetuning_chapter_and_scored_on_the_test_part_only(book):
    cfg, epochs = book
    ch = chapters.Chapter("01_strategies", cfg)
    assert ch.finetuned() == {"litemedsam-ft-mixed": ("litemedsam", "mixed")}
    first = ch.finetune_runs()["litemedsam-ft-mixed"]
    assert epochs["n"] == 1 and not first.reused
    parts = {p: _images(ch.finetune_split.rows(ch.manifest, p)) for p in splits.PARTS}
    assert all(parts.values()) and not (parts["test"] & (parts["train"] | parts["val"]))

    res = ch.finetuned_results()
    assert _images(res) == parts["test"]  # every test image, and no training or validation image
    for name in ("litemedsam", "litemedsam-ft-mixed"):
        assert set(res.loc[res["model"] == name, "strategy"]) == {"S1", "S2", "S3", "S4", "S5", "S6"}
    assert set(res["curriculum"]) == {"none", "mixed"}
    assert "test part only" in ch.finetuned_note()

    # chapter 08 asks for the same run: reused, not retrained, same weights
    ch8 = chapters.Chapter("08_finetune", cfg)
    run = finetune_runs.run_chapter(ch8)
    again = run.runs[("litemedsam", "mixed")]
    assert again.reused and epochs["n"] == 1
    assert again.provenance["checkpoint_sha256"] == first.provenance["checkpoint_sha256"]
    assert again.out_dir == first.out_dir
    # and its test-part rows of the finetuned model are the ones chapter 01 reported (shared parts)
    mine = res[(res["model"] == "litemedsam-ft-mixed") & (res["strategy"] == "S5")].sort_values(KEY)
    theirs = run.results[(run.results["model"] == "litemedsam-ft-mixed")
                         & (run.results["strategy"] == "S5")].sort_values(KEY)
    np.testing.assert_allclose(mine["dice"].to_numpy(), theirs["dice"].to_numpy())

    # a later chapter of the book (a fresh Chapter) reuses it too
    later = chapters.Chapter("03_everything_grid", cfg)
    assert later.finetune_runs()["litemedsam-ft-mixed"].reused and epochs["n"] == 1
    s1 = later.s1_thresholds(quantile=0.5)
    assert _images(s1) <= parts["test"] and len(_images(s1)) == 1
    assert set(s1["model"]) == {"litemedsam", "litemedsam-ft-mixed"}
    assert set(s1["thresholds"]) == {s1_thresholds.PAPER, s1_thresholds.variant_label(0.5)}

    inter = chapters.Chapter("06_interactive", cfg).finetuned_interaction()
    assert _images(inter) <= parts["test"] and inter[["task", "image_id", "label_value"]].drop_duplicates().shape[0] == 1
    assert set(inter["method"]) == {"litemedsam", "litemedsam + previous logits", "litemedsam-ft-mixed",
                                    "litemedsam-ft-mixed + previous logits"}

    # the guard every test-part table goes through refuses a training image
    with pytest.raises(RuntimeError, match="training or validation"):
        ch.only_test(ch.finetune_split.rows(ch.manifest, "train"))


def test_no_finetuned_curricula_means_no_training(book):
    cfg, epochs = book
    import dataclasses

    ch = chapters.Chapter("01_strategies", dataclasses.replace(cfg, finetuned_curricula=()))
    assert ch.finetuned() == {} and len(ch.finetuned_results()) == 0 and len(ch.s1_thresholds()) == 0
    assert epochs["n"] == 0 and ch.finetuned_note().startswith("This config evaluates no finetuned model")
