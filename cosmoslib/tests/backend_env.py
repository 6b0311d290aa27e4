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
"""

from __future__ import annotations

import os
import sys


def pytest_configure(config):
    os.environ.setdefault("COSMOS_BACKEND", "torch")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False
