"""Live calibration: shadow scoring by the other variant, and client feedback on answers.

Shadow scoring: a share (`--shadow-rate`) of completions and chats is also sent to the variant that
did not serve it, for one greedy step on the same prompt, off the request's path (the client never
waits for it). Both top-1 probabilities at the first generated position give
`recallfix_confidence_shift` and `recallfix_shadow_agreement_total`. Shadow work is bounded: when too
many are pending, new ones are skipped (and counted), so shadowing can never take the server down.

Feedback: the front remembers, for a bounded number of recent responses, which variant answered and
the first-token confidence of each choice; `POST /v1/feedback` turns a rating into
`recallfix_feedback_confidence{correct}`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .metrics import Metrics
from .routing import Variant

log = logging.getLogger(__name__)

OTHER: dict[Variant, Variant] = {"base": "patched", "patched": "base"}
# (variant, path, request body) -> that variant's (token, logprob) of its most likely first token
ScoreFirst = Callable[[Variant, str, dict[str, Any]], Awaitable[tuple[str, float] | None]]


def one_greedy_step(body: dict[str, Any]) -> dict[str, Any]:
    """The request that scores the same prompt for one greedy step with its top-1 logprob."""
    keep = {k: v for k, v in body.items() if k in ("model", "prompt", "messages", "chat_template",
                                                     "chat_template_kwargs", "add_generation_prompt",
                                                     "continue_final_message", "add_special_tokens",
                                                     "tools", "documents")}
    if isinstance(keep.get("prompt"), list) and keep["prompt"] and not isinstance(keep["prompt"][0], int):
        keep["prompt"] = keep["prompt"][0]  # several prompts: the first (its choice 0 is what was scored)
    step = {"max_tokens": 1, "temperature": 0.0, "n": 1, "stream": False}
    if "messages" in keep:
        return {**keep, **step, "logprobs": True, "top_logprobs": 1}
    return {**keep, **step, "logprobs": 1}


class ShadowScorer:
    def __init__(self, score: ScoreFirst, metrics: Metrics, rate: float, max_pending: int,
                 rng: random.Random | None = None) -> None:
        self._score_first, self._metrics, self.rate, self._max_pending = score, metrics, rate, max_pending
        self._rng = rng or random.Random()
        self._pending: set[asyncio.Task[None]] = set()
        self._gauge = metrics.shadow_pending.labels(metrics.model)

    def draw(self, patched: bool) -> bool:
        """Whether to shadow the next request (one draw per request; only while a patch is served)."""
        return self.rate > 0 and patched and self._rng.random() < self.rate

    def submit(self, variant: Variant, path: str, body: dict[str, Any], served_top1: tuple[str, float]) -> None:
        """Score the request with the other variant in the background; `served_top1` is the serving
        variant's (token, logprob) of its most likely first token."""
        if len(self._pending) >= self._max_pending:
            self._metrics.shadow_skipped.labels(self._metrics.model, variant).inc()
            return
        task = asyncio.get_running_loop().create_task(self._score(variant, path, one_greedy_step(body),
                                                                  served_top1))
        self._pending.add(task)  # a reference, so the task is not collected mid-flight
        self._gauge.inc()
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        self._gauge.dec()

    async def _score(self, variant: Variant, path: str, body: dict[str, Any], served: tuple[str, float]) -> None:
        try:
            other = await self._score_first(OTHER[variant], path, body)
        except Exception:  # a shadow failure must never surface; log it for the operator
            log.exception("shadow scoring failed")
            return
        if other is None:  # the other variant is gone or refused: nothing to compare
            return
        base, patched = (served, other) if variant == "base" else (other, served)
        self._metrics.observe_shadow(variant, base, patched)

    async def cancel(self) -> None:
        """At shutdown: shadow work is optional, drop what is pending."""
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)


@dataclass(frozen=True)
class Answer:
    variant: Variant
    confidences: tuple[float | None, ...]  # per choice: probability of its first generated token
    calibrated: tuple[float | None, ...] = ()  # per choice: its calibrated confidence (--calibration), if any

    def calibrated_of(self, index: int) -> float | None:
        return self.calibrated[index] if index < len(self.calibrated) else None


class FeedbackStore:
    """Recent answers awaiting a rating, oldest dropped first. Each choice can be rated once."""

    def __init__(self, capacity: int) -> None:  # FrontConfig.feedback_capacity
        self._capacity = capacity
        self._answers: OrderedDict[str, tuple[Answer, set[int]]] = OrderedDict()  # -> (answer, rated choices)

    def remember(self, response_id: str, answer: Answer) -> None:
        if all(c is None for c in answer.confidences):
            return  # nothing was generated (prompt scoring): nothing to rate
        self._answers[response_id] = (answer, set())
        while len(self._answers) > self._capacity:
            self._answers.popitem(last=False)

    def rate(self, response_id: str, index: int) -> tuple[Variant, float, float | None] | None:
        """The variant, confidence and calibrated confidence of choice `index` of a response, once; None if
        unknown or rated."""
        answer, rated = self._answers.get(response_id, (None, set()))
        if answer is None or index >= len(answer.confidences) or index in rated:
            return None
        confidence = answer.confidences[index]
        if confidence is None:
            return None
        rated.add(index)
        return answer.variant, confidence, answer.calibrated_of(index)
