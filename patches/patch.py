"""The Patch format: a versioned JSON document of gains on named components.

A patch says *which model* it was made for (a fingerprint: shape numbers and the sha256 of every
tensor it touches) and *what* to change (a gain per component). Applying it anywhere else is refused
before anything changes.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .components import COMPONENT_RE, Component
from .io import atomic_write_text, json_schema_of, write_json_schema_of

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("patch.schema.json")


class PatchError(ValueError):
    """A patch that cannot be read, or cannot be applied to this model."""


class FingerprintMismatchError(PatchError):
    """The patch was made for another model (or the model was already patched)."""


class ModelFingerprint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tensors: dict[str, str] = Field(
        description="parameter name -> sha256 of the tensor's values as little-endian float32"
    )


class Edit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    component: str = Field(pattern=COMPONENT_RE.pattern, description="L{l}H{h}, L{l}N{n} or L{l}MLP")
    gain: float = Field(description="factor on the component's write to the residual stream; 1.0 is no change")

    @field_validator("gain")
    @classmethod
    def _finite(cls, gain: float) -> float:
        if not math.isfinite(gain):
            raise ValueError(f"gain must be a finite number, got {gain}")
        return gain


class Provenance(BaseModel):
    tool_version: str
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    command: str = ""
    dataset_sha256: str | None = None


class Patch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int
    model: ModelFingerprint
    edits: list[Edit] = Field(min_length=1)
    provenance: Provenance
    metrics: dict[str, Any] = Field(default_factory=dict, description="free-form numbers from the fit")

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        if version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {version} is not supported (this recallfix reads {SCHEMA_VERSION})")
        return version

    @model_validator(mode="after")
    def _consistent_edits(self) -> Patch:
        seen: set[str] = set()
        for edit in self.edits:
            if edit.component in seen:
                raise ValueError(f"component {edit.component} is edited twice")
            seen.add(edit.component)
        components = [Component.parse(e.component) for e in self.edits]
        whole_mlp = {c.layer for c in components if c.kind == "mlp"}
        for c in components:
            if c.kind == "neuron" and c.layer in whole_mlp:
                raise ValueError(f"{c} and L{c.layer}MLP both scale layer {c.layer}'s MLP; give one of them")
        return self

    # -- derived ---------------------------------------------------------------------------------------
    @property
    def components(self) -> list[Component]:
        return [Component.parse(e.component) for e in self.edits]

    @property
    def gains(self) -> dict[Component, float]:
        return {Component.parse(e.component): e.gain for e in self.edits}

    @property
    def id(self) -> str:
        """Short content hash of what the patch does and to which model (not when or how it was made)."""
        body = json.dumps({"model": self.model.model_dump(), "edits": [e.model_dump() for e in self.edits]},
                          sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:12]

    def is_identity(self) -> bool:
        return all(e.gain == 1.0 for e in self.edits)

    # -- files -----------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Patch:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise PatchError(f"{path}: cannot read patch: {err.strerror}") from None
        try:
            return cls.model_validate_json(text)
        except ValidationError as err:
            raise PatchError(f"{path}: invalid patch:\n{format_validation_error(err)}") from None

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(Path(path), self.model_dump_json(indent=2) + "\n")


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, naming the field by its JSON path (e.g. edits.1.gain)."""
    lines = []
    for problem in err.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(document)"
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def json_schema() -> dict[str, Any]:
    return json_schema_of(Patch, "recallfix Patch", SCHEMA_PATH)


def write_json_schema(path: Path = SCHEMA_PATH) -> Path:
    return write_json_schema_of(Patch, "recallfix Patch", path)
