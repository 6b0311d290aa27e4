"""Mask-decoder finetuning (cosmoslib.protocol.finetune): split, targets, training, resume, registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cosmoslib import cli, files, models
from cosmoslib.analysis import synthetic
from cosmoslib.data import indexer, layout
from cosmoslib.models import cache as cache_mod
from cosmoslib.models import registry
from cosmoslib.protocol import finetune, splits


N_VOLUMES, SLICES = 4, 2
FRACTIONS = (0.5, 0.25, 0.25)  # 4 volumes: 2 train, 1 val, 1 test


# ----------------------------------------------------------------------------- the split


def _manifest(rows):
    return pd.DataFrame(rows, columns=["task", "image_id", "label_value", "source"])


def test_split_by_source_never_by_slice_and_single_sources_go_whole():
    rows = []
    for v in range(6):  # task A: 6 volumes x 3 slices, 2 objects each
        for s in range(3):
            rows += [("A", f"a{v}_{s:04d}", lv, f"a/vol{v}.nii") for lv in (1, 2)]
    for s in range(5):  # B and C: two label sets of one volume (must stay together)
        rows += [("B", f"m_{s:04d}", 1, "shared/mni.nii"), ("C", f"m_{s:04d}", 3, "shared/mni.nii")]
    rows += [("D", "cells", lv, "cells.tif") for lv in range(1, 40)]  # one big image
    rows += [("E", f"e{v}_{s}", 1, f"e{v}.nrrd") for v in range(2) for s in range(2)]  # 2 volumes
    manifest = _manifest(rows)
    split = splits.split_manifest(manifest, (0.6, 0.2, 0.2), seed=3)
    images = split.images.merge(manifest[["task", "image_id", "source"]].drop_duplicates())
    assert (images.groupby("source")["part"].nunique() == 1).all()  # no volume in two parts
    assert (images.groupby("group")["part"].nunique() == 1).all()
    assert set(images["rule"]) == {"source"}
    parts_a = images[images["task"] == "A"].drop_duplicates("source")["part"].value_counts()
    assert set(parts_a.index) == {"train", "val", "test"} and parts_a["train"] >= 2
    strata = split.strata.set_index("stratum")
    assert strata.loc["B+C", "n_groups"] == 1 and "whole stratum to" in strata.loc["B+C", "assignment"]
    assert "whole stratum to" in strata.loc["D", "assignment"]
    assert strata.loc["E", "assignment"] == "2 groups: one to train, one to test"
    assert images[images["task"] == "E"].drop_duplicates("source")["part"].tolist().count("train") == 1
    # every object row lands in exactly one part
    assert sum(len(split.rows(manifest, p)) for p in splits.PARTS) == len(manifest)
    # same seed, same split; the digest says so
    again = splits.split_manifest(manifest.sample(frac=1, random_state=0), (0.6, 0.2, 0.2), seed=3)
    assert again.digest() == split.digest()
    assert splits.split_manifest(manifest, (0.6, 0.2, 0.2), seed=4).digest() != split.digest()


def test_split_without_source_uses_case_ids_then_images():
    rows = [("22_Heart", f"22_Heart_{case}_{s}", 1, None) for case in range(1, 6) for s in range(4)]
    rows += [("6_Pancreas", f"6_Pancreas_{case}_{s}_0", 1, None) for case in (10, 12, 13) for s in (40, 41)]
    rows += [("misc", name, 1, None) for name in ("scan a", "scan b", "scan c")]
    manifest = _manifest(rows)
    keys = splits.group_keys(manifest)
    assert keys.loc[0, "group"] == "case:22_Heart:1" and keys.loc[0, "rule"] == "case"
    assert keys["group"][manifest["task"] == "6_Pancreas"].nunique() == 3
    assert set(keys["rule"][manifest["task"] == "misc"]) == {"image"}
    split = splits.split_manifest(manifest, seed=0)
    heart = split.images[split.images["task"] == "22_Heart"]
    heart_case = heart["image_id"].str.split("_").str[2]
    assert (heart.groupby(heart_case)["part"].nunique() == 1).all()
    assert "case part" in split.rule and "each image whole" in split.rule


def test_settings_reject_bad_values():
    with pytest.raises(files.InputError, match="curriculum"):
        finetune.Settings(curriculum="points")
    with pytest.raises(files.InputError, match="shift levels"):
        finetune.Settings(shift_levels=(5,))
    with pytest.raises(files.InputError, match="fractions"):
        finetune.Settings(fractions=(0.0, 0.5, 0.5))


# ----------------------------------------------------------------------------- targets and loss


class _Geometry:
    """The two geometry members lowres_target uses, for a model of input side S."""

    def __init__(self, side):
        self.input_size = side

    def resized_size(self, size):
        from segment_anything.utils.transforms import ResizeLongestSide

        return ResizeLongestSide.get_preprocess_shape(size[0], size[1], self.input_size)


@pytest.mark.parametrize("side", [256, 1024])
def test_lowres_target_is_in_the_padded_input_frame(side):
    mask = np.zeros((100, 200), bool)  # wide image: resized to (S/2, S), padded below
    mask[20:60, 50:150] = True
    target = finetune.lowres_target(mask, _Geometry(side))
    assert target.shape == (256, 256)
    rows, cols = np.nonzero(target.numpy())
    # 256 / 200 = 1.28 low-res pixels per original pixel, in both frames
    assert abs(rows.min() - 20 * 1.28) <= 1 and abs(rows.max() + 1 - 60 * 1.28) <= 1
    assert abs(cols.min() - 50 * 1.28) <= 1 and abs(cols.max() + 1 - 150 * 1.28) <= 1
    assert not target[128:].any()  # the padding
    tiny = np.zeros((1000, 1000), bool)
    tiny[500, 500] = True  # a quarter of a low-res pixel
    assert int(finetune.lowres_target(tiny, _Geometry(side)).sum()) >= 1


def test_dice_bce_loss_known_values():
    t = torch.zeros(2, 256, 256)
    t[:, 100:150, 100:150] = 1
    perfect = torch.where(t > 0, 30.0, -30.0)
    assert torch.allclose(finetune.dice_bce_loss(perfect, t), torch.zeros(2), atol=1e-6)
    half = torch.zeros(1, 256, 256)  # p = 0.5 everywhere: BCE = ln 2
    loss = finetune.dice_bce_loss(half, t[:1])
    n_t, n = float(t[0].sum()), 256 * 256
    expected = 1 - (2 * 0.5 * n_t + 1e-5) / (0.25 * n + n_t + 1e-5) + np.log(2)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_iou_head_loss_known_values():
    t = torch.zeros(2, 256, 256)
    t[:, :100, :100] = 1
    logits = torch.full((2, 256, 256), -5.0)
    logits[0, :100, :50] = 5.0  # half of the target: IoU 0.5
    loss = finetune.iou_head_loss(torch.tensor([0.5, 0.3]), logits, t)
    assert loss[0].item() == pytest.approx(0.0) and loss[1].item() == pytest.approx(0.09)


# ----------------------------------------------------------------------------- training


def _build_root(root: Path, seed: int = 0) -> None:
    """Bright ellipses on noise, one per image, N_VOLUMES volumes of SLICES slices."""
    rng = np.random.default_rng(seed)
    images = {}
    for v in range(N_VOLUMES):
        for s in range(SLICES):
            image_id = f"vol{v}_{s:04d}"
            mask = synthetic.ellipse((96, 96), tuple(rng.uniform(10, 22, 2)), tuple(rng.uniform(28, 68, 2)),
                                     angle=rng.uniform(0, 180))
            layout.write_pair(root, "toy", image_id, synthetic.render(mask, 70, 6, 90, rng), mask.astype(np.uint8))
            images[image_id] = {"source": f"vol{v}.nii.gz", "slice_index": s, "spacing": [1.0, 1.0, 2.0]}
    layout.write_task(root, "toy", {1: "Blob"}, dataset="toy", modality="CT", images=images)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    base = tmp_path_factory.mktemp("finetune")
    root = base / "root"
    _build_root(root)
    return dict(base=base, root=root, cache=base / "cache", manifest=indexer.index(root))


SETTINGS = finetune.Settings(curriculum="mixed", epochs=3, fractions=FRACTIONS, seed=7)


@pytest.fixture(scope="module")
def trained(toy, litemedsam):
    out = toy["base"] / "run"
    result = finetune.finetune(toy["manifest"], toy["root"], litemedsam, out, SETTINGS, cache_dir=toy["cache"],
                               progress=False, register=False)
    return result


@pytest.mark.slow
def test_only_the_mask_decoder_changes(trained, litemedsam):
    base = litemedsam.sam.state_dict()
    tuned = torch.load(trained.checkpoint, map_location="cpu", weights_only=True)
    assert set(tuned) == set(base)
    changed = {k for k in base if not torch.equal(base[k].cpu(), tuned[k])}
    assert changed and all(k.startswith("mask_decoder.") for k in changed)
    # the trained single-mask path moved; the IoU head got no gradient and kept its weights
    assert any(k.startswith("mask_decoder.transformer.") for k in changed)
    assert not any(k.startswith("mask_decoder.iou_prediction_head.") for k in changed)


def test_trainable_sam_freezes_everything_but_the_decoder(litemedsam):
    sam, decoder = finetune.trainable_sam(litemedsam)
    assert all(p.requires_grad for p in decoder.parameters())
    assert not any(p.requires_grad for p in sam.prompt_encoder.parameters())
    assert decoder is not litemedsam.sam.mask_decoder  # the base model is never touched
    assert sam.image_encoder is litemedsam.sam.image_encoder


@pytest.mark.slow
def test_training_on_easy_objects_raises_validation_dice(trained):
    # known answer: LiteMedSAM was trained with boxes only; a few steps with S2-S6 prompts on
    # bright ellipses must raise its validation DICE (points and boxes in turn).
    hist = trained.history
    assert list(hist["epoch"]) == [0, 1, 2, 3]
    before, best = hist.loc[0, "val_dice"], hist["val_dice"][1:].max()
    assert best > before + 5.0, hist.to_string()
    assert hist["train_loss"][1:].notna().all() and np.isnan(hist.loc[0, "train_loss"])
    assert trained.best_epoch == int(hist["epoch"][hist["val_dice"] == best].iloc[0])


@pytest.mark.slow
def test_provenance_and_split_are_saved(trained, toy):
    prov = json.loads((trained.out_dir / "provenance.json").read_text())
    assert prov["finished"] and prov["curriculum"] == "mixed" and prov["arch"] == "litemedsam"
    assert prov["base_model"]["signature"]["arch"] == "litemedsam"
    assert prov["hyperparameters"]["lr"] == 1e-4 and prov["hyperparameters"]["batch_images"] == 2
    assert prov["split"]["rule"].startswith("source volume") and prov["split"]["counts"]["train"]["groups"] == 2
    assert [h["epoch"] for h in prov["history"]] == [0, 1, 2, 3]
    assert prov["data"]["n_train_objects"] == 4 and prov["data"]["n_val_objects"] == 2
    assert not (trained.out_dir / "state.pt").exists()
    saved = pd.read_csv(trained.out_dir / "split.csv")
    assert (saved.groupby("group")["part"].nunique() == 1).all()
    assert "/" not in prov["checkpoint"] and str(toy["base"]) not in json.dumps(prov)
    # a rerun with the same inputs reuses the finished run instead of training again
    again = finetune.finetune(toy["manifest"], toy["root"], models.load_model("litemedsam", device="cpu"),
                              trained.out_dir, SETTINGS, cache_dir=toy["cache"], progress=False, register=False)
    assert again.reused and again.provenance["checkpoint_sha256"] == prov["checkpoint_sha256"]
    # another setting in the same folder is refused
    with pytest.raises(files.InputError, match="other inputs"):
        finetune.finetune(toy["manifest"], toy["root"], "litemedsam", trained.out_dir, SETTINGS,
                          epochs=2, cache_dir=toy["cache"], progress=False, register=False)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_weights(trained, toy, litemedsam):
    out = toy["base"] / "killed"

    def kill(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune.finetune(toy["manifest"], toy["root"], litemedsam, out, SETTINGS, cache_dir=toy["cache"],
                          progress=False, register=False, on_epoch_end=kill)
    assert (out / "state.pt").exists() and not (out / "model.pth").exists()
    resumed = finetune.finetune(toy["manifest"], toy["root"], litemedsam, out, SETTINGS, cache_dir=toy["cache"],
                                progress=False, register=False)
    assert resumed.resumed_from == 1
    a = torch.load(trained.checkpoint, map_location="cpu", weights_only=True)
    b = torch.load(resumed.checkpoint, map_location="cpu", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history["val_dice"].tolist() == trained.history["val_dice"].tolist()


@pytest.mark.slow
def test_the_checkpoint_loads_back_through_the_registry(trained, toy, litemedsam, monkeypatch, tmp_path):

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setenv("COSMOS_DATA", str(tmp_path))
    model = finetune.load_finetuned(trained.out_dir, device="cpu")
    assert model.name == "litemedsam-ft-mixed" and model.name in models.registered_models()
    assert model.checkpoint_sha256 == trained.provenance["checkpoint_sha256"]
    assert model.signature["checkpoint_sha256"] == trained.provenance["checkpoint_sha256"]
    assert model.signature_hash != litemedsam.signature_hash
    assert model.default_multimask is False and model.supports_points is True
    # the base's cached embeddings were shared with it (same encoder): nothing to re-encode
    mine, base = cache_mod.EmbeddingCache(toy["cache"], model), cache_mod.EmbeddingCache(toy["cache"], litemedsam)
    assert mine.store != base.store and len(mine) == N_VOLUMES * SLICES and mine.verify() == {}
    assert all(np.array_equal(mine.load(k), base.load(k)) for k in mine.keys())
    by_arch = models.load_model("litemedsam", checkpoint=trained.checkpoint, device="cpu")
    assert by_arch.signature == model.signature
    # a new process: the persisted list registers it again on import
    monkeypatch.setattr(registry, "_REGISTRY", {k: v for k, v in registry._REGISTRY.items() if k != model.name})
    assert finetune.register_saved() == ["litemedsam-ft-mixed"]
    assert models.load_model("litemedsam-ft-mixed", device="cpu").checkpoint_sha256 == model.checkpoint_sha256


@pytest.mark.slow
def test_cli_finetune_then_evaluate_by_name(toy, monkeypatch, tmp_path, capsys):

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setenv("COSMOS_DATA", str(tmp_path))
    out = tmp_path / "ft"
    code = cli.main(["finetune", str(toy["root"]), "--model", "litemedsam", "--prompts", "box", "--epochs", "1",
                     "--out", str(out), "--cache", str(toy["cache"]), "--val-fraction", "0.25",
                     "--test-fraction", "0.25", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0 and "litemedsam-ft-box" in printed and (out / "model.pth").exists()
    results = tmp_path / "results.parquet"
    code = cli.main(["evaluate", str(toy["root"]), "--model", "litemedsam-ft-box", "--checkpoint",
                     str(out / "model.pth"), "--strategies", "S5", "--out", str(results),
                     "--cache", str(toy["cache"]), "--device", "cpu"])
    assert code == 0
    table = pd.read_parquet(results)
    assert set(table["model"]) == {"litemedsam-ft-box"} and len(table) == 2 * N_VOLUMES * SLICES


@pytest.mark.parametrize("curriculum,expected", [("box", ("boxes",)), ("mixed", ("boxes", "points"))])
def test_a_finetuned_model_states_the_prompts_its_decoder_learnt(tmp_path, curriculum, expected):
    """The registry entry of a finetuned LiteMedSAM (box-trained) names its base's prompts plus the
    curriculum's: the ``mixed`` decoder has been trained on points too, the ``box`` one has not."""
    name = f"litemedsam-ft-test-{curriculum}"
    prov = {"name": name, "arch": "litemedsam", "checkpoint": "model.pth", "curriculum": curriculum,
            "base_model": {"name": "litemedsam"}}
    try:
        entry = finetune._register(tmp_path, prov, persist=False)
        assert entry.trained_prompts == expected
        assert registry.lookup(name).trained_prompts == expected and entry.nature == "medical"
    finally:
        registry._REGISTRY.pop(name, None)  # leave the session's registry as it was
