"""Optional encoder runtimes (cosmoslib.models.backends): parity with torch, export cache, signature,
and a clean fallback when a runtime's package is missing.

Parity (LiteMedSAM, real weights, real demo images): embeddings within :data:`EMBED_ATOL` of
the torch encoder's, and box-prompt masks decoded from them at mean DICE >= 99.9 % of the
masks decoded from torch's embeddings. ``benchmarks/encode.py`` measures the speed.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

from cosmoslib import models
from cosmoslib.files import InputError
from cosmoslib.models import backends
from cosmoslib.models.cache import EmbeddingCache
from cosmoslib.protocol.prompts import Prompt
from cosmoslib.tests.demo_cases import largest_object_images

#: Largest |runtime - torch| allowed for embeddings (values of order 1; measured ~3e-6).
EMBED_ATOL = 1e-4
#: Demo images (one per task, the largest object's image) and objects per image for DICE.
N_IMAGES = 3
OBJECTS_PER_IMAGE = 4

RUNTIMES = ("onnxruntime", "openvino")


@pytest.fixture(autouse=True)
def _exports_dir(tmp_path_factory, monkeypatch):
    """Exported encoders go to a folder of this test session, not the user's."""
    monkeypatch.setenv("COSMOS_EXPORTS", str(tmp_path_factory.getbasetemp() / "exports"))


def _load(backend: str) -> models.SamFamilyModel:
    pytest.importorskip(backend, reason=f"{backend} not installed (extra: runtimes)")
    return models.load_model("litemedsam", device="cpu", backend=backend)


def _demo_images(demo_root):
    return largest_object_images(demo_root, N_IMAGES, OBJECTS_PER_IMAGE)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / float(total)


@pytest.fixture(scope="module")
def torch_reference(demo_root, litemedsam):
    """The demo images of the parity test with the torch encoder's embeddings: encoded once for
    both runtimes."""
    return [(img, label, values, litemedsam.encode([img])[0]) for img, label, values in _demo_images(demo_root)]


@pytest.mark.slow
@pytest.mark.parametrize("backend", RUNTIMES)
def test_runtime_matches_torch_on_demo(backend, torch_reference, litemedsam):
    model = _load(backend)
    assert model.backend == backend
    images = torch_reference
    diffs, scores = [], []
    for img, label, values, e_torch in images:
        e_rt = model.encode([img])[0]
        assert e_rt.dtype == np.float32 and e_rt.shape == (256, 64, 64)
        diffs.append(float(np.abs(e_rt - e_torch).max()))
        for value in values:
            ys, xs = np.nonzero(label == value)
            prompt = Prompt(box=np.array([xs.min(), ys.min(), xs.max(), ys.max()]))
            m_torch = litemedsam.decode(e_torch, prompt, img.shape).masks[0]
            m_rt = litemedsam.decode(e_rt, prompt, img.shape).masks[0]
            scores.append(_dice(m_torch, m_rt))
    print(f"LiteMedSAM {backend} vs torch on {len(images)} demo images: max |emb diff| "
          f"{max(diffs):.2e}; mask DICE mean {np.mean(scores):.6f}, min {np.min(scores):.6f}, "
          f"n={len(scores)}")
    assert len(scores) >= N_IMAGES
    assert max(diffs) <= EMBED_ATOL
    assert max(diffs) > 0  # really another runtime, not the torch module again
    assert np.mean(scores) >= 0.999


@pytest.mark.slow
@pytest.mark.parametrize("backend", RUNTIMES)
def test_runtime_batches_and_reuses_its_export(backend, monkeypatch):
    model = _load(backend)
    path = backends.exported_path(model, backend)
    assert path.is_file() and path.parent.parent == backends.paths.exports_dir()
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (90, 120), dtype=np.uint8),
            rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    one = np.stack([model.encode([im])[0] for im in imgs])
    both = model.encode(imgs, batch_size=2)  # the exported graph has a dynamic batch axis
    assert np.abs(one - both).max() <= EMBED_ATOL

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although a finished export exists")

    monkeypatch.setattr(backends, "_export_onnx", no_export)
    again = models.load_model("litemedsam", device="cpu", backend=backend)
    assert np.abs(again.encode(imgs[:1])[0] - one[0]).max() <= EMBED_ATOL


def test_signature_and_cache_store_differ_per_backend(litemedsam, tmp_path):
    loaded = {"torch": litemedsam}
    for backend in RUNTIMES:
        if backends.backend_available(backend):
            loaded[backend] = _load(backend)
    if len(loaded) < 2:
        pytest.skip("no optional runtime installed (extra: runtimes)")
    assert "encoder" not in litemedsam.signature
    for backend, model in loaded.items():
        if backend != "torch":
            assert model.signature["encoder"] == (
                f"{backend}-{backends.backend_version(backend)}-fp32")
    hashes = {b: m.signature_hash for b, m in loaded.items()}
    stores = {b: EmbeddingCache(tmp_path, m).store for b, m in loaded.items()}
    assert len(set(hashes.values())) == len(loaded)
    assert len(set(stores.values())) == len(loaded)


@pytest.mark.parametrize("backend,missing", [("onnxruntime", "onnxruntime"),
                                             ("openvino", "openvino"), ("openvino", "onnx")])
def test_missing_package_falls_back_to_torch_with_install_hint(backend, missing, monkeypatch,
                                                               litemedsam):
    monkeypatch.setitem(sys.modules, missing, None)  # `import <missing>` now raises ImportError
    assert not backends.backend_available(backend)
    with pytest.warns(backends.BackendFallbackWarning) as record:
        model = models.load_model("litemedsam", device="cpu", backend=backend)
    message = next(str(w.message) for w in record
                   if issubclass(w.category, backends.BackendFallbackWarning))
    assert repr(backend) in message and repr(missing) in message
    assert "pip install" in message and "runtimes" in message
    assert model.backend == "torch"
    assert model.signature == litemedsam.signature  # cached under torch's key
    img = np.random.default_rng(1).integers(0, 256, (50, 70), dtype=np.uint8)
    assert np.abs(model.encode([img]) - litemedsam.encode([img])).max() <= EMBED_ATOL
    with pytest.raises(ImportError, match=f"pip install {missing}"):
        backends.load_encoder(model, backend)


def test_unknown_backend_and_gpu_are_input_errors():
    with pytest.raises(InputError, match="unknown encoder backend"):
        backends.check_backend("tensorrt")
    assert backends.check_backend(" ORT ") == "onnxruntime"
    assert backends.resolve_backend("torch", "cuda") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning for a plain torch model
        assert backends.resolve_backend("torch") == "torch"
    with pytest.raises(InputError, match="CPU only"):
        backends.resolve_backend("onnxruntime", "cuda")
