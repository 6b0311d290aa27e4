"""Errors and files: the small pieces every layer uses.

* :class:`InputError` -- bad input, naming the offending file and the problem; batches catch it,
  record ``(file, reason)`` in a skipped list and carry on;
* atomic writers -- every table, json and image the project writes goes to a temporary file in
  the same folder and is then renamed over the target, so a killed run never leaves half a file;
* :func:`file_digest` -- the content digest that keys every stored result;
* :func:`merge_skipped_csv` -- the skipped list of a resumable batch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import pandas as pd


class InputError(ValueError):
    """Bad input: names the offending file and the problem.

    Batches catch it, record ``(file, reason)`` in ``skipped.csv`` and carry on.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_parquet(df, path: str | os.PathLike) -> Path:
    """Write a DataFrame to Parquet atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def file_digest(path: str | os.PathLike) -> str:
    """Content digest of a file: 32 hex digits of BLAKE2b over its bytes.

    The manifest records it for every image and label, and every stored result derived from a
    file (prompt rows, result parts) is keyed by it, so changing a file's bytes invalidates
    exactly what was computed from it.
    """
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file, memoised per (path, size, modification time).

    Used for model weights (checkpoints, downloaded ONNX graphs), whose published digests are
    SHA-256.
    """
    stat = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as pretty UTF-8 JSON atomically (sorted keys, so reruns are byte-identical)."""
    text = json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def atomic_write_csv(df, path: str | os.PathLike) -> Path:
    """Write a DataFrame to CSV (UTF-8, no index) atomically."""
    return atomic_write_bytes(path, df.to_csv(index=False).encode("utf-8"))


def merge_skipped_csv(path: str | os.PathLike, rows, drop_files=()) -> Path:
    """Merge ``(file, reason)`` rows into the skipped list at ``path``, atomically.

    Earlier rows are kept unless their file is in ``drop_files`` (items that have since been
    prepared successfully); duplicates are dropped; rows are sorted so reruns are identical.
    The file is written (with its header) even when empty, so "nothing skipped" is visible.
    """
    path = Path(path)
    frames = []
    if path.exists():
        try:
            frames.append(pd.read_csv(path, dtype=str, keep_default_na=False))
        except Exception as exc:  # a damaged list must not stop a batch: replace it loudly
            warnings.warn(f"{path}: unreadable skipped list replaced ({exc})", stacklevel=2)
    frames.append(pd.DataFrame([(str(f), str(r)) for f, r in rows], columns=["file", "reason"]))
    df = pd.concat(frames, ignore_index=True)[["file", "reason"]]
    if drop_files:
        df = df[~df["file"].isin({str(f) for f in drop_files})]
    df = df.drop_duplicates().sort_values(["file", "reason"], kind="stable")
    return atomic_write_csv(df, path)


# --------------------------------------------------------------------------------------------
# raw volumes and images
# --------------------------------------------------------------------------------------------


def slug(text: str) -> str:
    """``text`` as a safe file or folder name (runs of other characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def mask_filename(image_id: str, obj: str, label_value: int) -> str:
    """File name of a saved matched mask: ``<image>__<object>-<label value>.png``.

    The label value makes the name unique when an image holds several instances of one object.
    """
    return f"{image_id}__{slug(obj)}-{int(label_value)}.png"
