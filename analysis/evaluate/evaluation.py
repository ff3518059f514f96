"""The evaluation's one table: base, each patch and the temperature baseline on the same prompts, with paired
cluster-bootstrap intervals (subjects resampled; lines for the neutral text), per relation too; and the headline
numbers a patch file records.

The numbers come from `passes` (one `Dist` per model and prompt set); this module only does the statistics, so
the two can be timed apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .. import calibration as cal
from ..config import AnalysisConfig
from ..data.inputs import Loaded
from ..mechanism.collect import Collected
from ..mechanism.summaries import num, suppression
from ..records import Dist
from ..schema import EstimateModel, Evaluation, MethodInfo, NeutralEvaluation, RelationEvaluation, SetEvaluation
from .passes import Inputs, Runs, replay_dist

RELATION_METRICS = ("accuracy", "mean_p_answer", "ece_equal_width", "nll")  # nll: the transfer table's




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
    """Per relation: accuracy, p(answer), ECE and NLL of every model, and each method minus base, with paired
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


def evaluate(s: Loaded, c: Collected, inputs: Inputs, base: Runs, patched: dict[str, Runs], temperature: float,
             methods: list[MethodInfo], chosen: str, choice: str, base_dev_nll: float,
             config: AnalysisConfig) -> Evaluation:
    """The one comparison: base, every method in `patched` and the temperature baseline, on the same prompts."""
    known, n_boot, seed = s.known, config.n_boot, config.seed
    names = list(patched)
    test_rows = known.rows("test")
    groups = known.groups  # a property that builds the list: once, not per row
    test_groups = [groups[i] for i in test_rows]
    test_models = {"base": base.test, **{m: r.test for m, r in patched.items()},
                   "temperature": replay_dist(s.lm, s.cmap, inputs.test, None, temperature)}
    unknown = None
    if s.unknown is not None and base.unknown is not None and inputs.unknown is not None:
        unknown = evaluate_set({
            "base": base.unknown, **{m: r.unknown for m, r in patched.items() if r.unknown},
            "temperature": replay_dist(s.lm, s.cmap, inputs.unknown, None, temperature),
        }, names, s.unknown.groups, n_boot, seed)
    relations = [known.facts[i].relation or "(none)" for i in test_rows]
    return Evaluation(
        n_boot=n_boot, temperature=temperature, base_dev_nll=base_dev_nll, methods=methods, chosen=chosen,
        choice=choice, test=evaluate_set(test_models, names, test_groups, n_boot, seed), unknown=unknown,
        neutral={m: neutral_summary(base.neutral, r.neutral, n_boot, seed) for m, r in patched.items()},
        by_relation=relation_table(test_models, names, relations, test_groups, n_boot, seed),
        suppression_after_patch={m: suppression(r.test, c.before.take(test_rows), test_groups, n_boot, seed)
                                 for m, r in patched.items()},
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
