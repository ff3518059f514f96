"""Engine log-probabilities in the shapes clients see (OpenAI's, with vLLM's conventions).

Completions: `top_logprobs` at a position holds the token itself plus the `logprobs` most likely ones
(so up to logprobs + 1 entries), as vLLM does; with `echo`, the first prompt token has no logprob
(nothing predicts it): its entries are null. Chat: `top_logprobs` holds exactly the k most likely.
Token strings are decoded here, the same way whatever the engine, so both engines answer alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from .engine import TokenLogprobs
from .protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

FLOOR = -9999.0  # JSON has no -inf; OpenAI and vLLM clamp to this


class TokenStrings:
    """Token id -> its text, cached (every response decodes the same few thousand tokens)."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001 (any Hugging Face tokenizer)
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tokenizer.decode([token_id])
        return text


def _lp(value: float) -> float:
    return max(value, FLOOR)


def completion_logprobs(token_ids: Sequence[int], entries: Sequence[TokenLogprobs | None], k: int,
                        strings: TokenStrings, offset: int = 0) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries, strict=True):
        token = strings(token_id)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(token)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_lp(entry.logprob))
        top = {token: _lp(entry.logprob)}
        for alt_id, alt_lp in entry.top[:k]:
            top.setdefault(strings(alt_id), _lp(alt_lp))
        out.top_logprobs.append(top)
    return out


def chat_logprobs(entries: Sequence[TokenLogprobs], k: int, strings: TokenStrings) -> ChatLogprobs:
    def item(token_id: int, logprob: float) -> TopLogprob:
        token = strings(token_id)
        return TopLogprob(token=token, logprob=_lp(logprob), bytes=list(token.encode("utf-8")))

    content = []
    for entry in entries:
        head = item(entry.token_id, entry.logprob)
        content.append(ChatTokenLogprob(**head.model_dump(),
                                        top_logprobs=[item(t, lp) for t, lp in entry.top[:k]]))
    return ChatLogprobs(content=content)
