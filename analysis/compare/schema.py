"""The shape of `recallfix compare`'s DIR/results.json (pydantic), exported as `compare.schema.json`.

Estimates and reliability bins are the analysis' own models (`schema`), so both files read alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from recallfix.patches.io import json_schema_of, write_json_schema_of

from ..schema import Metrics, Num, ReliabilityBin, Strict

COMPARE_SCHEMA_VERSION = 2  # 2: confidence (selective accuracy, risk-coverage, calibrators)
COMPARE_SCHEMA_PATH = Path(__file__).with_name("compare.schema.json")


class ModelEndpoint(Strict):
    model: str = Field(description="the model name sent to the server")
    base_url: str = Field(description="the server's OpenAI API root (.../v1)")
    retries: int = Field(description="requests answered 429/503 and sent again")


class McNemar(Strict):
    a_only: int = Field(description="facts model A gets right and model B wrong")
    b_only: int = Field(description="facts model B gets right and model A wrong")
    p_value: float = Field(description="two-sided exact McNemar test (binomial on the discordant facts); it treats "
                                       "facts as independent, which prompts of one subject are not")


class Comparison(Strict):
    n: int = Field(description="facts compared (placed for both models)")
    n_groups: int = Field(description="subjects: the bootstrap resamples these")
    models: dict[str, Metrics] = Field(description="A, B -> metric -> estimate with a 95% bootstrap interval")
    difference: Metrics = Field(description="B - A on the same facts, paired bootstrap interval")
    mcnemar: dict[str, McNemar] = Field(description="accuracy and exact_match: B against A")


class Unplaced(Strict):
    model: str = Field(description="A or B")
    prompt: str
    answer: str
    reason: str


class FactsInfo(Strict):
    path: str
    run: str | None = Field(description="the analysis run whose facts (and split) were used")
    split: str | None
    n_facts: int = Field(description="facts asked")
    n_compared: int = Field(description="facts placed for both models, which every statistic is over")
    n_unplaced: dict[str, int] = Field(description="per model: facts whose answer the tokenizer cannot place")
    unplaced: list[Unplaced]
    relations: dict[str, int] = Field(description="facts compared per relation")


class ConfidenceSet(Strict):
    models: dict[str, Metrics] = Field(description="A, B -> ece, brier, log_loss, selective_accuracy_50, "
                                                   "selective_accuracy_80, aurc, with 95% bootstrap intervals")
    difference: Metrics = Field(description="B - A on the same facts, paired bootstrap interval")


class ConfidenceComparison(Strict):
    """How each model's confidence that its answer is right calibrates and ranks its answers: the raw top-1
    probability, and with --calibration each model's calibrator applied to its first-token log-probabilities."""

    calibration: str | None = Field(description="the calibration file given (null: raw confidence only)")
    calibrators: dict[str, str] = Field(description="A, B -> the file's variant and calibrator id")
    raw: ConfidenceSet
    calibrated: ConfidenceSet | None
    calibrated_minus_raw: dict[str, Metrics] = Field(description="A, B -> calibrated - raw (paired)")
    risk_coverage: dict[str, list[Num]] = Field(description="'A raw', 'B calibrated', ... -> risk at coverage 5%, "
                                                            "10%, ..., 100%")
    ece_floor: dict[str, Num] = Field(default_factory=dict,
                                      description="'A raw', 'B calibrated', ... -> the ECE a perfectly calibrated "
                                                  "confidence would show on these facts, in expectation")


class CompareResult(Strict):
    schema_version: int
    tool_version: str
    created: str
    command: str
    models: dict[str, ModelEndpoint] = Field(description="A and B")
    facts: FactsInfo
    settings: dict[str, Any] = Field(description="the compare settings (CompareConfig)")
    definitions: dict[str, str] = Field(description="what each metric is, over HTTP")
    overall: Comparison
    reliability: dict[str, list[ReliabilityBin]] = Field(description="A, B: equal-width confidence bins")
    by_relation: dict[str, Comparison]
    confidence: ConfidenceComparison
    runtime_s: float
    files: dict[str, str]


TITLE = "recallfix compare"


def json_schema() -> dict[str, Any]:
    return json_schema_of(CompareResult, TITLE, COMPARE_SCHEMA_PATH)


if __name__ == "__main__":  # python -m recallfix.analysis.compare.schema: regenerate the schema file
    print(write_json_schema_of(CompareResult, TITLE, COMPARE_SCHEMA_PATH))
