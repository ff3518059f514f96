"""Model names in the API and which variant serves a request.

`NAME` is the base model, `NAME:patched` the patched one, and `NAME:ab` an A/B split between them:
a request goes to `patched` with probability `ab_split`. With a `user`, the choice is a hash of the
user, so one user always sees one variant (until the split changes); without one it is random.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal

Variant = Literal["base", "patched"]

PATCHED_SUFFIX = ":patched"
AB_SUFFIX = ":ab"


class UnknownModel(LookupError):
    """The request names a model this server does not serve."""


@dataclass(frozen=True)
class Route:
    model: str  # the name the client asked for (echoed in responses)
    variant: Variant


def user_bucket(user: str) -> float:
    """A uniform number in [0, 1) fixed by the user id (stable across processes and restarts)."""
    digest = hashlib.sha256(user.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Router:
    def __init__(self, name: str, ab_split: float, rng: random.Random | None = None) -> None:
        self.name = name
        self.ab_split = ab_split
        self._rng = rng or random.Random()

    def model_names(self, patched: bool) -> list[str]:
        if not patched:
            return [self.name]
        return [self.name, self.name + PATCHED_SUFFIX, self.name + AB_SUFFIX]

    def route(self, model: str, user: str | None, patched: bool) -> Route:
        """Which variant serves a request for `model`. Raises UnknownModel."""
        if model == self.name:
            return Route(model, "base")
        if patched and model == self.name + PATCHED_SUFFIX:
            return Route(model, "patched")
        if patched and model == self.name + AB_SUFFIX:
            draw = user_bucket(user) if user else self._rng.random()
            return Route(model, "patched" if draw < self.ab_split else "base")
        served = ", ".join(self.model_names(patched))
        hint = "" if patched or not model.startswith(self.name + ":") else " (no patch is loaded)"
        raise UnknownModel(f"the model {model!r} does not exist{hint}; this server serves: {served}")

    def check(self, model: str | None, patched: bool) -> None:
        """For endpoints where the model is optional (tokenizer): a given name must be ours."""
        if model is not None and model not in self.model_names(patched):
            self.route(model, None, patched)
