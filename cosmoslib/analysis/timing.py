"""Inference time (paper sections 3.4 and 4.6, Table 4): where it goes and what reuse saves."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cosmoslib.models import cache as cache_mod
from cosmoslib.models import load_model


def device_description() -> str:
    """The compute device in words, e.g. ``"CPU: AMD EPYC 7B13 (2 threads), torch 2.14.1"``."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return f"GPU: {name}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {cpu} ({torch.get_num_threads()} threads), torch {torch.__version__}"


def reuse_speedup(row: pd.Series) -> float:
    """Speed-up of encoding once and reusing the embedding for every strategy (paper 3.4).

    Parameters
    ----------
    row : Series
        One model's row of :func:`cosmoslib.analysis.summaries.timing_table`: ``embedding`` seconds and
        one column per strategy (seconds of prompt + decode; S1 per image).

    Returns
    -------
    float
        ``sum_s (embed + t_s) / (embed + sum_s t_s)`` over the strategies present: the time of
        re-encoding the image for each strategy (SAM's original logic) over the time with one
        cached embedding. Tends to *n* (the number of strategies) when encoding dominates.
    """
    strategies = [c for c in row.index if c != "embedding" and pd.notna(row[c])]
    embed = float(row["embedding"])
    decode = sum(float(row[s]) for s in strategies)
    return (len(strategies) * embed + decode) / (embed + decode)


#: Images of COSMOS 1050K (paper section 2).
COSMOS_IMAGES = 1_050_000


def embedding_disk_bytes(model, cache_dir=None, dtype: str = "float16") -> tuple[float, int, bool]:
    """Bytes on disk per stored embedding of ``model`` in the embedding cache, measured.

    Parameters
    ----------
    model : SamFamilyModel
    cache_dir : the cache folder (default :func:`cosmoslib.paths.embedding_cache_dir`).
    dtype : stored precision (the cache's default fp16).

    Returns
    -------
    (float, int, bool)
        Mean bytes per entry (every file of the model's store, metadata and indexes included,
        divided by its entries), the number of entries, and whether it was measured. With no
        entry stored yet the raw array size (``embedding_shape`` x item size, no compression)
        is returned with ``False``.
    """
    cache = cache_mod.EmbeddingCache(cache_dir, model, dtype=dtype)
    n = len(cache)
    if n == 0:
        return float(np.prod(model.embedding_shape) * np.dtype(dtype).itemsize), 0, False
    total = sum(p.stat().st_size for p in Path(cache.store).rglob("*") if p.is_file())
    return total / n, n, True


def fused_tradeoff(encode_s: float, bytes_per_embedding: float, n_images: int = COSMOS_IMAGES) -> pd.Series:
    """Disk versus compute of keeping embeddings (cached) or not (fused, ``--no-cache``).

    Parameters
    ----------
    encode_s : encoder seconds per image (measured, e.g. Table 4's ``embedding``).
    bytes_per_embedding : bytes on disk per embedding (:func:`embedding_disk_bytes`).
    n_images : images of the study (default COSMOS 1050K).

    Returns
    -------
    Series
        ``disk_tb`` (terabytes, 1e12 bytes, the cache of all images), ``encode_hours`` (one
        encoder pass over all images on this device, one process), ``mb_per_embedding`` and
        ``gb_per_encode_hour`` (disk a cached run keeps per hour of encoding it saves every
        later run). The cached path pays ``disk_tb`` once and ``encode_hours`` once; the
        fused path keeps no disk and pays ``encode_hours`` in every run.
    """
    disk = float(bytes_per_embedding) * n_images
    hours = float(encode_s) * n_images / 3600.0
    return pd.Series({"n_images": n_images, "mb_per_embedding": bytes_per_embedding / 1e6,
                      "encode_s": float(encode_s), "disk_tb": disk / 1e12, "encode_hours": hours,
                      "gb_per_encode_hour": disk / 1e9 / hours if hours > 0 else float("nan")})


def reference_encode_seconds(image: np.ndarray | None = None, repeats: int = 3) -> float:
    """The day's speed reference: seconds of one stock LiteMedSAM encoder pass on ``image``.

    The machine's speed varies (about 2x from day to day on shared 2-core CPUs), so a book time
    means little without a figure of the same day: this one is the authors' LiteMedSAM image
    encoder as shipped (``segment_anything``-style module, fp32 torch, no fast path, no runtime),
    on the CPU with the process's torch threads, after one warm-up pass.

    Parameters
    ----------
    image : uint8 array (H, W) or (H, W, 3); default a seeded random 256 x 256 grey image (the
        encoder's cost does not depend on the content, and every input is resized to 256 px).
    repeats : timed passes; the median is returned.

    Returns
    -------
    float
        Median seconds of one encoder pass (preprocessing excluded).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    model = load_model("litemedsam", device="cpu", fast_encoder=False, backend="torch")
    if image is None:
        image = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    batch = model.preprocess(image)[0]
    times = []
    with torch.inference_mode():
        model.sam.image_encoder(batch)  # warm-up (allocations, kernel choice)
        for _ in range(repeats):
            start = time.perf_counter()
            model.sam.image_encoder(batch)
            times.append(time.perf_counter() - start)
    return float(np.median(times))
