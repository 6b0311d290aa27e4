"""Benchmark of the runner at scale (issue 12). Prints ratios measured side by side, never asserts.

``bookkeeping`` (default): the runner's per-image cost *besides encoding and decoding* as the
manifest grows, at 10 k, 100 k and 1 M synthetic manifest rows (5 objects per image, box prompts
S5). The model is a **trivial stand-in, not a network**: ``encode`` returns zeros, ``decode``
returns the prompt's box as the mask, and its embedding is 8 x 8 x 8 so the cache read stays
small; everything else is the real runner -- digests, prompt table (stored, reused by content),
shard planning, image/label reading, the embedding cache, matching, metrics, atomic shard
writes. Per image = (planning time of the whole manifest) / images + (time of ``run_unit`` over
the first ``--sample`` images) / sample. Flat means the ratio to the 10 k row stays near 1.

``dask``: images/s of LiteMedSAM (real weights, S5, a filled embedding cache) on cosmos-demo in
one process, on ``local:1`` and on ``local:2`` (1 thread each), side by side; scheduling
overhead per image = (local:1 time - single-process time) / images, as a share of the per-image
work; and a projection for COSMOS 1050K from the measured per-image costs.

Run: ``.venv/bin/python benchmarks/scale.py [bookkeeping|dask] [--rows 10000,100000,1000000]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

OBJECTS_PER_IMAGE = 5
SIDE = 32


@dataclass
class _Decoded:
    masks: np.ndarray
    iou_pred: np.ndarray


class StandIn:
    """A trivial model stand-in (no network): zeros as embedding, the box as the mask."""

    name = arch = "standin"
    signature = {"arch": "standin", "note": "benchmark stand-in, not a model"}
    signature_hash = "0" * 16
    embedding_shape = (8, 8, 8)
    supports_points = False

    def encode(self, images, batch_size=None):
        return np.zeros((len(images), *self.embedding_shape), np.float32)

    def resized_size(self, size):
        return tuple(size)

    def prepare(self, embedding):
        return embedding

    def decode(self, prepared, prompt, size):
        mask = np.zeros(size, bool)
        x0, y0, x1, y1 = (int(round(v)) for v in prompt.box)
        mask[y0:y1 + 1, x0:x1 + 1] = True
        return _Decoded(masks=mask[None], iou_pred=np.array([0.9], np.float32))


def _synthetic_root(folder: Path) -> tuple[Path, str, str]:
    """One 32x32 image and a label with 5 square objects; every manifest row points at them."""
    from cosmoslib.data import readers

    task = folder / "synthetic" / "images"
    task.mkdir(parents=True)
    (folder / "synthetic" / "labels").mkdir()
    rng = np.random.default_rng(0)
    (task / "img.png").write_bytes(readers.encode_png(rng.integers(0, 255, (SIDE, SIDE), dtype=np.uint8)))
    label = np.zeros((SIDE, SIDE), np.uint8)
    for v in range(1, OBJECTS_PER_IMAGE + 1):
        label[(v - 1) * 6 + 1:(v - 1) * 6 + 5, 4 + v:12 + v] = v
    (folder / "synthetic" / "labels" / "img.png").write_bytes(readers.encode_png(label))
    return folder, "synthetic/images/img.png", "synthetic/labels/img.png"


def _manifest(n_rows: int, image_path: str, label_path: str, root: Path) -> pd.DataFrame:
    from cosmoslib.files import file_digest

    n_images = n_rows // OBJECTS_PER_IMAGE
    ids = np.repeat([f"img{i:07d}" for i in range(n_images)], OBJECTS_PER_IMAGE)
    values = np.tile(np.arange(1, OBJECTS_PER_IMAGE + 1), n_images)
    return pd.DataFrame({
        "task": "synthetic", "image_id": ids, "label_value": values, "object": [f"obj{v}" for v in values],
        "modality": "CT", "image_path": image_path, "label_path": label_path,
        "image_sha": file_digest(root / image_path), "label_sha": file_digest(root / label_path)})


def _prompts(manifest: pd.DataFrame, root: Path, seed: int) -> pd.DataFrame:
    """The prompt table (S2-S6) of the synthetic manifest: one label, so computed once and repeated
    per image (what :func:`cosmoslib.protocol.prompts.make_prompt_table` would give, much faster)."""
    from cosmoslib.protocol import prompts

    one = manifest[manifest["image_id"] == manifest["image_id"].iloc[0]]
    base = prompts.make_prompt_table(one, root, seed=seed)
    n_images = len(manifest) // OBJECTS_PER_IMAGE
    table = pd.concat([base] * n_images, ignore_index=True)
    table["image_id"] = np.repeat(manifest["image_id"].unique(), len(base)).astype(str)
    table["label_sha"] = manifest["label_sha"].iloc[0]
    return table


def bookkeeping(rows: list[int], sample: int) -> None:
    from cosmoslib.protocol import evaluate

    model = StandIn()
    print(f"Per-image bookkeeping (trivial model stand-in, not a network; {OBJECTS_PER_IMAGE} objects "
          f"per image, strategy S5, {sample} images evaluated per size)")
    print(f"{'rows':>9} {'images':>8} {'plan ms/img':>12} {'eval ms/img':>12} {'total ms/img':>13} {'ratio':>6}")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        root, image_path, label_path = _synthetic_root(Path(tmp) / "root")
        for n in rows:
            work = Path(tmp) / f"run{n}"
            out = work / "results.parquet"
            manifest = _manifest(n, image_path, label_path, root)
            stored = _prompts(manifest, root, seed=0)
            work.mkdir(parents=True)
            stored.to_parquet(out.with_name("prompts.parquet"), index=False)
            start = time.perf_counter()
            man = evaluate.with_digests(manifest, root)
            ptable = evaluate.prompt_table(man, root, 0, out.with_name("prompts.parquet"))
            parts = out.with_name(out.name + ".parts") / "bench"
            units, jobs, _, _ = evaluate.plan(man, [model], parts, ptable, 1)
            t_plan = time.perf_counter() - start
            settings = evaluate.RunSettings(root=root, strategies=("S5",), points_per_side=4,
                                            everything_kwargs=None, save_masks=None, cache_dir=work / "cache")
            caches: dict = {}
            evaluate.run_unit(units[0], [model], settings, caches=caches)  # warm: the cache entry
            start = time.perf_counter()
            for unit in units[1:sample + 1]:
                evaluate.run_unit(unit, [model], settings, caches=caches)
            t_eval = (time.perf_counter() - start) / sample
            per = t_plan / len(jobs) + t_eval
            base = base or per
            print(f"{n:>9} {len(jobs):>8} {1e3 * t_plan / len(jobs):>12.3f} {1e3 * t_eval:>12.3f} "
                  f"{1e3 * per:>13.3f} {per / base:>6.2f}", flush=True)
            del manifest, stored, man, ptable, units, jobs


def dask_scaling(n_images: int) -> None:
    import torch

    from cosmoslib import models, paths
    from cosmoslib.data import dataset
    from cosmoslib.protocol import evaluate
    from cosmoslib.data import indexer
    from cosmoslib.data import demo as demo_mod

    torch.set_num_threads(1)
    root = paths.demo_root()
    demo_mod.build_demo(out=root)
    manifest = indexer.index(root)
    manifest = manifest[manifest["image_id"].isin(manifest["image_id"].drop_duplicates().head(n_images))]
    manifest = dataset.subsample(manifest, max_objects_per_image=2, seed=0)
    model = models.load_model("litemedsam", device="cpu", threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        kw = dict(strategies=["S5"], cache_dir=cache, progress=False)
        evaluate.evaluate(manifest, root, [model], Path(tmp) / "warm.parquet", **kw)  # fill the cache
        times = {}
        for name, sched in (("single process", None), ("local:1", "local:1"), ("local:2", "local:2")):
            start = time.perf_counter()
            evaluate.evaluate(manifest, root, [model], Path(tmp) / f"{name}.parquet".replace(":", ""),
                              scheduler=sched, **kw)
            times[name] = time.perf_counter() - start
        n = manifest.groupby(["task", "image_id"]).ngroups
    single = times["single process"]
    print(f"LiteMedSAM, S5, {n} images (embeddings cached), 1 torch thread per process; wall time "
          f"includes starting the cluster and loading the model on each worker")
    for name, t in times.items():
        print(f"  {name:>15}: {n / t:6.2f} images/s ({t / single:.2f} x single-process time)")
    print(f"  2 workers vs 1 worker: {times['local:1'] / times['local:2']:.2f} x images/s")
    overhead = (times["local:1"] - single) / n
    print(f"  scheduling overhead (incl. cluster start): {1e3 * overhead:.1f} ms/image = "
          f"{100 * overhead / (single / n):.0f} % of the per-image work")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="bookkeeping", choices=["bookkeeping", "dask"])
    parser.add_argument("--rows", default="10000,100000,1000000")
    parser.add_argument("--sample", type=int, default=200)
    parser.add_argument("--images", type=int, default=12)
    args = parser.parse_args(argv)
    if args.what == "bookkeeping":
        bookkeeping([int(v) for v in args.rows.split(",")], args.sample)
    else:
        dask_scaling(args.images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
