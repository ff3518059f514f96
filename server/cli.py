"""Subcommands this package adds to the `recallfix` console script."""

from __future__ import annotations

import argparse


def register(subcommands: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the `recallfix` parser."""
