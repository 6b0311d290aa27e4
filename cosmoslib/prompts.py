"""Prompt strategies S2..S6 (paper 3.3). (Skeleton: the Prompt type is a shared contract.)"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Prompt:
    """One prompt for one object, in original-image pixel coordinates.

    Attributes
    ----------
    points : (N, 2) float array of (x, y), or None.
    point_labels : (N,) int array, 1 = positive (foreground), 0 = negative, or None.
    box : (4,) float array ``[x0, y0, x1, y1]`` (inclusive pixel indices), or None.
    mask_input : (1, 256, 256) float32 low-res logits from a previous round, or None.
    """

    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    box: np.ndarray | None = None
    mask_input: np.ndarray | None = None
