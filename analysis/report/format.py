"""How numbers look in the Markdown reports (the analysis' and compare's): one format for both."""

from __future__ import annotations

from collections.abc import Sequence

from ..schema import CheckResult, EstimateModel

# The models of an evaluation, as every table and plot names them.
MODEL_LABELS = {"base": "base", "gains": "learned gains", "suppress": "suppress-only gains",
                "intercept": "intercept removed (paper)", "temperature": "temperature-scaled"}


def number(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def estimate(e: EstimateModel | CheckResult, fmt: str = ".3f") -> str:
    if e.value is None:
        return "n/a"
    if e.ci_low is None or e.ci_high is None:
        return format(e.value, fmt)
    return f"{format(e.value, fmt)} [{format(e.ci_low, fmt)}, {format(e.ci_high, fmt)}]"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


METRIC_LABELS = {
    "accuracy": "accuracy", "mean_p_answer": "mean p(answer)", "mean_confidence": "mean top-1 probability",
    "ece_equal_width": "ECE (15 equal-width bins)", "ece_equal_mass": "ECE (15 equal-mass bins)",
    "brier": "Brier (multi-class)", "nll": "NLL (nats)", "auroc": "AUROC (confidence vs correct)",
}

# The measures of a confidence that the answer is right (`calibration.CONFIDENCE_METRICS`).
CONFIDENCE_LABELS = {"ece": "ECE (15 bins)", "brier": "Brier", "log_loss": "log loss",
                     "selective_accuracy_50": "accuracy of the 50% most confident",
                     "selective_accuracy_80": "accuracy of the 80% most confident",
                     "aurc": "risk-coverage area (lower: better ranking)"}
