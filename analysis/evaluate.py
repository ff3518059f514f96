"""Step 6 of a run: the saved patch applied to the weights (`apply_patch`) against the base model and the
temperature-scaling baseline, on the held-out test split, the unknown subjects and the held-out neutral lines;
then the acceptance criteria and the headline numbers stored in the patch file.

`run_patched` does the forward passes, `evaluate` the bootstrap (cluster-bootstrap over subjects, paired
across models; over lines for the neutral text), so the two can be timed apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from recallfix.patches import ComponentMap, Patch, apply_patch

from . import calibration as cal
from .batching import encode
from .collect import Collected, collect, token_nll
from .config import AnalysisConfig
from .inputs import Loaded, Prompts
from .lens import answer_stats, lens_logits
from .records import Dist
from .schema import Criterion, EstimateModel, Evaluation, NeutralEvaluation, SetEvaluation, Verdict
from .summaries import num, suppression

MODELS = ("base", "patched", "temperature")


# -- the temperature baseline -----------------------------------------------------------------------


def logit_chunks(cmap: ComponentMap, x_final: torch.Tensor, answers: torch.Tensor, batch_size: int,
                 device: torch.device) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """The model's logits recomputed from the stored final residuals, batch by batch (for `fit_temperature`)."""
    def chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad():
            for start in range(0, len(answers), batch_size):
                rows = slice(start, start + batch_size)
                yield lens_logits(cmap, x_final[rows].to(device)), answers[rows].to(device)
    return chunks


def temperature_dist(cmap: ComponentMap, x_final: torch.Tensor, answers: torch.Tensor, temperature: float,
                     batch_size: int, device: torch.device) -> Dist:
    """The next-token numbers of softmax(logits / T), logits recomputed from the stored final residuals."""
    out = Dist.empty(len(answers))
    for start in range(0, len(answers), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(answers)))
        logits = lens_logits(cmap, x_final[rows].to(device))
        out.put(rows, answer_stats(logits, answers[rows].to(device), temperature))
    return out


# -- forward passes ---------------------------------------------------------------------------------


@dataclass
class PatchedRuns:
    """What the evaluation measures with the patch applied, and the base passes not already in `Collected`."""

    test: Collected  # patched, test split
    unknown_patched: Collected | None
    unknown_base: Collected | None
    neutral_patched: tuple[torch.Tensor, torch.Tensor]  # per-line NLL sums and token counts
    neutral_base: tuple[torch.Tensor, torch.Tensor]


def run_patched(s: Loaded, patch: Patch, config: AnalysisConfig) -> PatchedRuns:
    bs, progress = config.batch_size, config.progress

    def run(prompts: Prompts, rows: torch.Tensor | None, desc: str) -> Collected:
        tokens = prompts.token_ids if rows is None else [prompts.token_ids[i] for i in rows]
        answers = prompts.answers if rows is None else prompts.answers[rows]
        return collect(s.lm, s.cmap, tokens, answers, pad=s.pad, batch_size=bs, progress=progress, desc=desc)

    neutral_tokens = encode(s.tokenizer, s.neutral_eval)
    with apply_patch(s.lm, patch):
        test = run(s.known, s.known.rows("test"), "test (patched)")
        unknown_patched = run(s.unknown, None, "unknown (patched)") if s.unknown else None
        neutral_patched = token_nll(s.lm, neutral_tokens, pad=s.pad, batch_size=bs, progress=progress)
    unknown_base = run(s.unknown, None, "unknown") if s.unknown else None
    neutral_base = token_nll(s.lm, neutral_tokens, pad=s.pad, batch_size=bs, progress=progress)
    return PatchedRuns(test, unknown_patched, unknown_base, neutral_patched, neutral_base)


# -- the bootstrap ----------------------------------------------------------------------------------


def evaluate_set(models: dict[str, Dist], groups: Sequence[str], n_boot: int, seed: int) -> SetEvaluation:
    """Metrics with paired cluster-bootstrap intervals for base, patched and temperature on one prompt set."""
    resamples = cal.group_resamples(groups, n_boot, seed)
    samples = {name: cal.bootstrap_samples(d, resamples) for name, d in models.items()}

    def difference(a: str, b: str) -> dict[str, EstimateModel]:
        return cal.differences(models[a], models[b], samples[a], samples[b])

    return SetEvaluation(
        n=len(groups),
        n_groups=len(set(groups)),
        models={name: cal.estimates(d, samples[name]) for name, d in models.items()},
        differences={"patched_minus_base": difference("patched", "base"),
                     "patched_minus_temperature": difference("patched", "temperature")},
        reliability={name: cal.reliability_bins(d) for name, d in models.items()},
    )


def neutral_summary(base: tuple[torch.Tensor, torch.Tensor], patched: tuple[torch.Tensor, torch.Tensor],
                    n_boot: int, seed: int) -> NeutralEvaluation:
    """Per-token NLL on the held-out neutral lines, base vs patched, with a bootstrap over lines (each line its
    own group of `cal.group_resamples`)."""
    base_sum, counts = base[0].numpy(), base[1].numpy().astype(np.float64)
    patched_sum = patched[0].numpy()
    base_nll, patched_nll = base_sum.sum() / counts.sum(), patched_sum.sum() / counts.sum()
    changes = [patched_sum[rows].sum() / base_sum[rows].sum() - 1
               for rows in cal.group_resamples(range(len(counts)), n_boot, seed)]
    lo, hi = cal.percentile_interval(np.asarray(changes))
    return NeutralEvaluation(n_lines=int(len(counts)), n_tokens=int(counts.sum()), base_nll=float(base_nll),
                             patched_nll=float(patched_nll), relative_change=float(patched_nll / base_nll - 1),
                             relative_change_ci=[num(lo), num(hi)])


def evaluate(s: Loaded, c: Collected, runs: PatchedRuns, temperature: float, config: AnalysisConfig) -> Evaluation:
    known, cmap, bs, dev = s.known, s.cmap, config.batch_size, s.device
    test_rows = known.rows("test")
    test_groups = [known.groups[i] for i in test_rows]
    test = evaluate_set({
        "base": c.output.take(test_rows),
        "patched": runs.test.output,
        "temperature": temperature_dist(cmap, c.x_final[test_rows], known.answers[test_rows], temperature, bs, dev),
    }, test_groups, config.n_boot, config.seed)
    unknown = None
    if s.unknown is not None and runs.unknown_base is not None and runs.unknown_patched is not None:
        unknown = evaluate_set({
            "base": runs.unknown_base.output,
            "patched": runs.unknown_patched.output,
            "temperature": temperature_dist(cmap, runs.unknown_base.x_final, s.unknown.answers, temperature, bs,
                                            dev),
        }, s.unknown.groups, config.n_boot, config.seed)
    return Evaluation(
        n_boot=config.n_boot, test=test, unknown=unknown,
        neutral=neutral_summary(runs.neutral_base, runs.neutral_patched, config.n_boot, config.seed),
        suppression_after_patch=suppression(runs.test.output, runs.test.before, test_groups, config.n_boot,
                                            config.seed),
    )


# -- what the run reports -----------------------------------------------------------------------------


def patch_metrics(evaluation: Evaluation, temperature: float) -> dict[str, float | None]:
    """The headline numbers stored in the patch file itself."""
    test, unknown, neutral = evaluation.test, evaluation.unknown, evaluation.neutral
    out: dict[str, float | None] = {"temperature_baseline": temperature}
    for model in MODELS:
        for metric in ("accuracy", "mean_p_answer", "ece_equal_width", "nll"):
            out[f"test_{metric}_{model}"] = test.models[model][metric].value
    if unknown is not None:
        for model in ("base", "patched"):
            out[f"unknown_mean_confidence_{model}"] = unknown.models[model]["mean_confidence"].value
    if neutral is not None:
        out["neutral_nll_relative_change"] = neutral.relative_change
    return out


def evaluate_criteria(verdict: Verdict, evaluation: Evaluation | None) -> list[Criterion]:
    """The issue's acceptance checks, passed or failed on the point estimates (with their 95% intervals)."""
    def row(name: str, description: str, estimate: EstimateModel, threshold: float,
            ok: Callable[[float], bool]) -> Criterion:
        value = estimate.value
        return Criterion(name=name, description=description, value=value, ci_low=estimate.ci_low,
                         ci_high=estimate.ci_high, threshold=threshold,
                         passed=None if value is None else bool(ok(value)))

    def interval(value: float | None, ci: Sequence[float | None]) -> EstimateModel:
        return EstimateModel(value=value, ci_low=ci[0], ci_high=ci[1])

    test = verdict.test
    rows = [row("final_layer_suppresses", "share of test prompts where the final block lowers p(answer) >= 0.80",
                interval(test.share_suppressed, test.share_suppressed_ci), 0.8, lambda v: v >= 0.8)]
    if evaluation is None:
        return rows
    diffs = evaluation.test.differences
    base, temp = diffs["patched_minus_base"], diffs["patched_minus_temperature"]
    rows += [
        row("patch_raises_accuracy", "test accuracy: patched - base > 0", base["accuracy"], 0.0, lambda v: v > 0),
        row("patch_raises_p_answer", "test mean p(answer): patched - base > 0", base["mean_p_answer"], 0.0,
            lambda v: v > 0),
        row("patch_lowers_ece", "test ECE (15 equal-width bins): patched - base < 0", base["ece_equal_width"], 0.0,
            lambda v: v < 0),
        row("patch_beats_temperature_accuracy", "test accuracy: patched - temperature-scaled > 0",
            temp["accuracy"], 0.0, lambda v: v > 0),
    ]
    if evaluation.unknown is not None:
        rows.append(row("unknown_confidence", "unknown subjects: mean top-1 probability, patched - base <= 0.05",
                        evaluation.unknown.differences["patched_minus_base"]["mean_confidence"], 0.05,
                        lambda v: v <= 0.05))
    if evaluation.neutral is not None:
        neutral = evaluation.neutral
        rows.append(row("neutral_nll", "neutral text NLL per token: relative rise <= 2%",
                        interval(neutral.relative_change, neutral.relative_change_ci), 0.02, lambda v: v <= 0.02))
    return rows
