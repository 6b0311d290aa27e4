"""Object factors of paper 4.8 on shapes whose answers are known."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest
from matplotlib.path import Path as MplPath
from PIL import Image
from skimage import draw

from cosmoslib import cli, masks, vocabulary
from cosmoslib.analysis import factors as F
from cosmoslib.analysis import fourier
from cosmoslib.analysis import synthetic as syn
from cosmoslib.data import indexer, layout, readers

# ------------------------------------------------------------------------------------------
# size, aspect ratio, modality
# ------------------------------------------------------------------------------------------


def _rect(shape, x0, y0, x1, y1):
    m = np.zeros(shape, bool)
    m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


def test_size_and_aspect_ratio_of_rectangles():
    m = _rect((60, 60), 5, 10, 14, 49)  # 10 wide, 40 tall
    assert F.size(m) == 400
    assert tuple(masks.tight_box(m)) == (5, 10, 14, 49)
    assert F.aspect_ratio(m) == pytest.approx(10 / 40)
    assert F.aspect_ratio(_rect((60, 60), 3, 7, 3, 26)) == pytest.approx(1 / 20)  # a line
    assert F.aspect_ratio(_rect((60, 60), 3, 7, 3, 7)) == 1.0  # a pixel


def test_empty_or_bad_masks_are_refused():
    with pytest.raises(ValueError, match="empty"):
        F.size(np.zeros((5, 5), bool))
    with pytest.raises(ValueError, match="2D"):
        F.aspect_ratio(np.ones((2, 5, 5), bool))
    with pytest.raises(ValueError, match="empty"):
        fourier.fourier_order(np.zeros((5, 5), bool))


PAPER_MODALITIES = [  # Fig. 1 of the paper, (a)..(r)
    "CT", "MRI", "T1W MRI", "T2W MRI", "ADC MRI", "Cine-MRI", "CMR", "DW MRI", "T1-GD MRI",
    "T2-FLAIR MRI", "Histopathology", "Electron Microscopy", "US", "X-ray", "Fundus",
    "Colonoscopy", "Dermoscopy", "Microscopy",
]


def test_modality_codes_are_the_alphabetical_index_of_the_paper_list():
    expected = {m: i for i, m in enumerate(sorted(PAPER_MODALITIES, key=str.lower))}
    expected["unknown"] = 18
    assert F.MODALITY_CODES == expected
    for name, code in expected.items():
        assert F.modality_code(name) == code


@pytest.mark.parametrize(
    "spelling, canonical",
    [("t1w-mri", "T1W MRI"), ("Ultrasound", "US"), ("X ray", "X-ray"), ("MR", "MRI"),
     ("cine mri", "Cine-MRI"), ("DWI", "DW MRI"), ("T2 FLAIR MRI", "T2-FLAIR MRI")],
)
def test_modality_aliases(spelling, canonical):
    assert F.modality_code(spelling) == F.MODALITY_CODES[canonical]


def test_unknown_modalities():
    for value in ("PETS", "", None, float("nan"), "unknown", "M"):
        assert F.modality_code(value) == F.MODALITY_CODES["unknown"]
    # Known names outside the paper's 18 get their own codes after "unknown", not 18.

    assert F.modality_code("PET") == vocabulary.EXTRA_MODALITY_CODES["PET"] > 18
    assert F.MODALITY_CODES is vocabulary.MODALITY_CODES


# ------------------------------------------------------------------------------------------
# intensity difference
# ------------------------------------------------------------------------------------------


def test_enlarged_box_rounds_margins_up_and_clips():
    m = _rect((100, 100), 20, 40, 49, 40)  # 30 wide, 1 tall
    # 0.1 * 30 = 3 exactly (not 4 from floating point); 0.1 * 1 -> 1
    assert tuple(masks.margin_box(m)) == (17, 39, 52, 41)
    m = _rect((100, 100), 20, 40, 50, 40)  # 31 wide -> ceil(3.1) = 4
    assert tuple(masks.margin_box(m)) == (16, 39, 54, 41)
    assert tuple(masks.margin_box(_rect((10, 10), 0, 0, 9, 4))) == (0, 0, 9, 5)  # clipped at the border


def test_intensity_difference_of_a_ring_hand_computed():
    # 40 x 40 image, value 20; bright square ring (value 200) spanning columns/rows 10..29,
    # its square hole 15..24 has value 100.
    img = np.full((40, 40), 20, np.uint8)
    ring = _rect((40, 40), 10, 10, 29, 29) & ~_rect((40, 40), 15, 15, 24, 24)
    img[ring] = 200
    img[15:25, 15:25] = 100
    # Box side 20 -> margin ceil(2.0) = 2 -> enlarged box 8..31, 24 x 24 = 576 pixels.
    # Surroundings = 576 - 300 ring pixels = 276: 100 hole pixels (100) + 176 margin (20).
    surround_mean = (100 * 100 + 176 * 20) / 276
    assert F.intensity_difference(img, ring) == pytest.approx(200 - surround_mean, abs=1e-9)


def test_intensity_difference_sign_and_empty_surroundings():
    m = _rect((30, 30), 10, 10, 19, 19)
    dark = np.where(m, 40, 160).astype(np.uint8)
    assert F.intensity_difference(dark, m) == pytest.approx(-120)
    assert F.intensity_difference(255 - dark, m) == pytest.approx(120)
    whole = np.ones((30, 30), bool)
    assert math.isnan(F.intensity_difference(dark, whole))
    with pytest.raises(ValueError, match="differ"):
        F.intensity_difference(dark[:, :20], m)


def test_intensity_difference_rgb_uses_bt601_luma_like_pil():
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    m = _rect((40, 50), 12, 8, 30, 25)
    grey_pil = np.asarray(Image.fromarray(rgb).convert("L"))  # PIL: BT.601, rounded per pixel
    got = F.intensity_difference(rgb, m)
    assert got == pytest.approx(F.intensity_difference(grey_pil, m), abs=0.5)


def test_intensity_difference_recovers_rendered_contrast():
    cases = syn.known_answer_set(np.random.default_rng(11), ks=(0, 6), contrasts=(-40, 15, 70),
                                 noise_sd=6.0)
    for img, mask, contrast in zip(cases["image"], cases["mask"], cases["contrast"]):
        assert F.intensity_difference(img, mask) == pytest.approx(contrast, abs=1.5)


# ------------------------------------------------------------------------------------------
# Fourier order
# ------------------------------------------------------------------------------------------


def _dice_by_matplotlib(curve_xy, mask):
    """Independent polygon fill: pixel centres inside the curve by matplotlib's Path."""
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    inside = MplPath(curve_xy).contains_points(np.c_[xx.ravel(), yy.ravel()]).reshape(h, w)
    return 200.0 * (inside & mask).sum() / (inside.sum() + mask.sum())


def test_fill_polygon_matches_skimage_draw_polygon():
    rng = np.random.default_rng(9)
    for _ in range(100):
        xy = rng.uniform(-6, 46, size=(rng.integers(3, 40), 2))  # self-crossing, partly outside
        rr, cc = draw.polygon(xy[:, 1], xy[:, 0], shape=(40, 30))
        ref = np.zeros((40, 30), bool)
        ref[rr, cc] = True
        assert np.array_equal(fourier.fill_polygon(xy, (40, 30)), ref)


def test_fourier_order_of_a_large_object_is_fast():
    mask = syn.star((1024, 1024), 9, 0.15, 400, phase=0.2)
    t0 = time.perf_counter()
    fo = fourier.fourier_order(mask, patience=12)
    assert time.perf_counter() - t0 < 10.0  # about 0.2 s; skimage.draw.polygon took minutes
    assert fo.stopped_by == "dice" and fo.raw_order >= 8


def test_disk_needs_one_order():
    fo = fourier.fourier_order(syn.star((100, 100), 0, 0.0, 30))
    assert (fo.raw_order, fo.stopped_by, fo.n_contours) == (1, "dice", 1)
    assert fo.dice > 99.5
    assert fo.order == pytest.approx(1 + 2 * (100 - fo.dice))


def test_first_harmonic_of_a_disk_is_its_circle():
    cx, cy, r = 52.3, 47.8, 25.0
    curve = fourier.efd_contour(syn.star((100, 100), 0, 0.0, r, center=(cx, cy)), 1)
    dist = np.hypot(curve[:, 0] - cx, curve[:, 1] - cy)
    # The traced boundary runs between the last pixel centres inside (<= r) and the first
    # outside, so within half a pixel of r.
    assert dist.mean() == pytest.approx(r, abs=0.5)
    assert dist.std() < 0.3


def test_stop_by_dice_on_a_three_lobed_star():
    fo = fourier.fourier_order(syn.star((128, 128), 3, 0.2, 30))
    assert fo.stopped_by == "dice"
    assert fo.dice > 97.0 and all(d <= 97.0 for d in fo.dices[:-1])
    assert fo.raw_order == len(fo.dices) > 1
    assert fo.order == pytest.approx(fo.raw_order + 2 * (100 - fo.dice))
    assert fourier.fourier_order(syn.star((128, 128), 3, 0.2, 30), n=0).order == fo.raw_order


def test_stop_by_gain_on_a_ring_and_dice_against_the_full_mask():
    outer, inner = 30.0, 18.0
    ring = syn.star((100, 100), 0, 0.0, outer) & ~syn.star((100, 100), 0, 0.0, inner)
    fo = fourier.fourier_order(ring, reference="mask")
    assert fo.reference == "mask"
    assert fo.stopped_by == "gain"
    assert fo.n_contours == 2
    assert fo.dices[-1] - fo.dices[-2] < 0.1
    # Fit = filled outer disk; DICE = 2 |ring| / (|ring| + |disk|) from the pixel counts.
    disk = syn.star((100, 100), 0, 0.0, outer)
    expected = 200.0 * ring.sum() / (ring.sum() + disk.sum())
    assert fo.dice == pytest.approx(expected, abs=1.0)
    assert fo.order == pytest.approx(fo.raw_order + 2 * (100 - fo.dice))
    assert fo.order > 40  # the hole makes the object "complex"


def test_two_components_fit_the_larger_one():
    shape = (80, 160)
    big = syn.star(shape, 0, 0.0, 25, center=(40, 40))
    small = syn.star(shape, 0, 0.0, 15, center=(120, 40))
    fo = fourier.fourier_order(big | small, reference="mask")
    assert fo.n_contours == 2
    expected = 200.0 * big.sum() / (2 * big.sum() + small.sum())
    assert fo.dice == pytest.approx(expected, abs=1.0)
    # The paper's reference is the larger part's filled outline: a disc, fitted at order 1.
    paper = fourier.fourier_order(big | small)
    assert paper.n_contours == 2 and paper.raw_order == 1 and paper.dice > 99
    assert np.array_equal(fourier.outer_region(big | small), big)


@pytest.mark.parametrize("k_lobes, amplitude", [(0, 0.0), (5, 0.15)])
def test_ring_paper_fo_is_that_of_its_filled_outer_contour(k_lobes, amplitude):
    # A myocardium-like ring: its paper-default FO is the FO of the filled outer region (the
    # hole is no boundary complexity), while the whole-mask variant is dominated by the
    # 2 x 100 x (1 - DICE) penalty of the hole.
    shape = (120, 120)
    filled = syn.star(shape, k_lobes, amplitude, 40, center=(61.3, 58.7), phase=0.3)
    hole = syn.star(shape, 0, 0.0, 22, center=(64.0, 57.0))
    ring = filled & ~hole
    paper, disc = fourier.fourier_order(ring), fourier.fourier_order(filled)
    assert (paper.reference, paper.n_contours, disc.n_contours) == ("outer", 2, 1)
    assert paper.raw_order == disc.raw_order
    assert paper.order == pytest.approx(disc.order, abs=0.5)
    masked = fourier.fourier_order(ring, reference="mask")
    assert masked.order > paper.order + 30
    # DICE of the filled outline against the ring is capped by the hole's share.
    cap = 200.0 * ring.sum() / (ring.sum() + filled.sum())
    assert masked.dice < cap + 1.0


def test_outer_region_and_holes_agree_with_skimage():
    """outer_region = skimage.draw.polygon fill of the largest marching-squares boundary;
    holes = components - Euler number (skimage, 8-connected object)."""
    from scipy import ndimage
    from skimage import measure

    shape = (90, 120)
    ring = syn.star(shape, 0, 0.0, 30, center=(40, 45)) & ~syn.star(shape, 0, 0.0, 15, center=(40, 45))
    island = syn.star(shape, 0, 0.0, 5, center=(40, 45))
    blob = syn.star(shape, 3, 0.2, 12, center=(100, 30))
    diag = np.zeros(shape, bool)  # a 5 x 5 square with two hole pixels touching at a corner
    diag[70:75, 95:100] = True
    diag[72, 97] = False
    diag[71, 96] = False
    cases = [ring, ring | island, ring | island | blob, blob, diag, ring | diag]
    for mask in cases:
        curves = measure.find_contours(np.pad(mask.astype(float), 1), 0.5, fully_connected="high")
        areas = []
        for c in curves:
            rr, cc = draw.polygon(c[:, 0] - 1, c[:, 1] - 1, shape=shape)
            areas.append(len(rr))
        rr, cc = draw.polygon(*(curves[int(np.argmax(areas))] - 1).T, shape=shape)
        ref = np.zeros(shape, bool)
        ref[rr, cc] = True
        assert np.array_equal(fourier.outer_region(mask), ref)
        n_comp = ndimage.label(mask, structure=np.ones((3, 3)))[1]
        holes = n_comp - measure.euler_number(mask, connectivity=2)
        assert fourier.count_holes(mask) == holes
        assert fourier.fourier_order(mask, max_order=3).n_contours == n_comp + holes == len(curves)
    assert fourier.count_holes(ring) == 1 and fourier.count_holes(blob) == 0
    assert fourier.count_holes(ring | island) == 1  # the island sits in the one hole
    assert fourier.count_holes(diag) == 2  # background is 4-connected: corner contact joins nothing
    with pytest.raises(ValueError, match="reference"):
        fourier.fourier_order(ring, reference="filled")


def test_stop_by_cap():
    fo = fourier.fourier_order(syn.star((128, 128), 3, 0.2, 30), max_order=2)
    assert (fo.stopped_by, fo.raw_order, len(fo.dices)) == ("cap", 2, 2)
    assert fo.dices[1] - fo.dices[0] >= 0.1 and fo.dice <= 97


def test_dice_per_order_matches_an_independent_fill():
    mask = syn.star((96, 96), 5, 0.25, 28, phase=0.4)
    fo = fourier.fourier_order(mask, patience=10)
    for order in (1, 3, fo.raw_order):
        ref = _dice_by_matplotlib(fourier.efd_contour(mask, order), mask)
        assert fo.dices[order - 1] == pytest.approx(ref, abs=0.3)


def test_high_order_reconstruction_reproduces_the_mask():
    mask = syn.ellipse((90, 90), (32, 12), angle=25)
    assert _dice_by_matplotlib(fourier.efd_contour(mask, 40), mask) > 99.0


def test_objects_touching_the_border_and_single_pixels():
    half = syn.star((60, 60), 0, 0.0, 20, center=(0, 30))  # cut by the left edge
    fo = fourier.fourier_order(half)
    assert fo.n_contours == 1 and fo.dice > 90
    dot = np.zeros((9, 9), bool)
    dot[4, 4] = True
    assert fourier.fourier_order(dot).dice == 100.0


def test_paper_gain_rule_stops_point_symmetric_shapes_at_order_two():
    # Even harmonics of a point-symmetric outline vanish, so the paper's rule (patience 1)
    # sees no gain at order 2; a patience of 2 looks past it.
    mask = syn.ellipse((100, 100), (30, 15), angle=30)
    paper = fourier.fourier_order(mask)
    assert (paper.raw_order, paper.stopped_by) == (2, "gain")
    assert abs(paper.dices[1] - paper.dices[0]) < 0.1
    patient = fourier.fourier_order(mask, patience=2)
    assert patient.stopped_by == "dice" and patient.raw_order == 3
    assert patient.order < paper.order


def test_fourier_order_rises_with_lobe_count():
    cases = syn.known_answer_set(np.random.default_rng(2), ks=(0, 3, 6, 12), contrasts=(40.0,),
                                 noise_sd=0.0)
    patient = [fourier.fourier_order(m, patience=12).order for m in cases["mask"]]
    assert all(a < b for a, b in zip(patient, patient[1:])), patient
    paper = [fourier.fourier_order(m).order for m in cases["mask"]]
    # With the paper's rule, k = 6 and k = 12 both stop at order 2 (symmetric harmonics),
    # so only the first three are ordered; both still score far above k = 0 and k = 3.
    assert paper[0] < paper[1] < paper[2]
    assert min(paper[2], paper[3]) > paper[1]


def test_round_ellipse_has_small_fourier_order():
    assert fourier.fourier_order(syn.ellipse((90, 90), (20, 18), angle=40)).order <= 3


def test_fourier_order_parameter_checks():
    m = syn.star((40, 40), 0, 0.0, 10)
    with pytest.raises(ValueError):
        fourier.fourier_order(m, max_order=0)
    with pytest.raises(ValueError):
        fourier.fourier_order(m, patience=0)
    with pytest.raises(ValueError):
        fourier.efd_contour(m, 0)


# ------------------------------------------------------------------------------------------
# compute_factors / factors_cli on a small COSMOS-layout folder
# ------------------------------------------------------------------------------------------


@pytest.fixture()
def cosmos_root(tmp_path):
    """Two tasks, three images, five objects, written with cosmoslib.data.layout."""

    rng = np.random.default_rng(0)
    shape = (64, 80)
    root = tmp_path / "cosmos"
    layout.write_task(root, "organs_ct", {1: "Liver", 2: "Kidney"}, dataset="toy", modality="CT")
    layout.write_task(root, "lesion_us", {7: "Nodule"}, dataset="toy", modality="Ultrasound")
    for i in range(2):
        label = np.zeros(shape, np.uint8)
        label[syn.star(shape, 3 + i, 0.2, 14, center=(25, 30))] = 1
        label[syn.ellipse(shape, (8, 5), center=(62, 30 + i))] = 2
        image = syn.render(label > 0, 60, 3.0, 80, rng)
        layout.write_pair(root, "organs_ct", f"case{i}", image, label)
    label = np.zeros(shape, np.uint8)
    label[syn.star(shape, 0, 0.0, 12)] = 7
    rgb = np.stack([syn.render(label > 0, c, 0.0, 90) for c in (-30, 10, 50)], axis=-1)
    layout.write_pair(root, "lesion_us", "img0", rgb, label)
    return root


def test_compute_factors_matches_the_single_functions(cosmos_root):

    manifest = indexer.index(cosmos_root)
    df = F.compute_factors(manifest, cosmos_root, progress=False)
    assert list(df.columns) == list(F.FACTOR_COLUMNS)
    assert len(df) == len(manifest) == 5
    assert df[["task", "image_id", "label_value"]].astype(str).values.tolist() == \
        manifest[["task", "image_id", "label_value"]].astype(str).values.tolist()
    assert df.attrs["skipped"] == []
    for row, m in zip(df.itertuples(), manifest.itertuples()):
        image = readers.read_image(cosmos_root / m.image_path)
        mask = readers.read_label(cosmos_root / m.label_path) == m.label_value
        fo = fourier.fourier_order(mask)
        assert row.size_px == mask.sum() == m.area_px
        assert row.aspect_ratio == pytest.approx(F.aspect_ratio(mask))
        assert row.intensity_diff_signed == pytest.approx(F.intensity_difference(image, mask))
        assert row.intensity_diff == pytest.approx(abs(row.intensity_diff_signed))
        assert (row.fourier_order, row.fourier_order_raw, row.efd_dice, row.n_contours,
                row.fo_stopped_by) == (fo.order, fo.raw_order, fo.dice, fo.n_contours,
                                       fo.stopped_by)
        # One boundary: the whole-mask variant is the same search.
        assert (row.n_contours, row.n_holes) == (1, 0)
        assert row.fourier_order_mask == pytest.approx(row.fourier_order)
    codes = dict(zip(df["task"], df["modality_code"]))
    assert codes == {"organs_ct": F.MODALITY_CODES["CT"], "lesion_us": F.MODALITY_CODES["US"]}
    us = df[df["task"] == "lesion_us"].iloc[0]
    assert us["intensity_diff_signed"] == pytest.approx(0.299 * -30 + 0.587 * 10 + 0.114 * 50,
                                                        abs=0.01)
    assert df.attrs["unknown_modality"] == {}


def test_compute_factors_records_bad_files_and_objects(cosmos_root):

    manifest = indexer.index(cosmos_root)
    (cosmos_root / "organs_ct" / "images" / "case1.png").write_bytes(b"not a png")
    ghost = manifest.iloc[[0]].assign(label_value=99)  # an object not in the label map
    manifest = pd.concat([manifest, ghost], ignore_index=True)
    df = F.compute_factors(manifest, cosmos_root, progress=False)
    assert len(df) == 6
    bad = df["size_px"].isna()
    assert bad.sum() == 3  # two objects of the broken image + the ghost
    assert df.loc[bad, "fourier_order"].isna().all()
    assert df.loc[~bad, "fourier_order"].notna().all()
    skipped = df.attrs["skipped"]
    assert len(skipped) == 3
    assert sum("case1.png" in f for f, _ in skipped) == 2
    assert any("label 99" in reason and "empty" in reason for _, reason in skipped)


def test_factors_cli_writes_resumes_and_reports(cosmos_root, tmp_path):
    out = tmp_path / "out" / "factors.parquet"
    report = F.factors_cli(cosmos_root, out, progress=False)
    assert (report.n_objects, report.n_images, report.n_computed, report.n_reused) == (5, 3, 5, 0)
    assert report.n_skipped == 0
    first = pd.read_parquet(out)
    assert list(first.columns) == list(F.FACTOR_COLUMNS) and len(first) == 5
    assert pd.read_csv(report.skipped_csv).empty
    assert "5 objects in 3 images" in report.summary()

    again = F.factors_cli(cosmos_root, out, progress=False)
    assert (again.n_computed, again.n_reused) == (0, 5)
    pd.testing.assert_frame_equal(pd.read_parquet(out), first)

    # A row lost from the file is recomputed, the others are reused.
    atomic = first.drop(index=2)
    atomic.to_parquet(out, index=False)
    third = F.factors_cli(cosmos_root, out, progress=False, chunk_images=1)
    assert (third.n_computed, third.n_reused) == (1, 4)
    pd.testing.assert_frame_equal(pd.read_parquet(out), first)


def test_cosmos_factors_command(cosmos_root, tmp_path, capsys):

    out = tmp_path / "f.parquet"
    assert cli.main(["factors", str(cosmos_root), "--out", str(out)]) == 0
    assert "Factors of 5 objects" in capsys.readouterr().out
    assert len(pd.read_parquet(out)) == 5


@pytest.fixture()
def ring_root(tmp_path):
    """One task in the authors' layout: a bright myocardium-like ring around a dark cavity,
    a dark disc on a bright background (negative contrast) and a bright disc."""

    shape = (96, 128)
    root = tmp_path / "release"
    layout.write_task(root, "22_Heart", {1: "Myocardium", 2: "Cyst", 3: "Nodule"})
    rng = np.random.default_rng(3)
    for i in range(2):
        outer = syn.star(shape, 0, 0.0, 26 + 2 * i, center=(40, 46))
        cavity = syn.star(shape, 0, 0.0, 17, center=(41, 47))
        dark = syn.star(shape, 0, 0.0, 10, center=(100, 30))
        bright = syn.star(shape, 3, 0.2, 9, center=(100, 72))
        label = np.zeros(shape, np.uint8)
        label[outer & ~cavity], label[dark], label[bright] = 1, 2, 3
        image = np.full(shape, 150.0)
        image[outer & ~cavity], image[cavity], image[dark], image[bright] = 220, 60, 40, 230
        image = np.clip(image + rng.normal(0, 2, shape), 0, 255).round().astype(np.uint8)
        layout.write_pair(root, "22_Heart", f"22_Heart_{i}_5", image, label)
    return root


def test_abs_and_signed_contrast_and_fo_references_in_the_table(ring_root):

    with pytest.warns(UserWarning, match="22_Heart"):
        manifest = indexer.index(ring_root)
    df = F.compute_factors(manifest, ring_root, progress=False)
    assert df.attrs["unknown_modality"] == {"22_Heart": 6}
    assert (df["modality_code"] == F.MODALITY_CODES["unknown"]).all()
    by = df.set_index(["image_id", "object"])
    for image_id in df["image_id"].unique():
        dark, bright = by.loc[(image_id, "Cyst")], by.loc[(image_id, "Nodule")]
        # Dark object on a brighter surround: signed < 0, magnitude = |signed| > 0.
        assert dark.intensity_diff_signed < -60 and dark.intensity_diff == pytest.approx(
            -dark.intensity_diff_signed)
        assert bright.intensity_diff_signed > 40
        assert bright.intensity_diff == pytest.approx(bright.intensity_diff_signed)
        ring = by.loc[(image_id, "Myocardium")]
        assert (ring.n_contours, ring.n_holes) == (2, 1)
        assert ring.fourier_order_mask > ring.fourier_order + 30
        assert ring.efd_dice > 97 > ring.efd_dice_mask
    assert (df["intensity_diff"] >= 0).all()

    effect = F.fo_reference_effect(df)
    assert effect["object"].tolist() == ["Myocardium"]
    row = effect.iloc[0]
    rings = df[df["object"] == "Myocardium"]
    assert (row.n, row.n_holed) == (2, 2)
    assert row.fo_median == pytest.approx(rings["fourier_order"].median())
    assert row.shift_median == pytest.approx(
        (rings["fourier_order_mask"] - rings["fourier_order"]).median())
    assert row.shift_max >= row.shift_median > 30
    assert F.fo_reference_effect(df[df["object"] != "Myocardium"]).empty
    with pytest.raises(KeyError, match="fourier_order_mask"):
        F.fo_reference_effect(df.drop(columns="fourier_order_mask"))


def test_factor_options_are_checked(ring_root, tmp_path):

    manifest = indexer.index(ring_root, modality={"22_Heart": "Cine-MRI"})
    with pytest.raises(TypeError, match="reference"):
        F.compute_factors(manifest, ring_root, progress=False, reference="mask")
    with pytest.raises(TypeError, match="reference"):
        F.factors_cli(ring_root, tmp_path / "f.parquet", progress=False, reference="mask")


def test_factors_cli_modality_override_refreshes_reused_rows(ring_root, tmp_path):
    out = tmp_path / "factors.parquet"
    with pytest.warns(UserWarning, match="modality unknown"):
        first = F.factors_cli(ring_root, out, progress=False)
    assert first.unknown_modality == {"22_Heart": 6}
    assert "Modality unknown" in first.summary() and "--modality" in first.summary()
    again = F.factors_cli(ring_root, out, progress=False, modality={"22_Heart": "cine mri"})
    assert (again.n_reused, again.n_computed, again.unknown_modality) == (6, 0, {})
    table = pd.read_parquet(out)
    assert set(table["modality"]) == {"Cine-MRI"}
    assert set(table["modality_code"]) == {F.MODALITY_CODES["Cine-MRI"]}
    assert "Modality unknown" not in again.summary()
