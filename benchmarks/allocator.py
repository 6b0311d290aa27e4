"""glibc's own malloc against :data:`cosmoslib.allocator.SETTINGS`, as whole processes. Prints,
never asserts.

Each side is a fresh Python process (glibc reads the settings only when a process starts) that
loads a model with the torch encoder at one thread, encodes one warm-up image, then encodes
``--images`` seeded random images one per call and reports its wall seconds per image and the
user and system CPU seconds of those encodes (``resource.getrusage``). The sides alternate
within each of ``--rounds`` rounds, the order flipping per round, so that a change of load on a
shared machine hits both alike. The ratio printed is glibc's default over the settings (> 1:
the settings are faster).

Measured (LiteMedSAM, 2 shared cores, quiet, 2026-12-03, two rounds of six images): 1.450-1.455
s/img with glibc's default against 1.24-1.34 s/img with the settings (1.08-1.17x); system time
1.9-2.1 s against 1.0-1.3 s for the six encodes.

Usage: ``python benchmarks/allocator.py [--model litemedsam] [--images 6] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from cosmoslib import allocator, paths

_CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from cosmoslib import models
model = models.load_model(sys.argv[1], device="cpu", backend="torch")
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (300, 400), dtype=np.uint8) for _ in range(int(sys.argv[2]))]
model.encode(images[:1])
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for image in images:
    model.encode([image])
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
print(json.dumps({"s_per_image": (t1 - t0) / len(images), "user": r1.ru_utime - r0.ru_utime,
                  "sys": r1.ru_stime - r0.ru_stime}))
"""


def _side(model: str, images: int, tuned: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in allocator.SETTINGS}
    env.update({"OMP_NUM_THREADS": "1", "COSMOS_BACKEND": "torch"})
    if tuned:
        allocator.add_to(env)
    out = subprocess.run([sys.executable, "-c", _CHILD, model, str(images)], env=env, cwd=paths.home(),
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"{args.model}, torch encoder, 1 thread, {args.images} images per process, load average "
          f"at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    got = {False: [], True: []}
    for r in range(args.rounds):
        for tuned in ((False, True) if r % 2 == 0 else (True, False)):
            got[tuned].append(_side(args.model, args.images, tuned))
            g = got[tuned][-1]
            print(f"  round {r + 1} {'settings' if tuned else 'glibc default':>13}: {g['s_per_image']:.3f} s/img, "
                  f"user {g['user']:.2f} s, system {g['sys']:.2f} s", flush=True)
    mean = {k: sum(g["s_per_image"] for g in v) / len(v) for k, v in got.items() if v}
    if len(mean) == 2:
        print(f"glibc default / settings: {mean[False] / mean[True]:.2f}x "
              f"({mean[False]:.3f} vs {mean[True]:.3f} s/img; {allocator.SETTINGS})")


if __name__ == "__main__":
    main()
