"""The named facts sets packaged with recallfix, and the one resolver every command's `--facts` goes through.

    shipped   the project's own set (`shipped/`): the default
    lre       18 factual relations of Hernandez et al., "Linearity of Relation Decoding in Transformer Language
              Models" (ICLR 2024), vendored unchanged with their MIT licence (`lre/`, its README)

A `--facts` value that is one of these names is that set; anything else is a path (a file or folder of facts), so
a folder that happens to be called `lre` is given as `./lre`.
"""

from __future__ import annotations

from pathlib import Path

from .facts import shipped_facts_dir

DEFAULT_FACTS = "shipped"
FACTS_SETS: dict[str, str] = {
    "shipped": "the project's own facts",
    "lre": "18 factual relations of the LRE benchmark (Hernandez et al., ICLR 2024; MIT licence)",
}
FACTS_HELP = ("facts: a named set (" + "; ".join(f"{name}: {what}" for name, what in FACTS_SETS.items())
              + ") or a facts file (.jsonl or relation .json) or folder (./NAME for a folder called like a set)")


def lre_facts_dir() -> Path:
    """The folder of the vendored LRE relations (package data ``lre/*.json``, beside LICENSE and README.md)."""
    return Path(__file__).resolve().with_name("lre")


def resolve_facts(facts: str | Path | None) -> Path:
    """The file or folder `facts` names: a named set's folder (a str that is a name of `FACTS_SETS`), the shipped
    set when None, else the path itself. A `Path` is always a path."""
    if facts is None:
        facts = DEFAULT_FACTS
    if isinstance(facts, str) and facts in FACTS_SETS:
        return shipped_facts_dir() if facts == "shipped" else lre_facts_dir()
    return Path(facts)
