"""Chapters in parallel lanes: the book's notebooks executed by several processes at once.

A chapter notebook spends much of its time where one core is all it can use: starting a kernel,
importing the stack, pandas and scikit-image work, GrabCut, papermill's bookkeeping; and the small
decoder's torch kernels scale poorly past one thread. So on a machine with C cores the book runs
faster as L lanes of C / L threads each than as one lane of C threads. The run list's order
still holds where it matters:

1. ``00_dataset`` then ``01_strategies`` in one lane with every thread: chapter 01 computes the
   config's results, makes the encoder exports (``--backend auto``) and trains the finetuned
   model the later chapters reuse, so nothing else runs beside it and no two processes ever
   export or train the same thing;
2. the chapters between, spread over the lanes by their measured cost (longest first, each to
   the least loaded lane): they only read what phase 1 stored or compute tables of their own
   (stored atomically; the embedding cache takes concurrent writers);
3. ``10_findings``, which reads every table, alone.

Each lane is a separate Python process (papermill is not meant to be driven from threads) whose
kernels inherit ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` = threads per lane. The cores shared out
are :func:`cpu_budget`'s: the process's CPU affinity, or an inherited ``OMP_NUM_THREADS`` when it
is smaller (a batch job's threads per task; a test worker's share), so ``OMP_NUM_THREADS=1 cosmos
book`` runs one lane of one thread. Results do not
depend on the lanes: every table is keyed by content and settings, and a chapter computes the
same numbers in any lane (float sums may differ in the last bits with the thread count).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Mapping, Sequence

#: The chapters every other chapter builds on (run first, alone, with every thread).
FIRST = ("00_dataset", "01_strategies")
#: The chapter that reads every table (run last, alone).
LAST = ("10_findings",)
#: Seconds each chapter took in the one-model demo book on 2 cores (2026-12-03, one lane; 06
#: after the random walker's direct solve): the weights that balance the lanes. Unknown
#: notebooks weigh the mean.
MEASURED_SECONDS = {"02_timing": 21, "03_everything_grid": 127, "04_factors": 52, "05_randomness": 89,
                    "06_interactive": 90, "07_annotation": 38, "08_finetune": 77, "09_volumes": 25}

# The code a lane process runs: the run list's own executor on its notebooks, no progress bars
# (lanes would interleave them), timings back as JSON (NaN seconds for a failed notebook).
_LANE_CODE = (
    "import json, sys\n"
    "from cosmoslib.book import runlist\n"
    "report = runlist.run_notebooks(sys.argv[1], only=sys.argv[3:], progress=False)\n"
    "with open(sys.argv[2], 'w') as f:\n"
    "    json.dump({'timings': report.timings, 'errors': report.errors}, f)\n"
)


def cpu_budget(environ: Mapping[str, str] = os.environ, cpus: int | None = None) -> int:
    """The cores the book may use: those this process may run on, or fewer where
    ``OMP_NUM_THREADS`` says so.

    The cores are the process's CPU affinity (what ``taskset`` or a batch job's allocation
    leaves it), else ``os.cpu_count()``. An inherited ``OMP_NUM_THREADS`` is the thread budget
    someone already gave this process and everything it starts -- a scheduler's threads per
    task, or a pytest-xdist worker's share of the cores (``cosmoslib/tests/backend_env.py``) --
    so the lanes and their threads stay within it instead of taking every core beside the
    processes that share them.

    Parameters
    ----------
    environ : the environment to read ``OMP_NUM_THREADS`` from (OpenMP's nested form ``"4,2"``
        counts its first level).
    cpus : the cores (default: this process's affinity, as above).

    Returns
    -------
    int
        ``min(cpus, OMP_NUM_THREADS)``, at least 1; ``cpus`` when the variable is unset, and
        (with a warning naming it) when it is not a positive whole number.
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    raw = environ.get("OMP_NUM_THREADS", "")
    if not raw.strip():
        return max(1, cpus)
    first = raw.split(",")[0].strip()
    if first.isdigit() and int(first) >= 1:
        return max(1, min(cpus, int(first)))
    warnings.warn(f"OMP_NUM_THREADS={raw!r} is not a positive number of threads; the book uses "
                  f"all {cpus} cores", stacklevel=2)
    return max(1, cpus)


def default_jobs(cpus: int | None = None) -> int:
    """Lanes when none are asked for: one per core of :func:`cpu_budget` up to 4 (2 cores -> 2
    lanes of 1 thread; ``OMP_NUM_THREADS=1`` -> one lane)."""
    cpus = cpus or cpu_budget()
    return max(1, min(4, cpus))


def plan(notebooks: Sequence[str], jobs: int) -> list[list[list[str]]]:
    """Phases of lanes of notebooks: ``[[lane, ...], ...]``, each lane a list in book order.

    Parameters
    ----------
    notebooks : the notebooks to run, in book order (a subset of the run list is fine).
    jobs : lanes of the middle phase (>= 1); the first and last phases have one lane.

    Returns
    -------
    list of phases; empty phases are left out. With ``jobs == 1`` one phase, one lane: the
    run list as it is.

    Raises
    ------
    ValueError
        ``jobs < 1``.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    order = {nb: i for i, nb in enumerate(notebooks)}
    if jobs == 1:
        return [[list(notebooks)]] if notebooks else []
    first = [nb for nb in notebooks if nb in FIRST]
    last = [nb for nb in notebooks if nb in LAST]
    middle = [nb for nb in notebooks if nb not in FIRST and nb not in LAST]
    default = sum(MEASURED_SECONDS.values()) / len(MEASURED_SECONDS)
    weight = {nb: MEASURED_SECONDS.get(nb, default) for nb in middle}
    lanes: list[list[str]] = [[] for _ in range(min(jobs, len(middle)))]
    loads = [0.0] * len(lanes)
    for nb in sorted(middle, key=lambda n: (-weight[n], order[n])):  # longest first
        k = loads.index(min(loads))
        lanes[k].append(nb)
        loads[k] += weight[nb]
    lanes = [sorted(lane, key=order.__getitem__) for lane in lanes]
    return [phase for phase in ([first], lanes, [last]) if any(phase)]


def lane_env(lanes: int, cpus: int | None = None) -> dict[str, str]:
    """The environment of a lane process: this one's, with the BLAS/OpenMP/torch threads set to
    the lane's share of the cores (default :func:`cpu_budget`; at least 1)."""
    cpus = cpus or cpu_budget()
    threads = str(max(1, cpus // max(1, lanes)))
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
            "OPENBLAS_NUM_THREADS": threads}


def run(config: str, notebooks: Sequence[str], jobs: int, cwd: Path) -> tuple[list, list, float]:
    """Execute ``notebooks`` of ``config`` in lanes (see the module docstring).

    Returns
    -------
    (timings, errors, wall seconds)
        ``timings``: ``(notebook, seconds, status)`` in book order, as
        :func:`cosmoslib.book.runlist.run_notebooks` reports them; ``errors``: its messages.
        A lane process that dies without reporting is an error naming its notebooks.
    """
    order = {nb: i for i, nb in enumerate(notebooks)}
    timings, errors = [], []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cosmos-lanes-") as tmp:
        for p, phase in enumerate(plan(notebooks, jobs)):
            procs = []
            for k, lane in enumerate(phase):
                out = Path(tmp) / f"phase{p}-lane{k}.json"
                print(f"[cosmos book] lane {k + 1}/{len(phase)} of phase {p + 1}: {', '.join(lane)}",
                      file=sys.stderr, flush=True)
                procs.append((lane, out, subprocess.Popen(
                    [sys.executable, "-c", _LANE_CODE, config, str(out), *lane],
                    cwd=cwd, env=lane_env(len(phase)))))
            for lane, out, proc in procs:
                code = proc.wait()
                if out.exists():
                    got = json.loads(out.read_text())
                    timings += [tuple(t) for t in got["timings"]]
                    errors += got["errors"]
                else:
                    errors.append(f"lane {', '.join(lane)} exited with code {code} without a report")
                    timings += [(nb, float("nan"), "FAILED") for nb in lane]
    timings.sort(key=lambda t: order.get(t[0], len(order)))
    return timings, errors, time.perf_counter() - start


__all__ = ["FIRST", "LAST", "MEASURED_SECONDS", "cpu_budget", "default_jobs", "lane_env", "plan", "run"]
