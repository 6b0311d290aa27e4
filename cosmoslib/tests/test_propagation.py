"""3D by propagation (cosmoslib.protocol.propagation).

The mechanics -- slice order, both directions, reassembly, leak counting, the prompt slice --
are checked with a stand-in predictor that has SAM 2's video-predictor interface and returns
known masks: it recognises each slice by its pixels (so a stack out of order puts masks in the
wrong place) and each object by its prompt box. One run with a random-init (shrunk) SAM 2.1
model checks shapes and order end to end, through ``cosmos evaluate --propagate``.
"""

from __future__ import annotations

import hashlib
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from cosmoslib import cli, masks
from cosmoslib.data import catalog, indexer, preprocess
from cosmoslib.protocol import evaluate, propagation

SHAPE = (16, 40, 48)  # (slices, rows, columns) of the synthetic volume
ROW, COL, SLICE = 0.8, 0.8, 2.5


def ellipsoid(centre, radii, shape=SHAPE):
    grid = np.indices(shape).astype(float)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1


def write_volume(folder, name="case1", sampled=None):
    """A NIfTI pair with two objects (1 in slices ~3-9, 2 in ~7-13), prepared into a COSMOS root.

    Returns (root, source folder, label volume (D, H, W) in slice order, normalised slices)."""
    src = folder / "src"
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    label = np.zeros(SHAPE, np.uint8)
    label[ellipsoid((6, 16, 18), (3.6, 9, 11))] = 1
    label[ellipsoid((10, 24, 30), (3.6, 8, 10))] = 2
    image = rng.normal(100, 20, SHAPE).astype(np.float32) + 60 * label
    for arr, suffix in ((image, "img"), (label, "seg")):
        ras = arr[:, ::-1, ::-1].transpose(2, 1, 0)  # (S, P, L) -> RAS
        nib.save(nib.Nifti1Image(np.ascontiguousarray(ras), np.diag([COL, ROW, SLICE, 1.0])),
                 str(src / f"{name}_{suffix}.nii.gz"))
    spec = {"name": "Synthetic", "modalities": ["CT"], "task": "synth_ct", "modality": "CT", "format": "volume",
            "main_plane": "axial", "objects": [{"name": "A", "source_values": [1], "value": 1},
                                               {"name": "B", "source_values": [2], "value": 2}],
            "pairs": {"image": "*_img.nii.gz", "label": "{stem}_seg.nii.gz"}}
    if sampled:
        spec["sampling"] = {"max_slices_per_volume": sampled}
    d = catalog.descriptor_from_mapping(spec, folder / "d.yaml")
    root = folder / "cosmos"
    preprocess.prepare(src, d, root, progress=False)
    slices = [preprocess.minmax_normalize(image[k]) for k in range(SHAPE[0])]
    return root, src, label, slices


def _h(img) -> str:
    return hashlib.blake2b(np.ascontiguousarray(img).tobytes(), digest_size=8).hexdigest()


class StandInVideo:
    """SAM 2's video-predictor interface (SliceVideo's four methods) with known masks.

    ``truth[value]`` is the object's mask volume; ``leaks[value]`` the slices where a 3 x 3
    false-positive blob is added. Slices are recognised by their pixels, objects by their box."""

    def __init__(self, slices, truth, leaks=None, skip=None):
        self.index = {_h(img): k for k, img in enumerate(slices)}
        self.truth, self.leaks, self.skip = truth, leaks or {}, skip
        self.log = []

    def init_state(self, slices):
        return {"ks": [self.index[_h(img)] for img in slices], "obj": None}

    def add_box(self, state, pos, box):
        k = state["ks"][pos]
        state["obj"] = next(v for v, t in self.truth.items()
                            if t[k].any() and list(masks.tight_box(t[k])) == list(box))
        self.log.append(("box", k, state["obj"]))

    def propagate(self, state, start, reverse):
        ks, value = state["ks"], state["obj"]
        if reverse and start == 0:  # as SAM 2: no backward pass from the first frame
            return
        order = range(start, -1, -1) if reverse else range(start, len(ks))
        for pos in order:
            k = ks[pos]
            if k == self.skip:
                continue
            m = self.truth[value][k].copy()
            if k in self.leaks.get(value, ()):
                m[:3, :3] = True
            if reverse and pos == start:
                m[:] = False  # the start slice's backward mask must not replace its forward one
            self.log.append(("back" if reverse else "fwd", k, value))
            yield pos, np.where(m, 4.0, -4.0)

    def reset(self, state):
        state["obj"] = None


class NoVideo:
    name = "litemedsam-like"


class StandInModel:
    def __init__(self, video, name="stand-in"):
        self.name, self._video = name, video

    def video(self):
        return self._video


def kept_truth(manifest, label):
    """Each object's mask volume on the slices the manifest keeps (the slice-only protocol)."""
    out = {}
    for value, rows in manifest.groupby("label_value"):
        vol = np.zeros(label.shape, bool)
        for k in rows["slice_index"].astype(int):
            vol[k] = label[k] == int(value)
        out[int(value)] = vol
    return out


# --------------------------------------------------------------------------- the prompt slice


def test_prompt_slice_rules():
    areas = {3: 10, 4: 40, 5: 40, 6: 25, 9: 5}
    assert propagation.prompt_slice(areas, "largest") == 4  # tie: the first
    assert propagation.prompt_slice(areas, "middle") == 6  # nearest (3 + 9) / 2
    assert propagation.prompt_slice({2: 1, 4: 1, 7: 1, 9: 1}, "middle") == 4  # 4 and 7 both 1.5 from 5.5: the lower
    with pytest.raises(ValueError, match="unknown prompt-slice rule"):
        propagation.prompt_slice(areas, "first")


# --------------------------------------------------------------------------- one object


def test_propagation_goes_forward_then_backward_and_keeps_every_slice_in_place(tmp_path):
    root, _, label, slices = write_volume(tmp_path)
    truth = {1: label == 1}
    video = StandInVideo(slices, truth)
    stack = propagation.Stack("t", "s", np.arange(SHAPE[0]), [f"x_{k}" for k in range(SHAPE[0])], slices, "volume")
    state = video.init_state(stack.images)
    start = 6
    pred = propagation.propagate_object(video, state, stack, start, masks.tight_box(truth[1][start]))
    np.testing.assert_array_equal(pred, truth[1])  # the backward pass did not overwrite slice 6
    visited = [(d, k) for d, k, _ in video.log[1:]]
    assert visited == [("fwd", k) for k in range(6, 16)] + [("back", k) for k in range(6, -1, -1)]
    # from the first slice SAM 2 has no backward pass: every slice still comes from the forward one
    video.log.clear()
    first = int(np.flatnonzero(truth[1].any(axis=(1, 2)))[0])
    sub = propagation.Stack("t", "s", np.arange(first, 16), [f"x_{k}" for k in range(first, 16)],
                            slices[first:], "volume")
    pred = propagation.propagate_object(video, video.init_state(sub.images), sub, first,
                                        masks.tight_box(truth[1][first]))
    np.testing.assert_array_equal(pred, truth[1][first:])
    # a predictor that skips a slice is an error, not a silently empty slice
    with pytest.raises(RuntimeError, match="visited"):
        skipping = StandInVideo(slices, truth, skip=9)
        propagation.propagate_object(skipping, skipping.init_state(slices), stack, start,
                                     masks.tight_box(truth[1][start]))


# --------------------------------------------------------------------------- whole volumes


def test_volumes_from_the_source_and_the_layout_score_leaks_and_gaps(tmp_path):
    root, src, label, slices = write_volume(tmp_path)
    manifest = indexer.index(root)
    truth = kept_truth(manifest, label)
    leaks = {1: {0, 12, 15}, 2: {1, 14}}  # slices without the object
    video = StandInVideo(slices, truth, leaks)
    run = propagation.propagate(manifest, root, [StandInModel(video), NoVideo()], source_dir=src)
    assert run.skipped[0][1].startswith("no video predictor")
    info = run.info.set_index(["label_value", "strategy"])
    assert set(info["stack_origin"]) == {"volume"} and set(info["n_stack"]) == {SHAPE[0]}
    for value in (1, 2):
        areas = {int(k): int((label[k] == value).sum()) for k in manifest[manifest.label_value == value].slice_index}
        assert info.loc[(value, "P-largest"), "prompt_slice"] == propagation.prompt_slice(areas, "largest")
        assert info.loc[(value, "P-middle"), "prompt_slice"] == propagation.prompt_slice(areas, "middle")
    vt = propagation.volume_rows_with(run, manifest, root)
    table = propagation.propagation_table(vt, run.info)
    assert len(table) == 4 and set(table["strategy"]) == {"P-largest", "P-middle"}
    for r in table.itertuples():
        gt = truth[r.label_value]
        fp = 9 * len(leaks[r.label_value])
        expected = 100 * 2 * gt.sum() / (2 * gt.sum() + fp)  # independent of the volume table
        assert r.dice == pytest.approx(expected, rel=1e-9)
        assert (r.leaked_slices, r.missed_slices, r.prompts) == (len(leaks[r.label_value]), 0, 1)
        assert r.prompts_per_slice == int(gt.any(axis=(1, 2)).sum())
        assert np.isnan(r.dice_s5)  # no per-slice rows in this table
    # the same volume from the layout only: slices 3..13 hold an object, so the stack is those
    run2 = propagation.propagate(manifest, root, [StandInModel(StandInVideo(slices, truth, leaks))])
    assert set(run2.info["stack_origin"]) == {"layout"}
    lo, hi = manifest.slice_index.min(), manifest.slice_index.max()
    assert set(run2.info["n_stack"]) == {hi - lo + 1}
    t2 = propagation.propagation_table(propagation.volume_rows_with(run2, manifest, root), run2.info)
    for r in t2.itertuples():
        assert r.leaked_slices == sum(lo <= k <= hi for k in leaks[r.label_value])


def test_sampled_volumes_and_a_wrong_source_are_listed_with_why(tmp_path):
    root, src, label, slices = write_volume(tmp_path, sampled=3)
    manifest = indexer.index(root)
    run = propagation.propagate(manifest, root, [StandInModel(StandInVideo(slices, kept_truth(manifest, label)))])
    assert len(run.info) == 0 and "sampled slices" in run.skipped[0][1]
    # a source folder whose file differs from what the layout was made from
    other = tmp_path / "other"
    write_volume(other)
    img = nib.load(str(other / "src" / "case1_img.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine), str(other / "src" / "case1_img.nii.gz"))
    run = propagation.propagate(manifest, root, [StandInModel(StandInVideo(slices, {}))], source_dir=other / "src")
    assert len(run.info) == 0 and "differs from the layout" in run.skipped[0][1]


# --------------------------------------------------------------------------- random-init SAM 2, end to end


@pytest.fixture(scope="module")
def tiny_sam2(tmp_path_factory):
    pytest.importorskip("sam2")
    from cosmoslib.tests import test_sam2

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    path = test_sam2.register_tiny(tmp_path_factory.mktemp("sam2"))
    yield test_sam2.TINY, path
    test_sam2.unregister_tiny()
    torch.set_num_threads(threads)


def test_random_init_sam2_propagates_in_order_with_the_right_shapes(tiny_sam2, tmp_path):
    """The real video predictor (shrunk, random weights) through propagate(): one mask per slice
    of the full stack, both directions in order (propagate_object checks the order it is given)."""
    from cosmoslib import models

    name, _ = tiny_sam2
    root, src, label, _ = write_volume(tmp_path)
    manifest = indexer.index(root)
    one = manifest[manifest["label_value"] == 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = models.load_model(name, device="cpu")
    seen = []
    video = model.video()
    original = video.propagate

    def spy(state, start, reverse):
        for k, logits in original(state, start, reverse):
            seen.append((k, reverse, logits.shape))
            yield k, logits

    video.propagate = spy
    run = propagation.propagate(one, root, [model], rules=("middle",))  # stack: object 1's slices
    start = int(run.info["prompt_slice"].iloc[0]) - int(one["slice_index"].min())
    n = int(run.info["n_stack"].iloc[0])
    assert run.info["stack_origin"].iloc[0] == "layout" and not run.skipped
    assert [(k, r) for k, r, _ in seen] == [(k, False) for k in range(start, n)] + [(k, True) for k in range(start, -1, -1)]
    assert {s for _, _, s in seen} == {SHAPE[1:]}
    provider = run.masks[(name, "P-middle")]
    assert len(provider) == n and all(m.shape == SHAPE[1:] and m.dtype == bool for m in provider.values())


def test_cli_evaluate_runs_s1_to_s6_and_says_why_a_sampled_volume_is_not_propagated(tiny_sam2, tmp_path, capsys):
    name, ckpt = tiny_sam2
    root, _, _, _ = write_volume(tmp_path, sampled=2)
    out = tmp_path / "results.parquet"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        rc = cli.main(["evaluate", str(root), "--model", name, "--checkpoint", str(ckpt), "--out", str(out),
                       "--cache", str(tmp_path / "cache"), "--points-per-side", "2", "--max-objects", "1",
                       "--propagate"])
    assert rc == 0
    results = pd.read_parquet(out)
    assert set(results["strategy"]) == {"S1", "S2", "S3", "S4", "S5", "S6"} and set(results["model"]) == {name}
    skipped = pd.read_csv(propagation.skipped_path(out))
    assert len(skipped) == 1 and "sampled slices" in skipped["reason"].iloc[0]
    assert "not propagated" in capsys.readouterr().out
    assert len(pd.read_parquet(propagation.propagation_path(out))) == 0


@pytest.mark.slow
def test_cli_evaluate_propagate_with_random_init_sam2(tiny_sam2, tmp_path):
    """``cosmos evaluate --model <sam2> --checkpoint FILE --propagate``: S1-S6 rows, per-slice and
    propagation rows in the volume table, and each propagation visits the slices in order."""
    name, ckpt = tiny_sam2
    root, src, label, _ = write_volume(tmp_path)
    out = tmp_path / "results.parquet"
    order = []
    original = propagation.propagate_object

    def spy(video, state, stack, start, box):
        pred = original(video, state, stack, start, box)
        order.append((stack.position(start), len(stack), pred.shape))
        return pred

    propagation.propagate_object = spy
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            rc = cli.main(["evaluate", str(root), "--model", name, "--checkpoint", str(ckpt), "--out", str(out),
                           "--cache", str(tmp_path / "cache"), "--points-per-side", "4", "--propagate",
                           "--source-dir", str(src)])
    finally:
        propagation.propagate_object = original
    assert rc == 0
    results = pd.read_parquet(out)
    assert set(results["strategy"]) == {"S1", "S2", "S3", "S4", "S5", "S6"} and set(results["model"]) == {name}
    vt = pd.read_parquet(evaluate.volumes_path(out))
    assert {"S5", "P-largest", "P-middle"} <= set(vt["strategy"])
    prop = vt[vt["strategy"].str.startswith("P-")]
    assert set(prop["depth"]) == {SHAPE[0]} and (prop["n_extra_slices"] == SHAPE[0] - prop["n_slices"]).all()
    table = pd.read_parquet(propagation.propagation_path(out))
    assert len(table) == 4 and (table["prompts"] == 1).all() and table["dice_s5"].notna().all()
    assert np.allclose(table["dice_gap"], table["dice"] - table["dice_s5"])
    assert len(order) == 4 and all(n == SHAPE[0] and shape == (SHAPE[0], SHAPE[1], SHAPE[2])
                                   for _, n, shape in order)
