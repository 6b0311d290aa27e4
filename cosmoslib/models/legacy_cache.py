"""The per-image layout of embedding caches written before issue 12: read in place, packed by migration.

Before packs (:mod:`cosmoslib.models.pack`) a store held one zarr v3 array per image::

    <store>/<image key>/zarr.json, c/0/0/0   one entry: the array (Blosc zstd 5, byte shuffle) and
                                             its attributes (format :data:`LEGACY_VERSION`)

:class:`cosmoslib.models.cache.EmbeddingCache` still reads such entries in place, after the packs
(:func:`read_entry`), and :meth:`~cosmoslib.models.cache.EmbeddingCache.migrate` moves them into
a pack (:func:`remove_entry` after). Entries were written under a temporary name and renamed into
place; leftovers of interrupted writes and removals (``.tmp-*``, ``.trash-*``) are removed by
:func:`remove_leftovers`. Only tests and ``benchmarks/cache_layout.py`` still write entries
(:func:`write_entry`), to build caches of this layout.
"""

from __future__ import annotations

import os
import shutil
import struct
import uuid
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from cosmoslib.models import pack

__all__ = ["LEGACY_VERSION", "entry_keys", "read_entry", "write_entry", "remove_entry", "remove_leftovers"]

#: Format of the entries of the per-image layout.
LEGACY_VERSION = 1
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


def entry_keys(store: Path) -> list[str]:
    """Image keys of the per-image entries in ``store`` (folders named by a key), unsorted."""
    return [p.name for p in Path(store).iterdir() if pack.is_key(p.name) and p.is_dir()]


def read_entry(store: Path, key: str, signature: dict, shape, dtype) -> tuple[np.ndarray | None, dict | None, str]:
    """``(array, attributes, "")`` of a valid per-image entry, else ``(None, None, reason)``.

    Valid: format :data:`LEGACY_VERSION`, model ``signature``, ``shape`` and ``dtype`` as expected,
    chunk files as long as their Blosc headers say, and the SHA-256 of the array as recorded.
    """
    path = Path(store) / key
    dtype = np.dtype(dtype)
    try:
        arr = zarr.open_array(store=str(path), mode="r")
        attrs = dict(arr.attrs)
        if attrs.get("cosmos_entry") != LEGACY_VERSION:
            return None, None, f"entry format {attrs.get('cosmos_entry')!r} != {LEGACY_VERSION}"
        if attrs.get("signature") != signature:
            return None, None, "model signature differs"
        if tuple(arr.shape) != tuple(shape) or arr.dtype != dtype:
            return None, None, f"stored {arr.dtype} {arr.shape}, expected {dtype} {tuple(shape)}"
        bad = _truncated_blosc_chunk(path, arr)
        if bad:
            return None, None, bad
        data = np.asarray(arr[...])
    except Exception as exc:  # any failure to read an entry means: corrupt, recompute
        return None, None, f"unreadable ({type(exc).__name__}: {exc})"
    if pack.array_sha256(data) != attrs.get("sha256"):
        return None, None, "checksum mismatch"
    return data, attrs, ""


def write_entry(store: Path, key: str, data: np.ndarray, attrs: dict) -> None:
    """Write one entry in the per-image layout (``<store>/<key>/``, one zarr array, format
    :data:`LEGACY_VERSION`), atomically: under a temporary name, then renamed into place."""
    attrs = {**attrs, "cosmos_entry": LEGACY_VERSION, "key": key, "dtype": str(data.dtype),
             "sha256": pack.array_sha256(data)}
    tmp = Path(store) / f"{_TMP_PREFIX}{key}-{pack.HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        arr = zarr.create_array(
            store=str(tmp), shape=data.shape, chunks=data.shape, dtype=data.dtype,
            compressors=BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle),
            fill_value=0, attributes=attrs)
        arr[...] = data
        os.rename(tmp, Path(store) / key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_entry(store: Path, key: str) -> None:
    """Remove one per-image entry: renamed out of the way first (atomic), then deleted."""
    trash = Path(store) / f"{_TRASH_PREFIX}{key}-{pack.HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(Path(store) / key, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(store: Path) -> int:
    """Remove ``.tmp-*`` / ``.trash-*`` folders of interrupted writes and removals; returns how many.

    Names carry the writing host and process (``<prefix><key>-<host>-<pid>-<tag>``): a leftover of
    a process still running on this host (and less than a day old) is left alone, another host's
    only when a day old (:func:`cosmoslib.models.pack.stale`).
    """
    removed = 0
    for child in Path(store).iterdir():
        name = child.name
        if not (name.startswith(_TMP_PREFIX) or name.startswith(_TRASH_PREFIX)):
            continue
        parts = name.split("-")
        if pack.stale(child, parts[-3] if len(parts) >= 5 else pack.HOST_TAG, parts[-2], mine_alive=False):
            shutil.rmtree(child, ignore_errors=True)
            removed += 1
    return removed


def _truncated_blosc_chunk(path: Path, arr) -> str:
    """A reason when a chunk file of a per-image (zarr) entry is shorter or longer than its blosc
    header says, else "".

    Blosc's decoder trusts the compressed size in the header and reads that many bytes: a
    truncated chunk file made it read past the buffer and crash the process (a segmentation
    fault, seen once in the suite) instead of raising. Checked here, before zarr decodes.
    """
    if not any("blosc" in type(c).__name__.lower() for c in getattr(arr.metadata, "codecs", ())):
        return ""
    chunks = Path(path) / "c"
    for chunk in (p for p in chunks.rglob("*") if p.is_file()) if chunks.is_dir() else ():
        data = chunk.read_bytes()
        if len(data) < 16:
            return f"truncated chunk {chunk.relative_to(path)} ({len(data)} bytes)"
        # the Blosc-1 frame header: 4 bytes of version/flags/typesize, then little-endian uint32
        # nbytes, blocksize, cbytes (numcodecs keeps its reader of it private)
        _, _, cbytes = struct.unpack_from("<III", data, 4)
        if cbytes != len(data):
            return f"truncated chunk {chunk.relative_to(path)} ({len(data)} bytes, header says {cbytes})"
    return ""
