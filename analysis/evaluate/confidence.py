"""The confidence calibrators of calibration.json: per variant (the base model, each patch), the family chosen and
fitted on the dev split (`learn.calibrators`), then measured on the test split against the raw top-1 probability.

Measures (`calibration.CONFIDENCE_METRICS`): ECE, Brier and log loss of "the answer is right"; selective accuracy
at 50% and 80% coverage and the risk-coverage area (abstaining on the least confident). Intervals: the cluster
bootstrap over subjects, the same resamples for raw and calibrated (paired differences). On a relation split the
test relations are unseen by the fit, so `by_relation` is how a calibrator holds on new kinds of question.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn

from recallfix.patches import Patch, __version__
from recallfix.patches.calibrator import CALIBRATION_TOP_K, CalibrationFile, VariantCalibration, final_block_fingerprint
from recallfix.patches.patch import Provenance

from .. import calibration as cal
from ..learn.calibrators import Choice, choose_calibrator
from ..mechanism.summaries import num
from ..records import Dist
from ..schema import CalibrationSummary, CalibratorFamilyScore, VariantConfidence


def measure(choice: Choice, variant_id: str, test: Dist, groups: Sequence[str], relations: Sequence[str],
            n_boot: int, seed: int) -> VariantConfidence:
    """The chosen calibrator on the test split, against the raw top-1 probability."""
    correct = test.correct.numpy()
    raw = {"confidence": test.confidence.double().numpy(), "correct": correct}
    calibrated = {"confidence": choice.calibrator.predict(test.top_logprobs.double().numpy()), "correct": correct}
    s = cal.sampled({"raw": raw, "calibrated": calibrated}, cal.group_resamples(groups, n_boot, seed),
                    cal.CONFIDENCE_METRICS)

    by_relation = {}
    rel = np.asarray(relations)
    for relation in sorted(set(relations)):
        rows = rel == relation
        r, c = {k: v[rows] for k, v in raw.items()}, {k: v[rows] for k, v in calibrated.items()}
        by_relation[relation] = {"n": float(rows.sum()), "ece_raw": num(cal.CONFIDENCE_METRICS["ece"](r)),
                                 "ece_calibrated": num(cal.CONFIDENCE_METRICS["ece"](c)),
                                 "aurc_raw": num(cal.CONFIDENCE_METRICS["aurc"](r)),
                                 "aurc_calibrated": num(cal.CONFIDENCE_METRICS["aurc"](c))}
    return VariantConfidence(
        calibrator_id=variant_id, family=choice.calibrator.family, choice=choice.why,
        families=[CalibratorFamilyScore(family=s.family, log_loss=num(s.log_loss), ece=num(s.ece), aurc=num(s.aurc))
                  for s in choice.scores],
        raw=s.estimates("raw"), calibrated=s.estimates("calibrated"), difference=s.difference("calibrated", "raw"),
        reliability_raw=cal.reliability_of(raw["confidence"], correct),
        reliability_calibrated=cal.reliability_of(calibrated["confidence"], correct),
        risk_coverage_raw=cal.risk_at_points(raw["confidence"], correct),
        risk_coverage_calibrated=cal.risk_at_points(calibrated["confidence"], correct),
        by_relation=by_relation,
    )


def calibrate(model: nn.Module, dev: dict[str, Dist], test: dict[str, Dist], patches: dict[str, Patch],
              dev_relations: Sequence[str], dev_groups: Sequence[str], test_relations: Sequence[str],
              test_groups: Sequence[str], fitted_on: str, n_boot: int, seed: int,
              command: str, recommended: str | None = None) -> tuple[CalibrationFile, CalibrationSummary]:
    """One calibrator per variant of `dev` (keys: base and each method of `patches`), and what it does on test."""
    variants, summaries, folds = {}, {}, ""
    for name, dev_dist in dev.items():
        choice = choose_calibrator(dev_dist.top_logprobs.double().numpy(), dev_dist.correct.numpy(), dev_relations,
                                   dev_groups, seed)
        variant = VariantCalibration(patch_id=patches[name].id if name in patches else None,
                                     calibrator=choice.calibrator)
        variants[name], folds = variant, choice.folds
        summaries[name] = measure(choice, variant.id, test[name], test_groups, test_relations, n_boot, seed)
    file = CalibrationFile(model=final_block_fingerprint(model),
                           fitted_on=fitted_on, variants=variants, recommended=recommended,
                           provenance=Provenance(tool_version=__version__, command=command))
    return file, CalibrationSummary(file="calibration.json", top_k=CALIBRATION_TOP_K, n_dev=len(dev_groups),
                                    folds=folds, variants=summaries)
