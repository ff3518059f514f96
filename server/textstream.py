"""Incremental detokenization with stop strings, for engines that do not do it themselves.

Follows vLLM's behaviour: text is released only once it is final (no incomplete UTF-8 character at
its end, and no longer possibly the start of a stop string); a stop string ends the sequence and is
not part of the text.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"  # what a byte-level tokenizer decodes an incomplete character to


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:  # noqa: ANN001 (any HF tokenizer)
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        # Hold back enough characters that a stop string split across tokens is still caught whole.
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._sent = 0  # characters of the decoded text already released

    def _decode(self) -> str:
        return self._tokenizer.decode(self._ids, skip_special_tokens=True)

    def push(self, token_id: int) -> tuple[str, str | None]:
        """Add a token; return the newly final text and the stop string hit (None if none was)."""
        self._ids.append(token_id)
        text = self._decode()
        hits = [(i, s) for s in self._stop if (i := text.find(s, self._sent)) >= 0]
        if hits:
            index, stop = min(hits)
            out, self._sent = text[self._sent:index], index
            return out, stop
        end = len(text)
        while end > self._sent and text[end - 1] == REPLACEMENT:
            end -= 1
        end = max(self._sent, end - self._hold)
        out, self._sent = text[self._sent:end], end
        return out, None

    def flush(self) -> str:
        """At the end of a sequence not ended by a stop string: release what was held back, except an
        incomplete character (it will never complete; vLLM drops it too)."""
        text = self._decode().rstrip(REPLACEMENT)
        out, self._sent = text[self._sent:], max(self._sent, len(text))
        return out
