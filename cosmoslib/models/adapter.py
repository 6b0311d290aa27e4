"""The model adapter: :class:`SamFamilyModel` and :func:`load_model` (paper 3.1, 4.1).

The adapter alone moves coordinates between original-image pixels and the model's input
space, and owns encode / prepare / decode and the model signature that keys every cache.
"""


from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from cosmoslib import __version__
from cosmoslib.files import InputError, file_sha256
from cosmoslib.models import backend_probe, backends, registry
from cosmoslib.models.checkpoints import (
    _build_sam,
    _check_state_dict,
    _read_state_dict,
    _resolve_checkpoint,
)
from cosmoslib.models.decoder import (
    _CPU_DECODE_CHUNK,
    Decoded,
    PreparedEmbedding,
    _as_size,
    _fast_decoder_supported,
    _FastMaskDecoder,
    _resize_operator,
)
from cosmoslib.models.fast_encoder import maybe_compile, set_fast_encoder
from cosmoslib.models.registry import EMBEDDING_SHAPE


def rgb_uint8(image) -> np.ndarray:
    """A uint8 ``(H, W)`` / ``(H, W, 1)`` / ``(H, W, 3)`` image as ``(H, W, 3)`` (grey repeated).

    Raises
    ------
    InputError
        Not such an array, or an empty one.
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
    return image


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
        Encode with :mod:`cosmoslib.models.fast_encoder` (SDPA attention with the relative-position
        bias, lean window partitioning; TinyViT in channels-last with folded batch norms):
        same weights, embeddings equal to the stock encoder's up to float32 rounding. False
        restores the stock forwards (also on ``sam.image_encoder``, e.g. for
        ``SamPredictor``). Read at every :meth:`encode`, so it can be switched at any time.
    backend : str
        Who runs the image encoder: ``"torch"`` (this module), ``"onnxruntime"``, ``"openvino"``
        or ``"openvino-int8"`` (an exported copy, :mod:`cosmoslib.models.backends`; part of the
        signature).
    calibration : cosmoslib.models.quantize.Calibration or None
        The images the ``"openvino-int8"`` encoder is calibrated on (their digest is part of
        the signature); None for the other backends.
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
    calibration: Any = field(default=None, repr=False, compare=False)
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
        if self.backend != "torch":  # another runtime: other rounding (cosmoslib.models.backends)
            sig["encoder"] = backends.signature_entry(self.backend, self.calibration)
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
        image = rgb_uint8(image)
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
            Images per encoder call. Default: 1 on the CPU, where batching is slower (LiteMedSAM
            torch path, 12 images side by side in one run: one at a time 1.25x faster than 4
            per call at 1 and at 2 threads); on a GPU 4 at 256 px, 1 at 1024 px.

        Returns
        -------
        float32 array (N, 256, 64, 64)
        """
        images = list(images)
        if batch_size is None:
            batch_size = 4 if self.input_size <= 256 and self.device.type != "cpu" else 1
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
        exported encoder (:func:`cosmoslib.models.backends.load_encoder`)."""

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

    def decode_points(self, embedding, point_coords: torch.Tensor, multimask: bool = True,
                      min_iou: float | None = None, batch: int | None = None):
        """Decode many single-point prompts, keeping only the masks whose predicted IoU passes.

        The Everything mode's inner loop (:func:`cosmoslib.models.everything.generate_everything`):
        one foreground point per prompt, decoded ``batch`` prompts at a time. With the fast
        decoder the IoU head runs before the output upscaling, so a mask that fails
        ``min_iou`` is never upscaled (the masks that pass are those of :meth:`predict_torch`:
        each mask is its own hypernetwork vector times the prompt's upscaled features).

        Parameters
        ----------
        embedding : tensor/array (1, 256, 64, 64) or (256, 64, 64), or a PreparedEmbedding
        point_coords : float tensor (P, 2)
            (x, y) already in model input space (:meth:`transform_coords`).
        multimask : bool
            3 outputs per prompt (True, what SAM's automatic generator uses) or 1.
        min_iou : float, optional
            Keep masks with predicted IoU ``>`` this (SAM's comparison); None keeps all.
        batch : int, optional
            Prompts through the transformer together (default 4 on a CPU, 64 otherwise;
            no effect on the results).

        Yields
        ------
        prompt : int64 tensor (M,)
            Index into ``point_coords`` of each kept mask.
        low_res : float32 tensor (M, 256, 256)
            Its low-res logits.
        iou : float32 tensor (M,)
            Its predicted IoU.

        Kept masks come in prompt order, then output order, as ``predict_torch``'s outputs
        flattened; a batch where nothing passes yields nothing.
        """
        coords = torch.as_tensor(point_coords, dtype=torch.float32, device=self.device)
        coords = coords.reshape(-1, 2)
        if batch is None:
            batch = 4 if self.device.type == "cpu" else 64
        prepared = self.prepare(embedding)
        fast = self._use_fast() and prepared.image_tokens is not None
        with self._context():
            labels = torch.ones(len(coords), 1, dtype=torch.int64, device=self.device)
            for start in range(0, len(coords), int(batch)):
                stop = min(start + int(batch), len(coords))
                index = torch.arange(start, stop, device=self.device)
                if fast:
                    sparse, _ = self.sam.prompt_encoder(
                        points=(coords[start:stop, None], labels[start:stop]), boxes=None,
                        masks=None)
                    keys, hyper, iou = self._fast.tokens(prepared, sparse, None, bool(multimask))
                else:
                    low, iou = self.predict_torch(prepared, coords[start:stop, None],
                                                  labels[start:stop], None, None, multimask)
                iou = iou.float()
                keep = iou > min_iou if min_iou is not None else torch.ones_like(iou, dtype=torch.bool)
                if not bool(keep.any()):
                    continue
                rows = torch.nonzero(keep.any(dim=1)).flatten()
                if fast:  # upscale only prompts with a kept mask, one at a time (cache-sized)
                    step = _CPU_DECODE_CHUNK if self.device.type == "cpu" else len(rows)
                    low = torch.cat([self._fast.upscale(keys[rows[i:i + step]],
                                                        hyper[rows[i:i + step]])
                                     for i in range(0, len(rows), step)])
                else:
                    low = low[rows]
                kept = keep[rows]
                yield (index[rows, None].expand_as(kept)[kept], low.float()[kept],
                       iou[rows][kept])

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
        prompt : cosmoslib.protocol.prompts.Prompt
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
                              f"run but their masks are not meaningful: read its point results (S1-S4, "
                              f"S6) as outside its training, or add a point-trained model "
                              f"(e.g. --model mobilesam)", stacklevel=2)
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


#: Loaders of model families other than SAM's, by :func:`cosmoslib.models.registry.family`:
#: ``{family: loader(entry, checkpoint, device=, autocast=, threads=, backend=)}``. Filled by the
#: family's module when :mod:`cosmoslib.models` is imported (``"sam2"``: :mod:`cosmoslib.models.sam2`,
#: whose model subclasses :class:`SamFamilyModel`).
FAMILY_LOADERS: dict[str, Any] = {}


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
               threads: int | None = None, backend: str = "torch",
               calibration=None) -> SamFamilyModel:
    """Load a registered SAM-family model.

    Parameters
    ----------
    name : str
        A registry name (``litemedsam``, ``mobilesam``, ``sam_vit_b``, ``sam_vit_l``,
        ``sam_vit_h``, ``medsam``, the SAM 2 family ``sam2.1_hiera_t|s|b+|l`` and
        ``sam2_hiera_t|s|b+|l`` (:mod:`cosmoslib.models.sam2`), or one added with
        :func:`register_model`); ``vit_b``/``vit_l``/``vit_h`` are accepted for ``sam_vit_*``.
    checkpoint : path, optional
        Weights file (or a folder holding the official file name); overrides the registry's.
        E.g. ``load_model("sam_vit_b", "medsam_vit_b.pth")`` loads MedSAM's weights.
    device : str or torch.device, optional
        Default: CUDA when available, else CPU.
    autocast : bool
        Mixed precision on CUDA (ignored on CPU); the encoder's precision becomes part of the
        model signature, so its embeddings are cached apart from float32 ones.
    fast_encoder : bool
        Encode through :mod:`cosmoslib.models.fast_encoder` (default; same embeddings up to float32
        rounding); False runs the stock encoder.
    compile_encoder : bool
        ``torch.compile`` the encoder (GPU, long runs).
    threads : int, optional
        Set torch's intra-op threads for this process (``torch.set_num_threads``; process
        wide). With several workers on one machine give each ``cores // workers``, so they
        do not oversubscribe the cores. Default: leave torch's setting.
    backend : {"torch", "onnxruntime", "openvino", "openvino-int8", "auto"}
        Who runs the image encoder on the CPU (:mod:`cosmoslib.models.backends`): exported once,
        cached on disk, and part of the model signature. A runtime whose package is missing
        falls back to ``"torch"`` with a warning naming the package and how to install it.
        ``"auto"`` (the default of the ``cosmos`` verbs and the book): the fastest installed
        runtime whose export passed a parity probe on this machine, else torch, with one line
        on stderr saying which and why (:mod:`cosmoslib.models.backend_probe`;
        ``$COSMOS_BACKEND`` fixes it without a probe). The chosen backend is
        :attr:`SamFamilyModel.backend`. ``"openvino-int8"``: the OpenVINO encoder quantized to
        int8 by NNCF on ``calibration`` (never chosen by ``"auto"``).
    calibration : path or sequence of images, optional
        For ``backend="openvino-int8"`` only (ignored otherwise): the run's COSMOS root, or
        uint8 images; a fixed, seeded subset of at most 16 is the calibration set
        (:func:`cosmoslib.models.quantize.calibration_set`).

    Returns
    -------
    SamFamilyModel

    Raises
    ------
    InputError
        Unknown name; checkpoint missing, unreadable, or of another architecture (the
        message says what was expected and what was found); ``mobilesam`` without its
        fetched weights (the message says how to get them); ``"openvino-int8"`` without
        ``calibration``.
    """
    request = backend_probe.check_request(backend)
    entry = registry.lookup(name)
    family_loader = FAMILY_LOADERS.get(registry.family(entry.arch))
    if family_loader is not None:
        return family_loader(entry, checkpoint, device=device, autocast=autocast, threads=threads,
                             backend=backend)
    path = _resolve_checkpoint(entry, checkpoint)
    sha = file_sha256(path)
    state = _read_state_dict(path, entry)
    # Checked against a shapes-only (meta) copy first: a wrong file fails before the architecture
    # is built and randomly initialised (4.6 s for ViT-L, more for ViT-H, on 2 cores).
    _check_state_dict(path, entry, state)
    sam = _build_sam(entry.arch)
    sam.load_state_dict(state, strict=True)
    dev = _default_device(device)
    if threads is not None:
        set_threads(threads)
    sam.to(dev).eval()
    chosen = "torch" if request == backend_probe.AUTO else backends.resolve_backend(request, dev)
    model = SamFamilyModel(name=entry.name, arch=entry.arch, sam=sam, checkpoint_path=path,
                           checkpoint_sha256=sha, device=dev,
                           supports_points=entry.supports_points,
                           default_multimask=entry.default_multimask, autocast=bool(autocast),
                           fast_encoder=bool(fast_encoder), compile_encoder=bool(compile_encoder),
                           backend=chosen,
                           calibration=backends.calibration_set(calibration)
                           if chosen == backends.INT8 else None)
    if request == backend_probe.AUTO:  # probed with the torch encoder as the reference
        model.backend = backend_probe.choose_backend(model)
    if model.backend != "torch":
        model._sync_encoder()  # export (once) and open the session now, not in the first encode
    return model
