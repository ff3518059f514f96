"""Fitting a confidence calibrator, and choosing its family where it will be used: on relations it never saw.

Each family of `recallfix.patches.calibrator` is fitted to (first-token top-K log-probabilities, answer right) pairs:

    platt, logistic,  logistic regression (Newton on the mean log loss, a small L2 on the weights) on the
    logistic-tail     features of `FAMILY_FEATURES`
    isotonic          pool adjacent violators on p1; the knots are the pooled blocks' mean p1 and accuracy

A served calibrator meets every kind of question, so the family is chosen by how it does on relations left out
of its fit: leave-one-relation-out over the dev split (five folds of subjects where dev has fewer than three
relations), lowest held-out log loss (a proper score: it rewards calibration and ranking together). The chosen
family is then fitted on the whole dev split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recallfix.patches.calibrator import (
    FAMILIES,
    FAMILY_FEATURES,
    Calibrator,
    Family,
    feature_columns,
)

from .. import calibration as cal

L2 = 1e-3  # on the weights (not the intercept), per example: keeps a separable dev split finite
MIN_RELATIONS_FOR_LORO = 3
SUBJECT_FOLDS = 5


def _logistic(x: np.ndarray, y: np.ndarray, l2: float = L2, iterations: int = 100) -> np.ndarray:
    """Weights (intercept last) minimising mean log loss + l2/2 |w|^2 by Newton's method."""
    design = np.c_[x, np.ones(len(x))]
    w = np.zeros(design.shape[1])
    penalty = np.r_[np.full(x.shape[1], l2), 0.0]
    for _ in range(iterations):
        p = 0.5 * (1.0 + np.tanh(0.5 * (design @ w)))
        grad = design.T @ (p - y) / len(y) + penalty * w
        hess = (design.T * (p * (1 - p))) @ design / len(y) + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


def _isotonic(p1: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
    """Knots of the non-decreasing least-squares fit of y on p1 (pool adjacent violators, equal p1 pooled first)."""
    xs, inverse = np.unique(p1, return_inverse=True)
    sums, weights = np.bincount(inverse, weights=y), np.bincount(inverse).astype(np.float64)
    block_x, block_y, block_w = [], [], []
    for x, s, w in zip(xs * weights, sums, weights, strict=True):
        block_x.append(x)
        block_y.append(s)
        block_w.append(w)
        while len(block_w) > 1 and block_y[-2] / block_w[-2] >= block_y[-1] / block_w[-1]:
            x2, s2, w2 = block_x.pop(), block_y.pop(), block_w.pop()
            block_x[-1] += x2
            block_y[-1] += s2
            block_w[-1] += w2
    w = np.asarray(block_w)
    return list(np.asarray(block_x) / w), list(np.asarray(block_y) / w)


def fit_calibrator(family: Family, top_logprobs: np.ndarray, correct: np.ndarray) -> Calibrator:
    """`family` fitted to first-token log-probabilities [N, K] (most likely first) and right/wrong [N]."""
    y = correct.astype(np.float64)
    if family == "identity":
        return Calibrator(family="identity")
    if family == "isotonic":
        knots_x, knots_y = _isotonic(np.exp(top_logprobs[:, 0]), y)
        return Calibrator(family="isotonic", knots_x=knots_x, knots_y=knots_y)
    names = FAMILY_FEATURES[family]
    w = _logistic(feature_columns(top_logprobs, names), y)
    return Calibrator(family=family, features=list(names), coef=[float(v) for v in w])


def folds_of(relations: Sequence[str], subjects: Sequence[str], seed: int) -> tuple[list[np.ndarray], str]:
    """Held-out folds of the dev rows: one per relation (leave-one-relation-out), or, with fewer than three
    relations, five of whole subjects; and the rule in words."""
    names = sorted(set(relations))
    if len(names) >= MIN_RELATIONS_FOR_LORO:
        rel = np.asarray(relations)
        return [np.flatnonzero(rel == r) for r in names], f"leave-one-relation-out over the {len(names)} dev relations"
    keys = sorted(set(subjects))
    rng = np.random.default_rng(seed)
    fold_of = dict(zip(keys, rng.permutation(len(keys)) % SUBJECT_FOLDS, strict=True))
    assigned = np.asarray([fold_of[s] for s in subjects])
    folds = [np.flatnonzero(assigned == f) for f in range(SUBJECT_FOLDS)]
    return [f for f in folds if len(f)], f"{SUBJECT_FOLDS} folds of dev subjects (dev has {len(names)} relation(s))"


def held_out(family: Family, top_logprobs: np.ndarray, correct: np.ndarray, folds: list[np.ndarray]) -> np.ndarray:
    """Each dev row's calibrated confidence from `family` fitted on the other folds."""
    out = np.empty(len(correct))
    for rows in folds:
        rest = np.setdiff1d(np.arange(len(correct)), rows)
        out[rows] = fit_calibrator(family, top_logprobs[rest], correct[rest]).predict(top_logprobs[rows])
    return out


@dataclass(frozen=True)
class FamilyScore:
    family: Family
    log_loss: float
    ece: float
    aurc: float


@dataclass(frozen=True)
class Choice:
    calibrator: Calibrator
    scores: list[FamilyScore]
    folds: str
    why: str


def choose_calibrator(top_logprobs: np.ndarray, correct: np.ndarray, relations: Sequence[str],
                      subjects: Sequence[str], seed: int) -> Choice:
    """Every family scored on held-out dev folds, the lowest held-out log loss fitted on the whole dev split."""
    folds, rule = folds_of(relations, subjects, seed)
    scores = []
    for family in FAMILIES:
        c = held_out(family, top_logprobs, correct, folds)
        scores.append(FamilyScore(family, cal.binary_log_loss(c, correct), cal.ece_equal_width(c, correct),
                                  cal.aurc(c, correct)))
    best = min(scores, key=lambda s: s.log_loss)
    runner_up = min((s for s in scores if s is not best), key=lambda s: s.log_loss)
    why = (f"{best.family}: the lowest held-out log loss, {best.log_loss:.4f} against {runner_up.log_loss:.4f} for "
           f"{runner_up.family}")
    return Choice(fit_calibrator(best.family, top_logprobs, correct), scores, rule, why)
