"""Tests of cosmoslib.data: volume/image readers, the COSMOS layout writer and the manifest reader."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from PIL import Image

from cosmoslib import files, vocabulary
from cosmoslib.data import indexer, layout, readers
from cosmoslib.files import InputError

# --------------------------------------------------------------------------- volumes


def test_read_volume_4d_metaimage_via_simpleitk(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 1000, (5, 6, 7)).astype(np.int16) for _ in range(3)]  # (z, y, x) each
    image = sitk.JoinSeries([sitk.GetImageFromArray(f) for f in frames])  # identity direction = LPS
    image.SetSpacing((0.5, 0.7, 2.0, 1.0))
    sitk.WriteImage(image, str(tmp_path / "cine.mha"))
    vol, spacing = readers.read_volume(tmp_path / "cine.mha")
    assert vol.shape == (3, 5, 6, 7) and spacing == (2.0, 0.7, 0.5)
    np.testing.assert_array_equal(vol, np.stack(frames))


def test_read_volume_reorients_flipped_nrrd(tmp_path):
    """A volume stored with reversed x (direction -1) reads the same as the LPS original."""
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # (S, P, L)
    ref = sitk.GetImageFromArray(arr)
    flipped = sitk.Flip(ref, [True, False, False], flipAboutOrigin=False)  # stores L as R->... reversed
    assert flipped.GetDirection()[0] == -1.0
    sitk.WriteImage(flipped, str(tmp_path / "flipped.nrrd"))
    vol, _ = readers.read_volume(tmp_path / "flipped.nrrd")
    np.testing.assert_array_equal(vol, arr)


def test_read_volume_nifti_squeeze_shear_and_errors(tmp_path):
    a = np.random.default_rng(1).normal(size=(6, 7, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(a[..., None], np.eye(4)), str(tmp_path / "one.nii.gz"))  # (x, y, z, 1)
    vol, _ = readers.read_volume(tmp_path / "one.nii.gz")
    np.testing.assert_array_equal(vol, a[::-1, ::-1, :].transpose(2, 1, 0))
    shear = np.array([[2, 0.5, 0, 0], [0, 3, 0, 0], [0, 0.3, 4, 0], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(a, shear), str(tmp_path / "shear.nii.gz"))
    with pytest.raises(RuntimeError, match="orthonormal"):  # why SimpleITK is not used for NIfTI
        sitk.ReadImage(str(tmp_path / "shear.nii.gz"))
    assert readers.read_volume(tmp_path / "shear.nii.gz")[0].shape == (8, 7, 6)
    a[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(a, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    assert np.isnan(readers.read_volume(tmp_path / "nan.nii.gz")[0]).sum() == 1  # NaN is kept, not zeroed
    (tmp_path / "bad.nrrd").write_bytes(b"NRRD0004\ngarbage")
    for name, problem in [("bad.nrrd", "unreadable volume"), ("missing.nii.gz", "not found")]:
        with pytest.raises(InputError, match=problem) as exc:
            readers.read_volume(tmp_path / name)
        assert exc.value.path == str(tmp_path / name)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), np.uint8)), str(tmp_path / "flat.mha"))
    with pytest.raises(InputError, match="2-D image"):
        readers.read_volume(tmp_path / "flat.mha")


# --------------------------------------------------------------------------- 2D images


def test_read_image_and_label_variants(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, np.full((10, 12), 255, np.uint8)])).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(readers.read_image(tmp_path / "rgba.png"), rgb)  # alpha dropped
    Image.fromarray(np.full((4, 4), 200, np.uint16)).save(tmp_path / "eight_in_16.png")
    assert readers.read_image(tmp_path / "eight_in_16.png").dtype == np.uint8
    sixteen = np.full((4, 4), 4000, np.uint16)
    sixteen[0, 0] = 100
    Image.fromarray(sixteen).save(tmp_path / "sixteen.png")  # real 16-bit data: min-max normalised
    np.testing.assert_array_equal(readers.read_image(tmp_path / "sixteen.png"), np.where(sixteen == 100, 0, 255))
    Image.fromarray(np.full((4, 4), 4000, np.uint16)).save(tmp_path / "flat16.png")
    with pytest.raises(InputError, match="constant intensity"):
        readers.read_image(tmp_path / "flat16.png")
    # palette label: the indices are the values
    pal = Image.fromarray(np.array([[0, 1], [2, 255]], np.uint8), mode="L").convert("P")
    pal.putpalette([v for i in range(256) for v in (i, 0, 255 - i)])
    pal.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(readers.read_label(tmp_path / "pal.png"), [[0, 1], [2, 255]])
    # grey label stored as RGB is fine, a colour-coded one is not
    Image.fromarray(np.dstack([np.eye(3, dtype=np.uint8) * 85] * 3)).save(tmp_path / "greyrgb.png")
    np.testing.assert_array_equal(readers.read_label(tmp_path / "greyrgb.png"), np.eye(3) * 85)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with pytest.raises(InputError, match="RGB label"):
        readers.read_label(tmp_path / "colour.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for reader in (readers.read_image, readers.read_label):
        with pytest.raises(InputError, match="unreadable") as exc:
            reader(tmp_path / "corrupt.png")
        assert exc.value.path == str(tmp_path / "corrupt.png")


def test_file_stem_and_modality_tokens():
    assert readers.file_stem("a/case 01.nii.gz") == "case 01"
    assert readers.file_stem("x.y_image.nrrd") == "x.y_image"
    cases = {"acdc_cine-mri": "Cine-MRI", "brats_t1w_mri": "T1W MRI", "kits_ct": "CT",
             "busi_us": "US", "busi": None, "chest X-ray": "X-ray", "MSD_T2-FLAIR_MRI": "T2-FLAIR MRI",
             "heart": None, "mni152_brain_t1w-mri": "T1W MRI", "nuclei_microscopy": "Microscopy"}
    assert {k: indexer.modality_from_task_name(k) for k in cases} == cases


# --------------------------------------------------------------------------- layout round trip


def _random_pair(rng, h, w, values, rgb=False):
    image = rng.integers(0, 256, (h, w, 3) if rgb else (h, w), dtype=np.uint8)
    label = np.zeros((h, w), np.uint8)
    for i, v in enumerate(values):
        label[2 + 6 * i: 6 + 6 * i, 3: 3 + 5 + i] = v
    return image, label


def test_layout_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    expected = []
    specs = {"liver_ct": {85: "Liver", 170: "Kidney", 255: "Kidney"}, "skin_dermoscopy": {1: "Lesion"}}
    for task, objects in specs.items():
        provenance = {}
        for n in range(3):
            values = sorted(objects)[: n + 1]
            image, label = _random_pair(rng, 40 + n, 30, values, rgb=task.startswith("skin"))
            image_id = f"case {n}_{n:04d}" if task == "liver_ct" else f"img-ü{n}"
            ipath, lpath = layout.write_pair(tmp_path, task, image_id, image, label)
            provenance[image_id] = {"source": f"raw/{n}.nii.gz", "slice_index": n, "plane": "axial",
                                    "spacing": [0.5, 0.75, 2.0 + n]}
            digests = {k: hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
                       for k, p in (("image_sha", ipath), ("label_sha", lpath))}
            for v in values:
                expected.append({"dataset": "DS " + task, "task": task, "modality": "M",
                                 "object": objects[v], "label_value": v, "image_id": image_id,
                                 "image_path": f"{task}/images/{image_id}.png",
                                 "label_path": f"{task}/labels/{image_id}.png",
                                 "source": f"raw/{n}.nii.gz", "slice_index": n,
                                 "area_px": int((label == v).sum()), "height": 40 + n, "width": 30,
                                 **digests, "plane": "axial", "spacing_row": 0.5, "spacing_col": 0.75,
                                 "spacing_slice": 2.0 + n, "rescaled": False})
        layout.write_task(tmp_path, task, objects, dataset="DS " + task, modality="M", images=provenance)
    man = indexer.index(tmp_path)
    assert list(man.columns) == indexer.MANIFEST_COLUMNS
    exp = pd.DataFrame(expected).sort_values(["task", "image_id", "label_value"]).reset_index(drop=True)
    exp["slice_index"] = exp["slice_index"].astype("Int64")
    pd.testing.assert_frame_equal(man, exp, check_dtype=False)
    # written bytes decode to the same arrays
    assert layout.list_images(tmp_path)[0][2].is_absolute()
    assert [t[:2] for t in layout.list_images(tmp_path)] == sorted({(r["task"], r["image_id"]) for r in expected})
    doc = json.loads((tmp_path / "liver_ct.json").read_text())
    assert doc["info"] == {"1": "Liver", "2": "Kidney", "3": "Kidney"}
    assert doc["color"] == {"1": 85, "2": 170, "3": 255}


def test_reads_authors_format_with_info_dir(tmp_path):
    """The authors' release: RGB .jpg/.png images, .png labels 85/170/255, json elsewhere."""
    root, info = tmp_path / "COSMOS", tmp_path / "info"
    task = "ACDC Heart"
    (root / task / "images").mkdir(parents=True)
    (root / task / "labels").mkdir(parents=True)
    info.mkdir()
    rng = np.random.default_rng(4)
    areas = {}
    for n, (ext, values) in enumerate([(".jpg", [85, 170, 255]), (".png", [170]), (".png", [85, 255])]):
        image, label = _random_pair(rng, 24, 20, values, rgb=(ext == ".jpg"))
        name = f"patient{n:03d} frame_01 ❤"
        Image.fromarray(image).save(root / task / "images" / f"{name}{ext}")
        Image.fromarray(label).save(root / task / "labels" / f"{name}.png")
        areas.update({(name, v): int((label == v).sum()) for v in values})
    (info / f"{task}.json").write_text(json.dumps(
        {"info": {"1": "LeftVentricle", "2": "Myocardium", "3": "RightVentricle"},
         "color": {"1": 85, "2": "170", "3": 255}}, ensure_ascii=False), encoding="utf-8")
    with pytest.warns(UserWarning, match="skipped"):  # without info_dir: no json -> loud
        assert indexer.index(root).empty
    man = indexer.index(root, info_dir=info)
    assert len(man) == 6 and set(man.dataset) == {task} and set(man.modality) == {"unknown"}
    names = {85: "LeftVentricle", 170: "Myocardium", 255: "RightVentricle"}
    for row in man.itertuples():
        assert row.object == names[row.label_value]
        assert row.area_px == areas[(row.image_id, row.label_value)]
        assert (row.height, row.width) == (24, 20)
        assert row.source is None and pd.isna(row.slice_index)
    assert man.image_path.str.endswith(".jpg").sum() == 3
    # the same json inside the task folder, with numeric keys, is found without info_dir
    (root / task / f"{task}.json").write_text(json.dumps(
        {"info": {1: "LeftVentricle", 2: "Myocardium", 3: "RightVentricle"}, "color": {1: 85, 2: 170, 3: 255}}))
    pd.testing.assert_frame_equal(indexer.index(root), man)


def test_index_dataset_modality_fallbacks(tmp_path):
    rng = np.random.default_rng(5)
    for task in ("pyradiomics_lung_ct", "foo_cine-mri"):
        image, label = _random_pair(rng, 20, 20, [1])
        layout.write_pair(tmp_path, task, "a", image, label)
        layout.write_task(tmp_path, task, {1: "Thing"})
    man = indexer.index(tmp_path).set_index("task")
    # from the catalog descriptor with the same task
    assert man.loc["pyradiomics_lung_ct", "dataset"] == "PyRadiomics test cases"
    assert man.loc["pyradiomics_lung_ct", "modality"] == "CT"
    # from the task name
    assert man.loc["foo_cine-mri", "dataset"] == "foo_cine-mri"
    assert man.loc["foo_cine-mri", "modality"] == "Cine-MRI"


def test_index_to_parquet_skips_bad_items(tmp_path):
    root = tmp_path / "root"
    rng = np.random.default_rng(6)
    image, label = _random_pair(rng, 20, 16, [1, 2])
    layout.write_pair(root, "t_ct", "good", image, label)
    layout.write_pair(root, "t_ct", "mismatch", image, label)
    Image.fromarray(label[:10]).save(root / "t_ct/labels/mismatch.png")
    Image.fromarray(image).save(root / "t_ct/images/nolabel.png")
    layout.write_pair(root, "t_ct", "corrupt", image, label)
    (root / "t_ct/labels/corrupt.png").write_bytes(b"broken")
    bad = label.copy()
    bad[0, 0] = 9
    layout.write_pair(root, "t_ct", "extra", image, bad)
    layout.write_pair(root, "t_ct", "empty", image, np.zeros_like(label))
    layout.write_task(root, "t_ct", {1: "A", 2: "B"})
    layout.write_pair(root, "nojson_ct", "x", image, label)
    rep = indexer.index_to_parquet(root, tmp_path / "out/manifest.parquet", progress=False)
    man = pd.read_parquet(tmp_path / "out/manifest.parquet")
    # good: A, B; extra: A, B (value 9 skipped)
    assert sorted(zip(man.image_id, man.object)) == [("extra", "A"), ("extra", "B"), ("good", "A"), ("good", "B")]
    skipped = pd.read_csv(tmp_path / "out/manifest.skipped.csv")
    reasons = {Path(f).relative_to(root).as_posix(): r for f, r in zip(skipped.file, skipped.reason)}
    assert reasons["t_ct/images/nolabel.png"] == "image without label"
    assert reasons["t_ct/labels/mismatch.png"].startswith("label 16x10 != image 16x20")
    assert reasons["t_ct/labels/corrupt.png"].startswith("unreadable")
    assert reasons["t_ct/labels/extra.png"] == "label value 9 absent from t_ct.json"
    assert reasons["t_ct/labels/empty.png"].startswith("label has no object")
    assert reasons["nojson_ct"].startswith("no nojson_ct.json")
    assert rep.n_skipped == 6 and rep.n_rows == 4 and rep.n_tasks == 2
    assert "6 item(s) skipped" in rep.summary() and "manifest.skipped.csv" in rep.summary()


def test_json_with_conflicting_names_is_loud(tmp_path):
    (tmp_path / "t" / "images").mkdir(parents=True)
    (tmp_path / "t.json").write_text(json.dumps({"info": {"1": "A", "2": "B"}, "color": {"1": 5, "2": 5}}))
    with pytest.raises(InputError, match="named both"):
        layout.read_task_json(tmp_path, "t")


def test_merge_skipped_csv(tmp_path):
    path = tmp_path / "skipped.csv"
    files.merge_skipped_csv(path, [("b.nii", "bad"), ("a.nii", "worse")])
    files.merge_skipped_csv(path, [("a.nii", "worse"), ("c.nii", "new")], drop_files=["b.nii"])
    df = pd.read_csv(path)
    assert df.values.tolist() == [["a.nii", "worse"], ["c.nii", "new"]]


# --------------------------------------------------------------------------- on the demo


def test_index_of_demo_matches_independent_count(demo_root):
    man = indexer.index(demo_root)
    n_rows = 0
    for task, image_id, path in layout.list_images(demo_root):
        label = np.asarray(Image.open(demo_root / task / "labels" / f"{image_id}.png"))
        n_rows += len(np.unique(label[label > 0]))
        assert path.exists()
    assert len(man) == n_rows
    assert man.groupby("task").image_id.nunique().sum() == len(layout.list_images(demo_root))
    assert (man.area_px > 50).all()
    assert man.source.notna().all() and man.slice_index.notna().all()


def test_modality_tokens_use_the_shared_vocabulary():

    cases = {"epfl_em": "Electron Microscopy", "case_dwi_mri": "DW MRI", "brain_t1_mri": "T1W MRI",
             "22_Heart": None, "6_Pancreas": None, "retina_oct": "OCT", "cxr_lungs": "X-ray",
             "Ultrasound thyroid": "US"}
    got = {k: indexer.modality_from_task_name(k) for k in cases}
    assert got == cases
    assert all(v is None or v in vocabulary.KNOWN_MODALITIES for v in got.values())
