"""HCE (Human Correction Efforts, Qin et al. 2022) on hand-made masks.

How HCE counts (pysodmetrics ``HumanCorrectionEffortMeasure.cal_hce``, relax r = 5,
epsilon = 2 px, structuring element the 3 x 3 cross):

1. TP = P & G, FP = P & ~G, FN = G & ~P; U = P | G eroded r times.
2. Relaxed FP: FP & U, dilated r times (each time kept outside G), then & FP.
   Relaxed FN: FN & U, dilated r times (each time kept outside P), then & FN; plus the GT
   skeleton pixels that are not TP.
3. For each relaxed region: its contour pixels that touch (4-neighbourhood) the "other side"
   - for FP: TP or relaxed FN (the line to cut along); for FN: pixels that are none of TP,
   relaxed FP, relaxed FN (the line to draw) - form polylines; each polyline is simplified by
   Ramer-Douglas-Peucker (epsilon) and its vertices are counted. A region none of whose
   contour pixels qualifies counts 1 (delete it / add it whole).
4. HCE = FP vertices + FP independent regions + FN vertices + FN independent regions.

The erosion and dilation by the cross r times are erosion and dilation by the L1 ball of
radius r (a diamond). Pixels outside the image count as foreground for the erosion and as
background for the dilation (OpenCV's defaults).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cosmoslib.protocol import annotation
from cosmoslib.protocol.annotation import hce


def canvas(h=60, w=80):
    return np.zeros((h, w), bool)


@pytest.fixture
def square():
    g = canvas()
    g[10:30, 10:30] = True  # 20 x 20, rows and cols 10..29
    return g


def test_identical_is_zero(square):
    # no FP, no FN, the skeleton is all TP: nothing to correct
    assert hce(square, square) == 0
    assert hce(canvas(), canvas()) == 0


def test_small_island_is_forgiven(square):
    # a 3 x 3 FP island far from the object: 2 erosions of U already remove it, so the
    # relaxed FP is empty and nothing is counted
    p = square.copy()
    p[45:48, 60:63] = True
    assert hce(p, square) == 0


def test_large_island_counts_one(square):
    # a 20 x 20 FP island (rows 35..54, cols 50..69) far from the object: its relaxed FP is
    # the island minus its corners, but none of its contour pixels touches TP or relaxed FN
    # (both far away), so there is no line to cut: 0 vertices + 1 independent region
    p = square.copy()
    p[35:55, 50:70] = True
    assert hce(p, square) == 1
    # two such islands: 2; on an empty GT the same
    p[2:22, 50:70] = True
    assert hce(p, square) == 2
    assert hce(p & ~square, canvas()) == 2


def test_attached_extension_counts_its_cut_line(square):
    # P = rows 10..29, cols 10..49: FP = the 20 x 20 block at cols 30..49 beside G.
    # U = P eroded 5 times = rows 15..24, cols 15..44; relaxed FP = (FP & U) = rows 15..24,
    # cols 30..44, dilated 5 times outside G: all of rows 10..29 at cols 30..44, corners cut
    # at cols 45..49. Its contour pixels touching TP are exactly column 30, rows 10..29: one
    # straight polyline of 20 pixels -> RDP keeps its 2 end points; the region is not
    # independent. No FN, and the skeleton of G is TP. HCE = 2.
    p = square.copy()
    p[10:30, 30:50] = True
    assert hce(p, square) == 2
    # plus a large independent island (1, as above): 3
    p[40:58, 55:75] = True
    assert hce(p, square) == 3


def test_half_missed_line_counts_its_two_ends():
    # G = a 1-pixel-thick horizontal line, row 20, cols 10..39; P = its left half (cols
    # 10..24). U (the line) vanishes at the first erosion, so the relaxed FN is only the
    # skeleton part that is not TP: the line itself is its own skeleton, so cols 25..39.
    # All its pixels touch background above and below; the contour runs along it and back
    # (pixels already visited are skipped): one straight polyline -> 2 vertices. HCE = 2.
    g, p = canvas(), canvas()
    g[20, 10:40] = True
    p[20, 10:25] = True
    assert hce(p, g) == 2


def test_missed_square_relax_0_counts_its_corners(square):
    # relax = 0: no erosion or dilation, relaxed FN = FN = the whole square. Every contour
    # pixel touches background, so the polyline is the whole contour, opened at its first
    # pixel (the top-left corner) and ending at that pixel's neighbour. RDP keeps the 2 end
    # points and the 3 other corners: HCE = 5.
    assert hce(canvas(), square, relax=0) == 5


def test_missed_square_relax_5_counts_the_octagon(square):
    # relax = 5: FN & U = the inner 10 x 10 (rows/cols 15..24); dilated by the L1 ball of
    # radius 5 it is the 20 x 20 square minus a triangle at each corner (pixels with
    # dx + dy > 5 beyond the inner square): an octagon. The skeleton of the square (its
    # centre) lies inside it. The contour is 4 straight sides and 4 five-step staircases
    # (which deviate < 0.71 px from their diagonal, under epsilon = 2, so each is one
    # segment): 8 corners. Opened at its top-left pixel (a corner) and ending at that pixel's
    # neighbour: 1 + 7 corners + 1 end point = 9.
    assert hce(canvas(), square) == 9


def test_edge_of_the_image_is_not_drawn():
    # G = rows/cols 0..9, in the image's top-left corner; P empty; relax = 0. Contour pixels
    # on the top and left image edges have no background neighbour inside the image (outside
    # counts as nothing for the dilation), so only the right and bottom sides qualify: one
    # L-shaped polyline (0,9)..(9,9)..(9,0) -> 2 end points + 1 corner = 3.
    g = canvas(20, 20)
    g[0:10, 0:10] = True
    assert hce(canvas(20, 20), g, relax=0) == 3


def test_inputs_and_the_normalisation_quirk(square):
    from py_sod_metrics import HumanCorrectionEffortMeasure

    # any dtype with nonzero = object works, e.g. uint8 0/255 and 0/1
    p = square.copy()
    p[10:30, 30:50] = True
    assert hce(p.astype(np.uint8) * 255, square.astype(np.uint8)) == 2
    # pysodmetrics' own step() normalises like a saliency map: a 0/1 GT is thresholded at
    # > 128 and becomes empty, so the missed square (HCE 9) would score 0. hce() avoids it.
    m = HumanCorrectionEffortMeasure()
    m.step(np.zeros(square.shape, np.uint8), square.astype(np.uint8))
    assert m.get_results()["hce"] == 0
    assert hce(np.zeros(square.shape, np.uint8), square.astype(np.uint8)) == 9
    assert isinstance(hce(p, square), int)
    with pytest.raises(ValueError, match="same"):
        hce(p[:10], square)
    with pytest.raises(ValueError, match="relax"):
        hce(p, square, relax=-1)
    with pytest.raises(ValueError, match="epsilon"):
        hce(p, square, epsilon=0)


def test_hce_by_image():
    per_object = pd.DataFrame({
        "task": ["a", "a", "a", "b"],
        "image_id": ["1", "1", "2", "1"],
        "label_value": [1, 2, 1, 1],
        "hce": [3, 4, np.nan, 0],
    })
    out = annotation.hce_by_image(per_object)
    assert list(out.columns) == ["task", "image_id", "n_objects", "hce", "hce_per_object"]
    # image a/2 has only a missing value: left out
    assert out[["task", "image_id"]].values.tolist() == [["a", "1"], ["b", "1"]]
    assert out.n_objects.tolist() == [2, 1] and out.hce.tolist() == [7, 0]
    assert out.hce_per_object.tolist() == pytest.approx([3.5, 0.0])
    with pytest.raises(KeyError, match="hce"):
        annotation.hce_by_image(per_object.drop(columns="hce"))
