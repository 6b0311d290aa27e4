"""The embedding cache (cosmoslib.models.cache) with the real LiteMedSAM encoder.

Each embedding must be computed once, found again by image content, recomputed when the
checkpoint changes or the entry is damaged, and survive a SIGKILL of the writing process.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cosmoslib import cli, models
from cosmoslib.data import indexer, layout, readers
from cosmoslib.files import InputError
from cosmoslib.models import cache, legacy_cache, registry
from cosmoslib.models import pack as pack_format
from cosmoslib.models.cache import EmbeddingCache, image_key
from cosmoslib.protocol import embed
from cosmoslib.protocol.prompts import Prompt


def make_root(root: Path, n: int, seed: int = 0) -> Path:
    """A small COSMOS-layout folder: n noisy images (grey and RGB, several sizes) with a square."""
    rng = np.random.default_rng(seed)
    objects = {}
    for i in range(n):
        h, w = 48 + 8 * i, 64
        img = rng.integers(0, 256, (h, w) if i % 2 == 0 else (h, w, 3), dtype=np.uint8)
        label = np.zeros((h, w), np.uint8)
        label[10:30, 12:40] = 1
        objects[1] = "square"
        layout.write_pair(root, "toy", f"img{i:02d}", img, label)
    layout.write_task(root, "toy", objects, dataset="toy", modality="CT")
    return root


#: Tolerance between an fp16 cache entry and another encode of the same image: one float16
#: step (2**-10 relative at most) for the rounding, plus float32 noise near zero.
FP16_RTOL, FP16_ATOL = 2.0 ** -9, 1e-5


@pytest.fixture
def counting(litemedsam, monkeypatch):
    """The real model, counting the images its encoder sees."""
    calls = {"images": 0}
    encode = type(litemedsam).encode

    def counted(images, batch_size=None):
        images = list(images)
        calls["images"] += len(images)
        return encode(litemedsam, images, batch_size=batch_size)

    monkeypatch.setattr(litemedsam, "encode", counted)
    return litemedsam, calls


@pytest.fixture(scope="module")
def filled(tmp_path_factory, litemedsam):
    """A root of 3 images and a cache holding all of them (computed once for the module)."""
    base = tmp_path_factory.mktemp("filled")
    root = make_root(base / "root", 3)
    report = embed.embed_root(root, litemedsam, cache_dir=base / "cache", progress=False)
    assert (report.n_computed, report.n_reused, report.n_failed) == (3, 0, 0)
    return root, base / "cache"


def copy_cache(filled, tmp_path) -> tuple[Path, Path]:
    """Private copies of the filled root and cache (tests change them)."""
    root, cache_dir = filled
    shutil.copytree(root, tmp_path / "root")
    shutil.copytree(cache_dir, tmp_path / "cache")
    return tmp_path / "root", tmp_path / "cache"


def test_image_key_is_content_based(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png", compress_level=9)
    Image.fromarray(img).save(tmp_path / "b.png", compress_level=0)
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()
    keys = {image_key(readers.read_image(tmp_path / n)) for n in ("a.png", "b.png")}
    assert keys == {image_key(img)}
    assert image_key(img.T) != image_key(img)  # same bytes count, other shape
    assert image_key(np.repeat(img[..., None], 3, 2)) != image_key(img)


def test_get_computes_once_and_stores_fp16(tmp_path, counting):
    model, calls = counting
    img = np.random.default_rng(1).integers(0, 256, (70, 90), dtype=np.uint8)
    c = EmbeddingCache(tmp_path, model)
    first, seconds = c.get_with_time(img)
    assert calls["images"] == 1 and seconds > 0
    again, seconds_again = c.get_with_time(img)
    assert calls["images"] == 1  # served from the cache
    assert seconds_again == pytest.approx(seconds)
    assert first.dtype == np.float32 and first.shape == (256, 64, 64)
    assert np.array_equal(first, again)  # the stored bytes, read twice
    # Stored as float16: float16 values, within float16 rounding (2**-11 relative) of a direct
    # encode; a tolerance, since the direct encode need not round like the cached one.
    assert np.array_equal(first, first.astype(np.float16).astype(np.float32))
    direct = type(model).encode(model, [img])[0]
    assert np.abs(first - direct).max() > 0  # really rounded
    np.testing.assert_allclose(first, direct, rtol=FP16_RTOL, atol=FP16_ATOL)
    meta = c.metadata(image_key(img))
    assert meta["original_size"] == [70, 90] and meta["input_size"] == [199, 256]
    assert meta["dtype"] == "float16" and meta["signature"] == model.signature
    assert c.store.name == f"litemedsam-{model.signature_hash}-fp16.zarr"
    with pytest.raises(KeyError):
        c.load("0" * 32)


def test_second_run_encodes_nothing(filled, tmp_path, counting):
    model, calls = counting
    root, cache_dir = copy_cache(filled, tmp_path)
    # A re-encoded copy of one image under another name hits the same entry.
    src = layout.list_images(root)[0][2]
    Image.fromarray(readers.read_image(src)).save(root / "toy" / "images" / "copy.png", compress_level=0)
    report = embed.embed_root(root, model, cache_dir=cache_dir, progress=False)
    assert calls["images"] == 0
    assert (report.n_images, report.n_computed, report.n_reused, report.n_failed) == (4, 0, 4, 0)
    assert "0 computed, 4 reused" in report.summary()
    assert EmbeddingCache(cache_dir, model).verify() == {}


def test_changed_checkpoint_recomputes(filled, tmp_path, litemedsam, monkeypatch):
    root, cache_dir = copy_cache(filled, tmp_path)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    state = torch.load(litemedsam.checkpoint_path, map_location="cpu", weights_only=True)
    state["image_encoder.neck.3.bias"] += 0.05
    torch.save(state, tmp_path / "finetuned.pth")
    models.register_model("lite_finetuned", "litemedsam", tmp_path / "finetuned.pth")
    tuned = models.load_model("lite_finetuned", device="cpu")
    assert tuned.checkpoint_sha256 != litemedsam.checkpoint_sha256
    report = embed.embed_root(root, tuned, cache_dir=cache_dir, progress=False)
    assert (report.n_computed, report.n_reused) == (3, 0)
    old, new = EmbeddingCache(cache_dir, litemedsam), EmbeddingCache(cache_dir, tuned)
    assert old.store != new.store and len(old) == len(new) == 3
    key = old.keys()[0]
    assert np.abs(new.load(key) - old.load(key)).mean() > 0.01


def _record(c: EmbeddingCache, key: str) -> tuple[Path, int, int, int]:
    """(pack file, offset, metadata length, array length) of the oldest packed entry of ``key``."""
    c._refresh()
    _, pack, offset, meta_len, data_len, _ = c._index[key][0]
    return c.packs / pack, offset, meta_len, data_len


def _last_key(c: EmbeddingCache) -> str:
    """The entry written last into its pack (truncating the pack then damages only it)."""
    return max(c.keys(), key=lambda k: _record(c, k)[1])


def _patch(pack: Path, at: int, data: bytes) -> None:
    raw = bytearray(pack.read_bytes())
    raw[at:at + len(data)] = data
    pack.write_bytes(bytes(raw))


def _repoint(c: EmbeddingCache, key: str, meta: bytes, payload: bytes) -> None:
    """Append a forged, well-formed record for ``key`` and point its index record at it
    (an entry edited by someone who knows the format: only the content checks can tell)."""
    pack, _, _, _ = _record(c, key)
    idx = pack.with_suffix(".idx")
    raw = bytearray(idx.read_bytes())
    at = next(i for i in range(0, len(raw), pack_format.IDX.size) if raw[i:i + 16] == bytes.fromhex(key))
    offset = pack.stat().st_size
    with open(pack, "ab") as fh:
        fh.write(meta + payload)
    raw[at:at + pack_format.IDX.size] = pack_format.IDX.pack(bytes.fromhex(key), offset, len(meta), len(payload),
                                                             0.0, hashlib.blake2b(meta, digest_size=16).digest())
    idx.write_bytes(bytes(raw))


def _meta_payload(c: EmbeddingCache, key: str) -> tuple[dict, bytes]:
    pack, offset, meta_len, data_len = _record(c, key)
    raw = pack.read_bytes()[offset:offset + meta_len + data_len]
    return json.loads(raw[:meta_len]), raw[meta_len:]


def _edit_value_keep_format(c: EmbeddingCache, key: str) -> None:
    meta, _ = _meta_payload(c, key)
    data = c.load(key).astype(np.float16)
    data[0, 0, 0] += 1
    _repoint(c, key, json.dumps(meta).encode(), pack_format.CODEC.encode(data))


def _edit_signature(c: EmbeddingCache, key: str) -> None:
    meta, payload = _meta_payload(c, key)
    meta["signature"]["checkpoint_sha256"] = "0" * 64
    _repoint(c, key, json.dumps(meta).encode(), payload)


def _flip_bytes(c: EmbeddingCache, key: str) -> None:
    pack, offset, meta_len, _ = _record(c, key)
    at = offset + meta_len + 100
    _patch(pack, at, bytes(b ^ 0xFF for b in pack.read_bytes()[at:at + 40]))


def _truncate(c: EmbeddingCache, key: str) -> None:
    pack, offset, meta_len, _ = _record(c, key)
    with open(pack, "r+b") as fh:
        fh.truncate(offset + meta_len + 1000)


CORRUPTIONS = {
    "flipped bytes": _flip_bytes,
    "truncated pack": _truncate,
    "garbled metadata": lambda c, k: _patch(_record(c, k)[0], _record(c, k)[1], b'{"zarr_format": 3, "node_t'),
    "edited value": _edit_value_keep_format,
    "other signature": _edit_signature,
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_entry_is_detected_and_recomputed(corruption, filled, tmp_path, counting):
    model, calls = counting
    root, cache_dir = copy_cache(filled, tmp_path)
    c = EmbeddingCache(cache_dir, model)
    key = _last_key(c)
    good = c.load(key)
    CORRUPTIONS[corruption](c, key)
    c = EmbeddingCache(cache_dir, model)  # a process that opens the damaged cache
    assert set(c.verify()) == {key}
    with pytest.raises(InputError, match="invalid cache entry"):
        c.load(key)
    report = c.ensure([p for _, _, p in layout.list_images(root)], progress=False)
    assert (report.n_computed, report.n_invalid, report.n_reused) == (1, 1, 2)
    assert calls["images"] == 1
    assert c.verify() == {} and EmbeddingCache(cache_dir, model).verify() == {}
    # Recomputed, not restored: equal to the original entry up to one float16 step.
    np.testing.assert_allclose(c.load(key), good, rtol=FP16_RTOL, atol=FP16_ATOL)


def test_torn_index_record_is_ignored(filled, tmp_path, counting):
    """A writer killed while appending an index record: that entry is simply not there."""
    model, calls = counting
    root, cache_dir = copy_cache(filled, tmp_path)
    c = EmbeddingCache(cache_dir, model)
    key = _last_key(c)
    idx = _record(c, key)[0].with_suffix(".idx")
    raw = idx.read_bytes()
    at = next(i for i in range(0, len(raw), pack_format.IDX.size) if raw[i:i + 16] == bytes.fromhex(key))
    idx.write_bytes(raw[:at + 30])  # also drops the seal record behind it
    c = EmbeddingCache(cache_dir, model)
    assert key not in c.keys() and len(c) == 2 and c.verify() == {}
    report = c.ensure([p for _, _, p in layout.list_images(root)], progress=False)
    assert (report.n_computed, report.n_invalid, report.n_reused, calls["images"]) == (1, 0, 2, 1)
    assert EmbeddingCache(cache_dir, model).verify() == {}


def test_half_written_temporaries_are_ignored_and_cleaned(filled, tmp_path, litemedsam):
    root, cache_dir = copy_cache(filled, tmp_path)
    c = EmbeddingCache(cache_dir, litemedsam)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(done.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        key = c.keys()[0]
        dead_tmp = c.store / f".tmp-{key}-{dead_pid}-abcdef12"  # per-image layout leftovers
        dead_tmp.mkdir()
        (dead_tmp / "zarr.json").write_bytes(b"half")
        live_tmp = c.store / f".tmp-{key}-{live.pid}-abcdef12"
        live_tmp.mkdir()
        # packs whose writer wrote no complete entry: one dead, one alive
        dead_pack = c.packs / f"{pack_format.HOST_TAG}-{dead_pid}-20240101T000000-abcdef12.pack"
        dead_pack.write_bytes(b"half an entry")
        dead_pack.with_suffix(".idx").write_bytes(b"torn")
        live_pack = c.packs / f"{pack_format.HOST_TAG}-{live.pid}-20240101T000000-abcdef12.pack"
        live_pack.write_bytes(b"")
        assert c.keys() == sorted(c.keys()) and len(c) == 3
        EmbeddingCache(cache_dir, litemedsam)  # opening cleans up
        assert not dead_tmp.exists() and live_tmp.exists()
        assert not dead_pack.exists() and not dead_pack.with_suffix(".idx").exists() and live_pack.exists()
    finally:
        live.kill()
        live.wait()
    assert EmbeddingCache(cache_dir, litemedsam).clean_temporaries() == 0
    assert not live_tmp.exists() and not live_pack.exists()
    assert EmbeddingCache(cache_dir, litemedsam).verify() == {}


KILL_SCRIPT = """
import sys
from cosmoslib.protocol import embed
embed.embed_root(sys.argv[1], "litemedsam", cache_dir=sys.argv[2], device="cpu", progress=False)
"""


def _complete_records(store: Path) -> int:
    """Index records written completely, over all packs of a store."""
    return sum(p.stat().st_size // pack_format.IDX.size for p in (store / "packs").glob("*.idx")) \
        if (store / "packs").is_dir() else 0


@pytest.mark.slow
def test_sigkill_loses_nothing_already_written(tmp_path, litemedsam):
    root = make_root(tmp_path / "root", 6, seed=5)
    cache_dir = tmp_path / "cache"
    store = cache_dir / f"litemedsam-{litemedsam.signature_hash}-fp16.zarr"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(root), str(cache_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if _complete_records(store) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"finished before the kill: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = _complete_records(store)
    assert 2 <= written < 6
    c = EmbeddingCache(cache_dir, litemedsam)
    assert len(c) == written and c.verify() == {}
    report = embed.embed_root(root, litemedsam, cache_dir=cache_dir, progress=False)
    assert report.n_reused >= written and report.n_computed == 6 - report.n_reused
    assert report.n_invalid == 0 and report.n_failed == 0
    c = EmbeddingCache(cache_dir, litemedsam)
    assert len(c) == 6 and c.verify() == {}
    assert not [p for p in c.store.iterdir() if p.name.startswith(".tmp-")]


def test_unreadable_image_is_recorded_and_the_rest_go_on(filled, tmp_path, litemedsam):
    root, cache_dir = copy_cache(filled, tmp_path)
    bad = root / "toy" / "images" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    try:
        report = embed.embed_root(root, litemedsam, cache_dir=cache_dir, progress=False)
    finally:
        bad.unlink()
    assert (report.n_images, report.n_reused, report.n_failed) == (4, 3, 1)
    assert report.failures[0][0] == str(bad.resolve()) and "broken.png" in report.summary()
    with pytest.raises(InputError, match="no images"):
        embed.embed_root(tmp_path / "cache", litemedsam, cache_dir=cache_dir)


def test_cli_embed(filled, tmp_path, capsys):

    root, cache_dir = copy_cache(filled, tmp_path)
    assert cli.main(["embed", str(root), "--model", "litemedsam", "--cache", str(cache_dir),
                     "--device", "cpu"]) == 0
    assert "0 computed, 3 reused" in capsys.readouterr().out
    assert cli.main(["embed", str(root), "--model", "sam_vit_b", "--cache", str(cache_dir),
                     "--checkpoint", str(tmp_path / "none.pth")]) == 2


def test_npy_export_import_round_trip(filled, tmp_path, litemedsam):
    root, cache_dir = copy_cache(filled, tmp_path)
    out = tmp_path / "npy"
    report = cache.export_npy(root, litemedsam, out, cache_dir=cache_dir, progress=False)
    assert report.n_exported == 3 and report.n_computed == 0
    files = sorted(out.glob("toy/*.npy"))
    assert [f.stem for f in files] == ["img00", "img01", "img02"]
    arr = np.load(files[0])
    assert arr.shape == (1, 256, 64, 64) and arr.dtype == np.float32
    # Import into an empty cache (one file flattened to (256, 64, 64), one broken).
    np.save(files[1], np.load(files[1])[0])
    np.save(files[2], np.zeros((256, 32, 32), np.float32))
    report = cache.import_npy(out, root, litemedsam, cache_dir=tmp_path / "fresh",
                              progress=False)
    assert (report.n_imported, report.n_failed) == (2, 1)
    assert "(256, 32, 32)" in report.failures[0][1]
    fresh, orig = EmbeddingCache(tmp_path / "fresh", litemedsam), EmbeddingCache(cache_dir, litemedsam)
    for _, _, path in layout.list_images(root)[:2]:
        key = image_key(readers.read_image(path))
        assert np.array_equal(fresh.load(key), orig.load(key))
        assert fresh.metadata(key)["encode_seconds"] is None


#: Compact objects of cosmos-demo whose images are used for the fp16 / fp32 comparison.
FP16_TASKS = ("pyradiomics_brain_mri", "pyradiomics_lung_ct", "mni152_tissue_t1w-mri",
              "stardist_nuclei_microscopy")
#: Objects decoded per image (the largest ones): one CPU decode takes ~0.5 s.
FP16_OBJECTS_PER_IMAGE = 6


@pytest.mark.slow
def test_fp16_embeddings_decode_like_fp32(demo_root, tmp_path, litemedsam, monkeypatch):
    """Box-prompt masks from fp16 and fp32 cache entries agree (mean DICE >= 0.99).

    Each image is encoded once: the fp32 cache computes its embedding and the fp16 cache writes
    its entry from that same embedding (its encoder call returns it), then both are read back
    from their stores. ``benchmarks/embed_cache.py`` measures the same on every object of
    cosmos-demo.
    """
    manifest = indexer.index(demo_root)
    manifest = manifest[manifest["task"].isin(FP16_TASKS)]
    # Per task the image with the largest object, and that image's largest objects.
    top = manifest.sort_values(["area_px", "image_id"], ascending=[False, True]).groupby("task").head(1)
    c16 = EmbeddingCache(tmp_path, litemedsam, dtype="float16")
    c32 = EmbeddingCache(tmp_path, litemedsam, dtype="float32")
    assert c16.store != c32.store
    scores = []
    for row in top.itertuples():
        img = readers.read_image(demo_root / row.image_path)
        label = readers.read_label(demo_root / row.label_path)
        encoded = c32.get(img)
        monkeypatch.setattr(c16, "_encode", lambda images, e=encoded: (np.stack([e] * len(images)), 0.0))
        c16.get(img)  # writes the fp16 entry
        e16, e32 = c16.get(img), c32.get(img)  # both read back from their stores
        assert np.array_equal(e32, encoded)
        assert 0 < np.abs(e16 - e32).max() <= 1e-2  # really rounded, but only slightly
        objects = manifest[(manifest["task"] == row.task) & (manifest["image_id"] == row.image_id)]
        for value in objects.nlargest(FP16_OBJECTS_PER_IMAGE, "area_px")["label_value"]:
            ys, xs = np.nonzero(label == value)
            prompt = Prompt(box=np.array([xs.min(), ys.min(), xs.max(), ys.max()]))
            m16 = litemedsam.decode(e16, prompt, img.shape).masks[0]
            m32 = litemedsam.decode(e32, prompt, img.shape).masks[0]
            total = m16.sum() + m32.sum()
            scores.append(1.0 if total == 0 else 2.0 * (m16 & m32).sum() / total)
    assert len(scores) >= 10
    print(f"fp16 vs fp32 mask DICE: mean {np.mean(scores):.5f}, min {np.min(scores):.5f}, "
          f"n={len(scores)} objects")
    assert np.mean(scores) >= 0.99


CONCURRENT_SCRIPT = """
import os, sys, time
import numpy as np
from cosmoslib.models.cache import EmbeddingCache

class Fake:  # a stand-in encoder (no network): the embedding is a seeded function of the pixels
    name = arch = "fake"
    signature = {"arch": "fake"}
    signature_hash = "f" * 16
    embedding_shape = (4, 8, 8)
    def resized_size(self, size):
        return tuple(size)
    def encode(self, images, batch_size=None):
        return np.stack([np.random.default_rng(int(np.asarray(i)[0, 0])).standard_normal(self.embedding_shape)
                         .astype(np.float32) for i in images])

cache_dir, worker, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cache = EmbeddingCache(cache_dir, Fake())
cache.pack_entries = 5  # several packs per writer
shared = list(range(16))  # every writer wants these, in its own order
own = list(range(100 + 20 * worker, 112 + 20 * worker))  # these only this writer
values = np.random.default_rng(worker).permutation(shared + own).tolist()
while not os.path.exists(go):
    time.sleep(0.005)
for rep in range(2):
    for v in values:
        img = np.full((16, 16), v, np.uint8)
        got = cache.get(img)
        assert np.array_equal(got, Fake().encode([img])[0].astype(np.float16).astype(np.float32)), v
"""

N_WRITERS = 4


@pytest.mark.slow
def test_concurrent_writers_share_one_cache(tmp_path):
    """Four processes (as four Dask workers) filling one cache at once, with overlapping and
    disjoint images: all finish, every entry is there once, valid and bit-exact, nothing
    half-written is indexed, and a racing second copy of an entry is identical to the first."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_SCRIPT, str(tmp_path / "cache"), str(w), str(go)],
                              stderr=subprocess.PIPE, text=True) for w in range(N_WRITERS)]
    time.sleep(1.0)
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    store = next((tmp_path / "cache").glob("fake-*.zarr"))
    fake = type("Fake", (), {"name": "fake", "arch": "fake", "signature": {"arch": "fake"},
                             "signature_hash": "f" * 16, "embedding_shape": (4, 8, 8)})()
    c = EmbeddingCache(tmp_path / "cache", fake)
    values = list(range(16)) + [100 + 20 * w + i for w in range(N_WRITERS) for i in range(12)]
    keys = {image_key(np.full((16, 16), v, np.uint8)): v for v in values}
    assert c.keys() == sorted(keys) and len(c) == len(values) == 16 + 12 * N_WRITERS
    assert c.verify() == {}
    records = 0
    for key, v in keys.items():
        want = np.random.default_rng(v).standard_normal((4, 8, 8)).astype(np.float32).astype(np.float16)
        assert np.array_equal(c.load(key), want.astype(np.float32))
        copies = [c._read_packed(key, loc)[0] for loc in c._index[key]]
        assert all(np.array_equal(copy, want) for copy in copies)  # a race may store it twice, same bytes
        if v >= 100:
            assert len(copies) == 1  # one writer wants it: stored once
        records += len(copies)
    print(f"{records - len(values)} racing duplicate record(s) of {16} shared keys x {N_WRITERS} writers")
    assert not [p for p in store.iterdir() if p.name.startswith(".")]
    # each writer sealed its packs on exit; files grow with packs, not entries
    packs = sorted(c.packs.glob("*.pack"))
    assert len(packs) <= N_WRITERS * (2 + (16 + 12) // 5) and len(list(c.packs.iterdir())) == 2 * len(packs)
    assert all(c._seen[p.with_suffix(".idx").name] == -1 for p in packs)


def test_another_hosts_temporary_is_left_alone(tmp_path, litemedsam):
    c = EmbeddingCache(tmp_path, litemedsam)
    foreign = c.store / f".tmp-{'0' * 32}-deadbeef-1-abcdef12"  # host tag not ours, pid 1 here
    foreign.mkdir()
    assert pack_format.HOST_TAG != "deadbeef"
    assert c.clean_temporaries() == 0 and foreign.exists()
    ours = c.store / f".tmp-{'0' * 32}-{pack_format.HOST_TAG}-999999999-abcdef12"  # our host, no such pid
    ours.mkdir()
    assert c.clean_temporaries() == 1 and not ours.exists() and foreign.exists()


def _to_legacy(c: EmbeddingCache) -> None:
    """Rewrite every entry of ``c`` in the per-image layout (one zarr array per image) and
    remove its packs: a cache as cosmoslib wrote it before the packs."""
    for key in c.keys():
        data, attrs, _ = c._read(key)
        keep = {k: v for k, v in attrs.items() if k not in cache._ENTRY_FIELDS}
        legacy_cache.write_entry(c.store, key, data, {**keep, "signature": attrs["signature"]})
    shutil.rmtree(c.packs)


def _legacy_chunk(entry: Path) -> Path:
    return entry / "c" / "0" / "0" / "0"


LEGACY_CORRUPTIONS = {
    "truncated chunk": lambda e: _legacy_chunk(e).write_bytes(_legacy_chunk(e).read_bytes()[:1000]),
    "garbled metadata": lambda e: (e / "zarr.json").write_text('{"zarr_format": 3, "node_t'),
}


def test_per_image_layout_is_read_in_place(filled, tmp_path, counting):
    model, calls = counting
    root, cache_dir = copy_cache(filled, tmp_path)
    c = EmbeddingCache(cache_dir, model)
    want = {k: c.load(k) for k in c.keys()}
    meta = {k: c.metadata(k) for k in c.keys()}
    _to_legacy(c)
    old = EmbeddingCache(cache_dir, model)
    assert sorted(p.name for p in old.store.iterdir() if p.is_dir()) == sorted(want) + ["packs"]
    assert old.keys() == sorted(want) and old.verify() == {}
    for key in want:
        assert np.array_equal(old.load(key), want[key])
        assert old.metadata(key)["cosmos_entry"] == cache.LEGACY_VERSION
        assert old.metadata(key)["original_size"] == meta[key]["original_size"]
    report = embed.embed_root(root, model, cache_dir=cache_dir, progress=False)
    assert (report.n_computed, report.n_reused, calls["images"]) == (0, 3, 0)
    assert not list(old.packs.iterdir())  # nothing rewritten


@pytest.mark.parametrize("corruption", sorted(LEGACY_CORRUPTIONS))
def test_corrupt_per_image_entry_is_recomputed_into_a_pack(corruption, filled, tmp_path, counting):
    model, calls = counting
    root, cache_dir = copy_cache(filled, tmp_path)
    c = EmbeddingCache(cache_dir, model)
    key = c.keys()[1]
    good = c.load(key)
    _to_legacy(c)
    LEGACY_CORRUPTIONS[corruption](c.store / key)
    c = EmbeddingCache(cache_dir, model)
    assert set(c.verify()) == {key}
    report = c.ensure([p for _, _, p in layout.list_images(root)], progress=False)
    assert (report.n_computed, report.n_invalid, report.n_reused, calls["images"]) == (1, 1, 2, 1)
    assert c.verify() == {} and c.metadata(key)["cosmos_entry"] == cache.STORE_VERSION
    np.testing.assert_allclose(c.load(key), good, rtol=FP16_RTOL, atol=FP16_ATOL)


def test_migrate_packs_the_per_image_layout(filled, tmp_path, litemedsam):
    root, cache_dir = copy_cache(filled, tmp_path)
    c = EmbeddingCache(cache_dir, litemedsam)
    want = {k: c.load(k) for k in c.keys()}
    _to_legacy(c)
    old = EmbeddingCache(cache_dir, litemedsam)
    bad = old.keys()[0]
    (old.store / bad / "zarr.json").write_text("{")  # an invalid entry is dropped, not packed
    assert old.migrate(progress=False) == (2, 1)
    assert sorted(p.name for p in old.store.iterdir()) == ["packs", "zarr.json"]
    assert len(list(old.packs.glob("*.pack"))) == 1
    new = EmbeddingCache(cache_dir, litemedsam)
    assert new.keys() == sorted(set(want) - {bad}) and new.verify() == {}
    for key in new.keys():
        assert np.array_equal(new.load(key), want[key])
        assert new.metadata(key)["source"] == old.metadata(key)["source"] is not None
    assert new.migrate(progress=False) == (0, 0)
