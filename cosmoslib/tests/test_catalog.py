"""Tests of cosmoslib.data.catalog: descriptor validation, recursive loading and Table 1."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from cosmoslib import paths
from cosmoslib.data import catalog
from cosmoslib.files import InputError

GOOD = """
name: ACDC
description: Left and right ventricle and left ventricular myocardium
modalities: [Cine-MRI]
citation: Bernard et al., 2018
in_paper: true
objects:
  - {name: Left Ventricle, source_values: [3], value: 85}
  - {name: Myocardium, source_values: [2], value: 170}
  - {name: Right Ventricle, source_values: [1], value: 255}
task: acdc_cine-mri
modality: Cine-MRI
format: volume4d
main_plane: axial
pairs: {image: "*_4d.nii.gz", label: "{stem}_4d_gt.nii.gz"}
retention: {rule: label_sum, min_pixels: 50}
normalize: {clip_percentiles: [0.95, 99.5]}
sampling: {max_slices_per_volume: 4}
"""


def write(tmp_path, text, name="d.yaml"):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_load_descriptor_fields(tmp_path):
    d = catalog.load_descriptor(write(tmp_path, GOOD))
    assert d.name == "ACDC" and d.modalities == ("Cine-MRI",) and d.in_paper
    assert d.objects[0] == catalog.ObjectSpec("Left Ventricle", (3,), 85)
    assert d.value_names() == {85: "Left Ventricle", 170: "Myocardium", 255: "Right Ventricle"}
    assert (d.format, d.main_plane, d.retention_rule, d.min_pixels) == ("volume4d", "axial", "label_sum", 50)
    assert d.clip_percentiles == (0.95, 99.5) and d.max_slices_per_volume == 4
    assert d.pairs == catalog.Pairs(image="*_4d.nii.gz", label="{stem}_4d_gt.nii.gz")
    assert d.preparable and d.path == tmp_path / "d.yaml"
    # defaults: per_object, 50 px, no clipping, no sampling
    doc = yaml.safe_load(GOOD)
    for key in ("retention", "normalize", "sampling", "main_plane"):
        doc.pop(key)
    d2 = catalog.descriptor_from_mapping(doc)
    assert (d2.retention_rule, d2.min_pixels, d2.clip_percentiles, d2.max_slices_per_volume, d2.main_plane) == \
        ("per_object", 50, None, None, "axial")


@pytest.mark.parametrize("edit, problem", [
    (lambda t: t + "colour: red\n", "unknown key"),
    (lambda t: t.replace("name: ACDC\n", ""), "'name'"),
    (lambda t: t.replace("value: 85", "value: 256"), "outside 1..255"),
    (lambda t: t.replace("source_values: [2]", "source_values: [3]"), "source value 3 listed for both"),
    (lambda t: t.replace("name: Myocardium", "name: Left Ventricle").replace("value: 170", "value: 255"),
     "given to both"),
    (lambda t: t.replace("format: volume4d", "format: mesh"), "format 'mesh'"),
    (lambda t: t.replace("main_plane: axial", "main_plane: oblique"), "main_plane"),
    (lambda t: t.replace("rule: label_sum", "rule: anything"), "retention.rule"),
    (lambda t: t.replace("[0.95, 99.5]", "[99.5, 0.95]"), "clip_percentiles"),
    (lambda t: t.replace("modality: Cine-MRI\n", ""), "needs 'modality'"),
    (lambda t: t.replace(", value: 85", ""), "needs a 'value'"),
    (lambda t: t.replace("pairs: {", "pairs: {{"), "YAML syntax error"),
    (lambda t: "- just\n- a list\n", "must be a YAML mapping"),
])
def test_malformed_descriptor_is_input_error_naming_file(tmp_path, edit, problem):
    path = write(tmp_path, edit(GOOD))
    with pytest.raises(InputError, match=problem) as exc:
        catalog.load_descriptor(path)
    assert exc.value.path == str(path)


def test_catalog_only_entry_and_instances(tmp_path):
    d = catalog.load_descriptor(write(tmp_path, """
        name: FeTA
        modalities: [T2W MRI]
        objects: [{name: Cortical Grey Matter}]
        """))
    assert not d.preparable and d.objects[0].value is None
    with pytest.raises(InputError, match="exactly one object"):
        catalog.descriptor_from_mapping({
            "name": "C", "objects": [{"name": "Cell"}, {"name": "Nucleus"}], "task": "c", "modality": "Microscopy",
            "format": "instances", "pairs": {"image": "*.tif", "label": "{stem}_m.tif"}})


def test_load_catalog_recursive_and_duplicate_tasks(tmp_path):
    write(tmp_path, GOOD, "paper/acdc.yaml")
    write(tmp_path, GOOD.replace("format: volume4d", "format: volume")
          .replace("task: acdc_cine-mri", "task: acdc_3d_cine-mri"), "demo/sub/acdc3d.yml")
    write(tmp_path, "name: Other\nmodalities: [CT]\nin_paper: true\n", "paper/other.yaml")
    (tmp_path / "paper/.hidden.yaml").write_text("garbage: [")
    descs = catalog.load_catalog(tmp_path)
    assert [d.path.relative_to(tmp_path).as_posix() for d in descs] == [
        "demo/sub/acdc3d.yml", "paper/acdc.yaml", "paper/other.yaml"]
    write(tmp_path, GOOD, "paper/acdc_again.yaml")
    with pytest.raises(InputError, match="already described"):
        catalog.load_catalog(tmp_path)


def test_table1_one_row_per_dataset_name(tmp_path):
    write(tmp_path, GOOD, "a.yaml")
    write(tmp_path, GOOD.replace("task: acdc_cine-mri", "task: acdc_t2")
          .replace("modality: Cine-MRI", "modality: T2W MRI").replace("Myocardium", "Myo")
          + "source: {package: p, version: '1', kind: wheel, members: [x]}\n", "b.yaml")
    write(tmp_path, "name: Zeta\nmodalities: [CT]\n", "z.yaml")
    write(tmp_path, "name: alpha\nmodalities: [US, CT]\nin_paper: true\n", "y.yaml")
    t = catalog.table1(catalog.load_catalog(tmp_path))
    assert list(t.columns) == ["Dataset", "Description", "Modalities", "Citation", "Objects", "In paper",
                               "Demo task(s)"]
    assert t.Dataset.tolist() == ["ACDC", "alpha", "Zeta"]
    acdc = t.iloc[0]
    assert acdc.Objects == "Left Ventricle, Myocardium, Right Ventricle, Myo"
    assert acdc.Modalities == "Cine-MRI" and acdc["Demo task(s)"] == "acdc_t2" and acdc["In paper"]
    assert t.iloc[2]["In paper"] == False  # noqa: E712 (numpy bool)


def test_repository_catalog_loads():
    descs = catalog.load_catalog()
    tasks = [d.task for d in descs if d.task]
    assert len(tasks) == len(set(tasks))
    demo = [d for d in descs if d.source is not None]
    assert {d.task for d in demo} >= {"pyradiomics_lung_ct", "stardist_nuclei_microscopy", "mni152_brain_t1w-mri"}
    t = catalog.table1(descs)
    assert t.shape == (len({d.name for d in descs}), 7)
    assert t.Dataset.is_unique
    if (paths.descriptors_dir() / "paper").is_dir():
        n_paper = len({d.name for d in descs if d.in_paper})
        assert int(t["In paper"].sum()) == n_paper
