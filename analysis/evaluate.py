"""Step 6 of a run: each patch (learned gains, the paper's intercept fix) applied to the weights
(`apply_patch`) against the base model and the temperature-scaling baseline, on the held-out test split (also
per relation), the unknown subjects and the held-out neutral lines; and the headline numbers stored in a
patch file.

`run_base`/`run_patched` do the forward passes, `evaluate` the bootstrap (cluster-bootstrap over subjects,
paired across models; over lines for the neutral text), so the two can be timed apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from recallfix.patches import ComponentMap, Patch, apply_patch

from . import calibration as cal
from .batching import batches, encode
from .collect import Collected, collect, token_nll
from .config import AnalysisConfig
from .inputs import Loaded, Prompts
from .lens import answer_stats, lens_logits
from .records import Dist
from .schema import EstimateModel, Evaluation, MethodInfo, NeutralEvaluation, RelationEvaluation, SetEvaluation
from .summaries import num, suppression

RELATION_METRICS = ("accuracy", "mean_p_answer", "ece_equal_width")

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


def fit_baseline_temperature(s: Loaded, c: Collected, config: AnalysisConfig) -> float:
    """The temperature-scaling baseline's T, fitted (NLL) on the train split."""
    train = s.known.rows("train")
    return cal.fit_temperature(logit_chunks(s.cmap, c.x_final[train], s.known.answers[train], config.batch_size,
                                            s.device))


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


@torch.no_grad()
def split_nll(s: Loaded, split: str, patch: Patch | None, batch_size: int) -> float:
    """Mean NLL of the answer on one split of the facts, with `patch` applied (None: the base model)."""
    rows = s.known.rows(split)
    tokens, answers = [s.known.token_ids[i] for i in rows], s.known.answers[rows]
    total = 0.0
    with apply_patch(s.lm, patch) if patch is not None else nullcontext():
        for batch in batches(tokens, batch_size, s.pad, s.device):
            logits = s.lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            last = logits[torch.arange(len(batch), device=logits.device), batch.last].float().log_softmax(dim=-1)
            total -= float(last.gather(1, answers[batch.index].to(last.device)[:, None]).sum())
    return total / max(len(rows), 1)


@dataclass
class Runs:
    """The passes the evaluation reads for one model (base or patched) beyond what `Collected` holds."""

    test: Collected | None  # None for the base model: the analysis pass has it
    unknown: Collected | None
    neutral: tuple[torch.Tensor, torch.Tensor]  # per-line NLL sums and token counts


def run_model(s: Loaded, patch: Patch | None, config: AnalysisConfig, label: str) -> Runs:
    """Test split (patched only), unknown subjects and neutral text, with `patch` applied (None: base)."""
    bs, progress = config.batch_size, config.progress

    def run(prompts: Prompts, rows: torch.Tensor | None, desc: str) -> Collected:
        tokens = prompts.token_ids if rows is None else [prompts.token_ids[i] for i in rows]
        answers = prompts.answers if rows is None else prompts.answers[rows]
        return collect(s.lm, s.cmap, tokens, answers, pad=s.pad, batch_size=bs, outputs_only=True, progress=progress,
                       desc=f"{desc} ({label})")

    with apply_patch(s.lm, patch) if patch is not None else nullcontext():
        test = run(s.known, s.known.rows("test"), "test") if patch is not None else None
        unknown = run(s.unknown, None, "unknown") if s.unknown else None
        neutral = token_nll(s.lm, encode(s.tokenizer, s.neutral_eval), pad=s.pad, batch_size=bs, progress=progress)
    return Runs(test, unknown, neutral)


# -- the bootstrap ----------------------------------------------------------------------------------


def evaluate_set(models: dict[str, Dist], methods: Sequence[str], groups: Sequence[str], n_boot: int,
                 seed: int) -> SetEvaluation:
    """Metrics with paired cluster-bootstrap intervals for every model on one prompt set; each method against
    the base model and the temperature baseline."""
    resamples = cal.group_resamples(groups, n_boot, seed)
    samples = {name: cal.bootstrap_samples(d, resamples) for name, d in models.items()}

    def difference(a: str, b: str) -> dict[str, EstimateModel]:
        return cal.differences(models[a], models[b], samples[a], samples[b])

    return SetEvaluation(
        n=len(groups),
        n_groups=len(set(groups)),
        models={name: cal.estimates(d, samples[name]) for name, d in models.items()},
        differences={f"{m}_minus_{other}": difference(m, other) for m in methods for other in ("base", "temperature")},
        reliability={name: cal.reliability_bins(d) for name, d in models.items()},
    )


def _few_metrics(o: cal.Columns) -> dict[str, float]:
    return {name: cal.METRICS[name](o) for name in RELATION_METRICS}


def relation_table(models: dict[str, Dist], methods: Sequence[str], facts_relations: Sequence[str],
                   groups: Sequence[str], n_boot: int, seed: int) -> dict[str, RelationEvaluation]:
    """Per relation: accuracy, p(answer) and ECE of every model, and each method minus base, with paired
    cluster-bootstrap intervals over the relation's subjects."""
    out = {}
    cols = {name: cal.columns(d) for name, d in models.items()}
    for relation in sorted(set(facts_relations)):
        rows = np.asarray([i for i, r in enumerate(facts_relations) if r == relation])
        sub = {name: {k: v[rows] for k, v in o.items()} for name, o in cols.items()}
        resamples = cal.group_resamples([groups[i] for i in rows], n_boot, seed)
        point = {name: _few_metrics(o) for name, o in sub.items()}
        boot = {name: {m: np.asarray([cal.METRICS[m]({k: v[r] for k, v in o.items()}) for r in resamples])
                       for m in RELATION_METRICS} for name, o in sub.items()}

        def est(value: float, samples: np.ndarray) -> EstimateModel:
            lo, hi = cal.percentile_interval(samples)
            return EstimateModel(value=num(value), ci_low=lo, ci_high=hi)

        out[relation] = RelationEvaluation(
            n=int(len(rows)), n_groups=len({groups[i] for i in rows}),
            models={name: {m: est(point[name][m], boot[name][m]) for m in RELATION_METRICS} for name in sub},
            differences={f"{method}_minus_base": {m: est(point[method][m] - point["base"][m],
                                                         boot[method][m] - boot["base"][m])
                                                  for m in RELATION_METRICS} for method in methods},
        )
    return out


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


def evaluate(s: Loaded, c: Collected, base: Runs, patched: dict[str, Runs], temperature: float,
             methods: list[MethodInfo], chosen: str, choice: str, base_dev_nll: float,
             config: AnalysisConfig) -> Evaluation:
    """The one comparison: base, every method in `patched` and the temperature baseline, on the same prompts."""
    known, cmap, bs, dev, n_boot, seed = s.known, s.cmap, config.batch_size, s.device, config.n_boot, config.seed
    names = list(patched)
    test_rows = known.rows("test")
    test_groups = [known.groups[i] for i in test_rows]
    test_models = {"base": c.output.take(test_rows), **{m: r.test.output for m, r in patched.items() if r.test},
                   "temperature": temperature_dist(cmap, c.x_final[test_rows], known.answers[test_rows],
                                                   temperature, bs, dev)}
    unknown = None
    if s.unknown is not None and base.unknown is not None:
        unknown = evaluate_set({
            "base": base.unknown.output, **{m: r.unknown.output for m, r in patched.items() if r.unknown},
            "temperature": temperature_dist(cmap, base.unknown.x_final, s.unknown.answers, temperature, bs, dev),
        }, names, s.unknown.groups, n_boot, seed)
    relations = [known.facts[i].relation or "(none)" for i in test_rows]
    return Evaluation(
        n_boot=n_boot, temperature=temperature, base_dev_nll=base_dev_nll, methods=methods, chosen=chosen,
        choice=choice, test=evaluate_set(test_models, names, test_groups, n_boot, seed), unknown=unknown,
        neutral={m: neutral_summary(base.neutral, r.neutral, n_boot, seed) for m, r in patched.items()},
        by_relation=relation_table(test_models, names, relations, test_groups, n_boot, seed),
        suppression_after_patch={m: suppression(r.test.output, r.test.before, test_groups, n_boot, seed)
                                 for m, r in patched.items() if r.test},
    )


# -- what a patch file records ------------------------------------------------------------------------


def patch_metrics(evaluation: Evaluation, method: str) -> dict[str, float | None]:
    """The headline numbers stored in the patch file of `method` ("patched" there is that method)."""
    test, unknown, neutral = evaluation.test, evaluation.unknown, evaluation.neutral.get(method)
    out: dict[str, float | None] = {"temperature_baseline": evaluation.temperature}
    for model, key in (("base", "base"), (method, "patched"), ("temperature", "temperature")):
        for metric in ("accuracy", "mean_p_answer", "ece_equal_width", "nll"):
            out[f"test_{metric}_{key}"] = test.models[model][metric].value
    if unknown is not None:
        for model, key in (("base", "base"), (method, "patched")):
            out[f"unknown_mean_confidence_{key}"] = unknown.models[model]["mean_confidence"].value
    if neutral is not None:
        out["neutral_nll_relative_change"] = neutral.relative_change
    return out
