"""The runner on a Dask cluster: the same shards, computed by many workers.

``evaluate(..., scheduler=...)`` (:func:`cosmoslib.protocol.evaluate.evaluate`) plans the run as usual --
prompt table, content digests, shards of ``shard_size`` images, what is already finished
(:func:`cosmoslib.protocol.units.plan`) -- and then submits one Dask task per unfinished shard
(:func:`run_units`) instead of computing it in its own process. A task runs
:func:`cosmoslib.protocol.units.run_unit`, the very function of the single-process path, so the
shards it writes (atomically, keyed by content) and the rows in them are the same; the table is
then assembled from the shards exactly as in one process. This module imports the work units,
never the runner (:mod:`cosmoslib.protocol.evaluate` imports it): no import circle.

Other verbs use the same cluster through :func:`map_groups` (prompts: :func:`make_prompt_table`;
``cosmos embed``: :func:`cosmoslib.protocol.embed.embed_root`; factors).

Schedulers (:func:`client_for`)

* ``"local:N"`` -- a :class:`distributed.LocalCluster` of N worker processes with one thread each;
* ``"tcp://HOST:PORT"`` -- an existing cluster (``dask scheduler`` / ``dask worker`` started by hand);
* ``"slurm"``, ``"pbs"``, ``"sge"``, ``"lsf"`` with ``":CONFIG.yaml"`` -- a ``dask-jobqueue``
  cluster; the YAML file holds the keyword arguments of its class (``cores``, ``memory``,
  ``walltime``, ``queue``, ``account``, ``job_extra_directives``, ...) plus ``jobs: N`` (how many
  batch jobs to start; default 1). Without a file, dask-jobqueue's own configuration applies.

Workers load each model once (:class:`ModelPlugin`: by registry name and checkpoint, checked
against the client's model signature) and set torch's threads (``threads``, default 1 so that
several workers on one machine do not oversubscribe its cores). A worker that sees GPUs takes
one, ``cuda:(worker index mod GPUs)``; one that its batch system gave a single GPU uses it.

Failure: bad input is recorded by ``run_unit`` as in one process; a task that raises is
retried ``retries`` times; a task lost with a killed worker is rescheduled by Dask on another
worker (the nanny restarts the dead one). A shard written twice is written with the same content,
atomically, so the final table holds every row exactly once. Workers must see ``root``, the
cache folder and the output folder at the same paths as the client (a shared file system).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import dask
import dask_jobqueue
import pandas as pd
import torch
import yaml
from distributed import Client, LocalCluster, as_completed, get_worker
from distributed import WorkerPlugin as _WorkerPlugin
from tqdm.auto import tqdm

from cosmoslib import allocator, models
from cosmoslib.files import InputError
from cosmoslib.protocol import prompts, units

__all__ = ["client_for", "connect", "ModelSpec", "ModelPlugin", "register_models", "worker_plugin",
           "run_units", "JOBQUEUE_KINDS", "PLUGIN_NAME", "map_groups", "make_prompt_table", "WORKER_MALLOC",
           "check_worker_malloc"]


PLUGIN_NAME = "cosmos-models"
JOBQUEUE_KINDS = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster",
                  "lsf": "LSFCluster"}


def _worker_env(threads: int) -> dict[str, str]:
    n = str(max(1, int(threads)))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


#: glibc malloc settings for worker processes, set before they start, in place of the nanny's
#: ``MALLOC_TRIM_THRESHOLD_=65536`` (a Dask task 1.65x slower under it; why and the figures:
#: :mod:`cosmoslib.allocator`).
WORKER_MALLOC = allocator.SETTINGS


def _worker_malloc() -> dict[str, str | None]:
    """Run on a worker: its malloc environment."""
    return {k: os.environ.get(k) for k in WORKER_MALLOC}


def check_worker_malloc(client) -> list[str]:
    """Warn about workers whose malloc settings slow torch down (see :data:`WORKER_MALLOC`).

    Returns the addresses of those workers. Clusters made by :func:`client_for` never have them;
    a cluster started by hand (``dask worker``) does unless its Dask configuration sets
    ``distributed.nanny.pre-spawn-environ`` to :data:`WORKER_MALLOC` (or the shell exports it).
    """
    try:
        seen = client.run(_worker_malloc)
    except Exception:  # no workers yet, or an old worker: nothing to say
        return []
    slow = [addr for addr, env in seen.items()
            if env.get("MALLOC_TRIM_THRESHOLD_") is not None and env.get("MALLOC_MMAP_THRESHOLD_") is None]
    if slow:
        warnings.warn(f"{len(slow)} Dask worker(s) run with MALLOC_TRIM_THRESHOLD_ set and no "
                      f"MALLOC_MMAP_THRESHOLD_ (Dask's default), which makes torch about 2x slower; "
                      f"start them with {' '.join(f'{k}={v}' for k, v in WORKER_MALLOC.items())} in the "
                      f"environment (see README, Running on a cluster)", stacklevel=2)
    return slow


def client_for(scheduler: str | None, threads: int = 1, config: str | os.PathLike | None = None):
    """A ``distributed.Client`` for ``scheduler`` (None: None, i.e. run in this process).

    Parameters
    ----------
    scheduler : ``"local:N"``, ``"tcp://HOST:PORT"`` or ``"slurm[:config.yaml]"`` (also
        ``pbs``, ``sge``, ``lsf``), or None.
    threads : threads per worker (Dask's and torch's) for clusters made here.
    config : the jobqueue YAML file (alternative to ``"slurm:PATH"``).

    Returns
    -------
    distributed.Client or None
        For clusters made here the client owns the cluster: :func:`close` shuts both down
        (:func:`connect` does it for you).
    """
    if scheduler is None:
        return None

    text = str(scheduler).strip()
    kind, _, arg = text.partition(":")
    if kind == "local":
        try:
            n = int(arg)
        except ValueError:
            raise InputError(None, f"--scheduler local:N wants a number of workers, got {text!r}") from None
        if n < 1:
            raise InputError(None, f"--scheduler local:N needs N >= 1, got {text!r}")

        environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **WORKER_MALLOC}
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=logging.ERROR,
                                   env=_worker_env(threads))
        client = Client(cluster, set_as_default=False)
        client._cosmos_cluster = cluster  # closed with the client by close()
        return client
    if text.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
        client = Client(text, set_as_default=False)
        check_worker_malloc(client)  # workers started by hand may carry Dask's slow default
        return client
    if kind in JOBQUEUE_KINDS:
        return _jobqueue_client(kind, arg or config, threads)
    raise InputError(None, f"unknown scheduler {text!r}: use local:N, tcp://HOST:PORT or one of "
                           f"{sorted(JOBQUEUE_KINDS)} (with :CONFIG.yaml)")


def _jobqueue_client(kind: str, config, threads: int):
    cluster, jobs = jobqueue_cluster(kind, config, threads)
    cluster.scale(jobs=jobs)
    client = Client(cluster, set_as_default=False)
    client._cosmos_cluster = cluster
    return client


def jobqueue_cluster(kind: str, config, threads: int = 1):
    """The dask-jobqueue cluster of ``--scheduler KIND:CONFIG.yaml``, not yet scaled.

    Returns ``(cluster, jobs)``. The job script exports the worker threads and
    :data:`WORKER_MALLOC` before the workers start (see ``cluster.job_script()``).
    """
    options: dict[str, Any] = {}
    if config:
        path = Path(config)
        try:
            options = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InputError(path, f"unreadable jobqueue config ({exc})") from None
        if not isinstance(options, dict):
            raise InputError(path, "a jobqueue config is a mapping of the cluster's keyword arguments")
    jobs = int(options.pop("jobs", 1))
    env = [f"export {k}={v}" for k, v in {**_worker_env(threads), **WORKER_MALLOC}.items()]
    options["job_script_prologue"] = [*options.get("job_script_prologue", []), *env]
    return getattr(dask_jobqueue, JOBQUEUE_KINDS[kind])(**options), jobs


def close(client) -> None:
    """Close ``client`` and the cluster :func:`client_for` made for it (if any)."""
    if client is None:
        return
    cluster = getattr(client, "_cosmos_cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


@contextlib.contextmanager
def connect(scheduler, threads: int = 1, config=None):
    """``with connect("local:2") as client:`` -- a client, closed (with its cluster) on exit.

    An existing ``distributed.Client`` passes through and is left open.
    """
    if scheduler is not None and not isinstance(scheduler, (str, os.PathLike)):
        yield scheduler
        return
    client = client_for(scheduler, threads=threads, config=config)
    try:
        yield client
    finally:
        close(client)


# --------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads one model of the run: registry name and checkpoint, plus the
    client's signature hash that the loaded model must have (same weights, same numerics)."""

    name: str
    checkpoint: str
    autocast: bool
    fast_encoder: bool
    compile_encoder: bool
    device: str | None
    signature_hash: str
    backend: str = "torch"

    @classmethod
    def of(cls, model, device: str | None = None) -> "ModelSpec":
        return cls(name=model.name, checkpoint=str(model.checkpoint_path), autocast=bool(model.autocast),
                   fast_encoder=bool(model.fast_encoder), compile_encoder=bool(model.compile_encoder),
                   device=device, signature_hash=model.signature_hash,
                   backend=str(getattr(model, "backend", "torch")))


def _worker_index(name) -> int:
    """The worker's ordinal: LocalCluster names workers 0..N-1, dask-jobqueue ``Cluster-J[-P]``."""
    if isinstance(name, int):
        return name
    numbers = re.findall(r"\d+", str(name))
    if numbers:
        return int(numbers[-1])
    return int(hashlib.blake2b(str(name).encode(), digest_size=4).hexdigest(), 16)


def worker_device(name, requested: str | None = None) -> str:
    """The torch device of a worker: ``requested`` if given, else one GPU per worker when the
    worker sees GPUs (``cuda:(index mod GPUs)``), else ``cpu``."""
    if requested:
        return requested

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return "cpu"
    return f"cuda:{_worker_index(name) % n}"


#: Models a worker process has loaded, by (ModelSpec, device); kept across runs so that the
#: plugin a new run registers (which replaces the previous one) does not load them again.
_LOADED: dict[tuple[ModelSpec, str], Any] = {}
#: At most this many models stay loaded in one worker (the oldest is dropped first).
MAX_LOADED_MODELS = 4


def _loaded_model(spec: ModelSpec, device: str):
    """``spec``'s model on ``device``, loaded once per worker process and checked against the
    client's signature."""
    key = (spec, device)
    if key in _LOADED:
        _LOADED[key] = _LOADED.pop(key)  # most recently used last
        return _LOADED[key]
    model = models.load_model(spec.name, checkpoint=spec.checkpoint, device=device,
                              autocast=spec.autocast, fast_encoder=spec.fast_encoder,
                              compile_encoder=spec.compile_encoder, backend=spec.backend)
    if model.signature_hash != spec.signature_hash:
        raise InputError(spec.checkpoint, f"model {spec.name} on worker has signature "
                                          f"{model.signature_hash}, the client's is "
                                          f"{spec.signature_hash} (other weights, version "
                                          f"or encoder precision)")
    while len(_LOADED) >= MAX_LOADED_MODELS:
        _LOADED.pop(next(iter(_LOADED)))
    _LOADED[key] = model
    return model


class ModelPlugin(_WorkerPlugin):
    """Dask worker plugin: torch threads, a device, and each model of the run loaded once.

    Registered by :func:`run_units`; a task finds it as ``get_worker().plugins[PLUGIN_NAME]``.
    A model stays loaded in the worker process across runs (:data:`MAX_LOADED_MODELS`), so a
    second ``evaluate`` on the same cluster does not load it again.
    """

    name = PLUGIN_NAME

    def __init__(self, specs: Sequence[ModelSpec], threads: int = 1):
        self.specs = list(specs)
        self.threads = int(threads)
        self._models: list | None = None
        self.caches: dict = {}
        self.device = "cpu"

    def setup(self, worker) -> None:

        models.set_threads(self.threads)
        self.device = worker_device(worker.name, self.specs[0].device if self.specs else None)
        if self.device.startswith("cuda"):

            torch.cuda.set_device(self.device)

    def teardown(self, worker) -> None:
        self._models = None
        self.caches.clear()

    def models(self) -> list:
        """The run's models, loaded on first use (once per worker process)."""
        if self._models is None:
            self._models = [_loaded_model(spec, spec.device or self.device) for spec in self.specs]
        return self._models


def register_models(client, models_: Sequence, threads: int = 1, device: str | None = None) -> None:
    """Make every worker of ``client`` load ``models_`` (once per worker process, on first use).

    Registers :class:`ModelPlugin` under :data:`PLUGIN_NAME`; idempotent per name, so a new run
    replaces the previous run's models (a model stays loaded across runs, see :data:`MAX_LOADED_MODELS`).
    """
    client.register_plugin(ModelPlugin([ModelSpec.of(m, device) for m in models_], threads=threads),
                           name=PLUGIN_NAME)


def worker_plugin() -> ModelPlugin:
    """Inside a Dask task: the worker's :class:`ModelPlugin` (its ``models()`` and ``caches``)."""
    return get_worker().plugins[PLUGIN_NAME]


def _run_unit_task(unit, settings):
    """One Dask task: a shard, computed with the worker's models."""
    plugin = worker_plugin()
    return units.run_unit(unit, plugin.models(), settings, keep_tables=False, caches=plugin.caches)


def run_units(scheduler, work: list, models: Sequence, settings, threads: int = 1, retries: int = 3,
              progress: bool = True, device: str | None = None, config=None) -> list:
    """Compute ``work`` (:class:`cosmoslib.protocol.units.WorkUnit` s) on a Dask cluster.

    Parameters
    ----------
    scheduler : a ``distributed.Client`` or a scheduler text (:func:`client_for`).
    work : the units planned by :func:`cosmoslib.protocol.units.plan`.
    models : the run's models, loaded here (workers load the same: :class:`ModelSpec`).
    settings : :class:`cosmoslib.protocol.units.RunSettings`.

    Returns
    -------
    list of :class:`cosmoslib.protocol.units.UnitResult`
        One per unit, in the order of ``work``. A unit that still fails after ``retries`` (or
        whose workers keep dying) raises.
    """
    if not work:
        return []
    with connect(scheduler, threads=threads, config=config) as client:
        register_models(client, models, threads=threads, device=device)
        token = hashlib.blake2b(json.dumps([str(u.todo[0].path) for u in work]).encode(),
                                digest_size=6).hexdigest()
        futures = client.map(_run_unit_task, work, settings=settings, retries=retries, pure=False,
                             key=[f"cosmos-shard-{token}-{u.index}" for u in work])
        position = {f.key: i for i, f in enumerate(futures)}
        results: list = [None] * len(work)
        bar = tqdm(total=len(work), desc="evaluate (dask)", unit="shard", file=sys.stderr,
                   disable=not progress)
        for future in as_completed(futures, loop=client.loop):
            results[position[future.key]] = future.result()
            bar.update(1)
        bar.close()
    return results


# --------------------------------------------------------------------------- other verbs


def map_groups(scheduler, fn, groups: Sequence, *args, threads: int = 1, retries: int = 3,
               progress: bool = True, desc: str = "dask", unit: str = "group", sizes=None,
               config=None, **kwargs):
    """Run ``fn(group, *args, **kwargs)`` for each of ``groups`` on a Dask cluster.

    Yields ``(index, result)`` as tasks finish (not in order; the caller puts them in order).
    A task that raises is retried ``retries`` times, then its error is raised here.

    Parameters
    ----------
    scheduler : a ``distributed.Client`` or a scheduler text (:func:`client_for`).
    fn : a module-level function (pickled by reference).
    groups : the work units, e.g. lists of image paths or manifest chunks.
    sizes : items per group for the progress bar (default: 1 per group).
    """
    if not len(groups):
        return
    with connect(scheduler, threads=threads, config=config) as client:
        futures = client.map(fn, list(groups), *[[a] * len(groups) for a in args], retries=retries,
                             pure=False, **kwargs)
        position = {f.key: i for i, f in enumerate(futures)}
        total = sum(sizes) if sizes is not None else len(groups)
        bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not progress)
        for future in as_completed(futures, loop=client.loop):
            i = position[future.key]
            result = future.result()
            bar.update(sizes[i] if sizes is not None else 1)
            yield i, result
        bar.close()


def _prompt_task(group, root, seed: int, kwargs: dict):
    """One Dask task: the prompt rows of a group of images (:func:`cosmoslib.protocol.prompts.make_prompt_table`)."""
    return prompts.make_prompt_table(group, root, seed=seed, **kwargs)


def make_prompt_table(scheduler, manifest, root, seed: int, kwargs: dict | None = None,
                      images_per_task: int = 256, progress: bool = False, threads: int = 1):
    """:func:`cosmoslib.protocol.prompts.make_prompt_table` of ``manifest``, computed on the workers.

    The manifest is split into groups of ``images_per_task`` images (each label file is read
    once, on a worker, instead of all of them on the client). Every object's generator
    depends only on the seed and the object's key (:func:`cosmoslib.protocol.prompts.object_rng`), so
    the concatenated table equals the single-process one row for row after sorting.
    An unreadable label raises :class:`~cosmoslib.files.InputError` as in one process.
    """
    keys = manifest[["task", "image_id"]].drop_duplicates()
    n = max(1, int(images_per_task))
    groups = [manifest.merge(keys.iloc[i:i + n], on=["task", "image_id"]) for i in range(0, len(keys), n)]
    parts: list = [None] * len(groups)
    for i, part in map_groups(scheduler, _prompt_task, groups, Path(root), int(seed), dict(kwargs or {}),
                              threads=threads, progress=progress, desc="prompts (dask)", unit="image",
                              sizes=[g[["task", "image_id"]].drop_duplicates().shape[0] for g in groups]):
        parts[i] = part
    if not parts:
        return prompts.make_prompt_table(manifest, root, seed=seed, **dict(kwargs or {}))
    table = pd.concat(parts, ignore_index=True)
    return table.sort_values(["task", "image_id", "label_value", "strategy", "shift_level", "repeat"],
                             kind="stable").reset_index(drop=True)
