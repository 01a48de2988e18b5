"""The `ternpool` command line, at the top of the import graph: one module per command group
(`run`: generate; `models`: make-model, convert; `jobs`: submit, status, cancel, export, demo; `bench`),
registered here. Each command parses, calls a function of the layers below and prints. Imports
are lazy: `status`, `cancel` and every `--help` load neither Numba nor Ray."""

from __future__ import annotations

import argparse
import logging
import sys

from . import bench, jobs, models, run

GROUPS = (models, run, jobs, bench)  # each adds its commands with `add_commands(subparsers)`, in help order


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ternpool", description="Batch inference of ternary (BitNet b1.58) "
                                "language models on CPU node pools.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress and timings")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, ImportError, OSError) as e:
        print(f"ternpool {args.command}: error: {e}", file=sys.stderr)
        return 2
