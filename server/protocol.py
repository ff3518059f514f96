"""The shapes of the front's own routes (errors, feedback, load_patch). Everything else is vLLM's, passed
through unchanged.

Requests forbid unknown fields: a misspelt field must fail loudly (400, naming it), not be ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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


class Status(BaseModel):
    status: str
    upstreams: dict[str, bool] = Field(default_factory=dict, description="variant -> whether its vLLM answers")
    models: list[str] = Field(default_factory=list)
