"""Finetuning SAM's mask decoder on medical objects (paper 4.12, Figs. 17-18).

The paper finetunes only the mask decoder of SAM ViT-B and ViT-H with box prompts on 45 objects
of COSMOS 1050K: "only the parameters in the mask decoder were adjusted ... total epoch as 20,
and the learning rate and batch size are 1e-4 and 2" (section 4.12). :func:`finetune` does the
same for any SAM-family model of :mod:`cosmoslib.models`, from the cached image embeddings
(:mod:`cosmoslib.models.cache`), so the image encoder never runs during training.

What is trained, and how
------------------------
* **Frozen**: the image encoder (its cached embeddings are the input) and the prompt encoder
  (``requires_grad=False`` on every parameter). **Trained**: ``sam.mask_decoder`` alone, with
  AdamW (lr 1e-4, weight decay 0.01, the authors' released ``train_only_box.py``). Only the
  single-mask output (mask token 0, ``multimask_output=False``) is trained, as in that script;
  the three multimask tokens receive no gradient and keep their weights, and so does the IoU
  head unless ``iou_weight > 0`` adds SAM's own IoU-prediction term (off by default, as in the
  authors' script). A finetuned model is therefore registered with ``default_multimask=False``.
* **Batches**: 2 images per optimiser step; each image brings all its objects (at most
  ``max_objects_per_image``, a seeded draw per epoch, when set), each with its own prompt.
* **Loss**: Dice + binary cross-entropy, each averaged over the objects of an image, then over
  the images of the batch (the authors use MONAI's ``DiceCELoss(sigmoid=True,
  squared_pred=True)``: the Dice term is ``1 - (2 sum(p t) + 1e-5) / (sum(p^2) + sum(t^2) +
  1e-5)`` with ``p = sigmoid(logit)``). It is computed on the decoder's **low-res logits**
  (256 x 256) against the ground truth moved into the same frame -- as MedSAM trains -- where
  the authors' script upsamples the logits to the original image size first; the low-res frame
  costs 16x fewer pixels at SAM's size and is the frame the decoder predicts in.
* **Ground truth in the low-res frame** (:func:`lowres_target`): the mask is resized the way
  the model resizes its image (longest side to the input side S: 1024 for SAM, 256 for
  LiteMedSAM; bilinear with antialiasing on the 0/1 mask), zero-padded at the bottom/right to
  S x S, averaged over S/256 x S/256 blocks (4 x 4 for SAM, none for LiteMedSAM) and
  thresholded at 0.5 -- pixel for pixel the frame of SAM's low-res masks. An object too small
  to cover half a low-res pixel keeps its most covered pixel(s), so no target is empty.
* **Prompt curricula** (:data:`CURRICULA`): ``box`` -- the tight GT box (S5), the paper's
  choice; ``mixed`` -- for every object at every step one of S2-S6 drawn uniformly, built by
  :func:`cosmoslib.protocol.prompts.make_prompt` (``sampling="random"`` by default, so points vary from
  step to step; ``"even"`` gives the evaluation's points). ``shift_levels`` adds the prompt
  randomness of Table 8: each object's prompt is shifted by a level drawn uniformly from the
  given levels (0 = unshifted) with :func:`cosmoslib.protocol.prompts.shift_prompt`.
* **Randomness**: every draw (epoch order, object subset, strategy, points, shift) comes from
  a Generator keyed by (seed, epoch, image, object) -- :func:`cosmoslib.protocol.prompts.object_rng` --
  so a run is the same for the same seed, and a resumed run draws exactly what the
  uninterrupted run drew.

Validation and the split
------------------------
:func:`split_manifest` splits the images into train / val / test **by source volume or source
file** (manifest ``source``), never by slice; without a source, by the case part of image ids
shaped ``<task>_<case>_<slice>`` (the authors' naming, e.g. ``22_Heart_2_10``); else each image
is its own group. Groups that share a task (or tasks that share a group, e.g. two label sets of
one volume) form a *stratum*, split on its own: 3 or more groups give every part at least one;
2 groups give one to train and one to test; a stratum with a single group goes **whole** to
one part (the part then furthest below its target share of objects), and the split table says
so. After each epoch the model is scored on the validation objects (DICE %, single-mask output,
fixed prompts of the evaluation: S5 for ``box``; for ``mixed`` S2..S6 in turn over the sorted
objects); the epoch with the best validation DICE is kept. Without validation objects the last
epoch is kept, and the provenance says so.

Outputs and resume
------------------
``DIR/model.pth`` -- a full state dict (the base model's with the best mask decoder), loadable
by ``load_model(arch, checkpoint=DIR/model.pth)``; ``DIR/provenance.json`` -- base model
signature, data digests (``image_sha``/``label_sha`` of the train, val and test rows), split
(``DIR/split.csv``: one row per image), hyper-parameters and per-epoch train loss and val DICE.
While training, ``DIR/state.pt`` holds the decoder, the optimiser state, torch's RNG state and
the history after every finished epoch (written atomically); a killed run resumes from its last
finished epoch and ends with the same weights as an uninterrupted run. A finished run whose
inputs match (same *run key*: base signature, data, split, hyper-parameters) is reused, not
retrained; a folder holding a run of other inputs is refused unless ``overwrite=True``.

Registration: :func:`finetune` registers the result under its name (default
``<base>-ft-<curriculum>``, see :func:`cosmoslib.models.register_model`) and lists it in
``<generated>/finetuned/registry.json``; importing this module registers every model listed
there whose files still exist, so ``cosmos evaluate ROOT --model NAME`` knows it in a new
process. :func:`load_finetuned` registers and loads a run folder directly.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io as _stdio
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from tqdm.auto import tqdm

from cosmoslib import __version__, paths
from cosmoslib import models as models_mod
from cosmoslib.data import dataset
from cosmoslib.data.readers import read_image, read_label
from cosmoslib.files import (
    InputError,
    atomic_write_bytes,
    atomic_write_json,
)
from cosmoslib.models import cache as cache_mod
from cosmoslib.protocol import metrics, prompts
from cosmoslib.protocol.evaluate import with_digests
from cosmoslib.protocol.splits import (
    DEFAULT_FRACTIONS,
    PARTS,
    SPLIT_FILE,
    Split,
    _check_fractions,
    split_manifest,
)
from cosmoslib.strategies import CURRICULA, STRATEGY_PROMPTS  # CURRICULA: defined with the strategies, named here too

__all__ = [
    "CURRICULA", "LOW_RES", "Settings", "FinetuneResult", "lowres_target", "dice_bce_loss", "iou_head_loss", "trainable_sam",
    "run_key", "finetune", "load_finetuned", "read_provenance", "register_saved", "registry_path",
    "default_name", "share_embeddings",
]

#: Side of the decoder's low-res logits (pixels).
LOW_RES = 256
#: Version of the files a run writes; runs of another version are not reused.
FORMAT_VERSION = 1

_KEY = ["task", "image_id", "label_value"]
_STATE = "state.pt"
_MODEL = "model.pth"
_PROVENANCE = "provenance.json"
_SPLIT = SPLIT_FILE


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Hyper-parameters of one finetuning run (defaults: the paper and the authors' script).

    Attributes
    ----------
    curriculum : {"box", "mixed"}
        Prompt curriculum (module docstring).
    epochs : int
        Epochs (the paper: 20).
    lr : float
        AdamW learning rate (1e-4).
    weight_decay : float
        AdamW weight decay (0.01).
    batch_images : int
        Images per optimiser step (2).
    seed : int
        Seed of every random draw (non-negative).
    max_objects_per_image : int
        Objects of one image used per step, a seeded draw per epoch (0 = all, the authors).
    max_val_objects : int
        Validation objects scored per epoch, a seeded sample spread over the tasks (0 = all).
    shift_levels : tuple of int
        Levels of :data:`cosmoslib.protocol.prompts.SHIFT_LEVELS` drawn per training prompt ((0,) = no
        shift).
    sampling : {"random", "even"}
        Point sampling of the training prompts (:func:`cosmoslib.protocol.prompts.make_prompt`).
    iou_weight : float
        Weight of an IoU-head term, ``(predicted IoU - IoU of the predicted low-res mask with
        the target)^2`` per object, as in SAM's own training (0 = no such term: the authors'
        script, where the IoU head keeps its weights). The Everything mode keeps masks by
        predicted IoU, so a model that learns points needs it there.
    objects_per_pass : int
        Objects decoded in one forward/backward pass (memory only: the gradients of an image's
        objects are accumulated, so the result does not depend on it beyond float rounding).
    fractions : (train, val, test)
        Target shares of objects per part (see :func:`split_manifest`).
    """

    curriculum: str = "box"
    epochs: int = 20
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_images: int = 2
    seed: int = 0
    max_objects_per_image: int = 0
    max_val_objects: int = 0
    shift_levels: tuple[int, ...] = (0,)
    sampling: str = "random"
    iou_weight: float = 0.0
    objects_per_pass: int = 8
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS

    def __post_init__(self):
        object.__setattr__(self, "shift_levels", tuple(int(v) for v in self.shift_levels))
        object.__setattr__(self, "fractions", tuple(float(v) for v in self.fractions))
        if self.curriculum not in CURRICULA:
            raise InputError(None, f"unknown prompt curriculum {self.curriculum!r}; choose one of "
                                   f"{sorted(CURRICULA)}")
        for name in ("epochs", "batch_images", "objects_per_pass"):
            if int(getattr(self, name)) < 1:
                raise InputError(None, f"{name} must be at least 1, got {getattr(self, name)!r}")
        for name in ("seed", "max_objects_per_image", "max_val_objects"):
            if int(getattr(self, name)) < 0:
                raise InputError(None, f"{name} must be non-negative, got {getattr(self, name)!r}")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.iou_weight >= 0):
            raise InputError(None, f"lr must be > 0, weight_decay and iou_weight >= 0, got {self.lr}, "
                                   f"{self.weight_decay}, {self.iou_weight}")
        bad = [v for v in self.shift_levels if v not in prompts.SHIFT_LEVELS]
        if bad or not self.shift_levels:
            raise InputError(None, f"shift levels must be among {sorted(prompts.SHIFT_LEVELS)}, "
                                   f"got {self.shift_levels}")
        if self.sampling not in prompts.SAMPLINGS:
            raise InputError(None, f"sampling must be one of {prompts.SAMPLINGS}, got {self.sampling!r}")
        _check_fractions(self.fractions)

    @property
    def strategies(self) -> tuple[str, ...]:
        """The strategies training prompts are drawn from."""
        return CURRICULA[self.curriculum]

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (lists for tuples)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def default_name(base_name: str, curriculum: str) -> str:
    """The registry name of a finetuned model: ``<base>-ft-<curriculum>``."""
    return f"{base_name}-ft-{curriculum}"


# ----------------------------------------------------------------------------- targets and loss


def lowres_target(mask: np.ndarray, model) -> torch.Tensor:
    """A GT mask moved into the frame of the decoder's low-res logits (module docstring).

    Parameters
    ----------
    mask : bool array (H, W)
        The object at the original image size.
    model : SamFamilyModel
        Supplies the input side S and the resize rule (:meth:`resized_size`).

    Returns
    -------
    float32 tensor (256, 256) of 0/1
        Resized like the image (longest side to S, bilinear, antialiased), padded to S x S,
        averaged over (S/256)^2 blocks, thresholded at 0.5; never empty for a non-empty mask.
    """
    mask = np.asarray(mask, dtype=bool)
    side = int(model.input_size)
    if side % LOW_RES:
        raise ValueError(f"input side {side} is not a multiple of the low-res side {LOW_RES}")
    h, w = model.resized_size(mask.shape)
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    t = F.pad(t, (0, side - w, 0, side - h))
    if side != LOW_RES:
        t = F.avg_pool2d(t, side // LOW_RES)
    soft = t[0, 0]
    target = (soft >= 0.5).float()
    if mask.any() and not target.any():
        target = ((soft == soft.max()) & (soft > 0)).float()
    return target


def iou_head_loss(iou_pred: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared error of the predicted IoU against the IoU of the predicted mask (per object).

    Parameters
    ----------
    iou_pred : tensor (B,)
        The decoder's IoU prediction of the trained mask.
    logits, targets : tensors (B, 256, 256)
        Low-res logits (thresholded at 0, no gradient) and 0/1 targets.

    Returns
    -------
    tensor (B,)
        ``(iou_pred - IoU)^2``, IoU in [0, 1] (0 when prediction and target are both empty).
    """
    with torch.no_grad():
        pred = (logits > 0).flatten(1).float()
        t = targets.flatten(1)
        inter = (pred * t).sum(1)
        union = pred.sum(1) + t.sum(1) - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1.0), torch.zeros_like(union))
    return (iou_pred - iou) ** 2


def dice_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-object Dice + BCE loss (MONAI ``DiceCELoss(sigmoid=True, squared_pred=True)`` terms).

    Parameters
    ----------
    logits, targets : tensors (B, 256, 256)
        Low-res mask logits and 0/1 targets of B objects.

    Returns
    -------
    tensor (B,)
        ``1 - (2 sum(p t) + 1e-5) / (sum(p^2) + sum(t^2) + 1e-5) + mean BCE`` per object.
    """
    p = torch.sigmoid(logits).flatten(1)
    t = targets.flatten(1)
    dice = 1.0 - (2.0 * (p * t).sum(1) + 1e-5) / ((p * p).sum(1) + (t * t).sum(1) + 1e-5)
    bce = F.binary_cross_entropy_with_logits(logits.flatten(1), t, reduction="none").mean(1)
    return dice + bce


# ----------------------------------------------------------------------------- the model


def unsupported_reason(model) -> str | None:
    """Why ``model``'s decoder cannot be finetuned here, or None when it can.

    Fine-tuning trains SAM's ``mask_decoder`` (SAM, MobileSAM, LiteMedSAM, MedSAM and their
    finetuned derivatives); SAM 2 keeps another decoder layout (``sam_mask_decoder``, with
    high-resolution skip features and object pointers) that this protocol does not train.
    """
    if not hasattr(model.sam, "mask_decoder"):
        return (f"{model.name} ({model.arch}) has SAM 2's decoder layout; this protocol finetunes SAM's "
                f"mask decoder only")
    return None


def trainable_sam(model) -> tuple[Any, torch.nn.Module]:
    """A ``Sam`` for training: the base's image encoder (shared, never run), a frozen copy of
    its prompt encoder and a trainable copy of its mask decoder.

    The base model is not modified. Returns ``(sam, mask_decoder)``; every parameter outside
    the mask decoder has ``requires_grad=False``.
    """

    base = model.sam
    reason = unsupported_reason(model)
    if reason:
        raise InputError(None, f"fine-tuning is not supported: {reason}")
    sam = Sam.__new__(Sam)
    torch.nn.Module.__init__(sam)
    sam.image_encoder = base.image_encoder
    sam.prompt_encoder = copy.deepcopy(base.prompt_encoder)
    sam.mask_decoder = copy.deepcopy(base.mask_decoder)
    sam.register_buffer("pixel_mean", base.pixel_mean.detach().clone(), False)
    sam.register_buffer("pixel_std", base.pixel_std.detach().clone(), False)
    for p in sam.prompt_encoder.parameters():
        p.requires_grad_(False)
    for p in sam.mask_decoder.parameters():
        p.requires_grad_(True)
    sam.prompt_encoder.eval()
    return sam, sam.mask_decoder


def _view_model(model, sam, name: str, device: torch.device):
    """A SamFamilyModel around the training ``sam`` (for validation decoding; shares weights)."""
    return models_mod.SamFamilyModel(
        name=name, arch=model.arch, sam=sam, checkpoint_path=model.checkpoint_path,
        checkpoint_sha256=model.checkpoint_sha256, device=device,
        supports_points=True, default_multimask=False, autocast=False,
        fast_encoder=model.fast_encoder)


def _prompt_tensors(model, prompt: prompts.Prompt, size) -> tuple:
    coords = labels = box = None
    if prompt.points is not None and len(prompt.points):
        coords = torch.as_tensor(model.transform_coords(np.asarray(prompt.points, float), size),
                                 dtype=torch.float32)
        labels = torch.as_tensor(np.asarray(prompt.point_labels, dtype=np.int64))
    if prompt.box is not None:
        box = torch.as_tensor(model.transform_boxes(np.asarray(prompt.box, float), size),
                              dtype=torch.float32).reshape(4)
    return coords, labels, box


def _same_encoder(a, b) -> bool:
    """Whether two models' image encoders and input normalisation are bit for bit the same."""
    if a.sam.image_encoder is b.sam.image_encoder:
        return True
    sa, sb = a.sam.image_encoder.state_dict(), b.sam.image_encoder.state_dict()
    return (a.input_size == b.input_size and set(sa) == set(sb)
            and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)
            and torch.equal(a.sam.pixel_mean.cpu(), b.sam.pixel_mean.cpu())
            and torch.equal(a.sam.pixel_std.cpu(), b.sam.pixel_std.cpu()))


def share_embeddings(base, target, image_paths, cache_dir: str | os.PathLike | None = None,
                     dtype: str = "float16", progress: bool = True) -> int:
    """Copy cached embeddings of ``base`` into ``target``'s cache store, without encoding.

    The embedding cache is keyed by the model signature, which includes the checkpoint's
    SHA-256, so a finetuned model gets a store of its own although its image encoder is the
    base's, bit for bit. Copying the entries saves re-encoding every image before the
    finetuned model can be evaluated.

    Parameters
    ----------
    base, target : SamFamilyModel
        ``target``'s image encoder and pixel normalisation must equal ``base``'s exactly
        (checked tensor by tensor).
    image_paths : iterable of paths
        Images to copy; those without a valid ``base`` entry are left alone (nothing is
        computed).
    cache_dir, dtype :
        As :class:`cosmoslib.models.cache.EmbeddingCache`.
    progress : bool
        tqdm bar (stderr).

    Returns
    -------
    int
        Entries written (entries already valid in ``target``'s store are not counted).

    Raises
    ------
    InputError
        The two image encoders differ.
    """

    if not _same_encoder(base, target):
        raise InputError(None, f"{target.name}'s image encoder differs from {base.name}'s: its embeddings "
                               f"cannot be shared")
    src = cache_mod.EmbeddingCache(cache_dir, base, dtype=dtype)
    dst = cache_mod.EmbeddingCache(cache_dir, target, dtype=dtype)
    if src.store == dst.store:
        return 0
    written = 0
    for path in tqdm(sorted({Path(p) for p in image_paths}), desc="share embeddings", unit="img",
                     file=sys.stderr, disable=not progress):
        try:
            key = cache_mod.image_key(read_image(path))
        except (InputError, OSError, ValueError):
            continue
        if key in dst or key not in src:
            continue
        meta = src.metadata(key)
        seconds = meta.get("encode_seconds")
        # EmbeddingCache has no public writer; _write is its own atomic, verified entry writer
        dst._write(key, src.load(key), meta["original_size"], float("nan") if seconds is None else float(seconds),
                   meta.get("source"))
        written += 1
    return written


# ----------------------------------------------------------------------------- digests and keys


def _rows_digest(rows: pd.DataFrame) -> str:
    cols = ["task", "image_id", "label_value", "image_sha", "label_sha"]
    table = rows[cols].astype(str).sort_values(cols[:3]).to_csv(index=False)
    return hashlib.blake2b(table.encode(), digest_size=16).hexdigest()


def run_key(model, settings: Settings, split: Split, train: pd.DataFrame, val: pd.DataFrame) -> str:
    """32 hex digits that identify a run: base signature, settings, split, train/val content."""
    payload = json.dumps(dict(format=FORMAT_VERSION, base=model.signature, settings=settings.as_dict(),
                              split=split.digest(), train=_rows_digest(train), val=_rows_digest(val)),
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------- training


@dataclass
class FinetuneResult:
    """What :func:`finetune` produced.

    Attributes
    ----------
    out_dir : Path
    name : str
        Registry name of the finetuned model.
    checkpoint : Path
        ``out_dir / "model.pth"``.
    provenance : dict
        The content of ``provenance.json``.
    split : Split
    history : DataFrame
        ``epoch, train_loss, val_dice, n_train_objects, seconds``; epoch 0 is the base model
        (validation only).
    reused : bool
        True when a finished run of the same inputs was found and nothing was trained.
    resumed_from : int
        Last finished epoch found in ``state.pt`` when the run started (0 = fresh).
    """

    out_dir: Path
    name: str
    checkpoint: Path
    provenance: dict
    split: Split
    history: pd.DataFrame
    reused: bool = False
    resumed_from: int = 0

    @property
    def best_epoch(self) -> int:
        return int(self.provenance["best_epoch"])

    def summary(self) -> str:
        """One paragraph for the command line."""
        p = self.provenance
        how = ("reused a finished run" if self.reused else
               f"trained {p['hyperparameters']['epochs']} epochs"
               + (f" (resumed after epoch {self.resumed_from})" if self.resumed_from else ""))
        val = p.get("best_val_dice")
        val_text = f"val DICE {val:.2f} %" if val is not None else "no validation objects"
        counts = p["data"]
        return (f"Finetuned the mask decoder of {p['base_model']['name']} with {p['curriculum']} prompts: "
                f"{how}; {counts['n_train_objects']} train / {counts['n_val_objects']} val / "
                f"{counts['n_test_objects']} test objects (split by {p['split']['rule']}); kept epoch "
                f"{p['best_epoch']} ({val_text}). Registered as {self.name!r}; weights {self.checkpoint}.")


def _history_frame(history: list[dict]) -> pd.DataFrame:
    cols = ["epoch", "train_loss", "val_dice", "n_train_objects", "seconds"]
    return pd.DataFrame(history, columns=cols).astype({"train_loss": float, "val_dice": float})


def _save_torch(obj, path: Path) -> Path:
    buffer = _stdio.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _val_objects(val: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """The validation objects scored each epoch: all, or a seeded sample spread over tasks."""
    val = val.sort_values(_KEY).reset_index(drop=True)
    n = settings.max_val_objects
    if not n or n >= len(val):
        return val
    picked = dataset.spread_objects(val, n, prompts.object_rng(settings.seed, "finetune-val", "", 0))
    return picked[val.columns].sort_values(_KEY).reset_index(drop=True)


class _Trainer:
    """One run's loop (internal; :func:`finetune` is the interface)."""

    def __init__(self, model, root: Path, settings: Settings, train: pd.DataFrame, val: pd.DataFrame,
                 emb_cache, device: torch.device, progress: bool, name: str):
        self.model, self.root, self.s = model, root, settings
        self.train = train.sort_values(_KEY).reset_index(drop=True)
        self.val = _val_objects(val, settings)
        self.cache, self.device, self.progress = emb_cache, device, progress
        self.sam, self.decoder = trainable_sam(model)
        self.decoder.to(device)
        self.sam.prompt_encoder.to(device)
        self.view = _view_model(model, self.sam, name, device)
        params = [p for p in self.decoder.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.images = [(t, i, g) for (t, i), g in self.train.groupby(["task", "image_id"], sort=True)]

    def embedding(self, row) -> torch.Tensor:
        emb = self.cache.get(self.root / row["image_path"])
        return torch.as_tensor(emb, dtype=torch.float32, device=self.device)[None]

    # ---- one epoch of training

    def _objects(self, epoch: int, task: str, image_id: str, objects: pd.DataFrame) -> pd.DataFrame:
        cap = self.s.max_objects_per_image
        if not cap or len(objects) <= cap:
            return objects
        rng = prompts.object_rng(self.s.seed, task, image_id, 0, "finetune-objects", int(epoch))
        keep = np.sort(rng.choice(len(objects), size=cap, replace=False))
        return objects.iloc[keep]

    def _prompt(self, epoch: int, task, image_id, label_value, mask) -> prompts.Prompt:
        rng = prompts.object_rng(self.s.seed, task, image_id, int(label_value), "finetune", int(epoch))
        strategies = self.s.strategies
        strategy = strategies[int(rng.integers(len(strategies)))] if len(strategies) > 1 else strategies[0]
        levels = self.s.shift_levels
        level = levels[int(rng.integers(len(levels)))] if len(levels) > 1 else levels[0]
        prompt = prompts.make_prompt(mask, strategy, rng=rng, sampling=self.s.sampling)
        if level:
            prompt = prompts.shift_prompt(prompt, level, mask.shape, rng)
        return prompt

    def _image_loss(self, epoch, task, image_id, objects, weight: float) -> tuple[float, int]:
        """Forward/backward of one image's objects (gradients accumulate); returns its mean loss."""
        first = objects.iloc[0]
        emb = self.embedding(first)
        label = read_label(self.root / first["label_path"])
        size = label.shape[:2]
        items = []
        for r in objects.itertuples(index=False):
            mask = label == int(r.label_value)
            if not mask.any():
                raise InputError(self.root / first["label_path"], f"label value {r.label_value} not present")
            prompt = self._prompt(epoch, task, image_id, r.label_value, mask)
            coords, labels, box = _prompt_tensors(self.model, prompt, size)
            items.append((coords, labels, box, lowres_target(mask, self.model)))
        # group prompts of one shape (number of points, box or not) into one decoder pass
        shapes: dict[tuple, list[int]] = {}
        for i, (coords, _, box, _) in enumerate(items):
            shapes.setdefault((0 if coords is None else len(coords), box is not None), []).append(i)
        n = len(items)
        total = 0.0
        with torch.no_grad():
            image_pe = self.sam.prompt_encoder.get_dense_pe()
        for (n_pts, has_box), idx in sorted(shapes.items()):
            for start in range(0, len(idx), self.s.objects_per_pass):
                chunk = idx[start:start + self.s.objects_per_pass]
                points = None
                if n_pts:
                    points = (torch.stack([items[i][0] for i in chunk]).to(self.device),
                              torch.stack([items[i][1] for i in chunk]).to(self.device))
                boxes = torch.stack([items[i][2] for i in chunk]).to(self.device) if has_box else None
                targets = torch.stack([items[i][3] for i in chunk]).to(self.device)
                with torch.no_grad():
                    sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=None)
                low, iou_pred = self.decoder(image_embeddings=emb, image_pe=image_pe,
                                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                             multimask_output=False)
                losses = dice_bce_loss(low[:, 0], targets)
                if self.s.iou_weight:
                    losses = losses + self.s.iou_weight * iou_head_loss(iou_pred[:, 0], low[:, 0], targets)
                (losses.sum() * (weight / n)).backward()
                total += float(losses.detach().sum())
        return total / n, n

    def train_epoch(self, epoch: int) -> tuple[float, int]:
        order = prompts.object_rng(self.s.seed, "finetune-order", "", 0, int(epoch)).permutation(len(self.images))
        batches = [order[i:i + self.s.batch_images] for i in range(0, len(order), self.s.batch_images)]
        self.decoder.train()
        losses, n_objects = [], 0
        bar = tqdm(batches, desc=f"finetune {self.s.curriculum} epoch {epoch}/{self.s.epochs}", unit="batch",
                   file=sys.stderr, disable=not self.progress, leave=False)
        for batch in bar:
            self.optimizer.zero_grad(set_to_none=True)
            batch_loss = 0.0
            for j in batch:
                task, image_id, objects = self.images[int(j)]
                objects = self._objects(epoch, task, image_id, objects)
                loss, n = self._image_loss(epoch, task, image_id, objects, 1.0 / len(batch))
                batch_loss += loss / len(batch)
                n_objects += n
            self.optimizer.step()
            losses.append(batch_loss)
            bar.set_postfix(loss=f"{batch_loss:.4f}")
        bar.close()
        self.decoder.eval()
        return float(np.mean(losses)) if losses else float("nan"), n_objects

    # ---- validation

    def validate(self) -> float | None:
        """Mean validation DICE (%) of the current decoder, or None without validation objects."""
        if len(self.val) == 0:
            return None
        strategies = self.s.strategies
        dices = []
        k = 0
        for (task, image_id), objects in self.val.groupby(["task", "image_id"], sort=True):
            first = objects.iloc[0]
            prepared = self.view.prepare(self.embedding(first))
            label = read_label(self.root / first["label_path"])
            for r in objects.itertuples(index=False):
                gt = label == int(r.label_value)
                strategy = strategies[k % len(strategies)]
                k += 1
                prompt = prompts.make_prompt(gt, strategy, sampling=prompts.EVEN)
                dec = self.view.decode(prepared, prompt, gt.shape, multimask=False)
                dices.append(metrics.dice(dec.masks[0], gt))
        return float(np.mean(dices))


def read_provenance(out_dir: str | os.PathLike) -> dict:
    """``out_dir/provenance.json`` as a dict (InputError when missing or unreadable)."""
    path = Path(out_dir) / _PROVENANCE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "no provenance.json: not a finished finetuning run") from None
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable provenance ({exc})") from None


def _finished(out_dir: Path, key: str) -> dict | None:
    """The provenance of a finished run of ``key`` in ``out_dir`` whose weights are intact."""
    try:
        prov = read_provenance(out_dir)
    except InputError:
        return None
    ckpt = out_dir / _MODEL
    if prov.get("run_key") != key or not prov.get("finished") or not ckpt.is_file():
        return None
    if models_mod.file_sha256(ckpt) != prov.get("checkpoint_sha256"):
        return None
    return prov


def _other_run(out_dir: Path, key: str) -> str | None:
    """A description of a run of other inputs found in ``out_dir``, else None."""
    for name in (_PROVENANCE, _STATE):
        path = out_dir / name
        if not path.exists():
            continue
        try:
            found = (json.loads(path.read_text(encoding="utf-8")).get("run_key") if name == _PROVENANCE
                     else torch.load(path, map_location="cpu", weights_only=True).get("run_key"))
        except Exception:  # a damaged file of ours: it can be replaced
            return None
        if found != key:
            return f"{path.name} of run {str(found)[:12]} (this run: {key[:12]})"
    return None


def finetune(manifest: pd.DataFrame, root: str | os.PathLike, model, out_dir: str | os.PathLike,
             settings: Settings | None = None, *, split: Split | None = None, name: str | None = None,
             cache_dir: str | os.PathLike | None = None, device: str | torch.device | None = None,
             progress: bool = True, overwrite: bool = False, register: bool = True, share: bool = True,
             on_epoch_end: Callable[[dict], None] | None = None, **changes) -> FinetuneResult:
    """Finetune the mask decoder of ``model`` on the train part of ``manifest`` (module docstring).

    Parameters
    ----------
    manifest : DataFrame
        Objects (:func:`cosmoslib.data.indexer.index`); ``image_sha``/``label_sha`` are computed when missing.
    root : path
        The COSMOS root of the manifest's relative paths.
    model : SamFamilyModel or str
        The base model (a registry name is loaded with :func:`cosmoslib.models.load_model`).
        It is not modified.
    out_dir : path
        Run folder: ``model.pth``, ``provenance.json``, ``split.csv`` (and ``state.pt`` while
        training).
    settings : Settings, optional
        Hyper-parameters; keyword ``changes`` override single fields
        (``finetune(..., curriculum="mixed", epochs=3)``).
    split : Split, optional
        Default :func:`split_manifest` with ``settings.fractions`` and ``settings.seed``.
    name : str, optional
        Registry name (default ``<base>-ft-<curriculum>``).
    cache_dir : path, optional
        Embedding cache (default :func:`cosmoslib.paths.embedding_cache_dir`).
    device : str or torch.device, optional
        Default: the base model's device (CUDA when it was loaded there).
    progress : bool
        tqdm bars (stderr): embeddings, and one per epoch.
    overwrite : bool
        Replace a run of *other* inputs found in ``out_dir`` (default: refuse). A run of the
        same inputs is always resumed or reused.
    register : bool
        Register the result (and list it in :func:`registry_path`).
    share : bool
        Copy the base model's cached embeddings of the manifest's images (all parts: they are
        computed before training) into the finetuned model's cache store
        (:func:`share_embeddings`), so evaluating it needs no encoder pass.
    on_epoch_end : callable, optional
        Called with the epoch's history row after that epoch's state was saved.

    Returns
    -------
    FinetuneResult

    Raises
    ------
    InputError
        No training objects, an unreadable image or label, or ``out_dir`` holding another run.
    """

    settings = dataclasses.replace(settings or Settings(), **changes) if changes else (settings or Settings())
    if isinstance(model, str):
        model = models_mod.load_model(model, device=device)
    root, out_dir = Path(root), Path(out_dir)
    dev = torch.device(device) if device is not None else model.device
    name = name or default_name(model.name, settings.curriculum)
    manifest = with_digests(manifest, root).astype({"label_value": "int64"})
    split = split or split_manifest(manifest, settings.fractions, settings.seed)
    train, val, test = (split.rows(manifest, p) for p in PARTS)
    if len(train) == 0:
        raise InputError(root, "the split left no training objects")
    key = run_key(model, settings, split, train, val)

    prov = _finished(out_dir, key)
    if prov is not None:
        result = FinetuneResult(out_dir, prov["name"], out_dir / _MODEL, prov, split,
                                _history_frame(prov["history"]), reused=True)
        if register:
            _register(out_dir, prov)
        if share:
            _share_after(model, out_dir, prov, manifest, root, cache_dir, progress)
        return result
    other = _other_run(out_dir, key)
    if other is not None:
        if not overwrite:
            raise InputError(out_dir, f"holds a finetuning run of other inputs ({other}); use another "
                                      f"folder or overwrite=True (--overwrite)")
        for stale in (_STATE, _PROVENANCE, _MODEL, _SPLIT):
            (out_dir / stale).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    split.save(out_dir / _SPLIT)

    emb_cache = cache_mod.EmbeddingCache(cache_dir, model)
    # every image of the split: train and val now, test for the evaluation that follows (the
    # finetuned model shares these embeddings, see share_embeddings)
    needed = sorted({root / p for p in manifest["image_path"]})
    report = emb_cache.ensure(needed, progress=progress)
    if report.failures:
        raise InputError(report.failures[0][0], f"embedding failed: {report.failures[0][1]} "
                                                f"({report.n_failed} images failed)")

    torch.manual_seed(settings.seed)
    trainer = _Trainer(model, root, settings, train, val, emb_cache, dev, progress, name)
    history: list[dict] = []
    best = {"epoch": None, "val_dice": None, "decoder": None}
    start_epoch = 1
    state_path = out_dir / _STATE
    if state_path.exists():
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # damaged: start over, loudly
            warnings.warn(f"{state_path}: unreadable training state ({type(exc).__name__}); starting over",
                          stacklevel=2)
            state = None
        if state is not None and state.get("run_key") == key:
            trainer.decoder.load_state_dict(state["decoder"])
            trainer.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            history = list(state["history"])
            best = dict(epoch=state["best_epoch"], val_dice=state["best_val_dice"],
                        decoder=state["best_decoder"])
            start_epoch = int(state["epoch"]) + 1
    resumed_from = start_epoch - 1

    if not history:  # epoch 0: the base model on the validation objects
        start = time.perf_counter()
        history.append(dict(epoch=0, train_loss=None, val_dice=trainer.validate(), n_train_objects=0,
                            seconds=time.perf_counter() - start))
    for epoch in range(start_epoch, settings.epochs + 1):
        start = time.perf_counter()
        loss, n_obj = trainer.train_epoch(epoch)
        val_dice = trainer.validate()
        row = dict(epoch=epoch, train_loss=loss, val_dice=val_dice, n_train_objects=n_obj,
                   seconds=time.perf_counter() - start)
        history.append(row)
        if best["epoch"] is None or val_dice is None or val_dice > best["val_dice"]:
            best = dict(epoch=epoch, val_dice=val_dice, decoder=_cpu_state(trainer.decoder))
        _save_torch(dict(format=FORMAT_VERSION, run_key=key, epoch=epoch, decoder=_cpu_state(trainer.decoder),
                         optimizer=trainer.optimizer.state_dict(), torch_rng=torch.get_rng_state(),
                         history=history, best_epoch=best["epoch"], best_val_dice=best["val_dice"],
                         best_decoder=best["decoder"]), state_path)
        if progress:
            val_text = "n/a" if val_dice is None else f"{val_dice:.2f} %"
            print(f"finetune {name}: epoch {epoch}/{settings.epochs} train loss {loss:.4f}, "
                  f"val DICE {val_text} ({row['seconds']:.1f} s)", file=sys.stderr)
        if on_epoch_end is not None:
            on_epoch_end(dict(row))

    full = {k: v.detach().to("cpu") for k, v in model.sam.state_dict().items()}
    for k, v in best["decoder"].items():
        full[f"mask_decoder.{k}"] = v
    _save_torch(full, out_dir / _MODEL)
    val_known = [h["val_dice"] for h in history if h["epoch"] > 0 and h["val_dice"] is not None]
    prov = dict(
        format=FORMAT_VERSION, finished=True, run_key=key, name=name, arch=model.arch,
        checkpoint=_MODEL, checkpoint_sha256=models_mod.file_sha256(out_dir / _MODEL),
        base_model=dict(name=model.name, signature=model.signature, signature_hash=model.signature_hash),
        curriculum=settings.curriculum, strategies=list(settings.strategies),
        supports_points=bool(settings.curriculum == "mixed" or model.supports_points),
        hyperparameters=settings.as_dict(),
        optimizer="AdamW on mask_decoder parameters; image and prompt encoders frozen",
        loss="Dice (squared, smooth 1e-5) + BCE per object on 256x256 low-res logits"
             + (f" + {settings.iou_weight:g} x squared error of the IoU head" if settings.iou_weight else "")
             + ", mean over objects, then over the images of a batch",
        low_res_target="resize longest side to S (bilinear, antialiased), pad to SxS, mean over "
                       "(S/256)^2 blocks, threshold 0.5",
        output="single-mask output (multimask_output=False); multimask tokens unchanged; IoU head "
               + ("trained" if settings.iou_weight else "unchanged"),
        split=split.summary(),
        data=dict(train_digest=_rows_digest(train), val_digest=_rows_digest(val), test_digest=_rows_digest(test),
                  n_train_objects=int(len(train)), n_val_objects=int(len(val)), n_test_objects=int(len(test)),
                  n_val_scored=int(len(trainer.val))),
        history=history, best_epoch=int(best["epoch"]), best_val_dice=best["val_dice"],
        selection=("best validation DICE over epochs 1.." + str(settings.epochs) if val_known
                   else "last epoch (no validation objects)"),
        device=str(dev), torch_version=torch.__version__, cosmoslib_version=__version__,
        train_seconds=float(sum(h["seconds"] for h in history)),
    )
    atomic_write_json(out_dir / _PROVENANCE, prov)
    state_path.unlink(missing_ok=True)
    if register:
        _register(out_dir, prov)
    if share:
        _share_after(model, out_dir, prov, manifest, root, cache_dir, progress)
    return FinetuneResult(out_dir, name, out_dir / _MODEL, prov, split, _history_frame(history),
                          resumed_from=resumed_from)


def _share_after(model, out_dir: Path, prov: dict, manifest, root: Path, cache_dir, progress: bool) -> int:
    """Share the base's cached embeddings of ``manifest`` with the finetuned model of ``out_dir``."""
    sam, _ = trainable_sam(model)  # shares the base's image encoder: same embeddings by construction
    view = models_mod.SamFamilyModel(
        name=prov["name"], arch=model.arch, sam=sam, checkpoint_path=out_dir / _MODEL,
        checkpoint_sha256=prov["checkpoint_sha256"], device=model.device, supports_points=True,
        default_multimask=False, autocast=model.autocast, fast_encoder=model.fast_encoder)
    # The base's entries were made by its encoder backend (e.g. an ONNX Runtime / OpenVINO
    # export under backend="auto"): file them under the same backend's signature. Set after
    # construction, so the view does not export an encoder of its own (it never encodes).
    view.backend = getattr(model, "backend", "torch")
    return share_embeddings(model, view, {root / p for p in manifest["image_path"]}, cache_dir,
                            progress=progress)


# ----------------------------------------------------------------------------- registry


def registry_path() -> Path:
    """The list of finetuned models this machine made: ``<generated>/finetuned/registry.json``."""
    return paths.generated_dir() / "finetuned" / "registry.json"


def _register(out_dir: Path, prov: dict, persist: bool = True) -> models_mod.ModelEntry:
    # The decoder learnt the curriculum's prompts on top of what its base was trained with: a
    # box-trained base finetuned on ``mixed`` prompts has now seen points too.
    base = prov["base_model"]["name"]
    learnt = [k for s in CURRICULA.get(prov["curriculum"], ()) for k in STRATEGY_PROMPTS[s]]
    try:
        before = list(models_mod.registry.lookup(base).trained_prompts)
    except InputError:  # the base is not registered in this process: only the curriculum is known
        before = []
    prompts = tuple(dict.fromkeys([*before, *learnt]))
    entry = models_mod.register_model(
        prov["name"], prov["arch"], out_dir / prov["checkpoint"], default_multimask=False, trained_prompts=prompts,
        supports_points=bool(prov.get("supports_points", prov["curriculum"] == "mixed")),
        description=(f"{base} with its mask decoder finetuned on {prov['curriculum']} "
                     f"prompts ({out_dir.name})"), overwrite=True, base=base)
    if persist:
        path = registry_path()
        try:
            listed = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        except (OSError, ValueError):
            listed = {}
        where = Path(out_dir).resolve()
        try:
            where_text = where.relative_to(paths.generated_dir().resolve()).as_posix()
        except ValueError:
            where_text = str(where)
        if listed.get(prov["name"]) != where_text:
            listed[prov["name"]] = where_text
            atomic_write_json(path, listed)
    return entry


def load_finetuned(out_dir: str | os.PathLike, device: str | torch.device | None = None,
                   name: str | None = None):
    """Register the finetuned run in ``out_dir`` from its provenance and load it.

    Parameters
    ----------
    out_dir : path
        A finished :func:`finetune` folder (``model.pth`` + ``provenance.json``).
    device : optional
        As :func:`cosmoslib.models.load_model`.
    name : str, optional
        Register under this name instead of the provenance's.

    Returns
    -------
    SamFamilyModel

    Raises
    ------
    InputError
        Missing files, or ``model.pth`` not the file the provenance describes.
    """
    out_dir = Path(out_dir)
    prov = read_provenance(out_dir)
    if name:
        prov = dict(prov, name=name)
    ckpt = out_dir / prov.get("checkpoint", _MODEL)
    if not ckpt.is_file():
        raise InputError(ckpt, "the finetuned weights are missing")
    if models_mod.file_sha256(ckpt) != prov.get("checkpoint_sha256"):
        raise InputError(ckpt, "is not the checkpoint its provenance.json describes (SHA-256 differs)")
    _register(out_dir, prov)
    return models_mod.load_model(prov["name"], device=device)


def register_saved() -> list[str]:
    """Register every model listed in :func:`registry_path` whose run folder is intact.

    Called when this module is imported; returns the names registered. Entries whose folder
    or weights are gone are skipped (and left in the list).
    """
    path = registry_path()
    if not path.exists():
        return []
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    done = []
    for name, where in sorted(listed.items()):
        folder = Path(where)
        folder = folder if folder.is_absolute() else paths.generated_dir() / folder
        try:
            prov = read_provenance(folder)
            if prov.get("name") != name or not (folder / prov.get("checkpoint", _MODEL)).is_file():
                continue
            _register(folder, prov, persist=False)
            done.append(name)
        except (InputError, KeyError, TypeError):
            continue
    return done


try:  # a broken list must never break an import
    register_saved()
except Exception as _exc:  # pragma: no cover
    warnings.warn(f"finetuned models not registered: {_exc}", stacklevel=1)
