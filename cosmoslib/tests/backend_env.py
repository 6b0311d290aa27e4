"""A pytest plugin (pyproject ``addopts = -p cosmoslib.tests.backend_env``): the suite runs the
torch encoder wherever a backend is not asked for.

``cosmos embed/evaluate/finetune`` and the book load models with ``backend="auto"``, which
exports and probes an encoder runtime once per machine (:mod:`cosmoslib.models.backend_probe`).
Tests that do not care about the backend must not pay for that nor see embeddings keyed under
a runtime's signature, so ``COSMOS_BACKEND`` defaults to ``torch`` here (an environment that
sets it keeps its value; the notebooks papermill starts inherit it). Tests of "auto" itself
(``test_backend_auto.py``) remove it with ``monkeypatch``.
"""

from __future__ import annotations

import os


def pytest_configure(config):
    os.environ.setdefault("COSMOS_BACKEND", "torch")
