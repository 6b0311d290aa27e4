"""Benchmark of the embedding cache's on-disk layouts (issue 12, item 4). Prints, never asserts.

Side by side in one run, on the same synthetic entries:

* ``packs``: the layout of :mod:`cosmoslib.models.cache` now -- append-only pack files (one writer
  process each, sealed after ``pack_entries`` entries) and a fixed-size index per pack;
* ``per-image``: the layout before it -- one zarr v3 array (a folder, its ``zarr.json`` and
  one chunk under ``c/0/0/0``) per image, still read in place by the same class.

Measured for each: files and folders on disk, open (``EmbeddingCache(...)``), listing
(``keys()``), index-only look-up (``has(key)``, present and absent keys), verified look-up
(``key in cache``: reads the entry and checks its checksum) and read (``load(key)``), with
the ratio per-image / packs.

Two scales:

* ``--n-small`` entries (default 100,000) of a small synthetic array (default 4 x 8 x 8
  fp16 = 512 bytes) -- 100,000 real-size embeddings (256 x 64 x 64 fp16, ~2 MB) would need
  about 200 GB per layout, so the file-count scale uses small arrays;
* ``--n-real`` entries (default 1,000) of real size (256 x 64 x 64 fp16, random normal
  values: compress about like real embeddings) for read throughput in MB/s.

The per-image layout at the small scale is written file by file (the same bytes zarr writes,
checked by reading every sampled entry back through the verifying reader), since going
through zarr costs ~10 ms per entry. Caches live in a temporary folder (``--tmp``) removed at
the end; mind the disk: ~2.5 GB for 100,000 small per-image entries (4 KB blocks) and
~3.6 GB for 1,000 real-size entries in both layouts. The page cache is warm (entries were
just written): these are warm-cache times.

Run: ``python benchmarks/cache_layout.py [--n-small 100000] [--n-real 1000] [--samples 2000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from numcodecs import Blosc

from cosmoslib.models import cache, legacy_cache, pack

#: A signature shaped like a real model's (the metadata size of an entry depends on it).
SIGNATURE = {"arch": "synthetic", "checkpoint_sha256": "ab" * 32, "input_size": 1024,
             "pixel_mean": [123.675, 116.28, 103.53], "pixel_std": [58.395, 57.12, 57.375],
             "cosmoslib": "benchmark"}


class Synthetic:
    """A stand-in model: only what the cache needs (no encoder is ever called)."""

    name = arch = "synthetic"
    signature = SIGNATURE
    signature_hash = "5" * 16

    def __init__(self, shape):
        self.embedding_shape = tuple(shape)

    def resized_size(self, size):
        return tuple(size)

    def encode(self, images, batch_size=None):
        raise RuntimeError("the benchmark never encodes")


def _attrs(i: int) -> dict:
    return {"signature_hash": Synthetic.signature_hash, "model_name": "synthetic",
            "original_size": [512, 512], "input_size": [1024, 1024], "encode_seconds": 0.5,
            "source": f"task_{i % 50:02d}/images/image_{i:07d}.png",
            "created": "2024-01-01T00:00:00+00:00"}


def _entry(i: int, shape) -> tuple[str, np.ndarray]:
    key = f"{i:016x}{i * 2654435761 % 2 ** 64:016x}"
    data = np.random.default_rng(i).standard_normal(shape).astype(np.float16)
    return key, data


def _build_packs(cache_dir: Path, shape, n: int) -> float:
    start = time.perf_counter()
    c = cache.EmbeddingCache(cache_dir, Synthetic(shape))
    for i in range(n):
        key, data = _entry(i, shape)
        a = _attrs(i)
        c._write(key, data, a["original_size"], a["encode_seconds"], a["source"])
    c.close()
    return time.perf_counter() - start


def _build_per_image(cache_dir: Path, shape, n: int, fast: bool) -> float:
    """Entries of the per-image layout; ``fast`` writes zarr's bytes directly (a template
    ``zarr.json`` from zarr itself, the chunk compressed with the same Blosc codec)."""
    start = time.perf_counter()
    c = cache.EmbeddingCache(cache_dir, Synthetic(shape))
    store = c.store
    key0, data0 = _entry(0, shape)
    legacy_cache.write_entry(store, key0, data0, {**_attrs(0), "signature": SIGNATURE})
    template = json.loads((store / key0 / "zarr.json").read_text())
    codec = Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE)
    for i in range(1, n):
        key, data = _entry(i, shape)
        attrs = {**_attrs(i), "signature": SIGNATURE, "cosmos_entry": legacy_cache.LEGACY_VERSION,
                 "key": key, "dtype": str(data.dtype), "sha256": pack.array_sha256(data)}
        if not fast:
            legacy_cache.write_entry(store, key, data, attrs)
            continue
        entry = store / key
        (entry / "c" / "0" / "0").mkdir(parents=True)
        (entry / "zarr.json").write_text(json.dumps({**template, "attributes": attrs}, indent=2))
        (entry / "c" / "0" / "0" / "0").write_bytes(codec.encode(data))
    return time.perf_counter() - start


def _count(folder: Path) -> tuple[int, int, int]:
    files = dirs = size = 0
    for _, dnames, fnames in os.walk(folder):
        dirs += len(dnames)
        files += len(fnames)
    for dirpath, _, fnames in os.walk(folder):
        size += sum(os.stat(os.path.join(dirpath, f)).st_blocks * 512 for f in fnames)
    return files, dirs, size


def _per_call(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) / max(len(items), 1)


def _measure(cache_dir: Path, shape, n: int, samples: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    present = [_entry(int(i), shape)[0] for i in rng.choice(n, size=min(samples, n), replace=False)]
    absent = [f"{i:032x}" for i in rng.integers(2 ** 62, size=len(present))]
    opens = []
    for _ in range(3):
        start = time.perf_counter()
        c = cache.EmbeddingCache(cache_dir, Synthetic(shape))
        opens.append(time.perf_counter() - start)
    start = time.perf_counter()
    n_keys = len(c.keys())
    t_keys = time.perf_counter() - start
    out = {"open_s": statistics.median(opens), "keys_s": t_keys, "n_keys": n_keys,
           "has_s": _per_call(c.has, present), "has_absent_s": _per_call(c.has, absent),
           "contains_s": _per_call(c.__contains__, present[: samples // 4 or 1]),
           "load_s": _per_call(c.load, present)}
    out["valid"] = sum(key in c for key in present[:200])
    out["files"], out["dirs"], out["disk_bytes"] = _count(c.store)
    return out


def _report(title: str, res: dict, n: int, entry_bytes: int) -> None:
    print(f"\n{title}")
    rows = [("entries (keys())", "n_keys", "{:.0f}", False), ("files", "files", "{:.0f}", False),
            ("folders", "dirs", "{:.0f}", False), ("disk (MB, allocated)", "disk_bytes", "{:.1f}", False),
            ("open EmbeddingCache (ms)", "open_s", "{:.1f}", True), ("keys() (ms)", "keys_s", "{:.1f}", True),
            ("has(key), present (us)", "has_s", "{:.1f}", True),
            ("has(key), absent (us)", "has_absent_s", "{:.1f}", True),
            ("key in cache, verified (ms)", "contains_s", "{:.3f}", True),
            ("load(key) (ms)", "load_s", "{:.3f}", True)]
    scale = {"disk_bytes": 1e-6, "open_s": 1e3, "keys_s": 1e3, "has_s": 1e6, "has_absent_s": 1e6,
             "contains_s": 1e3, "load_s": 1e3}
    print(f"{'':32s} {'packs':>12s} {'per-image':>12s} {'per-image / packs':>18s}")
    for label, k, fmt, is_time in rows:
        a, b = res["packs"][k], res["per-image"][k]
        ratio = f"{b / a:.2f}x" if a else "-"
        print(f"{label:32s} {fmt.format(a * scale.get(k, 1)):>12s} {fmt.format(b * scale.get(k, 1)):>12s} "
              f"{ratio:>18s}")
    for name in ("packs", "per-image"):
        r = res[name]
        mb_s = entry_bytes / r["load_s"] / 1e6
        print(f"{name}: read {1 / r['load_s']:.0f} entries/s = {mb_s:.0f} MB/s of decoded fp16; "
              f"{r['valid']}/{min(200, n)} sampled entries valid")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-small", type=int, default=100_000)
    parser.add_argument("--small-shape", default="4,8,8")
    parser.add_argument("--n-real", type=int, default=1_000)
    parser.add_argument("--samples", type=int, default=2_000, help="keys looked up / read per measure")
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the temporary caches")
    parser.add_argument("--zarr-writes", action="store_true",
                        help="write the small per-image entries through zarr (slow)")
    args = parser.parse_args(argv)
    small = tuple(int(v) for v in args.small_shape.split(","))
    free = shutil.disk_usage(args.tmp or tempfile.gettempdir()).free / 1e9
    print(f"free disk in the temporary folder: {free:.0f} GB; CPUs: {os.cpu_count()}; "
          f"pack_entries={cache.EmbeddingCache.pack_entries}")
    for title, shape, n, fast in (("small", small, args.n_small, not args.zarr_writes),
                                  ("real-size", (256, 64, 64), args.n_real, False)):
        if n <= 0:
            continue
        entry_bytes = int(np.prod(shape)) * 2
        res = {}
        with tempfile.TemporaryDirectory(dir=args.tmp, prefix="cosmos-cache-layout-") as tmp:
            t_pack = _build_packs(Path(tmp) / "packs", shape, n)
            t_img = _build_per_image(Path(tmp) / "per-image", shape, n, fast=fast)
            print(f"\n[{title}] built {n} entries of {shape} fp16 ({entry_bytes} B raw) per layout: "
                  f"packs {t_pack:.1f} s, per-image {t_img:.1f} s"
                  + (" (file by file, not through zarr)" if fast else " (through zarr)"))
            for name in ("packs", "per-image"):
                res[name] = _measure(Path(tmp) / name, shape, n, args.samples)
        _report(f"[{title}] {n} entries, {args.samples} sampled keys, warm page cache", res, n, entry_bytes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
