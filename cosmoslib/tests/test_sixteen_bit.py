"""A 16-bit (or any wider integer) image in a COSMOS folder is min-max normalised, in every verb."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from cosmoslib.data import indexer, preprocess, readers
from cosmoslib.files import InputError
from cosmoslib.models import cache
from cosmoslib.protocol import embed, evaluate


def _ramp(shape=(24, 32), low=300, high=4000) -> np.ndarray:
    """Real 16-bit data: a smooth ramp plus a bright square, ``low``..``high``."""
    h, w = shape
    img = np.linspace(low, high - 1000, h * w).reshape(h, w)
    img[4:12, 6:16] = high
    return img.astype(np.uint16)


def test_a_16_bit_png_is_min_max_normalised_as_the_paper_does(tmp_path):
    raw = _ramp()
    Image.fromarray(raw).save(tmp_path / "ct.png")
    decoded = readers.decode_image(tmp_path / "ct.png")
    assert decoded.rescaled and decoded.stored_dtype in ("uint16", "int32")  # Pillow's 16-bit grey modes
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.min() == 0 and decoded.pixels.max() == 255
    # the very function of the paper's preprocessing, not a second copy of it
    np.testing.assert_array_equal(decoded.pixels, preprocess.minmax_normalize(raw))
    assert preprocess.minmax_normalize is readers.minmax_normalize
    np.testing.assert_array_equal(readers.read_image(tmp_path / "ct.png"), decoded.pixels)


def test_other_integer_widths_and_8_bit_data(tmp_path):
    hu = np.array([[-1024, -200, 0], [40, 400, 3071]], np.int16)  # CT in Hounsfield units
    tifffile.imwrite(tmp_path / "hu.tif", hu)
    decoded = readers.decode_image(tmp_path / "hu.tif")
    assert decoded.rescaled and decoded.stored_dtype == "int16"
    np.testing.assert_array_equal(decoded.pixels, preprocess.minmax_normalize(hu))
    assert decoded.pixels[0, 0] == 0 and decoded.pixels[1, 2] == 255
    # 8-bit values stored in 16 bits stay as they are (nothing to rescale)
    Image.fromarray(np.array([[3, 200], [0, 255]], np.uint16)).save(tmp_path / "eight.png")
    eight = readers.decode_image(tmp_path / "eight.png")
    assert not eight.rescaled and eight.pixels.tolist() == [[3, 200], [0, 255]]
    Image.fromarray(np.array([[1, 2], [3, 4]], np.uint8)).save(tmp_path / "u8.png")
    u8 = readers.decode_image(tmp_path / "u8.png")
    assert (u8.stored_dtype, u8.rescaled, u8.pixels.tolist()) == ("uint8", False, [[1, 2], [3, 4]])


def test_a_constant_or_float_image_is_a_clear_error_naming_the_file(tmp_path):
    Image.fromarray(np.full((8, 8), 4000, np.uint16)).save(tmp_path / "flat.png")
    with pytest.raises(InputError, match="constant intensity") as exc:
        readers.read_image(tmp_path / "flat.png")
    assert exc.value.path == str(tmp_path / "flat.png") and "flat.png" in str(exc.value)
    tifffile.imwrite(tmp_path / "float.tif", np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4))
    with pytest.raises(InputError, match="float32 image .*cosmos prepare") as exc:
        readers.read_image(tmp_path / "float.tif")
    assert exc.value.path == str(tmp_path / "float.tif")


@pytest.fixture()
def folder(demo_root, tmp_path):
    """One demo task copied, one image turned into real 16-bit data and one into a constant 16-bit image."""
    task = "pyradiomics_lung_ct"
    root = tmp_path / "root"
    for sub in ("images", "labels"):
        (root / task / sub).mkdir(parents=True)
        for path in sorted((demo_root / task / sub).glob("*.png"))[:3]:
            (root / task / sub / path.name).write_bytes(path.read_bytes())
    (root / f"{task}.json").write_bytes((demo_root / f"{task}.json").read_bytes())
    images = sorted((root / task / "images").glob("*.png"))
    original = readers.read_image(images[0])
    wide = original.astype(np.uint16) * 16 + 1000  # 1000..5080: needs rescaling
    Image.fromarray(wide).save(images[0])
    Image.fromarray(np.full(original.shape[:2], 777, np.uint16)).save(images[1])
    return root, task, images, original


def test_index_keeps_the_16_bit_image_and_says_it_was_rescaled(folder, tmp_path):
    root, task, images, _ = folder
    report = indexer.index_to_parquet(root, tmp_path / "manifest.parquet", progress=False)
    manifest = pd.read_parquet(tmp_path / "manifest.parquet")
    assert "rescaled" in indexer.MANIFEST_COLUMNS and manifest["rescaled"].dtype == bool
    by_image = manifest.groupby("image_id")["rescaled"].agg(set)
    assert by_image[images[0].stem] == {True} and by_image[images[2].stem] == {False}
    assert images[1].stem not in set(manifest["image_id"])  # the constant image: skipped with its reason
    skipped = dict(pd.read_csv(report.skipped_csv).itertuples(index=False))
    assert "constant intensity" in skipped[str(images[1])]
    assert report.rescaled == [(str(images[0]), readers.decode_image(images[0]).stored_dtype)]
    assert "1 image(s) stored wider than 8 bits" in report.summary() and "rescaled" in report.summary()


def test_embed_and_evaluate_read_the_same_pixels(folder, litemedsam, tmp_path):
    """The cache is keyed by decoded pixels: the 16-bit file is the normalised image, in every verb."""
    root, task, images, original = folder
    for other in images[1:]:  # only the 16-bit image in this check
        other.unlink()
        (root / task / "labels" / other.name).unlink()
    expected = preprocess.minmax_normalize(original.astype(np.uint16) * 16 + 1000)
    report = embed.embed_root(root, litemedsam, cache_dir=tmp_path / "cache", progress=False)
    assert report.n_failed == 0 and report.n_computed == 1
    store = cache.EmbeddingCache(tmp_path / "cache", litemedsam)
    assert store.has(cache.image_key(expected))
    manifest = indexer.index(root)
    assert manifest["rescaled"].all()
    results, rep = evaluate.evaluate(manifest, root, [litemedsam], tmp_path / "r.parquet", strategies=["S5"],
                                     cache_dir=tmp_path / "cache", progress=False)
    assert rep.n_failed == 0 and rep.n_parts_done == 1 and set(results["image_id"]) == {images[0].stem}
    assert store.metadata(cache.image_key(expected))["source"] == str(images[0])  # computed once, by `embed`
