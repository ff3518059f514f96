"""The confidence calibrators: their math, the choice of a family on held-out relations, the calibration file and
its tie to one model and patch. The analysis run that writes calibration.json is checked in
tests/test_analysis_pipeline.py (`validate_run`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from tiny import save_model

from recallfix.analysis import calibration as cal
from recallfix.analysis.learn.calibrators import choose_calibrator, fit_calibrator, folds_of
from recallfix.patches import make_patch
from recallfix.patches.calibrator import (
    FAMILIES,
    SCHEMA_PATH,
    CalibrationError,
    CalibrationFile,
    Calibrator,
    VariantCalibration,
    check_calibration_against,
    feature_columns,
    final_block_fingerprint,
    json_schema,
)
from recallfix.patches.patch import Provenance

RNG = np.random.default_rng(0)


def top_logprobs(p1: np.ndarray, margin: np.ndarray, k: int = 20) -> np.ndarray:
    """First-token log-probabilities with top-1 probability p1 and log p1 - log p2 = margin; the other k - 2 share
    what is left below p2."""
    lp1 = np.log(p1)
    lp2 = lp1 - margin
    rest = np.log(np.clip(1 - p1 - np.exp(lp2), 1e-9, None) / (k - 2))
    rest = np.minimum(rest, lp2 - 1e-3)
    return np.c_[lp1, lp2, np.repeat(rest[:, None], k - 2, axis=1)]


def synthetic(n: int, truth: str) -> tuple[np.ndarray, np.ndarray]:
    """(top log-probabilities, right/wrong) where P(right) is a known function of p1 or of the margin."""
    p1 = RNG.uniform(0.05, 0.95, n)
    margin = RNG.uniform(0.0, 3.0, n) * np.minimum(1.0, p1 / 0.3)
    logit = np.log(p1) - np.log1p(-p1)
    z = 2.0 * logit - 1.0 if truth == "platt" else 3.0 * margin - 4.0
    return top_logprobs(p1, margin), RNG.random(n) < 1 / (1 + np.exp(-z))


def test_risk_coverage_counts_ties_as_broken_at_random() -> None:
    confidence, correct = np.array([0.9, 0.9, 0.5, 0.2]), np.array([True, False, True, False])
    # order 0.9, 0.9 (one of them wrong: 0.5 expected each), 0.5 (right), 0.2 (wrong)
    assert cal.expected_errors(confidence, correct).tolist() == [0.5, 0.5, 0.0, 1.0]
    assert cal.risk_coverage(confidence, correct).tolist() == pytest.approx([0.5, 0.5, 1 / 3, 0.5])
    assert cal.aurc(confidence, correct) == pytest.approx((0.5 + 0.5 + 1 / 3 + 0.5) / 4)
    assert cal.selective_accuracy(confidence, correct, 0.5) == 0.5  # the two most confident
    assert cal.selective_accuracy(confidence, correct, 0.75) == pytest.approx(2 / 3)
    # a confidence that ranks every right answer first has the smallest area
    assert cal.aurc(correct.astype(float), correct) < cal.aurc(1 - correct.astype(float), correct)


def test_features_and_apply_read_the_sorted_top_k() -> None:
    top = np.log(np.array([[0.5, 0.25, 0.125, 0.0625]]))
    names = ["logit_p1", "log_p1", "log1m_p1", "margin", "entropy", "log_tail"]
    f = dict(zip(names, feature_columns(top, names)[0], strict=True))
    assert f["logit_p1"] == pytest.approx(0.0)  # logit(0.5)
    assert f["log_p1"] == f["log1m_p1"] == pytest.approx(math.log(0.5))
    assert f["margin"] == pytest.approx(math.log(2))
    q = np.array([8, 4, 2, 1]) / 15  # the top 4 renormalised
    assert f["entropy"] == pytest.approx(-(q * np.log(q)).sum())
    assert f["log_tail"] == pytest.approx(math.log(0.0625))  # 1 - (0.5 + 0.25 + 0.125 + 0.0625)
    padded = np.c_[np.log([[0.6]]), np.full((1, 3), -np.inf)]  # one log-probability came back
    assert np.isfinite(feature_columns(padded, names)).all()
    assert feature_columns(padded, ["log_tail"])[0, 0] == pytest.approx(math.log(0.4))
    c = Calibrator(family="logistic", features=["log_p1", "margin", "log_tail"], coef=[1.0, -0.3, 0.2, -0.5])
    assert c.predict(top)[0] == pytest.approx(1 / (1 + math.exp(-(math.log(0.5) - 0.3 * math.log(2)
                                                                   + 0.2 * math.log(0.0625) - 0.5))))
    shuffled = [float(v) for v in top[0][::-1]]
    assert c.apply(shuffled) == pytest.approx(float(c.predict(top)[0]))  # apply sorts what the server read


def test_logistic_tail_reads_the_mass_outside_the_top_k() -> None:
    """Where answers are less often right the more probability lies outside the top k, logistic-tail weighs
    that tail against them, and ranks them better than p1 alone (platt) does."""
    n, k = 6000, 20
    p1 = RNG.uniform(0.2, 0.6, n)
    tail = RNG.uniform(0.01, 0.35, n) * (1 - p1)
    rest = (1 - p1 - tail) / (k - 1)
    top = np.log(np.c_[p1, np.repeat(rest[:, None], k - 1, axis=1)])
    correct = RNG.random(n) < 1 / (1 + np.exp(-(-6.0 * tail / (1 - p1) + 0.5)))
    fitted = fit_calibrator("logistic-tail", top[:4000], correct[:4000])
    assert fitted.features == ["log_p1", "log1m_p1", "margin", "entropy", "log_tail"]
    assert fitted.coef[fitted.features.index("log_tail")] < 0  # more mass outside: less often right
    platt = fit_calibrator("platt", top[:4000], correct[:4000])
    assert cal.aurc(fitted.predict(top[4000:]), correct[4000:]) < cal.aurc(platt.predict(top[4000:]),
                                                                           correct[4000:]) - 0.02


def test_platt_recovers_a_known_map_and_calibrates_fresh_data() -> None:
    top, correct = synthetic(20000, "platt")
    fitted = fit_calibrator("platt", top, correct)
    assert fitted.coef == pytest.approx([2.0, -1.0], abs=0.12)
    test_top, test_correct = synthetic(5000, "platt")
    raw = np.exp(test_top[:, 0])
    assert cal.ece_equal_width(fitted.predict(test_top), test_correct) < 0.03 < cal.ece_equal_width(raw, test_correct)


def test_isotonic_is_the_pooled_monotone_fit() -> None:
    x = np.array([0.1, 0.2, 0.3, 0.4, 0.4])
    top = np.c_[np.log(x), np.log(x / 2)]
    c = fit_calibrator("isotonic", top, np.array([1, 0, 1, 1, 0], dtype=bool))
    # 1, 0 violate order: pooled to 0.5 at x 0.15; x = 0.4 twice is one point of mean 0.5, below 1 at 0.3: pooled
    assert c.knots_x == pytest.approx([0.15, (0.3 + 0.4 + 0.4) / 3])
    assert c.knots_y == pytest.approx([0.5, 2 / 3])
    grid = np.linspace(0.01, 0.99, 50)
    out = c.predict(np.c_[np.log(grid), np.log(grid / 2)])
    assert (np.diff(out) >= 0).all()


def test_logistic_reranks_where_the_margin_carries_what_p1_does_not() -> None:
    top, correct = synthetic(6000, "margin")
    test_top, test_correct = synthetic(3000, "margin")
    raw = np.exp(test_top[:, 0])
    rerank = fit_calibrator("logistic", top, correct).predict(test_top)
    remap = fit_calibrator("platt", top, correct).predict(test_top)
    assert cal.aurc(remap, test_correct) == pytest.approx(cal.aurc(raw, test_correct))  # same order as p1
    assert cal.aurc(rerank, test_correct) < cal.aurc(raw, test_correct) - 0.02


def test_the_family_is_chosen_on_relations_held_out_of_its_fit() -> None:
    top, correct = synthetic(3000, "margin")
    relations = [f"r{i % 5}" for i in range(3000)]
    subjects = [f"s{i // 3}" for i in range(3000)]
    choice = choose_calibrator(top, correct, relations, subjects, seed=0)
    assert [s.family for s in choice.scores] == list(FAMILIES)
    best = min(choice.scores, key=lambda s: s.log_loss)
    assert choice.calibrator.family == best.family == "logistic"
    assert choice.folds == "leave-one-relation-out over the 5 dev relations"
    assert choice.why.startswith("logistic: the lowest held-out log loss")
    folds, rule = folds_of(["a"] * 10 + ["b"] * 10, [f"s{i}" for i in range(20)], seed=0)
    assert "5 folds of dev subjects" in rule and sorted(np.concatenate(folds).tolist()) == list(range(20))


def calibration_file(model_dir: Path, patch_id: str | None = None) -> CalibrationFile:
    platt = Calibrator(family="platt", features=["logit_p1"], coef=[1.5, -0.2])
    variants = {"base": VariantCalibration(patch_id=None, calibrator=platt)}
    if patch_id:
        variants["gains"] = VariantCalibration(patch_id=patch_id, calibrator=Calibrator(family="identity"))
    return CalibrationFile(model=final_block_fingerprint(model_dir), fitted_on="test",
                           variants=variants, provenance=Provenance(tool_version="test"))


def test_the_file_belongs_to_one_model_and_its_patches(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    from recallfix.patches.registry.load import load_causal_lm

    model, _ = load_causal_lm(tiny_dirs["qwen2"])
    patch = make_patch(model, {"L1H0": 0.5})
    other = make_patch(model, {"L1H1": 0.5})
    path = calibration_file(tiny_dirs["qwen2"], patch.id).save(tmp_path / "calibration.json")
    loaded = CalibrationFile.load(path)
    assert check_calibration_against(tiny_dirs["qwen2"], loaded)[0] == "base"
    assert check_calibration_against(model, loaded, patch)[0] == "gains"
    with pytest.raises(CalibrationError, match=r"no calibrator for patch .*it has: base \(base model\), gains"):
        check_calibration_against(model, loaded, other)
    with pytest.raises(CalibrationError, match=r"model.tensors\[.*\]: sha256 differs; the calibration file was "
                                                r"fitted on another checkpoint"):
        check_calibration_against(save_model("qwen2", tmp_path / "qwen2-seed1", seed=1), loaded)  # other weights
    with pytest.raises(CalibrationError, match=r"model.architecture: the calibration file was fitted on"):
        check_calibration_against(tiny_dirs["gpt2"], loaded)


def test_a_bad_file_is_refused_with_the_field_named(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    doc = json.loads(calibration_file(tiny_dirs["llama"]).model_dump_json())
    doc["variants"]["base"]["calibrator"]["coef"] = [1.0]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(CalibrationError, match=r"bad.json: invalid calibration file:\n  variants.base.calibrator: "
                                               r"coef: platt takes 2 \(a weight per feature, then the intercept\), "
                                               r"got 1"):
        CalibrationFile.load(bad)
    doc["variants"]["base"]["calibrator"] = {"family": "isotonic", "knots_x": [0.5, 0.2], "knots_y": [0.1, 0.2]}
    bad.write_text(json.dumps(doc))
    with pytest.raises(CalibrationError, match="knots_x must be strictly increasing"):
        CalibrationFile.load(bad)
    doc["variants"]["base"]["calibrator"] = {"family": "logistic", "features": ["margin", "p2"], "coef": [0, 0, 0]}
    bad.write_text(json.dumps(doc))
    with pytest.raises(CalibrationError, match=r"variants.base.calibrator.features.1: Input should be 'logit_p1'"):
        CalibrationFile.load(bad)
    doc["schema_version"] = 9  # a newer file is refused by its version, whatever else it holds
    bad.write_text(json.dumps(doc))
    with pytest.raises(CalibrationError, match="schema_version: 9 is not one this recallfix reads"):
        CalibrationFile.load(bad)
    with pytest.raises(CalibrationError, match="missing.json: cannot read calibration file"):
        CalibrationFile.load(tmp_path / "missing.json")


def test_committed_schema_is_up_to_date() -> None:
    assert json.loads(SCHEMA_PATH.read_text()) == json_schema(), (
        "run `make schema` after editing CalibrationFile (patches/calibration.schema.json)")


def test_a_schema_1_file_reads_as_the_calibrators_it_held(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Schema 1 left the features unnamed: platt read logit(p1); logistic logit(p1), the margin and the entropy."""
    doc = json.loads(calibration_file(tiny_dirs["llama"]).model_dump_json())
    doc["schema_version"] = 1
    doc["variants"]["base"]["calibrator"] = {"family": "logistic", "coef": [1.0, -0.3, 0.2, -0.5]}
    doc["variants"]["platt"] = {"patch_id": "x", "calibrator": {"family": "platt", "coef": [1.5, -0.2]}}
    old = tmp_path / "schema1.json"
    old.write_text(json.dumps(doc))
    loaded = CalibrationFile.load(old)
    assert loaded.schema_version == 2
    logistic, platt = loaded.variants["base"].calibrator, loaded.variants["platt"].calibrator
    assert logistic.features == ["logit_p1", "margin", "entropy"] and platt.features == ["logit_p1"]
    top = np.log(np.array([[0.5, 0.25, 0.125, 0.125]]))
    h = -(0.5 * math.log(0.5) + 0.25 * math.log(0.25) + 2 * 0.125 * math.log(0.125))
    assert logistic.predict(top)[0] == pytest.approx(1 / (1 + math.exp(-(0.0 - 0.3 * math.log(2) + 0.2 * h - 0.5))))
    assert platt.predict(top)[0] == pytest.approx(1 / (1 + math.exp(0.2)))
