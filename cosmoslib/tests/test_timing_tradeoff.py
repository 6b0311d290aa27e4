"""Disk versus compute of the embedding cache (timing.embedding_disk_bytes, timing.fused_tradeoff)."""

from __future__ import annotations

import numpy as np
import pytest

from cosmoslib.analysis import timing
from cosmoslib.models import cache


def test_disk_bytes_are_measured_on_the_store(litemedsam, tmp_path):
    raw = float(np.prod(litemedsam.embedding_shape) * 2)
    size, n, measured = timing.embedding_disk_bytes(litemedsam, tmp_path / "cache")
    assert (size, n, measured) == (raw, 0, False)  # nothing stored: the raw fp16 size, flagged
    rng = np.random.default_rng(0)
    store = cache.EmbeddingCache(tmp_path / "cache", litemedsam)
    store.get(rng.integers(0, 255, (40, 48), dtype=np.uint8))
    size, n, measured = timing.embedding_disk_bytes(litemedsam, tmp_path / "cache")
    files = sum(p.stat().st_size for p in store.store.rglob("*") if p.is_file())
    assert measured and n == 1 and size == files
    assert 0.3 * raw < size < 1.1 * raw  # compressed fp16 plus metadata, not fp32


def test_tradeoff_scales_the_per_image_numbers():
    t = timing.fused_tradeoff(encode_s=0.5, bytes_per_embedding=1.7e6, n_images=1_050_000)
    assert t["disk_tb"] == pytest.approx(1.785)
    assert t["encode_hours"] == pytest.approx(1_050_000 * 0.5 / 3600)
    assert t["gb_per_encode_hour"] == pytest.approx(1785 / (1_050_000 * 0.5 / 3600))


def test_reference_encode_is_the_stock_encoder_and_positive(monkeypatch):
    """The day's reference times the stock LiteMedSAM encoder (never the fast path or a runtime)."""
    from cosmoslib import models

    seen = {}
    real = models.load_model

    def spy(name, **kw):
        seen.update(kw, name=name)
        return real(name, **kw)

    monkeypatch.setattr(timing, "load_model", spy)
    seconds = timing.reference_encode_seconds(repeats=1)
    assert 0 < seconds < 120
    assert seen == {"name": "litemedsam", "device": "cpu", "fast_encoder": False, "backend": "torch"}
    with pytest.raises(ValueError, match="repeats"):
        timing.reference_encode_seconds(repeats=0)
