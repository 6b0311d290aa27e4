"""What the book says about each model comes from the registry, and a missing model is named.

The demo book runs a medical, box-trained LiteMedSAM beside the general MobileSAM; every model
chapter opens with :func:`cosmoslib.book.model_notes.models_note` and labels each number with
:func:`cosmoslib.book.model_notes.short`. These tests check that the words follow the registry
entry (change the entry and the sentence changes), and that the demo config runs MobileSAM only
when its weights are on the machine and otherwise names it as not run, with the reason.
"""

from __future__ import annotations

import dataclasses

import pytest

from cosmoslib.book import model_notes, runlist
from cosmoslib.files import InputError
from cosmoslib.models import mobilesam, registry


def test_describe_states_nature_prompts_size_and_origin_from_the_registry():
    lite, mobile = model_notes.describe("litemedsam"), model_notes.describe("mobilesam")
    assert "medical" in lite and "trained with boxes as prompts" in lite and "256 px" in lite
    assert "general-purpose" in mobile and "points, boxes, masks" in mobile and "1024 px" in mobile
    assert "distilled from SAM ViT-H" in mobile  # the entry's origin, verbatim
    assert model_notes.short("litemedsam") == "medical; boxes; 256 px"
    assert model_notes.short("mobilesam") == "general; points, boxes, masks; 1024 px"


def test_the_words_follow_the_entry_not_a_copy(monkeypatch):
    entry = registry.lookup("mobilesam")
    changed = dataclasses.replace(entry, nature="medical", trained_prompts=("boxes",), origin="a test origin",
                                  supports_points=False)
    monkeypatch.setitem(registry._REGISTRY, "mobilesam", changed)
    text = model_notes.describe("mobilesam")
    assert "a medical model" in text and "trained with boxes as prompts" in text and "a test origin" in text
    assert model_notes.short("mobilesam").startswith("medical; boxes;")
    assert "mobilesam" in model_notes.points_note(["mobilesam"], "x")


def test_points_note_names_only_box_trained_models():
    assert model_notes.points_note(["mobilesam"], "anything") == ""
    note = model_notes.points_note(["litemedsam", "mobilesam"], "its S2-S4 mean little.")
    assert note.startswith("litemedsam was trained with box prompts only: its S2-S4 mean little.")
    assert "mobilesam" not in note
    assert model_notes.points_note(["litemedsam", "medsam"], "c").startswith("litemedsam, medsam were")


def test_per_model_labels_every_line_and_keeps_the_order():
    md = model_notes.per_model({"mobilesam": "A", "litemedsam": "B"}).data.splitlines()
    assert md == ["- **mobilesam** (general; points, boxes, masks; 1024 px): A",
                  "- **litemedsam** (medical; boxes; 256 px): B"]
    with pytest.raises(ValueError, match="no model"):
        model_notes.per_model({})


def test_models_note_names_an_unavailable_model_with_the_reason_and_the_fix():
    note = model_notes.models_note(["litemedsam"], ["mobilesam"])
    assert "**litemedsam**: a medical model" in note
    assert "**mobilesam** was *not run*" in note
    assert "cosmos fetch-weights" in note and mobilesam.TARBALL_URL in note
    with pytest.raises(InputError, match="unknown model"):
        model_notes.models_note(["no_such_model"])


def test_demo_runs_mobilesam_only_when_its_weights_are_here(monkeypatch):
    monkeypatch.setattr(mobilesam, "available", lambda folder=None: False)
    cfg = runlist.config("demo")
    assert cfg.models == ("litemedsam",) and cfg.unavailable_models == ("mobilesam",)
    monkeypatch.setattr(mobilesam, "available", lambda folder=None: True)
    cfg = runlist.config("demo")
    assert cfg.models == runlist.DEMO_MODELS == ("litemedsam", "mobilesam") and cfg.unavailable_models == ()
    # round trip through papermill's literals keeps the field, and it is typed
    assert runlist.Config.from_parameters(cfg.as_parameters()) == cfg
    with pytest.raises(TypeError, match="unavailable_models"):
        runlist.Config.from_parameters({**cfg.as_parameters(), "unavailable_models": "mobilesam"})


def test_smoke_stays_on_the_embedded_model():
    """The suite's smoke book runs LiteMedSAM only (time); the two-model chapters run in the demo."""
    assert runlist.config("smoke").models == ("litemedsam",)
