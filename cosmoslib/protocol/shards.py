"""The result shard files of the runner: names, reading, writing, and the S1 masks beside them.

A *shard* is one Parquet file of result rows (:data:`RESULT_COLUMNS`) for a run of consecutive
images and one model, in a folder per settings fingerprint and model signature
(:func:`model_folder`). Its name is a digest of the ``(task, image id, image digest)`` of its
images (:func:`shard_name`), and its Parquet metadata (key ``cosmos_images``) records those
entries (:func:`shard_entries`), so a rerun finds the rows of any image already computed in any
shard of the folder (:func:`shard_index`). A shard is written atomically (temporary file in the
same folder, then ``os.replace``).

With S1 the Everything masks of the shard's images are stored beside it as
``<shard>.s1.json`` (uncompressed RLE per ``"<task>/<image_id>"``; :func:`s1_record`,
:func:`s1_masks`), written before the shard so that a shard on disk always has its masks.

Who decides *which* shards exist and what goes into them: :mod:`cosmoslib.protocol.units`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from segment_anything.utils.amg import rle_to_mask

from cosmoslib.files import slug
from cosmoslib.models import everything

__all__ = ["RESULT_COLUMNS", "model_folder", "shard_name", "shard_table", "read_shard", "write_shard",
           "shard_entries", "shard_index", "s1_key", "s1_record", "s1_masks"]

#: Columns of the results table (and of every shard), in order (ARCHITECTURE.md, "Tables").
RESULT_COLUMNS = [
    "task", "image_id", "label_value", "object", "modality", "model", "strategy", "shift_level",
    "repeat", "selection_rule", "dice", "jac", "hd", "hd95", "assd", "pred_iou", "empty_pred",
    "empty_gt", "n_candidates", "t_embed_s", "t_decode_s",
]

#: Parquet metadata key listing the (task, image id, digest) entries of a shard.
_META_KEY = b"cosmos_images"


def model_folder(parts: Path, model) -> Path:
    """The folder of one model's shards under a settings folder ``parts``:
    ``<parts>/<model name slug>-<signature hash>``."""
    return Path(parts) / f"{slug(model.name)}-{model.signature_hash}"


def shard_name(entries: Sequence[tuple[str, str, str]]) -> str:
    """File name of a shard holding ``entries`` = (task, image id, image digest), in order.

    ``<task>__<first image id>-<number of images>-<20 hex digits of BLAKE2b over the entries>.parquet``.
    """
    digest = hashlib.blake2b(json.dumps([list(e) for e in entries]).encode(), digest_size=10).hexdigest()
    task, image_id, _ = entries[0]
    return f"{slug(task)}__{slug(image_id)}-{len(entries)}-{digest}.parquet"


def shard_table(frames: list[pd.DataFrame]) -> pa.Table:
    """The rows of ``frames`` (result rows of consecutive images) as one table of :data:`RESULT_COLUMNS`."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return pa.Table.from_pandas(pd.DataFrame(columns=RESULT_COLUMNS), preserve_index=False)
    return pa.Table.from_pandas(pd.concat(frames, ignore_index=True)[RESULT_COLUMNS], preserve_index=False)


def read_shard(path: Path) -> pa.Table:
    """The rows of a shard file (without its metadata)."""
    return pq.read_table(path).replace_schema_metadata(None)


def write_shard(path: Path, table: pa.Table, entries: list[tuple[str, str, str]]) -> Path:
    """Write one shard atomically, recording the (task, image id, digest) of its images."""
    meta = {_META_KEY: json.dumps([list(e) for e in entries]).encode()}
    table = table.replace_schema_metadata(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def shard_entries(path: Path) -> list[tuple[str, str, str]]:
    """The (task, image id, digest) of the images a shard file holds (from its metadata only)."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(_META_KEY)
    return [tuple(e) for e in json.loads(raw)] if raw else []


def shard_index(folder: Path) -> dict[tuple[str, str, str], Path]:
    """(task, image id, digest) -> a shard file of ``folder`` holding that image's rows.

    Files are looked at in name order and the first holding an entry wins; an unreadable file
    (not a shard, or damaged) is passed over, so its images are computed again. Empty when
    ``folder`` does not exist.
    """
    index: dict[tuple[str, str, str], Path] = {}
    if not folder.is_dir():
        return index
    for path in sorted(folder.glob("*.parquet")):
        try:
            for entry in shard_entries(path):
                index.setdefault(entry, path)
        except Exception:  # an unreadable foreign file: its images are recomputed
            continue
    return index


def s1_key(task: str, image_id: str) -> str:
    """The key of one image in a ``<shard>.s1.json`` file: ``"<task>/<image_id>"``."""
    return f"{task}/{image_id}"


def s1_record(result: everything.EverythingResult) -> dict:
    """The S1 masks of one image as JSON (uncompressed RLE), for figures that show them."""
    return dict(rles=result.rles, predicted_iou=result.predicted_iou.tolist(),
                stability_score=result.stability_score.tolist(), original_size=list(result.original_size))


def s1_masks(part_s1: Path, task: str | None = None, image_id: str | None = None) -> list[np.ndarray]:
    """The Everything masks stored beside a result shard (``<shard>.s1.json``).

    A shard's file holds the masks of each of its images under ``"<task>/<image_id>"``; give
    ``task`` and ``image_id`` unless the shard holds one image.

    Returns
    -------
    list of bool ndarray ``(H, W)``
        In the order :func:`cosmoslib.models.everything.generate_everything` returned them.
    """
    doc = json.loads(Path(part_s1).read_text())
    images = doc.get("images", {})
    if task is None and image_id is None and len(images) == 1:
        record = next(iter(images.values()))
    else:
        record = images[s1_key(task, image_id)]
    return [rle_to_mask(r).astype(bool) for r in record["rles"]]
