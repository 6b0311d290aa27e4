"""A pytest plugin (pyproject ``addopts = -p cosmoslib.tests.backend_env``): the environment the
suite runs in, set when pytest configures itself (never at import of a test module).

* **The torch encoder wherever a backend is not asked for.** ``cosmos embed/evaluate/finetune``
  and the book load models with ``backend="auto"``, which exports and probes an encoder runtime
  once per machine (:mod:`cosmoslib.models.backend_probe`). Tests that do not care about the
  backend must not pay for that nor see embeddings keyed under a runtime's signature, so
  ``COSMOS_BACKEND`` defaults to ``torch`` here (an environment that sets it keeps its value; the
  notebooks papermill starts inherit it). Tests of "auto" itself (``test_backend_auto.py``)
  remove it with ``monkeypatch``.
* **Compiled bytecode is cached.** The suite starts dozens of Python processes (the CLI, notebook
  kernels, book lanes, Dask workers), each importing the library; with
  ``PYTHONDONTWRITEBYTECODE`` set (as in some containers and CI images) every one of them
  compiles every module again, and pytest rewrites every test module again on every run. The
  suite writes the caches Python writes by default (``__pycache__``, git-ignored) for this run
  and its children; the caller's shell keeps its setting.
* **Each xdist worker gets its share of the cores.** ``pytest -n N`` (pytest-xdist) starts N
  worker processes; left alone, each would run torch, OpenMP, OpenVINO and ONNX Runtime on every
  core, and N such processes on the same cores slow each other 3-5x (measured on 2 cores). A
  worker therefore uses ``cores // N`` threads (at least one): ``torch.set_num_threads`` for its
  own process and ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` for the processes it starts (an
  environment that sets them keeps its values). Without ``-n`` nothing changes: the suite runs
  on the machine's threads. A test that must see a particular thread count sets and restores
  it (the conftest's ``_threads_restored`` guard checks), as the decode thread test does.
* **glibc malloc settings that keep torch fast** (:mod:`cosmoslib.allocator`, as the Dask
  workers get them) for every process the run starts: xdist's workers, the CLI, the notebook
  kernels, Dask workers (an environment that sets either threshold keeps its own). glibc reads
  them when a process starts, so under ``-n 0`` the one pytest process runs without them.
  Measured: the known-answer module at one thread 49.1 s against 53.4 s, half the system time.
* **The longest modules start first.** Modules marked ``slow`` as a whole (the smoke book, then
  the library's, such as the known-answer study) are collected before the others, in their own
  order, and ``--no-loadscope-reorder`` (addopts) makes xdist hand them out in that order: by
  default it hands out the modules with the most tests first, which started the smoke book (three
  tests) last, so that it ran for minutes after the other workers had finished. The book keeps
  within its worker's share (``OMP_NUM_THREADS``, above; :func:`cosmoslib.book.lanes.cpu_budget`):
  one lane of one thread on 2 cores and 2 workers, while the other worker runs the short tests.
  The order of the tests inside a module does not change.
"""

from __future__ import annotations

import os
import sys


def worker_threads(environ=os.environ, cpus: int | None = None) -> int | None:
    """Threads for one pytest-xdist worker, or None outside xdist.

    Parameters
    ----------
    environ : the process environment (xdist sets ``PYTEST_XDIST_WORKER`` and
        ``PYTEST_XDIST_WORKER_COUNT`` in each worker).
    cpus : cores to share (default ``os.cpu_count()``).

    Returns
    -------
    int or None
        ``max(1, cpus // workers)`` inside a worker; None in a plain (non-xdist) run.
    """
    if not environ.get("PYTEST_XDIST_WORKER"):
        return None
    workers = max(1, int(environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    cpus = cpus or os.cpu_count() or 1
    return max(1, cpus // workers)


def pytest_configure(config):
    from cosmoslib import allocator

    os.environ.setdefault("COSMOS_BACKEND", "torch")
    allocator.add_to(os.environ)  # for the workers and every process they start (docstring)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False
    threads = worker_threads()
    if threads is not None:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(name, str(threads))
        import torch

        torch.set_num_threads(threads)


def _slow_module(item) -> bool:
    module = getattr(item, "module", None)  # None for items that are not Python functions
    marks = getattr(module, "pytestmark", []) if module is not None else []
    marks = marks if isinstance(marks, list) else [marks]
    return any(getattr(m, "name", None) == "slow" for m in marks)


def _rank(item) -> int:
    if not _slow_module(item):
        return 2
    # the book's own tests (``tests/``: a whole smoke book, the longest module) before the library's
    return 1 if "cosmoslib" in item.path.parts else 0


def pytest_collection_modifyitems(session, config, items):
    """Modules marked ``slow`` as a whole first, the book's before the library's (stable: the
    order within a module is kept)."""
    items.sort(key=_rank)
