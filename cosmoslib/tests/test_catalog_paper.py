"""Catalog entries for the datasets of the paper's Table 1 (``data/datasets/paper/*.yaml``).

Table 1 of Huang et al. (MedIA 2024) has 54 rows; the paper speaks of 53 datasets because it
counts VerSe19 and VerSe20 as one (its acknowledgements list "VerSe19&VerSe20"). Each row has
one catalog-only descriptor here. The tests check the files' schema and vocabulary and, when the
paper text is available, compare every name, description, modality list and citation with
Table 1 as parsed from the text itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cosmoslib import paths
from cosmoslib.data import catalog

PAPER_DIR = paths.descriptors_dir() / "paper"

#: Full text of the paper (shared seed); the Table 1 cross-check is skipped when it is absent.
PAPER_TEXT = paths.paper_text()  # $COSMOS_PAPER_TEXT or ../shared/seed/*.txt beside the checkout

#: The 18 modalities of the paper: Fig. 1 caption (a)-(r), which are the modality strings of
#: Table 1's "Image Modalities" column ...
FIG1_MODALITIES = frozenset(
    {
        "CT", "MRI", "T1W MRI", "T2W MRI", "ADC MRI", "Cine-MRI", "CMR", "DW MRI",
        "T1-GD MRI", "T2-FLAIR MRI", "Histopathology", "Electron Microscopy", "US",
        "X-ray", "Fundus", "Colonoscopy", "Dermoscopy", "Microscopy",
    }
)
#: ... plus one string that Table 1 uses (QUBIQ 2021 row) but Fig. 1 does not list.
TABLE1_ONLY_MODALITIES = frozenset({"T1-FLAIR MRI"})

REQUIRED_KEYS = {"name", "description", "modalities", "citation", "in_paper", "url"}
OPTIONAL_KEYS = {"objects", "note"}

#: Table 1 rows the paper counts as a single dataset (acknowledgements: "VerSe19&VerSe20").
COUNTED_AS_ONE = ("VerSe19", "VerSe20")


def slug(name: str) -> str:
    """File stem of a dataset: lowercase, runs of non-alphanumerics replaced by '-'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _files() -> list[Path]:
    return sorted(PAPER_DIR.glob("*.yaml"))


@pytest.fixture(scope="module")
def entries() -> dict[Path, dict]:
    out = {}
    for path in _files():
        with open(path, encoding="utf-8") as fh:
            out[path] = yaml.safe_load(fh)
    return out


def _table1_rows(text: str) -> list[tuple[str, str, list[str], str]]:
    """(name, description, modalities, citation) per row of Table 1, parsed from the paper text."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Table 1: Description"))
    header = next(i for i in range(start, len(lines)) if lines[i].startswith("Dataset Name\t"))
    rows = []
    for line in lines[header + 1:]:
        if not line.strip():
            break
        cell, description, modalities = line.split("\t")
        name, citation = re.fullmatch(r"(.*?) \((.*)\)", cell).groups()
        citation = re.sub(r"\s*<i>et al\.</i>\s*,", " et al.,", citation)
        rows.append((name, description, [m.strip() for m in modalities.split(",")], citation))
    return rows


def test_one_file_per_table1_row_and_53_datasets(entries):
    names = [e["name"] for e in entries.values()]
    assert len(names) == 54, "Table 1 has 54 rows"
    assert len(set(names)) == len(names), "dataset names must be unique"
    assert all(e["in_paper"] is True for e in entries.values())
    # The paper's count: VerSe19 and VerSe20 make one dataset.
    datasets = {("VerSe" if n in COUNTED_AS_ONE else n) for n in names}
    assert len(datasets) == 53


def test_schema_and_file_names(entries):
    for path, e in entries.items():
        assert isinstance(e, dict), path
        keys = set(e)
        assert REQUIRED_KEYS <= keys, (path, REQUIRED_KEYS - keys)
        assert keys <= REQUIRED_KEYS | OPTIONAL_KEYS, (path, keys - REQUIRED_KEYS - OPTIONAL_KEYS)
        assert path.stem == slug(e["name"]), path
        assert isinstance(e["description"], str) and e["description"].strip(), path
        assert isinstance(e["citation"], str) and e["citation"].strip(), path
        assert e["url"] is None or re.match(r"https?://\S+$", e["url"]), path
        if "note" in e:
            assert isinstance(e["note"], str) and e["note"].strip(), path
        if "objects" in e:
            objs = e["objects"]
            assert isinstance(objs, list) and objs, path
            assert all(set(o) == {"name"} and isinstance(o["name"], str) and o["name"].strip()
                       for o in objs), path
            obj_names = [o["name"] for o in objs]
            assert len(set(obj_names)) == len(obj_names), (path, obj_names)


def test_modalities_in_paper_vocabulary(entries):
    vocabulary = FIG1_MODALITIES | TABLE1_ONLY_MODALITIES
    used = set()
    for path, e in entries.items():
        mods = e["modalities"]
        assert isinstance(mods, list) and mods, path
        assert len(set(mods)) == len(mods), path
        assert set(mods) <= vocabulary, (path, set(mods) - vocabulary)
        used |= set(mods)
    # Every modality the paper shows in Fig. 1 is carried by at least one dataset.
    assert used == vocabulary
    assert len(FIG1_MODALITIES) == 18


@pytest.mark.skipif(PAPER_TEXT is None, reason="the paper text is not available: set COSMOS_PAPER_TEXT or place it in ../shared/seed/ beside the checkout")
def test_entries_match_table1_text(entries):
    rows = _table1_rows(PAPER_TEXT.read_text(encoding="utf-8"))
    assert len(rows) == 54
    by_name = {e["name"]: e for e in entries.values()}
    assert set(by_name) == {r[0] for r in rows}
    for name, description, modalities, citation in rows:
        e = by_name[name]
        assert e["description"] == description, name
        assert e["modalities"] == modalities, name
        assert e["citation"] == citation, name
    # The vocabulary literal above is exactly what Table 1's modality column uses.
    assert {m for r in rows for m in r[2]} == FIG1_MODALITIES | TABLE1_ONLY_MODALITIES


def test_through_catalog_loader():
    expected = set()
    for path in _files():
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
        expected.add(raw["name"])
        d = catalog.load_descriptor(path)
        assert d.name == raw["name"], path
        assert list(d.modalities) == raw["modalities"], path
    loaded = [d for d in catalog.load_catalog() if d.in_paper]
    names = [d.name for d in loaded]
    assert len(names) == len(set(names))
    assert set(names) == expected
