"""The fast image encoder (cosmoslib.models.fast_encoder) against the stock one.

Parity: embeddings within a stated absolute tolerance of the stock encoder (ViT with random
weights and random relative-position tables at a small input size; LiteMedSAM with its real
weights), and box-prompt masks decoded from fast vs stock embeddings at mean DICE >= 99.9 %
on real demo images. ``benchmarks/encode.py`` measures the speed.
"""

from __future__ import annotations

import copy
import dataclasses
from functools import partial

import numpy as np
import pytest
import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT

from cosmoslib.data import indexer, readers
from cosmoslib.models import fast_encoder
from cosmoslib.models.cache import EmbeddingCache, _prefetch, image_key
from cosmoslib.models.tinyvit import TinyViT
from cosmoslib.protocol.prompts import Prompt

#: Largest |fast - stock| allowed for embeddings (values of order 1; measured ~4e-6).
EMBED_ATOL = 1e-4
#: Tasks and objects per image used for the DICE parity on the demo.
DICE_TASKS = 8
DICE_OBJECTS_PER_IMAGE = 4


@pytest.fixture(scope="module")
def small_vit():
    """A ViT-B-wide SAM encoder at 256 px (16 x 16 tokens, window 14 -> padded to 28),
    4 blocks (2 windowed, 2 global), random weights and relative-position tables."""
    torch.manual_seed(0)
    enc = ImageEncoderViT(img_size=256, patch_size=16, embed_dim=768, depth=4, num_heads=12,
                          mlp_ratio=4.0, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                          out_chans=256, qkv_bias=True, use_rel_pos=True,
                          global_attn_indexes=(1, 3), window_size=14).eval()
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:  # zero-initialised by SAM
                p.normal_(0.0, 0.5)
    yield enc
    fast_encoder.set_fast_encoder(enc, False)


def _run(enc, x, fast: bool) -> torch.Tensor:
    fast_encoder.set_fast_encoder(enc, fast)
    with torch.inference_mode():
        return enc(x)


def test_vit_fast_matches_stock(small_vit):
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    stock = _run(small_vit, x, False)
    assert not fast_encoder.is_fast(small_vit)
    fast = _run(small_vit, x, True)
    assert fast_encoder.is_fast(small_vit)
    assert fast.shape == stock.shape == (2, 256, 16, 16)
    diff = (fast - stock).abs().max().item()
    print(f"ViT fast vs stock: max |diff| {diff:.2e} (max |value| {stock.abs().max():.2f})")
    assert diff <= EMBED_ATOL
    # switching back gives the stock path again
    again = _run(small_vit, x, False)
    assert torch.equal(again, stock)


def test_vit_banded_bias_matches_stock(small_vit, monkeypatch):
    """Global attention with the bias built a few query rows at a time (the 1024-px case)."""
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    stock = _run(small_vit, x, False)
    # 12 heads x 16 x 256 elements per query row: 3 rows per band, with a shorter last band
    monkeypatch.setattr(fast_encoder, "BIAS_ELEMENTS", 12 * 16 * 256 * 3)
    fast = _run(small_vit, x, True)
    assert (fast - stock).abs().max().item() <= EMBED_ATOL


def test_patch_leaves_weights_and_state_dict_alone(small_vit):
    fast_encoder.set_fast_encoder(small_vit, False)
    before = {k: v.clone() for k, v in small_vit.state_dict().items()}
    fast_encoder.set_fast_encoder(small_vit, True)
    _run(small_vit, torch.zeros(1, 3, 256, 256), True)
    after = small_vit.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_other_modules_are_left_stock():
    module = torch.nn.Linear(3, 3)
    assert fast_encoder.fast_kind(module) is None
    assert fast_encoder.set_fast_encoder(module, True) is False
    assert "forward" not in module.__dict__


def _check_tinyvit_fast(enc, x, label, bn_name="layers.0.blocks.0.conv2.bn"):
    """Fast vs stock TinyViT on ``x``; folded batch norms follow an in-place weight change; a
    module in training mode runs stock. Leaves ``enc`` on the fast path, weights unchanged."""
    assert fast_encoder.fast_kind(enc) == "tinyvit"
    try:
        stock = _run(enc, x, False)
        fast = _run(enc, x, True)
        diff = (fast - stock).abs().max().item()
        print(f"{label} fast vs stock (random input): max |diff| {diff:.2e}")
        assert diff <= EMBED_ATOL, f"{label}: max |fast - stock| {diff:.2e} > {EMBED_ATOL}"
        # folded batch norms are rebuilt when a weight changes in place
        bn = enc.get_submodule(bn_name)
        saved = bn.running_mean.clone()
        with torch.no_grad():
            bn.running_mean.add_(0.5)
        try:
            stock2 = _run(enc, x, False)
            fast2 = _run(enc, x, True)
            assert (stock2 - stock).abs().max().item() > 100 * EMBED_ATOL  # the change matters
            assert (fast2 - stock2).abs().max().item() <= EMBED_ATOL
        finally:
            with torch.no_grad():
                bn.running_mean.copy_(saved)
        # a module in training mode runs stock (batch statistics cannot be folded)
        enc.train()
        try:
            with torch.no_grad():
                trained = enc(x[:1])
            fast_encoder.set_fast_encoder(enc, False)
            with torch.no_grad():
                assert torch.equal(trained, enc(x[:1]))
        finally:
            enc.eval()
    finally:
        fast_encoder.set_fast_encoder(enc, True)


def test_small_tinyvit_fast_matches_stock_and_follows_weight_changes():
    """The same checks as on LiteMedSAM's real encoder (slow test below), on a shrunk TinyViT
    (one block per stage, narrow, 128 px) with random weights and random batch-norm statistics,
    so folding the norms is exercised with non-trivial values."""
    torch.manual_seed(0)
    enc = TinyViT(img_size=128, embed_dims=(16, 32, 40, 48), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2),
                  window_sizes=(7, 7, 14, 7), out_chans=32).eval()
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    # a norm late enough that its change survives the random network (early ones wash out)
    _check_tinyvit_fast(enc, x, "small TinyViT", bn_name="layers.2.downsample.conv2.bn")


@pytest.mark.slow
def test_litemedsam_fast_matches_stock_and_follows_weight_changes(litemedsam):
    # A private copy: this test edits batch-norm statistics and runs training mode (which
    # updates them), and the session's shared model must stay untouched for later tests.
    # One image: the batch of two (fast and stock alike per image) is the shrunk TinyViT's test above.
    enc = copy.deepcopy(litemedsam.sam.image_encoder)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    _check_tinyvit_fast(enc, x, "LiteMedSAM")


def test_model_switch_and_signature(litemedsam, monkeypatch):
    img = np.random.default_rng(0).integers(0, 256, (90, 120), dtype=np.uint8)
    sig = dict(litemedsam.signature)
    try:
        litemedsam.fast_encoder = False
        stock = litemedsam.encode([img])
        assert not fast_encoder.is_fast(litemedsam.sam.image_encoder)
        litemedsam.fast_encoder = True
        fast = litemedsam.encode([img])
        assert fast_encoder.is_fast(litemedsam.sam.image_encoder)
    finally:
        litemedsam.fast_encoder = True
    assert np.abs(fast - stock).max() <= EMBED_ATOL
    # the float32 fast path shares the cache with the stock one ...
    assert litemedsam.signature == sig and "encoder" not in sig
    # ... a reduced-precision encoder (CUDA autocast) does not
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    half = dataclasses.replace(litemedsam, device=torch.device("cuda"), autocast=True)
    assert half.signature["encoder"] == "torch-bf16"
    assert half.signature_hash != litemedsam.signature_hash


def test_cache_store_depends_on_encoder_precision(litemedsam, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    half = dataclasses.replace(litemedsam, device=torch.device("cuda"), autocast=True)
    assert EmbeddingCache(tmp_path, half).store != EmbeddingCache(tmp_path, litemedsam).store


@pytest.mark.slow
def test_litemedsam_fast_masks_match_stock_on_demo(demo_root, litemedsam):
    """Box-prompt masks from fast and stock embeddings of real images: mean DICE >= 99.9 %."""
    manifest = indexer.index(demo_root)
    tasks = sorted(manifest["task"].unique())[:DICE_TASKS]
    manifest = manifest[manifest["task"].isin(tasks)]
    top = manifest.sort_values(["area_px", "image_id"], ascending=[False, True]
                               ).groupby("task").head(1)
    scores, diffs = [], []
    try:
        for row in top.itertuples():
            img = readers.read_image(demo_root / row.image_path)
            label = readers.read_label(demo_root / row.label_path)
            litemedsam.fast_encoder = False
            e_stock = litemedsam.encode([img])[0]
            litemedsam.fast_encoder = True
            e_fast = litemedsam.encode([img])[0]
            diffs.append(float(np.abs(e_fast - e_stock).max()))
            objects = manifest[(manifest["task"] == row.task)
                               & (manifest["image_id"] == row.image_id)]
            for value in objects.nlargest(DICE_OBJECTS_PER_IMAGE, "area_px")["label_value"]:
                ys, xs = np.nonzero(label == value)
                prompt = Prompt(box=np.array([xs.min(), ys.min(), xs.max(), ys.max()]))
                m_stock = litemedsam.decode(e_stock, prompt, img.shape).masks[0]
                m_fast = litemedsam.decode(e_fast, prompt, img.shape).masks[0]
                total = m_stock.sum() + m_fast.sum()
                scores.append(1.0 if total == 0 else 2.0 * (m_stock & m_fast).sum() / total)
    finally:
        litemedsam.fast_encoder = True
    print(f"LiteMedSAM fast vs stock on {len(top)} demo images: max |emb diff| {max(diffs):.2e}; "
          f"mask DICE mean {np.mean(scores):.6f}, min {np.min(scores):.6f}, n={len(scores)}")
    assert len(scores) >= 8
    assert max(diffs) <= EMBED_ATOL
    assert np.mean(scores) >= 0.999


@pytest.mark.parametrize("depth", [0, 2])
def test_prefetch_keeps_order_and_reports_unreadable(tmp_path, depth):
    from PIL import Image


    paths = []
    for i in range(4):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((8, 9), i, np.uint8)).save(path)
        paths.append(path)
    paths.insert(2, tmp_path / "missing.png")
    out = list(_prefetch(paths, depth))
    assert [o[0] for o in out] == paths
    assert out[2][1] is None and out[2][3] is not None
    assert [o[2] for i, o in enumerate(out) if i != 2] == [
        image_key(np.full((8, 9), v, np.uint8)) for v in range(4)]
