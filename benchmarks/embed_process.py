"""What a user gets from ``cosmos embed ROOT`` without flags, as whole processes (issue 22, item 1).
Prints, never asserts.

Two sides, each a fresh Python process over the same images, interleaved (order alternating
per round) so that load changes on a shared machine hit both alike:

* **cosmos embed** -- ``python -m cosmoslib.cli embed ROOT --model M --cache <fresh> --device
  cpu`` with no ``--backend`` (so ``auto``; pass ``--backend X`` to time another), into a new
  cache folder each round;
* **stock** -- a process that loads the same model with the stock encoder forward
  (``load_model(M, fast_encoder=False, backend="torch")``), then per image reads it, runs
  ``segment_anything.SamPredictor.set_image`` and writes ``get_image_embedding()`` with
  ``np.savez_compressed`` (the authors' way to precompute embeddings).

Both processes start Python, import, load the weights and read the images: the wall time
of each process is what a user waits for. The export and parity probe of ``auto`` happen once
per machine; they run first, in a process of their own (outside the timing), into a fresh
exports folder, and their seconds (from the stored ``probe.json``) are printed with the
number of images that amortise them: (export + probe) / (stock - ours seconds per image).

Images: one task of ``--root`` (default cosmos-demo, task ``pyradiomics_brain_mri``, 9 images)
copied into a temporary COSMOS root, or ``--task``; with ``--images N`` the first N images of
that task, and when it has fewer, N images taken in turn from every task of ``--root`` (real
images: the demo's pyradiomics, stardist and MNI slices, or any bigger COSMOS folder).

Models: any registry name (``--model``); ``--model sam_vit_b --random-checkpoint`` makes a
seeded random-init SAM ViT-B checkpoint in the temporary folder (speed only: the encoder's
cost does not depend on its weights) and gives it to both sides.

``--exports DIR`` keeps the exports (and probe) in DIR and reuses them in a later run: the
ViT-B export and probe take minutes, so a run can be prepared ahead of the timed one with
``--rounds 0`` (the printed export + probe seconds are then those stored when they were made).
The first run embeds one image only: it is the set-up (export, probe, OpenVINO's compiled
model cache), never timed.

Each process's wall and CPU seconds (user + system of the child) are printed; the CPU seconds
are the figure to compare on a loaded machine.

Measured (LiteMedSAM, 2 shared cores, load ~1.5, 2 rounds): 9 images 8.1 s vs 13.9 s (1.73x),
16 images 10.1 s vs 21.8 s (2.15x); export + probe 6.5-7.1 s, amortised after 10 images. Ours
costs ~0.3 s per image and ~5.5 s per process (imports of the whole CLI, model load, runtime
compile), the stock ~1.1 s per image and ~3.7 s per process: the ratio grows with the images.
Issue 22 cut the per-process part: the CLI no longer imports Dask, ONNX or the finetuning
module for ``embed`` (about 1-2 s of imports), and OpenVINO's compiled model is cached beside
the export. Measured under load 5-6 (wall times meaningless): 2 images, cosmos embed 9.0 CPU
seconds vs stock 16.0. What is left before the first image is mostly importing torch and
``segment_anything`` (whose predictor imports torchvision, which imports ``torch._dynamo``:
~2 s) and pandas (``cosmoslib.files``), then loading the weights.

Measured quiet (load 0.5-1.8), 2026-12-03, after "auto" began to probe every runtime and take
the fastest, 16 real images, 2 rounds interleaved:

* LiteMedSAM: cosmos embed 14.1 s vs stock 30.8 s (2.19x; CPU 21.3 vs 53.3 s); auto took
  OpenVINO (2.23x torch's encode speed in its probe; ONNX Runtime 1.91x); export + probe of both
  runtimes 20.3 s, amortised after 19 images.
* SAM ViT-B (random-init weights): cosmos embed 77.8 s vs stock 204.1 s (2.62x; CPU 146.3 vs
  373.6 s); auto took ONNX Runtime (2.23x; OpenVINO 2.17x); export + probe of both 140.9 s,
  amortised after 18 images.

Run: ``.venv/bin/python benchmarks/embed_process.py [--model litemedsam] [--rounds 2]
[--task NAME] [--images N] [--threads N] [--backend X] [--random-checkpoint]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STOCK = r"""
import sys, time
from pathlib import Path
import numpy as np, torch
from segment_anything import SamPredictor
from cosmoslib import models
from cosmoslib.data import layout, readers
root, out, name, threads = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
checkpoint = sys.argv[5] or None
if threads > 0:
    torch.set_num_threads(threads)
model = models.load_model(name, checkpoint=checkpoint, device="cpu", fast_encoder=False,
                          backend="torch")
predictor = SamPredictor(model.sam)
out.mkdir(parents=True, exist_ok=True)
n = 0
for _, _, path in layout.list_images(root):
    image = readers.read_image(path)
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    with torch.inference_mode():
        predictor.set_image(rgb)
        emb = predictor.get_image_embedding().cpu().numpy()
    np.savez_compressed(out / f"{path.parent.parent.name}__{path.stem}.npz", embedding=emb)
    n += 1
print(f"stock: {n} images")
"""


def _run(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + sys of the child) and the last output line."""
    before = os.times()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = os.times()
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    lines = (proc.stdout.strip().splitlines() or [""]) + proc.stderr.strip().splitlines()
    auto = [line for line in lines if line.startswith("backend auto")]
    return wall, cpu, (auto[0] if auto else lines[0])


def _copy_images(source: Path, task: str, n: int, root: Path) -> int:
    """Copy into ``root`` (a new COSMOS folder) all images of ``task`` (``n`` = 0), its first
    ``n``, or -- when it has fewer -- ``n`` images taken in turn from every task of ``source``
    (sorted names); the task json files too. Returns the number of images."""
    from cosmoslib.data import layout

    items = layout.list_images(source)
    by_task: dict[str, list[Path]] = {}
    for name, _, path in items:
        by_task.setdefault(name, []).append(Path(path))
    if task not in by_task:
        raise SystemExit(f"no task {task!r} in {source}; tasks: {', '.join(sorted(by_task))}")
    if not n:
        chosen = list(by_task[task])
    elif n <= len(by_task[task]):
        chosen = by_task[task][:n]
    else:
        queues = {t: list(paths) for t, paths in sorted(by_task.items())}
        chosen = []
        while len(chosen) < n and any(queues.values()):
            for t in queues:
                if queues[t] and len(chosen) < n:
                    chosen.append(queues[t].pop(0))
        if len(chosen) < n:
            raise SystemExit(f"--images {n}: {source} holds only {len(chosen)} images")
    for path in chosen:
        rel = path.relative_to(source)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, root / rel)
        info = source / f"{rel.parts[0]}.json"
        if info.is_file() and not (root / info.name).is_file():
            shutil.copy2(info, root / info.name)
    return len(chosen)


def _random_checkpoint(name: str, path: Path) -> Path:
    """A seeded random-init state dict of registry model ``name``'s SAM architecture at ``path``."""
    import torch

    from cosmoslib.models import checkpoints, registry

    arch = registry.lookup(name).arch
    torch.manual_seed(0)
    torch.save(checkpoints._build_sam(arch).state_dict(), path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--task", default="pyradiomics_brain_mri")
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads of both (0: default)")
    parser.add_argument("--backend", default=None, help="pass --backend to cosmos embed")
    parser.add_argument("--images", type=int, default=0,
                        help="number of images (0: all of --task; more than the task has: taken in "
                             "turn from every task of --root)")
    parser.add_argument("--exports", type=Path, default=None,
                        help="exports folder to use and keep (default: a fresh temporary one, so "
                             "that export + probe are timed); a reused one skips them")
    parser.add_argument("--random-checkpoint", action="store_true",
                        help="a seeded random-init checkpoint of --model's architecture (SAM "
                             "ViT-B/L/H: speed only), given to both sides")
    args = parser.parse_args(argv)

    from cosmoslib.data.dataset import resolve_root

    source = resolve_root(args.root)
    work = Path(tempfile.mkdtemp(prefix="embed-process-"))
    root = work / "root"
    n_images = _copy_images(source, args.task, args.images, root)
    exports = args.exports or work / "exports"
    env = dict(os.environ, COSMOS_EXPORTS=str(exports), PYTHONPATH=os.getcwd())
    env.pop("COSMOS_BACKEND", None)
    py = sys.executable
    checkpoint = ""
    if args.random_checkpoint:
        # kept beside reused exports: the export key holds the checkpoint's SHA-256
        path = (args.exports / f"random-{args.model}.pth") if args.exports else work / "random.pth"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            _random_checkpoint(args.model, path)
        checkpoint = str(path)
    embed = [py, "-m", "cosmoslib.cli", "embed", str(root), "--model", args.model, "--device", "cpu"]
    if checkpoint:
        embed += ["--checkpoint", checkpoint]
    if args.backend:
        embed += ["--backend", args.backend]
    if args.threads:
        embed += ["--threads", str(args.threads)]
    print(f"{n_images} images ({args.task if args.images in (0, None) else 'see --images'}); model "
          f"{args.model}{' (random-init weights)' if checkpoint else ''}; python {py}; load average "
          f"{os.getloadavg()[0]:.1f} (other processes share the cores)")

    # The first run (export, probe, OpenVINO's compiled-model cache) on one image: set-up only.
    first = work / "root-first"
    _copy_images(root, sorted(p.name for p in root.iterdir() if p.is_dir())[0], 1, first)
    first_cmd = [str(first) if part == str(root) else part for part in embed]
    wall, cpu, line = _run(first_cmd + ["--cache", str(work / "cache-first")], env)
    print(f"first run, one image (export + probe, not timed below): {wall:.1f} s wall; {line}")
    from cosmoslib.models import registry

    probes = list(exports.glob(f"{registry.lookup(args.model).arch}-*/probe.json"))
    setup_s = 0.0
    for record in probes:
        data = json.loads(record.read_text())
        setup_s += data["export_s"] + data["probe_s"]
        print(f"  {record.parent.name}: export {data['export_s']:.1f} s, probe "
              f"{data['probe_s']:.1f} s, passed {data['passed']}")

    if args.rounds < 1:  # --rounds 0: only the set-up (e.g. into --exports, ahead of a timed run)
        shutil.rmtree(work, ignore_errors=True)
        return 0
    times: dict[str, list[float]] = {"cosmos embed": [], "stock": []}
    cpus: dict[str, list[float]] = {"cosmos embed": [], "stock": []}
    for r in range(args.rounds):
        sides = [("cosmos embed", embed + ["--cache", str(work / f"cache-{r}")]),
                 ("stock", [py, "-c", STOCK, str(root), str(work / f"npz-{r}"), args.model,
                            str(args.threads), checkpoint])]
        for name, cmd in (sides if r % 2 == 0 else sides[::-1]):
            wall, cpu, line = _run(cmd, env)
            times[name].append(wall)
            cpus[name].append(cpu)
            print(f"  round {r} {name:<13} {wall:6.1f} s wall, {cpu:6.1f} s CPU; {line[:160]}")
    ours, stock = statistics.median(times["cosmos embed"]), statistics.median(times["stock"])
    print(f"median wall: cosmos embed {ours:.1f} s | stock set_image + savez_compressed "
          f"{stock:.1f} s -> {stock / ours:.2f}x ({n_images} images, {args.rounds} rounds "
          f"interleaved; CPU seconds {statistics.median(cpus['cosmos embed']):.1f} vs "
          f"{statistics.median(cpus['stock']):.1f}); load average {os.getloadavg()[0]:.1f}")
    gain = (stock - ours) / n_images
    if setup_s and gain > 0:
        print(f"export + probe {setup_s:.1f} s, once per machine: amortised after "
              f"{setup_s / gain:.0f} images ({gain:.2f} s saved per image)")
    elif setup_s:
        print(f"export + probe {setup_s:.1f} s, once per machine; no per-image gain to amortise it")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
