"""Chapters in parallel lanes (cosmoslib.book.lanes): the plan keeps the run list's order where
it matters, balances the middle chapters, and a lane that dies is an error naming its notebooks.
The whole path runs in the smoke book (tests/test_book.py: `cosmos book --config smoke` with the
default lanes)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from cosmoslib.book import lanes, runlist

BOOK = list(runlist.CHAPTERS)


@pytest.mark.parametrize("jobs", [2, 3, 4, 8])
def test_plan_runs_each_chapter_once_first_and_last_alone(jobs):
    phases = lanes.plan(BOOK, jobs)
    flat = [nb for phase in phases for lane in phase for nb in lane]
    assert sorted(flat) == sorted(BOOK) and len(flat) == len(BOOK)
    assert phases[0] == [list(lanes.FIRST)] and phases[-1] == [list(lanes.LAST)]
    middle = phases[1]
    assert len(middle) == min(jobs, len(BOOK) - 3)
    for lane in middle:
        assert lane == sorted(lane, key=BOOK.index)  # book order inside a lane


def test_plan_balances_by_measured_cost():
    middle = lanes.plan(BOOK, 2)[1]
    loads = [sum(lanes.MEASURED_SECONDS[nb] for nb in lane) for lane in middle]
    total = sum(lanes.MEASURED_SECONDS.values())
    # longest-first greedy: within the largest single chapter of perfect balance
    assert max(loads) - total / 2 <= max(lanes.MEASURED_SECONDS.values())
    assert max(loads) < 0.6 * total


def test_one_lane_is_the_run_list_and_subsets_keep_their_phases():
    assert lanes.plan(BOOK, 1) == [[BOOK]]
    assert lanes.plan([], 2) == []
    assert lanes.plan(["03_everything_grid", "10_findings"], 4) == [[["03_everything_grid"]], [["10_findings"]]]
    unknown = lanes.plan(["01_strategies", "99_new", "02_timing"], 2)
    assert unknown == [[["01_strategies"]], [["99_new"], ["02_timing"]]]
    with pytest.raises(ValueError, match="jobs"):
        lanes.plan(BOOK, 0)


def test_lane_threads_share_the_cores():
    assert lanes.lane_env(2, cpus=2)["OMP_NUM_THREADS"] == "1"
    assert lanes.lane_env(4, cpus=16)["MKL_NUM_THREADS"] == "4"
    assert lanes.lane_env(3, cpus=2)["OPENBLAS_NUM_THREADS"] == "1"
    assert lanes.default_jobs(2) == 2 and lanes.default_jobs(1) == 1 and lanes.default_jobs(64) == 4


def test_the_book_keeps_within_an_inherited_thread_budget():
    """OMP_NUM_THREADS, when set, caps the cores the lanes share (a batch job's threads per task,
    a test worker's share); unset, the cores are all of them; nonsense is said, not obeyed."""
    assert lanes.cpu_budget({}, cpus=16) == 16
    assert lanes.cpu_budget({"OMP_NUM_THREADS": "4"}, cpus=16) == 4
    assert lanes.cpu_budget({"OMP_NUM_THREADS": "4,2"}, cpus=16) == 4  # OpenMP's nested form
    assert lanes.cpu_budget({"OMP_NUM_THREADS": "32"}, cpus=2) == 2
    assert lanes.cpu_budget({"OMP_NUM_THREADS": " "}, cpus=3) == 3
    for bad in ("0", "-1", "four"):
        with pytest.warns(UserWarning, match=f"OMP_NUM_THREADS='{bad}'.*all 8 cores"):
            assert lanes.cpu_budget({"OMP_NUM_THREADS": bad}, cpus=8) == 8
    assert lanes.cpu_budget() == lanes.cpu_budget(os.environ)  # the process's own, by default


def test_one_inherited_thread_means_one_lane_of_one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert lanes.default_jobs() == 1
    assert lanes.lane_env(1)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert lanes.lane_env(1)["MKL_NUM_THREADS"] == str(min(3, lanes.cpu_budget({})))
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert lanes.default_jobs() == min(4, lanes.cpu_budget())


def test_a_lane_that_dies_is_an_error_naming_its_notebooks(monkeypatch, tmp_path):
    monkeypatch.setattr(lanes, "_LANE_CODE", "import sys; sys.exit(3)")
    timings, errors, wall = lanes.run("smoke", ["02_timing", "04_factors"], 2, Path(tmp_path))
    assert [t[0] for t in timings] == ["02_timing", "04_factors"]
    assert all(t[2] == "FAILED" and math.isnan(t[1]) for t in timings)
    assert len(errors) == 2 and all("exited with code 3 without a report" in e for e in errors)
    assert wall > 0


def test_build_book_refuses_zero_lanes():
    with pytest.raises(ValueError, match="jobs"):
        runlist.build_book("smoke", jobs=0)
