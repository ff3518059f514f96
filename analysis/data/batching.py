"""Tokenising prompts and cutting them into padded batches.

Batches are *right*-padded with an attention mask. The analysis never generates, so nothing needs
the last token at a fixed column, and right padding keeps every real token at its natural position:
models with absolute position embeddings (GPT-2) then give the same numbers batched as one prompt at a
time, with no position_ids to pass (tested per architecture). `last` is each row's last real token.
Rows are sorted by length so that batches carry little padding; `index` maps them back.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Batch:
    index: torch.Tensor  # [b] row of each prompt in the caller's list
    input_ids: torch.Tensor  # [b, seq]
    attention_mask: torch.Tensor  # [b, seq]
    last: torch.Tensor  # [b] position of the last real token

    def __len__(self) -> int:
        return int(self.index.shape[0])


def pad_id(tokenizer: object) -> int:
    """Any id will do (padded positions are masked and never read); prefer the tokenizer's own."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def encode(tokenizer: object, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text with the tokenizer's own special tokens (e.g. a Llama <s>)."""
    if not texts:
        return []
    ids = tokenizer(list(texts))["input_ids"]  # type: ignore[operator]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise ValueError(f"text {texts[empty[0]]!r} encodes to no tokens")
    return [list(row) for row in ids]


def batch_rows(token_ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """The rows of each batch `batches` makes: at most `batch_size`, longest first (little padding)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(token_ids)), key=lambda i: (-len(token_ids[i]), i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def batches(
    token_ids: Sequence[Sequence[int]], batch_size: int, pad: int, device: str | torch.device = "cpu"
) -> Iterator[Batch]:
    """Right-padded batches of at most `batch_size` rows, longest rows first."""
    for rows in batch_rows(token_ids, batch_size):
        width = max(len(token_ids[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(token_ids[i])
            ids[r, :n] = torch.tensor(token_ids[i], dtype=torch.long)
            mask[r, :n] = 1
        yield Batch(
            index=torch.tensor(rows, dtype=torch.long),
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            last=(mask.sum(dim=1) - 1).to(device),
        )


def num_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def subject_token_mask(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[bool]:
    """Which tokens overlap the character span [start, end) of the subject (specials have (0, 0))."""
    return [s < end and e > start and e > s for s, e in offsets]


def subject_spans(tokenizer: object, prompts: Sequence[str], subjects: Sequence[str | None],
                  templates: Sequence[str | None]) -> list[list[int] | None]:
    """Token positions of the subject in each prompt, or None where it cannot be located.

    The subject's character span comes from the template ('{}' marks it) or else from its first
    occurrence in the prompt; token positions from the fast tokenizer's offsets, computed on the same
    encoding as `encode` (special tokens included), so positions index the model's input directly.
    """
    if not getattr(tokenizer, "is_fast", False):
        return [None] * len(prompts)
    enc = tokenizer(list(prompts), return_offsets_mapping=True)  # type: ignore[operator]
    out: list[list[int] | None] = []
    for prompt, subject, template, offsets in zip(prompts, subjects, templates, enc["offset_mapping"], strict=True):
        if not subject:
            out.append(None)
            continue
        start = template.index("{}") if template and template.format(subject) == prompt else prompt.find(subject)
        if start < 0:
            out.append(None)
            continue
        mask = subject_token_mask(offsets, start, start + len(subject))
        positions = [i for i, m in enumerate(mask) if m]
        out.append(positions or None)
    return out
