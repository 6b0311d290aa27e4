"""SAM 2 and SAM 2.1 behind the :class:`~cosmoslib.models.SamFamilyModel` interface (issue 23).

SAM 2 (Ravi et al., 2024) keeps SAM's prompt encoder and mask decoder but replaces the ViT
with a hierarchical Hiera encoder whose decoder also reads two higher-resolution feature
levels, and adds a memory for video. The ``sam2`` package (PyPI 1.1.0; code and hydra configs,
no weights; installed with ``SAM2_BUILD_CUDA=0``) builds the modules; this module runs them
through the same encode / prepare / decode steps as every SAM-family model, so the paper's
protocol (S1-S6, the same prompt table, the embedding cache) runs unchanged:

* :class:`Sam2Model` -- a :class:`SamFamilyModel` whose ``sam`` is a ``SAM2Base``. Its steps
  follow ``SAM2ImagePredictor`` exactly: the image is resized to S x S (no aspect-preserving
  resize, no padding; ImageNet mean/std), points and boxes are scaled by ``S / W`` and
  ``S / H``, a box enters the prompt encoder as two corner points (labels 2, 3) before any
  points, the decoder reads the high-resolution features, and its 256 x 256 logits are resized
  straight to (H, W). ``no_mem_embed`` is added to the image embedding, as the image
  predictor does.
* **The embedding.** SAM 2's "embedding" of an image is three tensors: the image embedding
  ``(256, S/16, S/16)`` and the two high-resolution levels ``(32, S/4, S/4)`` and
  ``(64, S/8, S/8)``. :func:`pack_features` stores all three losslessly as one array
  ``(1024, S/16, S/16)`` (the two fine levels are space-to-depth rearranged with
  ``pixel_unshuffle``, a permutation of their values), so the embedding cache, the fused mode
  and every caller keep handling one array per image, keyed by the model signature like every
  other entry. At S = 1024 that is ``(1024, 64, 64)``: **8 MiB per image in fp16** before
  compression (4x SAM's 2 MiB; the cache's Blosc-zstd rarely saves much on real features).
* **Checkpoints** load by type and path like SAM's: found in the same folders, hashed
  (SHA-256, part of the signature), read with ``weights_only=True``, checked key by key and
  shape by shape against the architecture built from the package's config, with one error per
  wrong kind (not a checkpoint, another architecture, missing keys). Official files hold
  ``{"model": state_dict}``; training checkpoints (MedSAM2 and other fine-tuned derivatives)
  may carry more: extra top-level entries and extra tensors are ignored with a warning that
  names them.
* :class:`SliceVideo` -- SAM 2's video predictor over the slices of a volume held in memory
  (for :mod:`cosmoslib.protocol.propagation`).

The ``sam2`` package is imported inside functions only: it is an optional extra (``make
setup`` installs it; without it every other model works and loading a SAM 2 model says how to
install it), and importing it initialises hydra.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from cosmoslib.files import InputError, file_sha256
from cosmoslib.models import registry
from cosmoslib.models.adapter import FAMILY_LOADERS, SamFamilyModel, _default_device, rgb_uint8, set_threads
from cosmoslib.models.checkpoints import _guess_arch, _read_state_dict, _resolve_checkpoint
from cosmoslib.models.decoder import Decoded, _as_size

#: Channels of SAM 2's three feature levels as the decoder reads them: the image embedding
#: (stride 16) and the two high-resolution levels (strides 8 and 4).
EMBED_CHANNELS, S1_CHANNELS, S0_CHANNELS = 256, 64, 32
#: Channels of a packed embedding (:func:`pack_features`): 256 + 64 * 2**2 + 32 * 4**2.
PACKED_CHANNELS = EMBED_CHANNELS + S1_CHANNELS * 4 + S0_CHANNELS * 16

#: How ``build_sam2`` (``apply_postprocessing=True``) sets up the decoder for the image
#: predictor: fall back to the best of the 3 masks when the single mask is unstable.
_IMAGE_OVERRIDES = (
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
)
#: The video predictor's settings from ``build_sam2_video_predictor``, except ``fill_hole_area``
#: (0 instead of 8): filling holes needs SAM 2's CUDA extension, which ``SAM2_BUILD_CUDA=0``
#: leaves out (the official predictor then skips the step with a warning on every frame).
_VIDEO_OVERRIDES = (
    "++model._target_=sam2.sam2_video_predictor.SAM2VideoPredictor",
    *_IMAGE_OVERRIDES,
    "++model.binarize_mask_from_pts_for_mem_enc=true",
    "++model.fill_hole_area=0",
)

_INSTALL = "install it with `SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0` (make setup does)"


def sam2_version() -> str | None:
    """Version of the installed ``sam2`` package, or None when it is not installed."""
    try:
        return importlib.metadata.version("sam2")
    except importlib.metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- building


def _spec(arch: str) -> dict[str, Any]:
    spec = registry.ARCHES.get(arch)
    if spec is None or spec.get("family") != "sam2":
        raise InputError(None, f"{arch!r} is not a SAM 2 architecture; expected one of "
                               f"{sorted(registry.SAM2_ARCHES)}")
    return spec


def build_module(arch: str, video: bool = False) -> torch.nn.Module:
    """An untrained SAM 2 module of ``arch`` from the ``sam2`` package's hydra config (CPU).

    Parameters
    ----------
    arch : str
        A SAM 2 architecture of :data:`cosmoslib.models.registry.ARCHES` (its ``config`` and
        ``overrides``).
    video : bool
        Build ``SAM2VideoPredictor`` (same weights, plus the video loop) instead of
        ``SAM2Base`` as ``build_sam2`` makes it for the image predictor.

    Raises
    ------
    InputError
        Not a SAM 2 architecture, or the ``sam2`` package is not installed.
    """
    spec = _spec(arch)
    try:  # optional extra (module docstring); importing sam2 initialises hydra's config search path
        import sam2  # noqa: F401  # optional extra
        from hydra import compose  # sam2's dependency
        from hydra.utils import instantiate  # sam2's dependency
        from omegaconf import OmegaConf  # sam2's dependency
    except ImportError:
        raise InputError(None, f"SAM 2 model {arch!r} needs the `sam2` package; {_INSTALL}") from None
    overrides = [*(_VIDEO_OVERRIDES if video else _IMAGE_OVERRIDES), *spec.get("overrides", ())]
    cfg = compose(config_name=spec["config"], overrides=overrides)
    OmegaConf.resolve(cfg)
    return instantiate(cfg.model, _recursive_=True).eval()


def check_state_dict(path, name: str, arch: str, state: dict[str, torch.Tensor],
                     module: torch.nn.Module) -> list[str]:
    """Compare a state dict with a SAM 2 module before loading it.

    Returns
    -------
    list of str
        Keys of ``state`` the architecture does not have (ignored when loading: training
        checkpoints such as MedSAM2's may carry them).

    Raises
    ------
    InputError
        Shape mismatches (another architecture: the message says which one the file looks
        like) or missing keys.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in expected if k not in found]
    wrong = [k for k in expected if k in found and expected[k] != found[k]]
    extra = [k for k in found if k not in expected]
    key = "image_encoder.trunk.patch_embed.proj.weight"
    if wrong or len(missing) == len(expected) or (key in missing and key not in found):
        detail = "; ".join(f"{k}: expected {expected[k]}, found {found[k]}" for k in wrong[:3])
        raise InputError(path, f"wrong checkpoint type for model {name!r}: expected a {arch} state dict "
                               f"({len(expected)} tensors, e.g. {key} {expected[key]}); found "
                               f"{len(found)} tensors that look like {_guess_arch(state)}"
                               + (f": {len(wrong)} shape mismatches, e.g. {detail}" if wrong else ""))
    if missing:
        raise InputError(path, f"incomplete {arch} checkpoint for model {name!r}: {len(missing)} of "
                               f"{len(expected)} tensors missing, e.g. {missing[:3]}")
    return extra


# ----------------------------------------------------------------------------- features


def pack_features(image_embed: torch.Tensor, high_res: Sequence[torch.Tensor]) -> torch.Tensor:
    """SAM 2's three feature levels as one array ``(B, 1024, h, w)`` (lossless).

    Parameters
    ----------
    image_embed : tensor (B, 256, h, w)
        The image embedding (stride 16), ``no_mem_embed`` already added.
    high_res : [tensor (B, 32, 4h, 4w), tensor (B, 64, 2h, 2w)]
        The decoder's high-resolution levels (strides 4 and 8), in SAM 2's order.

    Returns
    -------
    tensor (B, 1024, h, w)
        Channels ``[0, 256)`` the embedding, ``[256, 512)`` the stride-8 level and
        ``[512, 1024)`` the stride-4 level, each moved to (h, w) by ``pixel_unshuffle``.
    """
    s0, s1 = high_res
    return torch.cat([image_embed, F.pixel_unshuffle(s1, 2), F.pixel_unshuffle(s0, 4)], dim=1)


def unpack_features(packed: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Inverse of :func:`pack_features`: ``(image_embed, [s0, s1])`` from ``(B, 1024, h, w)``."""
    if packed.ndim != 4 or packed.shape[1] != PACKED_CHANNELS:
        raise InputError(None, f"expected a packed SAM 2 embedding (B, {PACKED_CHANNELS}, h, w), "
                               f"got {tuple(packed.shape)}")
    a, b = EMBED_CHANNELS, EMBED_CHANNELS + S1_CHANNELS * 4
    return packed[:, :a], [F.pixel_shuffle(packed[:, b:], 4), F.pixel_shuffle(packed[:, a:b], 2)]


@dataclass
class Sam2Features:
    """One image's unpacked features, ready for many prompts (:meth:`Sam2Model.prepare`).

    Attributes
    ----------
    image_embed : tensor (1, 256, S/16, S/16), float32, on the model's device.
    high_res : [tensor (1, 32, S/4, S/4), tensor (1, 64, S/8, S/8)]
    owner : ``id`` of the module they belong to.
    """

    image_embed: torch.Tensor
    high_res: list[torch.Tensor]
    owner: int


# ----------------------------------------------------------------------------- the model


@dataclass
class Sam2Model(SamFamilyModel):
    """A SAM 2 / SAM 2.1 model behind :class:`SamFamilyModel` (build it with :func:`load_sam2`).

    ``sam`` is the ``SAM2Base`` module. The encoder always runs in torch (``backend``,
    ``fast_encoder`` and ``compile_encoder`` are SAM-only and left at their defaults). All
    other attributes as :class:`SamFamilyModel`; the steps are those of ``SAM2ImagePredictor``
    (module docstring).
    """

    overrides: tuple = ()
    _transforms: Any = field(default=None, init=False, repr=False)
    _video: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        from sam2.utils.transforms import SAM2Transforms  # optional extra (module docstring)

        # SAM2ImagePredictor's defaults: no hole / sprinkle removal.
        self._transforms = SAM2Transforms(resolution=self.input_size, mask_threshold=0.0)

    # ---- identity

    @property
    def input_size(self) -> int:
        """Side S (pixels) of the square model input (1024 for Meta's configs)."""
        return int(self.sam.image_size)

    @property
    def embedding_shape(self) -> tuple[int, int, int]:
        """``(1024, S/16, S/16)``: the packed features of :func:`pack_features`."""
        side = self.input_size // 16
        return (PACKED_CHANNELS, side, side)

    @property
    def mask_threshold(self) -> float:
        return 0.0

    @property
    def signature(self) -> dict[str, Any]:
        """:attr:`SamFamilyModel.signature` plus the ``sam2`` package version, the feature
        layout and the architecture's hydra overrides (when it has any)."""
        sig = {**super().signature, "sam2": sam2_version(), "features": "sam2-packed-v1"}
        if self.overrides:
            sig["overrides"] = list(self.overrides)
        return sig

    # ---- geometry

    def resized_size(self, original_size: Sequence[int]) -> tuple[int, int]:
        """``(S, S)``: SAM 2 resizes every image to the square input, whatever its shape."""
        _as_size(original_size)
        return (self.input_size, self.input_size)

    def transform_coords(self, xy, original_size: Sequence[int]):
        """(x, y) in original pixels -> input space: ``x * S / W``, ``y * S / H`` (same kind back)."""
        h, w = _as_size(original_size)
        if isinstance(xy, torch.Tensor):
            scale = torch.tensor([self.input_size / w, self.input_size / h], dtype=torch.float32,
                                 device=xy.device)
            return xy.float() * scale
        return np.asarray(xy, dtype=float) * np.array([self.input_size / w, self.input_size / h])

    def transform_boxes(self, boxes, original_size: Sequence[int]):
        """Boxes ``[x0, y0, x1, y1]`` (..., 4) -> input space, as ``(B, 4)``."""
        if isinstance(boxes, torch.Tensor):
            return self.transform_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)
        return self.transform_coords(np.asarray(boxes, dtype=float).reshape(-1, 2, 2),
                                     original_size).reshape(-1, 4)

    # ---- encoder

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """One image as the encoder's input, exactly as ``SAM2ImagePredictor.set_image``.

        Parameters
        ----------
        image : uint8 array (H, W) or (H, W, 3); grey is repeated to 3 channels.

        Returns
        -------
        tensor : float32 (1, 3, S, S) on :attr:`device` (``SAM2Transforms``: ``ToTensor``,
            bilinear antialiased resize to S x S, ImageNet mean/std).
        original_size : (H, W)
        input_size : (S, S)

        Raises
        ------
        InputError
            Not a uint8 (H, W) / (H, W, 1) / (H, W, 3) array, or an empty one.
        """
        image = rgb_uint8(image)
        tensor = self._transforms(image)[None].to(self.device)
        return tensor, tuple(image.shape[:2]), self.resized_size(image.shape[:2])

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """Packed features ``(B, 1024, S/16, S/16)`` of preprocessed images ``(B, 3, S, S)``.

        The steps of ``SAM2ImagePredictor.set_image_batch``: backbone, the decoder's
        high-resolution projections, ``no_mem_embed`` added to the image embedding.
        """
        backbone = self.sam.forward_image(batch)
        _, vision_feats, _, sizes = self.sam._prepare_backbone_features(backbone)
        if self.sam.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.sam.no_mem_embed
        feats = [f.permute(1, 2, 0).reshape(f.shape[1], f.shape[2], *size)
                 for f, size in zip(vision_feats, sizes)]
        return pack_features(feats[-1], feats[:-1])

    def encode(self, images: Iterable[np.ndarray], batch_size: int | None = None) -> np.ndarray:
        """Packed SAM 2 features of a list of images.

        Parameters
        ----------
        images : iterable of uint8 arrays (H, W) or (H, W, 3)
        batch_size : int, optional
            Images per encoder call (default 1).

        Returns
        -------
        float32 array (N, 1024, S/16, S/16)
        """
        images = list(images)
        batch_size = max(1, int(batch_size or 1))
        out = np.empty((len(images), *self.embedding_shape), dtype=np.float32)
        with self._context():
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size]
                batch = torch.cat([self.preprocess(img)[0] for img in chunk])
                out[start:start + len(chunk)] = self.features(batch).float().cpu().numpy()
        return out

    def _sync_encoder(self) -> torch.nn.Module:
        return self.sam.image_encoder

    # ---- decoder

    def prepare(self, embedding) -> Sam2Features:
        """Unpack one image's features once for many prompts.

        Parameters
        ----------
        embedding : array or tensor (1024, h, w) or (1, 1024, h, w) (float16 is cast to
            float32), or a :class:`Sam2Features` of this model (returned as is).

        Raises
        ------
        InputError
            Not one packed embedding of this model's shape, or features of another model.
        """
        if isinstance(embedding, Sam2Features):
            if embedding.owner != id(self.sam):
                raise InputError(None, f"these features were prepared with another model, not "
                                       f"{self.name!r}; call prepare() on this model")
            return embedding
        if not isinstance(embedding, torch.Tensor):
            embedding = np.asarray(embedding)
        tensor = torch.as_tensor(embedding, device=self.device, dtype=torch.float32)
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tuple(tensor.shape[1:]) != self.embedding_shape or tensor.shape[0] != 1:
            raise InputError(None, f"expected one packed SAM 2 embedding (1, "
                                   f"{', '.join(map(str, self.embedding_shape))}), got {tuple(tensor.shape)}")
        image_embed, high_res = unpack_features(tensor)
        return Sam2Features(image_embed.contiguous(), [h.contiguous() for h in high_res], id(self.sam))

    def predict_torch(self, embedding, point_coords: torch.Tensor | None = None,
                      point_labels: torch.Tensor | None = None,
                      boxes: torch.Tensor | None = None, mask_input: torch.Tensor | None = None,
                      multimask: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompts on one image, as ``SAM2ImagePredictor._predict`` (input space).

        Parameters as :meth:`SamFamilyModel.predict_torch` (the embedding packed or prepared).
        A box enters as two corner points (labels 2 and 3) placed before the points.

        Returns
        -------
        low_res_logits : tensor (B, K, S/4, S/4) (unclamped)
        iou_pred : tensor (B, K)
        """
        if multimask is None:
            multimask = self.default_multimask
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        feats = self.prepare(embedding)
        points = None
        if point_coords is not None:
            points = (point_coords.to(self.device, torch.float32),
                      point_labels.to(self.device, torch.int32))
        if boxes is not None:
            corners = boxes.to(self.device, torch.float32).reshape(-1, 2, 2)
            labels = torch.tensor([[2, 3]], dtype=torch.int32, device=self.device).repeat(len(corners), 1)
            points = (corners, labels) if points is None else (
                torch.cat([corners, points[0]], dim=1), torch.cat([labels, points[1]], dim=1))
        with self._context():
            sparse, dense = self.sam.sam_prompt_encoder(
                points=points, boxes=None,
                masks=None if mask_input is None else mask_input.to(self.device, torch.float32))
            low_res, iou, _, _ = self.sam.sam_mask_decoder(
                image_embeddings=feats.image_embed, image_pe=self.sam.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                multimask_output=bool(multimask), repeat_image=points is not None and len(points[0]) > 1,
                high_res_features=feats.high_res)
        return low_res.float(), iou.float()

    def postprocess_masks(self, low_res_logits, original_size: Sequence[int]) -> torch.Tensor:
        """Low-res logits (B, K, S/4, S/4) -> logits (B, K, H, W): one bilinear resize (SAM 2's)."""
        logits = torch.as_tensor(low_res_logits, device=self.device, dtype=torch.float32)
        with self._context():
            return F.interpolate(logits, _as_size(original_size), mode="bilinear", align_corners=False)

    def decode(self, embedding, prompt, original_size: Sequence[int],
               multimask: bool | None = None) -> Decoded:
        """As :meth:`SamFamilyModel.decode`; ``low_res_logits`` clamped to +-32 as SAM 2 returns them."""
        out = super().decode(embedding, prompt, original_size, multimask)
        return Decoded(masks=out.masks, iou_pred=out.iou_pred,
                       low_res_logits=np.clip(out.low_res_logits, -32.0, 32.0))

    # ---- video

    def video(self) -> SliceVideo:
        """SAM 2's video predictor with this model's weights, over slices in memory (built once)."""
        if self._video is None:
            module = build_module(self.arch, video=True)
            module.load_state_dict(self.sam.state_dict(), strict=True)
            self._video = SliceVideo(self, module.to(self.device).eval())
        return self._video


class _Frames:
    """Slices as the video predictor's frame list: preprocessed on access (no N x 12 MB stack)."""

    def __init__(self, model: Sam2Model, slices: Sequence[np.ndarray]):
        self.model, self.slices = model, slices

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.model.preprocess(self.slices[k])[0][0]


class SliceVideo:
    """SAM 2's ``SAM2VideoPredictor`` over the slices of a volume, one object at a time.

    The predictor reads frames from JPEG files or MP4 only; JPEG would change a slice's grey
    values, so the slices are handed over in memory, preprocessed exactly as the image model's
    (:meth:`Sam2Model.preprocess`), through the loader its ``init_state`` calls. Everything
    else -- memory, object pointers, both directions -- is the package's own.

    :mod:`cosmoslib.protocol.propagation` uses only :meth:`init_state`, :meth:`add_box`,
    :meth:`propagate` and :meth:`reset`; a stand-in with these four methods replaces it in tests.
    """

    def __init__(self, model: Sam2Model, predictor):
        self.model, self.predictor = model, predictor

    def init_state(self, slices: Sequence[np.ndarray]) -> dict:
        """A fresh inference state over ``slices`` (uint8 (H, W) or (H, W, 3), in order)."""
        if not len(slices):
            raise InputError(None, "no slices to propagate over")
        h, w = np.asarray(slices[0]).shape[:2]
        frames = _Frames(self.model, slices)
        module = importlib.import_module("sam2.sam2_video_predictor")
        with mock.patch.object(module, "load_video_frames", lambda **_: (frames, h, w)), \
                torch.inference_mode():
            return self.predictor.init_state(video_path="<slices in memory>")

    def add_box(self, state: dict, slice_index: int, box) -> None:
        """Prompt the object (id 1) with ``[x0, y0, x1, y1]`` (original pixels) on one slice."""
        with self.model._context():
            self.predictor.add_new_points_or_box(state, frame_idx=int(slice_index), obj_id=1,
                                                 box=np.asarray(box, dtype=np.float32))

    def propagate(self, state: dict, start: int, reverse: bool) -> Iterator[tuple[int, np.ndarray]]:
        """``(slice, logits (H, W))`` from ``start`` to the last slice (or, ``reverse``, the first)."""
        with self.model._context():
            for k, _, logits in self.predictor.propagate_in_video(
                    state, start_frame_idx=int(start), reverse=bool(reverse)):
                yield int(k), logits[0, 0].float().cpu().numpy()

    def reset(self, state: dict) -> None:
        """Forget prompts and results (the slices and their cached features stay)."""
        self.predictor.reset_state(state)


# ----------------------------------------------------------------------------- loading


def load_sam2(entry: registry.ModelEntry, checkpoint=None, device=None, autocast: bool = False,
              threads: int | None = None, backend: str = "torch") -> Sam2Model:
    """Load a SAM 2 registry entry (called by :func:`cosmoslib.models.load_model`).

    Parameters
    ----------
    entry : ModelEntry of a SAM 2 architecture.
    checkpoint : path, optional
        Overrides the entry's file (official name searched in ``$COSMOS_CHECKPOINTS`` and
        ``./checkpoints``).
    device, autocast, threads : as :func:`cosmoslib.models.load_model`.
    backend : only ``"torch"``.

    Raises
    ------
    InputError
        ``sam2`` not installed; checkpoint missing, not a checkpoint, of another architecture,
        or incomplete; another backend.
    """
    # "auto" (the CLI's and the book's default) picks among the runtimes that passed a parity
    # probe; SAM 2 has no exported encoder, so torch is the only candidate and auto means torch.
    if backend == "auto":
        backend = "torch"
    if backend != "torch":
        raise InputError(None, f"{entry.name}: SAM 2 runs its encoder in torch only, not {backend!r}")
    spec = _spec(entry.arch)
    path = _resolve_checkpoint(entry, checkpoint)
    sha = file_sha256(path)
    ignored: list[str] = []
    state = _read_state_dict(path, entry, ignored)
    module = build_module(entry.arch)  # built once: checked against, then loaded into
    extra = check_state_dict(path, entry.name, entry.arch, state, module)
    if ignored or extra:
        warnings.warn(f"{path.name}: loaded as {entry.arch}; ignored "
                      + ", ".join(filter(None, [
                          f"top-level entries {ignored[:6]}" if ignored else "",
                          f"{len(extra)} tensors the architecture lacks, e.g. {extra[:3]}" if extra else ""])),
                      stacklevel=3)
    module.load_state_dict({k: v for k, v in state.items() if k not in set(extra)}, strict=True)
    dev = _default_device(device)
    if threads is not None:
        set_threads(threads)
    module.to(dev).eval()
    return Sam2Model(name=entry.name, arch=entry.arch, sam=module, checkpoint_path=path,
                     checkpoint_sha256=sha, device=dev, supports_points=entry.supports_points,
                     default_multimask=entry.default_multimask, autocast=bool(autocast),
                     fast_encoder=False, overrides=tuple(spec.get("overrides", ())))


FAMILY_LOADERS["sam2"] = load_sam2


def random_checkpoint(arch: str, path: str | os.PathLike, seed: int = 0) -> os.PathLike:
    """Write a randomly initialised ``{"model": state_dict}`` of ``arch`` (tests, speed only).

    Never a source of accuracy numbers: the weights mean nothing.
    """
    with _seeded(seed):
        module = build_module(arch)
    torch.save({"model": module.state_dict()}, path)
    return path


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield

