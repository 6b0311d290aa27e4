"""The suite's own environment (``cosmoslib/tests/backend_env.py``): threads per xdist worker and
the order modules are handed out in."""

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
