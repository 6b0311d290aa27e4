"""The pack file format of the embedding cache: append-only packs and their fixed-size indexes.

A store of :class:`cosmoslib.models.cache.EmbeddingCache` keeps its entries in ``<store>/packs/``::

    <host>-<pid>-<time>-<uuid>.pack   entries, back to back: JSON metadata, then the Blosc(zstd,
                                      byte shuffle)-compressed array
    <host>-<pid>-<time>-<uuid>.idx    one 64-byte record per entry (:data:`IDX`): key (16 bytes),
                                      offset, metadata length, array length (bytes), time written
                                      (Unix seconds, float), BLAKE2b-128 of the metadata; a last
                                      record with key :data:`SEAL` says the writer is done

Only the process that created a pack ever appends to it (:class:`PackWriter`), so any number of
writers -- Dask workers on several hosts of a shared file system included -- write at once
without locks (file locks are unreliable on NFS / Lustre). An entry is appended to the pack
first and its index record after, and a reader takes complete records only
(:func:`read_index`), so a killed writer leaves complete entries and at most a torn tail that
nothing points at; a pack without one complete record is removed once its writer is gone
(:func:`remove_orphan_packs`).

This module knows bytes, not embeddings: what an entry's metadata must say (format version,
key, model signature, shape, checksum of the array) is checked by the cache.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numcodecs import Blosc

__all__ = ["PACK_DIR", "IDX", "SEAL", "CODEC", "HOST_TAG", "STALE_SECONDS", "Location", "PackWriter",
           "read_index", "read_entry", "decode_array", "remove_orphan_packs", "stale", "is_key", "array_sha256"]

#: Sub-folder of a store holding the packs.
PACK_DIR = "packs"
#: One index record: key (16 bytes), offset, metadata length, array length (bytes), time
#: written (Unix seconds), BLAKE2b-128 of the metadata. 64 bytes, little-endian.
IDX = struct.Struct("<16sQQQd16s")
#: Key of the record that seals an index (its writer appends nothing more).
SEAL = b"\xff" * 16
#: Compression of a packed array: Blosc zstd level 5, byte shuffle.
CODEC = Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE)
#: Tag of this host in file names (8 hex digits, no dashes).
HOST_TAG = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()
#: A leftover this old (seconds) is removed even if the process that made it still runs.
STALE_SECONDS = 24 * 3600

_HEX = frozenset("0123456789abcdef")


class Location(NamedTuple):
    """Where one entry lies; sorts oldest first (``created``), then by pack and offset."""

    created: float      #: Unix seconds the record was written
    pack: str           #: file name of the pack in the packs folder
    offset: int         #: byte offset of the entry in the pack
    meta_len: int       #: bytes of JSON metadata
    data_len: int       #: bytes of the compressed array
    digest: bytes       #: BLAKE2b-128 of the metadata


def array_sha256(arr: np.ndarray) -> str:
    """SHA-256 (64 hex digits) of an array's bytes in C order: the checksum an entry's metadata records."""
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def is_key(name: str) -> bool:
    """Whether ``name`` looks like an image key (32 lower-case hex digits)."""
    return len(name) == 32 and all(c in _HEX for c in name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale(path: Path, host: str, pid: str, mine_alive: bool) -> bool:
    """Whether a leftover of an interrupted writer may be removed.

    True when it is :data:`STALE_SECONDS` old, or was made on this host (``host`` ==
    :data:`HOST_TAG`) by a process that no longer runs; this process counts as running when
    ``mine_alive``. Another host's leftovers (whose process ids mean nothing here) wait a day.
    """
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if age >= STALE_SECONDS:
        return True
    if host != HOST_TAG:
        return False
    try:
        pid_ = int(pid)
    except ValueError:
        pid_ = -1
    if pid_ == os.getpid():
        return not mine_alive
    return not (pid_ > 0 and _pid_alive(pid_))


def _write_all(fh, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[fh.write(view):]


class PackWriter:
    """The one open pack of a process: ``<host>-<pid>-<time>-<uuid>.pack`` and its ``.idx``.

    An entry is the JSON metadata followed by the compressed array, appended to the pack; then
    one :data:`IDX` record is appended to the index.
    """

    def __init__(self, pack: Path, idx: Path):
        self.pack, self.idx = pack, idx
        self.pid = os.getpid()
        self.size = self.count = self.idx_bytes = 0
        self._pack = open(pack, "xb", buffering=0)
        self._idx = open(idx, "xb", buffering=0)

    @classmethod
    def create(cls, folder: Path) -> PackWriter:
        """A new pack and index in ``folder``, named by host, process, UTC time and a random tag."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        stem = f"{HOST_TAG}-{os.getpid()}-{stamp}-{uuid.uuid4().hex[:8]}"
        return cls(folder / f"{stem}.pack", folder / f"{stem}.idx")

    def append(self, key: bytes, meta: bytes, payload: bytes, created: float) -> Location:
        """Append one entry (16-byte ``key``, metadata, compressed array); returns its location."""
        offset = self.size
        _write_all(self._pack, meta + payload)
        self.size += len(meta) + len(payload)
        digest = hashlib.blake2b(meta, digest_size=16).digest()
        _write_all(self._idx, IDX.pack(key, offset, len(meta), len(payload), created, digest))
        self.idx_bytes += IDX.size
        self.count += 1
        return Location(created, self.pack.name, offset, len(meta), len(payload), digest)

    def seal(self) -> None:
        """Append the seal record (readers then never look at this index again) and close."""
        if self._idx.closed or self.pid != os.getpid():
            return
        try:
            _write_all(self._idx, IDX.pack(SEAL, 0, 0, 0, time.time(), bytes(16)))
        except OSError:
            pass  # unsealed costs readers one stat per miss, nothing else
        self.abandon()

    def abandon(self) -> None:
        """Close without sealing (after a failed write: the index may be misaligned)."""
        self._pack.close()
        self._idx.close()


def read_index(path: Path, start: int = 0) -> tuple[list[tuple[str, Location]], int, bool]:
    """The complete records of an index file from byte ``start`` on.

    Returns
    -------
    (records, end, sealed)
        ``(key as 32 hex digits, Location)`` per entry record; the byte offset after the last
        complete record (where to start next time; a record being written is left for then);
        whether the seal record was reached (the writer is done: nothing more will come).

    Raises
    ------
    FileNotFoundError
        The index is gone.
    """
    with open(path, "rb") as fh:
        fh.seek(start)
        raw = fh.read()
    raw = raw[:len(raw) - len(raw) % IDX.size]
    pack = path.name[:-len(path.suffix)] + ".pack"
    records = []
    for key, offset, meta_len, data_len, created, digest in IDX.iter_unpack(raw):
        if key == SEAL and meta_len == 0:
            return records, start + len(raw), True
        records.append((key.hex(), Location(created, pack, offset, meta_len, data_len, digest)))
    return records, start + len(raw), False


def read_entry(folder: Path, loc: Location) -> tuple[bytes, bytes]:
    """The metadata and compressed array bytes of the entry at ``loc`` in ``folder``.

    Raises
    ------
    ValueError
        The pack is shorter than the record says ("truncated pack") or the metadata's checksum
        differs ("metadata checksum mismatch").
    OSError
        The pack cannot be read.
    """
    with open(Path(folder) / loc.pack, "rb") as fh:
        fh.seek(loc.offset)
        buf = fh.read(loc.meta_len + loc.data_len)
    if len(buf) != loc.meta_len + loc.data_len:
        raise ValueError("truncated pack")
    meta = buf[:loc.meta_len]
    if hashlib.blake2b(meta, digest_size=16).digest() != loc.digest:
        raise ValueError("metadata checksum mismatch")
    return meta, buf[loc.meta_len:]


def decode_array(payload: bytes, shape, dtype) -> np.ndarray:
    """The array of ``shape`` and ``dtype`` compressed in ``payload`` (:data:`CODEC`)."""
    data = np.empty(tuple(shape), np.dtype(dtype))
    CODEC.decode(payload, out=data)
    return data


def remove_orphan_packs(folder: Path) -> int:
    """Remove packs without one complete index record whose writer is gone; returns how many.

    A pack with a complete entry is never removed (a torn last record is simply never indexed);
    a pack of a writer still running on this host (and less than a day old) is left alone.
    """
    removed = 0
    for child in Path(folder).glob("*.pack"):
        idx = child.with_suffix(".idx")
        try:
            complete = idx.stat().st_size >= IDX.size
        except FileNotFoundError:
            complete = False
        host, pid = (child.stem.split("-") + ["", ""])[:2]
        if not complete and stale(child, host, pid, mine_alive=True):
            idx.unlink(missing_ok=True)
            child.unlink(missing_ok=True)
            removed += 1
    return removed
