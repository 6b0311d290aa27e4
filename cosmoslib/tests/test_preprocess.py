"""Tests of cosmoslib.data.preprocess: the single rules of paper 2.2 and the resumable batch."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from PIL import Image
from skimage.exposure import rescale_intensity

from cosmoslib.data import catalog, demo, indexer, layout, preprocess, readers
from cosmoslib.data.catalog import ObjectSpec
from cosmoslib.files import InputError

# --------------------------------------------------------------------------- helpers


def descriptor(tmp_path, **over):
    """A small volume descriptor (Left Lung 1 + Right Lung 2 -> Lung 255, Heart 3 -> 128)."""
    doc = {
        "name": "Synthetic",
        "modalities": ["CT"],
        "objects": [
            {"name": "Lung", "source_values": [1], "value": 255},
            {"name": "Lung", "source_values": [2], "value": 255},
            {"name": "Heart", "source_values": [3], "value": 128},
        ],
        "task": "synth_ct",
        "modality": "CT",
        "format": "volume",
        "main_plane": "axial",
        "pairs": {"image": "*_img.nii.gz", "label": "{stem}_seg.nii.gz"},
    }
    doc.update(over)
    return catalog.descriptor_from_mapping(doc, tmp_path / "synth.yaml")


def save_nii(path, arr):
    """Save an (S, P, L) [or (N, S, P, L)] array as NIfTI so that read_volume returns it unchanged.

    nibabel stores (x, y, z) in RAS+ with an identity affine: x -> right, y -> anterior,
    z -> superior; our (S, P, L) is that reversed and flipped (see readers.read_volume).
    """
    arr = np.asarray(arr)
    if arr.ndim == 3:
        ras = arr[:, ::-1, ::-1].transpose(2, 1, 0)
    else:
        ras = arr[:, :, ::-1, ::-1].transpose(3, 2, 1, 0)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(ras), np.eye(4)), str(path))


def volume_pair(folder, stem, image, label):
    save_nii(folder / f"{stem}_img.nii.gz", image)
    save_nii(folder / f"{stem}_seg.nii.gz", label.astype(np.uint8))


def synthetic_volume(seed=0, shape=(6, 40, 50)):
    """Noise volume with two lungs (1, 2) and a heart (3) on slices 1..4; slice 4 has a 40-px heart."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 20, size=shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[1:5, 5:15, 5:15] = 1      # 100 px per slice
    label[1:5, 5:15, 30:40] = 2     # 100 px per slice
    label[1:4, 20:30, 20:28] = 3    # 80 px per slice
    label[4, 20:25, 20:28] = 3      # 40 px: dropped by per_object
    return image, label


# --------------------------------------------------------------------------- slices


def test_slices_planes_shapes_and_orientation():
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)  # (S, P, L)
    assert preprocess.slices(vol, "axial").shape == (4, 5, 6)
    cor = preprocess.slices(vol, "coronal")
    sag = preprocess.slices(vol, "sagittal")
    assert cor.shape == (5, 4, 6) and sag.shape == (6, 4, 5)
    # superior (highest S index) is the top row of coronal and sagittal slices
    np.testing.assert_array_equal(cor[2][0], vol[3, 2, :])
    np.testing.assert_array_equal(sag[1][0], vol[3, :, 1])
    with pytest.raises(ValueError):
        preprocess.slices(vol, "oblique")


def test_axial_slice_of_real_nifti_matches_simpleitk(demo_root):
    """Our nibabel path vs an independent SimpleITK reading (DICOMOrient LPS) of the MNI template."""

    d = next(d for d in demo.demo_descriptors() if d.task == "mni152_brain_t1w-mri")
    t1 = demo.source_dir(d.source) / d.source.members[0]
    vol, spacing = readers.read_volume(t1)
    ref = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(t1)), "LPS"))
    assert spacing == (1.0, 1.0, 1.0) and vol.shape == ref.shape == (189, 233, 197)
    for k in (40, 90, 150):
        np.testing.assert_array_equal(preprocess.slices(vol, "axial")[k], ref[k])
    np.testing.assert_array_equal(preprocess.slices(vol, "sagittal")[98], ref[::-1, :, 98])


@pytest.mark.parametrize("member", ["brain1_image.nrrd", "lung2_image.nrrd"])
def test_axial_slice_of_real_nrrd_matches_pynrrd(demo_root, member):
    """PyRadiomics NRRDs (LPS space; brain1 has a negative y direction, lung2 a positive one)
    read by SimpleITK vs pynrrd with the flips taken from the header."""
    import nrrd


    task = "pyradiomics_brain_mri" if member.startswith("brain") else "pyradiomics_lung_ct"
    d = next(d for d in demo.demo_descriptors() if d.task == task)
    path = demo.source_dir(d.source) / "pyradiomics-3.0.1/data" / member
    vol, spacing = readers.read_volume(path)
    data, header = nrrd.read(str(path))
    assert header["space"] == "left-posterior-superior"
    directions = np.asarray(header["space directions"], float)
    assert np.count_nonzero(directions - np.diag(np.diag(directions))) == 0  # axis-aligned
    for axis, step in enumerate(np.diag(directions)):
        if step < 0:  # this file axis runs against L/P/S: flip it
            data = np.flip(data, axis)
    np.testing.assert_allclose(spacing, np.abs(np.diag(directions))[::-1], rtol=1e-6)
    for k in range(0, data.shape[2], 7):
        np.testing.assert_array_equal(vol[k], data[:, :, k].T)


# --------------------------------------------------------------------------- normalisation


def _assert_rounds_like(got, unrounded):
    """``got`` (uint8) equals ``rint(unrounded)`` wherever the value is clear of a .5 tie (two
    code paths may round a tie differently), and is never more than one grey level off."""
    ref = np.rint(unrounded)
    clear = np.abs(unrounded - np.floor(unrounded) - 0.5) > 1e-6
    np.testing.assert_array_equal(got[clear], ref[clear].astype(np.uint8))
    assert np.abs(got.astype(float) - ref).max() <= 1


def test_minmax_matches_skimage_and_paper_formula():
    rng = np.random.default_rng(1)
    img = rng.normal(-300, 400, size=(30, 40))
    got = preprocess.minmax_normalize(img)
    _assert_rounds_like(got, rescale_intensity(img, out_range=(0.0, 255.0)))
    assert got.dtype == np.uint8 and got.min() == 0 and got.max() == 255


def test_minmax_with_percentile_clipping():
    rng = np.random.default_rng(2)
    img = rng.uniform(0, 100, size=(50, 50))
    img[0, 0] = 1e6  # one hot pixel would squash everything to ~0 without clipping
    plain = preprocess.minmax_normalize(img)
    assert np.median(plain) == 0
    clipped = preprocess.minmax_normalize(img, clip_percentiles=(0.95, 99.5))
    lo, hi = np.percentile(img, (0.95, 99.5))
    _assert_rounds_like(clipped, rescale_intensity(img, in_range=(lo, hi), out_range=(0.0, 255.0)))
    assert 100 < np.median(clipped) < 160


def test_minmax_rgb_uses_one_range():
    img = np.zeros((4, 4, 3), np.uint16)
    img[..., 0] = 1000
    img[..., 1] = 500
    img[0, 0, 2] = 2000
    out = preprocess.minmax_normalize(img)
    assert out.shape == (4, 4, 3)
    assert out[1, 1, 0] == round(255 * 1000 / 2000) and out[1, 1, 1] == round(255 * 500 / 2000)


@pytest.mark.parametrize("img, problem", [
    (np.full((5, 5), 7.0), "constant"),
    (np.where(np.eye(5) > 0, np.nan, 1.0), "NaN"),
])
def test_minmax_refuses_constant_and_nan(img, problem):
    with pytest.raises(InputError, match=problem) as exc:
        preprocess.minmax_normalize(img, path="slice.png")
    assert exc.value.path == "slice.png"


# --------------------------------------------------------------------------- retention


def test_retain_per_object_threshold_is_strictly_more_than_50():
    label = np.zeros((40, 40), np.uint8)
    label[0:5, 0:10] = 1    # 50 px -> dropped
    label[10:13, 0:17] = 2  # 51 px -> kept
    out = preprocess.retain_objects(label, "per_object", 50)
    assert set(np.unique(out)) == {0, 2}
    assert (out == 2).sum() == 51
    assert not preprocess.retain_objects(np.where(label == 1, 1, 0), "per_object", 50).any()


def test_retain_label_sum_uses_raw_values_and_keeps_small_objects():
    label = np.zeros((30, 30), np.uint8)
    label[0:6, 0:8] = 255   # 48 px
    label[20, 20:23] = 128  # 3 px: survives label_sum on a kept slice
    raw = (label > 0).astype(np.int32)  # 0/1 source masks: sum = 51
    kept = preprocess.retain_objects(label, "label_sum", 50, raw=raw)
    np.testing.assert_array_equal(kept, label)
    raw[20, 22] = 0  # sum 50 -> not greater than 50 -> dropped
    assert not preprocess.retain_objects(label, "label_sum", 50, raw=raw).any()
    # per_object on the same slice drops both objects (48 and 3 px)
    assert not preprocess.retain_objects(label, "per_object", 50).any()


def test_retention_on_real_lung_ct_matches_independent_count(demo_root):
    """Slices kept for lung2 = axial slices whose 0/1 lesion mask has > 50 px (pynrrd count)."""
    import nrrd


    d = next(d for d in demo.demo_descriptors() if d.task == "pyradiomics_lung_ct")
    data, _ = nrrd.read(str(demo.source_dir(d.source) / "pyradiomics-3.0.1/data/lung2_label.nrrd"))
    expected = sorted(int(k) for k in range(data.shape[2]) if (data[:, :, k] > 0).sum() > 50)
    man = indexer.index(demo_root)
    lung2 = man[(man.task == "pyradiomics_lung_ct") & man.source.str.endswith("lung2_image.nrrd")]
    assert sorted(lung2.slice_index.tolist()) == expected and len(expected) > 5
    for k, area in zip(lung2.slice_index, lung2.area_px):
        assert area == (data[:, :, k] > 0).sum()


# --------------------------------------------------------------------------- label reset


def test_reset_labels_merges_named_objects_and_maps_values():
    objects = (ObjectSpec("Lung", (1,), 255), ObjectSpec("Lung", (2,), 255), ObjectSpec("Kidney", (3,), 85),
               ObjectSpec("Kidney", (4,), 170))
    raw = np.array([[0, 1, 2], [3, 4, 9]], np.int16)
    out = preprocess.reset_labels(raw, objects, ignore_values=(9,))
    np.testing.assert_array_equal(out, [[0, 255, 255], [85, 170, 0]])
    assert out.dtype == np.uint8
    # float labels with whole numbers are fine
    np.testing.assert_array_equal(preprocess.reset_labels(raw.astype(np.float32), objects, (9,)), out)


def test_reset_labels_unknown_value_names_file():
    with pytest.raises(InputError, match=r"label value\(s\) 7") as exc:
        preprocess.reset_labels(np.array([[0, 1, 7]]), (ObjectSpec("A", (1,), 1),), path="case_seg.nii.gz")
    assert exc.value.path == "case_seg.nii.gz"
    with pytest.raises(InputError, match="fractional"):
        preprocess.reset_labels(np.array([[0, 0.5]]), (ObjectSpec("A", (1,), 1),), path="x")


# --------------------------------------------------------------------------- instances


def grid_instances(n, cell=8, size=8):
    """n square instances of size x size px on a grid, raw values 1000 + 3 i (not 1..n)."""
    side = int(np.ceil(np.sqrt(n)))
    label = np.zeros((side * (cell + 2), side * (cell + 2)), np.int32)
    for i in range(n):
        r, c = divmod(i, side)
        label[r * (cell + 2):r * (cell + 2) + size, c * (cell + 2):c * (cell + 2) + size] = 1000 + 3 * i
    return label


def test_split_instances_300_into_two_balanced_parts():
    raw = grid_instances(300)
    parts = preprocess.split_instances(raw)
    assert len(parts) == 2
    assert [int(p.max()) for p in parts] == [150, 150]
    assert all(p.dtype == np.uint8 for p in parts)
    # every instance lands whole in exactly one part, with its own value
    seen = 0
    fg = np.zeros(raw.shape, bool)
    for p in parts:
        assert len(np.unique(p[p > 0])) == int(p.max())
        for v in range(1, int(p.max()) + 1):
            src = np.unique(raw[p == v])
            assert src.size == 1 and (raw == src[0]).sum() == (p == v).sum()
        seen += int(p.max())
        assert not (fg & (p > 0)).any()
        fg |= p > 0
    assert seen == 300
    np.testing.assert_array_equal(fg, raw > 0)


def test_split_instances_small_and_empty():
    raw = grid_instances(10)
    (only,) = preprocess.split_instances(raw)
    assert sorted(np.unique(only)) == list(range(11))
    assert preprocess.split_instances(np.zeros((4, 4), int)) == []
    assert len(preprocess.split_instances(grid_instances(511))) == 3


def test_prepare_instances_splits_and_writes_json(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    raw = grid_instances(300, cell=8, size=8)  # 64 px each: all kept (> 50)
    raw[0:8, 0:8] = 0
    raw[0:7, 0:7] = 1000  # 49 px: dropped by per_object
    img = (np.random.default_rng(0).uniform(0, 4000, raw.shape)).astype(np.uint16)
    import tifffile

    tifffile.imwrite(src / "cells.tif", img)
    tifffile.imwrite(src / "cells_mask.tif", raw.astype(np.uint16))
    d = catalog.descriptor_from_mapping({
        "name": "Cells", "objects": [{"name": "Cell"}], "task": "cells_microscopy", "modality": "Microscopy",
        "format": "instances", "pairs": {"image": "cells.tif", "label": "{name}_mask.tif"}}, None)
    rep = preprocess.prepare(src, d, tmp_path / "out", progress=False)
    assert rep.n_done == 1 and rep.n_images == 2 and rep.n_objects == 299
    man = indexer.index(tmp_path / "out")
    assert sorted(man.image_id.unique()) == ["cells_part00", "cells_part01"]
    assert (man.object == "Cell").all() and man.area_px.min() == 64
    assert man.groupby("image_id").label_value.max().tolist() == [150, 149]
    info = layout.read_task_json(tmp_path / "out", "cells_microscopy")
    assert len(info.names) == 150 and set(info.names.values()) == {"Cell"}
    # both sub-images are the same normalised copy of the image
    a = readers.read_image(tmp_path / "out/cells_microscopy/images/cells_part00.png")
    b = readers.read_image(tmp_path / "out/cells_microscopy/images/cells_part01.png")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, preprocess.minmax_normalize(img))


# --------------------------------------------------------------------------- pairing


def test_find_pairs_templates(tmp_path):
    for rel in ("imagesTr/case_01.nii.gz", "labelsTr/case_01.nii.gz", "imagesTr/case_02.nii.gz",
                "p1/x_image.nrrd", "p1/x_label.nrrd"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    d = descriptor(tmp_path, pairs={"image": "imagesTr/*.nii.gz", "label": "labelsTr/{name}.nii.gz"})
    items, missing = preprocess.find_pairs(tmp_path, d)
    assert [(i.key, i.label.relative_to(tmp_path).as_posix(), i.stem) for i in items] == [
        ("imagesTr/case_01.nii.gz", "labelsTr/case_01.nii.gz", "case_01")]
    assert missing == [(str(tmp_path / "imagesTr/case_02.nii.gz"),
                        f"no label file: {tmp_path / 'labelsTr/case_02.nii.gz'} not found")]
    d = descriptor(tmp_path, pairs={"image": "**/*_image.nrrd", "label": "{dir}/{stem}_label.nrrd"})
    items, missing = preprocess.find_pairs(tmp_path, d)
    assert [i.label for i in items] == [tmp_path / "p1/x_label.nrrd"] and not missing


# --------------------------------------------------------------------------- the batch


def test_prepare_volume_flow_values_and_names(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    image, label = synthetic_volume()
    volume_pair(src, "case1", image, label)
    d = descriptor(tmp_path)
    rep = preprocess.prepare(src, d, tmp_path / "out", progress=False)
    assert (rep.n_sources, rep.n_done, rep.n_skipped) == (1, 1, 0)
    man = indexer.index(tmp_path / "out")
    assert sorted(man.image_id.unique()) == [f"case1_img_{k:04d}" for k in (1, 2, 3, 4)]
    # slice 4: its 40-px heart is dropped by per_object, the lungs stay (two parts, one object)
    s4 = man[man.slice_index == 4]
    assert s4.object.tolist() == ["Lung"] and s4.area_px.tolist() == [200]
    s1 = man[man.slice_index == 1].set_index("object")
    assert s1.loc["Heart", "label_value"] == 128 and s1.loc["Heart", "area_px"] == 80
    for _, row in man.iterrows():  # label PNG values are exactly the descriptor's values
        lab = readers.read_label(tmp_path / "out" / row.label_path)
        assert set(np.unique(lab)) - {0} <= {128, 255}
        img = readers.read_image(tmp_path / "out" / row.image_path)
        np.testing.assert_array_equal(img, preprocess.minmax_normalize(image[row.slice_index]))
    assert (tmp_path / "out/skipped.csv").read_text().strip() == "file,reason"
    assert "1 processed now" in rep.summary() and str(tmp_path / "out") in rep.summary()


def test_prepare_label_sum_rule_keeps_small_objects(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    image, label = synthetic_volume()
    volume_pair(src, "case1", image, label)
    d = descriptor(tmp_path, retention={"rule": "label_sum", "min_pixels": 50})
    preprocess.prepare(src, d, tmp_path / "out", progress=False)
    man = indexer.index(tmp_path / "out")
    assert man[man.slice_index == 4].object.tolist() == ["Heart", "Lung"]


def test_prepare_sampling_and_coronal_plane(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    image, label = synthetic_volume()
    volume_pair(src, "case1", image, label)
    d = descriptor(tmp_path, main_plane="coronal", sampling={"max_slices_per_volume": 3})
    preprocess.prepare(src, d, tmp_path / "out", progress=False)
    man = indexer.index(tmp_path / "out")
    # coronal slices j with objects: P rows 5..29; > 50 px per object needs 4 S-rows x 10+ L-columns
    kept = [j for j in range(40) if preprocess.retain_objects(
        preprocess.reset_labels(preprocess.slices(label, "coronal")[j], descriptor(tmp_path).objects)).any()]
    picks = [kept[i] for i in sorted(set(np.linspace(0, len(kept) - 1, 3).round().astype(int)))]
    assert sorted(man.slice_index.unique().tolist()) == picks
    assert (man.height == 6).all() and (man.width == 50).all()


def test_prepare_4d_volume(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    frames = [synthetic_volume(seed=s) for s in range(3)]
    image = np.stack([f[0] for f in frames])
    label = np.stack([f[1] for f in frames])
    label[2] = 0
    label[2, 2, 5:15, 5:15] = 1  # frame 2: one slice only
    volume_pair(src, "cine", image, label)
    assert readers.read_volume(src / "cine_img.nii.gz")[0].shape == (3, 6, 40, 50)
    d = descriptor(tmp_path, format="volume4d")
    rep = preprocess.prepare(src, d, tmp_path / "out", progress=False)
    assert rep.n_images == 4 + 4 + 1
    man = indexer.index(tmp_path / "out")
    assert "cine_img_t002_0002" in set(man.image_id)
    info = layout.read_task_json(tmp_path / "out", "synth_ct")
    assert info.images["cine_img_t001_0003"] == {"source": "cine_img.nii.gz", "slice_index": 3, "frame": 1,
                                                 "plane": "axial", "spacing": [1.0, 1.0, 1.0]}
    np.testing.assert_array_equal(readers.read_image(tmp_path / "out/synth_ct/images/cine_img_t002_0002.png"),
                                  preprocess.minmax_normalize(image[2, 2]))
    # a 3D label with a 4D image applies to every frame
    save_nii(src / "cine_seg.nii.gz", frames[0][1])
    rep = preprocess.prepare(src, d, tmp_path / "out2", progress=False)
    assert rep.n_images == 12


def test_prepare_2d_rgb_grey_and_16bit(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    grey_as_rgb = np.repeat(rng.integers(0, 256, (32, 48, 1), dtype=np.uint8), 3, axis=2)
    label = np.zeros((32, 48), np.uint8)
    label[4:20, 4:20] = 255  # raw mask value 255 -> COSMOS value 1
    Image.fromarray(rgb).save(src / "a.png")
    Image.fromarray(grey_as_rgb).save(src / "b.png")
    import tifffile

    tifffile.imwrite(src / "c.tif", (rng.uniform(0, 60000, (32, 48))).astype(np.uint16))
    for n in "abc":
        Image.fromarray(label).save(src / f"{n}_mask.png")
    d = catalog.descriptor_from_mapping({
        "name": "Polyps", "objects": [{"name": "Polyp", "source_values": [255], "value": 1}],
        "task": "polyp_colonoscopy", "modality": "Colonoscopy", "format": "image",
        "pairs": {"image": "[abc].*", "label": "{name}_mask.png"}}, None)
    rep = preprocess.prepare(src, d, tmp_path / "out", progress=False)
    assert rep.n_images == 3
    out = tmp_path / "out/polyp_colonoscopy"
    np.testing.assert_array_equal(readers.read_image(out / "images/a.png"), rgb)  # RGB stays RGB, unchanged
    b = readers.read_image(out / "images/b.png")
    assert b.ndim == 2
    np.testing.assert_array_equal(b, grey_as_rgb[..., 0])
    c = readers.read_image(out / "images/c.png")
    assert c.dtype == np.uint8 and c.min() == 0 and c.max() == 255
    assert set(np.unique(readers.read_label(out / "labels/a.png"))) == {0, 1}
    man = indexer.index(tmp_path / "out")
    assert man.slice_index.tolist() == [-1, -1, -1]


# --------------------------------------------------------------------------- bad input


def write_bad_sources(src):
    """Two good volumes and one of each bad case; returns {stem: expected problem}."""
    src.mkdir(parents=True, exist_ok=True)
    image, label = synthetic_volume()
    volume_pair(src, "good1", image, label)
    volume_pair(src, "good2", image + 5, label)
    (src / "corrupt_img.nii.gz").write_bytes(b"this is not a nifti file")
    save_nii(src / "corrupt_seg.nii.gz", label)
    volume_pair(src, "mismatch", image, label[:, :, :40])
    bad = label.copy()
    bad[2, 0, 0] = 7
    volume_pair(src, "unknownvalue", image, bad)
    volume_pair(src, "constant", np.full_like(image, 3.0), label)
    nan = image.copy()
    nan[0, 0, :5] = np.nan
    volume_pair(src, "nan", nan, label)
    volume_pair(src, "empty", image, np.zeros_like(label))
    return {
        "corrupt": ("corrupt_img.nii.gz", "unreadable volume"),
        "mismatch": ("mismatch_seg.nii.gz", "label shape"),
        "unknownvalue": ("unknownvalue_seg.nii.gz", "label value(s) 7"),
        "constant": ("constant_img.nii.gz", "constant image"),
        "nan": ("nan_img.nii.gz", "NaN"),
        "empty": ("empty_seg.nii.gz", "empty label"),
    }


def test_each_bad_input_raises_input_error_naming_file(tmp_path):
    expected = write_bad_sources(tmp_path / "src")
    d = descriptor(tmp_path)
    items, _ = preprocess.find_pairs(tmp_path / "src", d)
    by_stem = {i.key.split("_img")[0]: i for i in items}
    for stem, (fname, problem) in expected.items():
        with pytest.raises(InputError) as exc:
            preprocess.prepare_item(by_stem[stem], d)
        assert exc.value.path.endswith(fname), (stem, exc.value)
        assert problem in exc.value.problem, (stem, exc.value.problem)


def test_batch_records_bad_items_and_writes_good_ones(tmp_path):
    expected = write_bad_sources(tmp_path / "src")
    (tmp_path / "src/nolabel_img.nii.gz").write_bytes(b"")
    d = descriptor(tmp_path)
    rep = preprocess.prepare(tmp_path / "src", d, tmp_path / "out", progress=False)
    assert rep.n_sources == 9 and rep.n_done == 2 and rep.n_skipped == 7
    skipped = pd.read_csv(tmp_path / "out/skipped.csv")
    assert list(skipped.columns) == ["file", "reason"]
    for fname, problem in expected.values():
        rows = skipped[skipped.file.str.endswith(fname)]
        assert len(rows) == 1 and problem in rows.reason.iloc[0]
    assert skipped.file.str.endswith("nolabel_img.nii.gz").sum() == 1
    man = indexer.index(tmp_path / "out")
    assert set(man.source) == {"good1_img.nii.gz", "good2_img.nii.gz"}
    assert "7 item(s) skipped" in rep.summary()
    # a rerun keeps the list (merged, no duplicates) and does not redo the good items
    rep2 = preprocess.prepare(tmp_path / "src", d, tmp_path / "out", progress=False)
    assert rep2.n_resumed == 2 and rep2.n_done == 0
    assert pd.read_csv(tmp_path / "out/skipped.csv").equals(skipped)
    # fixing an item removes its row on the next run
    image, label = synthetic_volume()
    volume_pair(tmp_path / "src", "empty", image, label)
    rep3 = preprocess.prepare(tmp_path / "src", d, tmp_path / "out", progress=False)
    assert rep3.n_done == 1
    after = pd.read_csv(tmp_path / "out/skipped.csv")
    assert len(after) == 6 and not after.file.str.endswith("empty_seg.nii.gz").any()


def test_constant_slice_is_left_out_and_recorded(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    image, label = synthetic_volume()
    image[2] = 0.0
    volume_pair(src, "case1", image, label)
    rep = preprocess.prepare(src, descriptor(tmp_path), tmp_path / "out", progress=False)
    assert rep.n_done == 1 and rep.n_images == 3
    assert rep.skipped == [(str(src / "case1_img.nii.gz"), "slice 2: constant intensity (0); min-max "
                                                            "normalisation undefined; slice left out")]


# --------------------------------------------------------------------------- resume


def test_resume_skips_finished_sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    image, label = synthetic_volume()
    volume_pair(src, "a", image, label)
    volume_pair(src, "b", image * 2, label)
    d = descriptor(tmp_path)
    out = tmp_path / "out"
    rep1 = preprocess.prepare(src, d, out, progress=False)
    assert (rep1.n_done, rep1.n_resumed) == (2, 0)
    pngs = sorted(out.rglob("*.png"))
    mtimes = {p: p.stat().st_mtime_ns for p in pngs}
    rep2 = preprocess.prepare(src, d, out, progress=False)
    assert (rep2.n_done, rep2.n_resumed, rep2.n_images) == (0, 2, rep1.n_images)
    assert "Nothing to do" in rep2.summary()
    assert {p: p.stat().st_mtime_ns for p in sorted(out.rglob("*.png"))} == mtimes
    # a new source: only it is processed
    volume_pair(src, "c", image * 3, label)
    rep3 = preprocess.prepare(src, d, out, progress=False)
    assert (rep3.n_done, rep3.n_resumed) == (1, 2)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    # an interrupted run: a torn last ledger line means that item is simply redone
    ledger = preprocess.ledger_path(out, d.task)
    text = ledger.read_text()
    ledger.write_text(text[: len(text) - 20])
    rep4 = preprocess.prepare(src, d, out, progress=False)
    assert (rep4.n_done, rep4.n_resumed) == (1, 2)
    # a changed descriptor invalidates the ledger: old outputs removed, everything redone
    d2 = descriptor(tmp_path, sampling={"max_slices_per_volume": 1})
    with pytest.warns(UserWarning, match="descriptor changed"):
        rep5 = preprocess.prepare(src, d2, out, progress=False)
    assert (rep5.n_done, rep5.n_images) == (3, 3)
    assert len(list((out / "synth_ct/images").glob("*.png"))) == 3


def test_prepare_is_deterministic(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    image, label = synthetic_volume()
    volume_pair(src, "a", image, label)
    d = descriptor(tmp_path)
    for out in ("o1", "o2"):
        preprocess.prepare(src, d, tmp_path / out, progress=False)
    files = sorted(p.relative_to(tmp_path / "o1") for p in (tmp_path / "o1").rglob("*") if p.is_file())
    assert files
    for rel in files:
        assert (tmp_path / "o1" / rel).read_bytes() == (tmp_path / "o2" / rel).read_bytes(), rel


def test_prepare_refuses_catalog_only_descriptor(tmp_path):
    d = catalog.descriptor_from_mapping({"name": "X", "modalities": ["CT"]}, tmp_path / "x.yaml")
    with pytest.raises(InputError, match="catalog-only"):
        preprocess.prepare(tmp_path, d, tmp_path / "out")
    with pytest.raises(InputError, match="not found"):
        preprocess.prepare(tmp_path / "missing", descriptor(tmp_path), tmp_path / "out")


# --------------------------------------------------------------------------- provenance: plane, spacing


def save_nii_spacing(path, arr, zooms_xyz):
    """Like :func:`save_nii` but with voxel sizes ``(x, y, z)`` in mm (RAS+ diagonal affine)."""
    ras = np.asarray(arr)[:, ::-1, ::-1].transpose(2, 1, 0)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(ras), np.diag([*zooms_xyz, 1.0])), str(path))


@pytest.mark.parametrize("plane, expected", [
    # NIfTI x (L axis) 0.5 mm, y (P axis) 0.8 mm, z (S axis) 3.0 mm; [row, column, slice]:
    ("axial", [0.8, 0.5, 3.0]),     # rows along P, columns along L, slices along S
    ("coronal", [3.0, 0.5, 0.8]),   # rows along S, columns along L, slices along P
    ("sagittal", [3.0, 0.8, 0.5]),  # rows along S, columns along P, slices along L
])
def test_prepared_volume_slices_record_plane_and_spacing(tmp_path, plane, expected):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    image = rng.normal(100, 20, size=(12, 40, 50)).astype(np.float32)
    label = np.zeros((12, 40, 50), np.uint8)
    label[2:10, 5:25, 10:30] = 1  # > 50 px on every slice of every plane that cuts it
    save_nii_spacing(src / "case1_img.nii.gz", image, (0.5, 0.8, 3.0))
    save_nii_spacing(src / "case1_seg.nii.gz", label.astype(np.uint8), (0.5, 0.8, 3.0))
    d = descriptor(tmp_path, main_plane=plane)
    rep = preprocess.prepare(src, d, tmp_path / "out", progress=False)
    assert rep.n_done == 1 and rep.n_images > 0
    info = layout.read_task_json(tmp_path / "out", "synth_ct")
    assert len(info.images) == rep.n_images == {"axial": 8, "coronal": 20, "sagittal": 20}[plane]
    for image_id, prov in info.images.items():
        assert prov["plane"] == plane and prov["source"] == "case1_img.nii.gz"
        np.testing.assert_allclose(prov["spacing"], expected, rtol=1e-6)
        # the spacing's row/column order is that of the stored PNG: its shape matches the
        # volume's extent along those axes (S=12, P=40, L=50)
        extent = {"axial": (40, 50), "coronal": (12, 50), "sagittal": (12, 40)}[plane]
        assert readers.read_label(tmp_path / "out/synth_ct/labels" / f"{image_id}.png").shape == extent


def test_slice_spacing_matches_simpleitk_on_an_nrrd(tmp_path):
    """An anisotropic NRRD written by SimpleITK with a non-identity (flipped) direction: the
    spacing recorded for axial slices is SimpleITK's own (x, y, z) spacing, reordered."""
    import SimpleITK as sitk

    src = tmp_path / "src"
    src.mkdir()
    image, label = synthetic_volume()
    for arr, name in ((image, "case1_img.nrrd"), (label.astype(np.uint8), "case1_seg.nrrd")):
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing((0.7, 0.9, 2.5))  # x, y, z
        im.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
        sitk.WriteImage(im, str(src / name))
    d = descriptor(tmp_path, pairs={"image": "*_img.nrrd", "label": "{stem}_seg.nrrd"})
    preprocess.prepare(src, d, tmp_path / "out", progress=False)
    sx, sy, sz = sitk.ReadImage(str(src / "case1_img.nrrd")).GetSpacing()
    info = layout.read_task_json(tmp_path / "out", "synth_ct")
    assert info.images
    for prov in info.images.values():
        # LPS: x runs along L (columns of an axial slice), y along P (rows), z along S (slices)
        np.testing.assert_allclose(prov["spacing"], [sy, sx, sz], rtol=1e-6)
        assert prov["plane"] == "axial"


def test_slice_spacing_rule_and_2d_sources_have_none(tmp_path):
    assert preprocess.slice_spacing((3.0, 0.8, 0.5), "axial") == [0.8, 0.5, 3.0]
    assert preprocess.slice_spacing((3.0, 0.8, 0.5), "coronal") == [3.0, 0.5, 0.8]
    assert preprocess.slice_spacing((3.0, 0.8, 0.5), "sagittal") == [3.0, 0.8, 0.5]
    with pytest.raises(ValueError):
        preprocess.slice_spacing((1, 1, 1), "oblique")
    # a 2D source: no plane, no spacing (unknown), slice_index -1
    src = tmp_path / "src"
    src.mkdir()
    img = (np.arange(40 * 30) % 251).astype(np.uint8).reshape(40, 30)
    lab = np.zeros((40, 30), np.uint8)
    lab[5:20, 5:20] = 1
    Image.fromarray(img).save(src / "a_img.png")
    Image.fromarray(lab).save(src / "a_seg.png")
    d = catalog.descriptor_from_mapping({
        "name": "Synthetic2D", "modalities": ["X-ray"], "task": "synth_xray", "modality": "X-ray",
        "format": "image", "objects": [{"name": "Thing", "source_values": [1], "value": 255}],
        "pairs": {"image": "*_img.png", "label": "{stem}_seg.png"}}, tmp_path / "s2d.yaml")
    preprocess.prepare(src, d, tmp_path / "out", progress=False)
    info = layout.read_task_json(tmp_path / "out", "synth_xray")
    assert info.images == {"a_img": {"source": "a_img.png", "slice_index": -1}}

