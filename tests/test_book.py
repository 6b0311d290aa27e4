"""Notebook smoke test: the whole run list under config `smoke`, then the Jupyter Book build.

This is what `cosmos book --config smoke` does: papermill executes every chapter into
book/runs/<notebook>--smoke.ipynb on a few cosmos-demo images with the real LiteMedSAM
weights, then Jupyter Book 1 renders them with warnings as errors.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from cosmoslib import paths
from cosmoslib.book import runlist

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_book():
    proc = subprocess.run([sys.executable, "-m", "cosmoslib.cli", "book", "--config", "smoke"],
                          cwd=paths.home(), capture_output=True, text=True, timeout=3000)
    return proc


def test_cosmos_book_smoke_runs_every_chapter_and_prints_timings(smoke_book):
    assert smoke_book.returncode == 0, smoke_book.stdout[-5000:] + smoke_book.stderr[-5000:]
    for notebook in runlist.CHAPTERS:
        assert re.search(rf"{notebook}\s+[0-9.]+ s\s+ok", smoke_book.stdout), smoke_book.stdout


def test_executed_notebooks_have_outputs_and_no_errors(smoke_book):
    for run in runlist.runs("smoke"):
        nb = json.loads(run.output.read_text())
        outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
        assert outputs, run.output
        assert not [o for o in outputs if o["output_type"] == "error"], run.output
        # papermill recorded the injected parameters of this config
        assert nb["metadata"]["papermill"]["parameters"]["smoke"] is True


def test_rendered_book_shows_real_numbers(smoke_book):
    index = runlist.output_dir("smoke") / "_build" / "html" / "index.html"
    assert index.exists()
    html_dir = index.parent
    dataset_page = html_dir / "book" / "runs" / "00_dataset--smoke.html"
    text = dataset_page.read_text()
    # glued values rendered into prose (the config's name and a count, not an unresolved role)
    assert "{glue" not in text
    plain = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", text))
    assert re.search(r"built with config smoke on cosmos-demo", plain), plain[:2000]
    m = re.search(r"(\d+)\s*images \(2D images and slices\)", plain)
    assert m and int(m.group(1)) > 0
    strategies = (html_dir / "book" / "runs" / "01_strategies--smoke.html").read_text()
    assert "Produced by" in strategies and "01_strategies.ipynb" in strategies
