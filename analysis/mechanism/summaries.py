"""Steps 1-4 of a run, from the pass over every fact (`Collected`) to the typed sections of analysis.json:
logit lens, the final block's components and neurons, mover heads and MLP regressions, and the findings
(the headline: what the final block does to the answer, as a whole and component by component).

Pure: tensors in, `schema` models out (undefined numbers become None, see `num`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from recallfix.patches.components import Component, ComponentMap

from .. import calibration as cal
from ..config import AnalysisConfig
from ..data.inputs import Loaded
from ..records import Dist
from ..schema import (
    BetaRow,
    ComponentFinding,
    ComponentRow,
    EstimateModel,
    FinalLayer,
    Findings,
    InterceptRow,
    LensCurve,
    LogitLens,
    Mechanisms,
    MlpRegression,
    MoverRow,
    Movers,
    Suppression,
)
from .attribution import summarize, top_neurons
from .collect import Collected
from .movers import summarize_movers

SCATTER_HEADS = 4  # mover-head scatter plots, movers first
SCATTER_POINTS = 500


def num(x: float | torch.Tensor | None) -> float | None:
    """A float for analysis.json: None for undefined (None, NaN, inf), so the file stays strict JSON."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def lens_curve(p: torch.Tensor, rank: torch.Tensor) -> LensCurve:
    if p.shape[0] == 0:
        return LensCurve(n=0, mean_p_answer=[], median_rank=[], accuracy=[])
    return LensCurve(
        n=int(p.shape[0]),
        mean_p_answer=[num(v) for v in p.mean(dim=0)],
        median_rank=[num(v) for v in rank.float().median(dim=0).values],
        accuracy=[num(v) for v in (rank == 1).float().mean(dim=0)],
    )


def logit_lens(c: Collected, relations: Sequence[str | None], num_layers: int) -> LogitLens:
    """The lens curves over the prompts the lens covered (`c.sample`); `relations` of every prompt."""
    by_relation: dict[str, list[int]] = {}
    for i, row in enumerate(c.sample.tolist()):
        by_relation.setdefault(relations[row] or "(none)", []).append(i)
    return LogitLens(
        num_layers=num_layers,
        all=lens_curve(c.lens_p, c.lens_rank),
        by_relation={r: lens_curve(c.lens_p[rows], c.lens_rank[rows]) for r, rows in sorted(by_relation.items())},
    )


def component_rows(names: Sequence[str], dla: torch.Tensor | None, effect: torch.Tensor | None) -> list[ComponentRow]:
    n = len(names)
    dla_stats = summarize(dla, list(names)) if dla is not None else [None] * n
    eff_stats = summarize(effect, list(names)) if effect is not None else [None] * n
    return [
        ComponentRow(
            name=name,
            mean_dla=num(d.mean) if d else None, std_dla=num(d.std) if d else None,
            share_dla_negative=num(d.share_negative) if d else None,
            mean_effect=num(e.mean) if e else None,
            share_effect_negative=num(e.share_negative) if e else None,
        )
        for name, d, e in zip(names, dla_stats, eff_stats, strict=True)
    ]


def neuron_names(layer: int, neurons: Sequence[int]) -> list[str]:
    return [str(Component(layer, "neuron", n)) for n in neurons]


def final_layer_summary(c: Collected, rows: torch.Tensor, layer: int, k: int) -> FinalLayer:
    idx = [c.names.index(n) for n in c.final_names]
    dla = c.dla[rows][:, idx]
    effect = c.final_effect[rows]

    def neuron_rows(most_negative: bool) -> list[ComponentRow]:
        order = top_neurons(c.neuron_effect[rows], layer, k, most_negative=most_negative)
        return component_rows(neuron_names(layer, order), c.neuron_dla[rows][:, order],
                              c.neuron_effect[rows][:, order])

    return FinalLayer(
        layer=layer,
        n_prompts=int(len(rows)),
        components=component_rows(c.final_names, dla, effect),
        rescale=component_rows(["rescale"], c.rescale[rows][:, None], None)[0],
        mean_change_logit=num((dla.sum(dim=1) + c.rescale[rows]).mean()) if len(rows) else None,
        mean_change_logp=num((c.before.nll[rows] - c.output.nll[rows]).mean()) if len(rows) else None,
        neurons_suppressing=neuron_rows(most_negative=True),
        neurons_promoting=neuron_rows(most_negative=False),
    )


def suppression(output: Dist, before: Dist, groups: Sequence[str], n_boot: int, seed: int) -> Suppression:
    """How the final block moves p(answer): before (lens of the stream entering it) vs after (the output)."""
    n = len(output.p_answer)
    suppressed = output.p_answer < before.p_answer
    recalled = before.correct
    shares = suppressed.double().numpy()
    boot = np.asarray([shares[rows].mean() for rows in cal.group_resamples(groups, n_boot, seed) if len(rows)])
    return Suppression(
        n=n,
        mean_p_before=num(before.p_answer.mean()) if n else None,
        mean_p_after=num(output.p_answer.mean()) if n else None,
        share_suppressed=num(suppressed.float().mean()) if n else None,
        share_suppressed_ci=list(cal.percentile_interval(boot)) if len(boot) else [None, None],
        accuracy_before=num(before.correct.float().mean()) if n else None,
        accuracy_after=num(output.correct.float().mean()) if n else None,
        n_recalled=int(recalled.sum()),
        share_suppressed_recalled=num(suppressed[recalled].float().mean()) if recalled.any() else None,
    )


def mover_summary(c: Collected, min_attention: float, seed: int) -> Movers | None:
    if c.attention is None or c.subject_attribution is None:
        return None
    has = ~torch.isnan(c.attention[:, 0, 0])
    attention, attribution = c.attention[has], c.subject_attribution[has]
    if attention.shape[0] == 0:
        return None
    heads = summarize_movers(attention, attribution, min_attention=min_attention)
    plotted = ([h for h in heads if h.is_mover] + [h for h in heads if not h.is_mover])[:SCATTER_HEADS]
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randperm(attention.shape[0], generator=generator)[:SCATTER_POINTS]
    scatter = {}
    for h in plotted:
        head = Component.parse(h.name)
        points = torch.stack([attention[sample, head.layer, head.index], attribution[sample, head.layer, head.index]],
                             dim=1)
        scatter[h.name] = [[round(float(a), 5), round(float(b), 5)] for a, b in points]
    return Movers(
        n_prompts=int(attention.shape[0]),
        min_attention=min_attention,
        heads=[MoverRow(name=h.name, mean_attention=num(h.mean_attention),
                        mean_subject_attribution=num(h.mean_attribution), correlation=num(h.correlation),
                        is_mover=h.is_mover) for h in heads],
        movers=[h.name for h in heads if h.is_mover],
        scatter=scatter,
    )


def regression_summary(c: Collected, cmap: ComponentMap) -> tuple[list[MlpRegression], str | None]:
    """Per layer: the MLP regressed on its block's heads; and the MLP whose intercept points at the answer."""
    assert c.beta is not None and c.r2 is not None and c.intercept_dla is not None and c.intercept_rank is not None
    out = []
    for layer in range(cmap.shape.num_layers):
        beta = c.beta[:, layer]
        heads = [BetaRow(name=name, mean_beta=num(beta[:, h].mean()), median_beta=num(beta[:, h].median()),
                         share_amplify=num((beta[:, h] > 1).float().mean()),
                         share_erase=num((beta[:, h] < 0).float().mean()))
                 for h, name in enumerate(cmap.heads(layer))]
        i_dla, i_rank = c.intercept_dla[:, layer], c.intercept_rank[:, layer]
        mlp = str(Component(layer, "mlp"))
        out.append(MlpRegression(
            layer=layer, name=mlp, mean_r2=num(c.r2[:, layer].mean()),
            mean_mlp_dla=num(c.dla[c.sample, c.names.index(mlp)].mean()),
            heads=heads,
            intercept=InterceptRow(mean_dla=num(i_dla.mean()), share_dla_positive=num((i_dla > 0).float().mean()),
                                   median_answer_rank=num(i_rank.float().median()),
                                   share_answer_top10=num((i_rank <= 10).float().mean())),
        ))
    best = max(out, key=lambda r: r.intercept.mean_dla if r.intercept.mean_dla is not None else -math.inf)
    answer_mlp = best.name if (best.intercept.mean_dla or 0) > 0 else None
    return out, answer_mlp


def component_findings(effect: torch.Tensor, names: Sequence[str], groups: Sequence[str], n_boot: int, seed: int,
                       min_share: float) -> list[ComponentFinding]:
    """Each component's share of prompts where its write lowers log p(answer) and its mean effect, with
    cluster-bootstrap intervals over subjects; most suppressing (lowest mean effect) first."""
    e = effect.double().numpy()
    resamples = [rows for rows in cal.group_resamples(groups, n_boot, seed) if len(rows)]
    means = np.stack([e[rows].mean(axis=0) for rows in resamples]) if resamples else np.zeros((0, e.shape[1]))
    shares = np.stack([(e[rows] < 0).mean(axis=0) for rows in resamples]) if resamples else means
    out = []
    for k, name in enumerate(names):
        mean, share = (num(e[:, k].mean()), num((e[:, k] < 0).mean())) if len(e) else (None, None)
        mean_ci, share_ci = cal.percentile_interval(means[:, k]), cal.percentile_interval(shares[:, k])
        consistent = share is not None and share >= min_share and mean_ci[1] is not None and mean_ci[1] < 0
        out.append(ComponentFinding(name=name, share_lowers=share, share_lowers_ci=list(share_ci), mean_effect=mean,
                                    mean_effect_ci=list(mean_ci), consistent=consistent))
    return sorted(out, key=lambda f: math.inf if f.mean_effect is None else f.mean_effect)


def estimate(values: torch.Tensor, groups: Sequence[str], n_boot: int, seed: int) -> EstimateModel:
    """The mean of per-prompt `values` with its cluster-bootstrap interval over subjects."""
    v = values.double().numpy()
    if not len(v):
        return EstimateModel(value=None, ci_low=None, ci_high=None)
    lo, hi = cal.percentile_interval(np.asarray([v[rows].mean() for rows in cal.group_resamples(groups, n_boot, seed)
                                                 if len(rows)]))
    return EstimateModel(value=num(v.mean()), ci_low=lo, ci_high=hi)


def _ci(lo: float | None, hi: float | None, fmt: str) -> str:
    return "" if lo is None or hi is None else f" [{format(lo, fmt)}, {format(hi, fmt)}]"


def headline(layer: int, test: Suppression, rescale: EstimateModel, components: Sequence[ComponentFinding]) -> str:
    """What was found, at both levels, in words: findings with intervals, never a pass or a fail."""
    lo, hi = test.share_suppressed_ci
    share = test.share_suppressed or 0.0
    moves = "lowers" if share > 0.5 else "raises"
    block = (f"Final block (layer {layer}): it {moves} p(answer) on most held-out prompts; it lowers it on "
             f"{share:.0%}{_ci(lo, hi, '.0%')} of {test.n} (mean p(answer) {test.mean_p_before:.3f} -> "
             f"{test.mean_p_after:.3f}, accuracy {test.accuracy_before:.1%} -> {test.accuracy_after:.1%}).")
    if rescale.value is not None:
        block += (f" The final norm's change of scale moves the answer's logit against the mean by "
                  f"{rescale.value:+.3f}{_ci(rescale.ci_low, rescale.ci_high, '+.3f')}.")
    consistent = [f for f in components if f.consistent]
    if consistent:
        listed = "; ".join(
            f"{f.name} lowers p(answer) on {f.share_lowers:.0%}{_ci(*f.share_lowers_ci, '.0%')} of prompts, mean "
            f"effect {f.mean_effect:+.3f}{_ci(*f.mean_effect_ci, '+.3f')} nats" for f in consistent[:4])
        more = f" (and {len(consistent) - 4} more)" if len(consistent) > 4 else ""
        parts = (f"Components: {len(consistent)} consistent suppressor{'s' if len(consistent) > 1 else ''} of the "
                 f"answer: {listed}{more}.")
        if share <= 0.5:
            parts += " The block promotes the answer overall while holding these suppressors."
    else:
        top = components[0] if components else None
        parts = ("Components: no final-layer component lowers p(answer) consistently"
                 + (f" (the most suppressing, {top.name}, lowers it on {top.share_lowers:.0%} of prompts, mean "
                    f"effect {top.mean_effect:+.3f} nats)." if top and top.mean_effect is not None else "."))
    return f"{block} {parts}"


@dataclass
class Description:
    """Steps 1-4, the sections of analysis.json that need no patch."""

    logit_lens: LogitLens
    final_layer: FinalLayer
    mechanisms: Mechanisms
    findings: Findings


def describe(s: Loaded, c: Collected, config: AnalysisConfig) -> Description:
    """Steps 1-4 from the pass over every fact: logit lens, final block, mechanisms, findings."""
    known = s.known
    final_layer = final_layer_summary(c, torch.arange(len(known.facts)), s.final, config.report_neurons)
    regression, answer_mlp = regression_summary(c, s.cmap)
    test_rows = known.rows("test")
    groups = known.groups
    test_groups = [groups[i] for i in test_rows]
    test = suppression(c.output.take(test_rows), c.before.take(test_rows), test_groups, config.n_boot, config.seed)
    components = component_findings(c.final_effect[test_rows], c.final_names, test_groups, config.n_boot,
                                     config.seed, config.min_share)
    rescale = estimate(c.rescale[test_rows], test_groups, config.n_boot, config.seed)
    return Description(
        logit_lens=logit_lens(c, [f.relation for f in known.facts], s.cmap.shape.num_layers),
        final_layer=final_layer,
        mechanisms=Mechanisms(n_prompts=len(c.sample), movers=mover_summary(c, config.min_attention, config.seed),
                              mlp_regression=regression, answer_mlp=answer_mlp),
        findings=Findings(layer=s.final, test=test, all=suppression(c.output, c.before, groups, config.n_boot,
                                                                    config.seed),
                          rescale=rescale, block_lowers=(test.share_suppressed or 0) > 0.5, components=components,
                          suppressors=[f.name for f in components if f.consistent],
                          text=headline(s.final, test, rescale, components)),
    )
