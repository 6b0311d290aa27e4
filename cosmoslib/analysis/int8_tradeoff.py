"""What an int8 image encoder costs in masks: agreement with float32, per strategy (issue 22, item 2).

``backend="openvino-int8"`` (:mod:`cosmoslib.models.quantize`) encodes faster than the float32
encoders but changes the embeddings beyond rounding. :func:`agreement_table` measures what that
does to the paper's results, with the library's own evaluation path: both models -- the
reference (float32, normally ``backend="openvino"``, the graph the int8 one was quantized from)
and the candidate (int8) -- are run by :func:`cosmoslib.protocol.evaluate.evaluate` on the same
manifest with the same seeded prompts (one ``prompts.parquet`` shared by both runs), strategies
S1-S6, unshifted prompts, one repeat, and the matched masks it saves are compared:

* **agreement**: per strategy, the mean (and smallest) DICE in % between the candidate's and the
  reference's mask of each object -- the mask the protocol scores under the oracle rule (the
  paper's Eq. 1; S1: the Everything mask matched to the object, an empty mask when none
  survived the filters; two empty masks agree at 100 %);
* **change of each table's mean**: per strategy, the mean DICE against the ground truth of
  both runs and the difference (candidate - reference), under the oracle rule and the
  predicted-IoU rule (S1: oracle only).

:data:`DEFAULT_BAR` is the issue's bar for an int8 default (>= 99.5 % mean agreement on every
strategy); :func:`meets_default_bar` says whether a table reaches it. ``backend="auto"`` never
picks int8 whatever a table says (:mod:`cosmoslib.models.backend_probe` says why): the table
is evidence for a user deciding on their own data, shown beside the timing.

The timing chapter's table (:func:`chapter_table`) puts both sides together for each model of
a config: encoder seconds per image of the float32 encoder the book runs (``backend="auto"``)
and of the int8 one, and :func:`agreement_table` per strategy, on a fixed, seeded, small subset
of the config's images (:func:`chapter_subset`). It is stored once per digest of the subset's
image and label content, both model signatures (the int8 one names its calibration images'
digests) and the settings (:func:`chapter_key`), and reused only when all of them match.
:func:`chapter_sentences` words it, :func:`runtime_missing` says why it cannot run here.

What it costs (LiteMedSAM, 2 shared cores, ``nncf`` 3.4): ``nncf.quantize`` spends ~10 s in
fixed work (graph pattern matching, compiling the bias-correction subgraphs, imports) and ~5 s
per calibration image (two statistics passes, SmoothQuant's and the min-max one, through a
graph with an output on every quantized activation, ~2.5 s each per image at 256 px); 16
images cost ~90 s, 4 images ~33 s, 2 images ~20 s. MobileSAM (1024 px) is of the same order.
The demo book therefore calibrates on 2 images per model (:data:`CHAPTER_SIZES`) and says so:
a smaller calibration set than ``cosmos embed --backend openvino-int8`` uses (16), so the
chapter's agreement is that of a cheaper quantization, not of the CLI's. The rest of the cost
is the two evaluation runs, mostly S1 (MobileSAM decodes and upscales at 1024 px): the chapter
compares on 2 images with S1 at m = 4 (measured under load 6-8 on 2 cores, 4 images at m = 8:
MobileSAM's comparison took 165 CPU seconds, 80 % of it S1; LiteMedSAM's quantization 25 s and
MobileSAM's 18 s on 2 images).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cosmoslib.data import dataset
from cosmoslib.data.readers import read_image, read_raw_image
from cosmoslib.files import InputError, atomic_write_parquet, mask_filename, slug
from cosmoslib.models import backends, load_model, registry
from cosmoslib.protocol import evaluate, metrics
from cosmoslib.strategies import STRATEGIES
from cosmoslib.strategies import check as check_strategies

__all__ = ["DEFAULT_BAR", "COLUMNS", "CHAPTER_COLUMNS", "CHAPTER_SIZES", "INSTALL_COMMAND",
           "agreement_table", "meets_default_bar", "runtime_missing", "chapter_subset",
           "chapter_key", "chapter_table", "chapter_sentences"]

#: Mean DICE (%) between int8 and float32 masks every strategy must reach for int8 to be
#: considered as a default (issue 22).
DEFAULT_BAR = 99.5
#: Columns of :func:`agreement_table`.
COLUMNS = ("strategy", "n_objects", "agreement", "agreement_min", "dice_reference",
           "dice_candidate", "dice_change", "dice_reference_pred_iou",
           "dice_candidate_pred_iou", "dice_change_pred_iou")

_SIDES = ("reference", "candidate")


def _read_mask(path: Path) -> np.ndarray:
    if not path.is_file():
        raise InputError(path, "matched mask missing: the evaluation's parts were resumed from an "
                               "earlier run without its masks; compare in a fresh folder")
    return read_raw_image(path) > 0


def agreement_table(manifest: pd.DataFrame, root: str | Path, reference, candidate,
                    out: str | Path, strategies: Sequence[str] = STRATEGIES, seed: int = 0,
                    points_per_side: int = 32, cache_dir: str | Path | None = None,
                    progress: bool = False) -> pd.DataFrame:
    """Mask agreement between ``candidate`` (int8) and ``reference`` (float32), per strategy.

    Parameters
    ----------
    manifest : DataFrame
        The objects to compare (e.g. a :func:`cosmoslib.data.dataset.subsample` of
        :func:`cosmoslib.data.indexer.index`).
    root : path
        The COSMOS root of ``manifest``.
    reference, candidate : SamFamilyModel
        The same weights with two encoders, e.g. ``load_model(name, backend="openvino")`` and
        ``load_model(name, backend="openvino-int8", calibration=root)``. Their signatures must
        differ (else both runs would share one cache store and one set of results).
    out : path
        A folder for the two runs: ``reference.parquet`` / ``candidate.parquet`` (the results
        tables), their ``.parts``, the matched masks (``<side>.masks/``) and the shared
        ``prompts.parquet``. A rerun in the same folder resumes (the masks of resumed parts are
        those of the earlier run, made with the same model signature and prompts).
    strategies : subset of S1..S6.
    seed : prompt seed.
    points_per_side : S1 grid (the paper's 32).
    cache_dir : embedding cache (default :func:`cosmoslib.paths.embedding_cache_dir`); the two
        encoders are stored apart (their signatures differ).
    progress : progress bars on stderr.

    Returns
    -------
    DataFrame
        One row per strategy, :data:`COLUMNS`: ``n_objects``; ``agreement`` and
        ``agreement_min``, DICE (%) between the candidate's and the reference's matched mask of
        each object (oracle rule, unshifted prompt); ``dice_reference``, ``dice_candidate``
        (mean DICE % vs ground truth, oracle rule) and ``dice_change`` = candidate - reference;
        the same three under the predicted-IoU rule (NaN for S1). ``attrs`` records the
        models' signatures, the seed and the grid.

    Raises
    ------
    InputError
        Both models have one signature; a matched mask is missing (see ``out``).
    """
    if reference.signature_hash == candidate.signature_hash:
        raise InputError(None, f"reference and candidate have the same signature "
                               f"({reference.signature_hash}): nothing to compare")
    strategies = check_strategies(strategies)
    root, out = Path(root), Path(out)
    results = {}
    for side, model in zip(_SIDES, (reference, candidate)):
        table, _ = evaluate.evaluate(manifest, root, [model], out / f"{side}.parquet",
                                     strategies=strategies, cache_dir=cache_dir,
                                     save_masks=out / f"{side}.masks", seed=seed,
                                     points_per_side=points_per_side, shift_levels=(0,),
                                     repeats=1, progress=progress)
        results[side] = table[(table["shift_level"] == 0) & (table["repeat"] == 0)]
    rows = []
    for strategy in strategies:
        means = {}
        for side in _SIDES:
            mine = results[side][results[side]["strategy"] == strategy]
            for rule in ("oracle_dice", "pred_iou"):
                values = mine.loc[mine["selection_rule"] == rule, "dice"]
                means[side, rule] = float(values.mean()) if len(values) else float("nan")
        objects = results["reference"]
        objects = objects[(objects["strategy"] == strategy)
                          & (objects["selection_rule"] == "oracle_dice")]
        agreement = []
        for r in objects.itertuples(index=False):
            name = mask_filename(r.image_id, r.object, r.label_value)
            masks = [_read_mask(out / f"{side}.masks" / slug(model.name) / strategy / str(r.task)
                                / name) for side, model in zip(_SIDES, (reference, candidate))]
            agreement.append(metrics.dice(*masks))
        rows.append({
            "strategy": strategy, "n_objects": len(agreement),
            "agreement": float(np.mean(agreement)) if agreement else float("nan"),
            "agreement_min": float(np.min(agreement)) if agreement else float("nan"),
            "dice_reference": means["reference", "oracle_dice"],
            "dice_candidate": means["candidate", "oracle_dice"],
            "dice_change": means["candidate", "oracle_dice"] - means["reference", "oracle_dice"],
            "dice_reference_pred_iou": means["reference", "pred_iou"],
            "dice_candidate_pred_iou": means["candidate", "pred_iou"],
            "dice_change_pred_iou": means["candidate", "pred_iou"] - means["reference", "pred_iou"],
        })
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table.attrs.update(reference=dict(reference.signature), candidate=dict(candidate.signature),
                       seed=seed, points_per_side=points_per_side)
    return table


def meets_default_bar(table: pd.DataFrame, bar: float = DEFAULT_BAR) -> bool:
    """Whether every strategy's mean agreement (%) in ``table`` is >= ``bar``; False for an
    empty table or a strategy without objects (NaN)."""
    values = table["agreement"].to_numpy(float)
    return bool(len(values)) and bool(np.all(values >= bar))


# ---------------------------------------------------------------- the timing chapter's table

#: Columns of :func:`chapter_table` (one row per model and strategy).
CHAPTER_COLUMNS = ("model", "nature", "fp32_backend", "n_images", "calibration_images",
                   "encode_s_fp32", "encode_s_int8", "speedup", "quantize_s", "meets_bar",
                   ) + COLUMNS
#: The chapter's sizes per config kind: images (agreement and timing), calibration images,
#: objects per image, S1 grid. ``demo`` is sized to ~90 s for its two models on a quiet 2-core
#: machine (see the module docstring; measured under load: S1 of MobileSAM at m = 8 on 4
#: images was 80 % of its comparison, so the comparison runs S1 at m = 4 on 2 images);
#: ``smoke``: the least that runs every step.
CHAPTER_SIZES = {"demo": {"n_images": 2, "calibration_images": 2, "max_objects": 2,
                          "points_per_side": 4},
                 "smoke": {"n_images": 1, "calibration_images": 1, "max_objects": 1,
                           "points_per_side": 2}}
#: How to install what the int8 path needs (OpenVINO and NNCF, the ``runtimes`` extra).
INSTALL_COMMAND = "pip install -e .[runtimes]"
#: Version of :func:`chapter_table`'s computation (part of :func:`chapter_key`).
_CHAPTER_VERSION = 1


def runtime_missing() -> str | None:
    """Why the int8 comparison cannot run here (one sentence with the install command), or
    None when OpenVINO and NNCF import."""
    if backends.backend_available(backends.INT8):
        return None
    return (f"the int8 encoder needs OpenVINO and NNCF, which are not installed here; install "
            f"them with `{INSTALL_COMMAND}` (or `{backends.INSTALL_HINT}`) and rebuild the book")


def _rank(seed: int, name: str) -> str:
    return hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).hexdigest()


def chapter_subset(manifest: pd.DataFrame, n_images: int, max_objects: int,
                   seed: int = 0) -> pd.DataFrame:
    """The fixed, seeded subset the chapter compares on: ``n_images`` images, at most
    ``max_objects`` objects each.

    Which images depends only on ``seed`` and each ``image_path`` (the smallest seeded hashes,
    as :func:`cosmoslib.models.quantize.calibration_set` chooses), so other rows of the
    manifest do not move the choice; the objects are :func:`cosmoslib.data.dataset.subsample`'s
    seeded random choice.

    Raises
    ------
    InputError
        An empty manifest, ``n_images < 1`` or ``max_objects < 1``.
    """
    if int(n_images) < 1 or int(max_objects) < 1:
        raise InputError(None, f"the int8 comparison needs n_images >= 1 and max_objects >= 1, "
                               f"got {n_images} and {max_objects}")
    if manifest.empty:
        raise InputError(None, "the int8 comparison got an empty manifest: no image to compare on")
    images = sorted(manifest["image_path"].unique(), key=lambda p: _rank(seed, p))[:int(n_images)]
    subset = manifest[manifest["image_path"].isin(images)]
    return dataset.subsample(subset, max_objects_per_image=int(max_objects), seed=seed)


def chapter_key(subset: pd.DataFrame, reference, candidate_signature: dict,
                settings: dict) -> str:
    """32 hex digits naming one model's stored chapter rows: the subset's image and label
    content digests and objects, both model signatures and the settings."""
    objects = sorted(zip(subset["image_sha"], subset["label_sha"],
                         subset["label_value"].astype(int)))
    text = json.dumps({"version": _CHAPTER_VERSION, "objects": objects,
                       "reference": dict(reference.signature), "candidate": candidate_signature,
                       "settings": settings}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _encode_seconds(runs: dict, images: list[np.ndarray]) -> dict[str, float]:
    """Seconds per image of each model in ``runs``, after one warm-up encode each, the models
    interleaved image by image."""
    for model in runs.values():
        model.encode(images[:1])
    seconds = dict.fromkeys(runs, 0.0)
    for image in images:
        for name, model in runs.items():
            start = time.perf_counter()
            model.encode([image])
            seconds[name] += time.perf_counter() - start
    return {name: s / len(images) for name, s in seconds.items()}


def _nature(model) -> str:
    """The registry's ``nature`` of ``model`` (general / medical); a model registered under no
    name of its own (a test's shrunk encoder) has its architecture's."""
    try:
        entry = registry.lookup(model.name)
    except InputError:
        entry = registry.lookup(model.arch)
    return entry.facts()["nature"]


def _model_rows(model, manifest: pd.DataFrame, root: Path, store: Path, settings: dict,
                strategies, cache_dir) -> pd.DataFrame:
    subset = chapter_subset(manifest, settings["n_images"], settings["max_objects"],
                            settings["seed"])
    calibration = backends.calibration_set(root, n=settings["calibration_images"],
                                           seed=settings["seed"])
    candidate_signature = dict(model.signature)
    candidate_signature["encoder"] = backends.signature_entry(backends.INT8, calibration)
    key = chapter_key(subset, model, candidate_signature, settings)
    path = store / f"{slug(model.name)}-{key}.parquet"
    if path.is_file():
        return pd.read_parquet(path)
    # Quantizes on the calibration set (or reuses the export made for it) here.
    candidate = dataclasses.replace(model, backend=backends.INT8, calibration=calibration)
    record = backends.quantization_record(backends.exported_path(candidate, backends.INT8))
    if record is None:
        raise InputError(backends.exported_path(candidate, backends.INT8),
                         f"the int8 export has no readable {backends.QUANTIZATION_FILE}")
    images = [read_image(root / p) for p in sorted(subset["image_path"].unique())]
    seconds = _encode_seconds({"fp32": model, "int8": candidate}, images)
    work = store / f"{slug(model.name)}-{key}.work"
    table = agreement_table(subset, root, model, candidate, work, strategies=strategies,
                            seed=settings["seed"], points_per_side=settings["points_per_side"],
                            cache_dir=cache_dir)
    table.insert(0, "model", model.name)
    table.insert(1, "nature", _nature(model))
    table.insert(2, "fp32_backend", model.backend)
    table.insert(3, "n_images", len(images))
    table.insert(4, "calibration_images", len(calibration))
    table.insert(5, "encode_s_fp32", seconds["fp32"])
    table.insert(6, "encode_s_int8", seconds["int8"])
    table.insert(7, "speedup", seconds["fp32"] / seconds["int8"])
    table.insert(8, "quantize_s", float(record["quantize_s"]))
    table.insert(9, "meets_bar", meets_default_bar(table))
    table = table[list(CHAPTER_COLUMNS)]
    atomic_write_parquet(table, path)
    shutil.rmtree(work, ignore_errors=True)  # the runs' parts and masks: the table is stored
    return table


def chapter_table(manifest: pd.DataFrame, root: str | Path, models: Sequence, store: str | Path,
                  *, n_images: int, calibration_images: int, max_objects: int,
                  points_per_side: int, seed: int = 0, strategies: Sequence[str] = STRATEGIES,
                  cache_dir: str | Path | None = None) -> pd.DataFrame:
    """The timing chapter's int8 trade-off: speed and mask agreement per model and strategy.

    For each model, on :func:`chapter_subset` of ``manifest``: the float32 model as given (the
    book's ``backend="auto"`` model, the reference) and the same weights with
    ``backend="openvino-int8"``, calibrated on ``calibration_images`` images of ``root``
    (:func:`cosmoslib.models.quantize.calibration_set`, seeded by ``seed``); encoder seconds per
    image of both (one warm-up encode each, then the subset's images, interleaved) and
    :func:`agreement_table`.

    Parameters
    ----------
    manifest : DataFrame
        The config's manifest (:func:`cosmoslib.data.indexer.index` rows).
    root : path
        Its COSMOS root (images read from it; calibration images chosen from it).
    models : sequence of str or SamFamilyModel
        Registry names (loaded with ``backend="auto"``) or loaded float32 models.
    store : path
        Folder of the stored rows: ``<model>-<key>.parquet`` per model, ``key`` =
        :func:`chapter_key` (reused only when it matches; written atomically). The runs' work
        folder beside it is removed once the rows are stored.
    n_images, calibration_images, max_objects : int
        Sizes (>= 1); :data:`CHAPTER_SIZES` holds the book's.
    points_per_side : S1 grid.
    seed : subset, calibration and prompt seed.
    strategies : subset of S1..S6.
    cache_dir : embedding cache (default :func:`cosmoslib.paths.embedding_cache_dir`).

    Returns
    -------
    DataFrame
        :data:`CHAPTER_COLUMNS`, one row per model and strategy: ``nature`` (registry),
        ``fp32_backend``, ``encode_s_fp32`` / ``encode_s_int8`` (seconds per image, this
        machine, as measured when the rows were made), ``speedup`` (fp32 / int8),
        ``quantize_s`` (seconds NNCF's quantization took when the export was made),
        ``meets_bar`` (:func:`meets_default_bar` of the model's rows), then :data:`COLUMNS`.

    Raises
    ------
    ImportError
        OpenVINO or NNCF missing (:func:`runtime_missing` says so first, without raising).
    InputError
        Sizes below 1, an empty manifest, no calibration image in ``root``.
    """
    missing = runtime_missing()
    if missing:
        raise ImportError(missing)

    root, store = Path(root), Path(store)
    settings = {"n_images": int(n_images), "calibration_images": int(calibration_images),
                "max_objects": int(max_objects), "points_per_side": int(points_per_side),
                "seed": int(seed), "strategies": list(check_strategies(strategies))}
    if settings["calibration_images"] < 1:
        raise InputError(None, f"calibration_images must be >= 1, got {calibration_images}")
    parts = []
    for item in models:
        model = load_model(item, backend="auto") if isinstance(item, str) else item
        parts.append(_model_rows(model, manifest, root, store, settings,
                                 settings["strategies"], cache_dir))
    return pd.concat(parts, ignore_index=True)


def chapter_sentences(table: pd.DataFrame, bar: float = DEFAULT_BAR) -> dict[str, str]:
    """One sentence per model of :func:`chapter_table`, every number from ``table``.

    Returns
    -------
    dict
        ``{model: sentence}``: the int8 and float32 seconds per image and the speed-up, the
        lowest and highest mean agreement over the strategies (naming the lowest), the largest
        change of a strategy's mean DICE, whether every strategy reaches ``bar`` (and so whether
        int8 could become a default; ``backend="auto"`` never picks it), and the sizes.

    Raises
    ------
    ValueError
        An empty table.
    """
    if table.empty:
        raise ValueError("no int8 rows to describe")
    out = {}
    for name, rows in table.groupby("model", sort=False):
        first = rows.iloc[0]
        low = rows.loc[rows["agreement"].idxmin()]
        change = rows["dice_change"].abs().max()
        meets = bool(first["meets_bar"])
        verdict = (f"every strategy reaches the {bar:g} % bar, so int8 could be offered as a default"
                   if meets else f"below the {bar:g} % bar on at least one strategy, so int8 stays "
                                 f"opt-in (`--backend openvino-int8`), never the default")
        out[name] = (f"int8 encodes in {first['encode_s_int8']:.3f} s per image against "
                     f"{first['encode_s_fp32']:.3f} s for float32 ({first['fp32_backend']}), "
                     f"**{first['speedup']:.2f}×** faster, after a quantization of "
                     f"{first['quantize_s']:.0f} s; its masks agree with float32 at "
                     f"{rows['agreement'].min():.1f}-{rows['agreement'].max():.1f} % mean DICE over "
                     f"the strategies (lowest {low['strategy']}, smallest single object "
                     f"{rows['agreement_min'].min():.1f} %) and move a strategy's mean DICE by at "
                     f"most {change:.2f} points: {verdict} ({int(first['n_images'])} images, "
                     f"{int(rows['n_objects'].max())} objects, {int(first['calibration_images'])} "
                     f"calibration images)")
    return out
