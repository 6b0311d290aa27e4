"""``backend="auto"`` (cosmoslib.models.backend_probe): the parity probe, its stored result, the
choice it makes, and ViT runtime parity on a shrunk ViT.

The ViT tests use SAM's own ``ImageEncoderViT`` shrunk (256 px input, patch 4, width 64, two
blocks, windowed attention of 14 with padding like ViT-B's, one global block; random weights)
so that the export and both runtimes run in seconds; the full-size ViT-B check is
``benchmarks/encode.py``. Each runtime's embeddings are compared with the torch encoder's
directly (the independent check), and the probe's verdict with that comparison.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from cosmoslib import models
from cosmoslib.models import backend_probe, backends
from cosmoslib.models.cache import EmbeddingCache

RUNTIMES = ("onnxruntime", "openvino")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One exports folder for this module: the shrunk ViT is exported once per runtime."""
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(autouse=True)
def _auto_env(exports, monkeypatch):
    """Exports in this module's folder; "auto" really probes (the suite sets torch)."""
    monkeypatch.setenv("COSMOS_EXPORTS", str(exports))
    monkeypatch.delenv(backend_probe.ENV_BACKEND, raising=False)
    monkeypatch.setattr(backend_probe, "_ANNOUNCED", set())


def shrunk_vit(seed: int = 0) -> models.SamFamilyModel:
    """A SamFamilyModel around a shrunk ViT image encoder (random weights, CPU)."""
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(img_size=256, patch_size=4, in_chans=3, embed_dim=64, depth=2,
                              num_heads=2, mlp_ratio=2.0, out_chans=256, qkv_bias=True,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                              use_rel_pos=True, window_size=14, global_attn_indexes=(1,))
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                           input_image_size=(256, 256), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3,
                          iou_head_hidden_dim=64,
                          transformer=TwoWayTransformer(depth=1, embedding_dim=256, mlp_dim=256,
                                                        num_heads=8))
    sam = Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder).eval()
    return models.SamFamilyModel(name="vit_shrunk", arch="vit_b", sam=sam,
                                 checkpoint_path=Path("<random>"),
                                 checkpoint_sha256=f"random-{seed}", device=torch.device("cpu"),
                                 supports_points=True, default_multimask=True)


@pytest.fixture(scope="module")
def vit():
    return shrunk_vit()


@pytest.mark.parametrize("backend", RUNTIMES)
def test_shrunk_vit_runtime_parity_and_probe(vit, backend):
    """The exported shrunk ViT under each runtime: embeddings as torch's (checked here, apart
    from the probe), and the probe passes, is stored beside the export and read back."""
    pytest.importorskip(backend)
    result = backend_probe.probe(vit, backend)
    assert result.passed, result.line()
    assert not result.stored and result.n_masks == 12
    record = backends.exported_path(vit, backend).parent / backend_probe.PROBE_FILE
    assert record.is_file()
    runtime = backends.ExportedEncoder(backend, backends.exported_path(vit, backend), 1)
    for image, _ in backend_probe.probe_images():
        e_torch = vit.encode([image])[0]
        e_rt = runtime(vit.preprocess(image)[0]).numpy()[0]
        assert np.abs(e_rt - e_torch).max() <= 1e-4 * max(1.0, np.abs(e_torch).max())
        assert np.abs(e_rt - e_torch).max() > 0  # really another runtime
    again = backend_probe.probe(vit, backend)
    assert again.stored and again.passed and again.max_abs_diff == result.max_abs_diff


def test_auto_picks_the_fastest_runtime_that_passes_and_says_so_once(vit, capsys, monkeypatch):
    """Both runtimes are probed; the choice is the larger speed-up over torch measured in the
    stored probes (torch if neither is faster), printed once with the ranking."""
    if not all(backends.backend_available(b) for b in RUNTIMES):
        pytest.skip("both runtimes needed (extra: runtimes)")
    chosen = backend_probe.choose_backend(vit)
    probes = [backend_probe.probe(vit, b) for b in backend_probe.AUTO_ORDER]
    assert all(p.stored and p.passed for p in probes)  # each runtime was probed and stored
    best = max(probes, key=backend_probe.speedup)
    assert chosen == (best.backend if backend_probe.speedup(best) >= 1 else "torch")
    err = capsys.readouterr().err
    assert err.count("backend auto") == 1 and chosen in err and "fastest" in err
    assert all(f"{p.backend} {backend_probe.speedup(p):.2f}x" in err for p in probes)

    def no_probe(*args, **kwargs):
        raise AssertionError("probed again although a stored probe exists")

    monkeypatch.setattr(backend_probe, "_run_probe", no_probe)
    monkeypatch.setattr(backends, "_export_onnx", no_probe)
    assert backend_probe.choose_backend(vit) == chosen  # stored result, no export
    assert capsys.readouterr().err == ""  # printed once per process


def _probe(backend, s_runtime, s_torch, passed=True):
    return backend_probe.Probe(
        backend=backend, version="0", passed=passed, reason="", max_abs_diff=1e-6,
        tolerance=1e-4, dice_min=1.0, dice_mean=1.0, n_images=3, n_masks=12,
        s_per_image_runtime=s_runtime, s_per_image_torch=s_torch, export_s=0.0, probe_s=1.0,
        signature_hash="0")


def test_fastest_ranks_by_the_speed_up_measured_in_each_probe():
    """The rule on its own: the ratio timed side by side in each probe decides (not the raw
    seconds, which depend on how busy the machine was when each probe ran); torch wins when
    every runtime is slower; a tie keeps AUTO_ORDER; nothing passed, no choice."""
    ov, ort = _probe("openvino", 2.0, 4.0), _probe("onnxruntime", 1.5, 2.0)  # 2.0x vs 1.33x
    assert backend_probe.fastest([ov, ort])[0] == "openvino"
    assert backend_probe.fastest([ort, ov])[0] == "openvino"
    quick_ort = _probe("onnxruntime", 1.0, 3.0)  # 3.0x, although ov's seconds are fewer elsewhere
    chosen, ranking = backend_probe.fastest([ov, quick_ort])
    assert chosen == "onnxruntime" and ranking.startswith("onnxruntime 3.00x, openvino 2.00x")
    slow = [_probe("openvino", 5.0, 4.0), _probe("onnxruntime", 3.0, 2.0)]
    assert backend_probe.fastest(slow)[0] == "torch"
    tie = [_probe("openvino", 1.0, 2.0), _probe("onnxruntime", 2.0, 4.0)]
    assert backend_probe.fastest(tie)[0] == "openvino"
    assert backend_probe.fastest([]) == (None, "")


def test_a_failed_probe_moves_on_and_falls_back_to_torch(vit, capsys, monkeypatch):
    """A runtime whose probe fails is skipped (and not tried again: the failure is stored);
    with none left, torch, with one line naming why."""
    monkeypatch.setattr(backend_probe, "AUTO_ORDER", ("onnxruntime",))
    pytest.importorskip("onnxruntime")
    record = backends.exported_path(vit, "onnxruntime").parent / backend_probe.PROBE_FILE
    record.unlink(missing_ok=True)  # probe again (the export of the tests above is reused)
    monkeypatch.setattr(backend_probe, "EMBED_RTOL", 0.0)  # nothing can pass
    try:
        assert backend_probe.choose_backend(vit) == "torch"
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "torch (onnxruntime" in err and "FAILED" in err
        stored = backend_probe.probe(vit, "onnxruntime")
        assert stored.stored and not stored.passed and "embeddings differ" in stored.reason
    finally:
        record.unlink(missing_ok=True)


def test_missing_runtimes_mean_torch(vit, capsys, monkeypatch):
    monkeypatch.setattr(backends, "backend_available", lambda backend: backend == "torch")
    assert backend_probe.choose_backend(vit) == "torch"
    err = capsys.readouterr().err
    assert "openvino not installed" in err and "onnxruntime not installed" in err


def test_env_fixes_auto_without_export(vit, monkeypatch):
    def no_export(*args, **kwargs):
        raise AssertionError("exported although COSMOS_BACKEND says torch")

    monkeypatch.setattr(backends, "_build", no_export)
    monkeypatch.setenv(backend_probe.ENV_BACKEND, "torch")
    assert backend_probe.choose_backend(vit) == "torch"
    with pytest.raises(Exception, match="unknown encoder backend"):
        monkeypatch.setenv(backend_probe.ENV_BACKEND, "tensorrt")
        backend_probe.choose_backend(vit)


@pytest.mark.slow
def test_load_model_auto_keys_the_cache_by_the_chosen_backend(tmp_path, litemedsam, monkeypatch):
    """(Slow: exports the real LiteMedSAM encoder.) LiteMedSAM with backend="auto": a runtime (its probe passes), whose signature -- and so
    the embedding cache's store -- differs from torch's; its embeddings match torch's.

    Only the first installed runtime is offered, so one real export is paid: choosing among
    several runtimes is :func:`test_auto_picks_the_fastest_runtime_that_passes_and_says_so_once`'s
    (both real runtimes, on the shrunk ViT)."""
    installed = [b for b in RUNTIMES if backends.backend_available(b)]
    if not installed:
        pytest.skip("no runtime installed (extra: runtimes)")
    monkeypatch.setattr(backend_probe, "AUTO_ORDER", tuple(installed[:1]))
    model = models.load_model("litemedsam", device="cpu", backend="auto")
    assert model.backend in RUNTIMES
    assert model.signature["encoder"] == backends.signature_entry(model.backend)
    assert EmbeddingCache(tmp_path, model).store != EmbeddingCache(tmp_path, litemedsam).store
    image = backend_probe.probe_images()[1][0]
    assert np.abs(model.encode([image]) - litemedsam.encode([image])).max() <= 1e-4


def test_check_request():
    assert backend_probe.check_request(" AUTO ") == "auto"
    assert backend_probe.check_request("ov") == "openvino"
    with pytest.raises(Exception, match="unknown encoder backend"):
        backend_probe.check_request("fast")


@pytest.mark.parametrize("verb,extra", [("embed", []), ("evaluate", ["--out", "r.parquet"]),
                                        ("finetune", ["--out", "run"])])
def test_cli_verbs_default_to_auto(verb, extra):
    from cosmoslib import cli

    args = cli.build_parser().parse_args([verb, "root", "--model", "litemedsam", *extra])
    assert args.backend == "auto"
    args = cli.build_parser().parse_args([verb, "root", "--model", "litemedsam", *extra,
                                          "--backend", "torch"])
    assert args.backend == "torch"


def test_book_models_use_auto(monkeypatch):
    """The book's model loader asks load_model for "auto"."""
    from cosmoslib.book import chapters

    seen = {}

    def fake_load(name, device=None, backend="torch"):
        seen[name] = backend
        return object()

    monkeypatch.setattr(chapters.models_mod, "load_model", fake_load)
    monkeypatch.setattr(chapters, "_MODELS", {})
    chapters.model("litemedsam")
    assert seen == {"litemedsam": "auto"}


def test_finetune_shares_embeddings_under_the_base_backend(litemedsam, tmp_path, monkeypatch):
    """A finetuned model's copy of its base's cached embeddings is filed under the backend that
    made them (a runtime's entries never land in a torch-keyed store)."""
    import copy

    import pandas as pd

    from cosmoslib.protocol import finetune

    pytest.importorskip("onnxruntime")
    base = copy.copy(litemedsam)  # no __post_init__: nothing is exported
    base.backend = "onnxruntime"
    seen = {}

    def capture(b, view, paths, cache_dir, progress=True):
        seen["base"], seen["view"] = b.signature, view.signature
        return 0

    monkeypatch.setattr(finetune, "share_embeddings", capture)
    finetune._share_after(base, tmp_path, {"name": "ft", "checkpoint_sha256": "0" * 64},
                          pd.DataFrame({"image_path": []}), tmp_path, tmp_path, False)
    assert seen["view"]["encoder"] == seen["base"]["encoder"] == backends.signature_entry(
        "onnxruntime")
