"""SAM 2 through the model adapter (cosmoslib.models.sam2), against the ``sam2`` package itself.

Every number is compared with an independent implementation -- the package's own
``SAM2ImagePredictor`` and ``SAM2AutomaticMaskGenerator`` fed the same cached features -- on a
randomly initialised SAM 2.1 model shrunk for CI (Hiera of width 8 with 5 blocks, 256-px input,
one memory-attention and one memory-fuser layer). Random weights test the arithmetic, never accuracy.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sam2")

from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator  # noqa: E402
from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402

from cosmoslib import files, models  # noqa: E402
from cosmoslib.models import cache as cache_mod  # noqa: E402
from cosmoslib.models import everything, registry  # noqa: E402
from cosmoslib.models import sam2 as sam2_models  # noqa: E402
from cosmoslib.protocol.prompts import Prompt  # noqa: E402

#: Hydra overrides of the shrunk test architecture (on top of sam2.1_hiera_t's config).
SHRUNK = (
    "++model.image_encoder.trunk.embed_dim=8", "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]", "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
    "++model.memory_attention.num_layers=1", "++model.memory_attention.layer.dim_feedforward=32",
    "++model.memory_encoder.fuser.num_layers=1", "++model.image_size=256",
    "++model.memory_attention.layer.self_attention.feat_sizes=[16,16]",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[16,16]",
)
TINY_ARCH, TINY = "sam2_test_tiny", "sam2-test-tiny"

#: Tolerances: logits and IoU are compared in float32 (the same operations in another order:
#: measured max |diff| ~2e-7 for logits of magnitude ~1); masks may differ only where a logit
#: sits within the tolerance of the threshold.
LOGIT_TOL = 1e-4


def register_tiny(folder, seed: int = 0):
    """Register the shrunk architecture and a random-init checkpoint of it; returns the file."""
    registry.ARCHES[TINY_ARCH] = {**registry.SAM2_ARCHES["sam2.1_hiera_t"], "overrides": SHRUNK}
    path = sam2_models.random_checkpoint(TINY_ARCH, folder / f"tiny-{seed}.pt", seed=seed)
    registry.register_model(TINY, TINY_ARCH, path, overwrite=True, description="shrunk, random weights")
    return path


def unregister_tiny():
    registry._REGISTRY.pop(TINY, None)
    registry.ARCHES.pop(TINY_ARCH, None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The shrunk random-init SAM 2.1 model on CPU (2 threads, restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    path = register_tiny(tmp_path_factory.mktemp("sam2"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script inside SAM2Transforms
        model = models.load_model(TINY, device="cpu")
    yield model, path
    unregister_tiny()
    torch.set_num_threads(threads)


def image(seed=0, shape=(90, 120)):
    """A grey test image: a bright ellipse on noise (uint8)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    blob = ((yy - shape[0] * 0.45) / (shape[0] * 0.25)) ** 2 + ((xx - shape[1] * 0.5) / (shape[1] * 0.3)) ** 2 < 1
    return np.clip(rng.normal(60, 20, shape) + 120 * blob, 0, 255).astype(np.uint8)


def predictor_from(model, packed, original_size):
    """The package's SAM2ImagePredictor holding the given (cached) features, not re-encoding."""
    pred = SAM2ImagePredictor(model.sam)
    feats = model.prepare(packed)
    pred._features = {"image_embed": feats.image_embed, "high_res_feats": feats.high_res}
    pred._orig_hw = [tuple(original_size)]
    pred._is_image_set = True
    return pred


# --------------------------------------------------------------------------- registry and checkpoints


def test_the_sam2_family_is_registered_with_the_official_file_names():
    names = {n: e for n, e in models.registered_models().items() if registry.family(e.arch) == "sam2"}
    assert sorted(names) == sorted(f"{v}_hiera_{s}" for v in ("sam2", "sam2.1") for s in ("t", "s", "b+", "l"))
    assert names["sam2.1_hiera_b+"].checkpoint == "sam2.1_hiera_base_plus.pt"
    assert names["sam2_hiera_l"].checkpoint == "sam2_hiera_large.pt"
    assert registry.ARCHES["sam2.1_hiera_s"]["config"] == "configs/sam2.1/sam2.1_hiera_s.yaml"
    assert registry.family("vit_b") == "sam"


def test_features_pack_losslessly():
    rng = torch.Generator().manual_seed(0)
    embed, s0, s1 = (torch.randn(2, c, n, n, generator=rng) for c, n in ((256, 16, ), (32, 64), (64, 32)))
    packed = sam2_models.pack_features(embed, [s0, s1])
    assert packed.shape == (2, 1024, 16, 16)
    back, (b0, b1) = sam2_models.unpack_features(packed)
    assert torch.equal(back, embed) and torch.equal(b0, s0) and torch.equal(b1, s1)


def test_checkpoint_errors_are_one_clear_message_each(tiny, tmp_path):
    model, path = tiny
    text = tmp_path / "notes.pt"
    text.write_text("not weights")
    with pytest.raises(files.InputError, match="not a PyTorch checkpoint"):
        models.load_model(TINY, checkpoint=text, device="cpu")
    # another architecture: LiteMedSAM's real weights
    with pytest.raises(files.InputError, match="wrong checkpoint type.*LiteMedSAM"):
        models.load_model(TINY, checkpoint=models.litemedsam_checkpoint(), device="cpu")
    # another SAM 2 size: the tiny file given as the real Hiera-T
    with pytest.raises(files.InputError, match=r"wrong checkpoint type.*SAM 2 \(Hiera image encoder: width 8"):
        models.load_model("sam2.1_hiera_t", checkpoint=path, device="cpu")
    # and a SAM loader sees a SAM 2 file for what it is
    with pytest.raises(files.InputError, match="SAM 2"):
        models.load_model("litemedsam", checkpoint=path, device="cpu")
    state = torch.load(path, weights_only=True)["model"]
    dropped = dict(list(state.items())[5:])
    torch.save({"model": dropped}, tmp_path / "cut.pt")
    with pytest.raises(files.InputError, match="incomplete.*5 of"):
        models.load_model(TINY, checkpoint=tmp_path / "cut.pt", device="cpu")


def test_a_training_checkpoint_with_extra_keys_loads_and_says_what_was_ignored(tiny, tmp_path):
    model, path = tiny
    state = torch.load(path, weights_only=True)["model"]
    extra = {"model": {**state, "adapter.extra.weight": torch.zeros(3)}, "epoch": 7,
             "optimizer": {"lr": torch.tensor(1e-4)}}
    torch.save(extra, tmp_path / "medsam2_style.pt")
    with pytest.warns(UserWarning, match=r"ignored top-level entries \['epoch', 'optimizer'\].*adapter.extra.weight"):
        other = models.load_model(TINY, checkpoint=tmp_path / "medsam2_style.pt", device="cpu")
    for k, v in model.sam.state_dict().items():
        assert torch.equal(v, other.sam.state_dict()[k]), k
    assert other.signature_hash != model.signature_hash  # another file: another cache store


# --------------------------------------------------------------------------- parity with the package


def test_encode_equals_the_image_predictor(tiny):
    model, _ = tiny
    img = image(1)
    packed = torch.as_tensor(model.encode([img])[0])
    pred = SAM2ImagePredictor(model.sam)
    side = model.input_size
    pred._bb_feat_sizes = [(side // 4, side // 4), (side // 8, side // 8), (side // 16, side // 16)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pred.set_image(np.repeat(img[..., None], 3, axis=2))
    embed, high = sam2_models.unpack_features(packed[None])
    diffs = [float((embed - pred._features["image_embed"]).abs().max())] + [
        float((a - b).abs().max()) for a, b in zip(high, pred._features["high_res_feats"])]
    assert max(diffs) <= 1e-5, f"features differ from SAM2ImagePredictor.set_image by {diffs} (tolerance 1e-5)"


@pytest.mark.parametrize("kind", ["point", "points", "box", "box+point"])
@pytest.mark.parametrize("multimask", [True, False])
def test_decode_equals_the_image_predictor_from_the_same_cached_features(tiny, tmp_path, kind, multimask):
    model, _ = tiny
    img = image(2)
    cache = cache_mod.EmbeddingCache(tmp_path / "cache", model)  # fp16, as every run stores it
    packed = cache.get(img)
    assert packed.shape == model.embedding_shape == (1024, 16, 16)
    points = np.array([[60.0, 40.0], [20.0, 70.0], [100.0, 15.0]])
    labels = np.array([1, 0, 0])
    box = np.array([25, 18, 95, 65])
    prompt = {"point": Prompt(points=points[:1], point_labels=labels[:1]),
              "points": Prompt(points=points, point_labels=labels),
              "box": Prompt(box=box),
              "box+point": Prompt(points=points[:1], point_labels=labels[:1], box=box)}[kind]
    ours = model.decode(model.prepare(packed), prompt, img.shape, multimask=multimask)
    pred = predictor_from(model, packed, img.shape)
    logits, iou, low = pred.predict(point_coords=prompt.points, point_labels=prompt.point_labels,
                                    box=prompt.box, multimask_output=multimask, return_logits=True)
    assert ours.masks.shape == logits.shape == ((3 if multimask else 1), *img.shape)
    d_iou = float(np.abs(ours.iou_pred - iou).max())
    d_low = float(np.abs(ours.low_res_logits - low).max())
    assert d_iou <= LOGIT_TOL, f"IoU predictions differ by {d_iou} (tolerance {LOGIT_TOL})"
    assert d_low <= LOGIT_TOL, f"low-res logits differ by {d_low} (tolerance {LOGIT_TOL})"
    ours_logits = model.postprocess_masks(model.predict_torch(
        packed, *_moved(model, prompt, img.shape), multimask=multimask)[0], img.shape)[0].numpy()
    d_logits = float(np.abs(ours_logits - logits).max())
    assert d_logits <= LOGIT_TOL, f"full-size logits differ by {d_logits} (tolerance {LOGIT_TOL})"
    differ = ours.masks != (logits > 0)
    assert not differ.any() or np.abs(logits[differ]).max() <= LOGIT_TOL, \
        f"{int(differ.sum())} mask pixels differ away from the threshold"


def _moved(model, prompt, size):
    coords = labels = boxes = None
    if prompt.points is not None:
        coords = torch.as_tensor(model.transform_coords(prompt.points, size), dtype=torch.float32)[None]
        labels = torch.as_tensor(prompt.point_labels)[None]
    if prompt.box is not None:
        boxes = torch.as_tensor(model.transform_boxes(prompt.box, size), dtype=torch.float32)
    return coords, labels, boxes, None


@pytest.mark.parametrize("thresholds", ["paper", "quantiles"])
def test_s1_equals_the_automatic_mask_generator_at_the_same_thresholds(tiny, tmp_path, thresholds):
    """S1 against SAM2AutomaticMaskGenerator (its set_image replaced by the cached features).

    Random weights predict low IoUs and blurry masks, so besides the paper's settings (IoU 0.88,
    stability 0.95 at offset 1, NMS 0.7; no mask passes) the same comparison runs with settings
    that let masks through: the 40th percentiles of the candidates' own scores (stability at
    offset 0.05) and NMS at 0.95. Both sides always get the same settings."""
    model, _ = tiny
    img = image(3)
    packed = cache_mod.EmbeddingCache(tmp_path / "cache", model).get(img)
    m = 8
    if thresholds == "quantiles":
        offset, nms = 0.05, 0.95
        cands = everything.everything_candidates(model, packed, img.shape, points_per_side=m,
                                                 stability_score_offset=offset)
        iou_t = float(np.quantile(cands.predicted_iou, 0.4))
        stab_t = float(np.quantile(cands.stability_score, 0.4))
    else:
        iou_t, stab_t, offset, nms = 0.88, 0.95, 1.0, 0.7
    ours = everything.generate_everything(model, packed, img.shape, points_per_side=m, pred_iou_thresh=iou_t,
                                          stability_score_thresh=stab_t, stability_score_offset=offset,
                                          box_nms_thresh=nms)
    pred = predictor_from(model, packed, img.shape)
    pred.set_image = lambda _image: None  # keep the cached features
    amg = SAM2AutomaticMaskGenerator(model.sam, points_per_side=m, points_per_batch=64, pred_iou_thresh=iou_t,
                                     stability_score_thresh=stab_t, stability_score_offset=offset,
                                     box_nms_thresh=nms, crop_n_layers=0, min_mask_region_area=0)
    amg.predictor = pred
    theirs = amg.generate(np.repeat(img[..., None], 3, axis=2))
    if thresholds == "quantiles":
        assert len(ours) >= 2, "the comparison needs masks"
    assert len(ours) == len(theirs), f"{len(ours)} masks, SAM2AutomaticMaskGenerator {len(theirs)}"
    key = lambda pt, iou: (round(float(pt[0]), 3), round(float(pt[1]), 3), round(float(iou), 4))  # noqa: E731
    mine = {key(p, i): k for k, (p, i) in enumerate(zip(ours.point_coords, ours.predicted_iou))}
    worst_iou = 0.0
    for t in theirs:
        k = mine[key(t["point_coords"][0], t["predicted_iou"])]
        worst_iou = max(worst_iou, abs(float(ours.predicted_iou[k]) - t["predicted_iou"]),
                        abs(float(ours.stability_score[k]) - t["stability_score"]))
        np.testing.assert_array_equal(ours.mask(k), t["segmentation"])
    assert worst_iou <= LOGIT_TOL, f"scores differ by {worst_iou} (tolerance {LOGIT_TOL})"


def test_the_cache_stores_all_three_levels_in_fp16(tiny, tmp_path):
    model, _ = tiny
    img = image(4)
    cache = cache_mod.EmbeddingCache(tmp_path / "cache", model)
    first = cache.get(img)
    key = cache_mod.image_key(img)
    attrs = cache.metadata(key)
    assert attrs["shape"] == [1024, 16, 16] and attrs["dtype"] == "float16"
    assert attrs["signature"]["sam2"] == sam2_models.sam2_version()
    assert attrs["signature"]["overrides"] == list(SHRUNK)
    fresh = model.encode([img])[0]
    np.testing.assert_array_equal(first, fresh.astype(np.float16).astype(np.float32))
    # a second cache object reads the entry instead of encoding
    model_encode, model.encode = model.encode, None
    try:
        np.testing.assert_array_equal(cache_mod.EmbeddingCache(tmp_path / "cache", model).get(img), first)
    finally:
        model.encode = model_encode
