"""The suite's own environment (``cosmoslib/tests/backend_env.py``): threads per xdist worker, the
order modules are handed out in, and the malloc settings its processes start with."""

from __future__ import annotations

import os
import pathlib
import types

import pytest
import torch

from cosmoslib.tests import backend_env


def test_a_worker_gets_its_share_of_the_cores():
    assert backend_env.worker_threads({}, cpus=8) is None  # no xdist: nothing changes
    worker = {"PYTEST_XDIST_WORKER": "gw1", "PYTEST_XDIST_WORKER_COUNT": "2"}
    assert backend_env.worker_threads(worker, cpus=2) == 1
    assert backend_env.worker_threads(worker, cpus=16) == 8
    assert backend_env.worker_threads({**worker, "PYTEST_XDIST_WORKER_COUNT": "3"}, cpus=2) == 1
    assert backend_env.worker_threads({**worker, "PYTEST_XDIST_WORKER_COUNT": "4"}, cpus=13) == 3


def test_this_process_runs_with_the_threads_it_was_given():
    """Under ``-n N`` this worker's torch and its children's OpenMP use cores // N threads; in
    one process torch keeps its own default (the conftest guard restores any change)."""
    threads = backend_env.worker_threads()
    if threads is None:
        assert "PYTEST_XDIST_WORKER" not in os.environ
    else:
        assert torch.get_num_threads() == threads
        assert int(os.environ["OMP_NUM_THREADS"]) >= 1


class _Item:
    """What the ordering hook reads of a collected test: its path and its module's marks."""

    def __init__(self, path, slow):
        self.path = pathlib.Path(path)
        self.module = types.SimpleNamespace(pytestmark=[pytest.mark.slow] if slow else [])


def test_slow_modules_are_handed_out_first_and_keep_their_order():
    items = [_Item("cosmoslib/tests/test_a.py", False), _Item("cosmoslib/tests/test_k.py", True),
             _Item("cosmoslib/tests/test_b.py", False), _Item("tests/test_book.py", True),
             _Item("cosmoslib/tests/test_k.py", True)]
    before = list(items)
    backend_env.pytest_collection_modifyitems(None, None, items)
    assert [str(i.path) for i in items] == ["tests/test_book.py", "cosmoslib/tests/test_k.py",
                                            "cosmoslib/tests/test_k.py", "cosmoslib/tests/test_a.py",
                                            "cosmoslib/tests/test_b.py"]
    assert items[1] is before[1] and items[2] is before[4]  # stable within a module


@pytest.mark.slow
def test_under_xdist_the_slow_module_starts_first_on_its_worker(tmp_path):
    """(Slow: starts two xdist workers, which import torch.) The project's own ``addopts`` on a
    made-up tree of five modules of three tests and one slow module of one test, two workers:
    the slow module is the first thing its worker runs. Without ``--no-loadscope-reorder``,
    xdist hands out the modules with the most tests first, and the one-test slow module (like
    the smoke book, three tests) would start last."""
    import shlex
    import subprocess
    import sys
    import tomllib

    from cosmoslib import paths

    addopts = tomllib.loads((paths.home() / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    log = tmp_path / "started.log"
    body = ("import os\n\ndef _log(name):\n"
            f"    with open({str(log)!r}, 'a') as f:\n"
            "        f.write(os.environ['PYTEST_XDIST_WORKER'] + ' ' + name + '\\n')\n")
    for k in range(5):
        tests = "".join(f"\n\ndef test_{j}():\n    _log('many{k}')\n" for j in range(3))
        (tmp_path / f"test_many{k}.py").write_text(body + tests)
    (tmp_path / "test_zlong.py").write_text("import pytest\n\npytestmark = pytest.mark.slow\n" + body
                                            + "\n\ndef test_long():\n    _log('long')\n")
    (tmp_path / "pytest.ini").write_text(f"[pytest]\nmarkers =\n    slow: long\naddopts = {addopts}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(paths.home()), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "-n" in shlex.split(addopts)  # the project runs under xdist at all
    started = [line.split() for line in log.read_text().splitlines()]
    assert len(started) == 16
    worker = next(w for w, name in started if name == "long")
    assert [name for w, name in started if w == worker][0] == "long", started


def test_malloc_settings_are_added_only_where_neither_threshold_is_set():
    from cosmoslib import allocator

    env = {"PATH": "/bin"}
    assert allocator.add_to(env) and env == {"PATH": "/bin", **allocator.SETTINGS}
    own = {"MALLOC_TRIM_THRESHOLD_": "0"}  # a user's own choice is never mixed with ours
    assert not allocator.add_to(own) and own == {"MALLOC_TRIM_THRESHOLD_": "0"}
    assert int(allocator.SETTINGS["MALLOC_MMAP_THRESHOLD_"]) == 64 * 2 ** 20


def test_the_suite_starts_its_processes_with_the_malloc_settings():
    """Under xdist this worker was started by a process that had added them (so glibc read
    them when it started), unless the caller's environment set a threshold of its own."""
    from cosmoslib import allocator

    if backend_env.worker_threads() is None:
        pytest.skip("one process (-n 0): glibc read the caller's environment before the plugin ran")
    assert any(key in os.environ for key in allocator.SETTINGS)
