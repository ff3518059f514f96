"""Findings as checks: `--require` turns named findings into PASS/FAIL with an exit code, for CI.

Every finding a check can name is in `finding_values` (and in analysis.json under `values`), each a point
value with its 95% interval where it has one:

    block.lowers_share, block.rescale           the whole final block (held-out test split)
    components.consistent_suppressors           how many final-layer components suppress consistently
    component.<NAME>.lowers_share, .mean_effect each final-layer component (e.g. component.L29H0.mean_effect)
    <METHOD>.<change>                           a patch on the test split against the base model; METHOD is
                                                gains, intercept, or patch (the one written as patch.json):
        accuracy_change, p_answer_change, ece_change, nll_change       patched - base
        accuracy_vs_temperature, ece_vs_temperature                    patched - temperature-scaled
        unknown_confidence_change                                      unknown subjects' mean top-1, patched - base
        neutral_nll_change                                             relative change of neutral-text NLL
        block_lowers_share                                             block.lowers_share with the patch applied

A check is `NAME OP NUMBER` with OP one of <, <=, >, >=; NAME may end in `.ci_low` or `.ci_high` to test an
interval's bound. `--require` takes a check, a check-set file (JSON, `CheckSet`), or the name of a shipped set
in `analysis/checks/` (`demo`: the demo model's criteria). A finding that was not measured fails its check.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from ..data.inputs import AnalysisError
from ..schema import CheckResult, EstimateModel, Evaluation, Findings

CHECKS_DIR = Path(__file__).with_name("checks")
OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge, "<": operator.lt,
                                                  ">": operator.gt}
_EXPRESSION = re.compile(r"^\s*([\w.]+)\s*(<=|>=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
BOUNDS = ("ci_low", "ci_high")
CHANGES = {  # finding -> (set, metric, model it is compared with)
    "accuracy_change": ("accuracy", "base"), "p_answer_change": ("mean_p_answer", "base"),
    "ece_change": ("ece_equal_width", "base"), "nll_change": ("nll", "base"),
    "accuracy_vs_temperature": ("accuracy", "temperature"), "ece_vs_temperature": ("ece_equal_width", "temperature"),
}


METHOD_FINDINGS = (*CHANGES, "unknown_confidence_change", "neutral_nll_change", "block_lowers_share")
_FINDING = re.compile(r"^(block\.(lowers_share|rescale)|components\.consistent_suppressors"
                      r"|component\.L\d+(H\d+|N\d+|MLP|attn_bias)\.(lowers_share|mean_effect)"
                      rf"|(gains|intercept|patch)\.({'|'.join(METHOD_FINDINGS)}))(\.(ci_low|ci_high))?$")


class CheckSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    require: str
    description: str = ""


class CheckSet(BaseModel):
    """A check-set file: `{"description": ..., "checks": [{"name", "require", "description"}]}`."""

    model_config = ConfigDict(extra="forbid")
    description: str = ""
    checks: list[CheckSpec]


@dataclass(frozen=True)
class Check:
    name: str
    finding: str
    op: str
    threshold: float
    description: str
    source: str

    @property
    def expression(self) -> str:
        return f"{self.finding} {self.op} {self.threshold:g}"


def parse_check(text: str, *, name: str | None = None, description: str = "", source: str = "command line") -> Check:
    match = _EXPRESSION.match(text)
    if not match:
        raise AnalysisError(f"--require: {text!r} is not a check set, a file or 'FINDING OP NUMBER' "
                            f"(OP one of {', '.join(OPS)}; e.g. 'block.lowers_share >= 0.8')")
    finding, op, number = match.groups()
    if not _FINDING.match(finding):
        raise AnalysisError(f"--require: no finding named {finding!r} (see `recallfix analyze --help` or analysis.json "
                            f"'values'; e.g. block.lowers_share, component.L29H0.mean_effect, patch.nll_change)")
    return Check(name=name or text.strip(), finding=finding, op=op, threshold=float(number), description=description,
                 source=source)


def shipped_check_sets() -> list[str]:
    return sorted(p.stem for p in CHECKS_DIR.glob("*.json"))


def load_check_set(path: Path, source: str) -> list[Check]:
    try:
        spec = CheckSet.model_validate_json(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise AnalysisError(f"{path}: cannot read the check set: {err}") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise AnalysisError(f"{path}: {where or 'document'}: {first['msg']}") from None
    out = []
    for i, c in enumerate(spec.checks):
        try:
            out.append(parse_check(c.require, name=c.name, description=c.description, source=source))
        except AnalysisError as err:
            raise AnalysisError(f"{path}: checks.{i}.require: {err}") from None
    return out


def load_checks(specs: Sequence[str]) -> list[Check]:
    """Each `--require` value: a shipped set's name, a check-set file, or one check."""
    out: list[Check] = []
    for spec in specs:
        if _EXPRESSION.match(spec):
            out.append(parse_check(spec))
        elif (CHECKS_DIR / f"{spec}.json").is_file():
            out += load_check_set(CHECKS_DIR / f"{spec}.json", spec)
        elif Path(spec).is_file():
            out += load_check_set(Path(spec), spec)
        elif spec.endswith(".json"):
            raise AnalysisError(f"--require: {spec}: no such check-set file")
        else:
            parse_check(spec)  # raises with the syntax
    return out


def _value(value: float | None) -> EstimateModel:
    return EstimateModel(value=value, ci_low=None, ci_high=None)


def finding_values(findings: Findings, evaluation: Evaluation | None) -> dict[str, EstimateModel]:
    """Every finding a check can name (see the module docstring)."""
    test = findings.test
    out = {"block.lowers_share": EstimateModel(value=test.share_suppressed, ci_low=test.share_suppressed_ci[0],
                                               ci_high=test.share_suppressed_ci[1]),
           "block.rescale": findings.rescale,
           "components.consistent_suppressors": _value(float(len(findings.suppressors)))}
    for f in findings.components:
        out[f"component.{f.name}.lowers_share"] = EstimateModel(value=f.share_lowers, ci_low=f.share_lowers_ci[0],
                                                                ci_high=f.share_lowers_ci[1])
        out[f"component.{f.name}.mean_effect"] = EstimateModel(value=f.mean_effect, ci_low=f.mean_effect_ci[0],
                                                               ci_high=f.mean_effect_ci[1])
    if evaluation is None:
        return out
    for method in [m.name for m in evaluation.methods]:
        prefixes = [method] + (["patch"] if method == evaluation.chosen else [])
        diffs = evaluation.test.differences
        values = {key: diffs[f"{method}_minus_{other}"][metric] for key, (metric, other) in CHANGES.items()}
        if evaluation.unknown is not None:
            values["unknown_confidence_change"] = evaluation.unknown.differences[f"{method}_minus_base"][
                "mean_confidence"]
        neutral = evaluation.neutral.get(method)
        if neutral is not None:
            values["neutral_nll_change"] = EstimateModel(value=neutral.relative_change,
                                                         ci_low=neutral.relative_change_ci[0],
                                                         ci_high=neutral.relative_change_ci[1])
        after = evaluation.suppression_after_patch[method]
        values["block_lowers_share"] = EstimateModel(value=after.share_suppressed, ci_low=after.share_suppressed_ci[0],
                                                     ci_high=after.share_suppressed_ci[1])
        out.update({f"{prefix}.{key}": v for prefix in prefixes for key, v in values.items()})
    return out


def run_checks(checks: Sequence[Check], values: dict[str, EstimateModel]) -> list[CheckResult]:
    """Each check on the point value (or the named bound); a finding that was not measured fails."""
    out = []
    for c in checks:
        name, _, bound = c.finding.rpartition(".")
        key, field = (name, bound) if bound in BOUNDS else (c.finding, "value")
        found = values.get(key)
        value = getattr(found, field) if found is not None else None
        out.append(CheckResult(name=c.name, expression=c.expression, description=c.description, source=c.source,
                               value=value, ci_low=found.ci_low if found else None,
                               ci_high=found.ci_high if found else None,
                               passed=value is not None and OPS[c.op](value, c.threshold)))
    return out
