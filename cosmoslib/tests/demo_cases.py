"""Demo images the parity tests share: per task, the image of its largest object."""

from __future__ import annotations

from cosmoslib.data import indexer, readers


def largest_object_images(demo_root, n_tasks: int, objects_per_image: int) -> list:
    """``[(image, label, [label values])]`` for the first ``n_tasks`` tasks (name order) of the
    demo: each task's image holding its largest object, and that image's ``objects_per_image``
    largest objects."""
    manifest = indexer.index(demo_root)
    tasks = sorted(manifest["task"].unique())[:n_tasks]
    manifest = manifest[manifest["task"].isin(tasks)]
    top = manifest.sort_values(["area_px", "image_id"], ascending=[False, True]).groupby("task").head(1)
    out = []
    for row in top.itertuples():
        objects = manifest[(manifest["task"] == row.task) & (manifest["image_id"] == row.image_id)]
        out.append((readers.read_image(demo_root / row.image_path),
                    readers.read_label(demo_root / row.label_path),
                    objects.nlargest(objects_per_image, "area_px")["label_value"].tolist()))
    return out
