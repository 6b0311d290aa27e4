"""The runner's seams: the settings object, one ``embed_root``, the pack format on its own."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cosmoslib import __version__, cli
from cosmoslib.data import dataset, indexer
from cosmoslib.files import InputError
from cosmoslib.models import cache, pack
from cosmoslib.protocol import distributed, embed, evaluate, units
from cosmoslib.protocol.evaluate import EvalSettings
from cosmoslib.strategies import STRATEGIES

PACKAGE = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- EvalSettings


def test_settings_are_frozen_typed_and_normalised(tmp_path):
    s = EvalSettings(strategies=["s5", "S2"], shift_levels=[3, 1], seed=np.int64(4), cache_dir=str(tmp_path),
                     everything_kwargs={"pred_iou_thresh": 0.5})
    assert s.strategies == ("S5", "S2") and s.shift_levels == (0, 1, 3) and s.seed == 4 and type(s.seed) is int
    assert s.cache_dir == tmp_path and s.save_masks is None and s.everything_kwargs == {"pred_iou_thresh": 0.5}
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 1
    assert EvalSettings().strategies == tuple(STRATEGIES) and EvalSettings().shift_levels == (0,)
    fields = {f.name for f in dataclasses.fields(EvalSettings)}
    assert len(fields) == 14 and all(f"{name} :" in EvalSettings.__doc__ for name in fields)  # each documented


@pytest.mark.parametrize("bad, problem", [
    (dict(strategies=["S7"]), "unknown strategies"),
    (dict(points_per_side=0), "points_per_side must be an integer >= 1"),
    (dict(repeats=1.5), "repeats must be an integer >= 1"),
    (dict(shard_size=True), "shard_size"),
    (dict(retries=-1), "retries must be an integer >= 0"),
    (dict(shift_levels=(4,)), "shift_levels are 0..3"),
])
def test_bad_settings_are_clear_errors(bad, problem):
    with pytest.raises(ValueError, match=problem):
        EvalSettings(**bad)


def test_an_unknown_setting_is_a_type_error_naming_it(tmp_path):
    with pytest.raises(TypeError, match="'strategy'"):
        EvalSettings().replace(strategy=["S5"])
    # evaluate() refuses before it reads anything
    with pytest.raises(TypeError, match="'pointz_per_side'.*EvalSettings has strategies"):
        evaluate.evaluate(pd.DataFrame(), tmp_path, [], tmp_path / "r.parquet", pointz_per_side=4)
    with pytest.raises(TypeError, match="settings must be an EvalSettings, got list"):
        evaluate.evaluate(pd.DataFrame(), tmp_path, [], tmp_path / "r.parquet", ["S5"])
    assert not (tmp_path / "r.parquet").exists()


def test_the_fingerprint_is_the_one_results_were_stored_under():
    """Results stored before the settings object keep their folder: the same text is hashed."""
    def before(strategies, seed, points_per_side, everything, shift_levels, repeats):  # the old formula
        text = json.dumps(dict(strategies=sorted(strategies), seed=seed, points_per_side=points_per_side,
                               everything=everything, shift_levels=shift_levels, repeats=repeats,
                               version=__version__), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    assert EvalSettings().fingerprint() == before(list(STRATEGIES), 0, 32, {}, [0], 3)
    s = EvalSettings(strategies=["S5", "S2"], seed=3, points_per_side=8, shift_levels=(1, 2),
                     everything_kwargs={"box_nms_thresh": 0.5}, repeats=2)
    assert s.fingerprint() == before(["S5", "S2"], 3, 8, {"box_nms_thresh": 0.5}, [0, 1, 2], 2)
    # running fields do not change what is computed, computing fields do
    assert s.replace(shard_size=64, threads=4, progress=False, cache=False).fingerprint() == s.fingerprint()
    assert s.replace(seed=4).fingerprint() != s.fingerprint()


@pytest.fixture(scope="module")
def tiny(demo_root):
    m = dataset.subsample(indexer.index(demo_root), max_images_per_task=1, max_objects_per_image=1, seed=2)
    return m[m["task"] == "pyradiomics_brain_mri"].reset_index(drop=True)  # one image, one object


def test_keywords_and_a_settings_object_are_the_same_run(tiny, demo_root, litemedsam, tmp_path):
    out = tmp_path / "r.parquet"
    settings = EvalSettings(strategies=("S5",), seed=0, cache_dir=tmp_path / "cache", progress=False)
    first, rep1 = evaluate.evaluate(tiny, demo_root, [litemedsam], out, settings)
    assert rep1.n_failed == 0 and rep1.n_parts_done == len(tiny) > 0
    # the book's call: keywords only; it finds the first run's shards (same fingerprint) and computes nothing
    again, rep2 = evaluate.evaluate(tiny, demo_root, [litemedsam], out, strategies=["S5"], seed=0,
                                    cache_dir=tmp_path / "cache", progress=False)
    assert rep2.n_parts_done == 0 and rep2.n_parts_resumed == len(tiny)
    pd.testing.assert_frame_equal(first, again)
    # keywords override the object's fields (another seed beside the stored prompt table of seed 0: this
    # crashed before, the seed filter selected no columns)
    other, rep3 = evaluate.evaluate(tiny, demo_root, [litemedsam], out, settings, seed=1)
    assert rep3.n_parts_done == len(tiny) and set(other["strategy"]) == {"S5"}


# --------------------------------------------------------------------------- one embed_root, no circle


def _defined_functions() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "tests" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef):
                found.setdefault(node.name, []).append(str(path.relative_to(PACKAGE)))
    return found


def test_one_embed_root():
    assert _defined_functions()["embed_root"] == [os.path.join("protocol", "embed.py")]
    assert not hasattr(cache, "embed_root") and not hasattr(distributed, "embed_root")


def test_the_work_units_do_not_know_the_runner():
    """units and distributed compute shards without importing evaluate (at any depth of a function)."""
    for module in (units, distributed):
        names = set()
        for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        assert "cosmoslib.protocol.evaluate" not in names, module.__name__


def test_embed_root_in_process_fills_the_cache_once(demo_root, litemedsam, tmp_path):
    root = tmp_path / "root"
    task = "pyradiomics_brain_mri"
    for sub in ("images", "labels"):
        (root / task / sub).mkdir(parents=True)
        for path in sorted((demo_root / task / sub).glob("*.png"))[:2]:
            (root / task / sub / path.name).write_bytes(path.read_bytes())
    first = embed.embed_root(root, litemedsam, cache_dir=tmp_path / "cache", progress=False)
    assert (first.n_images, first.n_computed, first.n_failed) == (2, 2, 0)
    again = embed.embed_root(root, litemedsam, cache_dir=tmp_path / "cache", progress=False)
    assert (again.n_computed, again.n_reused) == (0, 2)
    with pytest.raises(InputError, match="no images found"):
        embed.embed_root(tmp_path / "cache", litemedsam, cache_dir=tmp_path / "cache")


# --------------------------------------------------------------------------- the pack format


def test_a_pack_round_trip_reads_complete_records_only(tmp_path):
    writer = pack.PackWriter.create(tmp_path)
    arrays = [np.arange(12, dtype=np.float16).reshape(3, 4) + i for i in range(3)]
    keys = [hashlib.blake2b(bytes([i]), digest_size=16).digest() for i in range(3)]
    locs = [writer.append(k, json.dumps({"i": i}).encode(), pack.CODEC.encode(a), 100.0 + i)
            for i, (k, a) in enumerate(zip(keys, arrays))]
    assert writer.pack.name.startswith(pack.HOST_TAG) and writer.idx.stat().st_size == 3 * pack.IDX.size == 192
    records, end, sealed = pack.read_index(writer.idx)
    assert [k for k, _ in records] == [k.hex() for k in keys] and [loc for _, loc in records] == locs
    assert end == 192 and not sealed
    for (_, loc), arr, i in zip(records, arrays, range(3)):
        meta, payload = pack.read_entry(tmp_path, loc)
        assert json.loads(meta) == {"i": i}
        np.testing.assert_array_equal(pack.decode_array(payload, (3, 4), "float16"), arr)
    # a record being written (torn) is left for later; the seal ends the index
    with open(writer.idx, "ab") as fh:
        fh.write(b"\x01" * 30)
    assert pack.read_index(writer.idx, start=end) == ([], end, False)
    writer2 = pack.PackWriter.create(tmp_path)
    writer2.append(keys[0], b"{}", b"", 1.0)
    writer2.seal()
    assert pack.read_index(writer2.idx)[2] is True
    writer.abandon()


def test_a_damaged_entry_is_refused_with_its_reason(tmp_path):
    writer = pack.PackWriter.create(tmp_path)
    loc = writer.append(b"k" * 16, b'{"a": 1}', pack.CODEC.encode(np.zeros(8, np.float16)), 1.0)
    writer.seal()
    with pytest.raises(ValueError, match="metadata checksum mismatch"):
        pack.read_entry(tmp_path, loc._replace(digest=bytes(16)))
    with pytest.raises(ValueError, match="truncated pack"):
        pack.read_entry(tmp_path, loc._replace(data_len=loc.data_len + 10))


def test_orphan_packs_of_dead_writers_are_removed(tmp_path):
    dead = tmp_path / f"{pack.HOST_TAG}-999999999-20240101T000000-abcdef12.pack"  # no such process
    dead.write_bytes(b"half an entry")
    mine = pack.PackWriter.create(tmp_path)  # alive (this process), no complete record yet
    other_host = tmp_path / "deadbeef-1-20240101T000000-abcdef12.pack"  # another host: wait a day
    other_host.write_bytes(b"x")
    assert pack.remove_orphan_packs(tmp_path) == 1
    assert not dead.exists() and mine.pack.exists() and other_host.exists()
    mine.abandon()


def test_cli_bad_settings_are_a_usage_error(tmp_path, capsys):
    code = cli.main(["evaluate", str(tmp_path), "--model", "litemedsam", "--strategies", "S2,S7",
                     "--out", str(tmp_path / "r.parquet")])
    assert code == 2 and "cosmos evaluate: error: unknown strategies ['S7']" in capsys.readouterr().err
