"""The int8 encoder (``backend="openvino-int8"``: cosmoslib.models.quantize, cosmoslib.models.backends)
and its agreement table (cosmoslib.analysis.int8_tradeoff).

On the shrunk ViT of ``test_backend_auto`` (SAM's ``ImageEncoderViT`` at 256 px, width 64, two
blocks, random weights) so that export and NNCF quantization run in seconds: the quantization
runs and writes its record, the export is reused (a second load does not quantize), the key
follows the calibration images, int8 embeddings stay near the float32 ones, a missing
OpenVINO or NNCF is a clear error, and "auto" never means int8. The full-size figures (speed,
mask agreement per strategy on real weights) are ``benchmarks/int8.py``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

from cosmoslib.analysis import int8_tradeoff
from cosmoslib.data import indexer, layout
from cosmoslib.files import InputError
from cosmoslib.models import backend_probe, backends, quantize
from cosmoslib.models.cache import EmbeddingCache
from cosmoslib.tests.test_backend_auto import shrunk_vit

INT8 = backends.INT8
#: Largest |int8 - float32| allowed, relative to the float32 embedding's largest magnitude, on
#: the shrunk random-weight ViT's calibration images and two others (measured 0.028: max |diff|
#: 0.14 for values up to ~5; the assertion message prints this run's figure).
EMBED_RTOL_INT8 = 0.05
#: Largest ||int8 - float32|| / ||float32|| (L2 over the embedding) of the real LiteMedSAM on a
#: calibration image (measured 0.147, calibrated on two demo images; its largest single
#: difference is larger: 0.28 of the largest magnitude here, up to 0.41 on other demo images
#: with 16 calibration images -- benchmarks/int8.py measures what that does to the masks).
LITEMEDSAM_REL_L2 = 0.25


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One exports folder for this module: the shrunk ViT is exported and quantized once."""
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(autouse=True)
def _exports_env(exports, monkeypatch):
    monkeypatch.setenv("COSMOS_EXPORTS", str(exports))


def _images(seed: int, n: int = 4) -> list[np.ndarray]:
    """Smooth grey / RGB images of a few sizes (seeded)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (200, 256) if i % 2 else (256, 180)
        base = np.kron(rng.standard_normal((h // 8 + 1, w // 8 + 1)), np.ones((8, 8)))[:h, :w]
        image = np.clip(120 + 40 * base + rng.normal(0, 5, (h, w)), 0, 255).astype(np.uint8)
        out.append(np.stack([image, image // 2 + 40, 255 - image], -1) if i % 3 == 2 else image)
    return out


@pytest.fixture(scope="module")
def vit():
    return shrunk_vit()


@pytest.fixture(scope="module")
def quantized(vit, exports):
    """(int8 model, float32 OpenVINO model of the same weights, calibration): the export and
    the quantization, once for the module."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COSMOS_EXPORTS", str(exports))
        calibration = backends.calibration_set(_images(0))
        fp32 = dataclasses.replace(vit, backend="openvino")
        int8 = dataclasses.replace(vit, backend=INT8, calibration=calibration)
    return int8, fp32, calibration


# ---- the calibration set


def test_calibration_set_is_seeded_stable_and_named():
    images = _images(1, 20)
    cal = quantize.calibration_set(images, n=16)
    assert len(cal) == 16 and list(cal.names) == sorted(cal.names)
    again = quantize.calibration_set([im.copy() for im in images], n=16)
    assert again.key == cal.key and again.names == cal.names
    other_seed = quantize.calibration_set(images, n=16, seed=1)
    assert other_seed.names != cal.names and other_seed.key != cal.key
    # one chosen image changed: another key; a left-out image changed: the same key
    chosen = int(cal.names[0][1:])
    left_out = next(i for i in range(20) if f"#{i}" not in cal.names)
    for index, same in ((chosen, False), (left_out, True)):
        changed = [im.copy() for im in images]
        changed[index][0, 0] ^= 1
        assert (quantize.calibration_set(changed, n=16).key == cal.key) is same
    assert len(quantize.calibration_set(images[:3])) == 3  # fewer than n: all of them


def test_calibration_from_a_root_and_its_errors(tmp_path, demo_root):
    cal = quantize.calibration_set(demo_root, n=5)
    listed = {f"{t}/{i}" for t, i, _ in layout.list_images(demo_root)}
    assert len(cal) == 5 and set(cal.names) <= listed
    assert quantize.calibration_set(demo_root, n=5).key == cal.key
    with pytest.raises(InputError, match="calibration=") as err:
        quantize.calibration_set(None)
    assert "openvino-int8" in str(err.value)
    with pytest.raises(InputError, match="no COSMOS-layout images"):
        quantize.calibration_set(tmp_path)
    with pytest.raises(InputError, match="expected uint8"):
        quantize.calibration_set([np.zeros((8, 8), np.float32)])


# ---- quantization, export cache, key


@pytest.mark.slow
def test_quantization_runs_records_and_stays_near_float32(quantized):
    int8, fp32, calibration = quantized
    path = backends.exported_path(int8, INT8)
    assert path.is_file() and path.parent.parent == backends.paths.exports_dir()
    record = backends.quantization_record(path)
    assert record["calibration"]["digests"] == list(calibration.digests)
    assert record["calibration"]["key"] == calibration.key and record["quantize_s"] > 0
    # the float32 IR it was quantized from is the "openvino" export of the same model
    assert backends.exported_path(fp32, "openvino").is_file()
    with open(path.with_suffix(".xml")) as handle:
        assert "FakeQuantize" in handle.read()  # really quantized
    rel, diffs = [], []
    for image in calibration.images + tuple(_images(7, 2)):
        e32 = fp32.encode([image])[0]
        e8 = int8.encode([image])[0]
        assert e8.shape == (256, 64, 64) and e8.dtype == np.float32 and np.isfinite(e8).all()
        diffs.append(float(np.abs(e8 - e32).max()))
        rel.append(diffs[-1] / float(np.abs(e32).max()))
    message = (f"int8 vs float32: max |diff| {max(diffs):.3g}, relative to max |e| "
               f"{max(rel):.3g} (limit {EMBED_RTOL_INT8})")
    print(message)
    assert max(rel) <= EMBED_RTOL_INT8, message
    assert max(diffs) > 1e-4, "int8 embeddings equal float32's: nothing was quantized"


@pytest.mark.slow
def test_second_load_reuses_the_export(quantized, vit, monkeypatch):
    int8, _, calibration = quantized

    def no_quantize(*args, **kwargs):
        raise AssertionError("quantized again although a finished int8 export exists")

    monkeypatch.setattr(quantize, "quantize_ir", no_quantize)
    monkeypatch.setattr(backends, "_export_onnx", no_quantize)
    again = dataclasses.replace(vit, backend=INT8,
                                calibration=backends.calibration_set(list(calibration.images)))
    assert again.signature == int8.signature
    image = calibration.images[0]
    assert np.array_equal(again.encode([image]), int8.encode([image]))


def _as_backend(vit, backend, calibration=None):
    """A copy of ``vit`` that says it runs ``backend`` (nothing exported: for keys only)."""
    model = dataclasses.replace(vit)
    model.backend, model.calibration = backend, calibration
    return model


def test_key_and_signature_follow_the_calibration(vit, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    first = backends.calibration_set(_images(0))
    int8 = _as_backend(vit, INT8, first)
    other = _as_backend(vit, INT8, backends.calibration_set(_images(3)))
    same = _as_backend(vit, INT8, backends.calibration_set([im.copy() for im in _images(0)]))
    fp32 = _as_backend(vit, "openvino")
    assert other.signature["encoder"] != int8.signature["encoder"]
    assert backends.exported_path(other, INT8) != backends.exported_path(int8, INT8)
    assert backends.exported_path(same, INT8) == backends.exported_path(int8, INT8)
    entry = int8.signature["encoder"]
    assert entry == (f"openvino-int8-{backends.backend_version('openvino')}-nncf"
                     f"{importlib.metadata.version('nncf')}-cal{first.key}")
    # the settings are part of the key: another quantization recipe, another export
    before = backends.exported_path(int8, INT8)
    settings = dict(quantize.SETTINGS, version=quantize.SETTINGS["version"] + 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantize, "SETTINGS", settings)
        assert backends.exported_path(int8, INT8) != before
    # the float32 IR it is quantized from is the "openvino" export of the same model
    assert backends.exported_path(int8, "openvino") == backends.exported_path(fp32, "openvino")
    # the embedding cache keys int8 apart from float32, torch and another calibration
    stores = {EmbeddingCache(tmp_path, m).store for m in (vit, fp32, int8, other)}
    assert len(stores) == 4
    assert EmbeddingCache(tmp_path, same).store == EmbeddingCache(tmp_path, int8).store


def test_uncalibrated_int8_is_a_clear_error(vit):
    model = _as_backend(vit, INT8)
    with pytest.raises(InputError, match="calibration"):
        backends.exported_path(model, INT8)
    with pytest.raises(InputError, match="calibration"):
        backends.load_encoder(model)


@pytest.mark.parametrize("missing", ["nncf", "openvino"])
def test_missing_openvino_or_nncf(missing, vit, monkeypatch):
    monkeypatch.setitem(sys.modules, missing, None)  # `import <missing>` now raises ImportError
    assert not backends.backend_available(INT8)
    model = _as_backend(vit, INT8, backends.calibration_set(_images(5, 2)))
    with pytest.raises(ImportError, match=f"'{missing}'") as err:
        backends.load_encoder(model, exports_dir=None)
    assert "pip install" in str(err.value) and "runtimes" in str(err.value)
    with pytest.warns(backends.BackendFallbackWarning, match=f"'{missing}'"):
        assert backends.resolve_backend(INT8) == "torch"


def test_auto_never_means_int8(vit, monkeypatch):
    assert INT8 not in backend_probe.AUTO_ORDER
    assert backends.check_backend(" INT8 ") == INT8
    monkeypatch.setenv(backend_probe.ENV_BACKEND, "openvino-int8")
    with pytest.raises(InputError, match="never means int8"):
        backend_probe.choose_backend(vit)
    with pytest.raises(InputError, match="parity probe cannot pass"):
        backend_probe.probe(vit, INT8)


# ---- the agreement table


def test_meets_default_bar():
    table = pd.DataFrame({"strategy": ["S1", "S2"], "agreement": [99.6, 99.5]})
    assert int8_tradeoff.meets_default_bar(table)
    assert not int8_tradeoff.meets_default_bar(table.assign(agreement=[99.6, 99.4]))
    assert not int8_tradeoff.meets_default_bar(table.assign(agreement=[99.6, np.nan]))
    assert not int8_tradeoff.meets_default_bar(table.iloc[:0])


def _small_manifest(demo_root, n_images=2, n_objects=2):
    manifest = indexer.index(demo_root)
    images = sorted(manifest["image_path"].unique())[:n_images]
    sub = manifest[manifest["image_path"].isin(images)]
    return sub.sort_values("area_px", ascending=False).groupby("image_path").head(n_objects)


@pytest.mark.slow
def test_agreement_of_one_encoder_with_itself_is_total(vit, demo_root, tmp_path):
    """(Slow: two evaluate runs, 10-20 s.) Known answer: the same encoder under two signatures
    agrees at 100 % on every strategy, with no change of any mean; one signature twice is
    refused."""
    twin = dataclasses.replace(vit, checkpoint_sha256="random-0-twin")
    manifest = _small_manifest(demo_root, n_images=1)
    table = int8_tradeoff.agreement_table(manifest, demo_root, vit, twin, tmp_path / "a",
                                          points_per_side=4, cache_dir=tmp_path / "cache")
    assert list(table.columns) == list(int8_tradeoff.COLUMNS)
    assert list(table["strategy"]) == ["S1", "S2", "S3", "S4", "S5", "S6"]
    assert (table["n_objects"] == len(manifest)).all()
    assert (table["agreement"] == 100).all() and (table["agreement_min"] == 100).all()
    assert (table["dice_change"] == 0).all()
    assert table["dice_change_pred_iou"].iloc[1:].eq(0).all()
    assert np.isnan(table["dice_change_pred_iou"].iloc[0])  # S1: oracle rule only
    assert int8_tradeoff.meets_default_bar(table)
    with pytest.raises(InputError, match="same signature"):
        int8_tradeoff.agreement_table(manifest, demo_root, vit, vit, tmp_path / "b")


@pytest.mark.slow
def test_agreement_of_int8_is_measured(quantized, demo_root, tmp_path):
    int8, fp32, _ = quantized
    manifest = _small_manifest(demo_root, n_images=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        table = int8_tradeoff.agreement_table(manifest, demo_root, fp32, int8, tmp_path / "a",
                                              strategies=["S1", "S5"], points_per_side=4,
                                              cache_dir=tmp_path / "cache")
    print(table.to_string())
    assert list(table["strategy"]) == ["S1", "S5"]
    assert table["agreement"].between(0, 100).all()
    assert (table["agreement_min"] <= table["agreement"]).all()
    np.testing.assert_allclose(table["dice_change"],
                               table["dice_candidate"] - table["dice_reference"])
    assert table.attrs["candidate"]["encoder"] == int8.signature["encoder"]


# ---- load_model


def test_load_model_int8_needs_calibration_and_falls_back_without_nncf(monkeypatch):
    from cosmoslib import models

    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    with pytest.raises(InputError, match="calibration="):
        models.load_model("litemedsam", device="cpu", backend="openvino-int8")
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.warns(backends.BackendFallbackWarning, match="'nncf'"):
        model = models.load_model("litemedsam", device="cpu", backend="openvino-int8",
                                  calibration=_images(2, 2))
    assert model.backend == "torch" and model.calibration is None and "encoder" not in model.signature


@pytest.mark.slow
def test_load_model_int8_with_calibration(demo_root, tmp_path, monkeypatch):
    """(Slow: exports and quantizes the real LiteMedSAM encoder.) ``load_model(...,
    calibration=...)`` with two of the demo's images: the calibration is the model's and is
    recorded beside the export; embeddings stay near the float32 runtime's."""
    from cosmoslib import models

    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    monkeypatch.setenv("COSMOS_EXPORTS", str(tmp_path / "exports"))
    model = models.load_model("litemedsam", device="cpu", backend="openvino-int8",
                              calibration=quantize.calibration_set(demo_root, n=2))
    expected = quantize.calibration_set(demo_root, n=2)
    assert model.backend == INT8 and model.calibration.key == expected.key
    record = backends.quantization_record(backends.exported_path(model, INT8))
    assert record["calibration"]["names"] == list(expected.names)
    fp32 = models.load_model("litemedsam", device="cpu", backend="openvino")
    image = expected.images[0]
    e32, e8 = fp32.encode([image])[0], model.encode([image])[0]
    rel_l2 = float(np.linalg.norm(e8 - e32) / np.linalg.norm(e32))
    rel_max = float(np.abs(e8 - e32).max() / np.abs(e32).max())
    message = (f"LiteMedSAM int8 vs float32 on a calibration image: relative L2 {rel_l2:.3g} "
               f"(limit {LITEMEDSAM_REL_L2}), relative max |diff| {rel_max:.3g}")
    print(message)
    assert 0 < rel_l2 <= LITEMEDSAM_REL_L2, message
