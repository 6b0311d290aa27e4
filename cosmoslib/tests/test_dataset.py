"""Dataset statistics (Fig. 3) and the deterministic subsample every chapter shares."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cosmoslib import dataset


def _manifest(n_tasks=3, n_images=7, n_objects=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(n_tasks):
        for i in range(n_images):
            h, w = int(rng.integers(50, 700)), int(rng.integers(50, 700))
            for v in range(1, n_objects + 1):
                rows.append(dict(dataset=f"D{t % 2}", task=f"task{t}", modality=["CT", "MRI"][t % 2],
                                 object=f"obj{v}", label_value=v * 50, image_id=f"img{i:03d}",
                                 image_path=f"task{t}/images/img{i:03d}.png",
                                 label_path=f"task{t}/labels/img{i:03d}.png", source=f"vol{i % 2}",
                                 slice_index=i, area_px=int(rng.integers(51, 5000)), height=h, width=w))
    return pd.DataFrame(rows)


def test_subsample_caps_images_and_objects_deterministically():
    m = _manifest()
    a = dataset.subsample(m, max_images_per_task=2, max_objects_per_image=2, seed=3)
    b = dataset.subsample(m.sample(frac=1, random_state=1), max_images_per_task=2, max_objects_per_image=2, seed=3)
    assert a.groupby("task")["image_id"].nunique().tolist() == [2, 2, 2]
    assert a.groupby(["task", "image_id"]).size().max() == 2
    key = ["task", "image_id", "label_value"]
    pd.testing.assert_frame_equal(a.sort_values(key).reset_index(drop=True),
                                  b.sort_values(key).reset_index(drop=True))
    # the largest objects are kept
    for (_, _), grp in a.groupby(["task", "image_id"]):
        full = m[(m.task == grp.task.iloc[0]) & (m.image_id == grp.image_id.iloc[0])]
        assert sorted(grp.area_px) == sorted(full.area_px.nlargest(2))


def test_subsample_zero_means_all_and_empty_stays_empty():
    m = _manifest()
    assert len(dataset.subsample(m)) == len(m)
    assert dataset.subsample(m.iloc[:0], 2, 2).empty


def test_fig3_counts():
    m = _manifest(n_tasks=3, n_images=7, n_objects=3)
    a = dataset.fig3a_images_per_dataset(m)
    assert a.to_dict() == {"D0": 14, "D1": 7}
    assert dataset.fig3b_objects(m).to_dict() == {"obj1": 21, "obj2": 21, "obj3": 21}
    assert dataset.fig3c_images_per_modality(m).to_dict() == {"CT": 14, "MRI": 7}


@pytest.mark.parametrize("h,w,label", [(128, 128, "128*128"), (128, 129, "256*256"), (1, 1, "128*128"),
                                       (256, 256, "256*256"), (300, 300, "512*512"),
                                       (5000, 5000, ">4096*4096")])
def test_fig3d_bins_are_the_papers_half_open_intervals(h, w, label):
    m = pd.DataFrame([dict(dataset="D", task="t", modality="CT", image_id="a", height=h, width=w,
                           label_value=1)])
    hist = dataset.fig3d_area_histogram(m)
    assert hist.sum() == 1 and hist[label] == 1
    assert list(hist.index[:2]) == ["128*128", "256*256"]


def test_summary_numbers():
    m = _manifest(n_tasks=3, n_images=7, n_objects=3)
    n = dataset.summary_numbers(m)
    assert n["n_images"] == 21 and n["n_masks"] == 63 and n["n_tasks"] == 3 and n["n_datasets"] == 2
    assert n["n_object_modality"] == 6
