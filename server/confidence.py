"""The calibrated confidence of each served answer, and abstention (`--calibration`, `--abstain-below`).

With `--calibration RUN/calibration.json`, every completion and chat reply carries, beside OpenAI's fields, the
probability that each choice's answer is right, from the calibrator of the variant that answered
(`recallfix.patches.calibrator`) applied to its first generated token's log-probabilities:

    "recallfix": {"variant": "patched", "calibrator": "3f2a9c01d2e4",
                  "choices": [{"index": 0, "confidence": 0.83, "raw_confidence": 0.91, "abstained": false}]}

`raw_confidence` is the probability the model gave that token; `confidence` the calibrated one (null where the
reply has no generated token, or the variant has no calibrator: a patch swapped in that the file does not know).
The calibrator reads the token's probability as p1 and the top 20 alternatives (the front asks for 20 where the
client asks for fewer, and takes the extra ones out again), as it was fitted on greedy answers. OpenAI's clients
ignore the field (the Python client keeps it: `reply.model_extra["recallfix"]`); a stream carries it in one
last chunk before `data: [DONE]`, with `"choices": []` like the usage chunk.

Abstention: where the server's `--abstain-below` is set, or a request asks with `"recallfix": {"abstain_below":
0.5}` in its body (the openai client's `extra_body`; taken out before vLLM sees the request, 0 turns it off), a
choice whose calibrated confidence is below the threshold answers `--abstain-text` instead (the text of a
completion, the message content of a chat; in a stream, from its first token on), with its logprobs removed, and
its entry says `"abstained": true` and why. The reply keeps OpenAI's shape, so any client reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recallfix.patches.calibrator import CalibrationFile, VariantCalibration

from .errors import bad_request
from .observe import CHAT, TokenLogprobs
from .routing import Variant

FIELD = "recallfix"  # in a request: its own options, taken out; in a reply: the confidences


def request_threshold(body: dict[str, Any], default: float | None) -> float | None:
    """The abstention threshold of a request: its `recallfix.abstain_below`, else `default`; the field is taken
    out of `body`. A bad value is a 400 naming the field."""
    options = body.pop(FIELD, None)
    if options is None:
        return default
    if not isinstance(options, dict) or set(options) - {"abstain_below"}:
        raise bad_request(f"{FIELD} must be an object with at most the key abstain_below", FIELD)
    value = options.get("abstain_below", default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise bad_request(f"{FIELD}.abstain_below must be a probability in [0, 1], got {value!r}",
                          f"{FIELD}.abstain_below")
    return float(value) or None


class Calibration:
    """The calibrators the front applies: the base model's, and the served patch's, found by its id so that it
    follows a patch swap (`patched_variant` instead names the file's variant, for the router, which does not see
    the patch)."""

    def __init__(self, file: CalibrationFile, patched_variant: str | None = None) -> None:
        self.file, self.patched_variant = file, patched_variant
        self.base = file.for_patch(None)[1]

    def of(self, variant: Variant, patch_id: str | None) -> VariantCalibration | None:
        if variant == "base":
            return self.base
        if self.patched_variant is not None:
            return self.file.variants.get(self.patched_variant)
        return next((v for v in self.file.variants.values() if v.patch_id == patch_id and patch_id), None)


def first_row(first: TokenLogprobs) -> np.ndarray:
    """[1, k] the generated token's log-probability, then the other alternatives', most likely first."""
    others = sorted((lp for token, lp in first.top if token != first.token), reverse=True)
    return np.asarray([[first.logprob, *others]], dtype=np.float64)


@dataclass
class ChoiceConfidence:
    index: int
    raw: float
    confidence: float | None
    abstained: bool = False
    reason: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "confidence": self.confidence, "raw_confidence": self.raw,
                               "abstained": self.abstained}
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass
class Judge:
    """One request's confidences: each choice scored at its first generated token, abstained where asked."""

    variant: Variant
    calibration: VariantCalibration | None
    threshold: float | None
    abstain_text: str
    choices: dict[int, ChoiceConfidence] = field(default_factory=dict)

    def score(self, index: int, first: TokenLogprobs) -> ChoiceConfidence:
        raw = math.exp(first.logprob)
        confidence = (float(self.calibration.calibrator.predict(first_row(first))[0])
                      if self.calibration is not None else None)
        scored = ChoiceConfidence(index, raw, confidence)
        if self.threshold is not None and confidence is not None and confidence < self.threshold:
            scored.abstained = True
            scored.reason = f"calibrated confidence {confidence:.3f} is below the threshold {self.threshold:g}"
        self.choices[index] = scored
        return scored

    def rewrite(self, path: str, choice: dict[str, Any], first_piece: bool) -> None:
        """An abstained choice (a whole one, or a streamed piece of it): the abstention text once, nothing after."""
        text = self.abstain_text if first_piece else ""
        if path == CHAT:
            holder = choice.get("message") if isinstance(choice.get("message"), dict) else choice.get("delta")
            if isinstance(holder, dict):
                holder["content"] = text
        else:
            choice["text"] = text
        choice["logprobs"] = None

    def field(self) -> dict[str, Any]:
        return {"variant": self.variant, "calibrator": self.calibration.id if self.calibration else None,
                "choices": [self.choices[i].as_json() for i in sorted(self.choices)]}

    def last_chunk(self, event: dict[str, Any]) -> dict[str, Any]:
        """The stream's last chunk: the confidences, in the shape of the chunks before it (`event`, one of them)."""
        keep = {k: event[k] for k in ("id", "object", "created", "model") if k in event}
        return {**keep, "choices": [], FIELD: self.field()}
