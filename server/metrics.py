"""Prometheus metrics of the server, in a registry of its own (so vLLM's global ones never mix in).

Every series carries `model` (the served name) and `variant` (base | patched; `none` for requests
refused before a variant was chosen). The calibration metrics:

- `recallfix_token_confidence`: the probability the serving variant gave each token it generated;
  `recallfix_first_token_confidence` the same for the first token (the answer, for a factual prompt).
- `recallfix_token_entropy`: entropy (nats) of each generated position's next-token distribution,
  estimated from its 20 most likely tokens with the remaining mass counted as one outcome (a lower
  bound of the true entropy; exact when those 20 hold all the mass). The same estimate for both engines.
- `recallfix_confidence_shift`: for shadowed requests, patched minus base top-1 probability at the
  first generated position; `recallfix_shadow_agreement_total{agree}` whether their top-1 tokens agree.
  Its negative buckets mean no `_sum` (Prometheus sums only grow), so the mean shift comes from
  `recallfix_shadow_top1_confidence{scored=base|patched}`: both probabilities, on the same prompts.
- `recallfix_feedback_confidence{correct}`: first-token confidence of answers clients rated with
  `POST /v1/feedback`. Per confidence bucket, correct / all is the reliability diagram.

Probabilities are the model's raw ones (before temperature and top-p), as vLLM reports logprobs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import prometheus_client
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .engine import PatchState, TokenLogprobs

# `_created` series double the exposition for no use here (Prometheus derives resets itself).
prometheus_client.disable_created_metrics()

CONTENT_TYPE = CONTENT_TYPE_LATEST
NO_VARIANT = "none"

PROBABILITY_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 ... 1.0
RELIABILITY_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))  # ten bins: the reliability diagram
SHIFT_BUCKETS = (-0.5, -0.2, -0.1, -0.05, -0.02, -0.01, -0.001, 0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
ENTROPY_BUCKETS = (0.01, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def top_k_entropy(top: Sequence[tuple[int, float]]) -> float:
    """Entropy (nats) of a distribution known by its most likely entries; the rest counted as one outcome."""
    probs = [math.exp(lp) for _, lp in top]
    rest = max(0.0, 1.0 - sum(probs))
    return -sum(p * math.log(p) for p in [*probs, rest] if p > 0.0)


def describe_edits(edits: Sequence[tuple[str, float]], limit: int = 8, biases: Sequence[str] = ()) -> str:
    """`L1H0=0.2,L1H3=1.5,L11MLP+bias` for a label value; long patches are cut to keep the label short."""
    parts = [f"{component}={gain:g}" for component, gain in edits] + [f"{component}+bias" for component in biases]
    return ",".join(parts[:limit]) + (f",+{len(parts) - limit} more" if len(parts) > limit else "")


class Metrics:
    def __init__(self, model: str) -> None:
        self.model = model
        self.registry = r = CollectorRegistry()
        mv = ["model", "variant"]
        self.requests = Counter("recallfix_requests", "HTTP requests answered, by endpoint and status code.",
                                [*mv, "endpoint", "status"], registry=r)
        self.request_duration = Histogram(
            "recallfix_request_duration_seconds", "Time from request arrival to the last byte of the reply.",
            [*mv, "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("recallfix_time_to_first_token_seconds",
                              "Time from request arrival to the first generated token.",
                              mv, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("recallfix_prompt_tokens", "Prompt tokens processed.", mv, registry=r)
        self.generated_tokens = Counter("recallfix_generated_tokens", "Tokens generated.", mv, registry=r)
        self.token_confidence = Histogram(
            "recallfix_token_confidence", "Probability the serving variant gave each token it generated.",
            mv, buckets=PROBABILITY_BUCKETS, registry=r)
        self.first_token_confidence = Histogram(
            "recallfix_first_token_confidence", "Probability of the first generated token of each sequence.",
            mv, buckets=PROBABILITY_BUCKETS, registry=r)
        self.token_entropy = Histogram(
            "recallfix_token_entropy", "Entropy (nats, top-20 estimate) of each generated position.",
            mv, buckets=ENTROPY_BUCKETS, registry=r)
        self.patch_info = Gauge(
            "recallfix_patch_info", "The patch behind the patched variant (1 while loaded).",
            [*mv, "patch_id", "edits", "applied"], registry=r)
        self.confidence_shift = Histogram(
            "recallfix_confidence_shift",
            "Shadowed requests: patched minus base top-1 probability at the first generated position.",
            mv, buckets=SHIFT_BUCKETS, registry=r)
        # Negative buckets cost the shift histogram its _sum (a Prometheus sum must only grow): the mean
        # shift comes from these two, both variants' top-1 probabilities on the same shadowed prompts.
        self.shadow_top1 = Histogram(
            "recallfix_shadow_top1_confidence",
            "Shadowed requests: top-1 probability at the first generated position, by the variant scored.",
            [*mv, "scored"], buckets=PROBABILITY_BUCKETS, registry=r)
        self.shadow_agreement = Counter(
            "recallfix_shadow_agreement", "Shadowed requests: whether base and patched agree on the top-1 token.",
            [*mv, "agree"], registry=r)
        self.shadow_pending = Gauge(
            "recallfix_shadow_pending", "Shadow scorings started and not finished.", ["model"], registry=r)
        self.shadow_skipped = Counter(
            "recallfix_shadow_skipped", "Shadow scorings skipped because too many were pending.", mv, registry=r)
        self.feedback_confidence = Histogram(
            "recallfix_feedback_confidence", "First-token confidence of answers rated via /v1/feedback.",
            [*mv, "correct"], buckets=RELIABILITY_BUCKETS, registry=r)
        self.in_flight = Gauge("recallfix_requests_in_flight", "Generation requests being served.",
                               ["model"], registry=r)
        self.ready = Gauge("recallfix_engine_ready", "1 when the engine serves requests.", ["model", "engine"],
                           registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- recording ---------------------------------------------------------------------------------------
    def observe_request(self, variant: str, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(self.model, variant, endpoint, str(status)).inc()
        self.request_duration.labels(self.model, variant, endpoint).observe(seconds)

    def observe_prompt(self, variant: str, tokens: int) -> None:
        self.prompt_tokens.labels(self.model, variant).inc(tokens)

    def observe_ttft(self, variant: str, seconds: float) -> None:
        self.ttft.labels(self.model, variant).observe(seconds)

    def observe_first_token(self, variant: str, token: TokenLogprobs) -> None:
        self.first_token_confidence.labels(self.model, variant).observe(math.exp(token.logprob))

    def observe_tokens(self, variant: str, tokens: Sequence[TokenLogprobs]) -> None:
        if not tokens:
            return
        self.generated_tokens.labels(self.model, variant).inc(len(tokens))
        confidence = self.token_confidence.labels(self.model, variant)
        entropy = self.token_entropy.labels(self.model, variant)
        for token in tokens:
            confidence.observe(math.exp(token.logprob))
            entropy.observe(top_k_entropy(token.top))

    def observe_shadow(self, variant: str, base_top1: tuple[int, float], patched_top1: tuple[int, float]) -> None:
        """Each argument: (token id, logprob) of that variant's most likely first token."""
        p_base, p_patched = math.exp(base_top1[1]), math.exp(patched_top1[1])
        self.confidence_shift.labels(self.model, variant).observe(p_patched - p_base)
        self.shadow_top1.labels(self.model, variant, "base").observe(p_base)
        self.shadow_top1.labels(self.model, variant, "patched").observe(p_patched)
        agree = "true" if base_top1[0] == patched_top1[0] else "false"
        self.shadow_agreement.labels(self.model, variant, agree).inc()

    def observe_feedback(self, variant: str, confidence: float, correct: bool) -> None:
        self.feedback_confidence.labels(self.model, variant, "true" if correct else "false").observe(confidence)

    def set_patch(self, state: PatchState | None) -> None:
        self.patch_info.clear()  # one series: the patch being served now
        if state is not None:
            edits = describe_edits(state.edits, biases=state.biases)
            self.patch_info.labels(self.model, "patched", state.patch_id, edits, state.applied).set(1)

    def set_ready(self, engine: str, ready: bool) -> None:
        self.ready.labels(self.model, engine).set(1 if ready else 0)
