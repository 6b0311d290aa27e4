"""Benchmark of the runner at scale (issue 12). Prints ratios measured side by side, never asserts.

``bookkeeping`` (default): the runner's per-image cost *besides encoding and decoding* as the
manifest grows, at 10 k, 100 k and 1 M synthetic manifest rows (5 objects per image, box prompts
S5). The model is a **trivial stand-in, not a network**: ``encode`` returns zeros, ``decode``
returns the prompt's box as the mask, and its embedding is 8 x 8 x 8 so the cache read stays
small; everything else is the real runner -- digests, prompt table (stored, reused by content),
shard planning, image/label reading, the embedding cache, matching, metrics, atomic shard
writes. Per image = (planning time of the whole manifest) / images + (time of ``run_unit`` over
the first ``--sample`` images) / sample. Flat means the ratio to the 10 k row stays near 1.

``dask``: images/s of LiteMedSAM (real weights, S5) on cosmos-demo (all 57 images, repeated
``--copies`` times under new ids for more work units) in one process, on ``local:1`` and on
``local:2`` (1 thread each), side by side, once from a filled embedding cache and once with the
encoder in the loop (fused, ``--no-cache``). The clusters are started and the model loaded on
every worker *before* the timed runs (start-up is printed apart). Scheduling overhead per task: from
Dask's task stream of the ``local:1`` run, the worker's idle time between the end of one task and the
start of the next (dispatch, serialisation, the scheduler's round trip), as a share of the mean task
time (the per-image work, at one image per task); the whole-run difference local:1 - single process
is printed beside it (it also holds per-run costs: registering the plugin, submitting, collecting
results, and the contention of the scheduler and client processes for the 2 cores). Then a
**projection** (not a measurement) for COSMOS 1050K on N workers from per-image costs measured
here: encode, decode per strategy, S1 (at 8x8, scaled to 32x32), the runner's bookkeeping (stand-in
model) and the scheduling overhead.

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
    from cosmoslib.protocol import evaluate, units as units_mod

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
            units, jobs, _, _ = units_mod.plan(man, [model], parts, ptable, 1)
            t_plan = time.perf_counter() - start
            settings = units_mod.RunSettings(root=root, strategies=("S5",), points_per_side=4,
                                             everything_kwargs=None, save_masks=None, cache_dir=work / "cache")
            caches: dict = {}
            units_mod.run_unit(units[0], [model], settings, caches=caches)  # warm: the cache entry
            start = time.perf_counter()
            for unit in units[1:sample + 1]:
                units_mod.run_unit(unit, [model], settings, caches=caches)
            t_eval = (time.perf_counter() - start) / sample
            per = t_plan / len(jobs) + t_eval
            base = base or per
            print(f"{n:>9} {len(jobs):>8} {1e3 * t_plan / len(jobs):>12.3f} {1e3 * t_eval:>12.3f} "
                  f"{1e3 * per:>13.3f} {per / base:>6.2f}", flush=True)
            del manifest, stored, man, ptable, units, jobs


COSMOS_IMAGES = 1_050_000   #: COSMOS 1050K (paper section 2)
COSMOS_MASKS = 6_000_000    #: "about 6 M masks" (issue 12; the paper: 1,050,000+ images, 6 M masks)
PAPER_STRATEGIES = ("S2", "S3", "S4", "S5", "S6")


def _replicated(manifest: pd.DataFrame, copies: int) -> pd.DataFrame:
    """``copies`` copies of the manifest under new image ids (same files): more work units for the
    same images, so the scheduling share is measured over enough units (embeddings are shared by
    content, so the cache holds each image once)."""
    parts = []
    for c in range(copies):
        part = manifest.copy()
        part["image_id"] = part["image_id"].astype(str) + (f"~{c}" if c else "")
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def dask_scaling(n_images: int, copies: int, objects: int, encode_copies: int = 1,
                 shard_size: int = 1) -> None:
    import torch
    from distributed import get_task_stream

    from cosmoslib import models, paths
    from cosmoslib.data import dataset, indexer
    from cosmoslib.data import demo as demo_mod
    from cosmoslib.protocol import distributed as cosmos_dask
    from cosmoslib.protocol import evaluate

    torch.set_num_threads(1)
    root = paths.demo_root()
    demo_mod.build_demo(out=root)
    full = indexer.index(root)
    if n_images:
        full = full[full["image_id"].isin(full["image_id"].drop_duplicates().head(n_images))]
    base = dataset.subsample(full, max_objects_per_image=objects, seed=0)
    manifest = _replicated(base, copies)
    n = manifest.groupby(["task", "image_id"]).ngroups
    n_obj = len(manifest)
    model = models.load_model("litemedsam", device="cpu", threads=1)
    print(f"LiteMedSAM on CPU, 1 torch thread per process; {base.groupby(['task', 'image_id']).ngroups} cosmos-demo images x "
          f"{copies} copies = {n} images, {n_obj} objects (<= {objects} per image), S5, {shard_size} "
          f"image(s) per shard (= per Dask task). Machine shared with other jobs: absolute times are under load, ratios are "
          f"side by side in one run.")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        settings = evaluate.EvalSettings(strategies=("S5",), cache_dir=cache, progress=False, shard_size=shard_size)
        evaluate.evaluate(base, root, [model], tmp / "warm.parquet", settings)  # fill the cache
        # start-up, measured apart: the cluster, then the first (tiny) run that loads the model
        client1, t_start1 = _timed(lambda: cosmos_dask.client_for("local:1", threads=1))
        client1.wait_for_workers(1)
        tiny = base[base["image_id"] == base["image_id"].iloc[0]]
        _, t_load1 = _timed(lambda: evaluate.evaluate(tiny, root, [model], tmp / "load1.parquet",
                                                      settings.replace(scheduler=client1)))
        client2, t_start2 = _timed(lambda: cosmos_dask.client_for("local:2", threads=1))
        client2.wait_for_workers(2)
        evaluate.evaluate(tiny, root, [model], tmp / "load2.parquet", settings.replace(scheduler=client2))
        print(f"start-up (not in the rates below): local:1 cluster {t_start1:.1f} s + first run with model "
              f"load {t_load1:.1f} s; local:2 cluster {t_start2:.1f} s", flush=True)
        times = {}
        # the encoder-in-the-loop run uses one copy (each unit costs an encode: enough units already)
        for label, cached, man in (("cached embeddings", True, manifest),
                                   ("encode included (--no-cache)", False, _replicated(base, encode_copies))):
            row = {}
            units = man.groupby(["task", "image_id"]).ngroups
            for name, sched in (("single process", None), ("local:1", client1), ("local:2", client2)):
                out = tmp / f"{name}-{cached}.parquet".replace(":", "").replace(" ", "_")
                run = lambda: evaluate.evaluate(man, root, [model], out,  # noqa: E731
                                                settings.replace(scheduler=sched, cache=cached))
                if sched is client1:
                    with get_task_stream(client=client1) as stream:
                        _, row[name] = _timed(run)
                    row["stream"] = stream.data
                else:
                    _, row[name] = _timed(run)
            times[label] = row
            _print_rates(label, row, units, shard_size)
        cosmos_dask.close(client1)
        cosmos_dask.close(client2)
    _projection(model, root, full, times, n, shard_size)


def _dispatch(stream: list) -> tuple[float, float, int]:
    """From Dask's task stream of a 1-worker run: (mean compute seconds per task, mean idle seconds of
    the worker between one task's end and the next one's start, tasks)."""
    spans = sorted((ss["start"], ss["stop"]) for task in stream if str(task["key"]).startswith("cosmos-shard")
                   for ss in task["startstops"] if ss["action"] == "compute")
    if len(spans) < 2:
        return float("nan"), float("nan"), len(spans)
    compute = sum(b - a for a, b in spans) / len(spans)
    gaps = [max(0.0, nxt[0] - prev[1]) for prev, nxt in zip(spans, spans[1:])]
    return compute, sum(gaps) / len(gaps), len(spans)


def _print_rates(label: str, row: dict, n: int, shard_size: int = 1) -> None:
    single = row["single process"]
    print(f"{label} ({n} images):")
    for name in ("single process", "local:1", "local:2"):
        t = row[name]
        print(f"  {name:>15}: {n / t:7.2f} images/s  {1e3 * t / n:8.1f} ms/image ({t / single:.2f} x single)")
    compute, gap, tasks = _dispatch(row.get("stream", []))
    print(f"  scheduling overhead per task (Dask's task stream, local:1, {tasks} tasks of {shard_size} image(s)): "
          f"worker idle between tasks {1e3 * gap:.1f} ms vs {1e3 * compute:.1f} ms of work per task = "
          f"{100 * gap / compute:.1f} % of the per-image work")
    whole = (row["local:1"] - single) / n
    print(f"  whole run local:1 vs single process (also the per-run costs: plugin registration, submission, "
          f"collecting results): {1e3 * whole:+.1f} ms/image = {100 * whole / (single / n):+.1f} %, i.e. "
          f"{row['local:1'] - single - (gap * tasks if tasks else 0):+.1f} s per run besides the per-task idle time")
    print(f"  2 workers vs 1 worker: {row['local:1'] / row['local:2']:.2f} x images/s "
          f"(2 cores, shared with the scheduler and this process)", flush=True)


def _projection(model, root, full: pd.DataFrame, times: dict, n_units: int, shard_size: int = 1) -> None:
    """Per-image costs measured here -> COSMOS 1050K on N workers (a projection, not a measurement)."""
    from cosmoslib.data import dataset
    from cosmoslib.protocol import evaluate

    sample = dataset.subsample(full, max_images_per_task=1, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        res, _ = evaluate.evaluate(sample, root, [model], tmp / "r.parquet", strategies=list(PAPER_STRATEGIES),
                                   cache_dir=tmp / "cache", cache=False, progress=False)
        s1, _ = evaluate.evaluate(sample.head(3), root, [model], tmp / "s1.parquet", strategies=["S1"],
                                  points_per_side=8, cache_dir=tmp / "cache", cache=False, progress=False)
    first = res[res["selection_rule"] == "oracle_dice"]
    encode = float(first.drop_duplicates(["task", "image_id"])["t_embed_s"].mean())
    decode = first.groupby("strategy")["t_decode_s"].mean()
    s1_8 = float(s1.drop_duplicates(["task", "image_id"])["t_decode_s"].mean())
    s1_32 = s1_8 * (32 * 32) / (8 * 8)
    single = times["cached embeddings"]["single process"] / n_units
    _, gap, _ = _dispatch(times["cached embeddings"].get("stream", []))
    overhead = gap / shard_size if gap == gap else 0.0  # a task is a shard of shard_size images
    bookkeeping = _bookkeeping_per_image()
    per_object = float(decode.sum())
    objects_per_image = COSMOS_MASKS / COSMOS_IMAGES
    per_image = encode + s1_32 + objects_per_image * per_object + bookkeeping + overhead
    print(f"\nPer-image costs measured here (LiteMedSAM, CPU, 1 thread, under load; "
          f"{sample.groupby(['task', 'image_id']).ngroups} images for S2-S6, "
          f"{s1.groupby(['task', 'image_id']).ngroups} for S1):")
    print(f"  encode {encode:.3f} s/image; decode per object " +
          ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in decode.items()) +
          f" (sum {1e3 * per_object:.0f} ms; both selection rules share one decode)")
    print(f"  S1 {s1_8:.2f} s/image at 8x8, {s1_32:.1f} s/image at the paper's 32x32 (x16 points, assumed linear)")
    print(f"  bookkeeping (stand-in model) {1e3 * bookkeeping:.1f} ms/image; Dask scheduling "
          f"{1e3 * overhead:.1f} ms/image (measured at {shard_size} image(s) per task; larger shards divide it)")
    print(f"  => {per_image:.1f} s per image with S1-S6 at {objects_per_image:.2f} objects/image "
          f"(cached single process on the demo S5 run: {1e3 * single:.0f} ms/image)")
    no_s1 = per_image - s1_32
    print(f"\nProjection for COSMOS 1050K ({COSMOS_IMAGES:,} images, {COSMOS_MASKS:,} masks), LiteMedSAM at "
          f"these CPU rates, one 1-thread worker per core, perfect scaling assumed (measured 2-worker "
          f"ratio above), no I/O limit, encode once (cached or fused alike):")
    print(f"  {'workers':>8} {'S1-S6 days':>11} {'S2-S6 days':>11} {'encode only h':>14}")
    for w in (1, 8, 64, 512):
        print(f"  {w:>8} {COSMOS_IMAGES * per_image / w / 86400:>11.1f} {COSMOS_IMAGES * no_s1 / w / 86400:>11.1f} "
              f"{COSMOS_IMAGES * encode / w / 3600:>14.1f}")
    print("  GPUs: not measured here (no GPU in this run); scale the encode column by the GPU/CPU encode "
          "ratio of benchmarks/encode.py on the target GPU. The paper's ViT-B rate on an RTX 3090 gives "
          "about 37 h of encoding on one GPU (issue 12), i.e. 37/N h on N GPUs.")


def _bookkeeping_per_image(sample: int = 100) -> float:
    """Seconds per image of the runner besides encode/decode (stand-in model, 10 k rows)."""
    from cosmoslib.protocol import evaluate, units as units_mod

    model = StandIn()
    with tempfile.TemporaryDirectory() as tmp:
        root, image_path, label_path = _synthetic_root(Path(tmp) / "root")
        manifest = _manifest(5 * (sample + 1), image_path, label_path, root)
        out = Path(tmp) / "run" / "results.parquet"
        out.parent.mkdir()
        _prompts(manifest, root, seed=0).to_parquet(out.with_name("prompts.parquet"), index=False)
        man = evaluate.with_digests(manifest, root)
        ptable = evaluate.prompt_table(man, root, 0, out.with_name("prompts.parquet"))
        units, _, _, _ = units_mod.plan(man, [model], out.with_name("parts"), ptable, 1)
        settings = units_mod.RunSettings(root=root, strategies=("S5",), points_per_side=4, everything_kwargs=None,
                                         save_masks=None, cache_dir=Path(tmp) / "cache")
        caches: dict = {}
        units_mod.run_unit(units[0], [model], settings, caches=caches)
        start = time.perf_counter()
        for unit in units[1:sample + 1]:
            units_mod.run_unit(unit, [model], settings, caches=caches)
        return (time.perf_counter() - start) / sample


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="bookkeeping", choices=["bookkeeping", "dask"])
    parser.add_argument("--rows", default="10000,100000,1000000")
    parser.add_argument("--sample", type=int, default=200)
    parser.add_argument("--images", type=int, default=0, help="demo images (0: all 57)")
    parser.add_argument("--copies", type=int, default=4, help="copies of the manifest (more work units)")
    parser.add_argument("--objects", type=int, default=2, help="objects per image")
    parser.add_argument("--encode-copies", type=int, default=1, help="copies for the run with the encoder")
    parser.add_argument("--shard-size", type=int, default=1,
                        help="images per result shard and per Dask task (as cosmos evaluate --shard-size)")
    args = parser.parse_args(argv)
    if args.what == "bookkeeping":
        bookkeeping([int(v) for v in args.rows.split(",")], args.sample)
    else:
        dask_scaling(args.images, args.copies, args.objects, args.encode_copies, args.shard_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
