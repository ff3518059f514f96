"""Step 6 of a run: each patch (learned gains, the paper's intercept fix) applied to the weights
(`apply_patch`) against the base model and the temperature-scaling baseline, on the held-out test split (also
per relation), the unknown subjects and the held-out neutral lines; and the headline numbers stored in a
patch file.

`capture_inputs` and `run_model` do the forward passes, `evaluate` the bootstrap (cluster-bootstrap over
subjects, paired across models; over lines for the neutral text), so the two can be timed apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from recallfix.patches import ComponentMap, Patch, apply_patch

from . import calibration as cal
from .batching import batches, encode
from .collect import Collected
from .config import AnalysisConfig
from .fit import BlockInputs, capture_final_block_inputs, replay_chunks, replay_logits
from .inputs import Loaded
from .lens import answer_stats, lens_logits
from .records import Dist
from .schema import EstimateModel, Evaluation, MethodInfo, NeutralEvaluation, RelationEvaluation, SetEvaluation
from .summaries import num, suppression

RELATION_METRICS = ("accuracy", "mean_p_answer", "ece_equal_width")

# -- the temperature baseline -----------------------------------------------------------------------

# Logits kept in memory while the temperature is fitted (rows x vocab floats); above it they are recomputed on
# every Newton step instead (very large vocabularies or train splits).
MAX_CACHED_LOGITS = 100_000_000


def logit_chunks(cmap: ComponentMap, x_final: torch.Tensor, answers: torch.Tensor, batch_size: int,
                 device: torch.device) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """The model's logits from the stored final residuals, batch by batch (for `fit_temperature`): computed once
    and kept when they fit in `MAX_CACHED_LOGITS`, else recomputed on every call."""
    def chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad():
            for start in range(0, len(answers), batch_size):
                rows = slice(start, start + batch_size)
                yield lens_logits(cmap, x_final[rows].to(device)), answers[rows].to(device)

    if len(answers) * cmap.shape.vocab_size > MAX_CACHED_LOGITS:
        return chunks
    cached = list(chunks())
    return lambda: iter(cached)


def fit_baseline_temperature(s: Loaded, c: Collected, config: AnalysisConfig) -> float:
    """The temperature-scaling baseline's T, fitted (NLL) on the train split."""
    train = s.known.rows("train")
    return cal.fit_temperature(logit_chunks(s.cmap, c.x_final[train], s.known.answers[train], config.batch_size,
                                            s.device))


# -- forward passes ---------------------------------------------------------------------------------
#
# Every patch here edits the final block only, so the blocks below compute the same for the base model and
# for every patch: they run once (the analysis pass for the facts, `capture_inputs` for the unknown subjects
# and the neutral text), and each model is the final block -> final norm -> unembedding replayed on what
# entered it (`fit.replay_logits`, the real modules with the patch applied to their weights).


@dataclass
class Inputs:
    """What enters the final block, per prompt set, once for every model evaluated."""

    dev: BlockInputs  # last position of each dev fact
    test: BlockInputs  # last position of each test fact
    unknown: BlockInputs | None  # last position of each unknown-subject prompt
    neutral: BlockInputs  # every position of the held-out neutral lines but the last, target: the next token
    neutral_line: torch.Tensor  # [positions] the line of each neutral position


def _fact_inputs(c: Collected, rows: torch.Tensor, answers: torch.Tensor, s: Loaded) -> BlockInputs:
    return BlockInputs(c.final_block_in[rows].to(s.device, s.dtype), c.final_z[rows].to(s.device, s.dtype),
                       targets=answers.to(s.device))


@torch.no_grad()
def capture_inputs(s: Loaded, c: Collected, config: AnalysisConfig) -> Inputs:
    """The final block's inputs for every evaluation set, from the analysis pass and one partial pass each."""
    known, bs = s.known, config.batch_size
    unknown = None
    if s.unknown is not None:
        parts, order = [], []
        for batch in batches(s.unknown.token_ids, bs, s.pad, s.device):
            parts.append(capture_final_block_inputs(s.lm, s.cmap, batch))
            order.append(batch.index)
        unknown = BlockInputs.cat(parts).rows(torch.argsort(torch.cat(order)).to(s.device))
        unknown.targets = s.unknown.answers.to(s.device)
    lines = encode(s.tokenizer, s.neutral_eval)
    neutral, line_of = [], []
    for batch in batches(lines, bs, s.pad, s.device):
        predicting = batch.attention_mask.clone()
        predicting[torch.arange(len(batch), device=s.device), batch.last] = 0  # the last token predicts nothing
        inputs = capture_final_block_inputs(s.lm, s.cmap, batch, positions=predicting.bool())
        next_ids = torch.roll(batch.input_ids, -1, dims=1)[predicting.bool()]
        neutral.append(BlockInputs(inputs.x, inputs.z, targets=next_ids))
        line_of.append(batch.index.to(s.device)[:, None].expand_as(predicting)[predicting.bool()])
    return Inputs(
        dev=_fact_inputs(c, known.rows("dev"), known.answers[known.rows("dev")], s),
        test=_fact_inputs(c, known.rows("test"), known.answers[known.rows("test")], s),
        unknown=unknown,
        neutral=BlockInputs.cat(neutral),
        neutral_line=torch.cat(line_of),
    )


def _final_layer_only(cmap: ComponentMap, patch: Patch) -> None:
    final = cmap.shape.num_layers - 1
    layers = {cmap.validate(str(e.component)).layer for e in patch.edits}
    if layers - {final}:
        raise ValueError(f"patch {patch.id} edits layers {sorted(layers)}; the evaluation replays only the final "
                         f"block (L{final})")


@torch.no_grad()
def replay_dist(model: nn.Module, cmap: ComponentMap, inputs: BlockInputs, patch: Patch | None,
                temperature: float = 1.0) -> Dist:
    """The next-token numbers of each row of `inputs` (targets: the answers) with `patch` applied (None: the base
    model), the logits divided by `temperature`."""
    if patch is not None:
        _final_layer_only(cmap, patch)
    out = Dist.empty(len(inputs))
    with apply_patch(model, patch) if patch is not None else nullcontext():
        for rows, part in replay_chunks(inputs):
            assert part.targets is not None
            out.put(rows.cpu(), answer_stats(replay_logits(cmap, part), part.targets, temperature))
    return out


def split_nll(s: Loaded, inputs: BlockInputs, patch: Patch | None) -> float:
    """Mean NLL of the answer over `inputs` (e.g. the dev split) with `patch` applied (None: the base model)."""
    return float(replay_dist(s.lm, s.cmap, inputs, patch).nll.double().mean()) if len(inputs) else float("nan")


@dataclass
class Runs:
    """One model's numbers on the evaluation sets."""

    test: Dist
    unknown: Dist | None
    neutral: tuple[torch.Tensor, torch.Tensor]  # per-line NLL sums and token counts


def run_model(s: Loaded, inputs: Inputs, patch: Patch | None) -> Runs:
    """Test split, unknown subjects and neutral text, with `patch` applied (None: base)."""
    neutral = replay_dist(s.lm, s.cmap, inputs.neutral, patch)
    lines = len(s.neutral_eval)
    sums = torch.zeros(lines, dtype=torch.float64).index_add_(0, inputs.neutral_line.cpu(), neutral.nll.double())
    counts = torch.bincount(inputs.neutral_line.cpu(), minlength=lines)
    return Runs(test=replay_dist(s.lm, s.cmap, inputs.test, patch),
                unknown=replay_dist(s.lm, s.cmap, inputs.unknown, patch) if inputs.unknown is not None else None,
                neutral=(sums, counts))


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
