"""Mask matching: which of SAM's candidate masks is evaluated for a GT object (paper 3.5, Eq. 1).

SAM returns several candidate masks for one prompt (three with ``multimask_output=True``) and
many for the whole image in *Everything* mode (S1). The paper evaluates the candidate with the
highest DICE against the GT (Eq. 1): an *oracle* rule, an upper bound on what a user could get
by picking among the candidates. A user without the GT would instead keep the candidate with the
highest *predicted* IoU (SAM's own quality estimate). :func:`match` computes both choices from
one set of candidates so both rules can be reported from one run (``selection_rule`` column:
``oracle_dice`` / ``pred_iou``).

For S1 the candidates are all masks generated for the image, not answers to a prompt about this
object: the highest predicted IoU names the most confident mask *somewhere in the image*, which
says nothing about which object it covers. Only the oracle rule is meaningful there; use
:func:`match_everything`, which records no predicted-IoU choice (``pred_iou_index is None``).

Ties are broken by the first (lowest) index, as ``numpy.argmax`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ORACLE_DICE = "oracle_dice"
PRED_IOU = "pred_iou"
SELECTION_RULES = (ORACLE_DICE, PRED_IOU)


@dataclass(frozen=True)
class Match:
    """The candidates chosen for one GT object.

    Attributes
    ----------
    oracle_index : int or None
        Index of the candidate with the highest DICE against the GT (first on ties); None when
        there are no candidates (the caller then evaluates an empty prediction).
    pred_iou_index : int or None
        Index of the candidate with the highest predicted IoU (first on ties); None when there
        are no candidates or the rule does not apply (S1, :func:`match_everything`).
    dices : (K,) float64 array
        DICE (percent) of every candidate against the GT.
    """

    oracle_index: int | None
    pred_iou_index: int | None
    dices: np.ndarray

    def index(self, rule: str) -> int | None:
        """The chosen index under ``rule`` (``"oracle_dice"`` or ``"pred_iou"``).

        Raises
        ------
        ValueError
            For an unknown rule, or ``"pred_iou"`` on an S1 match, where it is not defined.
        """
        if rule == ORACLE_DICE:
            return self.oracle_index
        if rule == PRED_IOU:
            if self.pred_iou_index is None and len(self.dices):
                raise ValueError("the pred_iou rule is not defined for Everything (S1) candidates")
            return self.pred_iou_index
        raise ValueError(f"unknown selection rule {rule!r}; choose one of {SELECTION_RULES}")

    def rules(self) -> tuple[str, ...]:
        """The selection rules this match supports."""
        if self.pred_iou_index is None and len(self.dices):
            return (ORACLE_DICE,)
        return SELECTION_RULES


def dice_many(pred_masks: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """DICE (percent) of each of K candidate masks against one GT mask, vectorised.

    Parameters
    ----------
    pred_masks : (K, H, W) bool array (K may be 0).
    gt : (H, W) bool array, non-empty.

    Returns
    -------
    (K,) float64 array. The intersections are counted only over the GT pixels
    (``pred[:, gt].sum(1)``), so the cost is K x (H W) for the candidate areas plus K x |G|,
    with no Python loop and no integer overflow.
    """
    pred_masks, gt = _check(pred_masks, gt)
    k = pred_masks.shape[0]
    flat = pred_masks.reshape(k, gt.size)
    gt_idx = np.flatnonzero(gt)
    inter = np.count_nonzero(flat[:, gt_idx], axis=1)
    areas = np.count_nonzero(flat, axis=1)
    return 200.0 * inter / (areas + gt_idx.size)


def _check(pred_masks: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred_masks = np.asarray(pred_masks).astype(bool, copy=False)
    gt = np.asarray(gt).astype(bool, copy=False)
    if gt.ndim != 2:
        raise ValueError(f"gt must be (H, W); got shape {gt.shape}")
    if pred_masks.ndim != 3 or pred_masks.shape[1:] != gt.shape:
        raise ValueError(f"pred_masks must be (K, {gt.shape[0]}, {gt.shape[1]}); got {pred_masks.shape}")
    if not gt.any():
        raise ValueError("the GT mask is empty: there is no object to match")
    return pred_masks, gt


def match(pred_masks: np.ndarray, pred_iou: np.ndarray | None, gt: np.ndarray) -> Match:
    """Choose a candidate for one GT object under both rules (Eq. 1 and predicted IoU).

    Parameters
    ----------
    pred_masks : (K, H, W) bool array
        Candidate masks at the original resolution (K may be 0).
    pred_iou : (K,) float array, or None
        SAM's predicted IoU of each candidate. None disables the predicted-IoU rule (S1).
    gt : (H, W) bool array, non-empty.

    Returns
    -------
    Match

    Raises
    ------
    ValueError
        On shape mismatches or an empty GT.
    """
    dices = dice_many(pred_masks, gt)
    k = dices.shape[0]
    if pred_iou is not None:
        pred_iou = np.asarray(pred_iou, dtype=float).reshape(-1)
        if pred_iou.shape[0] != k:
            raise ValueError(f"pred_iou has {pred_iou.shape[0]} values for {k} masks")
    if k == 0:
        return Match(None, None, dices)
    oracle = int(np.argmax(dices))  # first index on ties
    by_iou = None if pred_iou is None else int(np.argmax(pred_iou))
    return Match(oracle, by_iou, dices)


def match_everything(masks: np.ndarray, gt: np.ndarray) -> Match:
    """Oracle match among S1 (Everything) masks; the predicted-IoU rule is undefined there.

    Parameters
    ----------
    masks : (K, H, W) bool array, all masks generated for the image (K may be 0).
    gt : (H, W) bool array, non-empty.
    """
    return match(masks, None, gt)
