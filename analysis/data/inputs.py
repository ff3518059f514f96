"""The inputs of a run, loaded and tokenised: the model, the facts (read, selected, split by subject or relation,
subsampled: `select_known`), the unknown-subject prompts and the neutral text (half for the fit's KL guard, half
held out)."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recallfix.patches import ComponentMap
from recallfix.patches.io import parse_dtype
from recallfix.patches.registry.load import load_causal_lm
from recallfix.patches.registry.models import resolve_model

from ..config import AnalysisConfig
from . import neutral_text
from .batching import encode, pad_id, subject_spans
from .clean import Cleaning
from .facts import (
    AnswerTokenError,
    Fact,
    FactsRead,
    SplitError,
    answer_token_id,
    answer_token_ids,
    assign_splits,
    load_facts,
    read_facts,
)
from .neutral_text import DEFAULT_NEUTRAL
from .nonce import fresh, nonce_facts, nonce_word
from .sets import resolve_facts

UNKNOWN_FILE = "unknown_facts.jsonl"  # looked for next to the model when --unknown is not given
NEUTRAL_FILE = "neutral.txt"


class AnalysisError(ValueError):
    """The analysis cannot run on these inputs (the message says which file and why)."""


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """auto: bfloat16 on a CUDA device that supports it, float32 otherwise; else the dtype of that name."""
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return parse_dtype(dtype)
    except ValueError as err:
        raise AnalysisError(f"--dtype: {err}, or auto") from None


def subject_group(f: Fact) -> str:
    """The bootstrap group of a fact: its relation and subject (the prompt itself when it has no subject)."""
    return json.dumps([f.relation, f.subject if f.subject is not None else f.prompt])


def subsample(facts: Sequence[Fact], max_facts: int | None, seed: int, *, by: str = "subject") -> list[Fact]:
    """Whole subjects in a seeded order until max_facts prompts (input order kept).

    by="relation" (the facts split by relation): the first subject of every relation comes first, whatever
    max_facts, so that no relation, and so no split, is left empty; then the rest in the same seeded order. Either
    way the kept subjects are a prefix of one order, so a second call with the size the first one returned keeps
    the same facts (how `recallfix compare --run` finds a run's facts)."""
    if max_facts is None or len(facts) <= max_facts:
        return list(facts)
    groups = sorted({subject_group(f) for f in facts},
                    key=lambda g: hashlib.sha256(f"{seed}\0{g}".encode()).hexdigest())
    size = {g: 0 for g in groups}
    relation: dict[str, str | None] = {}
    for f in facts:
        size[subject_group(f)] += 1
        relation[subject_group(f)] = f.relation
    keep, total = set(), 0
    if by == "relation":
        firsts: dict[str | None, str] = {}
        for g in groups:
            firsts.setdefault(relation[g], g)
        keep, total = set(firsts.values()), sum(size[g] for g in firsts.values())
    for g in groups:
        if total >= max_facts:
            break
        if g not in keep:
            keep.add(g)
            total += size[g]
    return [f for f in facts if subject_group(f) in keep]


def select_known(facts: str | Path | None, *, templates: str, relations: Sequence[str] | None, split_by: str,
                 seed: int, max_facts: int | None) -> FactsRead:
    """The facts of a run, in order, split and subsampled, and what the reader changed: what `load_inputs` uses
    and `recallfix compare --run` recomputes from the settings analysis.json records."""
    read = read_facts(resolve_facts(facts), templates=templates, relations=relations)
    try:
        split = assign_splits(read.facts, seed=seed, by=split_by)
    except SplitError as err:
        raise SplitError(f"{facts}: {err}") from None
    return FactsRead(subsample(split, max_facts, seed, by=split_by), read.cleaning)


@dataclass
class Prompts:
    facts: list[Fact]
    token_ids: list[list[int]]
    answers: torch.Tensor
    subjects: list[list[int] | None]
    dropped: int

    @property
    def groups(self) -> list[str]:
        return [subject_group(f) for f in self.facts]

    def rows(self, split: str) -> torch.Tensor:
        return torch.tensor([i for i, f in enumerate(self.facts) if f.split == split], dtype=torch.long)


def prepare(tokenizer: Any, facts: Sequence[Fact], source: str) -> Prompts:
    """Token ids, answer token and subject positions of each fact; facts without an answer token are dropped."""
    try:
        kept, answers = list(facts), answer_token_ids(tokenizer, facts)
    except AnswerTokenError:  # find the culprits one by one
        kept, answers = [], []
        for f in facts:
            try:
                answers.append(answer_token_id(tokenizer, f.prompt, f.answer))
            except AnswerTokenError:
                continue
            kept.append(f)
    if not kept:
        raise AnalysisError(f"{source}: no fact has an answer token with this tokenizer")
    return Prompts(
        facts=kept,
        token_ids=encode(tokenizer, [f.prompt for f in kept]),
        answers=torch.tensor(answers, dtype=torch.long),
        subjects=subject_spans(tokenizer, [f.prompt for f in kept], [f.subject for f in kept],
                               [f.template for f in kept]),
        dropped=len(facts) - len(kept),
    )


def read_neutral(path: Path | None, model_dir: Path) -> tuple[list[str], str]:
    """Neutral lines and where they came from: the given file, the model's neutral.txt, or the built-in set."""
    if path is None and (model_dir / NEUTRAL_FILE).is_file():
        path = model_dir / NEUTRAL_FILE
    if path is None:
        return list(DEFAULT_NEUTRAL), f"built-in ({neutral_text.__name__})"
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise AnalysisError(f"{path}: cannot read neutral text: {err}") from None
    if len(lines) < 2:
        raise AnalysisError(f"{path}: neutral text needs at least 2 non-empty lines, found {len(lines)}")
    return lines, str(path)


def split_neutral(lines: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
    """Half for the KL guard of the fit, half held out for the NLL check (seeded, by content)."""
    order = sorted(range(len(lines)), key=lambda i: hashlib.sha256(f"{seed}\0{i}\0{lines[i]}".encode()).hexdigest())
    half = len(order) // 2
    fit_rows, eval_rows = sorted(order[:half]), sorted(order[half:])
    return [lines[i] for i in fit_rows], [lines[i] for i in eval_rows]


def invented_unknown(facts: Sequence[Fact], per_template: int, seed: int) -> list[Fact]:
    """The unknown subjects when none are given: each template of `facts` filled with invented subjects,
    each given an invented answer. No model can know either, so accuracy there is ~0 by construction and what
    is read is the confidence (mean top-1 probability)."""
    made_up = nonce_facts(facts, per_template, seed, borrow=False)
    rng = random.Random(seed)
    taken = {w.lower() for f in (*facts, *made_up) for w in (f.subject or "", f.answer)}
    return [replace(f, answer=fresh(partial(nonce_word, rng, True), taken), split="test") for f in made_up]


@dataclass
class Loaded:
    """The model and every prompt set, tokenised."""

    model_dir: Path
    lm: nn.Module
    tokenizer: Any
    cmap: ComponentMap
    device: torch.device
    dtype: torch.dtype
    pad: int
    known: Prompts
    unknown: Prompts | None
    unknown_path: Path | None
    unknown_source: str
    neutral_fit: list[str]
    neutral_eval: list[str]
    neutral_source: str
    cleaning: list[Cleaning]  # what the reader changed in the facts files

    @property
    def final(self) -> int:
        return self.cmap.shape.num_layers - 1


def load_inputs(model: str | Path, facts: str | Path | None, unknown: str | Path | None, neutral: str | Path | None,
                config: AnalysisConfig) -> Loaded:
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    read = select_known(facts, templates=config.templates, relations=config.relations, split_by=config.split_by,
                        seed=config.seed, max_facts=config.max_facts)  # before the model: bad facts fail fast
    model_dir = resolve_model(model)
    lm, tokenizer = load_causal_lm(model_dir, dtype=dtype, device=device)
    known = prepare(tokenizer, read.facts, str(facts))
    for split in ("train", "dev", "test"):
        if len(known.rows(split)) == 0:
            raise AnalysisError(f"{facts}: the {split} split is empty ({len(known.facts)} usable facts); "
                                "give more facts or explicit splits")
    unknown_path = Path(unknown) if unknown is not None else None
    if unknown_path is None and (model_dir / UNKNOWN_FILE).is_file():
        unknown_path = model_dir / UNKNOWN_FILE
    if unknown_path is not None:
        unknown, unknown_source = prepare(tokenizer, load_facts(unknown_path), str(unknown_path)), str(unknown_path)
    else:
        seed = config.seed + 2  # the fit's nonce guard draws with seed and seed + 1
        made_up = invented_unknown([known.facts[i] for i in known.rows("test")], config.unknown_per_template, seed)
        unknown = prepare(tokenizer, made_up, "invented unknown subjects") if made_up else None
        unknown_source = (f"invented: the test split's templates, {config.unknown_per_template} invented subjects "
                          f"each (seed {seed})" if made_up else "none (the facts have no templates)")
    neutral_lines, neutral_source = read_neutral(Path(neutral) if neutral else None, model_dir)
    neutral_fit, neutral_eval = split_neutral(neutral_lines, config.seed)
    return Loaded(
        model_dir=model_dir, lm=lm, tokenizer=tokenizer, cmap=ComponentMap(lm), device=torch.device(device),
        dtype=dtype, pad=pad_id(tokenizer), known=known, unknown=unknown,
        unknown_path=unknown_path, unknown_source=unknown_source, neutral_fit=neutral_fit, neutral_eval=neutral_eval,
        neutral_source=neutral_source, cleaning=read.cleaning,
    )
