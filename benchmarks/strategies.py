"""Benchmark of prompt decoding (S2..S6) and Everything mode (S1) from a cached embedding.
Prints, never asserts.

For LiteMedSAM (real weights) and SAM ViT-B (random weights: speed only, its masks are
meaningless), on one real image of cosmos-demo (or ``--root``), measured side by side in the
same run (the machine is shared, so read the ratios, not the absolute numbers):

* **S2..S6** -- decodes per second of our path, ``model.prepare(embedding)`` once then
  ``model.decode(prepared, prompt, ...)`` per prompt (the prepare is counted in our time), vs
  a plain ``segment_anything.SamPredictor`` loop (``set_image`` once, not timed; then
  ``predict`` per prompt with the same multimask setting and ``return_logits=False``, i.e. the
  same outputs as ours: bool masks at the original size, IoU predictions, low-res logits).
  Also our own stock path (``fast_decoder=False``: ``sam.mask_decoder`` itself), to separate
  the decoder re-arrangement from the rest. Agreement: the largest absolute difference of the
  low-res logits, of the logits at the original size (a second, untimed pass with
  ``return_logits=True``) and of the predicted IoUs, and the fraction of equal mask pixels.
* **S1** -- ``everything.generate_everything`` on the cached embedding vs
  ``SamAutomaticMaskGenerator(sam, same params).generate(image)``, which re-encodes the image
  (that is its design; its time is printed with and without the encode). Agreement: the number
  of masks, the smallest IoU of paired masks (same grid point, closest predicted IoU) and how
  many pairs sit at another position of the output order (NMS orders by predicted IoU, and
  ties to ~1e-7 may swap).

Run: ``.venv/bin/python benchmarks/strategies.py [--rounds 3] [--max-prompts 40] [--no-vit-b]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

STRATEGIES = ("S2", "S3", "S4", "S5", "S6")


def _pick_image(manifest):
    """The image with the most objects (ties: the largest), as a relative path."""
    counts = manifest.groupby("image_path").agg(n=("label_value", "size"), h=("height", "first"),
                                               w=("width", "first"))
    counts["px"] = counts["h"] * counts["w"]
    return counts.sort_values(["n", "px"], ascending=False).index[0]


def _prompts(label: np.ndarray, max_prompts: int, seed: int = 0):
    """Prompts S2..S6 for every object of ``label`` (round robin), at most ``max_prompts``."""
    from cosmoslib.protocol.prompts import make_prompt

    rng = np.random.default_rng(seed)
    out = []
    for value in np.unique(label[label > 0]):
        for strategy in STRATEGIES:
            out.append((strategy, make_prompt(label == value, strategy, rng)))
    return out[:max_prompts]


def _predict_kwargs(prompt) -> dict:
    return dict(point_coords=prompt.points, point_labels=prompt.point_labels, box=prompt.box)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def bench_decode(model, image: np.ndarray, prompts, rounds: int) -> dict:
    """Decodes per second: ours (fast), ours (stock decoder), SamPredictor; and agreement."""
    import torch
    from segment_anything import SamPredictor

    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    size = image.shape[:2]
    multimask = model.default_multimask
    t0 = time.perf_counter()
    embedding = model.encode([image])[0]  # the cached embedding (EmbeddingCache stores this)
    t_encode = time.perf_counter() - t0
    predictor = SamPredictor(model.sam)
    with torch.inference_mode():
        predictor.set_image(rgb)
    emb_diff = float(np.abs(predictor.features[0].cpu().numpy() - embedding).max())

    def ours():
        prepared = model.prepare(embedding)
        return [model.decode(prepared, p, size, multimask=multimask) for _, p in prompts]

    def ours_stock():
        model.fast_decoder = False
        try:
            return [model.decode(embedding, p, size, multimask=multimask) for _, p in prompts]
        finally:
            model.fast_decoder = True

    def sam_predictor(return_logits=False):
        with torch.inference_mode():
            return [predictor.predict(multimask_output=multimask, return_logits=return_logits,
                                      **_predict_kwargs(p)) for _, p in prompts]

    times = {"ours": [], "ours_stock": [], "sam_predictor": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # points on box-only LiteMedSAM warn (see models)
        ours(), sam_predictor()  # warm-up
        for _ in range(rounds):  # interleaved, so load changes hit all three alike
            for name, fn in (("ours", ours), ("sam_predictor", sam_predictor),
                             ("ours_stock", ours_stock)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        mine = ours()
        ref = sam_predictor(return_logits=True)
    low = max(float(np.abs(o.low_res_logits - r[2]).max()) for o, r in zip(mine, ref))
    iou = max(float(np.abs(o.iou_pred - r[1]).max()) for o, r in zip(mine, ref))
    full = 0.0
    for o, r in zip(mine, ref):
        logits = model.postprocess_masks(torch.as_tensor(o.low_res_logits)[None], size)[0].numpy()
        full = max(full, float(np.abs(logits - r[0]).max()))
    equal = np.mean([np.mean(o.masks == (r[0] > model.mask_threshold)) for o, r in zip(mine, ref)])
    rate = {k: len(prompts) / statistics.median(v) for k, v in times.items()}
    return {"rate": rate, "low": low, "full": full, "iou": iou, "equal": equal,
            "emb_diff": emb_diff, "t_encode": t_encode, "embedding": embedding,
            "multimask": multimask, "rgb": rgb}


def bench_everything(model, rgb: np.ndarray, embedding: np.ndarray, params: dict) -> dict:
    """generate_everything from the cached embedding vs SamAutomaticMaskGenerator.generate."""
    import torch
    from segment_anything import SamAutomaticMaskGenerator

    from cosmoslib.models import everything

    size = rgb.shape[:2]
    t0 = time.perf_counter()
    ours = everything.generate_everything(model, embedding, size, **params)
    t_ours = time.perf_counter() - t0
    generator = SamAutomaticMaskGenerator(model.sam, **params)
    t0 = time.perf_counter()
    with torch.inference_mode():
        ref = generator.generate(rgb)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.inference_mode():
        generator.predictor.set_image(rgb)
    t_encode = time.perf_counter() - t0
    # Pair each SAM mask with ours from the same grid point and the closest predicted IoU
    # (the order after NMS can swap masks whose predicted IoUs tie to ~1e-7).
    by_point: dict[tuple, list[int]] = {}
    for i, xy in enumerate(ours.point_coords):
        by_point.setdefault(tuple(np.round(xy, 6)), []).append(i)
    pair_ious, moved = [], 0
    for i, ann in enumerate(ref):
        cands = by_point.get(tuple(np.round(ann["point_coords"][0], 6)), [])
        if not cands:
            pair_ious.append(0.0)
            continue
        j = min(cands, key=lambda c: abs(ours.predicted_iou[c] - ann["predicted_iou"]))
        moved += j != i
        pair_ious.append(_mask_iou(ours.mask(j), ann["segmentation"]))
    return {"t_ours": t_ours, "t_ref": t_ref, "t_encode": t_encode, "n_ours": len(ours),
            "n_ref": len(ref), "min_iou": min(pair_ious, default=float("nan")), "moved": moved}


def report(name: str, model, image, prompts, rounds: int, s1_params: dict, note: str) -> None:
    d = bench_decode(model, image, prompts, rounds)
    r = d["rate"]
    print(f"\n== {name} ({note}); image {image.shape}, {len(prompts)} prompts "
          f"({', '.join(sorted({s for s, _ in prompts}))}), multimask={d['multimask']}, "
          f"median of {rounds} interleaved rounds")
    print(f"  encode (ours, once per image, cached): {d['t_encode']:.2f} s; "
          f"|our embedding - SamPredictor features| max {d['emb_diff']:.2e}")
    print(f"  S2-S6 decodes/s: ours {r['ours']:.1f} | SamPredictor {r['sam_predictor']:.1f} | "
          f"ours with the stock decoder {r['ours_stock']:.1f}")
    print(f"  speed-up vs SamPredictor: {r['ours'] / r['sam_predictor']:.2f}x "
          f"(stock decoder vs SamPredictor: {r['ours_stock'] / r['sam_predictor']:.2f}x)")
    print(f"  agreement: max |logit diff| low-res {d['low']:.2e}, original size {d['full']:.2e} "
          f"(limit 1e-4); max |IoU diff| {d['iou']:.2e}; equal mask pixels {100 * d['equal']:.4f} %")
    e = bench_everything(model, d["rgb"], d["embedding"], s1_params)
    print(f"  S1 everything {s1_params}:")
    print(f"    ours from cache {e['t_ours']:.2f} s | SamAutomaticMaskGenerator.generate "
          f"{e['t_ref']:.2f} s (of which its encode ~{e['t_encode']:.2f} s) -> "
          f"{e['t_ref'] / e['t_ours']:.2f}x; without its encode "
          f"{(e['t_ref'] - e['t_encode']) / e['t_ours']:.2f}x")
    print(f"    masks: ours {e['n_ours']}, SAM {e['n_ref']}; smallest IoU of paired masks (same "
          f"grid point, closest predicted IoU) {e['min_iou']:.4f}; pairs at another position "
          f"in the output order {e['moved']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="COSMOS root (default cosmos-demo)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--max-prompts", type=int, default=40)
    parser.add_argument("--lite-points-per-side", type=int, default=16,
                        help="S1 grid for LiteMedSAM (SAM's default 32 takes minutes on 2 cores)")
    parser.add_argument("--vit-b-points-per-side", type=int, default=8)
    parser.add_argument("--no-vit-b", action="store_true", help="skip ViT-B (~1-2 min)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for both sides (default 1: on a shared 2-core "
                             "machine, 2 threads next to another busy process run up to 10x "
                             "slower and make every timing noise)")
    args = parser.parse_args(argv)

    import torch
    from segment_anything import build_sam_vit_b

    from cosmoslib import models
    from cosmoslib.data import indexer, readers

    torch.set_num_threads(args.threads)
    from cosmoslib.data.dataset import resolve_root

    root = resolve_root(args.root)  # None: cosmos-demo, built on first use
    manifest = indexer.index(root)
    rel = _pick_image(manifest)
    row = manifest[manifest["image_path"] == rel].iloc[0]
    image, label = readers.read_image(root / rel), readers.read_label(root / row["label_path"])
    prompts = _prompts(label, args.max_prompts)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; image {rel} "
          f"(task {row['task']})")

    # S1 thresholds: SAM's defaults (0.88 / 0.95) keep no mask of LiteMedSAM (trained with
    # boxes: its single-point IoU predictions are 0.13-0.23, stability ~0) nor of random
    # ViT-B, so lower ones leave masks to compare (same settings on both sides).
    s1 = {"points_per_batch": 64, "stability_score_thresh": 0.0}
    lite = models.load_model("litemedsam", device="cpu")
    report("LiteMedSAM", lite, image, prompts, args.rounds,
           {"points_per_side": args.lite_points_per_side, "pred_iou_thresh": 0.15, **s1}, "real weights, 256 px input")
    if not args.no_vit_b:
        torch.manual_seed(0)
        sam = build_sam_vit_b().eval()
        vit_b = models.SamFamilyModel(
            name="vit_b_random", arch="vit_b", sam=sam, checkpoint_path=Path("<random>"),
            checkpoint_sha256="", device=torch.device("cpu"), supports_points=True,
            default_multimask=True)
        report("SAM ViT-B", vit_b, image, prompts, max(1, args.rounds - 1),
               {"points_per_side": args.vit_b_points_per_side, "pred_iou_thresh": 0.0, **s1},
               f"RANDOM weights, speed only; 1024 px input; S1 on a small "
               f"{args.vit_b_points_per_side}x{args.vit_b_points_per_side} grid")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
