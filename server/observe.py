"""What the front reads in and writes over OpenAI requests and replies: pure functions over their JSON.

- The only change to a request is its model name, plus, for completions and chats that ask for fewer
  than N logprobs (none included), a request for the top N of each generated token (the calibrated
  confidence, and the confidence and entropy metrics, read them). `trim_logprobs` takes the extra ones
  out again, so the client gets what vLLM would give for its own request.
- `tokens_of` reads the generated tokens' logprobs out of a completion or chat choice (whole or a
  streamed piece) in one shape, `TokenLogprobs`.

Echo requests are left alone: their logprobs carry the prompt's too (and `prompt_logprobs`), so asking
for them would change the reply; they are counted, but not in the token-confidence metrics.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
GENERATION_PATHS = (COMPLETIONS, CHAT)


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token: its logprob and the most likely alternatives (token string, logprob)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]

    @property
    def top1(self) -> tuple[str, float]:
        return max(self.top, key=lambda t: t[1]) if self.top else (self.token, self.logprob)


NONE_ASKED = -1  # what `ask_logprobs` returns where the client asked for no logprobs at all


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def ask_logprobs(path: str, body: dict[str, Any], n: int) -> int | None:
    """Ask for the top-`n` logprobs of each generated token where the client asked for fewer. Returns what the
    client asked for (`NONE_ASKED`, or its own count), for `trim_logprobs`; None where the body is unchanged."""
    if n <= 0:
        return None
    if path == COMPLETIONS and not body.get("echo"):
        asked = body.get("logprobs")
        if asked is None or ((k := _count(asked)) is not None and 0 <= k < n):
            body["logprobs"] = n
            return NONE_ASKED if asked is None else asked
    if path == CHAT:
        if not body.get("logprobs") and body.get("top_logprobs") is None:
            body["logprobs"], body["top_logprobs"] = True, n
            return NONE_ASKED
        asked = 0 if body.get("top_logprobs") is None else _count(body.get("top_logprobs"))
        if body.get("logprobs") is True and asked is not None and 0 <= asked < n:
            body["top_logprobs"] = n
            return asked
    return None


def trim_logprobs(path: str, reply: dict[str, Any], asked: int) -> None:
    """Undo `ask_logprobs` in a reply or a streamed chunk: what vLLM gives for the client's own request.

    None asked: `"logprobs": null`. k asked: vLLM orders each position's candidates as the generated token, then
    the rest by rank; a chat entry lists the first k of them, a completion the generated token and the top k
    (k + 1 entries, or k where the generated token is among the top k)."""
    for choice in reply.get("choices") or ():
        if not isinstance(choice, dict) or "logprobs" not in choice:
            continue
        logprobs = choice["logprobs"]
        if asked == NONE_ASKED or not isinstance(logprobs, dict):
            choice["logprobs"] = None
        elif path == CHAT:
            for entry in logprobs.get("content") or ():
                if isinstance(entry, dict) and isinstance(entry.get("top_logprobs"), list):
                    entry["top_logprobs"] = entry["top_logprobs"][:asked]
        elif isinstance(logprobs.get("top_logprobs"), list):
            logprobs["top_logprobs"] = [_top_of_completion(top, asked) for top in logprobs["top_logprobs"]]


def _top_of_completion(top: Any, asked: int) -> Any:
    if not isinstance(top, dict) or len(top) <= asked:
        return top
    items = list(top.items())
    values = sorted((v for _, v in items), reverse=True)
    generated_in_top = asked > 0 and items[0][1] >= values[asked - 1]
    return dict(items[: asked if generated_in_top else asked + 1])


def requested_logprobs(path: str, body: dict[str, Any]) -> int:
    """How many top logprobs per token the (possibly rewritten) request asks for."""
    if path == COMPLETIONS:
        return _count(body.get("logprobs")) or 0
    if path == CHAT and body.get("logprobs"):
        return _count(body.get("top_logprobs")) or 0
    return 0


def tokens_of(path: str, choice: dict[str, Any]) -> list[TokenLogprobs]:
    """The generated tokens' logprobs in one choice (empty if the reply carries none)."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return []
    if path == CHAT:
        return [TokenLogprobs(e["token"], e["logprob"], tuple((t["token"], t["logprob"])
                                                              for t in e.get("top_logprobs") or ()))
                for e in logprobs.get("content") or () if isinstance(e, dict) and _finite(e.get("logprob"))]
    tops = logprobs.get("top_logprobs") or []
    out = []
    for i, (token, lp) in enumerate(zip(logprobs.get("tokens") or [], logprobs.get("token_logprobs") or [],
                                        strict=False)):
        if not _finite(lp):
            continue
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        out.append(TokenLogprobs(token, lp, tuple(top.items())))
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def top_k_entropy(top: Sequence[tuple[str, float]]) -> float:
    """Entropy (nats) of a distribution known by its most likely entries; the rest counted as one outcome
    (a lower bound of the true entropy, exact when those entries hold all the mass)."""
    probs = [math.exp(lp) for _, lp in top]
    rest = max(0.0, 1.0 - sum(probs))
    return -sum(p * math.log(p) for p in [*probs, rest] if p > 0.0)


def dumps(obj: Any) -> str:
    """JSON as vLLM writes it (compact, UTF-8 kept)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def rename_model(reply: Any, name: str) -> None:
    """Put the client's model name back into a reply or event (top level, and the Responses API's
    `response.model`)."""
    if not isinstance(reply, dict):
        return
    if isinstance(reply.get("model"), str):
        reply["model"] = name
    inner = reply.get("response")
    if isinstance(inner, dict) and isinstance(inner.get("model"), str):
        inner["model"] = name


def sequences(body: dict[str, Any]) -> int:
    """How many sequences a generation request asks for: its prompts times `n` (choices per prompt)."""
    prompt, messages, n = body.get("prompt"), body.get("messages"), body.get("n")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompts = len(prompt)  # texts or token-id lists (a list of ints is one prompt)
    elif isinstance(messages, list) and messages and all(isinstance(m, list) for m in messages):
        prompts = len(messages)  # a batch chat's conversations
    else:
        prompts = 1
    return prompts * (n if isinstance(n, int) and n > 1 else 1)


def unreadable_input_part(path: str, body: dict[str, Any]) -> str | None:
    """Where a Responses request's `input` holds an earlier assistant message whose first content part is not
    text (a refusal): vLLM 0.32 reads `.text` of that part and answers 500 (responses/utils.py; found by the
    fuzzing test). The parameter's name, or None."""
    items = body.get("input") if path == "/v1/responses" else None
    for i, item in enumerate(items if isinstance(items, list) else ()):
        content = item.get("content") if isinstance(item, dict) and item.get("type") == "message" else None
        if isinstance(content, list) and content and isinstance(content[0], dict) \
                and content[0].get("type") == "refusal":
            return f"input[{i}].content[0]"
    return None
