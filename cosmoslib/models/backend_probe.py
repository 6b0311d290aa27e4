"""``backend="auto"``: the fastest encoder runtime that passed a parity probe on this machine.

The default of ``cosmos embed``, ``evaluate``, ``finetune`` and of the book's models, so a user
gets the runtimes' speed (:mod:`cosmoslib.models.backends`) without knowing a flag, and never a
runtime whose embeddings were not checked here.

:func:`choose_backend` probes every installed runtime of :data:`AUTO_ORDER` and takes the
fastest whose exported encoder passes :func:`probe` (torch when it is faster than all of them):

* the encoder is exported once (as ``--backend <runtime>`` would; the export time is recorded);
* the torch encoder and the runtime encode :func:`probe_images` -- three fixed, seeded synthetic
  images (grey and RGB, three sizes, each with a few elliptic objects of different contrast);
* **embeddings**: max |runtime - torch| <= :data:`EMBED_RTOL` x max(1, max |torch|);
* **masks**: each object's box prompt and the first object's centre point (12 prompts) are
  decoded (the model's own decoder, torch) from both embeddings; every mask pair must reach
  DICE >= :data:`MIN_DICE`.

The result (:class:`Probe`: pass/fail, the measured differences, the encode seconds per image
of both sides, the export seconds) is written as ``probe.json`` beside the export, whose
folder is keyed by the model signature, the runtime and its version, torch's version and the
opset (:func:`cosmoslib.models.backends.exported_path`), and a probe of another
:data:`PROBE_VERSION` is re-run. A stored result is reused (a runtime that failed is not tried
again for that key). One line per model and process says what was chosen and why (stderr):
e.g. ``backend auto: openvino (probe passed, stored: max |emb diff| 3.1e-06 <= 1.0e-04, masks
DICE min 1.000000 on 12; encode 0.041 s/img vs torch 0.098 -- fastest of openvino 2.39x,
onnxruntime 2.10x torch's encode speed)``, or ``backend auto: torch
(openvino not installed; onnxruntime probe failed: ...)``.

**Never int8.** ``"openvino-int8"`` (:mod:`cosmoslib.models.quantize`) is not in
:data:`AUTO_ORDER` and "auto" never picks it: its embeddings differ from float32 by design, far
beyond this probe's tolerance, so a parity probe cannot pass it; what matters is how far the
*masks* move, per strategy, on the user's own images -- measured by
:func:`cosmoslib.analysis.int8_tradeoff.agreement_table` -- and the issue's bar for a default
(mean DICE between int8 and float32 masks >= 99.5 % on every strategy S1-S6) would have to
hold on every dataset a user may bring, which a result stored for one folder cannot promise. It
also needs calibration images, which "auto" does not have when a model is loaded. So int8 is
asked for by name (``--backend openvino-int8``), and ``COSMOS_BACKEND=openvino-int8`` is
refused.

No runtime off the CPU: on CUDA "auto" is torch. ``COSMOS_BACKEND`` (:data:`ENV_BACKEND`) set
to a backend name makes "auto" mean it, without export or probe; the test suite sets it to
``torch`` (``cosmoslib/tests/backend_env.py``), so tests that do not ask for a backend export
nothing. An export that fails is reported on that line and "auto" goes on with the next
runtime (an explicit ``--backend`` raises instead).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cosmoslib import files
from cosmoslib.models import backends

__all__ = ["AUTO", "AUTO_ORDER", "ENV_BACKEND", "EMBED_RTOL", "MIN_DICE", "PROBE_VERSION",
           "Probe", "check_request", "probe_images", "probe", "choose_backend", "fastest",
           "speedup"]

#: The request that picks a backend by itself.
AUTO = "auto"
#: Runtimes "auto" probes (ties keep this order). Speed-ups over the torch encoder timed in
#: their probes (2 cores, quiet, 2026-12-03): LiteMedSAM openvino 2.23x, onnxruntime 1.91x;
#: SAM ViT-B onnxruntime 2.23x, openvino 2.17x -- which is why "auto" ranks, not takes the first.
AUTO_ORDER = ("openvino", "onnxruntime")
#: Environment variable that fixes what "auto" means (a backend name): no export, no probe.
ENV_BACKEND = "COSMOS_BACKEND"
#: Embedding tolerance, relative to the embedding's scale: max |diff| <= this x max(1, max |e|)
#: (float32 rounding of another operation order; measured ~3e-6 on LiteMedSAM).
EMBED_RTOL = 1e-4
#: Smallest DICE of any probe mask decoded from the runtime's embedding vs torch's.
MIN_DICE = 0.99
#: Version of the probe (images, prompts, tolerances); a stored probe of another is re-run.
PROBE_VERSION = 1
#: The probe's file, beside the exported encoder.
PROBE_FILE = "probe.json"

#: Models (signature hash) whose choice this process has printed already.
_ANNOUNCED: set[str] = set()


def check_request(backend: str) -> str:
    """A backend request: :data:`AUTO` or a backend name (``backends.check_backend``;
    ``"openvino-int8"`` included, which "auto" never picks)."""
    key = str(backend).strip().lower()
    return AUTO if key == AUTO else backends.check_backend(key)


@dataclass(frozen=True)
class Probe:
    """The parity probe of one exported encoder (see the module docstring).

    Attributes
    ----------
    backend, version : the runtime and its package version.
    passed : bool
    reason : str, what failed (empty when passed).
    max_abs_diff : float, max |runtime - torch| over the probe embeddings.
    tolerance : float, the allowed max |diff| (``EMBED_RTOL`` x max(1, max |torch|)).
    dice_min, dice_mean : float, over ``n_masks`` mask pairs (0..1).
    n_images, n_masks : int
    s_per_image_runtime, s_per_image_torch : float, encode seconds per probe image (threads
        as set in this process; the first image, with first-call set-up, not counted);
        informative, not a criterion.
    export_s : float, seconds the export took (0 when it existed already).
    probe_s : float, seconds the probe took (encodes and decodes).
    signature_hash : str, the model's signature with the runtime's entry.
    probe_version : int
    stored : bool, read from an earlier run (not written to the file).
    """

    backend: str
    version: str
    passed: bool
    reason: str
    max_abs_diff: float
    tolerance: float
    dice_min: float
    dice_mean: float
    n_images: int
    n_masks: int
    s_per_image_runtime: float
    s_per_image_torch: float
    export_s: float
    probe_s: float
    signature_hash: str
    probe_version: int = PROBE_VERSION
    stored: bool = False

    def line(self) -> str:
        """One line for the user: verdict, differences, speed."""
        where = "stored" if self.stored else f"probed in {self.probe_s:.1f} s" + (
            f" after a {self.export_s:.1f} s export" if self.export_s else "")
        verdict = "passed" if self.passed else f"FAILED ({self.reason})"
        return (f"{self.backend} {self.version} probe {verdict}, {where}: max |emb diff| "
                f"{self.max_abs_diff:.1e} (limit {self.tolerance:.1e}), masks DICE min "
                f"{self.dice_min:.6f} on {self.n_masks}; encode {self.s_per_image_runtime:.3f} "
                f"s/img vs torch {self.s_per_image_torch:.3f}")


def probe_images() -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """The probe's fixed images: (uint8 image, object masks) x 3, seeded.

    A smooth random background (grey 256 x 256, RGB 300 x 200, grey 180 x 240) with three
    ellipses each, brighter or darker than their surroundings by 25-90 grey levels, so that
    the decoder has objects of several sizes and contrasts to find.
    """
    out = []
    rng = np.random.default_rng(20261203)
    for h, w, rgb in ((256, 256, False), (300, 200, True), (180, 240, False)):
        noise = rng.standard_normal((h // 8 + 2, w // 8 + 2))
        background = np.kron(noise, np.ones((8, 8)))[:h, :w]
        image = 110 + 25 * background
        yy, xx = np.mgrid[:h, :w]
        objects = []
        for _ in range(3):
            cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
            ry, rx = rng.uniform(0.08, 0.22) * h, rng.uniform(0.08, 0.22) * w
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            image[mask] += rng.choice([-1, 1]) * rng.uniform(25, 90)
            objects.append(mask)
        image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
        if rgb:
            image = np.stack([image, np.clip(image.astype(int) + 10, 0, 255).astype(np.uint8),
                              image // 2 + 60], axis=-1)
        out.append((image, objects))
    return out


def _masks(model, embedding: np.ndarray, size, objects) -> list[np.ndarray]:
    """Each object's box-prompt mask and the first object's centre-point mask (the model's
    single/first output)."""
    out = []
    prepared = model.prepare(embedding)
    for i, mask in enumerate(objects):
        ys, xs = np.nonzero(mask)
        box = model.transform_boxes(np.array([xs.min(), ys.min(), xs.max(), ys.max()], float), size)
        point = model.transform_coords(np.array([[xs.mean(), ys.mean()]]), size)
        prompts = [{"boxes": torch.as_tensor(box, dtype=torch.float32)}]
        if i == 0:
            prompts.append({"point_coords": torch.as_tensor(point, dtype=torch.float32)[None],
                            "point_labels": torch.ones(1, 1, dtype=torch.int64)})
        for kwargs in prompts:
            low, _ = model.predict_torch(prepared, multimask=False, **kwargs)
            logits = model.postprocess_masks(low, size)
            out.append((logits[0, 0] > model.mask_threshold).cpu().numpy())
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def _run_probe(model, backend: str, path: Path, export_s: float) -> Probe:
    """Encode and decode the probe images with torch and with the exported encoder."""
    t_start = time.perf_counter()
    runtime = backends.ExportedEncoder(backend, path, torch.get_num_threads())
    diffs, scales, dices, t_rt, t_torch = [], [], [], 0.0, 0.0
    images = probe_images()
    for image, objects in images:
        size = image.shape[:2]
        t0 = time.perf_counter()
        e_torch = model.encode([image])[0]  # model.backend is torch while probing
        t1 = time.perf_counter()
        with torch.inference_mode():
            e_rt = runtime(model.preprocess(image)[0]).numpy()[0]
        if len(diffs):  # the first image's encodes include first-call set-up: not timed
            t_rt += time.perf_counter() - t1
            t_torch += t1 - t0
        diffs.append(float(np.abs(e_rt - e_torch).max()))
        scales.append(float(np.abs(e_torch).max()))
        for a, b in zip(_masks(model, e_torch, size, objects), _masks(model, e_rt, size, objects)):
            dices.append(_dice(a, b))
    tolerance = EMBED_RTOL * max(1.0, max(scales))
    reasons = []
    if not np.isfinite(diffs).all() or max(diffs) > tolerance:
        reasons.append(f"embeddings differ by {max(diffs):.2e} > {tolerance:.1e}")
    if min(dices) < MIN_DICE:
        reasons.append(f"a mask's DICE {min(dices):.4f} < {MIN_DICE}")
    sig = dict(model.signature, encoder=backends.signature_entry(backend))
    return Probe(backend=backend, version=backends.backend_version(backend), passed=not reasons,
                 reason="; ".join(reasons), max_abs_diff=max(diffs), tolerance=tolerance,
                 dice_min=min(dices), dice_mean=float(np.mean(dices)), n_images=len(images),
                 n_masks=len(dices), s_per_image_runtime=t_rt / (len(images) - 1),
                 s_per_image_torch=t_torch / (len(images) - 1), export_s=export_s,
                 probe_s=time.perf_counter() - t_start,
                 signature_hash=hashlib.sha256(json.dumps(
                     sig, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16])


def probe(model, backend: str, exports_dir: str | os.PathLike | None = None) -> Probe:
    """The parity probe of ``model``'s exported encoder for ``backend``: stored, else run.

    Exports the encoder first when no finished export exists. ``model`` must run its encoder
    in torch (``model.backend == "torch"``), the reference of the probe.

    Raises
    ------
    ImportError
        ``backend``'s package is not installed.
    files.InputError
        ``model`` does not run its encoder in torch; ``backend`` is ``"openvino-int8"``.
    """
    backend = backends.check_backend(backend)
    if backend == backends.INT8:
        raise files.InputError(None, "int8 embeddings are not float32 up to rounding: a parity "
                                     "probe cannot pass them; measure the masks' agreement with "
                                     "cosmoslib.analysis.int8_tradeoff.agreement_table")
    if getattr(model, "backend", "torch") != "torch":
        raise files.InputError(None, f"probe needs the torch encoder as reference; the model "
                                     f"runs {model.backend!r}")
    backends._import(backend)
    path = backends.exported_path(model, backend, exports_dir)
    record = path.parent / PROBE_FILE
    if record.is_file():
        try:
            data = json.loads(record.read_text())
            if data.get("probe_version") == PROBE_VERSION:
                return Probe(**{**data, "stored": True})
        except (ValueError, TypeError):
            pass  # unreadable or of another layout: probe again
    export_s = 0.0
    if not path.is_file():
        t0 = time.perf_counter()
        backends._build(model, backend, path)
        export_s = time.perf_counter() - t0
    result = _run_probe(model, backend, path, export_s)
    data = asdict(result)
    data.pop("stored")
    files.atomic_write_json(record, data)
    return result


def _announce(model, text: str) -> None:
    if model.signature_hash not in _ANNOUNCED:  # the torch signature: one line per model
        _ANNOUNCED.add(model.signature_hash)
        print(f"backend auto ({model.name}): {text}", file=sys.stderr, flush=True)


def choose_backend(model, exports_dir: str | os.PathLike | None = None) -> str:
    """What ``backend="auto"`` runs for ``model`` (loaded with the torch encoder).

    ``$COSMOS_BACKEND`` when set (resolved as an explicit request: a missing package falls
    back to torch with a warning); torch off the CPU; else the fastest of torch and the
    runtimes of :data:`AUTO_ORDER` that are installed and pass :func:`probe` (each is probed,
    once per machine; :func:`fastest`); else torch. Prints one line per model and process
    saying which and why. Never ``"openvino-int8"`` (module docstring).

    Raises
    ------
    files.InputError
        ``$COSMOS_BACKEND`` is not a backend name, or is ``openvino-int8``.
    """
    env = os.environ.get(ENV_BACKEND, "").strip()
    if env and check_request(env) != AUTO:
        if check_request(env) == backends.INT8:
            raise files.InputError(None, f"{ENV_BACKEND}={env}: 'auto' never means int8 (it needs "
                                         f"the run's calibration images and changes the masks); ask "
                                         f"for it by name: --backend openvino-int8")
        return backends.resolve_backend(env, model.device)
    if model.device.type != "cpu":
        _announce(model, f"torch (the runtimes run on the CPU only; device {model.device.type})")
        return "torch"
    why, passed = [], []
    for backend in AUTO_ORDER:
        if not backends.backend_available(backend):
            why.append(f"{backend} not installed ({backends.INSTALL_HINT})")
            continue
        try:
            result = probe(model, backend, exports_dir)
        except Exception as exc:  # an export the tracer cannot do: say so, try the next
            why.append(f"{backend} export failed ({type(exc).__name__}: {exc})")
            continue
        if result.passed:
            passed.append(result)
        else:
            why.append(result.line())
    chosen, ranking = fastest(passed)
    if chosen is None:
        _announce(model, "torch (" + "; ".join(why) + ")")
        return "torch"
    if chosen == "torch":
        _announce(model, f"torch ({ranking}; torch is the fastest here)")
        return "torch"
    best = next(p for p in passed if p.backend == chosen)
    _announce(model, best.line() + f" -- fastest of {ranking}" + (
        f" ({'; '.join(why)})" if why else ""))
    return chosen


def speedup(result: Probe) -> float:
    """Encode speed of a probe's runtime over torch's, both timed in that probe (> 1: faster)."""
    return result.s_per_image_torch / max(result.s_per_image_runtime, 1e-12)


def fastest(passed: list[Probe]) -> tuple[str | None, str]:
    """The fastest of torch and the runtimes whose probe passed, and the ranking as text.

    Each runtime is ranked by its speed-up over torch timed side by side in its own probe
    (:func:`speedup`; a ratio measured in one run, so it does not depend on how busy the
    machine was when each probe ran). Torch wins only when every passing runtime is slower
    than it. Ties keep :data:`AUTO_ORDER`.

    Parameters
    ----------
    passed : probes that passed, in :data:`AUTO_ORDER`.

    Returns
    -------
    (backend, ranking)
        ``backend`` is None when ``passed`` is empty (``ranking`` is then ``""``); else a
        runtime name or ``"torch"``. ``ranking`` reads e.g. ``"openvino 1.71x, onnxruntime
        1.32x torch's encode speed"``.
    """
    if not passed:
        return None, ""
    ranked = sorted(passed, key=speedup, reverse=True)  # sorted() is stable: ties keep the order
    ranking = ", ".join(f"{p.backend} {speedup(p):.2f}x" for p in ranked) + " torch's encode speed"
    return (ranked[0].backend if speedup(ranked[0]) >= 1.0 else "torch"), ranking
