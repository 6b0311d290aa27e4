"""glibc malloc settings that keep torch fast in the processes we start.

glibc gives every block above its *mmap threshold* a memory mapping of its own, returned to the
system when freed. The threshold starts at 128 KiB and rises by itself as large blocks are freed,
unless a malloc tunable is set in the environment, which fixes it: Dask's nanny sets
``MALLOC_TRIM_THRESHOLD_=65536`` (``distributed.nanny.pre-spawn-environ``), which keeps it at
128 KiB, so that every (4096, 256) float32 temporary of the decoder is a fresh mapping and about
a thousand page faults. Setting both thresholds high keeps freed memory (up to 256 MiB) in the
process and serves blocks up to 64 MiB from the heap.

Measured on this project's 2-core CPU (LiteMedSAM, torch, one thread):

* a Dask worker under the nanny's default: a decode 2.0-2.3x slower, a task 1.65x slower than the
  same work with :data:`SETTINGS`;
* a plain process under glibc's own dynamic threshold (``benchmarks/allocator.py``): an encode
  1.45 s against 1.24-1.34 s with :data:`SETTINGS`, with half the system time; the known-answer
  test module 53.4 s against 49.1 s (system time 11.4 s against 6.3 s).

glibc reads these variables once, when a process starts, so they are given to processes about to
start (:func:`add_to`); other C libraries ignore them.
"""

from __future__ import annotations

from collections.abc import MutableMapping

#: The environment that sets glibc's trim and mmap thresholds (bytes; see the module docstring).
SETTINGS = {"MALLOC_TRIM_THRESHOLD_": str(256 * 2 ** 20), "MALLOC_MMAP_THRESHOLD_": str(64 * 2 ** 20)}


def add_to(env: MutableMapping[str, str]) -> bool:
    """Add :data:`SETTINGS` to ``env`` (in place) unless it sets either threshold already.

    An environment that sets one (a user's own choice, or a tuned job script) is left as it is,
    so the two are never mixed. Returns whether the settings were added.
    """
    if any(key in env for key in SETTINGS):
        return False
    env.update(SETTINGS)
    return True


__all__ = ["SETTINGS", "add_to"]
