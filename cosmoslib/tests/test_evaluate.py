"""The runner: rows per strategy and rule, audit masks, resume, and the CLI (real LiteMedSAM)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cosmoslib import dataset, evaluate, io


@pytest.fixture(scope="module")
def small(demo_root):
    manifest = dataset.subsample(io.index(demo_root), max_images_per_task=1, max_objects_per_image=2, seed=1)
    tasks = ["mni152_tissue_t1w-mri", "pyradiomics_brain_mri", "pyradiomics_lung_ct"]  # multi-object + lesions
    return manifest[manifest["task"].isin(tasks)].reset_index(drop=True)


@pytest.fixture(scope="module")
def run(small, demo_root, litemedsam, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    out = tmp / "results.parquet"
    results, report = evaluate.evaluate(small, demo_root, [litemedsam], out, cache_dir=tmp / "cache",
                                        save_masks=tmp / "masks", seed=0, points_per_side=4)
    return results, report, tmp


def test_one_row_per_object_strategy_and_rule(run, small):
    results, report, _ = run
    assert report.n_failed == 0 and report.n_objects == len(small)
    counts = results.groupby(["strategy", "selection_rule"]).size()
    n = len(small)
    assert counts[("S1", "oracle_dice")] == n
    for s in ("S2", "S3", "S4", "S5", "S6"):
        assert counts[(s, "oracle_dice")] == n and counts[(s, "pred_iou")] == n
    assert ("S1", "pred_iou") not in counts.index
    assert list(results.columns) == evaluate.RESULT_COLUMNS
    assert results["dice"].between(0, 100).all() and (results["hd"] >= 0).all()
    assert (results["t_decode_s"] > 0).all()


def test_oracle_is_never_worse_than_predicted_iou(run):
    results, _, _ = run
    wide = results[results.strategy != "S1"].pivot_table(
        index=["task", "image_id", "label_value", "strategy"], columns="selection_rule", values="dice")
    assert (wide["oracle_dice"] >= wide["pred_iou"] - 1e-9).all()


def test_box_prompt_segments_real_lesions_and_beats_one_point(run):
    results, _, _ = run
    oracle = results[results.selection_rule == "oracle_dice"]
    lesions = oracle[(oracle.strategy == "S5") & oracle.task.str.startswith("pyradiomics")]
    assert len(lesions) >= 2 and (lesions["dice"] > 60).all()
    means = oracle.groupby("strategy")["dice"].mean()
    assert means["S5"] > means["S2"]  # LiteMedSAM was trained on boxes


def test_saved_masks_reproduce_the_table(run, small, demo_root):
    results, _, tmp = run
    oracle = results[results.selection_rule == "oracle_dice"]
    for r in oracle.itertuples(index=False):
        path = tmp / "masks" / "litemedsam" / r.strategy / r.task / evaluate.mask_filename(
            r.image_id, r.object, r.label_value)
        pred = np.asarray(Image.open(path)) > 0
        mrow = small[(small.task == r.task) & (small.image_id == r.image_id)
                     & (small.label_value == r.label_value)].iloc[0]
        gt = io.read_label(demo_root / mrow.label_path) == r.label_value
        # independent DICE from the PNG and the GT
        inter = np.logical_and(pred, gt).sum()
        expected = 100.0 * 2 * inter / (pred.sum() + gt.sum()) if (pred.sum() + gt.sum()) else 100.0
        assert r.dice == pytest.approx(expected, abs=1e-9)


def test_rerun_resumes_and_a_lost_part_is_recomputed_identically(run, small, demo_root, litemedsam):
    results, report, tmp = run
    out = tmp / "results.parquet"
    again, rep2 = evaluate.evaluate(small, demo_root, [litemedsam], out, cache_dir=tmp / "cache", seed=0,
                                    points_per_side=4)
    assert rep2.n_parts_done == 0 and rep2.n_parts_resumed == report.n_parts_done
    parts = sorted(out.with_name(out.name + ".parts").rglob("*.parquet"))
    parts[0].unlink()                                   # as if killed before this image was written
    third, rep3 = evaluate.evaluate(small, demo_root, [litemedsam], out, cache_dir=tmp / "cache", seed=0,
                                    points_per_side=4)
    assert rep3.n_parts_done == 1
    cols = [c for c in results.columns if not c.startswith("t_")]
    pd.testing.assert_frame_equal(results[cols], third[cols])
    pd.testing.assert_frame_equal(results[cols], again[cols])


def test_other_settings_never_reuse_stale_parts(run, small, demo_root, litemedsam):
    _, report, tmp = run
    _, rep = evaluate.evaluate(small, demo_root, [litemedsam], tmp / "results.parquet",
                               strategies=["S5"], cache_dir=tmp / "cache", seed=0)
    assert rep.n_parts_resumed == 0 and rep.n_parts_done == report.n_parts_done


def test_unknown_strategy_is_a_clear_error(small, demo_root, litemedsam, tmp_path):
    with pytest.raises(ValueError, match="unknown strategies"):
        evaluate.evaluate(small, demo_root, [litemedsam], tmp_path / "r.parquet", strategies=["S7"])


def test_cli_evaluate_writes_results(demo_root, tmp_path):
    import shutil

    root = tmp_path / "root"  # two small tasks of cosmos-demo, copied as a user's folder would be
    for task in ("pyradiomics_breast_mri", "stardist_nuclei_microscopy"):
        shutil.copytree(demo_root / task, root / task)
        shutil.copy(demo_root / f"{task}.json", root / f"{task}.json")
    out = tmp_path / "r.parquet"
    proc = subprocess.run([sys.executable, "-m", "cosmoslib.cli", "evaluate", str(root), "--model",
                           "litemedsam", "--strategies", "S5", "--out", str(out), "--max-objects", "1",
                           "--cache", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_parquet(out)
    assert set(df.strategy) == {"S5"} and len(df) == 2 * df.drop_duplicates(
        ["task", "image_id", "label_value"]).shape[0]
    assert "Evaluated" in proc.stdout and str(out) in proc.stdout


def test_a_corrupt_image_is_recorded_and_the_rest_evaluated(demo_root, litemedsam, tmp_path):
    import shutil

    task = "pyradiomics_brain_mri"
    root = tmp_path / "root"
    shutil.copytree(demo_root / task, root / task)
    shutil.copy(demo_root / f"{task}.json", root / f"{task}.json")
    manifest = io.index(root)
    bad = manifest.iloc[0]
    (root / bad.image_path).write_bytes(b"not a png")
    out = tmp_path / "r.parquet"
    results, report = evaluate.evaluate(manifest, root, [litemedsam], out, strategies=["S5"],
                                        cache_dir=tmp_path / "cache")
    assert report.n_failed == 1 and bad.image_id in report.failures[0][0]
    assert "unreadable image" in report.failures[0][1] and bad.image_path.split("/")[-1] in report.failures[0][1]
    assert set(results.image_id) == set(manifest.image_id) - {bad.image_id}
    skipped = pd.read_csv(out.with_suffix(".skipped.csv"))
    assert len(skipped) == 1 and "failed" in report.summary()
