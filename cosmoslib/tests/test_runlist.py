"""The run list, the notebooks it drives, and the committed TOC agree."""

from __future__ import annotations

import ast
import dataclasses
import json

import papermill
import pytest
import yaml

from cosmoslib import paths
from cosmoslib.book import runlist


def test_committed_toc_is_the_demo_run_list():
    committed = yaml.safe_load((paths.home() / "_toc.yml").read_text())
    assert committed == runlist.toc("demo")


@pytest.mark.parametrize("config", runlist.CONFIGS)
def test_every_run_has_a_notebook_and_a_distinct_output(config):
    runs = runlist.runs(config)
    assert [r.notebook for r in runs] == list(runlist.CHAPTERS)
    assert len({r.output for r in runs}) == len(runs)
    for run in runs:
        assert run.source.exists(), run.source
        assert run.output.name == f"{run.notebook}--{config}.ipynb"


def _parameters_cell(nb):
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged `parameters`"
    return "".join(cells[0]["source"])


@pytest.mark.parametrize("notebook", runlist.CHAPTERS)
def test_notebook_parameters_are_literals_with_a_smoke_flag_and_match_the_run_list(notebook):
    nb = json.loads((paths.notebooks_dir() / f"{notebook}.ipynb").read_text())
    tree = ast.parse(_parameters_cell(nb))
    names = {}
    for node in tree.body:
        assert isinstance(node, ast.Assign), "parameters cell holds assignments only"
        names[node.targets[0].id] = ast.literal_eval(node.value)  # raises unless a literal
    assert "smoke" in names and isinstance(names["smoke"], bool)
    # every parameter papermill injects exists in the notebook (no silently ignored parameter)
    for config in runlist.CONFIGS:
        for run in runlist.runs(config):
            assert set(run.parameters) == set(names)
            assert runlist.Config.from_parameters(run.parameters["settings"]) == run.config


def test_config_is_typed_and_refuses_unknown_or_misspelt_fields():
    demo = runlist.config("demo").as_parameters()
    with pytest.raises(TypeError, match="unknown config field.*s1_point_per_side"):
        runlist.Config.from_parameters({**demo, "s1_point_per_side": 16})
    with pytest.raises(TypeError, match="seed must be int"):
        runlist.Config.from_parameters({**demo, "seed": "0"})
    with pytest.raises(TypeError, match="models must be a list"):
        runlist.Config.from_parameters({**demo, "models": "litemedsam"})
    with pytest.raises(TypeError, match="smoke must be bool"):
        runlist.Config.from_parameters({**demo, "smoke": 1})
    cfg = runlist.Config.from_parameters(demo)
    assert cfg == runlist.config("demo") and isinstance(cfg.grid_sizes, tuple)
    with pytest.raises(Exception):
        cfg.seed = 1  # frozen


@pytest.mark.parametrize("notebook", runlist.CHAPTERS)
def test_notebooks_are_committed_without_outputs(notebook):
    nb = json.loads((paths.notebooks_dir() / f"{notebook}.ipynb").read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


def test_unknown_config_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown config 'nope'"):
        runlist.runs("nope")


def test_full_config_reads_the_users_data_and_models(monkeypatch):
    monkeypatch.setenv("COSMOS_FULL_ROOT", "/data/cosmos")
    monkeypatch.setenv("COSMOS_FULL_MODELS", "sam_vit_b,sam_vit_h")
    cfg = runlist.config("full")
    assert cfg.data_root == "/data/cosmos"
    assert cfg.models == ("sam_vit_b", "sam_vit_h")
    assert cfg.smoke is False


def test_one_curriculum_knob_typed_and_checked():
    """``finetune_curricula`` is the one knob: what is trained is what every chapter shows."""
    demo = runlist.config("demo")
    assert demo.finetune_curricula == ("box", "mixed")
    assert not any(f.name == "finetuned_curricula" for f in dataclasses.fields(runlist.Config))
    again = runlist.Config.from_parameters(demo.as_parameters())
    assert again == demo and isinstance(again.finetune_curricula, tuple)
    assert isinstance(demo.as_parameters()["finetune_curricula"], list)  # a literal for papermill
    with pytest.raises(TypeError, match="finetune_curricula"):
        runlist.Config(name="x", finetune_curricula="mixed")  # a string is not a list of curricula
    with pytest.raises(TypeError, match="unknown config field"):
        runlist.Config.from_parameters({"name": "x", "finetuned_curricula": ["mixed"]})  # the old second knob
    with pytest.raises(TypeError, match="finetuned_grid_sizes"):
        runlist.Config(name="x", finetuned_grid_sizes=(8.0,))
    with pytest.raises(ValueError, match="not curricula"):
        runlist.Config(name="x", finetune_curricula=("points",))
    with pytest.raises(ValueError, match="positive"):
        runlist.Config(name="x", finetuned_grid_sizes=(0,))


@pytest.mark.parametrize("notebook", sorted(p.name for p in (paths.notebooks_dir()).glob("*.ipynb")))
def test_papermill_reads_every_parameter_of_every_notebook(notebook):
    # papermill drops a parameter line it cannot parse (e.g. an apostrophe in its comment) with a
    # warning only, and then injects the value as an "unknown parameter": catch that here.
    found = papermill.inspect_notebook(str(paths.notebooks_dir() / notebook))
    assert sorted(found) == ["config", "settings", "smoke"], notebook
