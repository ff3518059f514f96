"""Train/dev/test splits of facts: deterministic, seeded, and without leakage across splits.

Generic over anything shaped like `facts.Fact` (a dataclass with prompt, answer, subject, relation and split), so
that `facts` can re-export it without an import cycle.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol, TypeVar

SPLITS: tuple[str, ...] = ("train", "dev", "test")
"""Allowed values of `Fact.split`, in the order :func:`assign_splits` fills them."""

SPLIT_BY: tuple[str, ...] = ("subject", "relation")
"""What :func:`assign_splits` keeps together in one split: each subject of a relation, or each whole relation."""


class SplitError(ValueError):
    """The facts cannot be split as asked (e.g. by relation, with fewer relations than splits)."""


class Splittable(Protocol):
    @property
    def prompt(self) -> str: ...
    @property
    def answer(self) -> str: ...
    @property
    def subject(self) -> str | None: ...
    @property
    def relation(self) -> str | None: ...
    @property
    def split(self) -> str | None: ...


F = TypeVar("F", bound=Splittable)


def _stable_unit(seed: int, key: str) -> str:
    """A platform- and process-independent sort key (``hash()`` is salted per process)."""
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def _group_key(f: Splittable, by: str = "subject") -> str:
    """Prompts that must share a split share a key: by subject, the prompts asking for the same fact (facts
    without a subject stand alone); by relation, every prompt of the relation."""
    if by == "relation":
        return json.dumps(["r", f.relation], ensure_ascii=False)
    if f.subject is not None:
        return json.dumps(["s", f.relation, f.subject], ensure_ascii=False)
    return json.dumps(["p", f.relation, f.prompt, f.answer], ensure_ascii=False)


def _quota(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` items by ``fractions`` with largest remainders, so counts sum to exactly ``n``."""
    raw = [n * fr for fr in fractions]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _quota_each(n: int, fractions: Sequence[float]) -> list[int]:
    """`_quota`, then every split with a share takes one item from the largest where it got none: with few
    items (relations) the largest remainders alone can leave the test split empty (3 by 60/20/20: 2, 1, 0)."""
    counts = _quota(n, fractions)
    for i, fr in enumerate(fractions):
        donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
        if fr > 0 and counts[i] == 0 and counts[donor] > 1:
            counts[i], counts[donor] = 1, counts[donor] - 1
    return counts


def assign_splits(
    facts: Sequence[F], *, seed: int = 0, fractions: Sequence[float] = (0.6, 0.2, 0.2), by: str = "subject"
) -> list[F]:
    """Give every fact a train/dev/test split, deterministically and without leakage.

    ``by="subject"``: all prompts of one (relation, subject) land in the same split, so a test fact is never
    seen during training under another template.  Within each relation the groups are ordered by a SHA-256 of
    (seed, group) and cut by ``fractions`` (largest remainder), so each relation is split in the given
    proportions.  ``by="relation"``: whole relations are the groups, ordered the same way and cut by
    ``fractions`` of their number, every split getting at least one, so the test split holds relations that
    train and dev never saw; it needs a relation on every fact and at least one relation per split
    (:class:`SplitError`).  A ``split`` already present in the input is kept; the other prompts of that group
    follow its (most common) explicit split.  The input order is preserved.
    """
    if len(fractions) != len(SPLITS):
        raise ValueError(
            f"fractions must have {len(SPLITS)} entries (train, dev, test), got {len(fractions)}"
        )
    if any(fr < 0 for fr in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    if by not in SPLIT_BY:
        raise ValueError(f"split by must be one of {', '.join(SPLIT_BY)}, got {by!r}")
    if by == "relation":
        loose = [f for f in facts if f.relation is None]
        if loose:
            raise SplitError(f"split by relation: {len(loose)} facts carry no relation (the first: "
                             f"{loose[0].prompt!r})")
        names = sorted({f.relation for f in facts if f.relation is not None})
        if len(names) < len(SPLITS):
            raise SplitError(f"split by relation needs at least {len(SPLITS)} relations (one for each of "
                             f"{', '.join(SPLITS)}), the facts have {len(names)}: {', '.join(names)}")

    keys = [_group_key(f, by) for f in facts]
    explicit: dict[str, Counter[str]] = defaultdict(Counter)
    relation_of: dict[str, str | None] = {}
    for f, k in zip(facts, keys, strict=True):
        relation_of.setdefault(k, f.relation)
        if f.split is not None:
            explicit[k][f.split] += 1

    group_split: dict[str, str] = {}
    for k, counts in explicit.items():
        group_split[k] = max(SPLITS, key=lambda s: (counts[s], -SPLITS.index(s)))

    # By subject each relation is cut on its own; by relation the relations are cut together.
    free_by_relation: dict[str | None, list[str]] = defaultdict(list)
    for k, rel in relation_of.items():
        if k not in group_split:
            free_by_relation[rel if by == "subject" else None].append(k)
    quota = _quota if by == "subject" else _quota_each
    for groups in free_by_relation.values():
        groups.sort(key=lambda k: _stable_unit(seed, k))
        start = 0
        for split, count in zip(SPLITS, quota(len(groups), fractions), strict=True):
            for k in groups[start : start + count]:
                group_split[k] = split
            start += count

    return [
        f if f.split is not None else replace(f, split=group_split[k])  # type: ignore[type-var]  # a dataclass
        for f, k in zip(facts, keys, strict=True)
    ]
