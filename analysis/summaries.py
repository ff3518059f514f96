"""Steps 1-4 of a run, from the pass over every fact (`Collected`) to the typed sections of analysis.json:
logit lens, the final block's components and neurons, mover heads and MLP regressions, and the verdict.

Pure: tensors in, `schema` models out (undefined numbers become None, see `num`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from recallfix.patches.components import Component, ComponentMap

from . import calibration as cal
from .attribution import summarize, top_neurons
from .collect import Collected
from .config import AnalysisConfig
from .inputs import Loaded
from .movers import summarize_movers
from .records import Dist
from .schema import (
    BetaRow,
    ComponentRow,
    FinalLayer,
    InterceptRow,
    LensCurve,
    LogitLens,
    Mechanisms,
    MlpRegression,
    MoverRow,
    Movers,
    Suppression,
    Verdict,
)

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
    by_relation: dict[str, list[int]] = {}
    for i, relation in enumerate(relations):
        by_relation.setdefault(relation or "(none)", []).append(i)
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
            mean_mlp_dla=num(c.dla[:, c.names.index(mlp)].mean()),
            heads=heads,
            intercept=InterceptRow(mean_dla=num(i_dla.mean()), share_dla_positive=num((i_dla > 0).float().mean()),
                                   median_answer_rank=num(i_rank.float().median()),
                                   share_answer_top10=num((i_rank <= 10).float().mean())),
        ))
    best = max(out, key=lambda r: r.intercept.mean_dla if r.intercept.mean_dla is not None else -math.inf)
    answer_mlp = best.name if (best.intercept.mean_dla or 0) > 0 else None
    return out, answer_mlp


def verdict_text(test: Suppression, top: Sequence[ComponentRow], final_layer: FinalLayer) -> tuple[bool, str]:
    share = test.share_suppressed or 0.0
    layer = final_layer.layer
    found = share > 0.5 and any((r.mean_effect or 0) < 0 for r in top)
    names = ", ".join(f"{r.name} ({r.mean_effect:+.3f} nats)" for r in top[:3]) or "none"
    if found:
        text = (f"The final block (layer {layer}) lowers p(answer) on {share:.0%} of held-out prompts "
                f"(mean {test.mean_p_before:.3f} -> {test.mean_p_after:.3f}; accuracy "
                f"{test.accuracy_before:.1%} -> {test.accuracy_after:.1%}). Top suppressing components "
                f"(mean effect on log p(answer)): {names}.")
        change, rescale = final_layer.mean_change_logit, final_layer.rescale.mean_dla
        if change is not None and rescale is not None and change < 0 and rescale < 0:
            direct = change - rescale
            how = ("mostly by enlarging the residual stream, so that the final norm shrinks every logit already "
                   "there (a higher temperature)" if rescale < min(direct, 0) else
                   "mostly by writing against the answer")
            text += (f" It does so {how}: of the {change:+.2f} change of the answer's logit against the mean, the "
                     f"norm's rescaling accounts for {rescale:+.2f} and the components' direct writes for "
                     f"{direct:+.2f}.")
    else:
        text = (f"No final-layer suppression: the final block lowers p(answer) on only {share:.0%} of held-out "
                f"prompts. Most suppressing components: {names}.")
    return found, text


@dataclass
class Description:
    """Steps 1-4, the sections of analysis.json that need no patch."""

    logit_lens: LogitLens
    final_layer: FinalLayer
    mechanisms: Mechanisms
    verdict: Verdict


def describe(s: Loaded, c: Collected, config: AnalysisConfig) -> Description:
    """Steps 1-4 from the pass over every fact: logit lens, final block, mechanisms, verdict."""
    known = s.known
    final_layer = final_layer_summary(c, torch.arange(len(known.facts)), s.final, config.report_neurons)
    regression, answer_mlp = regression_summary(c, s.cmap)
    test_rows = known.rows("test")
    groups = known.groups
    test = suppression(c.output.take(test_rows), c.before.take(test_rows), [groups[i] for i in test_rows],
                       config.n_boot, config.seed)
    ranked = sorted((r for r in final_layer.components if r.mean_effect is not None), key=lambda r: r.mean_effect)
    top = [r for r in ranked if r.mean_effect < 0][:5]
    found, text = verdict_text(test, top, final_layer)
    return Description(
        logit_lens=logit_lens(c, [f.relation for f in known.facts], s.cmap.shape.num_layers),
        final_layer=final_layer,
        mechanisms=Mechanisms(movers=mover_summary(c, config.min_attention, config.seed), mlp_regression=regression,
                              answer_mlp=answer_mlp),
        verdict=Verdict(test=test, all=suppression(c.output, c.before, groups, config.n_boot, config.seed),
                        top_suppressors=top, suppression_found=found, text=text),
    )
