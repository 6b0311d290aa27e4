"""Encoder throughput, side by side in one run (issue 14). Prints ratios, never asserts.

For each model (SAM ViT-B with random weights -- the speed of a network does not depend on
its weights, its embeddings would be meaningless -- and LiteMedSAM with its real weights),
on the same images, interleaved over repeats, three paths each produce and store one fp32
or fp16 embedding per image:

(a) ``authors``: stock ``SamPredictor.set_image`` then ``np.savez_compressed`` of the fp32
    embedding per image -- the authors' released way;
(b) ``stock``: the project's path before issue 14 -- ``EmbeddingCache.ensure`` (read,
    preprocess, encode, write an fp16 zarr entry) with ``fast_encoder=False``;
(c) ``fast``: the same with ``fast_encoder=True`` (:mod:`cosmoslib.models.fast_encoder`);
(d) ``onnxruntime`` and (e) ``openvino``: the same with the encoder run by that runtime
    (``load_model(..., backend=...)``, :mod:`cosmoslib.models.backends`; float32). The export is done
    once before the timed repeats, into a temporary folder, and reported on its own line
    (seconds, peak memory); a runtime that is not installed is left out, and said so. Each
    export then goes through ``backend="auto"``'s parity probe
    (:func:`cosmoslib.models.backend_probe.probe`: embeddings and decoded masks vs torch on
    fixed images), printed beside it -- for ViT-B the full-size runtime parity check
    (``--no-probe`` skips it; the suite tests a shrunk ViT).

Default (quick): LiteMedSAM rows (a)-(e), ViT-B rows (a)-(c). ViT-B's runtime rows (an
export of ~2 min and several GB of memory, see the issue-14 note) are added by
``--repeats 3`` or more, or by ``--vit-b-backends``; ``--no-vit-b-backends`` leaves them out.
Each ViT-B runtime session holds 8-10 GB while the run lasts: on a machine with 24 GB, time one
runtime per run (``--models vit_b --backends openvino``, then ``--backends onnxruntime``); both
at once were killed for memory there, before printing anything.

SAM 2 (``--models sam2.1_hiera_t`` or any SAM 2 name; random weights, speed only) gets two rows:
(a) ``authors``: ``SAM2ImagePredictor.set_image`` then ``np.savez_compressed`` of its three
feature arrays (fp32) per image, and (b) ``cache``: ``EmbeddingCache.ensure`` (one packed fp16
entry of the embedding and both high-resolution levels); plus the bytes one cache entry takes
on disk (how well random-weight features compress says little about trained ones -- from 0.03 to
6 MiB on different images: the uncompressed fp16 size, 8 MiB at 1024 px, is the figure to plan with).

Each path reads the images from disk itself. Reported per model and path: images/s (total
images / total wall seconds over the repeats), seconds per image, ratio to (a) and to (b),
and peak resident memory above the process's level before the path started (sampled every
10 ms from /proc; "n/a" where /proc is missing). Every path gets a fresh output folder, so
nothing is reused from a cache.

Run: ``.venv/bin/python benchmarks/encode.py [--n-images 3] [--repeats 1] [--threads 2]
[--models vit_b,litemedsam] [--backends onnxruntime,openvino]``; the complete run is
``--repeats 3``. On a shared machine the absolute figures move with the load;
the ratios of paths measured in the same run are the figure of merit.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

PATHS = ("authors", "stock", "fast")
#: Optional runtime rows (d), (e): cosmoslib.models.backends names.
RUNTIMES = ("onnxruntime", "openvino")


class PeakRSS:
    """Peak resident set size (bytes) above the level at entry, sampled in a thread."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak = None

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self):
        self.base = self._rss()
        self._max = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if self.base is not None:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._rss()
            if rss is not None and rss > self._max:
                self._max = rss
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        if self.base is not None:
            self._thread.join()
            self.peak = self._max - self.base


def _pick_images(root, n: int) -> list[Path]:
    """n distinct images spread over the tasks: the cache benchmark's choice (same images)."""
    from embed_cache import (
        _pick_images as pick,  # benchmarks/ is on sys.path when run as a script
    )

    from cosmoslib.data import indexer

    return [Path(root) / p for p in pick(indexer.index(root), n)]


def _vit_b_random(device):
    """SAM ViT-B with random weights behind the project's model class (speed only)."""
    import torch

    from cosmoslib import models
    from cosmoslib.models import checkpoints

    torch.manual_seed(0)
    sam = checkpoints._build_sam("vit_b").to(device).eval()
    return models.SamFamilyModel(
        name="sam_vit_b_random", arch="vit_b", sam=sam, checkpoint_path=Path("random-init"),
        checkpoint_sha256="0" * 64, device=torch.device(device), supports_points=True,
        default_multimask=True)


def _run_authors(model, paths: list[Path], out: Path) -> None:
    from segment_anything import SamPredictor

    from cosmoslib.data import readers

    model.fast_encoder = False
    model._sync_encoder()  # stock forwards on sam.image_encoder
    predictor = SamPredictor(model.sam)
    for i, path in enumerate(paths):
        img = readers.read_image(path)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        predictor.set_image(img)
        emb = predictor.get_image_embedding().cpu().numpy().astype(np.float32)
        np.savez_compressed(out / f"{i:05d}.npz", embedding=emb)


def _runtime_model(model, backend: str, exports: Path):
    """A copy of ``model`` (same torch modules) whose encoder runs on ``backend``, exported
    into ``exports``; (model, export seconds, export peak RSS bytes or None)."""
    import dataclasses

    # dataclasses.replace builds a new model, whose __post_init__ exports and opens the session
    # (SamFamilyModel._sync_encoder): that is the export timed here, made into ``exports`` (the
    # exports folder is read from $COSMOS_EXPORTS when the export runs). Exporting first and
    # then calling load_encoder exported twice, once outside the timing.
    previous = os.environ.get("COSMOS_EXPORTS")
    os.environ["COSMOS_EXPORTS"] = str(exports)
    try:
        with PeakRSS() as mem:
            start = time.perf_counter()
            runtime = dataclasses.replace(model, backend=backend)
            seconds = time.perf_counter() - start
    finally:
        if previous is None:
            os.environ.pop("COSMOS_EXPORTS", None)
        else:
            os.environ["COSMOS_EXPORTS"] = previous
    if runtime._exported is None or Path(runtime._exported.path).parent.parent != Path(exports):
        raise RuntimeError(f"{backend} export of {model.name} not made in {exports}")
    return runtime, seconds, mem.peak


def _run_cache(model, paths: list[Path], out: Path, fast: bool, batch_size: int) -> None:
    from cosmoslib.models.cache import EmbeddingCache

    model.fast_encoder = fast
    cache = EmbeddingCache(out, model, dtype="float16", batch_size=batch_size)
    report = cache.ensure(paths, progress=False)
    if report.n_computed != len({p for p in paths}) or report.failures:
        raise RuntimeError(f"benchmark run incomplete: {report.summary()}")


def _sam2_random(name: str, device, folder: Path):
    """A SAM 2 registry model with random weights (a temporary checkpoint; speed only)."""
    from cosmoslib import models
    from cosmoslib.models import sam2

    path = sam2.random_checkpoint(models.registered_models()[name].arch, folder / "random.pt")
    return models.load_model(name, checkpoint=path, device=device)


def _run_sam2_authors(model, paths: list[Path], out: Path) -> None:
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from cosmoslib.data import readers

    predictor = SAM2ImagePredictor(model.sam)
    for i, path in enumerate(paths):
        img = readers.read_image(path)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        predictor.set_image(img)
        feats = predictor._features
        np.savez_compressed(out / f"{i:05d}.npz", image_embed=feats["image_embed"].cpu().numpy(),
                            **{f"high_res_{k}": f.cpu().numpy() for k, f in enumerate(feats["high_res_feats"])})


def _sam2_rows(name: str, args, paths: list[Path]) -> None:
    """Rows (a) authors and (b) cache of one SAM 2 model, and the cache bytes per entry."""
    import warnings

    from cosmoslib.data import readers
    from cosmoslib.models import cache as cache_mod

    with tempfile.TemporaryDirectory(prefix="cosmos-sam2-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script inside SAM2Transforms
        model = _sam2_random(name, args.device, Path(tmp))
        model.encode([readers.read_image(paths[0])])  # warm-up
        seconds, peaks, entry_bytes = {"authors": 0.0, "cache": 0.0}, {"authors": 0, "cache": 0}, []
        for rep in range(args.repeats):
            for path_name in (("authors", "cache") if rep % 2 == 0 else ("cache", "authors")):
                with tempfile.TemporaryDirectory(prefix="cosmos-bench-") as out, PeakRSS() as mem:
                    start = time.perf_counter()
                    if path_name == "authors":
                        _run_sam2_authors(model, paths, Path(out))
                    else:
                        _run_cache(model, paths, Path(out), True, args.batch_size)
                    seconds[path_name] += time.perf_counter() - start
                    if path_name == "cache":
                        cache = cache_mod.EmbeddingCache(Path(out), model)
                        entry_bytes += [cache.stored_bytes(k) for k in cache.keys()]
                if mem.peak is not None:
                    peaks[path_name] = max(peaks[path_name], mem.peak)
    n = len(paths) * args.repeats
    raw = int(np.prod(model.embedding_shape)) * 2
    print(f"\n{name} (random weights: speed only), input {model.input_size} px")
    print(f"  {'path':<11} {'images/s':>9} {'s/image':>8} {'vs (a)':>7} {'peak RSS +MB':>13}")
    for p in ("authors", "cache"):
        print(f"  {p:<11} {n / seconds[p]:9.3f} {seconds[p] / n:8.2f} {seconds['authors'] / seconds[p]:6.2f}x "
              f"{peaks[p] / 2**20:13.0f}")
    print(f"  cache entry: {model.embedding_shape} fp16 = {raw / 2**20:.1f} MiB uncompressed; "
          f"on disk {np.mean(entry_bytes) / 2**20:.2f} MiB mean (random weights: compression not representative)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="COSMOS root (default cosmos-demo)")
    parser.add_argument("--n-images", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--models", default="vit_b,litemedsam",
                        help="comma-separated: vit_b (random weights), litemedsam, SAM 2 names such as "
                             "sam2.1_hiera_t (random weights)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="images per encoder call on the cache paths (b) and (c)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", default=",".join(RUNTIMES),
                        help="runtime rows (d), (e): comma-separated cosmoslib.models.backends names "
                             "('' for none); CPU only")
    parser.add_argument("--vit-b-backends", action=argparse.BooleanOptionalAction, default=None,
                        help="runtime rows for ViT-B too (default: with --repeats >= 3)")
    parser.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                        help="run backend auto's parity probe on each export (embeddings and "
                             "decoded masks vs torch; the full-size ViT-B runtime parity check)")
    args = parser.parse_args(argv)

    import torch

    from cosmoslib import models
    from cosmoslib.data.dataset import resolve_root
    from cosmoslib.models import backends

    if args.threads is not None:
        models.set_threads(args.threads)
    root = resolve_root(args.root)
    paths = _pick_images(root, args.n_images)
    print(f"device {args.device}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{len(paths)} images from {root}; {args.repeats} repeat(s), paths interleaved; "
          f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    runtimes = []
    for backend in wanted:
        backend = backends.check_backend(backend)
        if backend == "torch":
            continue
        if args.device != "cpu":
            print(f"runtime {backend}: left out (CPU only, device {args.device})")
        elif not backends.backend_available(backend):
            print(f"runtime {backend}: left out (package not installed: {backends.INSTALL_HINT})")
        else:
            runtimes.append(backend)
    vit_b_runtimes = args.vit_b_backends if args.vit_b_backends is not None else args.repeats >= 3
    print("runtimes: " + (", ".join(f"{b} {backends.backend_version(b)}" for b in runtimes)
                          or "none") + ("" if vit_b_runtimes else " (LiteMedSAM only)"))

    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name != "vit_b" and name in models.registered_models() and \
                models.registry.family(models.registered_models()[name].arch) == "sam2":
            _sam2_rows(name, args, paths)
            continue
        if name == "vit_b":
            model = _vit_b_random(args.device)
            label = "SAM ViT-B (random weights: speed only)"
        else:
            model = models.load_model(name, device=args.device)
            label = f"{name} (real weights)"
        these = runtimes if (name != "vit_b" or vit_b_runtimes) else []
        rows = PATHS + tuple(these)
        exports_tmp = tempfile.TemporaryDirectory(prefix="cosmos-exports-")
        runtime_models, export_notes = {}, []
        for backend in these:
            runtime_models[backend], sec, peak = _runtime_model(model, backend,
                                                                Path(exports_tmp.name))
            export_notes.append(f"  export {backend}: {sec:.1f} s, peak RSS +"
                                + ("n/a" if peak is None else f"{peak / 2**20:.0f} MB"))
            if args.probe:  # full-size runtime parity: backend auto's probe on this export
                from cosmoslib.models import backend_probe

                result = backend_probe.probe(model, backend, Path(exports_tmp.name))
                export_notes.append(f"  parity {result.line()}")
        # warm-up of both encoder paths (first-call allocations, oneDNN kernel selection)
        from cosmoslib.data import readers

        warm = readers.read_image(paths[0])
        for fast in (False, True):
            model.fast_encoder = fast
            model.encode([warm])
        for runtime in runtime_models.values():
            runtime.encode([warm])
        seconds = {p: 0.0 for p in rows}
        peaks = {p: 0 for p in rows}
        for rep in range(args.repeats):
            k = rep % len(rows)
            order = rows[k:] + rows[:k]  # rotate who goes first
            for path_name in order:
                with tempfile.TemporaryDirectory(prefix="cosmos-bench-") as tmp, PeakRSS() as mem:
                    start = time.perf_counter()
                    if path_name == "authors":
                        _run_authors(model, paths, Path(tmp))
                    elif path_name in runtime_models:
                        _run_cache(runtime_models[path_name], paths, Path(tmp), True,
                                   args.batch_size)
                    else:
                        _run_cache(model, paths, Path(tmp), path_name == "fast", args.batch_size)
                    seconds[path_name] += time.perf_counter() - start
                if mem.peak is not None:
                    peaks[path_name] = max(peaks[path_name], mem.peak)
        n = len(paths) * args.repeats
        print(f"\n{label}, input {model.input_size} px")
        print(f"  {'path':<11} {'images/s':>9} {'s/image':>8} {'vs (a)':>7} {'vs (b)':>7} "
              f"{'vs (c)':>7} {'peak RSS +MB':>13}")
        for p in rows:
            rate = n / seconds[p]
            print(f"  {p:<11} {rate:9.3f} {seconds[p] / n:8.2f} "
                  f"{seconds['authors'] / seconds[p]:6.2f}x {seconds['stock'] / seconds[p]:6.2f}x "
                  f"{seconds['fast'] / seconds[p]:6.2f}x {peaks[p] / 2**20:13.0f}")
        print("\n".join(export_notes))
        model.fast_encoder = True
        del model, runtime_models
        exports_tmp.cleanup()
    print("\n(a) authors: SamPredictor.set_image + np.savez_compressed (fp32), stock encoder; "
          "(b) stock: EmbeddingCache.ensure, fast_encoder=False; (c) fast: fast_encoder=True; "
          "(d), (e): the same with the encoder on that runtime (float32, exported beforehand). "
          "SAM 2: (a) SAM2ImagePredictor.set_image + np.savez_compressed of its 3 feature arrays, "
          "(b) cache: EmbeddingCache.ensure, one packed fp16 entry. "
          "Ratios are of wall seconds measured in this run.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
