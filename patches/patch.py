"""The Patch format: a versioned JSON document of edits on named components.

A patch says *which model* it was made for (a fingerprint: shape numbers and the sha256 of every
tensor it touches) and *what* to change. Applying it anywhere else is refused before anything changes.
Two kinds of edit, told apart by their value key:

    {"component": "L1H0",  "gain": 0.5}          scale a component's write to the residual stream
    {"component": "L29MLP", "bias": [d floats]}   add a vector to layer 29's MLP output (schema_version 2):
                                                  resid_post = resid_mid + mlp_out + bias

Versions: 2 added bias edits. A document is written with the lowest version that holds its edits
(`required_version`), so a gain-only patch stays schema_version 1 and older recallfix still reads it;
this one reads 1 and 2 and refuses any other version by name.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from .components import COMPONENT_RE, Component
from .io import atomic_write_text, json_schema_of, write_json_schema_of

SCHEMA_VERSION = 2  # the newest version this recallfix writes
READABLE_VERSIONS = (1, 2)
BIAS_VERSION = 2  # the first version with bias edits
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


class GainEdit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    component: str = Field(pattern=COMPONENT_RE.pattern, description="L{l}H{h}, L{l}N{n} or L{l}MLP")
    gain: float = Field(description="factor on the component's write to the residual stream; 1.0 is no change")

    @field_validator("gain")
    @classmethod
    def _finite(cls, gain: float) -> float:
        if not math.isfinite(gain):
            raise ValueError(f"gain must be a finite number, got {gain}")
        return gain

    def describe(self) -> str:
        return f"x {self.gain:.4f}"


class BiasEdit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    component: str = Field(pattern=r"^L\d+MLP$", description="L{l}MLP: the MLP whose output the bias is added to")
    bias: list[float] = Field(min_length=1, description="added to the MLP's output; length hidden_size")

    @field_validator("bias")
    @classmethod
    def _finite(cls, bias: list[float]) -> list[float]:
        bad = next((i for i, v in enumerate(bias) if not math.isfinite(v)), None)
        if bad is not None:
            raise ValueError(f"bias must hold finite numbers, got {bias[bad]} at index {bad}")
        return bias

    def describe(self) -> str:
        return f"+ bias of {len(self.bias)} values, norm {math.sqrt(sum(v * v for v in self.bias)):.4f}"


EDIT_KINDS = ("gain", "bias")


def _edit_kind(value: Any) -> str:
    """An edit is a bias edit when it has a `bias` key (or is a BiasEdit), a gain edit otherwise."""
    if isinstance(value, dict):
        return "bias" if "bias" in value else "gain"
    return "bias" if isinstance(value, BiasEdit) else "gain"


Edit = Annotated[
    Annotated[GainEdit, Tag("gain")] | Annotated[BiasEdit, Tag("bias")],
    Discriminator(_edit_kind),
]


def required_version(edits: list[GainEdit | BiasEdit]) -> int:
    """The lowest schema_version that holds these edits (what a new document is written with)."""
    return BIAS_VERSION if any(isinstance(e, BiasEdit) for e in edits) else 1


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
        if version not in READABLE_VERSIONS:
            readable = ", ".join(map(str, READABLE_VERSIONS))
            raise ValueError(f"schema_version {version} is not supported (this recallfix reads {readable})")
        return version

    @model_validator(mode="after")
    def _consistent_edits(self) -> Patch:
        seen: set[str] = set()
        for i, edit in enumerate(self.edits):
            if edit.component in seen:
                raise ValueError(f"component {edit.component} is edited twice")
            seen.add(edit.component)
            if isinstance(edit, BiasEdit) and self.schema_version < BIAS_VERSION:
                raise ValueError(f"edits.{i}.bias: bias edits need schema_version {BIAS_VERSION} or later")
        # A bias adds to the MLP's output and commutes with neuron gains; a whole-MLP gain on the same layer
        # is the same component, refused above.
        components = [Component.parse(e.component) for e in self.edits if isinstance(e, GainEdit)]
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
        """The gain edits (bias edits are in `biases`)."""
        return {Component.parse(e.component): e.gain for e in self.edits if isinstance(e, GainEdit)}

    @property
    def biases(self) -> dict[Component, list[float]]:
        return {Component.parse(e.component): e.bias for e in self.edits if isinstance(e, BiasEdit)}

    @property
    def id(self) -> str:
        """Short content hash of what the patch does and to which model (not when or how it was made)."""
        body = json.dumps({"model": self.model.model_dump(), "edits": [e.model_dump() for e in self.edits]},
                          sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:12]

    def is_identity(self) -> bool:
        return all(g == 1.0 for g in self.gains.values()) and all(v == 0.0 for b in self.biases.values() for v in b)

    # -- files -----------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Patch:
        return load_document(cls, Path(path), "patch", PatchError)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(Path(path), self.model_dump_json(indent=2) + "\n")


Document = TypeVar("Document", bound=BaseModel)


def read_text(path: Path, what: str, error: type[ValueError]) -> str:
    try:
        return path.read_text()
    except OSError as err:
        raise error(f"{path}: cannot read {what}: {err.strerror}") from None


def load_document(cls: type[Document], path: Path, what: str, error: type[ValueError],
                  text: str | None = None) -> Document:
    """A JSON document of `cls` from `path` (or its `text`, read already); `error`, naming the file and each bad
    field, when it cannot be read or is invalid."""
    text = read_text(path, what, error) if text is None else text
    try:
        return cls.model_validate_json(text)
    except ValidationError as err:
        raise error(f"{path}: invalid {what}:\n{format_validation_error(err)}") from None


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, naming the field by its JSON path (e.g. edits.1.gain)."""
    lines = []
    for problem in err.errors():
        loc = list(problem["loc"])
        if len(loc) > 2 and loc[0] == "edits" and loc[2] in EDIT_KINDS:
            del loc[2]  # the union's tag: edits.0.gain.gain reads edits.0.gain
        where = ".".join(str(part) for part in loc) or "(document)"
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def json_schema() -> dict[str, Any]:
    return json_schema_of(Patch, "recallfix Patch", SCHEMA_PATH)


def write_json_schema(path: Path = SCHEMA_PATH) -> Path:
    return write_json_schema_of(Patch, "recallfix Patch", path)
