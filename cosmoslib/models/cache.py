"""The embedding cache: each (image, model) embedding is computed once (paper 3.4).

SAM's image encoder costs more than everything else of a prompt round together, and the
paper evaluates six strategies -- several with many prompts -- on the same images. So the
embedding of every image is computed once per model and stored; every strategy then decodes
from the stored embedding.

Layout. One store per model signature and stored precision; entries are appended to *packs*
(their byte format: :mod:`cosmoslib.models.pack`), so the number of files grows with packs
(~1,000 entries each), not with images::

    <cache_dir>/<arch>-<signature_hash>-<fp16|fp32>.zarr/
        zarr.json                      root group, attributes: the full model signature
        packs/<host>-<pid>-<time>-<uuid>.pack   entries: JSON metadata + Blosc(zstd, shuffle) array
        packs/<host>-<pid>-<time>-<uuid>.idx    64 bytes per entry: key, offset, lengths, time,
                                                BLAKE2b of the metadata; a last record seals it
        <image key>/zarr.json, c/0/0/0  an entry of the per-image layout (before issue 12)

Each writing process appends only to packs it created (a new one after
``EmbeddingCache.pack_entries`` entries or ``pack_bytes`` bytes, sealed when full or at exit),
so any number of processes -- Dask workers on several hosts of a shared file system included
-- write at once without locks. Readers merge all indexes into one in-memory dict at open
(one sequential read of every index), pick up other writers' new records on a miss (only
unsealed indexes are looked at again), and read an entry with one seek. The per-image layout
(one zarr array per image: a folder and five files and folders each;
:mod:`cosmoslib.models.legacy_cache`) is still read in place,
entry by entry, after the packs; :meth:`EmbeddingCache.migrate` moves such entries into a pack.
``benchmarks/cache_layout.py`` compares both at 100,000 entries. Every process that writes
leaves at least one (small) pack, so many short writing processes mean many small packs. The
store keeps its ``.zarr`` name (its root is still a zarr group) so older caches stay where they
are. zarr v3 sharding was not used: a write rewrites its whole shard, so concurrent writers of
one shard lose each other's entries and a killed write can damage entries already stored.

Keys. The *image key* is a hash of the decoded pixels, dtype and shape (so a re-encoded PNG,
or the same image under another name, hits the cache); the *model signature* is
``SamFamilyModel.signature`` -- architecture, SHA-256 of the checkpoint file, input size and
cosmoslib version -- so a changed checkpoint uses a new store and recomputes everything.

Per-entry attributes: ``signature``, ``original_size`` (H, W), ``input_size`` (h, w after
resizing), ``dtype``, ``shape``, ``sha256`` of the stored array bytes, ``encode_seconds``
(encoder time of that image; NaN when imported), ``source`` (path it came from) and ``created``.

Safety. A pack is append-only and an entry counts only once its index record is complete, so
a killed writer leaves complete entries and at most a torn tail that nothing points at (a pack
without one complete entry is removed once its writer is gone). Every entry is verified before
it is reused -- the metadata checksum from the index, its format version, key, signature, shape
and dtype, and the SHA-256 of the decoded array -- and recomputed otherwise (truncated packs,
flipped bytes, garbled metadata, edited values). Of several valid copies of one key (two
writers that raced on the same image) the oldest is read, by every process; the newer is
never returned. Entries of the per-image layout were written under a temporary name and
renamed into place; their ``.tmp-*`` leftovers are removed as before.

An entry holds one array of ``model.embedding_shape``: ``(256, 64, 64)`` for SAM, and for SAM 2
its image embedding plus both high-resolution feature levels packed as ``(1024, 64, 64)``
(:func:`cosmoslib.models.sam2.pack_features`; 8 MiB in fp16 before compression).

Whole folders: ``cosmos embed`` is :func:`cosmoslib.protocol.embed.embed_root` (in this process or
on Dask, through :meth:`EmbeddingCache.ensure`); :func:`export_npy` and :func:`import_npy` move
embeddings to and from the authors' per-image ``.npy`` files.

Precision. fp16 by default (1.7-1.8 MB per SAM embedding on disk instead of 3.5 MB in fp32);
box-prompt masks decoded from fp16 and fp32 embeddings agree to a mean DICE above 99.9 %
(measured in ``cosmoslib/tests/test_cache.py`` and ``benchmarks/embed_cache.py``).
"""

from __future__ import annotations

import bisect
import datetime as _dt
import hashlib
import io as _stdio
import json
import math
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm

from cosmoslib import models, paths
from cosmoslib.data.layout import list_images
from cosmoslib.data.readers import read_image
from cosmoslib.files import InputError, atomic_write_bytes
from cosmoslib.models import legacy_cache, pack
from cosmoslib.models.pack import CODEC as _CODEC

__all__ = ["STORE_VERSION", "LEGACY_VERSION", "EmbedReport", "EmbeddingCache", "image_key", "root_images",
           "as_model", "export_npy", "import_npy"]

#: Version of the on-disk entry format (2: packed); entries of another version are recomputed.
STORE_VERSION = 2
#: Format of the entries of the per-image layout (one zarr array per image), still read
#: (:mod:`cosmoslib.models.legacy_cache`).
LEGACY_VERSION = legacy_cache.LEGACY_VERSION

_DTYPES = {"float16": "fp16", "float32": "fp32"}
#: Attributes :meth:`EmbeddingCache._store_entry` sets itself.
_ENTRY_FIELDS = frozenset({"cosmos_entry", "key", "signature", "dtype", "shape", "sha256", "codec"})


def image_key(image: np.ndarray) -> str:
    """Content key of an image: 32 hex digits of SHA-256 over dtype, shape and pixels.

    Two files with the same decoded pixels (e.g. one PNG re-saved with another compression
    level) get the same key; a grey image and its 3-channel copy do not.
    """
    arr = np.ascontiguousarray(image)
    digest = hashlib.sha256(f"{arr.dtype.str}|{tuple(arr.shape)}|".encode())
    digest.update(arr.tobytes())
    return digest.hexdigest()[:32]


_sha256 = pack.array_sha256


def _reason(exc: Exception) -> str:
    """The problem of an error without the file name (failures already name the file)."""
    return exc.problem if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"


@dataclass
class EmbedReport:
    """What one embedding pass did.

    Attributes
    ----------
    n_images : int
        Images asked for.
    n_computed : int
        Embeddings computed by the encoder (including ``n_invalid`` recomputations).
    n_reused : int
        Valid entries found in the cache (or duplicates of an image already done).
    n_invalid : int
        Entries found corrupt or of another signature, and recomputed.
    n_imported, n_exported : int
        ``.npy`` files imported / written (:func:`import_npy`, :func:`export_npy`).
    failures : list of (file, reason)
        Images (or ``.npy`` files) that could not be read or encoded; the rest went on.
    elapsed : float
        Wall-clock seconds.
    encode_seconds : float
        Seconds spent in the encoder.
    cache_dir, store : Path
        The cache folder and the zarr store of this model signature.
    """

    model_name: str = ""
    dtype: str = "float16"
    n_images: int = 0
    n_computed: int = 0
    n_reused: int = 0
    n_invalid: int = 0
    n_imported: int = 0
    n_exported: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    elapsed: float = 0.0
    encode_seconds: float = 0.0
    cache_dir: Path | None = None
    store: Path | None = None

    @property
    def n_failed(self) -> int:
        """Number of failures."""
        return len(self.failures)

    def summary(self) -> str:
        """One paragraph for the command line."""
        rate = (f" ({self.n_computed / self.encode_seconds:.2f} images/s in the encoder)"
                if self.n_computed and self.encode_seconds > 0 else "")
        text = (f"Embeddings of {self.n_images} images with {self.model_name} ({self.dtype}): "
                f"{self.n_computed} computed{rate}, {self.n_reused} reused from the cache")
        if self.n_invalid:
            text += f", {self.n_invalid} corrupt or stale entries recomputed"
        if self.n_imported:
            text += f", {self.n_imported} imported from .npy"
        if self.n_exported:
            text += f", {self.n_exported} exported to .npy"
        text += f", {self.n_failed} failed; {self.elapsed:.1f} s. Cache: {self.store}."
        if self.failures:
            shown = "; ".join(f"{f}: {r}" for f, r in self.failures[:3])
            more = f" (and {self.n_failed - 3} more)" if self.n_failed > 3 else ""
            text += f" Failed: {shown}{more}."
        return text


class EmbeddingCache:
    """Embeddings of one model, computed once per image and stored in a zarr store.

    Parameters
    ----------
    cache_dir : path or None
        Folder holding the stores (default :func:`cosmoslib.paths.embedding_cache_dir`).
    model : cosmoslib.models.SamFamilyModel
    dtype : {"float16", "float32"}
        Stored precision; each precision has its own store.
    batch_size : int
        Images per encoder call in :meth:`ensure`. 1 (default) times each image on its own,
        which is what ``encode_seconds`` (the paper's per-image embedding time) reports.
    prefetch : int
        Images :meth:`ensure` reads and hashes ahead on a background thread while the encoder
        runs (0: read in the main thread). Each costs one decoded image of memory.
    """

    #: A pack is sealed (and a new one started) after this many entries ...
    pack_entries: int = 1024
    #: ... or once it holds this many bytes (about 1,100 fp16 SAM embeddings).
    pack_bytes: int = 2 * 1024 ** 3

    def __init__(self, cache_dir, model, dtype: str = "float16", batch_size: int = 1,
                 prefetch: int = 2):
        if str(dtype) not in _DTYPES:
            raise InputError(None, f"cache dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.cache_dir = Path(cache_dir) if cache_dir else paths.embedding_cache_dir()
        self.model = model
        self.dtype = np.dtype(str(dtype))
        self.batch_size = max(1, int(batch_size))
        self.prefetch = max(0, int(prefetch))
        self._signature = dict(model.signature)
        self.store = self.cache_dir / f"{model.arch}-{model.signature_hash}-{_DTYPES[str(dtype)]}.zarr"
        self.packs = self.store / pack.PACK_DIR
        self._lock = threading.RLock()
        self._index: dict[str, list[tuple]] = {}  # key -> locations, oldest first
        self._seen: dict[str, int] = {}  # index file name -> bytes read (-1: sealed)
        self._bad: set[tuple] = set()  # locations found invalid by this process
        self._writer: pack.PackWriter | None = None
        self._finalizer: weakref.finalize | None = None
        self._open_root()
        self.clean_temporaries()
        self._refresh()

    # ---- store and entries

    def _open_root(self) -> None:

        self.packs.mkdir(parents=True, exist_ok=True)
        attrs = {"cosmos_embedding_cache": STORE_VERSION, "signature": self._signature,
                 "model_name": self.model.name, "dtype": str(self.dtype), "layout": "packs"}
        try:
            root = self._open_group()
        except Exception:  # garbled root metadata: entries carry their own, so just rewrite it
            (self.store / "zarr.json").unlink(missing_ok=True)
            root = self._open_group()
        if dict(root.attrs) != attrs:
            root.attrs.update(attrs)

    def _open_group(self, attempts: int = 5):
        """``zarr.open_group(mode="a")``, retried when another process created the group
        between zarr's existence check and its own creation (``ContainsGroupError``: several
        writers, e.g. Dask workers, opening a new store at once); the group is then opened."""
        for attempt in range(attempts):
            try:
                return zarr.open_group(store=str(self.store), mode="a")
            except zarr.errors.ContainsGroupError:
                time.sleep(0.05 * (attempt + 1))
        return zarr.open_group(store=str(self.store), mode="a")

    def clean_temporaries(self) -> int:
        """Remove leftovers of interrupted writes; returns how many.

        Leftovers are ``.tmp-*`` / ``.trash-*`` folders of the per-image layout and packs whose
        writer died before completing a single entry. A leftover whose writing process still
        runs (and is younger than a day) is left alone, so several runs -- the workers of a
        Dask cluster included -- can share a cache. Names carry a tag of the writing host:
        another host's leftovers (a cluster on a shared file system, where its process ids
        mean nothing here) are removed only when a day old. A pack with complete entries is
        never removed; a torn last record of a killed writer is simply never indexed.
        """
        return legacy_cache.remove_leftovers(self.store) + pack.remove_orphan_packs(self.packs)

    def _refresh(self) -> None:
        """Read the index records appended since the last call (by any writer)."""
        with self._lock:
            try:
                names = os.listdir(self.packs)
            except FileNotFoundError:
                return
            for name in names:
                if not name.endswith(".idx"):
                    continue
                done = self._seen.get(name, 0)
                if done < 0:
                    continue
                try:
                    records, end, sealed = pack.read_index(self.packs / name, done)
                except FileNotFoundError:
                    continue
                for key, loc in records:
                    self._add(key, loc)
                self._seen[name] = -1 if sealed else end  # sealed: its writer is done, never read again

    def _add(self, key: str, loc: tuple) -> None:
        locs = self._index.setdefault(key, [])
        if loc not in locs:
            bisect.insort(locs, loc)

    def _legacy_keys(self) -> list[str]:
        return legacy_cache.entry_keys(self.store)

    def keys(self) -> list[str]:
        """Image keys of all entries present (valid or not), sorted, each once."""
        self._refresh()
        return sorted(set(self._index) | set(self._legacy_keys()))

    def has(self, key: str) -> bool:
        """Whether an entry for ``key`` is stored, *without* verifying it (an index look-up;
        ``key in cache`` reads and verifies the entry)."""
        if key not in self._index:
            self._refresh()
        return key in self._index or (pack.is_key(key) and (self.store / key).is_dir())

    def __contains__(self, key: str) -> bool:
        return self._read(key)[0] is not None

    def __len__(self) -> int:
        return len(self.keys())

    def _read(self, key: str) -> tuple[np.ndarray | None, dict | None, str]:
        """``(stored array, attributes, "")`` for a valid entry, else ``(None, None, reason)``.

        The oldest valid packed entry wins (so every process reads the same one), then an
        entry of the per-image layout; other writers' new entries are looked up on a miss.
        """
        refreshed = key not in self._index
        if refreshed:
            self._refresh()
        first = ""
        while True:
            for loc in list(self._index.get(key, ())):
                if loc in self._bad:
                    first = first or "invalid packed entry"
                    continue
                data, attrs, reason = self._read_packed(key, loc)
                if data is not None:
                    return data, attrs, ""
                self._bad.add(loc)
                first = first or reason
            if refreshed:
                break
            self._refresh()  # all known copies invalid: another writer may have stored a new one
            refreshed = True
        if pack.is_key(key) and (self.store / key).is_dir():
            data, attrs, reason = self._read_legacy(key)
            if data is not None:
                return data, attrs, ""
            first = first or reason
        return None, None, first or "missing"

    def _read_packed(self, key: str, loc: pack.Location) -> tuple[np.ndarray | None, dict | None, str]:
        """A packed entry, checked: metadata checksum (:func:`cosmoslib.models.pack.read_entry`),
        format version, key, signature, shape and dtype, SHA-256 of the decoded array."""
        try:
            try:
                meta, payload = pack.read_entry(self.packs, loc)
            except ValueError as exc:  # truncated pack, metadata checksum mismatch
                return None, None, str(exc)
            attrs = json.loads(meta)
            if attrs.get("cosmos_entry") != STORE_VERSION:
                return None, None, f"entry format {attrs.get('cosmos_entry')!r} != {STORE_VERSION}"
            if attrs.get("key") != key:
                return None, None, "entry of another key"
            if attrs.get("signature") != self._signature:
                return None, None, "model signature differs"
            shape = tuple(attrs.get("shape", ()))
            if shape != tuple(self.model.embedding_shape) or attrs.get("dtype") != str(self.dtype):
                return None, None, f"stored {attrs.get('dtype')} {shape}, expected {self.dtype} " \
                                   f"{self.model.embedding_shape}"
            data = pack.decode_array(payload, shape, self.dtype)
        except Exception as exc:  # any failure to read an entry means: corrupt, recompute
            return None, None, f"unreadable ({type(exc).__name__}: {exc})"
        if _sha256(data) != attrs.get("sha256"):
            return None, None, "checksum mismatch"
        return data, attrs, ""

    def _read_legacy(self, key: str) -> tuple[np.ndarray | None, dict | None, str]:
        """An entry of the per-image layout (:func:`cosmoslib.models.legacy_cache.read_entry`)."""
        return legacy_cache.read_entry(self.store, key, self._signature, self.model.embedding_shape, self.dtype)

    def load(self, key: str) -> np.ndarray:
        """The stored embedding of ``key`` as float32 ``(256, 64, 64)``.

        Raises
        ------
        KeyError
            No entry for ``key``.
        InputError
            The entry exists but is corrupt or of another signature (the reason says which).
        """
        data, _, reason = self._read(key)
        if data is None:
            if reason == "missing":
                raise KeyError(key)
            raise InputError(self.store / key, f"invalid cache entry: {reason}")
        return data.astype(np.float32)

    def metadata(self, key: str) -> dict[str, Any]:
        """The attributes of a valid entry (raises like :meth:`load`)."""
        data, attrs, reason = self._read(key)
        if data is None:
            if reason == "missing":
                raise KeyError(key)
            raise InputError(self.store / key, f"invalid cache entry: {reason}")
        return attrs

    def verify(self) -> dict[str, str]:
        """``{key: reason}`` for every key without a valid entry (empty when all are valid)."""
        bad = {}
        for key in self.keys():
            _, _, reason = self._read(key)
            if reason:
                bad[key] = reason
        return bad

    def _write(self, key: str, embedding: np.ndarray, original_size: Sequence[int],
               encode_seconds: float, source: str | None) -> np.ndarray:
        """Store one embedding atomically; returns the stored array (in the cache dtype).

        When another writer stored a valid entry for ``key`` meanwhile, that one is kept and
        returned, and nothing is written.
        """

        data = np.ascontiguousarray(np.asarray(embedding, dtype=np.float32).astype(self.dtype))
        if data.shape != tuple(self.model.embedding_shape):
            raise InputError(source, f"embedding of shape {data.shape}, expected "
                                     f"{self.model.embedding_shape}")
        attrs = {
            "key": key,
            "signature_hash": self.model.signature_hash,
            "model_name": self.model.name,
            "original_size": [int(v) for v in original_size],
            "input_size": [int(v) for v in self.model.resized_size(original_size)],
            "encode_seconds": None if not math.isfinite(encode_seconds) else float(encode_seconds),
            "source": None if source is None else str(source),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        return self._store_entry(key, data, attrs)

    def _store_entry(self, key: str, data: np.ndarray, attrs: dict) -> np.ndarray:
        """Append one verified-format entry to this process's pack (unless a valid one exists)."""
        with self._lock:
            self._refresh()
            for loc in self._index.get(key, ()):
                if loc not in self._bad:
                    stored, _, _ = self._read_packed(key, loc)
                    if stored is not None:
                        return stored
                    self._bad.add(loc)
            attrs = {**attrs, "cosmos_entry": STORE_VERSION, "key": key, "signature": self._signature,
                     "dtype": str(self.dtype), "shape": list(data.shape), "sha256": _sha256(data),
                     "codec": _CODEC.get_config()}
            meta = json.dumps(attrs, sort_keys=True).encode()
            payload = _CODEC.encode(data)
            writer = self._writer
            if writer is None or writer.pid != os.getpid():  # none yet, or inherited by fork
                writer = self._writer = pack.PackWriter.create(self.packs)
                if self._finalizer is not None:
                    self._finalizer.detach()
                self._finalizer = weakref.finalize(self, writer.seal)  # seals at exit, too
            try:
                loc = writer.append(bytes.fromhex(key), meta, payload, time.time())
            except BaseException:
                writer.abandon()  # its files may now be misaligned: never append to it again
                self._writer = None
                raise
            self._add(key, loc)
            self._seen[writer.idx.name] = writer.idx_bytes
            if writer.count >= self.pack_entries or writer.size >= self.pack_bytes:
                writer.seal()
                self._seen[writer.idx.name] = -1
                self._writer = None
        return data

    def close(self) -> None:
        """Seal this process's open pack (also done at exit; a killed process leaves it
        unsealed, which costs readers one ``stat`` per look-up miss, nothing else)."""
        with self._lock:
            if self._writer is not None and self._writer.pid == os.getpid():
                self._writer.seal()
            self._writer = None

    def stored_bytes(self, key: str) -> int:
        """Bytes the valid entry of ``key`` takes on disk (metadata + compressed array)."""
        if self._read(key)[0] is None:
            raise KeyError(key)
        for loc in self._index.get(key, ()):
            if loc not in self._bad:
                return int(loc[3] + loc[4])
        return sum(f.stat().st_size for f in (self.store / key).rglob("*") if f.is_file())

    def migrate(self, progress: bool = True) -> tuple[int, int]:
        """Move the entries of the per-image layout (one zarr array per image) into packs.

        Valid entries are appended to a pack with their attributes, then their folders are
        removed; invalid ones are removed (they would be recomputed anyway). Safe to kill and
        rerun: a folder is removed only once its entry is in a pack. Not needed to *read* an
        old cache (its entries are found in place); it brings the file count down.

        Returns
        -------
        (moved, dropped) : int, int
            Entries packed, and invalid entries removed.
        """
        moved = dropped = 0
        for key in tqdm(sorted(self._legacy_keys()), desc="migrate cache", unit="entry",
                        file=sys.stderr, disable=not progress):
            data, attrs, _ = self._read_legacy(key)
            if data is None:
                dropped += 1
            else:
                keep = {k: v for k, v in attrs.items() if k not in _ENTRY_FIELDS}
                self._store_entry(key, data, keep)
                moved += 1
            legacy_cache.remove_entry(self.store, key)
        self.close()
        return moved, dropped

    # ---- computing

    def _encode(self, images: list[np.ndarray]) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        emb = self.model.encode(images, batch_size=len(images))
        return emb, time.perf_counter() - start

    @staticmethod
    def _image(image) -> tuple[np.ndarray, str | None]:
        if isinstance(image, (str, os.PathLike)):

            return read_image(image), str(image)
        return np.asarray(image), None

    def get_with_time(self, image, source: str | os.PathLike | None = None) -> tuple[np.ndarray, float]:
        """Like :meth:`get`, plus the encoder seconds stored with the entry (NaN if unknown).

        ``source`` names the file an already decoded ``image`` came from (recorded with a new
        entry), so a caller that reads an image once for several models keeps the provenance.
        """
        img, from_path = self._image(image)
        source = from_path if source is None else str(source)
        key = image_key(img)
        data, attrs, _ = self._read(key)
        if data is None:
            emb, seconds = self._encode([img])
            data = self._write(key, emb[0], img.shape[:2], seconds, source)
            return data.astype(np.float32), seconds
        seconds = attrs.get("encode_seconds")
        return data.astype(np.float32), float("nan") if seconds is None else float(seconds)

    def get(self, image) -> np.ndarray:
        """The embedding of one image, float32 ``(256, 64, 64)``, computed if not cached.

        Parameters
        ----------
        image : uint8 array (H, W) / (H, W, 3), or a path read with ``cosmoslib.data.readers.read_image``

        Returns
        -------
        float32 array (256, 64, 64)
            Always the stored values (fp16-rounded in an fp16 cache), also on the first call.
        """
        return self.get_with_time(image)[0]

    def ensure(self, image_paths: Iterable[str | os.PathLike], progress: bool = True
               ) -> EmbedReport:
        """Make sure every image has a valid entry; compute only the missing or invalid ones.

        Parameters
        ----------
        image_paths : iterable of paths
            Images readable by ``cosmoslib.data.readers.read_image``.
        progress : bool
            tqdm bar on stderr (images/s).

        Returns
        -------
        EmbedReport
            Unreadable images are recorded in ``failures`` and skipped.
        """

        start = time.perf_counter()
        image_paths = [Path(p) for p in image_paths]
        report = EmbedReport(model_name=self.model.name, dtype=str(self.dtype),
                             n_images=len(image_paths), cache_dir=self.cache_dir, store=self.store)
        done: set[str] = set()
        pending: list[tuple[Path, str, np.ndarray]] = []

        def flush() -> None:
            if not pending:
                return
            batch = list(pending)
            pending.clear()
            try:
                emb, seconds = self._encode([img for _, _, img in batch])
            except (RuntimeError, InputError, ValueError) as exc:
                report.failures += [(str(p), f"encoder failed: {_reason(exc)}") for p, _, _ in batch]
                return
            report.encode_seconds += seconds
            for i, (path, key, img) in enumerate(batch):
                self._write(key, emb[i], img.shape[:2], seconds / len(batch), str(path))
                done.add(key)
                report.n_computed += 1

        bar = tqdm(_prefetch(image_paths, self.prefetch), total=len(image_paths),
                   desc=f"embed {self.model.name}", unit="img", file=sys.stderr,
                   disable=not progress)
        for path, img, key, exc in bar:
            if exc is not None:
                report.failures.append((str(path), _reason(exc)))
                continue
            if key in done or any(k == key for _, k, _ in pending):
                report.n_reused += 1
                continue
            _, _, reason = self._read(key)
            if not reason:
                report.n_reused += 1
                done.add(key)
                continue
            if reason != "missing":
                report.n_invalid += 1
            pending.append((path, key, img))
            if len(pending) >= self.batch_size:
                flush()
            bar.set_postfix(computed=report.n_computed, reused=report.n_reused, refresh=False)
        flush()
        bar.close()
        report.elapsed = time.perf_counter() - start
        return report


def _load_for_cache(path: Path):
    """``(path, image, key, None)``, or ``(path, None, None, error)`` when unreadable."""

    try:
        img = read_image(path)
        return path, img, image_key(img), None
    except (InputError, OSError, ValueError) as exc:
        return path, None, None, exc


def _prefetch(image_paths: Sequence[Path], depth: int):
    """:func:`_load_for_cache` of each path, in order, ``depth`` images ahead on one
    background thread (image decoding and hashing release the GIL, so they overlap the
    encoder); ``depth=0`` reads in the calling thread."""
    if depth <= 0:
        for path in image_paths:
            yield _load_for_cache(path)
        return

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cosmos-read") as pool:
        pending: deque = deque()
        for path in image_paths:
            pending.append(pool.submit(_load_for_cache, path))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# --------------------------------------------------------------------------- whole folders


def as_model(model, checkpoint=None, device=None):
    """``model`` itself when it is a loaded :class:`cosmoslib.models.SamFamilyModel`, else the
    registry model of that name (:func:`cosmoslib.models.load_model` with ``checkpoint``, ``device``)."""
    if isinstance(model, models.SamFamilyModel):
        return model
    return models.load_model(str(model), checkpoint=checkpoint, device=device)


def root_images(root) -> list[tuple[str, str, Path]]:
    """``(task, image id, path)`` of every image of a COSMOS-layout folder
    (:func:`cosmoslib.data.layout.list_images`).

    Raises
    ------
    InputError
        ``root`` is not a folder, or holds no ``<task>/images/<name>.png``.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "COSMOS root folder not found")
    items = list_images(root)
    if not items:
        raise InputError(root, "no images found (expected <task>/images/<name>.png)")
    return items


def export_npy(root, model, out_dir, cache_dir=None, dtype: str = "float16",
               checkpoint=None, device=None, progress: bool = True) -> EmbedReport:
    """Write the paper's per-image embedding files: ``<out_dir>/<task>/<image_id>.npy``.

    Each file holds one float32 ``(1, 256, 64, 64)`` array (the authors' format). Embeddings
    come from the cache (computed first where missing), so an fp16 cache exports fp16-rounded
    values; use ``dtype="float32"`` for full precision.

    Returns
    -------
    EmbedReport
        Of the embedding pass, with ``n_exported`` files written.
    """

    items = root_images(root)
    model = as_model(model, checkpoint, device)
    cache = EmbeddingCache(cache_dir, model, dtype=dtype)
    start = time.perf_counter()
    report = cache.ensure([p for _, _, p in items], progress=progress)
    failed = {f for f, _ in report.failures}
    for task, image_id, path in items:
        if str(path) in failed:
            continue
        emb = cache.load(image_key(read_image(path)))
        buf = _stdio.BytesIO()
        np.save(buf, emb[None].astype(np.float32), allow_pickle=False)
        atomic_write_bytes(Path(out_dir) / task / f"{image_id}.npy", buf.getvalue())
        report.n_exported += 1
    report.elapsed = time.perf_counter() - start
    return report


def import_npy(npy_dir, root, model, cache_dir=None, dtype: str = "float16",
               checkpoint=None, device=None, overwrite: bool = False,
               progress: bool = True) -> EmbedReport:
    """Import per-image ``.npy`` embeddings into the cache under ``model``'s signature.

    For each image ``<task>/images/<image_id>.png`` of ``root`` the file
    ``<npy_dir>/<task>/<image_id>.npy`` (or else ``<npy_dir>/<image_id>.npy``) is read: one
    float array ``(1, 256, 64, 64)`` or ``(256, 64, 64)``. The caller vouches that the files
    were computed by this model (same weights, same preprocessing): nothing can check that.

    Parameters
    ----------
    overwrite : bool
        Replace valid entries already in the cache (default: keep them, count as reused).

    Returns
    -------
    EmbedReport
        ``n_imported``; missing, wrongly shaped or non-finite files are in ``failures``.
    """


    start = time.perf_counter()
    items = root_images(root)
    model = as_model(model, checkpoint, device)
    cache = EmbeddingCache(cache_dir, model, dtype=dtype)
    report = EmbedReport(model_name=model.name, dtype=str(cache.dtype), n_images=len(items),
                         cache_dir=cache.cache_dir, store=cache.store)
    shape = tuple(model.embedding_shape)
    for task, image_id, path in tqdm(items, desc="import .npy", unit="img", file=sys.stderr,
                                     disable=not progress):
        candidates = [Path(npy_dir) / task / f"{image_id}.npy", Path(npy_dir) / f"{image_id}.npy"]
        npy = next((c for c in candidates if c.is_file()), None)
        if npy is None:
            report.failures.append((str(candidates[0]), "no .npy embedding for this image"))
            continue
        try:
            img = read_image(path)
            arr = np.load(npy, allow_pickle=False)
        except (InputError, OSError, ValueError) as exc:
            report.failures.append((str(npy), f"unreadable: {_reason(exc)}"))
            continue
        if arr.shape == (1, *shape):
            arr = arr[0]
        if arr.shape != shape or arr.dtype.kind != "f" or not np.isfinite(arr).all():
            report.failures.append((str(npy), f"expected finite floats of shape {shape} or "
                                              f"(1, {', '.join(map(str, shape))}), got "
                                              f"{arr.dtype} {arr.shape}"))
            continue
        key = image_key(img)
        if not overwrite and key in cache:
            report.n_reused += 1
            continue
        cache._write(key, arr, img.shape[:2], float("nan"), str(npy))
        report.n_imported += 1
    report.elapsed = time.perf_counter() - start
    return report
