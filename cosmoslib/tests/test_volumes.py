"""Volumes back from slices and their 3D scores in mm (cosmoslib.protocol.volumes).

Reassembly is checked slice by slice (and against the source volume after a real prepare);
the 3D numbers against medpy with ``voxelspacing``, MONAI's surface Dice and a brute-force NSD
on volumes with anisotropic voxels.
"""

from __future__ import annotations

import math

import medpy.metric.binary as medpy_binary
import monai.metrics as monai_metrics
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from cosmoslib import files
from cosmoslib.data import catalog, indexer, preprocess, readers
from cosmoslib.protocol import evaluate, metrics, volumes
from cosmoslib.tests.test_metrics import brute_force_nsd

ROW, COL, SLICE = 0.7, 0.9, 3.0  # mm; a volume's voxel is (SLICE, ROW, COL)
VOXEL = (SLICE, ROW, COL)


def ellipsoid(shape, centre, radii):
    grid = np.indices(shape).astype(float)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1


def slice_manifest(gt_vol, source="case1.nii.gz", task="t", label_value=1, keep=None, spacing=True):
    """Manifest rows (slice-only protocol: slices with the object) and the GT mask dict."""
    rows, gt = [], {}
    d, h, w = gt_vol.shape
    stem = source.split(".")[0]
    for k in range(d):
        if not gt_vol[k].any() or (keep is not None and k not in keep):
            continue
        image_id = f"{stem}_{k:04d}"
        row = {"task": task, "image_id": image_id, "label_value": label_value, "object": "Thing",
               "modality": "CT", "source": source, "slice_index": k, "height": h, "width": w, "plane": "axial"}
        if spacing:
            row.update(spacing_row=ROW, spacing_col=COL, spacing_slice=SLICE)
        rows.append(row)
        gt[(task, image_id, label_value)] = gt_vol[k]
    return pd.DataFrame(rows), gt


def provider_from(vol, manifest):
    return {(r.task, r.image_id, int(r.label_value)): vol[int(r.slice_index)]
            for r in manifest.itertuples(index=False)}


def only_on(vol, manifest):
    """``vol`` with the slices the manifest does not list set empty (what the model was asked)."""
    out = np.zeros_like(vol)
    idx = manifest.slice_index.astype(int).to_numpy()
    out[idx] = vol[idx]
    return out


# --------------------------------------------------------------------------- reassembly


def test_reassembly_puts_every_slice_back_at_its_index():
    rng = np.random.default_rng(0)
    idx = rng.permutation(np.arange(3, 40))[:20]  # shuffled, with gaps
    masks = {("t", f"v_{k:04d}", 5): rng.random((11, 13)) < 0.3 for k in idx}
    rows = pd.DataFrame({"task": "t", "image_id": [f"v_{k:04d}" for k in idx], "label_value": 5,
                         "source": "v.nrrd", "slice_index": idx, "height": 11, "width": 13})
    vol = volumes.reassemble(rows, masks)
    assert vol.shape == (int(idx.max()) + 1, 11, 13) and vol.dtype == bool
    for k in range(vol.shape[0]):
        expected = masks[("t", f"v_{k:04d}", 5)] if k in set(idx.tolist()) else np.zeros((11, 13), bool)
        np.testing.assert_array_equal(vol[k], expected)
    # a callable provider and an explicit depth give the same slices in a deeper volume
    deep = volumes.reassemble(rows, lambda t, i, v: masks[(t, i, v)], depth=60)
    assert deep.shape == (60, 11, 13)
    np.testing.assert_array_equal(deep[: vol.shape[0]], vol)
    assert not deep[vol.shape[0]:].any()
    with pytest.raises(ValueError, match="outside"):
        volumes.reassemble(rows, masks, depth=10)
    with pytest.raises(ValueError, match="repeated"):
        volumes.reassemble(pd.concat([rows, rows.head(1)]), masks)
    with pytest.raises(KeyError):
        volumes.reassemble(rows, {})
    with pytest.raises(ValueError, match="shape"):
        volumes.reassemble(rows, {k: m[:-1] for k, m in masks.items()})


def test_reassembly_of_a_prepared_volume_matches_the_source(tmp_path):
    """prepare() a NIfTI with anisotropic voxels, index it, put the label PNGs back: every kept
    slice sits at its source index, the spacing and plane reach the volume table."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    shape = (14, 40, 48)  # (S, P, L)
    label = ellipsoid(shape, (7, 20, 24), (5.5, 12, 14)).astype(np.uint8)
    image = rng.normal(100, 20, shape).astype(np.float32)
    for arr, name in ((image, "case1_img.nii.gz"), (label, "case1_seg.nii.gz")):
        ras = arr[:, ::-1, ::-1].transpose(2, 1, 0)  # (S, P, L) -> RAS (x=L, y=P, z=S)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(ras), np.diag([COL, ROW, SLICE, 1.0])), str(src / name))
    d = catalog.descriptor_from_mapping({
        "name": "Synthetic", "modalities": ["CT"], "task": "synth_ct", "modality": "CT", "format": "volume",
        "main_plane": "axial", "objects": [{"name": "Thing", "source_values": [1], "value": 1}],
        "pairs": {"image": "*_img.nii.gz", "label": "{stem}_seg.nii.gz"}}, tmp_path / "d.yaml")
    preprocess.prepare(src, d, tmp_path / "out", progress=False)
    man = indexer.index(tmp_path / "out")
    kept = sorted(man.slice_index.astype(int))
    assert kept == [k for k in range(shape[0]) if label[k].sum() > 50]
    gt = volumes.label_masks(man, tmp_path / "out")
    vol = volumes.reassemble(man, gt)
    np.testing.assert_array_equal(vol, only_on(label.astype(bool), man)[: vol.shape[0]])
    spacing, known = volumes.volume_spacing(man)  # NIfTI stores float32 voxel sizes
    assert known and spacing == pytest.approx((SLICE, ROW, COL), rel=1e-6)
    table = volumes.volume_table(man, {("truth", "S0"): gt}, root=tmp_path / "out")
    r = table.iloc[0]
    assert r.plane == "axial" and r.spacing_known
    assert (r.spacing_row, r.spacing_col, r.spacing_slice) == pytest.approx((ROW, COL, SLICE), rel=1e-6)
    assert (r.dice, r.hd, r.nsd, r.n_slices, r.slice_gaps) == (100.0, 0.0, 100.0, len(kept), 0)


# --------------------------------------------------------------------------- 3D metrics in mm


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation notices
def test_volume_metrics_match_medpy_monai_and_brute_force():
    rng = np.random.default_rng(2)
    shape = (16, 40, 44)
    gt_vol = ellipsoid(shape, (8, 20, 22), (5.2, 11, 13))
    pred_full = np.roll(ellipsoid(shape, (8, 20, 22), (6.1, 10, 14)), (1, 2, -1), axis=(0, 1, 2))
    pred_full ^= rng.random(shape) < 0.01  # a few scattered errors, also off the object
    man, gt = slice_manifest(gt_vol)
    pred_b = provider_from(pred_full, man)
    table = volumes.volume_table(man, {("vit_b", "S2"): pred_b, ("vit_b", "S3"): dict(gt)}, gt)
    assert list(table.columns) == ["model", "strategy", *volumes.VOLUME_COLUMNS]
    assert table[["model", "strategy"]].values.tolist() == [["vit_b", "S2"], ["vit_b", "S3"]]
    r, perfect = table.iloc[0], table.iloc[1]
    pred_vol = only_on(pred_full, man)  # the model was only asked on the manifest slices
    assert r.dice == pytest.approx(100 * medpy_binary.dc(pred_vol, gt_vol), abs=1e-9)
    assert r.hd == pytest.approx(medpy_binary.hd(pred_vol, gt_vol, voxelspacing=VOXEL), abs=1e-9)
    assert r.hd95 == pytest.approx(medpy_binary.hd95(pred_vol, gt_vol, voxelspacing=VOXEL), abs=1e-9)
    assert r.assd == pytest.approx(medpy_binary.assd(pred_vol, gt_vol, voxelspacing=VOXEL), abs=1e-9)
    assert r.nsd == pytest.approx(brute_force_nsd(pred_vol, gt_vol, VOXEL, 2.0), abs=1e-9)
    assert r.tolerance_mm == metrics.NSD_TOLERANCE_MM == 2.0
    # 2D numbers beside: means over the manifest slices, in-plane spacing (row, col)
    ks = man.slice_index.astype(int)
    assert r.slice_dice == pytest.approx(np.mean([metrics.dice(pred_vol[k], gt_vol[k]) for k in ks]))
    assert r.slice_nsd == pytest.approx(np.mean([brute_force_nsd(pred_vol[k], gt_vol[k], (ROW, COL), 2.0)
                                                 for k in ks]))
    assert r.slice_hd95 == pytest.approx(np.mean([medpy_binary.hd95(pred_vol[k], gt_vol[k], voxelspacing=(ROW, COL))
                                                  for k in ks]))
    assert (r.n_slices, r.slice_min, r.slice_max, r.slice_gaps, r.depth) == (
        len(ks), ks.min(), ks.max(), 0, ks.max() + 1)
    assert (r.height, r.width, r.spacing_known, r.object, r.modality) == (40, 44, True, "Thing", "CT")
    assert (perfect.dice, perfect.hd, perfect.hd95, perfect.assd, perfect.nsd) == (100.0, 0.0, 0.0, 0.0, 100.0)
    # MONAI's surface Dice (independent edges and KD-tree distances) agrees
    ref = monai_metrics.compute_surface_dice(torch.from_numpy(pred_vol[None, None].astype(np.float32)),
                                             torch.from_numpy(gt_vol[None, None].astype(np.float32)),
                                             class_thresholds=[2.0], include_background=True, spacing=list(VOXEL))
    assert r.nsd == pytest.approx(100 * float(ref[0, 0]), abs=1e-4)


def test_volume_table_groups_volumes_and_reports_gaps():
    shape = (12, 30, 30)
    a = ellipsoid(shape, (6, 15, 15), (4.5, 9, 9))
    man_a, gt_a = slice_manifest(a, source="a.nii.gz", keep={2, 3, 5, 6, 9})  # sampled: gaps
    b = ellipsoid(shape, (5, 12, 16), (3.5, 6, 8))
    man_b, gt_b = slice_manifest(b, source="b.nii.gz", label_value=2)
    man = pd.concat([man_b, man_a], ignore_index=True).sample(frac=1.0, random_state=0)
    gt = {**gt_a, **gt_b}
    shrunk = {k: np.pad(m[1:-1, 1:-1], 1) for k, m in gt.items()}
    table = volumes.volume_table(man, {("m", "S2"): shrunk}, gt)
    assert table[["source", "label_value", "n_slices"]].values.tolist() == [["a.nii.gz", 1, 5], ["b.nii.gz", 2, 7]]
    ra, rb = table.iloc[0], table.iloc[1]
    assert (ra.slice_min, ra.slice_max, ra.slice_gaps) == (2, 9, 3) and rb.slice_gaps == 0
    # the 3D DICE of a sampled volume is the voxel-pooled DICE of its slices
    ka = sorted(man_a.slice_index)
    inter = sum((shrunk[("t", f"a_{k:04d}", 1)] & a[k]).sum() for k in ka)
    total = sum(shrunk[("t", f"a_{k:04d}", 1)].sum() + a[k].sum() for k in ka)
    assert ra.dice == pytest.approx(200 * inter / total)
    # the empty gap slices would make matching surfaces: no 3D surface metric unless asked for
    assert all(math.isnan(ra[m]) for m in ("hd", "hd95", "assd", "nsd"))
    assert not any(math.isnan(rb[m]) for m in ("hd", "hd95", "assd", "nsd"))
    assert not math.isnan(ra.slice_hd95) and not math.isnan(ra.slice_nsd)
    scored = volumes.volume_table(man, {("m", "S2"): shrunk}, gt, gaps="score").iloc[0]
    pred_a = np.zeros_like(a)
    for k in ka:
        pred_a[k] = shrunk[("t", f"a_{k:04d}", 1)]
    assert scored.hd95 == pytest.approx(medpy_binary.hd95(pred_a, only_on(a, man_a), voxelspacing=VOXEL))
    # extra slices that fill the gaps make the volume whole again (mechanics only: their GT is empty)
    fill = pd.DataFrame({"task": "t", "source": "a.nii.gz", "label_value": 1, "slice_index": [4, 7, 8],
                         "image_id": ["a_x4", "a_x7", "a_x8"]})
    filled_pred = {**shrunk, **{("t", i, 1): np.zeros((30, 30), bool) for i in fill.image_id}}
    filled = volumes.volume_table(man, {("m", "S2"): filled_pred}, gt, extra_slices=fill).iloc[0]
    assert filled.slice_gaps == 0 and filled.n_extra_slices == 3 and not math.isnan(filled.hd95)


def test_volume_table_without_spacing_assumes_1mm_and_says_so():
    shape = (10, 24, 24)
    gt_vol = ellipsoid(shape, (5, 12, 12), (3.5, 7, 7))
    man, gt = slice_manifest(gt_vol, spacing=False)
    pred_vol = np.roll(gt_vol, 1, axis=2)
    with pytest.warns(UserWarning, match="spacing"):
        table = volumes.volume_table(man, {("m", "S2"): provider_from(pred_vol, man)}, gt)
    r = table.iloc[0]
    assert not r.spacing_known and (r.spacing_row, r.spacing_col, r.spacing_slice) == (1.0, 1.0, 1.0)
    pv = only_on(pred_vol, man)
    assert r.hd95 == pytest.approx(medpy_binary.hd95(pv, gt_vol), abs=1e-9)
    # a volume whose slices disagree on the spacing is an error, not a guess
    bad = man.assign(spacing_row=ROW, spacing_col=COL, spacing_slice=SLICE)
    bad.loc[bad.index[0], "spacing_row"] = 0.5
    with pytest.raises(ValueError, match="disagree"):
        volumes.volume_table(bad, {("m", "S2"): provider_from(pred_vol, man)}, gt)


def test_empty_prediction_follows_the_policy():
    shape = (8, 20, 20)
    gt_vol = ellipsoid(shape, (4, 10, 10), (2.5, 5, 5))
    man, gt = slice_manifest(gt_vol)
    nothing = {k: np.zeros_like(m) for k, m in gt.items()}
    r = volumes.volume_table(man, {("m", "S2"): nothing}, gt).iloc[0]
    depth = int(man.slice_index.max()) + 1
    assert r.empty_pred and not r.empty_gt and r.dice == 0 and r.nsd == 0
    assert r.hd == pytest.approx(metrics.worst_distance_mm((depth, 20, 20), VOXEL))
    r = volumes.volume_table(man, {("m", "S2"): nothing}, gt, policy="nan").iloc[0]
    assert math.isnan(r.hd) and r.dice == 0 and math.isnan(r.slice_hd95)


# --------------------------------------------------------------------------- slice-only protocol


def test_extra_slices_and_protocol_gap():
    shape = (12, 30, 30)
    gt_vol = ellipsoid(shape, (6, 15, 15), (3.5, 9, 9))
    man, gt = slice_manifest(gt_vol)
    k_lo, k_hi = int(man.slice_index.min()), int(man.slice_index.max())
    # the model, prompted on the slices just outside the object, segments something on one
    extra = pd.DataFrame({"task": "t", "source": "case1.nii.gz", "label_value": 1,
                          "slice_index": [k_lo - 1, k_hi + 1], "image_id": ["case1_lo", "case1_hi"]})
    fp = np.zeros((30, 30), bool)
    fp[10:20, 10:20] = True
    pred = dict(gt)
    pred[("t", "case1_lo", 1)] = fp
    pred[("t", "case1_hi", 1)] = np.zeros((30, 30), bool)
    with_extra = volumes.volume_table(man, {("m", "S2"): pred}, gt, extra_slices=extra).iloc[0]
    plain = volumes.volume_table(man, {("m", "S2"): pred}, gt).iloc[0]
    assert (with_extra.n_extra_slices, with_extra.n_extra_fp) == (2, 1) and plain.n_extra_slices == 0
    assert plain.dice == 100.0 and with_extra.slice_dice == 100.0
    n_gt = int(gt_vol.sum())
    assert with_extra.dice == pytest.approx(200 * n_gt / (2 * n_gt + 100))
    pred_vol = gt_vol.copy()
    pred_vol[k_lo - 1] = fp
    assert with_extra.hd95 == pytest.approx(medpy_binary.hd95(pred_vol, gt_vol, voxelspacing=VOXEL), abs=1e-9)
    assert with_extra.hd > SLICE  # the false slab lies beyond the object's first slice
    table = volumes.volume_table(man, {("m", "S2"): pred}, gt, extra_slices=extra)
    gap = volumes.protocol_gap(table)
    assert list(gap.columns) == ["model", "strategy", "task", "n_volumes", "n_slices", "slice_dice",
                                 "volume_dice", "gap", "n_extra_slices", "n_extra_fp"]
    g = gap.iloc[0]
    assert g.slice_dice == 100.0 and g.gap == pytest.approx(100.0 - with_extra.dice) and g.gap > 0
    with pytest.raises(ValueError, match="repeat"):
        volumes.volume_table(man, {("m", "S2"): pred}, gt, extra_slices=extra.assign(slice_index=k_lo))


def test_protocol_gap_weights_slices_and_volumes():
    vt = pd.DataFrame({"model": "m", "strategy": "S2", "task": "t", "slice_dice": [90.0, 50.0],
                       "n_slices": [9, 1], "dice": [80.0, 40.0], "n_extra_slices": 0, "n_extra_fp": 0})
    g = volumes.protocol_gap(vt).iloc[0]
    assert (g.n_volumes, g.n_slices) == (2, 10)
    assert g.slice_dice == pytest.approx(86.0) and g.volume_dice == pytest.approx(60.0)
    assert g.gap == pytest.approx(26.0)


# --------------------------------------------------------------------------- providers, odd input


def test_saved_masks_reads_the_evaluation_layout(tmp_path):

    shape = (8, 20, 20)
    gt_vol = ellipsoid(shape, (4, 10, 10), (2.5, 5, 5))
    man, gt = slice_manifest(gt_vol)
    for r in man.itertuples(index=False):
        path = tmp_path / "masks" / "vit_b" / "S2" / r.task / evaluate.mask_filename(r.image_id, r.object, r.label_value)
        files.atomic_write_bytes(path, readers.encode_png(gt_vol[r.slice_index].astype(np.uint8) * 255))
    pred = volumes.saved_masks(tmp_path / "masks", "vit_b", "S2", man)
    r = volumes.volume_table(man, {("vit_b", "S2"): pred}, gt).iloc[0]
    assert r.dice == 100.0
    with pytest.raises(KeyError, match="no saved mask"):
        volumes.volume_table(man, {("vit_b", "S3"): volumes.saved_masks(tmp_path / "masks", "vit_b", "S3", man)}, gt)


def test_2d_rows_are_not_volumes_and_4d_collisions_are_left_out():
    shape = (8, 20, 20)
    gt_vol = ellipsoid(shape, (4, 10, 10), (2.5, 5, 5))
    man, gt = slice_manifest(gt_vol)
    flat = pd.DataFrame([{"task": "t", "image_id": "x", "label_value": 1, "source": "x.png", "slice_index": -1,
                          "height": 20, "width": 20}])
    assert len(volumes.volume_rows(pd.concat([man, flat]))) == len(man)
    assert volumes.has_volumes(man) and not volumes.has_volumes(flat)
    # two frames of a 4D source without a 'frame' column: same slice indices, left out
    frame1 = man.assign(image_id=man.image_id + "_t1")
    both = pd.concat([man, frame1])
    gt2 = {**gt, **{(t, i + "_t1", v): m for (t, i, v), m in gt.items()}}
    with pytest.warns(UserWarning, match="repeated"):
        table = volumes.volume_table(both, {("m", "S2"): gt2}, gt2)
    assert len(table) == 0
    # with a frame column they are two volumes
    table = volumes.volume_table(pd.concat([man.assign(frame=0), frame1.assign(frame=1)]), {("m", "S2"): gt2}, gt2)
    assert table.frame.tolist() == [0, 1] and (table.dice == 100.0).all()
