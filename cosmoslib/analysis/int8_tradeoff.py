"""What an int8 image encoder costs in masks: agreement with float32, per strategy (issue 22, item 2).

``backend="openvino-int8"`` (:mod:`cosmoslib.models.quantize`) encodes faster than the float32
encoders but changes the embeddings beyond rounding. :func:`agreement_table` measures what that
does to the paper's results, with the library's own evaluation path: both models -- the
reference (float32, normally ``backend="openvino"``, the graph the int8 one was quantized from)
and the candidate (int8) -- are run by :func:`cosmoslib.protocol.evaluate.evaluate` on the same
manifest with the same seeded prompts (one ``prompts.parquet`` shared by both runs), strategies
S1-S6, unshifted prompts, one repeat, and the matched masks it saves are compared:

* **agreement**: per strategy, the mean (and smallest) DICE in % between the candidate's and the
  reference's mask of each object -- the mask the protocol scores under the oracle rule (the
  paper's Eq. 1; S1: the Everything mask matched to the object, an empty mask when none
  survived the filters; two empty masks agree at 100 %);
* **change of each table's mean**: per strategy, the mean DICE against the ground truth of
  both runs and the difference (candidate - reference), under the oracle rule and the
  predicted-IoU rule (S1: oracle only).

:data:`DEFAULT_BAR` is the issue's bar for an int8 default (>= 99.5 % mean agreement on every
strategy); :func:`meets_default_bar` says whether a table reaches it. ``backend="auto"`` never
picks int8 whatever a table says (:mod:`cosmoslib.models.backend_probe` says why): the table
is evidence for a user deciding on their own data, shown beside the timing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cosmoslib.data.readers import read_raw_image
from cosmoslib.files import InputError, mask_filename, slug
from cosmoslib.protocol import evaluate, metrics
from cosmoslib.strategies import STRATEGIES
from cosmoslib.strategies import check as check_strategies

__all__ = ["DEFAULT_BAR", "COLUMNS", "agreement_table", "meets_default_bar"]

#: Mean DICE (%) between int8 and float32 masks every strategy must reach for int8 to be
#: considered as a default (issue 22).
DEFAULT_BAR = 99.5
#: Columns of :func:`agreement_table`.
COLUMNS = ("strategy", "n_objects", "agreement", "agreement_min", "dice_reference",
           "dice_candidate", "dice_change", "dice_reference_pred_iou",
           "dice_candidate_pred_iou", "dice_change_pred_iou")

_SIDES = ("reference", "candidate")


def _read_mask(path: Path) -> np.ndarray:
    if not path.is_file():
        raise InputError(path, "matched mask missing: the evaluation's parts were resumed from an "
                               "earlier run without its masks; compare in a fresh folder")
    return read_raw_image(path) > 0


def agreement_table(manifest: pd.DataFrame, root: str | Path, reference, candidate,
                    out: str | Path, strategies: Sequence[str] = STRATEGIES, seed: int = 0,
                    points_per_side: int = 32, cache_dir: str | Path | None = None,
                    progress: bool = False) -> pd.DataFrame:
    """Mask agreement between ``candidate`` (int8) and ``reference`` (float32), per strategy.

    Parameters
    ----------
    manifest : DataFrame
        The objects to compare (e.g. a :func:`cosmoslib.data.dataset.subsample` of
        :func:`cosmoslib.data.indexer.index`).
    root : path
        The COSMOS root of ``manifest``.
    reference, candidate : SamFamilyModel
        The same weights with two encoders, e.g. ``load_model(name, backend="openvino")`` and
        ``load_model(name, backend="openvino-int8", calibration=root)``. Their signatures must
        differ (else both runs would share one cache store and one set of results).
    out : path
        A folder for the two runs: ``reference.parquet`` / ``candidate.parquet`` (the results
        tables), their ``.parts``, the matched masks (``<side>.masks/``) and the shared
        ``prompts.parquet``. A rerun in the same folder resumes (the masks of resumed parts are
        those of the earlier run, made with the same model signature and prompts).
    strategies : subset of S1..S6.
    seed : prompt seed.
    points_per_side : S1 grid (the paper's 32).
    cache_dir : embedding cache (default :func:`cosmoslib.paths.embedding_cache_dir`); the two
        encoders are stored apart (their signatures differ).
    progress : progress bars on stderr.

    Returns
    -------
    DataFrame
        One row per strategy, :data:`COLUMNS`: ``n_objects``; ``agreement`` and
        ``agreement_min``, DICE (%) between the candidate's and the reference's matched mask of
        each object (oracle rule, unshifted prompt); ``dice_reference``, ``dice_candidate``
        (mean DICE % vs ground truth, oracle rule) and ``dice_change`` = candidate - reference;
        the same three under the predicted-IoU rule (NaN for S1). ``attrs`` records the
        models' signatures, the seed and the grid.

    Raises
    ------
    InputError
        Both models have one signature; a matched mask is missing (see ``out``).
    """
    if reference.signature_hash == candidate.signature_hash:
        raise InputError(None, f"reference and candidate have the same signature "
                               f"({reference.signature_hash}): nothing to compare")
    strategies = check_strategies(strategies)
    root, out = Path(root), Path(out)
    results = {}
    for side, model in zip(_SIDES, (reference, candidate)):
        table, _ = evaluate.evaluate(manifest, root, [model], out / f"{side}.parquet",
                                     strategies=strategies, cache_dir=cache_dir,
                                     save_masks=out / f"{side}.masks", seed=seed,
                                     points_per_side=points_per_side, shift_levels=(0,),
                                     repeats=1, progress=progress)
        results[side] = table[(table["shift_level"] == 0) & (table["repeat"] == 0)]
    rows = []
    for strategy in strategies:
        means = {}
        for side in _SIDES:
            mine = results[side][results[side]["strategy"] == strategy]
            for rule in ("oracle_dice", "pred_iou"):
                values = mine.loc[mine["selection_rule"] == rule, "dice"]
                means[side, rule] = float(values.mean()) if len(values) else float("nan")
        objects = results["reference"]
        objects = objects[(objects["strategy"] == strategy)
                          & (objects["selection_rule"] == "oracle_dice")]
        agreement = []
        for r in objects.itertuples(index=False):
            name = mask_filename(r.image_id, r.object, r.label_value)
            masks = [_read_mask(out / f"{side}.masks" / slug(model.name) / strategy / str(r.task)
                                / name) for side, model in zip(_SIDES, (reference, candidate))]
            agreement.append(metrics.dice(*masks))
        rows.append({
            "strategy": strategy, "n_objects": len(agreement),
            "agreement": float(np.mean(agreement)) if agreement else float("nan"),
            "agreement_min": float(np.min(agreement)) if agreement else float("nan"),
            "dice_reference": means["reference", "oracle_dice"],
            "dice_candidate": means["candidate", "oracle_dice"],
            "dice_change": means["candidate", "oracle_dice"] - means["reference", "oracle_dice"],
            "dice_reference_pred_iou": means["reference", "pred_iou"],
            "dice_candidate_pred_iou": means["candidate", "pred_iou"],
            "dice_change_pred_iou": means["candidate", "pred_iou"] - means["reference", "pred_iou"],
        })
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table.attrs.update(reference=dict(reference.signature), candidate=dict(candidate.signature),
                       seed=seed, points_per_side=points_per_side)
    return table


def meets_default_bar(table: pd.DataFrame, bar: float = DEFAULT_BAR) -> bool:
    """Whether every strategy's mean agreement (%) in ``table`` is >= ``bar``; False for an
    empty table or a strategy without objects (NaN)."""
    values = table["agreement"].to_numpy(float)
    return bool(len(values)) and bool(np.all(values >= bar))
