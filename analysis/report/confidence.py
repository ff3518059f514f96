"""The report's section on the confidence calibrators of calibration.json (numbers from `CalibrationSummary`)."""

from __future__ import annotations

from ..calibration import ece_floor
from ..schema import AnalysisResult, CalibrationSummary
from .format import CONFIDENCE_LABELS, MODEL_LABELS, estimate, md_table, number


def _image(files: dict[str, str], key: str, alt: str) -> str:
    return f"\n![{alt}]({files[key]})\n" if key in files else ""


def _measures(c: CalibrationSummary) -> str:
    rows = [[MODEL_LABELS[name] if i == 0 else "", label, estimate(v.raw[m]), estimate(v.calibrated[m]),
             estimate(v.difference[m], "+.3f")]
            for name, v in c.variants.items() for i, (m, label) in enumerate(CONFIDENCE_LABELS.items())]
    return md_table(["variant", "test split", "raw top-1 probability", "calibrated", "calibrated − raw"], rows)


def _floors(c: CalibrationSummary) -> str:
    """What ECE a perfectly calibrated confidence would show on the same test prompts: the noise floor."""
    parts = [f"{MODEL_LABELS[name]} {number(ece_floor(v.reliability_raw))} raw, "
             f"{number(ece_floor(v.reliability_calibrated))} calibrated" for name, v in c.variants.items()]
    return ("\nECE is biased upward at this many prompts: a perfectly calibrated confidence with the same confidences "
            "would show, in expectation (`calibration.ece_floor`), " + "; ".join(parts) + ". An ECE near its floor "
            "is as calibrated as these prompts can show.\n")


def _families(c: CalibrationSummary) -> str:
    families = [s.family for s in next(iter(c.variants.values())).families]
    rows = [[MODEL_LABELS[name], f"**{v.family}**", *(number(s.log_loss, ".4f") for s in v.families)]
            for name, v in c.variants.items()]
    return md_table(["variant", "chosen", *(f"{f}: held-out log loss" for f in families)], rows)


def _relations(d: AnalysisResult, c: CalibrationSummary) -> str:
    fitted_on = set(d.data.split_relations.get("dev", []))
    base = c.variants["base"]
    rows = [[relation, "yes" if relation in fitted_on else "**no**", number(r["n"], ".0f"),
             f"{number(r['ece_raw'])} → {number(r['ece_calibrated'])}",
             f"{number(r['aurc_raw'])} → {number(r['aurc_calibrated'])}"] for relation, r in base.by_relation.items()]
    return md_table(["test relation", "in dev (the calibrator's fit)", "prompts", "ECE raw → calibrated",
                     "risk-coverage area raw → calibrated"], rows)


def confidence_section(d: AnalysisResult) -> list[str]:
    c = d.evaluation.calibration if d.evaluation else None
    if c is None:
        return []
    out = ["\n## 7. A calibrated confidence for every answer (calibration.json)\n",
           f"Per variant, a calibrator maps the top {c.top_k} log-probabilities of an answer's first token to the "
           "probability that the answer is right (`recallfix serve --calibration` applies it to every reply). The "
           f"family is chosen on the dev split ({c.n_dev} prompts) by its log loss on prompts held out of its fit, "
           f"{c.folds}: a served calibrator meets questions of kinds it was not fitted on, so the family that holds "
           "there is preferred over the one that fits dev best. identity, platt and isotonic re-map the top-1 "
           "probability and keep its order of answers; logistic also reads the runner-up and the spread of the top "
           "k, logistic-tail besides the probability left outside them, and both can re-rank answers (the "
           "risk-coverage area changes only then).\n",
           _families(c), "\n" + "\n".join(f"* {MODEL_LABELS[name]}: {v.choice}." for name, v in c.variants.items()),
           "\nOn the held-out test split, with paired 95% intervals over subjects:\n", _measures(c), _floors(c),
           f"\n#### Per test relation, base model ({d.data.split_by} split)\n\n" + _relations(d, c),
           _image(d.files, "plot_calibration", "reliability before and after calibration"),
           _image(d.files, "plot_risk_coverage", "risk-coverage")]
    return out
