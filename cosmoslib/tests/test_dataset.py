"""Dataset statistics (Fig. 3) and the deterministic subsample every chapter shares."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cosmoslib.data import dataset


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


def test_subsample_caps_images_and_keeps_the_largest_objects_on_request():
    m = _manifest()
    kw = dict(max_images_per_task=2, max_objects_per_image=2, seed=3, object_sampling="largest")
    a = dataset.subsample(m, **kw)
    b = dataset.subsample(m.sample(frac=1, random_state=1), **kw)
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
    for how in dataset.OBJECT_SAMPLING:
        assert dataset.subsample(m.iloc[:0], 2, 2, object_sampling=how).empty
        # at most as many objects as asked: an image with fewer keeps them all
        assert len(dataset.subsample(m, max_objects_per_image=5, object_sampling=how)) == len(m)
    with pytest.raises(ValueError, match="object_sampling"):
        dataset.subsample(m, max_objects_per_image=1, object_sampling="smallest")


def _kept(df: pd.DataFrame) -> set:
    return set(zip(df["task"], df["image_id"], df["label_value"]))


def test_random_objects_are_seeded_reproducible_and_vary_with_the_seed():
    m = _manifest(n_objects=6)
    a = dataset.subsample(m, max_objects_per_image=2, seed=3)  # "random" is the default
    assert a.groupby(["task", "image_id"]).size().eq(2).all() and len(a) == 21 * 2
    # Reproducible with the seed, for any row order, and the rows keep manifest order.
    pd.testing.assert_frame_equal(a, dataset.subsample(m, max_objects_per_image=2, seed=3))
    shuffled = dataset.subsample(m.sample(frac=1, random_state=1), max_objects_per_image=2, seed=3)
    assert _kept(shuffled) == _kept(a)
    assert a.set_index(["task", "image_id", "label_value"]).index.isin(
        m.set_index(["task", "image_id", "label_value"]).index).all()
    assert (np.diff(a.merge(m.reset_index(), how="left")["index"]) > 0).all()  # manifest order
    # An image's objects do not depend on the other images present (a task or image subset).
    alone = dataset.subsample(m[m["task"] == "task1"], max_objects_per_image=2, seed=3)
    assert _kept(alone) == {k for k in _kept(a) if k[0] == "task1"}
    # Another seed, another sample (of the same size); not simply the largest objects.
    others = [_kept(dataset.subsample(m, max_objects_per_image=2, seed=s)) for s in range(4, 8)]
    assert all(o != _kept(a) for o in others) and len({frozenset(o) for o in others}) == 4
    largest = _kept(dataset.subsample(m, max_objects_per_image=2, object_sampling="largest"))
    assert _kept(a) != largest
    # With images subsampled too: the same images as "largest" picks, other objects.
    both = dataset.subsample(m, max_images_per_task=2, max_objects_per_image=2, seed=3)
    big = dataset.subsample(m, max_images_per_task=2, max_objects_per_image=2, seed=3,
                            object_sampling="largest")
    assert set(zip(both.task, both.image_id)) == set(zip(big.task, big.image_id))


def test_random_objects_are_unbiased_in_area_and_largest_is_not():
    """Over 300 seeds each object of an image with n = 6 objects is kept with probability
    k / n = 1/3 whatever its area rank, and the mean kept area matches the mean object area;
    "largest" keeps only the top two ranks."""
    m = _manifest(n_tasks=3, n_images=7, n_objects=6, seed=2)
    m["rank"] = m.groupby(["task", "image_id"])["area_px"].rank(ascending=False, method="first")
    n_seeds, k = 300, 2
    counts = pd.Series(0.0, index=range(1, 7))
    kept_area = []
    for s in range(n_seeds):
        sub = dataset.subsample(m, max_objects_per_image=k, seed=s).merge(m)
        counts = counts.add(sub["rank"].value_counts(), fill_value=0)
        kept_area.append(sub["area_px"].mean())
    n_images = m.groupby(["task", "image_id"]).ngroups
    freq = counts / (n_seeds * n_images)  # per area rank: P(object of that rank is kept)
    # 6300 draws per rank: standard error sqrt(1/3 * 2/3 / 6300) = 0.006; bound = 5 SE.
    assert (freq - k / 6).abs().max() <= 0.03, freq.to_dict()
    # mean kept area vs the mean object area: SE of the 300-seed mean is ~0.3 %
    assert np.mean(kept_area) == pytest.approx(m["area_px"].mean(), rel=0.02)
    big = dataset.subsample(m, max_objects_per_image=k, object_sampling="largest").merge(m)
    assert set(big["rank"]) == {1, 2}
    assert big["area_px"].mean() > 1.4 * m["area_px"].mean()


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
