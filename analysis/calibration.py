"""Calibration metrics, a cluster bootstrap for their intervals, and temperature scaling.

Per prompt: confidence c = max_k p_k, correct y = [argmax = answer], p_a = p(answer).

    accuracy    mean y
    ECE         sum_b (n_b / N) |mean_b y - mean_b c|   over 15 equal-width bins of c, or 15 equal-mass bins
    Brier       mean sum_k (p_k - 1[k = a])^2           (multi-class, over the whole vocabulary)
    NLL         mean -log p_a
    AUROC       P(c of a correct prompt > c of a wrong one), ties count 1/2 (Mann-Whitney)
    AURC        mean over k = 1..N of the error rate of the k most confident answers (risk-coverage area; ties
                count as broken at random); selective accuracy at coverage q: 1 - that rate at k = ceil(qN)
    McNemar     exact two-sided test of paired right/wrong outcomes of two models (`recallfix compare`)

Intervals: percentile bootstrap resampling *subjects* (all prompts of one subject together, since the
templates of one fact are not independent), the same resamples for every model so that differences
are paired. Temperature scaling divides the logits by T fitted (NLL, Newton on 1/T) on the train split.

The metrics read the per-prompt record `records.Dist` (as float64 numpy, `columns`); estimates and reliability
bins come out as the `schema` models that analysis.json holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from .records import Dist
from .schema import EstimateModel, ReliabilityBin

N_BINS = 15

Columns = dict[str, np.ndarray]  # what the metrics read of a `Dist`, as numpy [N]


def columns(d: Dist) -> Columns:
    """The per-prompt numbers of `d` the metrics read: float64, `correct` bool."""
    return {"confidence": d.confidence.double().numpy(), "correct": d.correct.numpy(),
            "p_answer": d.p_answer.double().numpy(), "nll": d.nll.double().numpy(), "brier": d.brier.double().numpy()}


def _binned_ece(bins: np.ndarray, confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    # n_b |acc_b - conf_b| = |sum_b y - sum_b c|
    sum_conf = np.bincount(bins, weights=confidence, minlength=n_bins)
    sum_correct = np.bincount(bins, weights=correct.astype(np.float64), minlength=n_bins)
    return float(np.abs(sum_correct - sum_conf).sum() / len(confidence))


def ece_equal_width(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error over n_bins equal-width confidence bins ([0, 1/n), ..., [(n-1)/n, 1])."""
    if len(confidence) == 0:
        return float("nan")
    bins = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    return _binned_ece(bins, confidence, correct, n_bins)


def ece_equal_mass(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error over n_bins bins holding (as near as possible) equally many prompts
    (consecutive in sorted confidence, sizes as `np.array_split`)."""
    n = len(confidence)
    if n == 0:
        return float("nan")
    order = np.argsort(confidence, kind="stable")
    k = min(n_bins, n)
    sizes = np.full(k, n // k) + (np.arange(k) < n % k)
    bins = np.repeat(np.arange(k), sizes)
    return _binned_ece(bins, confidence[order], correct[order], k)


def auroc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve of `score` separating label True from False; NaN if one class is empty.

    Mann-Whitney U from average ranks (ties get the mean of their ranks, i.e. count 1/2)."""
    label = label.astype(bool)
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based
    ranks = average_rank[inverse]
    return float((ranks[label].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_errors(confidence: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """1 - correct in order of falling confidence, each run of tied confidences replaced by its mean: the expected
    error at each place when ties are broken at random (what an abstention threshold cannot tell apart)."""
    order = np.argsort(-confidence, kind="stable")
    c, wrong = confidence[order], 1.0 - correct[order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    sizes = np.diff(np.r_[starts, len(c)])
    return np.repeat(np.add.reduceat(wrong, starts) / sizes, sizes) if len(c) else wrong


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Risk (error rate of the answers kept) when the k most confident of N answers are kept, k = 1..N."""
    errors = expected_errors(confidence, correct)
    return np.cumsum(errors) / np.arange(1, len(errors) + 1)


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve (mean risk over coverage k/N): lower ranks right answers higher."""
    return float(risk_coverage(confidence, correct).mean()) if len(confidence) else float("nan")


def selective_accuracy(confidence: np.ndarray, correct: np.ndarray, coverage: float) -> float:
    """Accuracy of the ceil(coverage N) most confident answers (the rest abstained on)."""
    n = len(confidence)
    if n == 0:
        return float("nan")
    k = max(1, math.ceil(coverage * n - 1e-9))
    return float(1.0 - expected_errors(confidence, correct)[:k].mean())


def risk_at_points(confidence: np.ndarray, correct: np.ndarray, points: int = 20) -> list[float | None]:
    """The risk-coverage curve at coverage 1/points, 2/points, ..., 1 (what analysis.json and results.json keep)."""
    risk = risk_coverage(confidence, correct)
    return [_clean(float(risk[max(1, math.ceil(q * len(risk) - 1e-9)) - 1])) if len(risk) else None
            for q in np.arange(1, points + 1) / points]


def binary_log_loss(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Mean -log P(outcome) of "the answer is right" with probability `confidence` (clipped to [1e-6, 1 - 1e-6])."""
    c = np.clip(confidence, 1e-6, 1 - 1e-6)
    return float(-np.where(correct, np.log(c), np.log1p(-c)).mean()) if len(c) else float("nan")


def mean_of(column: str) -> Callable[[Columns], float]:
    """The metric `mean of one column` (NaN on no rows)."""
    return lambda o: float(o[column].mean()) if len(o[column]) else float("nan")


Metric = Callable[[Columns], float]
METRICS: dict[str, Metric] = {
    "accuracy": mean_of("correct"),
    "mean_p_answer": mean_of("p_answer"),
    "mean_confidence": mean_of("confidence"),
    "ece_equal_width": lambda o: ece_equal_width(o["confidence"], o["correct"]),
    "ece_equal_mass": lambda o: ece_equal_mass(o["confidence"], o["correct"]),
    "brier": mean_of("brier"),
    "nll": mean_of("nll"),
    "auroc": lambda o: auroc(o["confidence"], o["correct"]),
}


# How well a confidence in "the answer is right" is calibrated and ranks answers: columns confidence, correct.
CONFIDENCE_METRICS: dict[str, Metric] = {
    "ece": lambda o: ece_equal_width(o["confidence"], o["correct"]),
    "brier": lambda o: float(((o["confidence"] - o["correct"]) ** 2).mean()) if len(o["correct"]) else float("nan"),
    "log_loss": lambda o: binary_log_loss(o["confidence"], o["correct"]),
    "selective_accuracy_50": lambda o: selective_accuracy(o["confidence"], o["correct"], 0.5),
    "selective_accuracy_80": lambda o: selective_accuracy(o["confidence"], o["correct"], 0.8),
    "aurc": lambda o: aurc(o["confidence"], o["correct"]),
}


def metrics(d: Dist) -> dict[str, float]:
    o = columns(d)
    return {name: fn(o) for name, fn in METRICS.items()}


def group_resamples(groups: Sequence[Hashable], n_boot: int, seed: int) -> list[np.ndarray]:
    """Row indices of n_boot cluster-bootstrap resamples: draw groups with replacement, keep their rows.

    Groups are numbered in sorted order of their keys, so `range(n)` (every row its own group) gives the plain
    bootstrap of rows."""
    keys = sorted(set(groups))
    members: dict[str, list[int]] = {k: [] for k in keys}
    for i, g in enumerate(groups):
        members[g].append(i)
    rows = [np.asarray(members[k], dtype=np.int64) for k in keys]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        picks = rng.integers(0, len(keys), size=len(keys))
        out.append(np.concatenate([rows[p] for p in picks]) if len(keys) else np.zeros(0, dtype=np.int64))
    return out


def percentile_interval(values: np.ndarray) -> tuple[float | None, float | None]:
    """2.5 and 97.5 percentiles of the bootstrap values; None when most resamples leave the metric undefined
    (e.g. AUROC with one class). ECE is biased upward in finite samples (resamples with repeated subjects
    look less calibrated), so its point estimate can sit at or below the low end: compare models with the
    paired differences, where the bias largely cancels."""
    finite = values[np.isfinite(values)]
    if len(finite) < max(10, len(values) // 2):
        return None, None
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return float(lo), float(hi)


def _clean(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def sample_metrics(o: Columns, resamples: Sequence[np.ndarray],
                   metric_fns: dict[str, Metric] = METRICS) -> dict[str, np.ndarray]:
    """Every metric of the columns `o` on every resample. {metric: [n_boot]}"""
    out: dict[str, list[float]] = {name: [] for name in metric_fns}
    for rows in resamples:
        sub = {column: values[rows] for column, values in o.items()}
        for name, fn in metric_fns.items():
            out[name].append(fn(sub))
    return {name: np.asarray(values) for name, values in out.items()}


@dataclass(frozen=True)
class Sampled:
    """Metrics of several columns sets on the same rows (confidences, models): point values and bootstrap samples
    over the same resamples, so that differences between them are paired."""

    point: dict[str, dict[str, float]]
    samples: dict[str, dict[str, np.ndarray]]

    def estimates(self, key: str) -> dict[str, EstimateModel]:
        return {m: estimate(v, self.samples[key][m]) for m, v in self.point[key].items()}

    def difference(self, key: str, minus: str) -> dict[str, EstimateModel]:
        """key - minus, with a paired interval."""
        return {m: estimate(v - self.point[minus][m], self.samples[key][m] - self.samples[minus][m])
                for m, v in self.point[key].items()}


def sampled(cols: dict[str, Columns], resamples: Sequence[np.ndarray], metric_fns: dict[str, Metric]) -> Sampled:
    return Sampled(point={key: {m: fn(o) for m, fn in metric_fns.items()} for key, o in cols.items()},
                   samples={key: sample_metrics(o, resamples, metric_fns) for key, o in cols.items()})


def bootstrap_samples(d: Dist, resamples: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Every metric of `d` on every resample. {metric: [n_boot]}"""
    return sample_metrics(columns(d), resamples)


def estimate(value: float, samples: np.ndarray) -> EstimateModel:
    """A point value with the 95% percentile interval of its bootstrap samples (NaN -> null)."""
    lo, hi = percentile_interval(samples)
    return EstimateModel(value=_clean(value), ci_low=lo, ci_high=hi)


def estimates(d: Dist, samples: dict[str, np.ndarray]) -> dict[str, EstimateModel]:
    """Point values of `d` with the 95% percentile intervals of its bootstrap samples."""
    point = metrics(d)
    return {name: estimate(point[name], samples[name]) for name in METRICS}


def differences(a: Dist, b: Dist, samples_a: dict[str, np.ndarray],
                samples_b: dict[str, np.ndarray]) -> dict[str, EstimateModel]:
    """metric(a) - metric(b) on the same prompts, with a paired 95% interval (same resamples)."""
    pa, pb = metrics(a), metrics(b)
    return {name: estimate(pa[name] - pb[name], samples_a[name] - samples_b[name]) for name in METRICS}


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value for paired right/wrong outcomes: under "no difference" each of the
    n = a_only + b_only discordant pairs is either way with probability 1/2, p = min(1, 2 P(X <= min) ),
    X ~ Binomial(n, 1/2) (exact integers, no underflow)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1))
    return min(1.0, float(Fraction(2 * tail, 2**n)))


def reliability_bins(d: Dist, n_bins: int = N_BINS) -> list[ReliabilityBin]:
    """Equal-width confidence bins of `d`'s top-1 confidence for a reliability diagram, empty bins kept."""
    o = columns(d)
    return reliability_of(o["confidence"], o["correct"], n_bins)


def reliability_of(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> list[ReliabilityBin]:
    """Equal-width bins of any confidence in "the answer is right", empty bins kept."""
    bins = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    out = []
    for b in range(n_bins):
        sel = bins == b
        out.append(ReliabilityBin(
            lo=b / n_bins, hi=(b + 1) / n_bins, count=int(sel.sum()),
            confidence=float(confidence[sel].mean()) if sel.any() else None,
            accuracy=float(correct[sel].mean()) if sel.any() else None,
        ))
    return out


def ece_floor(bins: Sequence[ReliabilityBin]) -> float:
    """The ECE that a perfectly calibrated confidence is expected to show on prompts binned as `bins` (their counts
    and mean confidences): with n_b prompts at confidence c_b, the right ones K_b ~ Binomial(n_b, c_b), and
    E[ECE] = sum_b E|K_b - n_b c_b| / n. A measured ECE near it is as calibrated as this many prompts can show
    (a bin's prompts are taken at its mean confidence: the floor of the spread within a bin is left out)."""
    total, n = 0.0, sum(b.count for b in bins)
    for b in bins:
        if b.count and b.confidence is not None:
            total += float(np.sum(binomial_pmf(b.count, b.confidence) * np.abs(np.arange(b.count + 1)
                                                                               - b.count * b.confidence)))
    return total / n if n else float("nan")


def binomial_pmf(n: int, p: float) -> np.ndarray:
    """P(K = k) for k = 0..n, K ~ Binomial(n, p), through logs (no overflow at large n)."""
    k = np.arange(n + 1)
    if p <= 0.0 or p >= 1.0:
        return (k == (n if p >= 1.0 else 0)).astype(np.float64)
    log_comb = np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in k])
    return np.exp(log_comb + k * math.log(p) + (n - k) * math.log1p(-p))


# ------------------------------------------------------------------------------------------------
# Temperature scaling
# ------------------------------------------------------------------------------------------------


def _nll_moments(chunks: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], beta: float,
                 ) -> tuple[float, float, float]:
    """Mean NLL of softmax(beta * z) and its first two derivatives in beta (float64)."""
    value = grad = hess = 0.0
    n = 0
    for logits, answers in chunks():
        z = logits.double()
        rows = torch.arange(z.shape[0], device=z.device)
        logp = (beta * z).log_softmax(dim=-1)
        p = logp.exp()
        mean_z = (p * z).sum(dim=-1)
        var_z = (p * (z - mean_z[:, None]).pow(2)).sum(dim=-1)
        value += float(-logp[rows, answers].sum())
        grad += float((mean_z - z[rows, answers]).sum())
        hess += float(var_z.sum())
        n += z.shape[0]
    return value / n, grad / n, hess / n


def fit_temperature(chunks: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], *,
                    max_iter: int = 50, tol: float = 1e-8) -> float:
    """The T minimising the mean NLL of softmax(z / T); `chunks()` yields (logits, answer ids) batches.

    NLL is convex in beta = 1/T, so damped Newton from beta = 1 converges in a few passes.
    """
    beta = 1.0
    value, grad, hess = _nll_moments(chunks, beta)
    for _ in range(max_iter):
        step = grad / hess if hess > 1e-12 else grad
        t = 1.0
        while t > 1e-8:
            candidate = beta - t * step
            if candidate > 1e-6:
                c_value, c_grad, c_hess = _nll_moments(chunks, candidate)
                if c_value <= value:
                    break
            t /= 2
        else:
            break
        converged = abs(candidate - beta) < tol * max(1.0, beta)
        beta, value, grad, hess = candidate, c_value, c_grad, c_hess
        if converged:
            break
    return 1.0 / beta
