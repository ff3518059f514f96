"""Factual-recall prompts: the shipped facts set, its loader, splits (`splits`) and answer tokens.

The analysis asks a causal LM to complete prompts such as "The capital of France is" and looks at how
the final layer treats the correct answer's first token.  Everything that decides *which* prompts and
*which* answer token are used lives here, so that every experiment (and every patch's provenance
record) sees exactly the same facts.

Two on-disk formats are read:

* JSONL, one fact per line: ``{"prompt": ..., "answer": ..., "subject"?, "relation"?, "split"?}``;
* the relation JSON format of Hernandez et al., "Linearity of Relation Decoding in Transformer LMs":
  ``{"name": ..., "prompt_templates": ["... {} ..."], "prompt_templates_zs"?: [...], "samples": [{"subject": ...,
  "object": ...}]}``, one relation per file, each sample x template becoming one :class:`Fact`.

What the reader repairs or drops in unclean data, and how it counts that, is `clean`'s policy. Prompts end right
before the answer; the answer follows after one space.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .clean import Cleaning, drop_ambiguous, drop_duplicates, normalise_text
from .splits import SPLIT_BY, SPLITS, SplitError, assign_splits  # re-exported: the facts' public API

if TYPE_CHECKING:  # pragma: no cover - typing only; keeps this module importable without transformers
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "SPLITS",
    "SPLIT_BY",
    "TEMPLATE_KEYS",
    "AnswerTokenError",
    "Fact",
    "FactsFormatError",
    "FactsRead",
    "FactsSelectionError",
    "SplitError",
    "answer_token_id",
    "answer_token_ids",
    "assign_splits",
    "dataset_sha256",
    "load_facts",
    "load_shipped_facts",
    "read_facts",
    "save_facts_jsonl",
    "shipped_facts_dir",
]

TEMPLATE_KEYS: dict[str, str] = {"default": "prompt_templates", "zs": "prompt_templates_zs"}
"""Which templates of a relation file make its prompts (`read_facts`'s ``templates``)."""

_FACT_SUFFIXES = (".json", ".jsonl")

log = logging.getLogger(__name__)
T = TypeVar("T")


class FactsFormatError(ValueError):
    """A facts file is malformed; the message names the file, the line or JSON path, and the field."""


class FactsSelectionError(ValueError):
    """The facts asked for are not there (a relation name, a kind of templates); the message lists what is."""


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


@dataclass
class FactsRead:
    """The facts read, and what the reader changed in each file that needed it (`clean`)."""

    facts: list[Fact]
    cleaning: list[Cleaning]


@dataclass
class _Part:
    facts: list[Fact]
    cleaning: Cleaning


def read_facts(path: str | Path, *, templates: str = "default",
               relations: Sequence[str] | None = None) -> FactsRead:
    """Read facts from a JSONL file, a relation JSON file, or a folder of such files, normalised (`clean`).

    Folders are read non-recursively, ``*.json`` and ``*.jsonl`` only, sorted by file name so that the
    resulting order (and thus :func:`dataset_sha256`) does not depend on the file system. ``templates``: which
    templates of a relation file make its prompts (``default``: ``prompt_templates``; ``zs``: the zero-shot
    ``prompt_templates_zs``). ``relations``: only the facts of these relations (by name, as the facts carry it).
    Every file the reader changed is logged as one warning line and listed in `FactsRead.cleaning`.
    Raises :class:`FactsFormatError` naming the file, line/JSON path and field on bad input, and
    :class:`FactsSelectionError` for a relation the facts do not have.
    """
    if templates not in TEMPLATE_KEYS:
        raise FactsSelectionError(f"templates must be one of {', '.join(TEMPLATE_KEYS)}, got {templates!r}")
    p = Path(path)
    if not p.exists():
        raise FactsFormatError(f"{p}: no such file or directory")
    files = [p]
    if p.is_dir():
        files = sorted((c for c in p.iterdir() if c.is_file() and c.suffix in _FACT_SUFFIXES), key=lambda c: c.name)
        if not files:
            raise FactsFormatError(f"{p}: folder contains no .json or .jsonl facts files")
    wanted = set(relations) if relations else None
    seen: set[str] = set()
    parts = {f: _load_file(f, templates, wanted, seen) for f in files}
    if wanted is not None and wanted - seen:
        missing = ", ".join(repr(r) for r in relations or () if r not in seen)
        raise FactsSelectionError(f"{p}: no relation named {missing}; its relations: "
                                  + (", ".join(repr(r) for r in sorted(seen)) or "none (no fact names one)"))
    facts = [f for part in parts.values() if part for f in part.facts]
    if not facts:
        raise FactsFormatError(f"{p}: no facts left after normalisation")
    cleaning = []
    for f, part in parts.items():
        if part and part.cleaning.changed:
            log.warning(part.cleaning.line(str(f)))
            cleaning.append(part.cleaning)
    return FactsRead(facts, cleaning)


def load_facts(path: str | Path, *, templates: str = "default", relations: Sequence[str] | None = None) -> list[Fact]:
    """The facts of :func:`read_facts` (the same arguments), without its record of the changes."""
    return read_facts(path, templates=templates, relations=relations).facts


def _load_file(p: Path, templates: str, wanted: set[str] | None, seen: set[str]) -> _Part | None:
    """One file's facts (None: its relation is not wanted); the relation names found are added to `seen`."""
    if p.suffix == ".jsonl":
        if templates != "default":
            raise FactsFormatError(f"{p}: a JSONL file has no zero-shot templates (--templates {templates} reads "
                                   f"'{TEMPLATE_KEYS[templates]}' of relation JSON files)")
        return _load_jsonl(p, wanted, seen)
    if p.suffix == ".json":
        return _load_relation_json(p, TEMPLATE_KEYS[templates], wanted, seen)
    raise FactsFormatError(f"{p}: unsupported file type {p.suffix!r} (expected .json or .jsonl)")


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FactsFormatError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise FactsFormatError(f"{p}: cannot read file ({e.strerror})") from e


def _check_text(value: Any, where: str, field: str, tally: Cleaning, *, required: bool) -> str | None:
    """One string field, normalised (`clean.normalise_text`, counted in `tally`); what cannot be is refused."""
    if value is None:
        if required:
            raise FactsFormatError(f"{where}: missing required field '{field}'")
        return None
    if not isinstance(value, str):
        raise FactsFormatError(
            f"{where}: field '{field}' must be a non-empty string, got {type(value).__name__}"
        )
    text = normalise_text(value, tally)
    if text is None:
        raise FactsFormatError(f"{where}: field '{field}' holds a \\u escape that is not a character: {value!r}")
    if not text:
        raise FactsFormatError(f"{where}: field '{field}' must be a non-empty string")
    return text


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


def _drop(rows: list[T], tally: Cleaning, question: Callable[[T], Hashable], answer: Callable[[T], Hashable],
          where: Path) -> list[T]:
    """The rows left after dropping duplicates and ambiguous questions, counted in `tally`."""
    tally.samples = len(rows)
    rows, tally.duplicates = drop_duplicates(rows, key=lambda r: r)
    rows, tally.ambiguous = drop_ambiguous(rows, question, answer)
    tally.kept = len(rows)
    if not rows:
        raise FactsFormatError(f"{where}: no sample left after normalisation ({tally.summary()})")
    return rows


def _load_jsonl(p: Path, wanted: set[str] | None, seen: set[str]) -> _Part:
    facts: list[Fact] = []
    tally = Cleaning(p.name)
    for lineno, line in enumerate(_read_text(p).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        rec = _json_object(line, where, "record must be a JSON object")
        mine = Cleaning(p.name)  # counted into the file's tally only when the record is kept
        fields = {name: _check_text(rec.get(name), where, name, mine, required=name in ("prompt", "answer"))
                  for name in ("prompt", "answer", "subject", "relation", "template")}
        split = _check_split(rec.get("split"), where)
        if fields["relation"] is not None:
            seen.add(fields["relation"])
        if wanted is not None and fields["relation"] not in wanted:
            continue
        tally.whitespace, tally.escapes = tally.whitespace + mine.whitespace, tally.escapes + mine.escapes
        facts.append(Fact(split=split, **fields))  # type: ignore[arg-type]  # prompt, answer: required above
    if not facts and wanted is None:
        raise FactsFormatError(f"{p}: empty file, no facts")
    if not facts:
        return _Part([], tally)
    return _Part(_drop(facts, tally, lambda f: f.prompt, lambda f: f.answer, p), tally)


def _check_template(t: Any, where: str, tally: Cleaning) -> str:
    if not isinstance(t, str):
        raise FactsFormatError(f"{where}: must be a non-empty string")
    text = normalise_text(t, tally)
    if not text:
        raise FactsFormatError(f"{where}: must be a non-empty string")
    if text.count("{}") != 1 or "{" in text.replace("{}", "") or "}" in text.replace("{}", ""):
        raise FactsFormatError(
            f"{where}: template must contain exactly one '{{}}' and no other braces: {t!r}"
        )
    return text


def _load_relation_json(p: Path, key: str, wanted: set[str] | None, seen: set[str]) -> _Part | None:
    text = _read_text(p)
    if not text.strip():
        raise FactsFormatError(f"{p}: empty file, no facts")
    doc = _json_object(text, str(p), "top level must be a relation object", file=p)
    tally = Cleaning(p.name)
    name = _check_text(doc.get("name"), str(p), "name", tally, required=True)
    assert name is not None
    seen.add(name)
    if wanted is not None and name not in wanted:
        return None

    templates = doc.get(key)
    if templates is None and key != TEMPLATE_KEYS["default"]:
        raise FactsFormatError(f"{p}: no field '{key}': this relation has no zero-shot templates")
    if not isinstance(templates, list) or not templates:
        raise FactsFormatError(f"{p}: field '{key}' must be a non-empty list of strings")
    templates = [_check_template(t, f"{p}: {key}[{i}]", tally) for i, t in enumerate(templates)]

    samples = doc.get("samples")
    if not isinstance(samples, list) or not samples:
        raise FactsFormatError(f"{p}: field 'samples' must be a non-empty list")

    rows: list[tuple[str, str, str | None]] = []
    for i, s in enumerate(samples):
        where = f"{p}: samples[{i}]"
        if not isinstance(s, dict):
            raise FactsFormatError(f"{where}: sample must be a JSON object, got {type(s).__name__}")
        subject = _check_text(s.get("subject"), where, "subject", tally, required=True)
        obj = _check_text(s.get("object"), where, "object", tally, required=True)
        assert subject is not None and obj is not None
        rows.append((subject, obj, _check_split(s.get("split"), where)))
    rows = _drop(rows, tally, lambda r: r[0], lambda r: r[1], p)
    facts = [Fact(prompt=t.format(subject), answer=obj, subject=subject, relation=name, split=split, template=t)
             for subject, obj, split in rows for t in templates]
    return _Part(facts, tally)


def save_facts_jsonl(facts: Iterable[Fact], path: str | Path) -> None:
    """Write facts as JSONL (readable by :func:`load_facts`), e.g. to freeze a split next to a run."""
    with Path(path).open("w", encoding="utf-8") as fh:
        for f in facts:
            rec = {k: v for k, v in asdict(f).items() if v is not None}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------------
# Provenance (the splits: `splits`)
# --------------------------------------------------------------------------------------------------


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
