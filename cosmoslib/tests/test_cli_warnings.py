"""The ``cosmos`` command prints each warning as one clean line, set only while a verb runs."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

from cosmoslib import cli
from cosmoslib.data import layout


def _mystery_root(tmp_path):
    """A COSMOS folder whose task has no modality anyone can tell (index warns, and says what to do)."""
    root = tmp_path / "root"
    label = np.zeros((16, 16), np.uint8)
    label[4:10, 5:12] = 1
    image = (np.arange(256, dtype=np.uint8).reshape(16, 16))
    layout.write_pair(root, "zzq_things", "a", image, label)
    layout.write_task(root, "zzq_things", {1: "blob"})
    return root


def _warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "warning" in line.lower()]


def test_warning_line_is_one_line():
    assert cli.warning_line("index", "first part\n   second\tpart ") == "cosmos index: warning: first part second part"


def test_a_verb_prints_its_warning_as_one_line_that_says_what_to_do(tmp_path, capsys):
    root = _mystery_root(tmp_path)
    before = warnings.showwarning
    assert cli.main(["index", str(root), "--out", str(tmp_path / "m.parquet")]) == 0
    err = capsys.readouterr().err
    lines = _warning_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("cosmos index: warning: modality unknown for 1 object(s)")
    assert "--modality TASK=NAME" in lines[0]  # what to do
    assert "UserWarning" not in err and "cli.py" not in err and "warnings.warn(" not in err
    assert warnings.showwarning is before  # restored when the verb ends


def test_warnings_outside_the_command_are_python_s_own(tmp_path):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cli.main(["index", str(_mystery_root(tmp_path)), "--out", str(tmp_path / "m.parquet")])
        warnings.warn("after the command", UserWarning)
    assert [str(w.message) for w in seen] == ["after the command"]


@pytest.mark.slow
def test_the_command_line_shows_no_source_line(tmp_path):
    """``python -m cosmoslib.cli`` (the installed ``cosmos``): stderr has the one line, not
    Python's ``file:line: UserWarning`` and the code line; importing the module changes nothing."""
    root = _mystery_root(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "cosmoslib.cli", "index", str(root), "--out",
                           str(tmp_path / "m.parquet")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = _warning_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("cosmos index: warning: modality unknown"), proc.stderr
    assert "UserWarning" not in proc.stderr and ".py:" not in proc.stderr
    check = ("import warnings; before = warnings.showwarning; import cosmoslib.cli; "
             "assert warnings.showwarning is before, 'changed at import'")
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          timeout=300).returncode == 0
