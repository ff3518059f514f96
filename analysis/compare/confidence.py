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

import numpy as np

from recallfix.patches.calibrator import CalibrationError, CalibrationFile, VariantCalibration

from .. import calibration as cal
from ..records import Dist
from ..schema import AnalysisResult, Metrics
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


def _set(cols: dict[str, cal.Columns], resamples: Sequence[np.ndarray]) -> tuple[ConfidenceSet, dict, dict]:
    point = {key: {m: fn(o) for m, fn in cal.CONFIDENCE_METRICS.items()} for key, o in cols.items()}
    samples = {key: cal.sample_metrics(o, resamples, cal.CONFIDENCE_METRICS) for key, o in cols.items()}
    a, b = MODELS
    return ConfidenceSet(
        models={key: {m: cal.estimate(point[key][m], samples[key][m]) for m in cal.CONFIDENCE_METRICS}
                for key in cols},
        difference={m: cal.estimate(point[b][m] - point[a][m], samples[b][m] - samples[a][m])
                    for m in cal.CONFIDENCE_METRICS}), point, samples


def confidence_comparison(dists: dict[str, Dist], groups: Sequence[str], n_boot: int, seed: int,
                          calibration: Path | None = None,
                          calibrators: dict[str, tuple[str, VariantCalibration]] | None = None,
                          ) -> ConfidenceComparison:
    """Raw (and calibrated) confidence measures of A and B on the same facts, B - A paired."""
    resamples = cal.group_resamples(groups, n_boot, seed)
    raw_cols = {key: {"confidence": d.confidence.double().numpy(), "correct": d.correct.numpy()}
                for key, d in dists.items()}
    raw, raw_point, raw_samples = _set(raw_cols, resamples)
    curves = {f"{key} raw": cal.risk_at_points(o["confidence"], o["correct"]) for key, o in raw_cols.items()}
    calibrated, changes = None, {}
    if calibrators:
        cols = {key: {"confidence": calibrators[key][1].calibrator.predict(d.top_logprobs.double().numpy()),
                      "correct": d.correct.numpy()} for key, d in dists.items()}
        calibrated, point, samples = _set(cols, resamples)
        curves |= {f"{key} calibrated": cal.risk_at_points(o["confidence"], o["correct"]) for key, o in cols.items()}
        changes = {key: _minus(point[key], samples[key], raw_point[key], raw_samples[key]) for key in cols}
    return ConfidenceComparison(
        calibration=str(calibration) if calibration else None,
        calibrators={key: f"{name} ({variant.id})" for key, (name, variant) in (calibrators or {}).items()},
        raw=raw, calibrated=calibrated, calibrated_minus_raw=changes, risk_coverage=curves)


def _minus(point: dict[str, float], samples: dict[str, np.ndarray], point_0: dict[str, float],
           samples_0: dict[str, np.ndarray]) -> Metrics:
    return {m: cal.estimate(point[m] - point_0[m], samples[m] - samples_0[m]) for m in cal.CONFIDENCE_METRICS}
