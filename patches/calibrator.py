"""The calibration file: per variant, the map from an answer's first-token log-probabilities to P(answer right).

`recallfix analyze` fits one calibrator per variant (the base model, each patch) on the dev split and writes
them to RUN/calibration.json; `recallfix serve --calibration` applies the one of the variant that answered to the
top-K log-probabilities vLLM returns for the first generated token (K = `CALIBRATION_TOP_K`, sorted, most likely
first). Its families, with p1 the largest probability:

    identity       c = p1
    platt          c = sigmoid(a logit(p1) + b)              (Platt scaling of the raw confidence)
    isotonic       c = the monotone step fit of correctness on p1, linear between its knots (pool adjacent violators)
    logistic       c = sigmoid(w . phi + b), phi: logit(p1), the runner-up's distance, the spread of the top K
    logistic-tail  the same on log p1 and log(1 - p1) (beta calibration's terms, which contain logit(p1)), the
                   runner-up, the spread, and the probability left outside the top K

The file names the features each weighted calibrator reads (`FEATURES`). identity, platt and isotonic only re-map
p1, so they keep its order of answers (what abstention and the risk-coverage curve rank by); the logistic families
can re-rank. The file is fingerprinted like a patch: the model's shape and the sha256 of its final block's output
projections, and per variant the id of the patch it was fitted with. A file for another model or patch is refused.
Schema 1 files (features unnamed) are read as the same calibrators with their features named.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .checkpoint import Checkpoint, check_shape, check_tensors, model_tensors
from .components import ComponentMap
from .io import atomic_write_text, json_schema_of, write_json_schema_of
from .patch import FingerprintMismatchError, GainEdit, ModelFingerprint, Patch, Provenance, load_document, read_text
from .rule import GetTensor, HasTensor, fingerprint

CALIBRATION_TOP_K = 20  # the first token's log-probabilities a calibrator reads (vLLM: logprobs=20)
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: before the features were named
SCHEMA_PATH = Path(__file__).with_name("calibration.schema.json")
Family = Literal["identity", "platt", "isotonic", "logistic", "logistic-tail"]
FAMILIES: tuple[Family, ...] = ("identity", "platt", "isotonic", "logistic", "logistic-tail")
Feature = Literal["logit_p1", "log_p1", "log1m_p1", "margin", "entropy", "log_tail"]
# What each weighted family reads (and schema 1 files, which left them unnamed: platt and logistic as here).
FAMILY_FEATURES: dict[str, tuple[Feature, ...]] = {
    "platt": ("logit_p1",),
    "logistic": ("logit_p1", "margin", "entropy"),
    "logistic-tail": ("log_p1", "log1m_p1", "margin", "entropy", "log_tail"),
}
P_CLIP = 1e-6  # p1, 1 - p1, the tail and the calibrated probability stay in [P_CLIP, 1 - P_CLIP]
MAX_MARGIN = 30.0  # log p1 - log p2 when only one log-probability came back


def _unreadable(version: object) -> str:
    return f"schema_version: {version} is not one this recallfix reads ({', '.join(map(str, READABLE_VERSIONS))})"


class CalibrationError(ValueError):
    """A calibration file that cannot be read, or does not belong to the served model or patch."""


def feature_columns(top_logprobs: np.ndarray, names: Sequence[Feature]) -> np.ndarray:
    """[N, k] log-probabilities, most likely first (-inf pads missing ones) -> [N, len(names)] (`FEATURES`)."""
    top = np.asarray(top_logprobs, dtype=np.float64)
    if top.ndim != 2 or top.shape[1] < 1:
        raise ValueError(f"top_logprobs: expected [N, k] with k >= 1, got shape {top.shape}")
    p1 = np.clip(np.exp(top[:, 0]), P_CLIP, 1 - P_CLIP)
    return np.stack([FEATURES[name](top, p1) for name in names], axis=1).reshape(len(top), len(names))


def _margin(top: np.ndarray, p1: np.ndarray) -> np.ndarray:
    margin = np.minimum(top[:, 0] - top[:, 1], MAX_MARGIN) if top.shape[1] > 1 else np.full(len(top), MAX_MARGIN)
    return np.where(np.isfinite(margin), margin, MAX_MARGIN)


def _entropy(top: np.ndarray, p1: np.ndarray) -> np.ndarray:
    shifted = np.where(np.isfinite(top), top - top[:, :1], -np.inf)
    q = np.exp(shifted)
    q /= q.sum(axis=1, keepdims=True)
    return -np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0).sum(axis=1)


def _log_tail(top: np.ndarray, p1: np.ndarray) -> np.ndarray:
    inside = np.exp(top).sum(axis=1)  # exp(-inf) = 0: a missing log-probability adds nothing
    return np.log(np.clip(1.0 - inside, P_CLIP, 1.0))


FEATURES: dict[Feature, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {  # (top [N, k], p1 [N]) -> [N]
    "logit_p1": lambda top, p1: np.log(p1) - np.log1p(-p1),
    "log_p1": lambda top, p1: np.log(p1),
    "log1m_p1": lambda top, p1: np.log1p(-p1),
    "margin": _margin,  # log p1 - log p2: how far the runner-up is
    "entropy": _entropy,  # of the top K renormalised: how spread they are
    "log_tail": _log_tail,  # log(1 - their total probability): the mass outside them
}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warning for large |x|


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Calibrator(Strict):
    family: Family
    features: list[Feature] = Field(default_factory=list, description="platt: [logit_p1]; logistic, logistic-tail: "
                                                                      "the features weighed, in coef's order; "
                                                                      "others: []")
    coef: list[float] = Field(default_factory=list, description="platt, logistic, logistic-tail: a weight per "
                                                                "feature, then the intercept; others: []")
    knots_x: list[float] = Field(default_factory=list, description="isotonic: p1 at the knots, increasing")
    knots_y: list[float] = Field(default_factory=list, description="isotonic: P(right) at the knots, non-decreasing")

    @model_validator(mode="after")
    def _consistent(self) -> Calibrator:
        weighted = self.family in FAMILY_FEATURES
        if self.family == "platt" and tuple(self.features) != FAMILY_FEATURES["platt"]:
            raise ValueError(f"features: platt reads {list(FAMILY_FEATURES['platt'])}, got {self.features}")
        if weighted and (not self.features or len(set(self.features)) != len(self.features)):
            raise ValueError(f"features: {self.family} needs distinct features to weigh, got {self.features}")
        if not weighted and self.features:
            raise ValueError(f"features: {self.family} reads p1 only, got {self.features}")
        if len(self.coef) != (len(self.features) + 1 if weighted else 0):
            want = f"{len(self.features) + 1} (a weight per feature, then the intercept)" if weighted else "none"
            raise ValueError(f"coef: {self.family} takes {want}, got {len(self.coef)}")
        if (self.family == "isotonic") != bool(self.knots_x):
            raise ValueError("knots_x: isotonic needs knots, the other families take none")
        if len(self.knots_x) != len(self.knots_y):
            raise ValueError(f"knots_y: {len(self.knots_y)} values for {len(self.knots_x)} knots")
        if not all(math.isfinite(v) for v in [*self.coef, *self.knots_x, *self.knots_y]):
            raise ValueError("coef, knots_x and knots_y must be finite")
        if any(np.diff(self.knots_x) <= 0):
            raise ValueError("knots_x must be strictly increasing")
        if any(np.diff(self.knots_y) < 0) or not all(0 <= y <= 1 for y in self.knots_y):
            raise ValueError("knots_y must be non-decreasing probabilities")
        return self

    def predict(self, top_logprobs: np.ndarray) -> np.ndarray:
        """P(answer right) for each row of [N, k] first-token log-probabilities (most likely first)."""
        top = np.asarray(top_logprobs, dtype=np.float64)
        if self.family == "identity":
            out = np.exp(top[:, 0])
        elif self.family == "isotonic":
            out = np.interp(np.exp(top[:, 0]), self.knots_x, self.knots_y)
        else:
            out = _sigmoid(feature_columns(top, self.features) @ np.asarray(self.coef[:-1]) + self.coef[-1])
        return np.clip(out, P_CLIP, 1 - P_CLIP)

    def apply(self, top_logprobs: Sequence[float]) -> float:
        """P(answer right) of one answer from its first token's log-probabilities, most likely first."""
        return float(self.predict(np.asarray([sorted(top_logprobs, reverse=True)], dtype=np.float64))[0])


class VariantCalibration(Strict):
    patch_id: str | None = Field(description="the patch it was fitted with (null: the base model)")
    calibrator: Calibrator

    @property
    def id(self) -> str:
        """Short content hash: what a served reply names as its calibrator."""
        body = json.dumps(self.model_dump(), sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:12]


class CalibrationFile(Strict):
    schema_version: int = Field(SCHEMA_VERSION, description="2; 1 (features unnamed) is read as 2")
    model: ModelFingerprint = Field(description="the model's shape and the sha256 of its final block's output "
                                                "projections, as a patch fingerprints what it touches")
    top_k: int = Field(CALIBRATION_TOP_K, ge=2, description="first-token log-probabilities the calibrators read")
    fitted_on: str = Field(description="the prompts the calibrators were fitted on, in words")
    variants: dict[str, VariantCalibration] = Field(min_length=1, description="base, and each patch's method")
    recommended: str | None = Field(None, description="the variant analyze recommends (its patch.json); null: none "
                                                      "(what `recallfix router` serves as the patched one)")
    provenance: Provenance

    @model_validator(mode="before")
    @classmethod
    def _from_schema_1(cls, data: Any) -> Any:
        """A schema 1 file's platt and logistic calibrators, with the features they read named."""
        if not isinstance(data, dict) or data.get("schema_version") != 1 or not isinstance(data.get("variants"), dict):
            return data
        variants = {}
        for name, v in data["variants"].items():
            c = v.get("calibrator") if isinstance(v, dict) else None
            if isinstance(c, dict) and c.get("family") in ("platt", "logistic") and "features" not in c:
                v = {**v, "calibrator": {**c, "features": list(FAMILY_FEATURES[c["family"]])}}
            variants[name] = v
        return {**data, "schema_version": SCHEMA_VERSION, "variants": variants}

    @model_validator(mode="after")
    def _known_version(self) -> CalibrationFile:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(_unreadable(self.schema_version))
        return self

    def for_patch(self, patch: Patch | None) -> tuple[str, VariantCalibration]:
        """The variant fitted with `patch` (None: the base model), or CalibrationError naming those there are."""
        wanted = patch.id if patch is not None else None
        for name, variant in self.variants.items():
            if variant.patch_id == wanted:
                return name, variant
        have = ", ".join(f"{n} ({v.patch_id or 'base model'})" for n, v in self.variants.items())
        what = f"patch {wanted}" if wanted else "the base model"
        raise CalibrationError(f"the calibration file has no calibrator for {what}; it has: {have}")

    @classmethod
    def load(cls, path: str | Path) -> CalibrationFile:
        path = Path(path)
        text = read_text(path, "calibration file", CalibrationError)
        try:
            version = json.loads(text).get("schema_version")
        except (ValueError, AttributeError):
            version = SCHEMA_VERSION  # not a JSON object: the validation says so
        if version not in READABLE_VERSIONS:
            raise CalibrationError(f"{path}: {_unreadable(version)}")
        return load_document(cls, path, "calibration file", CalibrationError, text)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(Path(path), self.model_dump_json(indent=2) + "\n")


def _final_block_access(model: str | Path | Checkpoint | nn.Module) -> tuple[ComponentMap, GetTensor, HasTensor]:
    """The component map and tensor access of a loaded model, a `Checkpoint`, or a checkpoint directory or hub name
    (a checkpoint is read lazily: only the tensors asked for)."""
    if isinstance(model, nn.Module):
        return ComponentMap(model), *model_tensors(model)
    ckpt = model if isinstance(model, Checkpoint) else Checkpoint.open(model)
    return ckpt.cmap, ckpt.get, ckpt.has


def final_block_fingerprint(model: str | Path | Checkpoint | nn.Module) -> ModelFingerprint:
    """The model's shape and the sha256 of its final block's output projections (what every head and the MLP
    write through): a calibration file's tie to the model it was fitted on."""
    return _fingerprint(*_final_block_access(model))


def _fingerprint(cmap: ComponentMap, get_tensor: GetTensor, has_tensor: HasTensor) -> ModelFingerprint:
    final = cmap.shape.num_layers - 1
    probes = [GainEdit(component=f"L{final}H0", gain=1.0), GainEdit(component=f"L{final}MLP", gain=1.0)]
    return fingerprint(cmap, probes, get_tensor, has_tensor)


def check_calibration_against(model: str | Path | Checkpoint | nn.Module, calibration: CalibrationFile,
                              patch: Patch | None = None) -> tuple[str, VariantCalibration]:
    """The variant of `calibration` for `patch` (None: the base model) on `model` (a loaded model, a `Checkpoint`,
    or a checkpoint directory or hub name; only the final block's output projections are read). A file fitted on
    another model, or without a calibrator for this patch, is refused with a CalibrationError that says why."""
    cmap, get_tensor, has_tensor = _final_block_access(model)
    expected = calibration.model
    try:
        check_shape(expected, cmap, "the calibration file was fitted on")
        ours = _fingerprint(cmap, get_tensor, has_tensor)
        if sorted(ours.tensors) != sorted(expected.tensors):
            raise FingerprintMismatchError(f"model.tensors: the file fingerprints {sorted(expected.tensors)}, this "
                                           f"model's final block writes through {sorted(ours.tensors)}")
        check_tensors(expected, get_tensor, "the calibration file was fitted on another checkpoint")
    except FingerprintMismatchError as err:
        raise CalibrationError(f"calibration file refused: {err}") from None
    return calibration.for_patch(patch)


def json_schema() -> dict[str, object]:
    return json_schema_of(CalibrationFile, "recallfix calibration file", SCHEMA_PATH)


def write_json_schema(path: Path = SCHEMA_PATH) -> Path:
    return write_json_schema_of(CalibrationFile, "recallfix calibration file", path)
