"""The runner on a Dask LocalCluster (2 workers, 1 thread each) against the single process.

Real LiteMedSAM on four cosmos-demo images. The same table (every column but the timings), the
same skipped list, every row exactly once after a worker is killed mid-run. Every test that
needs the cluster (one LocalCluster for the module) or the single-process reference run is marked
``slow``; the job-script test needs neither.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

from cosmoslib import models
from cosmoslib.analysis import factors
from cosmoslib.data import dataset, indexer
from cosmoslib.models import cache
from cosmoslib.protocol import distributed as cosmos_dask
from cosmoslib.protocol import embed, evaluate

KW = dict(strategies=["S1", "S5"], points_per_side=4, seed=0, progress=False)
TASKS = ["mni152_tissue_t1w-mri", "pyradiomics_lung_ct"]
KEY = ["model", "task", "image_id", "label_value", "strategy", "shift_level", "repeat", "selection_rule"]


def _values(df: pd.DataFrame) -> pd.DataFrame:
    return df[[c for c in df.columns if not c.startswith("t_")]].reset_index(drop=True)


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    models.set_threads(1)  # as each worker: same thread count, same float rounding
    yield
    models.set_threads(before)


@pytest.fixture(scope="module")
def manifest(demo_root):
    m = dataset.subsample(indexer.index(demo_root), max_images_per_task=2, max_objects_per_image=2, seed=1)
    return m[m["task"].isin(TASKS)].reset_index(drop=True)


@pytest.fixture(scope="module")
def single(manifest, demo_root, litemedsam, one_thread, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    results, report = evaluate.evaluate(manifest, demo_root, [litemedsam], tmp / "r.parquet",
                                        cache_dir=tmp / "cache", **KW)
    assert report.n_failed == 0 and report.n_parts_done == manifest.groupby(["task", "image_id"]).ngroups
    return results, report, tmp


@pytest.fixture(scope="module")
def client():
    client = cosmos_dask.client_for("local:2", threads=1)
    client.wait_for_workers(2, timeout=60)
    yield client
    cosmos_dask.close(client)


@pytest.mark.slow
def test_two_workers_give_the_single_process_table(single, manifest, demo_root, litemedsam, client, tmp_path):
    reference, ref_report, tmp = single
    results, report = evaluate.evaluate(manifest, demo_root, [litemedsam], tmp_path / "r.parquet",
                                        cache_dir=tmp / "cache", scheduler=client, shard_size=2, **KW)
    assert report.n_failed == 0 and report.n_parts_done == ref_report.n_parts_done
    pd.testing.assert_frame_equal(_values(results), _values(reference))
    # 2 shard files of 2 images, not one file per image; the S1 masks are found through the report
    assert len(list((tmp_path / "r.parquet.parts").rglob("*.parquet"))) == 2
    key = next(iter(ref_report.parts))
    assert [m.sum() for m in report.s1_masks(*key)] == [m.sum() for m in ref_report.s1_masks(*key)]
    # a rerun on the cluster finds every shard finished and submits nothing
    again, rep2 = evaluate.evaluate(manifest, demo_root, [litemedsam], tmp_path / "r.parquet",
                                    cache_dir=tmp / "cache", scheduler=client, shard_size=2, **KW)
    assert rep2.n_parts_done == 0 and rep2.n_parts_resumed == report.n_parts_done
    pd.testing.assert_frame_equal(again, results)


def _loaded_on_workers() -> list:
    """Run on a worker: the ids of the models its process holds."""
    return sorted(id(m) for m in cosmos_dask._LOADED.values())


@pytest.mark.slow
def test_a_second_run_on_the_cluster_reuses_the_loaded_models(manifest, demo_root, litemedsam, client,
                                                             one_thread, tmp_path):
    """Each run registers the plugin again (it replaces the previous one); the models stay loaded."""
    kw = dict(KW, strategies=["S5"], cache_dir=tmp_path / "cache")
    first = manifest[manifest["task"] == TASKS[0]]
    evaluate.evaluate(first, demo_root, [litemedsam], tmp_path / "a.parquet", scheduler=client, **kw)
    before = client.run(_loaded_on_workers)
    assert any(before.values())  # at least one worker loaded LiteMedSAM
    evaluate.evaluate(manifest, demo_root, [litemedsam], tmp_path / "b.parquet", scheduler=client, **kw)
    after = client.run(_loaded_on_workers)
    for worker, ids in before.items():
        assert set(ids) <= set(after[worker])  # the same objects: nothing loaded twice
    assert all(len(ids) <= 1 for ids in after.values())  # one model, loaded at most once per worker


@pytest.mark.slow
def test_workers_start_with_malloc_settings_that_keep_torch_fast(client, monkeypatch):
    """Dask's default MALLOC_TRIM_THRESHOLD_ alone makes every large temporary an mmap; our
    clusters set both thresholds, and a plain LocalCluster (Dask's defaults) is flagged."""
    seen = client.run(cosmos_dask._worker_malloc)
    assert len(seen) == 2 and all(env == cosmos_dask.WORKER_MALLOC for env in seen.values())
    assert cosmos_dask.check_worker_malloc(client) == []
    from distributed import Client, LocalCluster

    for key in cosmos_dask.WORKER_MALLOC:  # a nanny exports its pre-spawn settings in its own process
        monkeypatch.delenv(key, raising=False)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as plain, \
            Client(plain, set_as_default=False) as plain_client:
        with pytest.warns(UserWarning, match="MALLOC_MMAP_THRESHOLD_"):
            assert len(cosmos_dask.check_worker_malloc(plain_client)) == 1


def test_a_slurm_job_script_exports_threads_and_malloc_settings(tmp_path):
    config = tmp_path / "slurm.yaml"
    config.write_text("cores: 2\nmemory: 8GB\nwalltime: '01:00:00'\njobs: 3\n"
                      "job_script_prologue: ['module load cuda']\n")
    cluster, jobs = cosmos_dask.jobqueue_cluster("slurm", config, threads=2)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert jobs == 3 and "module load cuda" in script and "export OMP_NUM_THREADS=2" in script
    for key, value in cosmos_dask.WORKER_MALLOC.items():
        assert f"export {key}={value}" in script


@pytest.mark.slow
def test_a_corrupt_image_on_a_worker_is_skipped_as_in_one_process(demo_root, litemedsam, client, one_thread,
                                                                  tmp_path):
    task = "pyradiomics_brain_mri"
    root = tmp_path / "root"
    shutil.copytree(demo_root / task, root / task)
    shutil.copy(demo_root / f"{task}.json", root / f"{task}.json")
    manifest = dataset.subsample(indexer.index(root), max_images_per_task=2, max_objects_per_image=1, seed=0)
    bad = manifest.iloc[0]
    (root / bad.image_path).write_bytes(b"not a png")
    kw = dict(KW, strategies=["S5"], cache_dir=tmp_path / "cache")
    one, rep1 = evaluate.evaluate(manifest, root, [litemedsam], tmp_path / "one.parquet", **kw)
    many, rep2 = evaluate.evaluate(manifest, root, [litemedsam], tmp_path / "many.parquet", scheduler=client, **kw)
    assert rep1.n_failed == 1 and rep2.failures == rep1.failures
    assert bad.image_id in rep2.failures[0][0] and "unreadable image" in rep2.failures[0][1]
    pd.testing.assert_frame_equal(pd.read_csv(rep2.skipped_csv), pd.read_csv(rep1.skipped_csv))
    pd.testing.assert_frame_equal(_values(many), _values(one))
    assert bad.image_id not in set(many["image_id"]) and many["image_id"].nunique() == len(manifest) - 1


@pytest.mark.slow
def test_a_killed_worker_still_gives_every_row_once(single, manifest, demo_root, litemedsam, client, tmp_path):
    reference, _, _ = single
    out = tmp_path / "r.parquet"
    box: dict = {}

    def run():  # a fresh cache: the workers encode, so each shard takes seconds
        box["value"] = evaluate.evaluate(manifest, demo_root, [litemedsam], out, cache_dir=tmp_path / "cache",
                                         scheduler=client, shard_size=1, **KW)

    thread = threading.Thread(target=run)
    thread.start()
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline and thread.is_alive():
        busy = [w for w, tasks in client.processing().items() if tasks]
        if busy and list((out.with_name(out.name + ".parts")).rglob("*.parquet")):
            victim = busy[0]  # mid-run: some shards finished, this worker holds one in flight
            pid = client.run(os.getpid, workers=[victim])[victim]
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    thread.join(timeout=120)
    assert victim is not None, "the run ended before a worker could be killed"
    results, report = box["value"]
    assert report.n_failed == 0
    assert not results.duplicated(KEY).any()
    pd.testing.assert_frame_equal(_values(results), _values(reference))


# ---- fused mode, prompts on workers, embed and factors on the cluster


@pytest.mark.slow
def test_fused_mode_gives_the_cached_table_and_stores_nothing(single, manifest, demo_root, litemedsam, tmp_path):
    reference, ref_report, _ = single
    results, report = evaluate.evaluate(manifest, demo_root, [litemedsam], tmp_path / "r.parquet",
                                        cache_dir=tmp_path / "cache", cache=False, **KW)
    assert report.n_failed == 0 and report.n_parts_done == ref_report.n_parts_done
    assert not (tmp_path / "cache").exists()  # no embedding on disk
    assert (results["t_embed_s"] > 0).all()  # this run's encoder time, measured
    got, want = _values(results), _values(reference)
    pd.testing.assert_frame_equal(got[KEY], want[KEY])  # the same rows in the same order
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_prompts_made_on_the_workers_equal_the_single_process_table(manifest, demo_root, client):
    one = evaluate.prompt_table(manifest, demo_root, 3, shift_levels=(0, 1, 2), repeats=2)
    many = cosmos_dask.make_prompt_table(client, manifest, demo_root, 3,
                                         dict(shift_levels=(1, 2), repeats=2), images_per_task=1)
    assert len(one) == len(many) > 0
    again = evaluate.prompt_table(manifest, demo_root, 3, shift_levels=(0, 1, 2), repeats=2, scheduler=client)
    pd.testing.assert_frame_equal(again, one)


@pytest.mark.slow
def test_embed_on_two_workers_writes_the_single_process_entries(single, manifest, demo_root, litemedsam,
                                                                client, one_thread, tmp_path):
    _, _, tmp = single
    root = tmp_path / "root"
    for path in manifest["image_path"].unique():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_root / path, root / path)
    bad = root / manifest["task"].iat[0] / "images" / "broken.png"
    bad.write_bytes(b"not a png")
    one = embed.embed_root(root, litemedsam, cache_dir=tmp / "cache", progress=False)  # filled by `single`
    many = embed.embed_root(root, litemedsam, scheduler=client, cache_dir=tmp_path / "cache", group_size=2,
                           progress=False)
    n_good = manifest["image_path"].nunique()
    assert one.n_computed == 0 and many.n_computed == n_good and many.n_images == one.n_images == n_good + 1
    assert many.failures == one.failures and str(bad) in many.failures[0][0]
    mine = cache.EmbeddingCache(tmp_path / "cache", litemedsam)
    ref = cache.EmbeddingCache(tmp / "cache", litemedsam)
    assert len(mine.keys()) == n_good and set(mine.keys()) <= set(ref.keys())
    for key in mine.keys():
        np.testing.assert_allclose(mine.load(key), ref.load(key), rtol=0, atol=1e-3)
    again = embed.embed_root(root, litemedsam, scheduler=client, cache_dir=tmp_path / "cache", group_size=2,
                             progress=False)
    assert again.n_computed == 0 and again.n_reused == n_good  # resumable


@pytest.mark.slow
def test_factors_on_two_workers_equal_one_process(demo_root, client, tmp_path):
    root = tmp_path / "root"
    for task in TASKS:
        shutil.copytree(demo_root / task, root / task)
        shutil.copy(demo_root / f"{task}.json", root / f"{task}.json")
    one = factors.factors_cli(root, tmp_path / "one.parquet", progress=False, chunk_images=3)
    many = factors.factors_cli(root, tmp_path / "many.parquet", progress=False, chunk_images=3,
                               scheduler=client)
    assert many.skipped == one.skipped and many.n_computed == one.n_computed == one.n_objects
    a, b = pd.read_parquet(tmp_path / "one.parquet"), pd.read_parquet(tmp_path / "many.parquet")
    assert len(a) == one.n_objects and a["size_px"].notna().sum() > 0
    pd.testing.assert_frame_equal(b, a, check_exact=False, rtol=1e-9)
