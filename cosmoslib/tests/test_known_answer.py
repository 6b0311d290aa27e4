"""Known-answer study (paper 4.8) with the real demo model: the expected signs of correlation.

Synthetic stars with k lobes at controlled contrasts on noise: a box-prompted LiteMedSAM must do
worse on complex boundaries (negative partial correlation of DICE with the Fourier order) and
better at higher contrast (positive partial correlation with the intensity difference). The grid
is the one the book's factors chapter uses under the demo config.
"""

from __future__ import annotations

import numpy as np
import pytest

from cosmoslib.analysis import stats, synthetic

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(litemedsam):
    cases = synthetic.known_answer_set(np.random.default_rng(0), ks=(0, 2, 4, 6, 8, 12, 16),
                                       contrasts=(5.0, 10.0, 20.0, 40.0, 80.0))
    return synthetic.known_answer_study(litemedsam, cases)


def test_fourier_order_rises_with_lobes(study):
    by_k = study.groupby("k")[["fourier_order", "fourier_order_patient"]].mean()
    assert by_k["fourier_order"].iloc[0] < by_k["fourier_order"].iloc[-1]
    assert np.all(np.diff(by_k["fourier_order_patient"].to_numpy()) > 0)


def test_dice_falls_with_complexity_and_rises_with_contrast(study):
    fo = stats.partial_spearman(study, "fourier_order", "dice", ["intensity_diff"])
    contrast = stats.partial_spearman(study, "intensity_diff", "dice", ["fourier_order"])
    assert fo.n == len(study) == 35
    assert fo.r < -0.2 and fo.p < 0.05
    assert contrast.r > 0.2 and contrast.p < 0.05
