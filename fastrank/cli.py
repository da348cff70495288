"""The `fastrank` command."""
from __future__ import annotations

import argparse
import sys

from fastrank import bench


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrank", description="Fused kernels for neural re-ranking")
    sub = parser.add_subparsers(dest="command", required=True)
    bench.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
