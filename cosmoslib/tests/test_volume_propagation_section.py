"""The volumes chapter's SAM 2 section (volume_summaries.propagation_scores).

With a stand-in video predictor that returns the true masks (plus a known leak), the section
puts the propagated volume beside the same model's per-slice S5 row: the DICE gap, the leaked
slices and the prompts spent (1 against one per slice). A model without a video predictor and a
config without volumes are named with the reason, never silently dropped.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cosmoslib.analysis import volume_summaries
from cosmoslib.data import indexer
from cosmoslib.protocol import propagation
from cosmoslib.tests.test_propagation import NoVideo, StandInModel, StandInVideo, kept_truth, write_volume


def _per_slice_s5(manifest, root, label, name):
    """The per-slice S5 rows of a model whose every slice mask is the truth (DICE 100)."""
    truth = kept_truth(manifest, label)
    provider = {(r.task, r.image_id, int(r.label_value)): truth[int(r.label_value)][int(r.slice_index)]
                for r in manifest.itertuples(index=False)}
    return volume_summaries.volumes.volume_table(manifest, {(name, "S5"): provider}, root=root)


def test_propagation_rows_beside_the_per_slice_rows(tmp_path):
    root, _, label, slices = write_volume(tmp_path)
    manifest = indexer.index(root)
    truth = {v: label == v for v in (1, 2)}
    first, last = (int(k) for k in np.flatnonzero(truth[1].any(axis=(1, 2)))[[0, -1]])
    video = StandInVideo(slices, truth, leaks={1: (last + 2,)})
    per_slice = _per_slice_s5(manifest, root, label, "stand-in")
    table, skipped = volume_summaries.propagation_scores(
        manifest, root, [StandInModel(video), NoVideo()], per_slice)
    assert list(table.columns) == propagation.PROPAGATION_COLUMNS
    assert set(table["strategy"]) == set(propagation.RUN_NAMES.values())
    assert len(table) == 2 * 2  # two objects, two prompt-slice rules
    one = table[(table["label_value"] == 1) & (table["strategy"] == "P-largest")].iloc[0]
    assert one["prompts"] == 1 and one["prompts_per_slice"] == one["n_slices"] > 1
    assert one["leaked_slices"] == 1  # the known blob on one slice without the object
    assert one["dice_s5"] == 100.0 and one["dice"] < 100.0 and one["dice_gap"] == one["dice"] - one["dice_s5"]
    two = table[(table["label_value"] == 2) & (table["strategy"] == "P-largest")].iloc[0]
    assert two["leaked_slices"] == 0 and two["dice"] == 100.0
    assert ("litemedsam-like", "no video predictor (propagation needs a SAM 2 model)") in skipped


def test_no_sam2_model_or_no_volume_is_named(tmp_path):
    root, _, label, _ = write_volume(tmp_path)
    manifest = indexer.index(root)
    table, skipped = volume_summaries.propagation_scores(manifest, root, [NoVideo()], pd.DataFrame())
    assert table.empty and list(table.columns) == propagation.PROPAGATION_COLUMNS
    assert ("(all)", "no SAM 2 model") in skipped
    flat = manifest.drop(columns=["slice_index"]).assign(slice_index=np.nan)
    table, skipped = volume_summaries.propagation_scores(flat.iloc[:0], root, [StandInModel(None)], pd.DataFrame())
    assert table.empty and ("(all)", "no volume source in this config") in skipped
