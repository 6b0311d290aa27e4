"""The chapter layer: the one object a notebook opens.

A chapter notebook is a parameters cell, one :meth:`Chapter.open`, then tables, figures and
glue. A :class:`Chapter` runs no experiment itself; it gives:

* the typed, frozen :class:`cosmoslib.book.runlist.Config` of the run (no dict in between);
* the COSMOS root as an explicit path (``Chapter.root``) -- never carried in ``DataFrame.attrs``;
* the manifest, indexed **once per config** and stored beside the results
  (``results/<config>/manifest.parquet``), reused while no file under the root changed (see
  :func:`indexed`), and the config's subsample of it;
* each model, loaded **once per process** (:func:`model`);
* every table by name, :meth:`Chapter.table` (the registry and its one store rule:
  :mod:`cosmoslib.book.tables`);
* :meth:`Chapter.caption`, which ends every caption with the notebook and config that made it.

Figures that re-decode objects are :mod:`cosmoslib.book.figures`; the finetuned models' note is
:func:`cosmoslib.book.finetune_runs.note`.
"""

from __future__ import annotations

import hashlib
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from cosmoslib import files, paths
from cosmoslib import models as models_mod
from cosmoslib.book import plots, tables
from cosmoslib.book.runlist import Config
from cosmoslib.book.runlist import config as config_named
from cosmoslib.data import dataset, indexer

# Per-process memory: each model is loaded, and each root indexed, at most once per process.
_MODELS: dict[tuple[str, str], Any] = {}
_INDEXED: dict[tuple[str, str], pd.DataFrame] = {}


def model(name: str, device: str | None = None):
    """The registry model ``name``, loaded at most once per process (and per device), with
    ``backend="auto"`` (the fastest encoder runtime that passed a parity probe here, else
    torch; :mod:`cosmoslib.models.backend_probe`)."""
    key = (name, str(device))
    if key not in _MODELS:
        _MODELS[key] = models_mod.load_model(name, device=device, backend="auto")
    return _MODELS[key]


def data_fingerprint(root: str | Path) -> str:
    """A digest of every file's relative path, size and modification time under ``root``.

    Cheap (a directory walk, no file is opened) and changes whenever a file is added, removed,
    or rewritten, so a stored manifest is reused only while the data are untouched; the
    manifest itself records each file's content digest for the results built on it.
    """
    root = Path(root)
    digest = hashlib.blake2b(digest_size=16)
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            stat = path.stat()
            digest.update(f"{path.relative_to(root).as_posix()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def indexed(root: str | Path, store: Path | None = None) -> pd.DataFrame:
    """The manifest of ``root`` (:func:`cosmoslib.data.indexer.index`), computed once while ``root`` is unchanged.

    Parameters
    ----------
    root : a COSMOS-layout folder.
    store : ``manifest.parquet`` to keep it in across processes; its fingerprint (see
        :func:`data_fingerprint`) is stored in ``<store>.fingerprint``.
    """
    root = Path(root).resolve()
    # the manifest's own format is part of it: a manifest stored by an older indexer is rebuilt
    fingerprint = f"{data_fingerprint(root)}-v{indexer.MANIFEST_VERSION}"
    key = (str(root), fingerprint)
    if key in _INDEXED:
        return _INDEXED[key]
    stamp = store.with_name(store.name + ".fingerprint") if store is not None else None
    if store is not None and store.exists() and stamp.exists() and stamp.read_text().strip() == fingerprint:
        manifest = pd.read_parquet(store)
    else:
        manifest = indexer.index(root)
        if store is not None:
            files.atomic_write_parquet(manifest, store)
            files.atomic_write_bytes(stamp, fingerprint.encode())
            manifest = pd.read_parquet(store)  # the same dtypes as every later reader gets
    _INDEXED[key] = manifest
    return manifest


class Chapter:
    """What one chapter notebook works with (see the module docstring).

    Parameters
    ----------
    notebook : the notebook stem, e.g. ``"01_strategies"`` (named in every caption).
    config : the run's :class:`~cosmoslib.book.runlist.Config`.
    """

    def __init__(self, notebook: str, config: Config):
        self.notebook = notebook
        self.config = config
        #: The config's named tables (:class:`cosmoslib.book.tables.Tables`): what
        #: :meth:`table` reads, and what the figure functions re-decode from.
        self.tables = tables.Tables(self)

    @classmethod
    def open(cls, notebook: str, config: str, smoke: bool | None = None,
             settings: Mapping[str, Any] | None = None) -> "Chapter":
        """The chapter of ``notebook`` under the run-list config ``config``.

        Parameters
        ----------
        notebook : notebook stem.
        config : config name (the notebook's ``config`` parameter).
        smoke : the notebook's ``smoke`` parameter; must agree with the config.
        settings : the config's fields as papermill injected them (the notebook's ``settings``
            parameter); empty or None = the run list's config of that name. Unknown or
            misspelt fields are an error.
        """
        cfg = Config.from_parameters(settings) if settings else config_named(config)
        if cfg.name != config:
            raise ValueError(f"settings are for config {cfg.name!r}, the notebook was given {config!r}")
        if smoke is not None and bool(smoke) != cfg.smoke:
            raise ValueError(f"smoke={smoke} disagrees with config {config!r} (smoke={cfg.smoke})")
        return cls(notebook, cfg)

    @cached_property
    def root(self) -> Path:
        """The COSMOS root of the config (cosmos-demo, built on first use, when none is given)."""
        return dataset.resolve_root(self.config.data_root)

    @cached_property
    def full_manifest(self) -> pd.DataFrame:
        """Every object under the root (indexed once per config, see :func:`indexed`)."""
        return indexed(self.root, paths.results_dir(self.config.name) / "manifest.parquet")

    @cached_property
    def manifest(self) -> pd.DataFrame:
        """The objects this config evaluates (the config's subsample of :attr:`full_manifest`)."""
        c = self.config
        return dataset.subsample(self.full_manifest, c.max_images_per_task, c.max_objects_per_image, c.seed,
                                 object_sampling=c.object_sampling)

    def model(self, name: str | None = None):
        """A model of the config (default: the first), loaded once per process."""
        return model(name or self.config.models[0])

    def table(self, name: str) -> pd.DataFrame:
        """The named table ``name`` of this config (:data:`cosmoslib.book.tables.REGISTRY`),
        computed at most once and stored by the one rule of :mod:`cosmoslib.book.tables`.

        Raises
        ------
        cosmoslib.book.tables.UnknownTable (a KeyError)
            ``name`` is not a table of the registry; the message names the tables.
        """
        return self.tables(name)

    def caption(self, text: str) -> None:
        """Show ``text`` as a caption ending with the notebook and config that produced it."""
        # IPython comes with the optional [book] extra: only a notebook kernel needs it.
        from IPython.display import Markdown, display

        display(Markdown(f"{text} {plots.provenance(self.notebook, self.config.name)}"))


def table_task(name: str, config: Config) -> tuple[str, int]:
    """One task of :func:`compute_tables`: the table ``name`` of ``config``, computed and stored (or
    found stored) in this process; returns ``(name, rows)``."""
    return name, len(Chapter("tables", config).table(name))


def compute_tables(config: Config, scheduler, threads: int = 1, progress: bool = True) -> dict[str, int]:
    """Every table of :data:`cosmoslib.book.tables.REGISTRY` of ``config``, computed on a Dask cluster.

    ``cosmos book --scheduler``: the tables are computed first, one task per table, wave by wave
    (:data:`cosmoslib.book.tables.WAVES`), and stored by their one rule, so the notebooks that
    follow only read them. Workers must see the same results folder
    (:func:`cosmoslib.paths.results_dir`) and data root as this process (one machine, or a shared
    file system). Without a scheduler nothing is computed ahead: each chapter computes what it shows.

    Parameters
    ----------
    config : the run-list Config.
    scheduler : ``"local:N"``, ``"tcp://HOST:PORT"``, ``"slurm:FILE"``, ... or a ``distributed.Client``
        (:func:`cosmoslib.protocol.distributed.client_for`).
    threads : threads per worker made here.

    Returns
    -------
    dict
        ``{table name: rows}``.
    """
    # Dask loads only for --scheduler runs.
    from cosmoslib.protocol import distributed

    rows = {}
    with distributed.connect(scheduler, threads=threads) as client:
        for wave in tables.WAVES:
            for _, (name, n) in distributed.map_groups(client, table_task, list(wave), config, progress=progress,
                                                       desc="tables", unit="table"):
                rows[name] = n
    return rows


__all__ = ["Chapter", "compute_tables", "data_fingerprint", "indexed", "model", "table_task"]
