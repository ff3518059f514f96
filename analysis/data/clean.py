"""The reader's policy for unclean facts data: what it repairs, what it drops, and the count it keeps of each.

Upstream data sets carry small flaws that are not worth refusing a whole file over (the LRE relations of
Hernandez et al. have all four kinds below), so the reader normalises them and says so: one warning line per file,
and a `Cleaning` record per file that a run stores in analysis.json and states in its report.

    whitespace   a value with surrounding whitespace is stripped ("Bon Jovi " -> "Bon Jovi"): a trailing space
                 doubles the space before the answer, a subject's shifts every prompt built from it
    escapes      a literal JSON escape left in a value by double escaping ("Bras\\\\u00edlia" in the file, i.e. a
                 backslash, 'u' and four hex digits in the string) is decoded ("Brasília"); no real name holds one
    duplicates   an exact duplicate sample (after the two repairs above) is dropped: it would count one fact twice
                 and could land in two splits
    ambiguous    every sample of a question asked with more than one answer (a subject with several objects in a
                 relation file; a prompt with several answers in a JSONL file) is dropped: the analysis scores one
                 answer token per prompt, so all but one of the answers would count as wrong and the fit would pull
                 the same prompt two ways

Values that are not strings, empty after stripping, or missing are still refused (`facts.FactsFormatError`).
This module is pure: it neither reads files nor logs.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, fields
from typing import TypeVar

T = TypeVar("T")

# One or more literal \uXXXX escapes in a row: decoded together, so that a surrogate pair becomes one character.
_ESCAPES = re.compile(r"(?:\\u[0-9a-fA-F]{4})+")

KINDS = {
    "whitespace": "value(s) stripped of surrounding whitespace",
    "escapes": "value(s) with literal \\uXXXX escapes decoded",
    "duplicates": "exact duplicate sample(s) dropped",
    "ambiguous": "sample(s) dropped whose question has more than one answer",
}


@dataclass
class Cleaning:
    """What the reader changed in one file; the counts are of values (whitespace, escapes) or samples (the rest)."""

    file: str
    samples: int = 0  # samples read (a relation file's samples, a JSONL file's records)
    kept: int = 0  # samples left after dropping
    whitespace: int = 0
    escapes: int = 0
    duplicates: int = 0
    ambiguous: int = 0

    @property
    def changed(self) -> bool:
        return any(getattr(self, kind) for kind in KINDS)

    def summary(self) -> str:
        """The changes in words, e.g. '1 value(s) stripped of surrounding whitespace; 1 exact duplicate ...'."""
        return "; ".join(f"{getattr(self, kind)} {words}" for kind, words in KINDS.items() if getattr(self, kind))

    def line(self, where: str) -> str:
        """The one warning line of this file."""
        return f"{where}: normalised: {self.summary()} ({self.kept} of {self.samples} samples kept)"

    def as_dict(self) -> dict[str, int | str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def decode_escapes(value: str) -> str | None:
    """`value` with its literal \\uXXXX escapes decoded, or None when that leaves a lone surrogate (not text)."""
    decoded = _ESCAPES.sub(lambda m: json.loads(f'"{m.group(0)}"'), value)
    if any(0xD800 <= ord(c) <= 0xDFFF for c in decoded):
        return None
    return decoded


def normalise_text(value: str, tally: Cleaning) -> str | None:
    """`value` repaired (escapes decoded, surrounding whitespace stripped), each repair counted in `tally`; None
    when the escapes do not decode to text. Emptiness is the caller's to judge."""
    decoded = decode_escapes(value)
    if decoded is None:
        return None
    if decoded != value:
        tally.escapes += 1
    stripped = decoded.strip()
    if stripped != decoded:
        tally.whitespace += 1
    return stripped


def drop_duplicates(items: Sequence[T], key: Callable[[T], Hashable]) -> tuple[list[T], int]:
    """The first item of each `key`, in order, and how many items were dropped."""
    seen: set[Hashable] = set()
    kept = []
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            kept.append(item)
    return kept, len(items) - len(kept)


def drop_ambiguous(items: Sequence[T], question: Callable[[T], Hashable],
                   answer: Callable[[T], Hashable]) -> tuple[list[T], int]:
    """The items whose question has one answer among all the items, in order, and how many were dropped."""
    answers: dict[Hashable, set[Hashable]] = defaultdict(set)
    for item in items:
        answers[question(item)].add(answer(item))
    kept = [item for item in items if len(answers[question(item)]) == 1]
    return kept, len(items) - len(kept)
