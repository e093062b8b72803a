"""`caprese-models`: fetch and locate the offline models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from caprese_vllm.zoo.catalog import CATALOG
from caprese_vllm.zoo.fetch import ModelFetchError, default_cache_dir, ensure_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="caprese-models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download, verify and convert a model (instant when cached)")
    fetch.add_argument("names", nargs="+", choices=sorted(CATALOG), metavar="NAME",
                       help=f"one of: {', '.join(sorted(CATALOG))}")
    fetch.add_argument("--dir", type=Path, default=None,
                       help=f"cache directory holding one folder per model (default {default_cache_dir()})")
    fetch.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("list", help="the models this tool knows")
    args = parser.parse_args(argv)

    if args.command == "list":
        width = max(len(name) for name in CATALOG)
        for spec in CATALOG.values():
            print(f"{spec.name:{width}s}  {spec.description}")
        return 0
    for name in args.names:
        try:
            path = ensure_model(name, cache_dir=args.dir, progress=not args.quiet)
        except ModelFetchError as err:
            print(f"caprese-models: error: {err}", file=sys.stderr)
            return 1
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
