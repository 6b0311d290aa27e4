"""Benchmark of the embedding cache and the image encoders (paper 3.4). Prints, never asserts.

Measures, on real images (cosmos-demo, built on first use, or ``--root``):

* bytes per embedding on disk, fp16 vs fp32 (goal: <= 2.1 MB for a 256 x 64 x 64 entry);
* cache load time vs encode time (goal: loading an entry costs <= 5 % of encoding it);
* encoder throughput (images/s) of LiteMedSAM (real weights) and SAM ViT-B (random weights:
  the speed of a network does not depend on its weights; its masks would be meaningless);
* how much fp16 storage changes the masks: mean DICE between box-prompt masks decoded from the
  fp16 and the fp32 entry of the same image, over the objects of the benchmarked images.

Run: ``.venv/bin/python benchmarks/embed_cache.py [--n-images 8] [--vit-b-images 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _entry_bytes(cache) -> list[int]:
    return [cache.stored_bytes(key) for key in cache.keys()]


def _pick_images(manifest, n: int):
    """n images spread over the tasks (round robin over tasks, largest objects first)."""
    by_task = {t: g.sort_values("area_px", ascending=False)["image_path"].drop_duplicates().tolist()
               for t, g in manifest.groupby("task", sort=True)}
    chosen: list[str] = []
    while len(chosen) < n and any(by_task.values()):
        for task in sorted(by_task):
            if by_task[task] and len(chosen) < n:
                chosen.append(by_task[task].pop(0))
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="COSMOS root (default cosmos-demo)")
    parser.add_argument("--n-images", type=int, default=8, help="images for LiteMedSAM and the cache")
    parser.add_argument("--vit-b-images", type=int, default=1, help="ViT-B encodes (0 skips)")
    parser.add_argument("--dice-max-objects", type=int, default=40,
                        help="objects decoded for the fp16/fp32 DICE (~1 s each on 2 CPU cores)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    import torch

    from cosmoslib import models
    from cosmoslib.data import indexer, readers
    from cosmoslib.data.dataset import resolve_root
    from cosmoslib.models.cache import EmbeddingCache, image_key
    from cosmoslib.protocol import metrics
    from cosmoslib.protocol.prompts import make_prompt

    root = resolve_root(args.root)  # None: cosmos-demo, built on first use
    manifest = indexer.index(root)
    rel_paths = _pick_images(manifest, args.n_images)
    images = [readers.read_image(root / p) for p in rel_paths]
    lite = models.load_model("litemedsam", device=args.device)
    print(f"device: {lite.device}; torch threads: {torch.get_num_threads()}; "
          f"images: {len(images)} from {root}")

    # --- encoder throughput, LiteMedSAM (real weights)
    lite.encode(images[:1])  # warm-up
    start = time.perf_counter()
    for img in images:
        lite.encode([img])
    t_lite = (time.perf_counter() - start) / len(images)
    start = time.perf_counter()
    lite.encode(images, batch_size=4)
    t_lite_b4 = (time.perf_counter() - start) / len(images)
    print(f"LiteMedSAM encoder (real weights, 256 px): {1 / t_lite:.2f} images/s "
          f"({t_lite * 1000:.0f} ms/image) batch 1; {1 / t_lite_b4:.2f} images/s batch 4")

    # --- the cache: size on disk, load time, fp16 vs fp32
    with tempfile.TemporaryDirectory() as tmp:
        caches = {dt: EmbeddingCache(tmp, lite, dtype=dt) for dt in ("float16", "float32")}
        paths_abs = [root / p for p in rel_paths]
        for dt, cache in caches.items():
            cache.ensure(paths_abs, progress=False)
        raw = int(np.prod(lite.embedding_shape))
        for dt, cache in caches.items():
            sizes = _entry_bytes(cache)
            itemsize = np.dtype(dt).itemsize
            print(f"bytes per embedding on disk, {dt}: mean {statistics.mean(sizes) / 1e6:.3f} MB "
                  f"(min {min(sizes) / 1e6:.3f}, max {max(sizes) / 1e6:.3f}; uncompressed "
                  f"{raw * itemsize / 1e6:.3f} MB)" + ("; goal <= 2.1 MB" if dt == "float16" else ""))
        keys = [image_key(img) for img in images]
        t_loads: dict[str, float] = {}
        for dt, cache in caches.items():
            cache.load(keys[0])
            start = time.perf_counter()
            for key in keys:
                cache.load(key)
            t_load = (time.perf_counter() - start) / len(keys)
            start = time.perf_counter()
            for p in paths_abs:
                cache.get(p)
            t_get = (time.perf_counter() - start) / len(keys)
            t_loads[dt] = t_load
            print(f"cache {dt}: load {t_load * 1000:.1f} ms/entry = {100 * t_load / t_lite:.2f} % "
                  f"of a LiteMedSAM encode; get(path) incl. PNG read + hash "
                  f"{t_get * 1000:.1f} ms = {100 * t_get / t_lite:.2f} % (goal <= 5 %)")

        # fp16 vs fp32 masks
        scores, n_obj = [], 0
        for rel, img, key in zip(rel_paths, images, keys):
            e16, e32 = caches["float16"].load(key), caches["float32"].load(key)
            rows = manifest[manifest["image_path"] == rel]
            label = readers.read_label(root / rows.iloc[0]["label_path"])
            for value in rows.nlargest(max(args.dice_max_objects - n_obj, 0), "area_px")["label_value"]:
                prompt = make_prompt(label == value, "S5")  # the tight GT box
                m16 = lite.decode(e16, prompt, img.shape[:2]).masks[0]
                m32 = lite.decode(e32, prompt, img.shape[:2]).masks[0]
                scores.append(metrics.dice(m16, m32) / 100.0)  # both empty: identical (1.0)
                n_obj += 1
        if scores:
            print(f"fp16 vs fp32 box-prompt masks (LiteMedSAM): mean DICE {100 * np.mean(scores):.3f} %"
                  f", min {100 * np.min(scores):.3f} %, identical masks {np.mean(np.array(scores) == 1):.0%}"
                  f", n = {len(scores)} objects in {len(images)} images")

    # --- ViT-B speed (random weights)
    if args.vit_b_images > 0:
        from segment_anything import sam_model_registry

        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            ckpt = Path(tmp) / "random_vit_b.pth"
            torch.save(sam_model_registry["vit_b"]().state_dict(), ckpt)
            vit_b = models.load_model("sam_vit_b", checkpoint=ckpt, device=args.device)
        n = min(args.vit_b_images, len(images))
        start = time.perf_counter()
        for img in images[:n]:
            vit_b.encode([img])
        t_vit = (time.perf_counter() - start) / n
        print(f"SAM ViT-B encoder (RANDOM weights: speed only, 1024 px): {1 / t_vit:.3f} images/s "
              f"({t_vit:.1f} s/image, {n} image(s), no warm-up); a cache load is "
              f"{100 * t_loads['float16'] / t_vit:.3f} % of it (fp16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
