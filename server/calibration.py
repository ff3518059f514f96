"""Live calibration: shadow scoring by the other variant, and client feedback on answers.

Shadow scoring: a share (`--shadow-rate`) of requests is also run through the variant that did not
serve it, for one greedy step on the same prompt, off the request's path (the client never waits for
it). Both top-1 probabilities at the first generated position give `recallfix_confidence_shift` and
`recallfix_shadow_agreement_total`. Shadow work is bounded: when too many are pending, new ones are
skipped (and counted), so shadowing can never take the server down.

Feedback: the server remembers, for a bounded number of recent responses, which variant answered and
the first-token confidence of each choice; `POST /v1/feedback` turns a rating into
`recallfix_feedback_confidence{correct}`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict
from dataclasses import dataclass

from .engine import Engine, EngineError, SamplingSpec, TokenLogprobs, Variant
from .metrics import Metrics

log = logging.getLogger(__name__)

OTHER: dict[Variant, Variant] = {"base": "patched", "patched": "base"}


class ShadowScorer:
    def __init__(self, engine: Engine, metrics: Metrics, rate: float, max_pending: int,
                 rng: random.Random | None = None) -> None:
        self._engine, self._metrics, self.rate, self._max_pending = engine, metrics, rate, max_pending
        self._rng = rng or random.Random()
        self._pending: set[asyncio.Task[None]] = set()
        self._gauge = metrics.shadow_pending.labels(metrics.model)

    def draw(self) -> bool:
        """Whether to shadow the next request (one draw per request)."""
        return self.rate > 0 and self._engine.patch_state is not None and self._rng.random() < self.rate

    def submit(self, variant: Variant, prompt_ids: list[int], served_first: TokenLogprobs, request_id: str) -> None:
        """Score `prompt_ids` with the other variant in the background; `served_first` is the first
        generated position of the variant that served the request."""
        if not served_first.top:
            return
        if len(self._pending) >= self._max_pending:
            self._metrics.shadow_skipped.labels(self._metrics.model, variant).inc()
            return
        task = asyncio.get_running_loop().create_task(
            self._score(variant, prompt_ids, served_first.top[0], request_id))
        self._pending.add(task)  # a reference, so the task is not collected mid-flight
        self._gauge.inc()
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        self._gauge.dec()

    async def _score(self, variant: Variant, prompt_ids: list[int], served_top1: tuple[int, float],
                     request_id: str) -> None:
        other = OTHER[variant]
        spec = SamplingSpec(max_tokens=1, temperature=0.0, top_logprobs=1)
        try:
            async for chunk in self._engine.generate(other, prompt_ids, spec, f"{request_id}-shadow"):
                if chunk.logprobs:
                    other_top1 = chunk.logprobs[0].top[0]
                    base, patched = (served_top1, other_top1) if variant == "base" else (other_top1, served_top1)
                    self._metrics.observe_shadow(variant, base, patched)
                    return
        except EngineError as err:  # e.g. the patch was unloaded meanwhile: nothing to compare
            log.debug("shadow scoring of %s skipped: %s", request_id, err)
        except Exception:  # a shadow failure must never surface; log it for the operator
            log.exception("shadow scoring of %s failed", request_id)

    async def cancel(self) -> None:
        """At shutdown: shadow work is optional, drop what is pending."""
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)


@dataclass(frozen=True)
class Answer:
    variant: Variant
    confidences: tuple[float | None, ...]  # per choice: probability of its first generated token


class FeedbackStore:
    """Recent answers awaiting a rating, oldest dropped first. Each choice can be rated once."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._capacity = capacity
        self._answers: OrderedDict[str, tuple[Answer, set[int]]] = OrderedDict()  # -> (answer, rated choices)

    def remember(self, response_id: str, answer: Answer) -> None:
        if all(c is None for c in answer.confidences):
            return  # nothing was generated (prompt scoring): nothing to rate
        self._answers[response_id] = (answer, set())
        while len(self._answers) > self._capacity:
            self._answers.popitem(last=False)

    def rate(self, response_id: str, index: int) -> tuple[Variant, float] | None:
        """The variant and confidence of choice `index` of a response, once; None if unknown or rated."""
        answer, rated = self._answers.get(response_id, (None, set()))
        if answer is None or index >= len(answer.confidences) or index in rated:
            return None
        confidence = answer.confidences[index]
        if confidence is None:
            return None
        rated.add(index)
        return answer.variant, confidence
