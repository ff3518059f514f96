"""Command-line options derived from a config dataclass, so each setting's default and help are stated once.

    @dataclass(frozen=True)
    class Config:
        batch_size: int = option(32, "prompts per forward pass")              # --batch-size N
        progress: bool = option(True, "progress bars")                        # --no-progress
        names: tuple[str, ...] | None = option(None, "comma-separated names") # --names a,b
        cache: Path = option(help="where exports go", default_factory=default_cache, type=Path)

    add_options(parser, Config); config = from_args(Config, parser.parse_args())

Every field with a help text becomes an option (`batch_size` -> `--batch-size`); the other fields stay
out of the command line. Used by `recallfix analyze|demo` (analysis) and `recallfix serve|router` (server).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

Config = TypeVar("Config")
HIDE_DEFAULT = "hide_default"  # field metadata: keep the default out of --help (a secret read from the environment)


def option(default: Any = None, help: str = "", *, default_factory: Callable[[], Any] | None = None,  # noqa: A002
           hide_default: bool = False, **cli: Any) -> Any:
    """A config field that is a command-line option: its default (or `default_factory`), its help text, and
    extra argparse settings (choices, metavar, type)."""
    metadata = {"help": help, HIDE_DEFAULT: hide_default, **cli}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def comma_list(text: str) -> tuple[str, ...] | None:
    return tuple(part.strip() for part in text.split(",")) if text else None


def _option_type(hint: Any) -> Any:
    """The argparse `type` of a field's type hint (None dropped from a union; a tuple is comma-separated)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    return comma_list if typing.get_origin(hint) is tuple else hint


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config: type, *,
                defaults: bool = True) -> None:
    """One option per field of the dataclass `config` that has a help text. A bool field is a switch that
    turns its default over (`--no-progress`). `defaults=False`: absent options stay absent
    (argparse.SUPPRESS), to parse a second time over values parsed before."""
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        if "help" not in f.metadata:
            continue
        text = f.metadata["help"]
        extra = {k: v for k, v in f.metadata.items() if k not in ("help", HIDE_DEFAULT)}
        flag, default = f.name.replace("_", "-"), _default(f)
        given = default if defaults else argparse.SUPPRESS
        if hints[f.name] is bool:
            parser.add_argument(f"--no-{flag}" if default else f"--{flag}", dest=f.name, default=given,
                                action="store_false" if default else "store_true",
                                help=f"no {text}" if default else text, **extra)
            continue
        extra.setdefault("type", _option_type(hints[f.name]))
        hidden = default is None or default == "" or f.metadata.get(HIDE_DEFAULT)
        parser.add_argument(f"--{flag}", dest=f.name, default=given,
                            help=text if hidden else f"{text} (default: {default})", **extra)


def from_args(config: type[Config], args: argparse.Namespace, **overrides: Any) -> Config:
    """The dataclass `config` with every option `add_options` added read from `args` (the rest default),
    and `overrides` over them."""
    names = [f.name for f in dataclasses.fields(config) if "help" in f.metadata]  # type: ignore[arg-type]
    return config(**{**{name: getattr(args, name) for name in names}, **overrides})
