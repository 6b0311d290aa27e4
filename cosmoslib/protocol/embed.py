"""``cosmos embed``: every image of a COSMOS root into the embedding cache, here or on Dask (paper 3.4).

One function, :func:`embed_root`, for both ways of running. Without a scheduler the images are
encoded in this process through :meth:`cosmoslib.models.cache.EmbeddingCache.ensure` (read and
hashed ``prefetch`` images ahead on a background thread). With one, the images (in
:func:`cosmoslib.data.layout.list_images` order) are split into groups of ``group_size``, each
group one Dask task that runs ``ensure`` with the worker's copy of the model
(:class:`cosmoslib.protocol.distributed.ModelPlugin`: loaded once per worker, checked against this
process's model signature) into the shared cache. Either way the cache holds the same entries
(keyed by decoded pixels and model signature), and a rerun computes only what is missing or
invalid.
"""

from __future__ import annotations

import time

from cosmoslib.models import cache as cache_mod

__all__ = ["embed_root"]


def _embed_task(paths: list, cache_dir, dtype: str, batch_size: int, prefetch: int):
    """One Dask task: :meth:`cosmoslib.models.cache.EmbeddingCache.ensure` of a group of images
    with the worker's model (one cache object per worker and settings, kept across tasks)."""
    from cosmoslib.protocol import distributed  # Dask (~1 s of imports) only for --scheduler runs

    plugin = distributed.worker_plugin()
    model = plugin.models()[0]
    key = ("embed", model.name, model.signature_hash, str(cache_dir), dtype, batch_size, prefetch)
    if key not in plugin.caches:
        plugin.caches[key] = cache_mod.EmbeddingCache(cache_dir, model, dtype=dtype, batch_size=batch_size,
                                                      prefetch=prefetch)
    return plugin.caches[key].ensure(paths, progress=False)


def embed_root(root, model, *, scheduler=None, checkpoint=None, cache_dir=None, device: str | None = None,
               dtype: str = "float16", batch_size: int = 1, prefetch: int = 2, group_size: int = 64,
               threads: int = 1, retries: int = 3, progress: bool = True, config=None) -> cache_mod.EmbedReport:
    """Embed every image of a COSMOS-layout folder (``cosmos embed``); resumable.

    Parameters
    ----------
    root : path
        COSMOS root (``<task>/images/*.png``).
    model : str or SamFamilyModel
        Registry name (:func:`cosmoslib.models.load_model`, with ``checkpoint`` and ``device``)
        or a loaded model. With ``scheduler`` its registry name, checkpoint and signature tell the
        workers what to load.
    scheduler : None, str or distributed.Client
        None (default): encode in this process. Else ``"local:N"``, ``"tcp://HOST:PORT"``,
        ``"slurm:cluster.yaml"`` (:func:`cosmoslib.protocol.distributed.client_for`) or a client.
    checkpoint : path, optional
        Weights file, when ``model`` is a registry name.
    cache_dir : path, optional
        Default :func:`cosmoslib.paths.embedding_cache_dir`; with ``scheduler`` it must be seen by
        every worker at the same path.
    device : str, optional
        ``cpu`` or ``cuda`` (default: CUDA when available); with ``scheduler`` the workers'
        device (default: one GPU per worker when they see GPUs).
    dtype : {"float16", "float32"}
        Stored precision.
    batch_size : int
        Images per encoder call (1 times each image on its own, as the paper's Table 4).
    prefetch : int
        Images read and hashed ahead on a background thread (0: none).
    group_size : int
        Images per Dask task (>= 1; ignored without ``scheduler``).
    threads : int
        Torch threads per Dask worker (ignored without ``scheduler``).
    retries : int
        Times a failing Dask task is retried.
    progress : bool
        tqdm bar on stderr (images).
    config : path, optional
        dask-jobqueue YAML file (alternative to ``"slurm:PATH"``).

    Returns
    -------
    EmbedReport
        Counts and ``failures`` (unreadable images, encoder errors) in image order. On a cluster
        the counts are summed over the groups; the same image content under two names in two
        groups may be encoded twice there (the cache keeps one entry), where one process counts
        it reused.

    Raises
    ------
    InputError
        ``root`` is not a folder, or holds no ``<task>/images/<name>.png``.
    """
    start = time.perf_counter()
    paths = [p for _, _, p in cache_mod.root_images(root)]
    model = cache_mod.as_model(model, checkpoint, device)
    if scheduler is None:
        store = cache_mod.EmbeddingCache(cache_dir, model, dtype=dtype, batch_size=batch_size, prefetch=prefetch)
        return store.ensure(paths, progress=progress)
    from cosmoslib.protocol import distributed  # Dask (~1 s of imports) only for --scheduler runs

    # the store (root group, signature) is created once here, not raced by every worker
    store = cache_mod.EmbeddingCache(cache_dir, model, dtype=dtype)
    n = max(1, int(group_size))
    groups = [paths[i:i + n] for i in range(0, len(paths), n)]
    reports: list = [None] * len(groups)
    with distributed.connect(scheduler, threads=threads, config=config) as client:
        distributed.register_models(client, [model], threads=threads, device=device)
        for i, rep in distributed.map_groups(client, _embed_task, groups, store.cache_dir, str(dtype),
                                             int(batch_size), int(prefetch), retries=retries, progress=progress,
                                             desc=f"embed {model.name} (dask)", unit="img",
                                             sizes=[len(g) for g in groups]):
            reports[i] = rep
    report = cache_mod.EmbedReport(model_name=model.name, dtype=str(store.dtype), n_images=len(paths),
                                   cache_dir=store.cache_dir, store=store.store)
    for rep in reports:
        report.n_computed += rep.n_computed
        report.n_reused += rep.n_reused
        report.n_invalid += rep.n_invalid
        report.encode_seconds += rep.encode_seconds
        report.failures += rep.failures
    report.elapsed = time.perf_counter() - start
    return report
