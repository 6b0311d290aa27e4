"""The runner on a Dask cluster: the same shards, computed by many workers.

``evaluate(..., scheduler=...)`` (:func:`cosmoslib.protocol.evaluate.evaluate`) plans the run as usual --
prompt table, content digests, shards of ``shard_size`` images, what is already finished -- and
then submits one Dask task per unfinished shard instead of computing it in its own process. A
task runs :func:`cosmoslib.protocol.evaluate.run_unit`, the very function of the single-process path, so
the shards it writes (atomically, keyed by content) and the rows in them are the same; the
table is then assembled from the shards exactly as in one process.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import dask_jobqueue
import torch
import yaml
from distributed import Client, LocalCluster, as_completed, get_worker
from distributed import WorkerPlugin as _WorkerPlugin
from tqdm.auto import tqdm

from cosmoslib import models
from cosmoslib.files import InputError
from cosmoslib.protocol import evaluate

__all__ = ["client_for", "connect", "ModelSpec", "ModelPlugin", "run_units", "JOBQUEUE_KINDS",
           "PLUGIN_NAME"]


PLUGIN_NAME = "cosmos-models"
JOBQUEUE_KINDS = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster",
                  "lsf": "LSFCluster"}


def _worker_env(threads: int) -> dict[str, str]:
    n = str(max(1, int(threads)))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


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

        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR,
                               env=_worker_env(threads))
        client = Client(cluster, set_as_default=False)
        client._cosmos_cluster = cluster  # closed with the client by close()
        return client
    if text.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
        return Client(text, set_as_default=False)
    if kind in JOBQUEUE_KINDS:
        return _jobqueue_client(kind, arg or config, threads)
    raise InputError(None, f"unknown scheduler {text!r}: use local:N, tcp://HOST:PORT or one of "
                           f"{sorted(JOBQUEUE_KINDS)} (with :CONFIG.yaml)")


def _jobqueue_client(kind: str, config, threads: int):
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
    env = [f"export {k}={v}" for k, v in _worker_env(threads).items()]
    options["job_script_prologue"] = [*options.get("job_script_prologue", []), *env]
    cluster = getattr(dask_jobqueue, JOBQUEUE_KINDS[kind])(**options)
    cluster.scale(jobs=jobs)
    client = Client(cluster, set_as_default=False)
    client._cosmos_cluster = cluster
    return client


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

    @classmethod
    def of(cls, model, device: str | None = None) -> "ModelSpec":
        return cls(name=model.name, checkpoint=str(model.checkpoint_path), autocast=bool(model.autocast),
                   fast_encoder=bool(model.fast_encoder), compile_encoder=bool(model.compile_encoder),
                   device=device, signature_hash=model.signature_hash)


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


class ModelPlugin(_WorkerPlugin):
    """Dask worker plugin: torch threads, a device, and each model of the run loaded once.

    Registered by :func:`run_units`; a task finds it as ``get_worker().plugins[PLUGIN_NAME]``.
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
        """The run's models, loaded on first use (once per worker)."""
        if self._models is None:

            loaded = []
            for spec in self.specs:
                model = models.load_model(spec.name, checkpoint=spec.checkpoint,
                                          device=spec.device or self.device, autocast=spec.autocast,
                                          fast_encoder=spec.fast_encoder,
                                          compile_encoder=spec.compile_encoder)
                if model.signature_hash != spec.signature_hash:
                    raise InputError(spec.checkpoint, f"model {spec.name} on worker has signature "
                                                      f"{model.signature_hash}, the client's is "
                                                      f"{spec.signature_hash} (other weights, version "
                                                      f"or encoder precision)")
                loaded.append(model)
            self._models = loaded
        return self._models


def _run_unit_task(unit, settings):
    """One Dask task: a shard, computed with the worker's models."""


    plugin = get_worker().plugins[PLUGIN_NAME]
    return evaluate.run_unit(unit, plugin.models(), settings, keep_tables=False, caches=plugin.caches)


def run_units(scheduler, units: list, models: Sequence, settings, threads: int = 1, retries: int = 3,
              progress: bool = True, device: str | None = None, config=None) -> list:
    """Compute ``units`` (:class:`cosmoslib.protocol.evaluate.WorkUnit`) on a Dask cluster.

    Returns the :class:`cosmoslib.protocol.evaluate.UnitResult` of each unit, in the order of ``units``.
    A unit that still fails after ``retries`` (or whose workers keep dying) raises.
    """

    if not units:
        return []
    specs = [ModelSpec.of(m, device) for m in models]
    with connect(scheduler, threads=threads, config=config) as client:
        # register_plugin is idempotent per name: a new run replaces the old models
        client.register_plugin(ModelPlugin(specs, threads=threads), name=PLUGIN_NAME)
        token = hashlib.blake2b(json.dumps([str(u.todo[0].path) for u in units]).encode(),
                                digest_size=6).hexdigest()
        futures = client.map(_run_unit_task, units, settings=settings, retries=retries, pure=False,
                             key=[f"cosmos-shard-{token}-{u.index}" for u in units])
        position = {f.key: i for i, f in enumerate(futures)}
        results: list = [None] * len(units)
        bar = tqdm(total=len(units), desc="evaluate (dask)", unit="shard", file=sys.stderr,
                   disable=not progress)
        for future in as_completed(futures, loop=client.loop):
            results[position[future.key]] = future.result()
            bar.update(1)
        bar.close()
    return results
