"""`recallfix compare`'s confidence section: how well each model's confidence that its answer is right is calibrated
and ranks its answers, raw and (with `--calibration RUN/calibration.json`) after the model's own calibrator.

The calibrator reads the top-k log-probabilities at the answer's first position that `score` asked for, as the
server's reply to a generation would carry them. Which calibrator belongs to which model is named with
`--calibrators A,B` (variants of the file: `base`, `gains`, ...); `auto` for B is the --run's recommended patch
(patch.json), else the file's only patch. The servers cannot be fingerprinted over HTTP, so the file's variants
are checked against the --run's patches where one is given, and the mapping is recorded in results.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from recallfix.patches.calibrator import CalibrationError, CalibrationFile, VariantCalibration

from .. import calibration as cal
from ..records import Dist
from ..schema import AnalysisResult
from .client import CompareError
from .schema import ConfidenceComparison, ConfidenceSet

MODELS = ("A", "B")


def resolve_calibrators(path: Path, names: str, run: Path | None) -> dict[str, tuple[str, VariantCalibration]]:
    """A and B -> (variant name, its calibrator) of the calibration file at `path`, as `names` ("A,B") says."""
    try:
        file = CalibrationFile.load(path)
    except CalibrationError as err:
        raise CompareError(str(err)) from None
    chosen = names.split(",")
    if len(chosen) != 2:
        raise CompareError(f"--calibrators: expected two variant names A,B, got {names!r}")
    result = AnalysisResult.model_validate_json((run / "analysis.json").read_text()) if run else None
    if chosen[1] == "auto":
        patches = [n for n, v in file.variants.items() if v.patch_id is not None]
        if result is not None and result.evaluation is not None and result.evaluation.chosen:
            chosen[1] = result.evaluation.chosen
        elif len(patches) == 1:
            chosen[1] = patches[0]
        else:
            raise CompareError(f"--calibrators: B is 'auto', but {path} has {len(patches)} patch variants and no "
                               f"--run recommends one: name it ({', '.join(file.variants)})")
    out = {}
    for key, name in zip(MODELS, chosen, strict=True):
        if name not in file.variants:
            raise CompareError(f"--calibrators: {path} has no variant {name!r} ({', '.join(file.variants)})")
        out[key] = (name, file.variants[name])
    if result is not None and result.evaluation is not None:  # the file must be the run's own
        ids = {m.name: m.patch_id for m in result.evaluation.methods}
        for name, variant in out.values():
            if variant.patch_id is not None and ids.get(name) != variant.patch_id:
                raise CompareError(f"--calibration: {path}'s {name} was fitted with patch {variant.patch_id}, the "
                                   f"--run's {name} is {ids.get(name)}: use the run's own calibration.json")
    return out


def _set(s: cal.Sampled, kind: str) -> ConfidenceSet:
    return ConfidenceSet(models={key: s.estimates(f"{key} {kind}") for key in MODELS},
                         difference=s.difference(f"B {kind}", f"A {kind}"))


def confidence_comparison(dists: dict[str, Dist], groups: Sequence[str], n_boot: int, seed: int,
                          calibration: Path | None = None,
                          calibrators: dict[str, tuple[str, VariantCalibration]] | None = None,
                          ) -> ConfidenceComparison:
    """Raw (and calibrated) confidence measures of A and B on the same facts, B - A paired."""
    cols = {f"{key} raw": {"confidence": d.confidence.double().numpy(), "correct": d.correct.numpy()}
            for key, d in dists.items()}
    if calibrators:
        cols |= {f"{key} calibrated": {"confidence": calibrators[key][1].calibrator.predict(
            d.top_logprobs.double().numpy()), "correct": d.correct.numpy()} for key, d in dists.items()}
    s = cal.sampled(cols, cal.group_resamples(groups, n_boot, seed), cal.CONFIDENCE_METRICS)
    curves = {name: cal.risk_at_points(o["confidence"], o["correct"]) for name, o in cols.items()}
    return ConfidenceComparison(
        calibration=str(calibration) if calibration else None,
        calibrators={key: f"{name} ({variant.id})" for key, (name, variant) in (calibrators or {}).items()},
        raw=_set(s, "raw"), calibrated=_set(s, "calibrated") if calibrators else None,
        calibrated_minus_raw={key: s.difference(f"{key} calibrated", f"{key} raw") for key in dists}
        if calibrators else {}, risk_coverage=curves,
        ece_floor={name: cal.ece_floor(cal.reliability_of(o["confidence"], o["correct"])) for name, o in cols.items()})
