"""The timing chapter's int8 table (cosmoslib.analysis.int8_tradeoff.chapter_table and helpers).

The quick tests check the subset choice, the key, the words and the missing-runtime path on
small tables; the slow one runs the whole table on the shrunk random-weight ViT of
``test_backend_auto`` (export, NNCF quantization on one image, two evaluate runs on one demo
object) and checks that it is stored and reused only for the same inputs.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pandas as pd
import pytest

from cosmoslib.analysis import int8_tradeoff
from cosmoslib.data import indexer
from cosmoslib.files import InputError
from cosmoslib.tests.test_backend_auto import shrunk_vit


def _manifest(n_images: int = 5, n_objects: int = 3) -> pd.DataFrame:
    rows = [{"image_path": f"t/images/im{i}.png", "task": "t", "image_id": f"im{i}",
             "label_value": v, "image_sha": f"i{i}", "label_sha": f"l{i}", "area_px": 10 * v}
            for i in range(n_images) for v in range(1, n_objects + 1)]
    return pd.DataFrame(rows)


def test_subset_is_seeded_and_independent_of_other_images():
    manifest = _manifest()
    a = int8_tradeoff.chapter_subset(manifest, n_images=2, max_objects=1, seed=0)
    assert a["image_path"].nunique() == 2 and len(a) == 2
    assert a.equals(int8_tradeoff.chapter_subset(manifest, 2, 1, seed=0))
    chosen = manifest[manifest["image_path"].isin(a["image_path"])]
    # The same images from a manifest that holds only them (no other row moves the choice).
    assert set(int8_tradeoff.chapter_subset(chosen, 2, 1, seed=0)["image_path"]) == set(a["image_path"])
    seeds = {tuple(sorted(int8_tradeoff.chapter_subset(manifest, 2, 1, seed=s)["image_path"]))
             for s in range(6)}
    assert len(seeds) > 1  # another seed, another subset
    with pytest.raises(InputError, match="n_images >= 1"):
        int8_tradeoff.chapter_subset(manifest, 0, 1)
    with pytest.raises(InputError, match="empty manifest"):
        int8_tradeoff.chapter_subset(manifest.iloc[:0], 1, 1)


def test_key_follows_content_signature_and_settings():
    model = shrunk_vit()
    subset = int8_tradeoff.chapter_subset(_manifest(), 2, 2)
    sig = {"encoder": "openvino-int8-x-calA"}
    settings = {"n_images": 2, "seed": 0}
    key = int8_tradeoff.chapter_key(subset, model, sig, settings)
    assert key == int8_tradeoff.chapter_key(subset.iloc[::-1], model, sig, settings)  # row order
    other = subset.assign(image_sha=subset["image_sha"] + "x")  # other pixels
    assert key != int8_tradeoff.chapter_key(other, model, sig, settings)
    assert key != int8_tradeoff.chapter_key(subset, model, {"encoder": "calB"}, settings)
    assert key != int8_tradeoff.chapter_key(subset, model, sig, {**settings, "seed": 1})


def _chapter_rows(agreements, model="litemedsam"):
    n = len(agreements)
    return pd.DataFrame({
        "model": model, "nature": "medical", "fp32_backend": "openvino", "n_images": 4,
        "calibration_images": 2, "encode_s_fp32": 0.3, "encode_s_int8": 0.15, "speedup": 2.0,
        "quantize_s": 21.0, "meets_bar": min(agreements) >= int8_tradeoff.DEFAULT_BAR,
        "strategy": [f"S{i + 1}" for i in range(n)], "n_objects": 7, "agreement": agreements,
        "agreement_min": [a - 5 for a in agreements], "dice_change": np.linspace(-0.4, 0.1, n)})


def test_sentences_say_the_numbers_and_the_verdict():
    below = int8_tradeoff.chapter_sentences(_chapter_rows([99.9, 93.2, 99.6]))["litemedsam"]
    assert "0.150 s" in below and "0.300 s" in below and "2.00×" in below
    assert "93.2-99.9 %" in below and "lowest S2" in below and "0.40 points" in below
    assert "opt-in" in below and "never the default" in below and "2 calibration images" in below
    above = int8_tradeoff.chapter_sentences(_chapter_rows([99.9, 99.7]))["litemedsam"]
    assert "could be offered as a default" in above
    with pytest.raises(ValueError, match="no int8 rows"):
        int8_tradeoff.chapter_sentences(_chapter_rows([99.9]).iloc[:0])


@pytest.mark.parametrize("missing", ["nncf", "openvino"])
def test_missing_runtime_is_said_not_raised(missing, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, missing, None)  # `import <missing>` now raises ImportError
    reason = int8_tradeoff.runtime_missing()
    assert reason and int8_tradeoff.INSTALL_COMMAND in reason
    with pytest.raises(ImportError, match="runtimes"):
        int8_tradeoff.chapter_table(_manifest(), tmp_path, [], tmp_path, n_images=1,
                                    calibration_images=1, max_objects=1, points_per_side=2)


@pytest.mark.slow
def test_chapter_table_on_a_shrunk_vit_is_stored_and_reused(demo_root, tmp_path, monkeypatch):
    """(Slow: one NNCF quantization of the shrunk ViT and two evaluate runs, ~15-25 s.)"""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    monkeypatch.setenv("COSMOS_EXPORTS", str(tmp_path / "exports"))
    model = shrunk_vit()
    manifest = indexer.index(demo_root)
    kw = dict(n_images=1, calibration_images=1, max_objects=1, points_per_side=2,
              strategies=["S1", "S5"], cache_dir=tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        table = int8_tradeoff.chapter_table(manifest, demo_root, [model], tmp_path / "store", **kw)
    assert list(table.columns) == list(int8_tradeoff.CHAPTER_COLUMNS)
    assert list(table["strategy"]) == ["S1", "S5"] and (table["model"] == "vit_shrunk").all()
    assert (table["nature"] == "general").all() and (table["fp32_backend"] == "torch").all()
    assert (table["n_objects"] == 1).all() and (table["calibration_images"] == 1).all()
    assert table["agreement"].between(0, 100).all()
    assert (table["encode_s_fp32"] > 0).all() and (table["encode_s_int8"] > 0).all()
    np.testing.assert_allclose(table["speedup"], table["encode_s_fp32"] / table["encode_s_int8"])
    assert table["meets_bar"].iloc[0] == int8_tradeoff.meets_default_bar(table)
    stored = sorted((tmp_path / "store").glob("*.parquet"))
    assert len(stored) == 1 and not list((tmp_path / "store").glob("*.work"))

    def fail(*a, **k):
        raise AssertionError("recomputed although inputs, models and settings are the same")

    monkeypatch.setattr(int8_tradeoff, "agreement_table", fail)
    again = int8_tradeoff.chapter_table(manifest, demo_root, [model], tmp_path / "store", **kw)
    pd.testing.assert_frame_equal(again, table)
    with pytest.raises(AssertionError, match="recomputed"):  # other settings: another key
        int8_tradeoff.chapter_table(manifest, demo_root, [model], tmp_path / "store",
                                    **{**kw, "strategies": ["S5"]})
