"""The runner: rows per strategy and rule, audit masks, resume, and the CLI (real LiteMedSAM)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cosmoslib import files
from cosmoslib.data import dataset, indexer, readers
from cosmoslib.protocol import evaluate


@pytest.fixture(scope="module")
def small(demo_root):
    manifest = dataset.subsample(indexer.index(demo_root), max_images_per_task=1, max_objects_per_image=2, seed=1)
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
        gt = readers.read_label(demo_root / mrow.label_path) == r.label_value
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
    manifest = dataset.subsample(indexer.index(root), max_images_per_task=4, seed=0)
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


def _copy_task(demo_root, root, task):
    import shutil

    shutil.copytree(demo_root / task, root / task)
    shutil.copy(demo_root / f"{task}.json", root / f"{task}.json")


def test_changing_one_label_recomputes_exactly_that_image(demo_root, litemedsam, tmp_path):
    task = "mni152_tissue_t1w-mri"  # two objects per image (grey and white matter)
    root = tmp_path / "root"
    _copy_task(demo_root, root, task)
    manifest = dataset.subsample(indexer.index(root), max_images_per_task=3, seed=0)
    out = tmp_path / "r.parquet"
    before, rep1 = evaluate.evaluate(manifest, root, [litemedsam], out, strategies=["S2", "S5"])
    assert rep1.n_failed == 0 and rep1.n_parts_done == 3

    # Fix a label as a user would: erase the left half of one object in one image.
    target = manifest.iloc[0]
    path = root / target.label_path
    label = readers.read_label(path).copy()
    xs = np.nonzero(label == target.label_value)[1]
    half = label[:, : int(np.median(xs))]
    half[half == target.label_value] = 0
    path.write_bytes(readers.encode_png(label))

    manifest2 = dataset.subsample(indexer.index(root), max_images_per_task=3, seed=0)
    after, rep2 = evaluate.evaluate(manifest2, root, [litemedsam], out, strategies=["S2", "S5"])
    assert rep2.n_parts_done == 1 and rep2.n_parts_resumed == 2
    key = ["image_id", "label_value", "strategy", "selection_rule"]
    cols = [c for c in before.columns if not c.startswith("t_")]
    same = before["image_id"] != target.image_id
    pd.testing.assert_frame_equal(before.loc[same, cols].reset_index(drop=True),
                                  after.loc[after["image_id"] != target.image_id, cols].reset_index(drop=True))
    old = before[~same].set_index(key).sort_index()
    new = after[after["image_id"] == target.image_id].set_index(key).sort_index()
    changed = old.loc[(target.image_id, target.label_value), "dice"] != new.loc[(target.image_id, target.label_value), "dice"]
    assert changed.any()
    prompts = pd.read_parquet(out.with_name("prompts.parquet"))
    now = prompts[(prompts.image_id == target.image_id) & (prompts.label_value == target.label_value)]
    assert set(now["label_sha"]) == {files.file_digest(path)}


def test_same_ids_in_another_dataset_get_fresh_rows(demo_root, litemedsam, tmp_path):
    task = "pyradiomics_brain_mri"
    first, second = tmp_path / "a", tmp_path / "b"
    _copy_task(demo_root, first, task)
    _copy_task(demo_root, second, task)
    for folder in ("images", "labels"):  # same task and ids, other content: every file mirrored
        for png in sorted((second / task / folder).glob("*.png")):
            arr = np.asarray(Image.open(png))
            png.write_bytes(readers.encode_png(np.ascontiguousarray(arr[:, ::-1])))
    out = tmp_path / "r.parquet"
    m1 = dataset.subsample(indexer.index(first), max_images_per_task=2, seed=0)
    r1, _ = evaluate.evaluate(m1, first, [litemedsam], out, strategies=["S5"])
    m2 = dataset.subsample(indexer.index(second), max_images_per_task=2, seed=0)
    assert list(m2.image_id) == list(m1.image_id)
    r2, rep = evaluate.evaluate(m2, second, [litemedsam], out, strategies=["S5"])
    assert rep.n_parts_resumed == 0 and rep.n_parts_done == m2.image_id.nunique()
    boxes = pd.read_parquet(out.with_name("prompts.parquet"))
    assert len(boxes) == 5 * len(m2)  # the new content's prompts replaced the old ones
    assert set(boxes["label_sha"]) == set(m2["label_sha"]) and not set(boxes["label_sha"]) & set(m1["label_sha"])


def test_index_refuses_what_evaluate_cannot_read(demo_root, litemedsam, tmp_path):
    task = "pyradiomics_lung_ct"
    root = tmp_path / "root"
    _copy_task(demo_root, root, task)
    images = sorted((root / task / "images").glob("*.png"))
    for extra in images[5:]:  # five images: three made unreadable/16-bit/flat, two as they are
        extra.unlink()
        (root / task / "labels" / extra.name).unlink()
    images = images[:5]
    truncated, wide = images[0], images[1]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    arr = np.asarray(Image.open(wide)).astype(np.uint16) * 257  # real 16-bit data, 0..65535
    arr[0, 0] = 7  # (so that it is not a plain multiple of the 8-bit image)
    Image.fromarray(arr).save(wide)
    flat = images[2]  # a constant 16-bit image: nothing to normalise
    Image.fromarray(np.full(arr.shape, 9000, np.uint16)).save(flat)
    report = indexer.index_to_parquet(root, tmp_path / "manifest.parquet", progress=False)
    skipped = pd.read_csv(report.skipped_csv)
    reasons = dict(zip(skipped["file"].map(lambda f: f.split("/")[-1]), skipped["reason"]))
    assert "unreadable image" in reasons[truncated.name]
    assert "constant intensity" in reasons[flat.name]
    manifest = pd.read_parquet(tmp_path / "manifest.parquet")
    assert not set(manifest["image_id"]) & {truncated.stem, flat.stem}
    assert set(manifest.loc[manifest["rescaled"], "image_id"]) == {wide.stem}  # read, min-max normalised
    _, rep = evaluate.evaluate(manifest, root, [litemedsam], tmp_path / "r.parquet", strategies=["S5"])
    assert rep.n_failed == 0 and rep.n_images == len(images) - 2
