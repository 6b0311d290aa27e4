"""Re-decoding single objects of a finished run from the cached embeddings.

Decoding from a cached embedding is cheap, so the annotation and volume tables and the figures
decode a mask again instead of storing every candidate; the prompt is the run's own row of its
prompt table (``prompts.parquet`` beside the results), so the mask is the one the run scored.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cosmoslib import paths
from cosmoslib.data import readers
from cosmoslib.models import cache as cache_mod
from cosmoslib.protocol import matching, prompts


class Redecoder:
    """Re-decode single objects of a finished run (Figs. 9 and 15, Table 7, the volume tables).

    Parameters
    ----------
    root : the COSMOS root.
    manifest : the run's manifest rows.
    model : the loaded model.
    prompt_table : the run's ``prompts.parquet`` (its unshifted rows are used).

    Raises
    ------
    FileNotFoundError
        ``prompt_table`` does not exist (the run has not been computed).
    """

    def __init__(self, root: str | Path, manifest: pd.DataFrame, model, prompt_table: str | Path):
        prompt_table = Path(prompt_table)
        if not prompt_table.exists():
            raise FileNotFoundError(f"{prompt_table}: no prompt table; compute the run's results first")
        self.root = Path(root)
        self.model = model
        self.cache = cache_mod.EmbeddingCache(paths.embedding_cache_dir(), model)
        table = pd.read_parquet(prompt_table)
        self.prompts = table[table["shift_level"] == 0].set_index(
            ["task", "image_id", "label_value", "strategy"]).sort_index()
        self.manifest = manifest.set_index(["task", "image_id", "label_value"]).sort_index()

    def __call__(self, task: str, image_id: str, label_value: int, strategy: str):
        """Returns ``(image, gt, prompt, matched mask, DICE %)`` for one object and strategy
        (the candidate the oracle rule chose)."""
        row = self.manifest.loc[(task, image_id, int(label_value))]
        image = readers.read_image(self.root / row["image_path"])
        gt = readers.read_label(self.root / row["label_path"]) == int(label_value)
        prow = self.prompts.loc[(task, image_id, int(label_value), strategy)]
        prompt = prompts.prompt_from_row(prow)
        dec = self.model.decode(self.cache.get(self.root / row["image_path"]), prompt, gt.shape)
        m = matching.match(dec.masks, dec.iou_pred, gt)
        return image, gt, prompt, dec.masks[m.oracle_index], float(m.dices[m.oracle_index])


__all__ = ["Redecoder"]
