"""Factual-recall prompts: the shipped facts set, its loader, splits and answer tokens.

The analysis asks a causal LM to complete prompts such as "The capital of France is" and looks at how
the final layer treats the correct answer's first token.  Everything that decides *which* prompts and
*which* answer token are used lives here, so that every experiment (and every patch's provenance
record) sees exactly the same facts.

Two on-disk formats are read:

* JSONL, one fact per line: ``{"prompt": ..., "answer": ..., "subject"?, "relation"?, "split"?}``;
* the relation JSON format of Hernandez et al., "Linearity of Relation Decoding in Transformer LMs":
  ``{"name": ..., "prompt_templates": ["... {} ..."], "samples": [{"subject": ..., "object": ...}]}``,
  one relation per file, each sample x template becoming one :class:`Fact`.

Prompts end right before the answer; the answer follows after one space.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only; keeps this module importable without transformers
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "SPLITS",
    "AnswerTokenError",
    "Fact",
    "FactsFormatError",
    "answer_token_id",
    "answer_token_ids",
    "assign_splits",
    "dataset_sha256",
    "load_facts",
    "load_shipped_facts",
    "save_facts_jsonl",
    "shipped_facts_dir",
]

SPLITS: tuple[str, ...] = ("train", "dev", "test")
"""Allowed values of :attr:`Fact.split`, in the order :func:`assign_splits` fills them."""

_FACT_SUFFIXES = (".json", ".jsonl")


class FactsFormatError(ValueError):
    """A facts file is malformed; the message names the file, the line or JSON path, and the field."""


class AnswerTokenError(ValueError):
    """The answer's first token cannot be determined with this tokenizer."""


@dataclass(frozen=True)
class Fact:
    """One factual-recall prompt and the answer that should follow it (after a space).

    ``subject`` and ``relation`` group the prompts that ask for the same fact, so that splits never leak
    one fact across train/test through a different wording; ``template`` records that wording.
    """

    prompt: str
    answer: str
    subject: str | None = None
    relation: str | None = None
    split: str | None = None
    template: str | None = None


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def shipped_facts_dir() -> Path:
    """The folder of the facts set shipped with the package (package data ``shipped/*.json``)."""
    return Path(__file__).resolve().with_name("shipped")


def load_shipped_facts() -> list[Fact]:
    """All facts of the shipped set, in a deterministic order (files sorted by name)."""
    return load_facts(shipped_facts_dir())


def load_facts(path: str | Path) -> list[Fact]:
    """Read facts from a JSONL file, a relation JSON file, or a folder of such files.

    Folders are read non-recursively, ``*.json`` and ``*.jsonl`` only, sorted by file name so that the
    resulting order (and thus :func:`dataset_sha256`) does not depend on the file system.
    Raises :class:`FactsFormatError` naming the file, line/JSON path and field on any bad input.
    """
    p = Path(path)
    if not p.exists():
        raise FactsFormatError(f"{p}: no such file or directory")
    if p.is_dir():
        files = sorted(
            (c for c in p.iterdir() if c.is_file() and c.suffix in _FACT_SUFFIXES), key=lambda c: c.name
        )
        if not files:
            raise FactsFormatError(f"{p}: folder contains no .json or .jsonl facts files")
        facts: list[Fact] = []
        for f in files:
            facts.extend(_load_file(f))
        return facts
    return _load_file(p)


def _load_file(p: Path) -> list[Fact]:
    if p.suffix == ".jsonl":
        return _load_jsonl(p)
    if p.suffix == ".json":
        return _load_relation_json(p)
    raise FactsFormatError(f"{p}: unsupported file type {p.suffix!r} (expected .json or .jsonl)")


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FactsFormatError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise FactsFormatError(f"{p}: cannot read file ({e.strerror})") from e


def _check_text(value: Any, where: str, field: str, *, required: bool, kind: str) -> str | None:
    """Validate one string field; ``kind`` is 'prompt', 'answer' or 'label' (what may surround it)."""
    if value is None:
        if required:
            raise FactsFormatError(f"{where}: missing required field '{field}'")
        return None
    if not isinstance(value, str):
        raise FactsFormatError(
            f"{where}: field '{field}' must be a non-empty string, got {type(value).__name__}"
        )
    if not value.strip():
        raise FactsFormatError(f"{where}: field '{field}' must be a non-empty string")
    if kind == "prompt" and value != value.rstrip():
        raise FactsFormatError(
            f"{where}: field '{field}' must not end with whitespace (the answer is appended after one space)"
        )
    if kind == "answer" and value != value.strip():
        raise FactsFormatError(f"{where}: field '{field}' must not start or end with whitespace")
    return value


def _check_split(value: Any, where: str, field: str = "split") -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in SPLITS:
        raise FactsFormatError(f"{where}: field '{field}' must be one of {', '.join(SPLITS)}, got {value!r}")
    return value


def _json_object(text: str, where: str, what: str, *, file: Path | None = None) -> dict[str, Any]:
    """`text` parsed as one JSON object, or FactsFormatError at `where` (at the line, for a whole `file`)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        at = f"{file}:{e.lineno}" if file is not None else where
        raise FactsFormatError(f"{at}: invalid JSON: {e.msg} (column {e.colno})") from e
    if not isinstance(value, dict):
        raise FactsFormatError(f"{where}: {what}, got {type(value).__name__}")
    return value


def _load_jsonl(p: Path) -> list[Fact]:
    facts: list[Fact] = []
    for lineno, line in enumerate(_read_text(p).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        rec = _json_object(line, where, "record must be a JSON object")
        prompt = _check_text(rec.get("prompt"), where, "prompt", required=True, kind="prompt")
        answer = _check_text(rec.get("answer"), where, "answer", required=True, kind="answer")
        assert prompt is not None and answer is not None  # required=True guarantees it
        facts.append(
            Fact(
                prompt=prompt,
                answer=answer,
                subject=_check_text(rec.get("subject"), where, "subject", required=False, kind="label"),
                relation=_check_text(rec.get("relation"), where, "relation", required=False, kind="label"),
                split=_check_split(rec.get("split"), where),
                template=_check_text(rec.get("template"), where, "template", required=False, kind="label"),
            )
        )
    if not facts:
        raise FactsFormatError(f"{p}: empty file, no facts")
    return facts


def _check_template(t: Any, where: str) -> str:
    if not isinstance(t, str) or not t.strip():
        raise FactsFormatError(f"{where}: must be a non-empty string")
    if t.count("{}") != 1 or "{" in t.replace("{}", "") or "}" in t.replace("{}", ""):
        raise FactsFormatError(
            f"{where}: template must contain exactly one '{{}}' and no other braces: {t!r}"
        )
    if t != t.rstrip():
        raise FactsFormatError(
            f"{where}: template must not end with whitespace (the answer is appended after one space)"
        )
    return t


def _load_relation_json(p: Path) -> list[Fact]:
    text = _read_text(p)
    if not text.strip():
        raise FactsFormatError(f"{p}: empty file, no facts")
    doc = _json_object(text, str(p), "top level must be a relation object", file=p)
    name = _check_text(doc.get("name"), str(p), "name", required=True, kind="label")
    assert name is not None

    templates = doc.get("prompt_templates")
    if not isinstance(templates, list) or not templates:
        raise FactsFormatError(f"{p}: field 'prompt_templates' must be a non-empty list of strings")
    templates = [_check_template(t, f"{p}: prompt_templates[{i}]") for i, t in enumerate(templates)]

    samples = doc.get("samples")
    if not isinstance(samples, list) or not samples:
        raise FactsFormatError(f"{p}: field 'samples' must be a non-empty list")

    facts: list[Fact] = []
    for i, s in enumerate(samples):
        where = f"{p}: samples[{i}]"
        if not isinstance(s, dict):
            raise FactsFormatError(f"{where}: sample must be a JSON object, got {type(s).__name__}")
        subject = _check_text(s.get("subject"), where, "subject", required=True, kind="label")
        obj = _check_text(s.get("object"), where, "object", required=True, kind="answer")
        split = _check_split(s.get("split"), where)
        assert subject is not None and obj is not None
        for t in templates:
            facts.append(
                Fact(
                    prompt=t.format(subject),
                    answer=obj,
                    subject=subject,
                    relation=name,
                    split=split,
                    template=t,
                )
            )
    return facts


def save_facts_jsonl(facts: Iterable[Fact], path: str | Path) -> None:
    """Write facts as JSONL (readable by :func:`load_facts`), e.g. to freeze a split next to a run."""
    with Path(path).open("w", encoding="utf-8") as fh:
        for f in facts:
            rec = {k: v for k, v in asdict(f).items() if v is not None}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------------
# Splits and provenance
# --------------------------------------------------------------------------------------------------


def _stable_unit(seed: int, key: str) -> str:
    """A platform- and process-independent sort key (``hash()`` is salted per process)."""
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def _group_key(f: Fact) -> str:
    """Prompts asking for the same fact share a key; facts without a subject stand alone."""
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


def assign_splits(
    facts: Sequence[Fact], *, seed: int = 0, fractions: Sequence[float] = (0.6, 0.2, 0.2)
) -> list[Fact]:
    """Give every fact a train/dev/test split, deterministically and without leakage.

    All prompts of one (relation, subject) land in the same split, so a test fact is never seen during
    training under another template.  Within each relation the groups are ordered by a SHA-256 of
    (seed, group) and cut by ``fractions`` (largest remainder), so each relation is split in the given
    proportions.  A ``split`` already present in the input is kept; the other prompts of that group follow
    its (most common) explicit split.  The input order is preserved.
    """
    if len(fractions) != len(SPLITS):
        raise ValueError(
            f"fractions must have {len(SPLITS)} entries (train, dev, test), got {len(fractions)}"
        )
    if any(fr < 0 for fr in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")

    keys = [_group_key(f) for f in facts]
    explicit: dict[str, Counter[str]] = defaultdict(Counter)
    relation_of: dict[str, str | None] = {}
    for f, k in zip(facts, keys, strict=True):
        relation_of.setdefault(k, f.relation)
        if f.split is not None:
            explicit[k][f.split] += 1

    group_split: dict[str, str] = {}
    for k, counts in explicit.items():
        group_split[k] = max(SPLITS, key=lambda s: (counts[s], -SPLITS.index(s)))

    free_by_relation: dict[str | None, list[str]] = defaultdict(list)
    for k, rel in relation_of.items():
        if k not in group_split:
            free_by_relation[rel].append(k)
    for groups in free_by_relation.values():
        groups.sort(key=lambda k: _stable_unit(seed, k))
        start = 0
        for split, count in zip(SPLITS, _quota(len(groups), fractions), strict=True):
            for k in groups[start : start + count]:
                group_split[k] = split
            start += count

    return [
        f if f.split is not None else replace(f, split=group_split[k])
        for f, k in zip(facts, keys, strict=True)
    ]


def dataset_sha256(facts: Iterable[Fact]) -> str:
    """SHA-256 of the facts list (all fields, in order), recorded in a patch's provenance.

    Canonical JSON (sorted keys, no whitespace, UTF-8) makes it independent of Python version and
    platform; reordering, editing or re-splitting the facts changes it.
    """
    h = hashlib.sha256()
    for f in facts:
        h.update(json.dumps(asdict(f), sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Answer tokens
# --------------------------------------------------------------------------------------------------


def _ids(enc: Any) -> list[int]:
    return list(enc["input_ids"])


def _join(prompt: str, answer: str) -> str:
    return f"{prompt} {answer}"


def _resolve(
    tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, p_ids: list[int], full_ids: list[int]
) -> int:
    """Pick the first answer token from the two tokenizations, falling back if the boundary merged."""
    n = len(p_ids)
    if full_ids[:n] == p_ids and len(full_ids) > n:
        return full_ids[n]
    # The tokenizer merged across the prompt/answer boundary (or changed the prompt's tokens): tokenize the
    # answer with its leading space on its own, skipping pieces that are only whitespace (e.g. a
    # SentencePiece dummy prefix), which is what the model emits first when it starts a new word.
    alone = _ids(tokenizer(" " + answer, add_special_tokens=False))
    for tid in alone:
        if tokenizer.decode([tid]).strip():
            return tid
    raise AnswerTokenError(f"answer {answer!r} yields no token after prompt {prompt!r} with this tokenizer")


def answer_token_id(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> int:
    """The token the model must emit right after ``prompt`` to start `` answer`` (with its leading space).

    Tokenizes ``prompt`` and ``prompt + " " + answer`` with the model's own tokenizer (no special
    tokens); when the prompt's tokens are a prefix of the joint ones, the next joint token is the answer's
    first token as it really continues the prompt (usually a space-prefixed word piece such as "ĠParis";
    with tokenizers that split the space off, e.g. SentencePiece before digits, it is the bare space piece,
    since that is what the model must emit first).
    If the tokenizer merges across the boundary, falls back to the first non-whitespace token of
    ``" " + answer``.  Raises :class:`AnswerTokenError` if the answer yields no token.
    """
    if not answer.strip():
        raise AnswerTokenError(f"answer {answer!r} is empty")
    p_ids = _ids(tokenizer(prompt, add_special_tokens=False))
    full_ids = _ids(tokenizer(_join(prompt, answer), add_special_tokens=False))
    return _resolve(tokenizer, prompt, answer, p_ids, full_ids)


def answer_token_ids(tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact]) -> list[int]:
    """Batch version of :func:`answer_token_id` for many facts (two batched tokenizer calls)."""
    if not facts:
        return []
    for f in facts:
        if not f.answer.strip():
            raise AnswerTokenError(f"answer {f.answer!r} is empty (prompt {f.prompt!r})")
    p_all = tokenizer([f.prompt for f in facts], add_special_tokens=False)["input_ids"]
    full_all = tokenizer([_join(f.prompt, f.answer) for f in facts], add_special_tokens=False)["input_ids"]
    return [
        _resolve(tokenizer, f.prompt, f.answer, list(p), list(full))
        for f, p, full in zip(facts, p_all, full_all, strict=True)
    ]
