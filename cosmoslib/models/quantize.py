"""int8 image encoders: NNCF post-training quantization calibrated on a run's own images
(issue 22, item 2).

``load_model(name, backend="openvino-int8", calibration=ROOT)`` (:mod:`cosmoslib.models.backends`)
runs the image encoder as an int8 OpenVINO model. This module holds the two pieces that are
not plain export:

* **the calibration set** (:func:`calibration_set`): a fixed, seeded subset of at most
  :data:`CALIBRATION_IMAGES` images of the run's own data (a COSMOS root, or images given as
  arrays), read with the same reader as ``embed`` and ``evaluate``; each image is named and
  identified by a BLAKE2b digest of its decoded pixels (:func:`image_digest`). Which images are
  chosen depends only on the seed and each image's name (the smallest seeded hashes), so adding
  images to a root changes the set only where a new image ranks among the chosen;
* **the quantization** (:func:`quantize_ir`): ``nncf.quantize`` on the float32 OpenVINO IR of
  the exported encoder, with every calibration image preprocessed exactly as the encoder's
  input (:meth:`cosmoslib.models.SamFamilyModel.preprocess`: resized, normalised, padded to
  S x S) and the settings of :data:`SETTINGS` (transformer model type: attention, LayerNorm
  and GELU patterns kept in float32 where NNCF's rules say so; mixed preset: symmetric weights,
  asymmetric activations; fast bias correction). Weights and activations of the quantized
  operations are int8; what NNCF leaves unquantized runs in float32.

The calibration set's digest (:attr:`Calibration.key`: the ordered image digests and
:data:`SETTINGS`) and the NNCF version are part of the model signature and of the export's key
(:func:`cosmoslib.models.backends.signature_entry`), so another calibration set, another NNCF
or other settings make another export and another embedding-cache store, never a silently
reused one.

int8 embeddings are not float32 embeddings up to rounding: how far the masks move is measured,
not assumed (:mod:`cosmoslib.analysis.int8_tradeoff`, ``benchmarks/int8.py``); ``backend="auto"``
never picks int8 (:mod:`cosmoslib.models.backend_probe`).

NNCF (``nncf``, in the ``runtimes`` extra) is imported only when a quantization runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cosmoslib.data.layout import list_images
from cosmoslib.data.readers import read_image
from cosmoslib.files import InputError

__all__ = ["CALIBRATION_IMAGES", "CALIBRATION_SEED", "SETTINGS", "Calibration", "image_digest",
           "calibration_set", "quantize_ir"]

#: Largest number of calibration images (NNCF's statistics are collected on all of them).
CALIBRATION_IMAGES = 16
#: Seed of the calibration subset.
CALIBRATION_SEED = 0
#: ``nncf.quantize`` settings (part of :attr:`Calibration.key`; change ``version`` with any change
#: of how the quantization is done, so that older exports are not reused).
SETTINGS: dict[str, Any] = {"version": 1, "model_type": "transformer", "preset": "mixed",
                            "target_device": "CPU", "fast_bias_correction": True}


def image_digest(image: np.ndarray) -> str:
    """32 hex digits of BLAKE2b over an image's decoded pixels (dtype, shape and bytes)."""
    image = np.ascontiguousarray(image)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.dtype.str}{image.shape}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Calibration:
    """The images an int8 encoder is calibrated on.

    Attributes
    ----------
    names : tuple of str
        Where each image came from (``<task>/<image_id>`` in a COSMOS root, ``#<i>`` for the
        i-th of given arrays), in calibration order (sorted by name).
    digests : tuple of str
        :func:`image_digest` of each image, same order.
    images : tuple of uint8 arrays (H, W) or (H, W, 3)
        The decoded images (not part of equality or repr).
    """

    names: tuple[str, ...]
    digests: tuple[str, ...]
    images: tuple[np.ndarray, ...] = field(repr=False, compare=False)

    @property
    def key(self) -> str:
        """16 hex digits naming the calibration: the ordered image digests and :data:`SETTINGS`."""
        text = json.dumps({"digests": list(self.digests), "settings": SETTINGS},
                          sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.digests)

    def describe(self) -> dict[str, Any]:
        """Names, digests, key and settings (for the record beside an export)."""
        return {"key": self.key, "names": list(self.names), "digests": list(self.digests),
                "settings": SETTINGS}


def _rank(seed: int, name: str) -> str:
    return hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).hexdigest()


def calibration_set(source, n: int = CALIBRATION_IMAGES,
                    seed: int = CALIBRATION_SEED) -> Calibration:
    """The fixed, seeded calibration subset of ``source``.

    Parameters
    ----------
    source : path, sequence of uint8 arrays or paths, or Calibration
        A COSMOS root (its images, :func:`cosmoslib.data.layout.list_images`); or images as
        arrays (``(H, W)`` / ``(H, W, 3)`` uint8) or image files; a :class:`Calibration` is
        returned as it is.
    n : int
        At most this many images (all of them when there are fewer; >= 1).
    seed : int
        Which images: those with the ``n`` smallest seeded hashes of their names. Images that
        cannot be read (:class:`cosmoslib.files.InputError`) are passed over for the next.

    Returns
    -------
    Calibration
        Sorted by name.

    Raises
    ------
    InputError
        ``source`` is None (int8 needs calibration images; the message says how to give them),
        a folder without COSMOS-layout images, or nothing readable; ``n < 1``.
    """
    if isinstance(source, Calibration):
        return source
    if source is None:
        raise InputError(None, "backend 'openvino-int8' quantizes the image encoder on calibration "
                               "images and none were given: pass load_model(..., calibration=<a COSMOS "
                               "root or a list of images>) (cosmos embed/evaluate/finetune: the run's ROOT)")
    if int(n) < 1:
        raise InputError(None, f"calibration needs at least one image, asked for n={n}")
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        items = [(f"{task}/{image_id}", path) for task, image_id, path in list_images(root)]
        if not items:
            raise InputError(root, "no COSMOS-layout images (<task>/images/*) to calibrate on")
    else:
        items = [(f"#{i}", item) for i, item in enumerate(source)]
        if not items:
            raise InputError(None, "an empty list of calibration images")
        root = None
    ranked = sorted(items, key=lambda item: _rank(seed, item[0]))
    chosen: list[tuple[str, np.ndarray]] = []
    passed_over: list[str] = []
    for name, item in ranked:
        if len(chosen) == int(n):
            break
        try:
            image = read_image(item) if isinstance(item, (str, os.PathLike)) else np.asarray(item)
            if image.dtype != np.uint8 or image.ndim not in (2, 3) or image.size == 0 or (
                    image.ndim == 3 and image.shape[2] not in (1, 3)):
                raise InputError(None if not isinstance(item, (str, os.PathLike)) else item,
                                 f"calibration image {name}: expected uint8 (H, W) or (H, W, 3), "
                                 f"got {image.dtype} {image.shape}")
        except InputError as exc:
            passed_over.append(str(exc))
            continue
        chosen.append((name, image))
    if not chosen:
        raise InputError(root, "no readable calibration image: " + "; ".join(passed_over[:3]))
    chosen.sort(key=lambda pair: pair[0])
    return Calibration(names=tuple(name for name, _ in chosen),
                       digests=tuple(image_digest(image) for _, image in chosen),
                       images=tuple(image for _, image in chosen))


def quantize_ir(fp32_xml: str | os.PathLike, inputs: Sequence[np.ndarray],
                out_xml: str | os.PathLike) -> None:
    """Quantize a float32 OpenVINO IR to int8 with NNCF and save it at ``out_xml``.

    Parameters
    ----------
    fp32_xml : path
        The float32 IR (``encoder.xml`` beside its ``encoder.bin``).
    inputs : sequence of float32 arrays (1, 3, S, S)
        The calibration images preprocessed as the encoder's input; all are used
        (``subset_size = len(inputs)``).
    out_xml : path
        Where the int8 IR goes (``.xml`` + ``.bin``; weights not compressed to fp16).

    Raises
    ------
    ImportError
        ``nncf`` or ``openvino`` is not installed (call
        :func:`cosmoslib.models.backends.backend_available` first for the message with the
        install hint).
    InputError
        No inputs.
    """
    if not len(inputs):
        raise InputError(None, "quantization needs at least one calibration input")
    import nncf  # optional extra (`runtimes`), imported only when a quantization runs
    import openvino as ov  # optional extra (`runtimes`)

    model = ov.Core().read_model(str(fp32_xml))
    dataset = nncf.Dataset([np.ascontiguousarray(x, dtype=np.float32) for x in inputs])
    with warnings.catch_warnings():  # rich's progress bars in a notebook kernel, once per step
        warnings.filterwarnings("ignore", message='install "ipywidgets" for Jupyter support')
        quantized = nncf.quantize(model, dataset, subset_size=len(inputs),
                                  model_type=nncf.ModelType.TRANSFORMER,
                                  preset=nncf.QuantizationPreset.MIXED,
                                  target_device=nncf.TargetDevice.CPU,
                                  fast_bias_correction=bool(SETTINGS["fast_bias_correction"]))
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
