"""Prometheus metrics of the server, in a registry of its own (so vLLM's global ones never mix in).

Every series carries `model` (the served name) and `variant` (base | patched; `none` for requests
refused before a variant was chosen). The calibration metrics:

- `recallfix_token_confidence`: the probability the serving variant gave each token it generated;
  `recallfix_first_token_confidence` the same for the first token (the answer, for a factual prompt).
- `recallfix_token_entropy`: entropy (nats) of each generated position's next-token distribution,
  estimated from its 20 most likely tokens with the remaining mass counted as one outcome (a lower
  bound of the true entropy; exact when those 20 hold all the mass). Positions with fewer than the
  front's `--metrics-logprobs` alternatives (echo requests, `--metrics-logprobs 0`) are not counted in it.
- `recallfix_confidence_shift`: for shadowed requests, patched minus base top-1 probability at the
  first generated position; `recallfix_shadow_agreement_total{agree}` whether their top-1 tokens agree.
  Its negative buckets mean no `_sum` (Prometheus sums only grow), so the mean shift comes from
  `recallfix_shadow_top1_confidence{scored=base|patched}`: both probabilities, on the same prompts.
- `recallfix_feedback_confidence{correct}`: first-token confidence of answers clients rated with
  `POST /v1/feedback`. Per confidence bucket, correct / all is the reliability diagram.
- With `--calibration` (`confidence.py`): `recallfix_calibrated_confidence`, the calibrated probability that each
  answer is right; `recallfix_abstentions_total`, choices answered with the abstention text (the abstention rate is
  its rate over the calibrated histogram's count); `recallfix_feedback_calibrated_confidence{correct}`, the
  calibrated confidence of rated answers: the live reliability diagram of what clients are told.

Probabilities are the model's raw ones (before temperature and top-p), as vLLM reports logprobs
(`--logprobs-mode raw_logprobs`, its default).

In `recallfix serve`, `/metrics` also relays the upstream vLLM servers' own `vllm:*` series, each
with a `variant` label: `base`, `patched`, or `shared` (one server serving base and the LoRA adapter).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .observe import TokenLogprobs, top_k_entropy

if TYPE_CHECKING:
    from recallfix.patches import Patch

# `_created` series double the exposition for no use here (Prometheus derives resets itself).
prometheus_client.disable_created_metrics()

CONTENT_TYPE = CONTENT_TYPE_LATEST
NO_VARIANT = "none"
RELAYED_PREFIX = "vllm:"

PROBABILITY_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 ... 1.0
RELIABILITY_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))  # ten bins: the reliability diagram
SHIFT_BUCKETS = (-0.5, -0.2, -0.1, -0.05, -0.02, -0.01, -0.001, 0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
ENTROPY_BUCKETS = (0.01, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class PatchState:
    """The patch behind NAME:patched, and how it is served."""

    patch_id: str
    edits: tuple[tuple[str, float], ...]  # gain edits: (component, gain)
    biases: tuple[str, ...]  # components whose MLP output gets an added bias (bias edits)
    applied: str  # lora | merged
    detail: str  # why this mode

    @classmethod
    def of(cls, patch: Patch, applied: str, detail: str) -> PatchState:
        return cls(patch.id, tuple((str(c), g) for c, g in patch.gains.items()), tuple(str(c) for c in patch.biases),
                   applied, detail)

    def describe(self) -> str:
        return describe_edits(self.edits, biases=self.biases)


def describe_edits(edits: Sequence[tuple[str, float]], limit: int = 8, biases: Sequence[str] = ()) -> str:
    """`L1H0=0.2,L1H3=1.5,L11MLP+bias` for a label value; long patches are cut to keep the label short."""
    parts = [f"{component}={gain:g}" for component, gain in edits] + [f"{component}+bias" for component in biases]
    return ",".join(parts[:limit]) + (f",+{len(parts) - limit} more" if len(parts) > limit else "")


def relayed_families(expositions: Mapping[str, str]) -> list[Metric]:
    """The `vllm:*` families of each upstream's /metrics text (keyed by its variant label), merged by
    name, every sample labelled with `variant`."""
    merged: dict[str, Metric] = {}
    for variant, text in expositions.items():
        for family in text_string_to_metric_families(text):
            # `_created` series double the exposition for no use (as for our own series, above).
            if not family.name.startswith(RELAYED_PREFIX) or family.name.endswith("_created"):
                continue
            target = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                           family.unit))
            target.samples += [s._replace(labels={**s.labels, "variant": variant}) for s in family.samples
                               if not s.name.endswith("_created")]
    return [family for family in merged.values() if family.samples]


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


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
                              "Streamed requests: time from request arrival to the first generated token.",
                              mv, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("recallfix_prompt_tokens", "Prompt tokens processed (replies with usage).",
                                     mv, registry=r)
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
            "recallfix_patch_info", "The patch behind the patched variant (1 while loaded): its edits, how it is "
            "served (applied: lora | merged) and why.", [*mv, "patch_id", "edits", "applied", "reason"], registry=r)
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
        self.calibrated_confidence = Histogram(
            "recallfix_calibrated_confidence", "Calibrated probability that an answer is right (--calibration), per "
            "choice with a generated token.", mv, buckets=PROBABILITY_BUCKETS, registry=r)
        self.abstentions = Counter(
            "recallfix_abstentions", "Choices answered with the abstention text: calibrated confidence below the "
            "threshold (--abstain-below, or the request's own).", mv, registry=r)
        self.feedback_calibrated_confidence = Histogram(
            "recallfix_feedback_calibrated_confidence", "Calibrated confidence of answers rated via /v1/feedback: "
            "per bucket, correct / all against the bucket is the live reliability diagram.",
            [*mv, "correct"], buckets=RELIABILITY_BUCKETS, registry=r)
        self.in_flight = Gauge("recallfix_requests_in_flight", "Requests being served through the front.",
                               ["model"], registry=r)
        self.upstream_up = Gauge("recallfix_upstream_up", "1 while the vLLM server of this variant answers.",
                                 mv, registry=r)
        self.upstream_crashes = Counter("recallfix_upstream_crashes",
                                        "vLLM servers that exited unasked (recallfix serve restarts them).",
                                        mv, registry=r)

    def initialize(self, variants: Iterable[str]) -> None:
        """Every series of a variant at 0 from the start, so a dashboard or an alert (`increase`, `rate`)
        sees it before its first event."""
        for variant in variants:
            self.prompt_tokens.labels(self.model, variant)
            self.generated_tokens.labels(self.model, variant)
            self.shadow_skipped.labels(self.model, variant)
            self.upstream_crashes.labels(self.model, variant)
            self.calibrated_confidence.labels(self.model, variant)
            self.abstentions.labels(self.model, variant)
            for flag in ("true", "false"):
                self.shadow_agreement.labels(self.model, variant, flag)
                self.feedback_confidence.labels(self.model, variant, flag)
                self.feedback_calibrated_confidence.labels(self.model, variant, flag)
        self.shadow_pending.labels(self.model)
        self.in_flight.labels(self.model)

    def render(self, relayed: Iterable[Metric] = ()) -> bytes:
        own = generate_latest(self.registry)
        families = list(relayed)
        if not families:
            return own
        extra = CollectorRegistry(auto_describe=False)
        extra.register(_Families(families))  # type: ignore[arg-type]
        return own + generate_latest(extra)

    # -- recording ---------------------------------------------------------------------------------------
    def observe_request(self, variant: str, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(self.model, variant, endpoint, str(status)).inc()
        self.request_duration.labels(self.model, variant, endpoint).observe(seconds)

    def observe_usage(self, variant: str, prompt_tokens: int, generated_tokens: int) -> None:
        self.prompt_tokens.labels(self.model, variant).inc(prompt_tokens)
        self.generated_tokens.labels(self.model, variant).inc(generated_tokens)

    def observe_ttft(self, variant: str, seconds: float) -> None:
        self.ttft.labels(self.model, variant).observe(seconds)

    def observe_first_token(self, variant: str, token: TokenLogprobs) -> None:
        self.first_token_confidence.labels(self.model, variant).observe(math.exp(token.logprob))

    def observe_tokens(self, variant: str, tokens: Sequence[TokenLogprobs], entropy: bool) -> None:
        """Confidence of each token; entropy too where its top list is the full top-N."""
        confidence = self.token_confidence.labels(self.model, variant)
        spread = self.token_entropy.labels(self.model, variant)
        for token in tokens:
            confidence.observe(math.exp(token.logprob))
            if entropy:
                spread.observe(top_k_entropy(token.top))

    def observe_shadow(self, variant: str, base_top1: tuple[str, float], patched_top1: tuple[str, float]) -> None:
        """Each argument: (token, logprob) of that variant's most likely first token."""
        p_base, p_patched = math.exp(base_top1[1]), math.exp(patched_top1[1])
        self.confidence_shift.labels(self.model, variant).observe(p_patched - p_base)
        self.shadow_top1.labels(self.model, variant, "base").observe(p_base)
        self.shadow_top1.labels(self.model, variant, "patched").observe(p_patched)
        agree = "true" if base_top1[0] == patched_top1[0] else "false"
        self.shadow_agreement.labels(self.model, variant, agree).inc()

    def observe_feedback(self, variant: str, confidence: float, correct: bool, calibrated: float | None) -> None:
        flag = "true" if correct else "false"
        self.feedback_confidence.labels(self.model, variant, flag).observe(confidence)
        if calibrated is not None:
            self.feedback_calibrated_confidence.labels(self.model, variant, flag).observe(calibrated)

    def observe_calibrated(self, variant: str, confidence: float | None, abstained: bool) -> None:
        if confidence is not None:
            self.calibrated_confidence.labels(self.model, variant).observe(confidence)
        if abstained:
            self.abstentions.labels(self.model, variant).inc()

    def set_patch(self, state: PatchState | None) -> None:
        self.patch_info.clear()  # one series: the patch being served now
        if state is not None:
            self.patch_info.labels(self.model, "patched", state.patch_id, state.describe(), state.applied,
                                   state.detail).set(1)

    def set_upstream(self, variant: str, up: bool) -> None:
        self.upstream_up.labels(self.model, variant).set(1 if up else 0)
