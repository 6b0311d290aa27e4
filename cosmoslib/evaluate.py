"""The runner: every object of every image under strategies S1..S6, from one cached embedding.

Paper sections 3.4-3.5 and 4.3-4.7. For each model and image the embedding comes from the
:mod:`cosmoslib.cache` (computed once); prompts come from one seeded prompt table per dataset
(:mod:`cosmoslib.prompts`), so every model sees identical prompts; each strategy's candidate
masks are matched to the ground truth (:mod:`cosmoslib.matching`) and scored
(:mod:`cosmoslib.metrics`).

Output: the tidy *results* table (one row per image, object, model, strategy and selection
rule; columns in ``ARCHITECTURE.md``). S2-S6 give two rows per object: ``oracle_dice`` (the
paper's Eq. 1, best DICE among SAM's candidates) and ``pred_iou`` (the candidate a user without
ground truth would take: highest predicted IoU). S1 (Everything) gives only ``oracle_dice``:
its predicted IoUs rank masks, not objects.

Timings: ``t_embed_s`` is the encoder time of the image (measured when the embedding was
computed, stored in the cache); ``t_decode_s`` is prompt encoding + mask decoding (+ upsampling
to the original size) for that object and strategy, including its share of the per-image
decoder preparation (:meth:`SamFamilyModel.prepare`); for S1 it is the time of the whole
Everything pass over the image (the paper's Table 4 reports S1 per image), repeated on each
object row of that image.

Resume: results are written per (model, image) into ``<out>.parts/`` atomically; a rerun
skips finished parts, and the final table is their concatenation in a fixed order, so a killed
and resumed run gives the identical table.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cosmoslib import __version__

STRATEGIES = ("S1", "S2", "S3", "S4", "S5", "S6")
PROMPT_STRATEGIES = ("S2", "S3", "S4", "S5", "S6")

RESULT_COLUMNS = [
    "task", "image_id", "label_value", "object", "modality", "model", "strategy", "selection_rule",
    "dice", "jac", "hd", "hd95", "assd", "pred_iou", "empty_pred", "empty_gt", "n_candidates",
    "t_embed_s", "t_decode_s",
]


@dataclass
class EvalReport:
    """What one evaluation did."""

    out: Path
    n_images: int = 0
    n_objects: int = 0
    n_rows: int = 0
    n_parts_done: int = 0
    n_parts_resumed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    elapsed: float = 0.0
    models: list[str] = field(default_factory=list)
    strategies: list[str] = field(default_factory=list)

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    def summary(self) -> str:
        text = (f"Evaluated {self.n_objects} objects on {self.n_images} images with "
                f"{', '.join(self.models)} under {', '.join(self.strategies)}: {self.n_rows} result rows "
                f"({self.n_parts_done} image×model parts computed, {self.n_parts_resumed} resumed) in "
                f"{self.elapsed:.1f} s; {self.n_failed} failed")
        if self.failures:
            text += " (" + "; ".join(f"{f}: {r}" for f, r in self.failures[:5])
            text += ", ..." if self.n_failed > 5 else ""
            text += f"; all in {self.out.with_suffix('.skipped.csv')})"
        return text + f". Results: {self.out}."


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def mask_filename(image_id: str, obj: str, label_value: int) -> str:
    """File name of a saved matched mask: ``<image>__<object>-<label value>.png``.

    The label value makes the name unique when an image holds several instances of one object.
    """
    return f"{image_id}__{_slug(obj)}-{int(label_value)}.png"


def _save_mask(save_masks: Path, model: str, strategy: str, row, mask: np.ndarray) -> Path:
    """Write one matched mask as a 0/255 PNG (atomically) for audit."""
    from cosmoslib.io import atomic_write_bytes, encode_png

    path = save_masks / _slug(model) / strategy / str(row.task) / mask_filename(
        row.image_id, row.object, row.label_value)
    return atomic_write_bytes(path, encode_png(mask.astype(np.uint8) * 255))


def evaluate_image(model, embedding: np.ndarray, t_embed: float, label: np.ndarray,
                   objects: pd.DataFrame, prompt_rows: pd.DataFrame, strategies: Sequence[str],
                   points_per_side: int = 32, save_masks: Path | None = None,
                   everything_kwargs: dict | None = None) -> list[dict]:
    """Score every object of one image under ``strategies`` from its cached embedding.

    Parameters
    ----------
    model : SamFamilyModel
    embedding : (256, 64, 64) float array from the cache.
    t_embed : encoder seconds of this image (NaN when unknown).
    label : (H, W) uint8 label map of the image (COSMOS layout).
    objects : manifest rows of this image (task, image_id, label_value, object, modality).
    prompt_rows : prompt-table rows of this image (S2-S6).
    strategies : subset of S1..S6.
    points_per_side : S1 grid size m.
    save_masks : folder for the matched masks (oracle rule), or None.

    Returns
    -------
    list of dict
        Rows of the results table.
    """
    from cosmoslib import everything, matching, metrics, prompts

    size = label.shape[:2]
    rows: list[dict] = []
    base = lambda r: dict(task=r.task, image_id=r.image_id, label_value=int(r.label_value),  # noqa: E731
                          object=r.object, modality=r.modality, model=model.name,
                          t_embed_s=t_embed)
    if "S1" in strategies:
        start = time.perf_counter()
        result = everything.generate_everything(model, embedding, size, points_per_side=points_per_side,
                                                **(everything_kwargs or {}))
        masks = result.masks  # decoded from RLE once per image, shared by all its objects
        t_s1 = time.perf_counter() - start
        for r in objects.itertuples(index=False):
            gt = label == r.label_value
            m = matching.match_everything(masks, gt)
            if m.oracle_index is not None:
                pred, piou = masks[m.oracle_index], float(result.predicted_iou[m.oracle_index])
            else:  # no mask survived the filters: an empty prediction, scored by the empty policy
                pred, piou = np.zeros(size, bool), float("nan")
            rows.append(dict(base(r), strategy="S1", selection_rule="oracle_dice", pred_iou=piou,
                             n_candidates=len(result.masks), t_decode_s=t_s1, **metrics.evaluate_pair(pred, gt)))
            if save_masks is not None:
                _save_mask(save_masks, model.name, "S1", r, pred)
    wanted = [s for s in strategies if s != "S1"]
    if wanted:
        # The prompt-independent part of decoding is done once per image and shared by every
        # prompt; its time is spread evenly over this image's decodes so t_decode_s stays the
        # full prompt-encoding + mask-decoding cost.
        start = time.perf_counter()
        prepared = model.prepare(embedding) if hasattr(model, "prepare") else embedding
        t_prepare = (time.perf_counter() - start) / max(1, len(objects) * len(wanted))
        by_key = {(int(p.label_value), p.strategy): p for p in prompt_rows.itertuples(index=False)}
        for r in objects.itertuples(index=False):
            gt = label == r.label_value
            for strategy in wanted:
                prow = by_key.get((int(r.label_value), strategy))
                if prow is None:
                    continue
                prompt = prompts.prompt_from_row(prow)
                start = time.perf_counter()
                decoded = model.decode(prepared, prompt, size)
                t_dec = time.perf_counter() - start + t_prepare
                m = matching.match(decoded.masks, decoded.iou_pred, gt)
                for rule, idx in (("oracle_dice", m.oracle_index), ("pred_iou", m.pred_iou_index)):
                    rows.append(dict(base(r), strategy=strategy, selection_rule=rule,
                                     pred_iou=float(decoded.iou_pred[idx]),
                                     n_candidates=int(len(decoded.masks)), t_decode_s=t_dec,
                                     **metrics.evaluate_pair(decoded.masks[idx], gt)))
                if save_masks is not None:
                    _save_mask(save_masks, model.name, strategy, r, decoded.masks[m.oracle_index])
    return rows


def prompt_table(manifest: pd.DataFrame, root: Path, seed: int, path: Path | None = None) -> pd.DataFrame:
    """The seeded prompt table of ``manifest`` (S2-S6), reused from ``path`` when it holds it."""
    from cosmoslib import prompts
    from cosmoslib.io import atomic_write_parquet

    keys = ["task", "image_id", "label_value"]
    if path is not None and path.exists():
        table = pd.read_parquet(path)
        have = set(map(tuple, table[keys].astype({"label_value": int}).itertuples(index=False)))
        need = set(map(tuple, manifest[keys].astype({"label_value": int}).itertuples(index=False)))
        if need <= have and (table["seed"] == seed).all():
            return table
    table = prompts.make_prompt_table(manifest, root, seed=seed)
    if path is not None:
        atomic_write_parquet(table, path)
    return table


def evaluate(manifest: pd.DataFrame, root: str | Path, models: Iterable, out: str | Path,
             strategies: Sequence[str] = STRATEGIES, cache_dir: str | Path | None = None,
             save_masks: str | Path | None = None, seed: int = 0, points_per_side: int = 32,
             everything_kwargs: dict | None = None) -> tuple[pd.DataFrame, EvalReport]:
    """Evaluate ``models`` on the objects of ``manifest`` and write the results table.

    Parameters
    ----------
    manifest : DataFrame
        Rows to evaluate (see :func:`cosmoslib.io.index`).
    root : path
        The COSMOS root the manifest's relative paths start from.
    models : iterable of SamFamilyModel
    out : path
        ``results.parquet`` to write; ``<out>.parts/`` holds resumable per-image parts and
        ``prompts.parquet`` beside ``out`` the prompt table shared by all models.
    strategies : subset of ``STRATEGIES``.
    cache_dir : embedding cache folder (default :func:`cosmoslib.paths.embedding_cache_dir`).
    save_masks : write matched masks to ``<dir>/<model>/<strategy>/<task>/<image>__<object>-<value>.png``.
    seed : prompt sampling seed.
    points_per_side : S1 grid size m.

    Returns
    -------
    (DataFrame, EvalReport)
    """
    from cosmoslib import cache as cache_mod
    from cosmoslib import paths
    from cosmoslib.io import InputError, atomic_write_parquet, read_label

    start = time.perf_counter()
    root, out = Path(root), Path(out)
    strategies = [s.upper() for s in strategies]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ValueError(f"unknown strategies {bad}; choose from {', '.join(STRATEGIES)}")
    cache_dir = Path(cache_dir) if cache_dir else paths.embedding_cache_dir()
    save_masks = Path(save_masks) if save_masks else None
    models = list(models)
    # Parts live under a fingerprint of everything that changes a row, so a rerun with other
    # settings (or a changed checkpoint) never mixes in stale parts.
    settings = json.dumps(dict(strategies=sorted(strategies), seed=seed, points_per_side=points_per_side,
                               everything=everything_kwargs or {}, version=__version__), sort_keys=True)
    parts = out.with_name(out.name + ".parts") / hashlib.sha256(settings.encode()).hexdigest()[:12]
    report = EvalReport(out=out, models=[m.name for m in models], strategies=list(strategies))

    need_prompts = any(s in PROMPT_STRATEGIES for s in strategies)
    ptable = prompt_table(manifest, root, seed, out.with_name("prompts.parquet")) if need_prompts else None
    groups = list(manifest.groupby(["task", "image_id"], sort=True))
    report.n_images, report.n_objects = len(groups), len(manifest)
    part_files: list[Path] = []
    for model in models:
        emb_cache = cache_mod.EmbeddingCache(cache_dir, model)
        bar = tqdm(groups, desc=f"evaluate {model.name}", unit="img", file=sys.stderr)
        for (task, image_id), objects in bar:
            part = (parts / f"{_slug(model.name)}-{model.signature_hash}" / _slug(task)
                    / f"{_slug(image_id)}.parquet")
            part_files.append(part)
            if part.exists():
                report.n_parts_resumed += 1
                continue
            first = objects.iloc[0]
            try:
                image_path = root / first["image_path"]
                emb, t_embed = emb_cache.get_with_time(image_path)
                label = read_label(root / first["label_path"])
                prows = (ptable[(ptable["task"] == task) & (ptable["image_id"] == image_id)]
                         if ptable is not None else pd.DataFrame())
                rows = evaluate_image(model, emb, t_embed, label, objects, prows, strategies,
                                      points_per_side=points_per_side, save_masks=save_masks,
                                      everything_kwargs=everything_kwargs)
            except (InputError, OSError, ValueError) as exc:
                report.failures.append((f"{model.name}:{task}/{image_id}", str(exc)))
                part_files.pop()
                continue
            atomic_write_parquet(pd.DataFrame(rows, columns=RESULT_COLUMNS), part)
            report.n_parts_done += 1
    frames = [pd.read_parquet(p) for p in part_files if p.exists()]
    results = (pd.concat(frames, ignore_index=True) if frames
               else pd.DataFrame(columns=RESULT_COLUMNS))
    atomic_write_parquet(results, out)
    if report.failures:
        pd.DataFrame(report.failures, columns=["file", "reason"]).to_csv(
            out.with_suffix(".skipped.csv"), index=False)
    report.n_rows = len(results)
    report.elapsed = time.perf_counter() - start
    return results, report


def evaluate_cli(root, models, checkpoints, strategies, out, cache_dir=None, save_masks=None, seed=0,
                 device=None, points_per_side=32, max_objects=None) -> EvalReport:
    """``cosmos evaluate``: index ``root``, load the models, evaluate, write ``out``."""
    from cosmoslib import io, models as models_mod
    from cosmoslib.dataset import subsample

    checkpoints = list(checkpoints or [])
    if checkpoints and len(checkpoints) != len(models):
        raise io.InputError(None, f"give one --checkpoint per --model ({len(models)} models, "
                                  f"{len(checkpoints)} checkpoints)")
    loaded = [models_mod.load_model(name, checkpoint=checkpoints[i] if checkpoints else None,
                                    device=device) for i, name in enumerate(models)]
    manifest = io.index(Path(root))
    if max_objects:
        manifest = subsample(manifest, max_objects_per_image=max_objects, seed=seed)
    _, report = evaluate(manifest, root, loaded, out, strategies=strategies, cache_dir=cache_dir,
                         save_masks=save_masks, seed=seed, points_per_side=points_per_side)
    return report


def run_config(params: dict) -> pd.DataFrame:
    """Results of one run-list config (computed once, reused by every chapter of the config).

    ``params`` are the notebook parameters of :func:`cosmoslib.runlist.config_parameters`.
    Results land in ``paths.results_dir(config)/results.parquet`` (resumable).
    """
    from cosmoslib import dataset, models as models_mod, paths

    manifest = dataset.load_manifest(params["data_root"], params["max_images_per_task"],
                                     params["max_objects_per_image"], params["seed"])
    root = Path(manifest.attrs["root"])
    loaded = [models_mod.load_model(name) for name in params["models"]]
    out = paths.results_dir(params["config"]) / "results.parquet"
    results, _ = evaluate(manifest, root, loaded, out, seed=params["seed"],
                          points_per_side=params.get("s1_points_per_side", 32))
    results.attrs["root"] = str(root)
    return results


def everything_grid(params: dict, min_objects: int = 2, max_images: int = 0) -> pd.DataFrame:
    """Table 5: S1 on multi-object images at each grid size ``m`` of ``params["grid_sizes"]``.

    Parameters
    ----------
    params : dict
        Notebook parameters of a run-list config.
    min_objects : int
        Only images with at least this many objects (the paper used four multi-object datasets).
    max_images : int
        Cap on the number of images (0 = all), chosen evenly over the sorted image list.

    Returns
    -------
    DataFrame
        Results rows (oracle rule) with an extra ``points_per_side`` column.
    """
    from cosmoslib import dataset, models as models_mod, paths

    manifest = dataset.load_manifest(params["data_root"], params["max_images_per_task"],
                                     params["max_objects_per_image"], params["seed"])
    root = Path(manifest.attrs["root"])
    counts = manifest.groupby(["task", "image_id"])["label_value"].transform("size")
    multi = manifest[counts >= min_objects]
    keys = multi[["task", "image_id"]].drop_duplicates().sort_values(["task", "image_id"])
    if max_images and len(keys) > max_images:
        keys = keys.iloc[np.linspace(0, len(keys) - 1, max_images).round().astype(int)]
    multi = multi.merge(keys, on=["task", "image_id"])
    loaded = [models_mod.load_model(name) for name in params["models"]]
    frames = []
    for m in params["grid_sizes"]:
        out = paths.results_dir(params["config"]) / "everything_grid" / f"m{m}.parquet"
        res, _ = evaluate(multi, root, loaded, out, strategies=["S1"], points_per_side=int(m),
                          seed=params["seed"])
        frames.append(res.assign(points_per_side=int(m)))
    grid = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    grid.attrs["root"] = str(root)
    return grid


@dataclass(frozen=True)
class GalleryItem:
    """One object of the Fig. 9 gallery: image, GT, and per-strategy prompt + matched mask."""

    title: str
    image: np.ndarray
    gt: np.ndarray
    panels: tuple  # of (strategy, Prompt, mask bool (H, W), dice %)


class Redecoder:
    """Re-decode single objects of a finished config for figures (Figs. 9 and 15).

    Decoding from the cached embedding is cheap, so figures recompute masks instead of storing
    every candidate; the prompts are the same rows of the config's prompt table.
    """

    def __init__(self, params: dict, root: str | Path, model: str | None = None):
        from cosmoslib import cache as cache_mod, io as io_mod, models as models_mod, paths

        self.root = Path(root)
        self.model = models_mod.load_model(model or params["models"][0])
        self.cache = cache_mod.EmbeddingCache(paths.embedding_cache_dir(), self.model)
        self.prompts = pd.read_parquet(paths.results_dir(params["config"]) / "prompts.parquet")
        self.manifest = io_mod.index(self.root).set_index(["task", "image_id", "label_value"]).sort_index()

    def __call__(self, task: str, image_id: str, label_value: int, strategy: str):
        """Returns ``(image, gt, prompt, matched mask, DICE %)`` for one object and strategy."""
        from cosmoslib import matching, prompts
        from cosmoslib.io import read_image, read_label

        row = self.manifest.loc[(task, image_id, int(label_value))]
        image = read_image(self.root / row["image_path"])
        gt = read_label(self.root / row["label_path"]) == int(label_value)
        p = self.prompts
        prow = p[(p["task"] == task) & (p["image_id"] == image_id)
                 & (p["label_value"] == int(label_value)) & (p["strategy"] == strategy)]
        prompt = prompts.prompt_from_row(next(prow.itertuples(index=False)))
        dec = self.model.decode(self.cache.get(self.root / row["image_path"]), prompt, gt.shape)
        m = matching.match(dec.masks, dec.iou_pred, gt)
        return image, gt, prompt, dec.masks[m.oracle_index], float(m.dices[m.oracle_index])


def gallery(results: pd.DataFrame, params: dict, n_per_task: int = 1,
            strategies: Sequence[str] = ("S2", "S3", "S4", "S5", "S6"), model: str | None = None,
            ) -> list[GalleryItem]:
    """Fig. 9: per task, ``n_per_task`` objects spread over the S5 DICE range, each strategy drawn."""
    from cosmoslib import paths

    name = model or params["models"][0]
    redecode = Redecoder(params, results.attrs.get("root") or paths.demo_root(), name)
    s5 = results[(results["model"] == name) & (results["strategy"] == "S5")
                 & (results["selection_rule"] == "oracle_dice")]
    items = []
    for task, part in s5.groupby("task", sort=True):
        part = part.sort_values(["dice", "image_id", "label_value"]).reset_index(drop=True)
        picks = part.iloc[np.linspace(0, len(part) - 1, min(n_per_task, len(part))).round().astype(int)]
        for r in picks.itertuples(index=False):
            panels, image, gt = [], None, None
            for strategy in strategies:
                image, gt, prompt, mask, dice = redecode(r.task, r.image_id, r.label_value, strategy)
                panels.append((strategy, prompt, mask, dice))
            items.append(GalleryItem(f"{r.object} ({r.modality}) {r.image_id}", image, gt, tuple(panels)))
    return items


def known_answer_study(model, cases: pd.DataFrame, patience: int = 12) -> pd.DataFrame:
    """Known-answer study (paper 4.8): box-prompt DICE on objects of controlled difficulty.

    Parameters
    ----------
    model : SamFamilyModel
    cases : DataFrame
        From :func:`cosmoslib.synthetic.known_answer_set` (columns ``k, contrast, image, mask``).

    Returns
    -------
    DataFrame
        ``k, contrast, fourier_order, fourier_order_patient, intensity_diff, size_px, dice`` per
        case (DICE in %, tight GT box prompt S5, oracle rule). ``fourier_order`` follows the
        paper's stopping rule exactly; ``fourier_order_patient`` stops on the gain rule only
        after ``patience`` orders without gain. The paper's rule stops a k-fold symmetric star
        at order 2 (orders 2..k-1 add nothing to such a contour), so it cannot rank stars with
        k >= 6 by lobe count; the patient variant can (see ``cosmoslib.factors.fourier_order``).
    """
    from cosmoslib import factors, matching, metrics, prompts

    rows = []
    for case in cases.itertuples(index=False):
        emb = model.encode([case.image])[0]
        prompt = prompts.make_prompt(case.mask, "S5")
        dec = model.decode(emb, prompt, case.mask.shape)
        m = matching.match(dec.masks, dec.iou_pred, case.mask)
        rows.append(dict(k=case.k, contrast=case.contrast,
                         fourier_order=factors.fourier_order(case.mask).order,
                         fourier_order_patient=factors.fourier_order(case.mask, patience=patience).order,
                         intensity_diff=factors.intensity_difference(case.image, case.mask),
                         size_px=int(case.mask.sum()),
                         dice=metrics.evaluate_pair(dec.masks[m.oracle_index], case.mask)["dice"]))
    return pd.DataFrame(rows)


def everything_example(grid: pd.DataFrame, params: dict, model: str | None = None):
    """Fig. 11: the Everything masks of the image with most objects in ``grid``, for each m.

    Returns
    -------
    (title, image, {m: masks bool (K, H, W)})
    """
    from cosmoslib import cache as cache_mod, everything, models as models_mod, paths
    from cosmoslib.io import read_image

    root = Path(grid.attrs.get("root") or paths.demo_root())
    name = model or params["models"][0]
    sub = grid[grid["model"] == name]
    counts = sub.drop_duplicates(["task", "image_id", "label_value"]).groupby(["task", "image_id"]).size()
    task, image_id = counts.sort_values(ascending=False, kind="stable").index[0]
    from cosmoslib import io as io_mod

    manifest = io_mod.index(root)
    row = manifest[(manifest["task"] == task) & (manifest["image_id"] == image_id)].iloc[0]
    image = read_image(root / row["image_path"])
    mdl = models_mod.load_model(name)
    emb = cache_mod.EmbeddingCache(paths.embedding_cache_dir(), mdl).get(root / row["image_path"])
    masks = {int(m): everything.generate_everything(mdl, emb, image.shape[:2], points_per_side=int(m)).masks
             for m in params["grid_sizes"]}
    return f"{task}/{image_id} ({row['modality']})", image, masks
