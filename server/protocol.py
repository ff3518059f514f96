"""The shapes of the front's own routes (errors, feedback, load_patch). Everything else is vLLM's, passed
through unchanged.

Requests forbid unknown fields: a misspelt field must fail loudly (400, naming it), not be ignored.

Every JSON body the front takes is read by `parse_json` first, stricter than Python's `json`: no NaN or
Infinity, valid UTF-8 and no lone surrogates, nested at most 200 levels deep (the fixed limit of pydantic's
parser, jiter). vLLM's server reads bodies with Python's `json`, which takes NaN and fails on deep nesting with
a RecursionError (a 500): what the front passes on is what vLLM reads as the client meant.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, model_validator


def parse_json(raw: bytes | str) -> Any:
    """`raw` as JSON, or ValueError with the reason and where (line and column). Numbers too large for a
    double (1e400, which parsers read as infinity) are refused too."""
    value = pydantic_core.from_json(raw, allow_inf_nan=False)
    if not _finite(value):
        raise ValueError("a number is out of range (not a finite double)")
    return value


def _finite(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class LoadPatchRequest(Request):
    """Give the patch as a path on the server, or as the document itself."""

    path: str | None = None
    patch: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> LoadPatchRequest:
        if (self.path is None) == (self.patch is None):
            raise ValueError("give exactly one of path (a patch file on the server) or patch (the document)")
        return self


class PatchInfo(BaseModel):
    patch_id: str
    edits: dict[str, float]  # gain edits
    biases: list[str] = []  # components whose MLP output gets an added bias
    applied: str
    detail: str


class LoadPatchResponse(BaseModel):
    status: Literal["loaded"] = "loaded"
    patch: PatchInfo
    previous_patch_id: str | None
    models: list[str]


class FeedbackRequest(Request):
    id: str = Field(min_length=1, max_length=128, description="the `id` of a completion or chat reply")
    correct: bool
    index: int = Field(0, ge=0, description="the choice rated, for replies with several")


class FeedbackResponse(BaseModel):
    status: Literal["recorded"] = "recorded"
    variant: str
    confidence: float
    calibrated_confidence: float | None = Field(None, description="the answer's calibrated confidence "
                                                                  "(--calibration), null without one")


class Status(BaseModel):
    status: str
    upstreams: dict[str, bool] = Field(default_factory=dict, description="variant -> whether its vLLM answers")
    models: list[str] = Field(default_factory=list)
