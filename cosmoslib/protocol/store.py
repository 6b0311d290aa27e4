"""The one rule by which a computed table is stored and reused.

A table is a function of its input objects (manifest rows), the models that made it and its
settings. :func:`stored` files it under a digest of exactly those three:

* the **content** of the inputs: each row's ``image_sha``, ``label_sha`` and ``label_value``
  (the manifest's BLAKE2b digests of the image and label bytes, so an edited label changes the
  key of every table whose rows include that object, and of no other);
* the **settings** (a JSON-able mapping: grid sizes, seeds, clicks, quantiles ...);
* each model's ``signature_hash`` (architecture, weights, runtime).

The table is written atomically (:func:`cosmoslib.files.atomic_write_parquet`) as
``<folder>/<digest>.parquet`` and read back whenever the same three recur; any change makes a
new digest and so a new computation (the old file stays, harmless, until the results folder is
removed). The library's version is part of the key, so a table made by older code is never
reused. ``DataFrame.attrs`` (e.g. the skipped objects of the factors table) are stored beside
it as ``<digest>.attrs.json``.

The results of :func:`cosmoslib.protocol.evaluate.evaluate` keep their finer store (one part per
image and model, keyed by content); this rule is for the tables computed in one piece.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cosmoslib import __version__, files

#: Manifest columns that stand for an object's content in a table key.
CONTENT_COLUMNS = ("image_sha", "label_sha", "label_value")


def digest(inputs: pd.DataFrame, settings: Mapping, models: Sequence = ()) -> str:
    """The key of a table: 32 hex digits of BLAKE2b over inputs' content, settings and models.

    Parameters
    ----------
    inputs : manifest rows (at least :data:`CONTENT_COLUMNS`); their order matters (a table's
        rows follow it), so callers pass them in a deterministic order.
    settings : JSON-able mapping (values that are not JSON types are keyed by ``str``).
    models : objects with a ``signature_hash`` (the models that produce the table).

    Raises
    ------
    KeyError
        ``inputs`` lacks a content column (a table keyed without its content would be reused
        for other data).
    """
    missing = [c for c in CONTENT_COLUMNS if c not in inputs.columns]
    if missing:
        raise KeyError(f"table inputs lack the content column(s) {missing}: the key would not see the data")
    payload = json.dumps(dict(settings=dict(settings), models=[m.signature_hash for m in models],
                              version=__version__,
                              objects=inputs[list(CONTENT_COLUMNS)].astype(str).to_numpy().tolist()),
                         sort_keys=True, default=str)
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class Stored:
    """A table from :func:`stored`: the ``table``, its ``path`` and whether it was ``reused``."""

    table: pd.DataFrame
    path: Path
    reused: bool


def stored(folder: str | Path, inputs: pd.DataFrame, settings: Mapping, models: Sequence,
           compute: Callable[[], pd.DataFrame]) -> Stored:
    """The table of ``compute()`` for these inputs, settings and models, computed at most once.

    Parameters
    ----------
    folder : where the table's files live (one folder per table name).
    inputs, settings, models : the key (:func:`digest`).
    compute : makes the table when no file of this key exists; must return a DataFrame.

    Returns
    -------
    Stored
        The table as read back from its file (so the first call and every later one see the
        same dtypes), with ``attrs`` restored.

    Raises
    ------
    TypeError
        ``compute`` returned something other than a DataFrame (never stored).
    """
    path = Path(folder) / f"{digest(inputs, settings, models)}.parquet"
    side = path.with_suffix(".attrs.json")
    reused = path.exists() and side.exists()
    if not reused:
        table = compute()
        if not isinstance(table, pd.DataFrame):
            raise TypeError(f"{path.parent.name}: the table function returned a {type(table).__name__}, "
                            "not a DataFrame")
        files.atomic_write_parquet(table, path)
        files.atomic_write_json(side, table.attrs)  # last: a table without its attrs is recomputed
    table = pd.read_parquet(path)
    table.attrs = json.loads(side.read_text())
    return Stored(table, path, reused)


__all__ = ["CONTENT_COLUMNS", "Stored", "digest", "stored"]
