"""What a gain above 1 does to the answer, path by path: measured, so the report need not guess.

The free fit may amplify a component that the findings name as a suppressor (its direct effect on log p(answer)
is negative), and still raise p(answer). A gain g on a final-block component reaches the logits along three
paths at the last position. With h the final norm's input (the stream after the block) and N the final norm:

    h0  the base model's stream;  h1  with the gain;  hm  with the gain but the final MLP's output held at h0's
    L(x)  the unembedding of N with its scale frozen at h0's value: linear in x, so paths add up

    direct    L(hm - h0)              the component's extra write (and, for a head, nothing else)
    MLP       L(h1 - hm)              the final MLP reads the stream the head wrote to; 0 for an MLP or neuron gain
    rescale   logits1 - logits0 - L(h1 - h0)   the final norm divides the new stream by a new scale

The three logit changes sum exactly to the real one. Each path's effect on log p(answer) is that path alone added
to the base logits (softmax is not linear, so these need not sum to the total, which is measured too).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recallfix.patches.components import ComponentMap
from recallfix.patches.decompose import frozen_norm_scale, norm_linear
from recallfix.patches.hooks import FINAL_NORM_IN, capture, hooks

from ..learn.gain_hooks import GainHooks
from ..learn.replay import BlockInputs, replay_chunks, replay_logits
from ..mechanism.summaries import estimate
from ..schema import AmplifiedComponent

PATHS = ("direct", "mlp", "rescale")


def _answer_logp(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    return logits.log_softmax(dim=-1).gather(1, answers[:, None])[:, 0]


@torch.no_grad()
def path_effects(cmap: ComponentMap, inputs: BlockInputs, name: str, gain: float) -> dict[str, torch.Tensor]:
    """Per row of `inputs` (targets: the answers): the change of log p(answer) with `gain` on component `name`,
    in total and along each path alone, and the change of the answer's logit along each path. {key: [n]}"""
    component = cmap.validate(name)
    final = cmap.shape.num_layers - 1
    mlp_at = f"blocks.{final}.hook_mlp_out"
    gained = GainHooks(cmap, [name], inputs.x.device)
    gained.set({name: gain})
    unembed = cmap.unembed().weight.float()
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("total", *PATHS, *(f"{p}_logit" for p in PATHS))}
    for _, part in replay_chunks(inputs):
        assert part.targets is not None
        answers = part.targets
        with capture(cmap, [mlp_at, FINAL_NORM_IN]) as base:
            logits0 = replay_logits(cmap, part)
        with gained, capture(cmap, [FINAL_NORM_IN]) as new:
            logits1 = replay_logits(cmap, part)
        h0, h1 = base[FINAL_NORM_IN].float(), new[FINAL_NORM_IN].float()
        if component.kind == "head":  # the MLP's own gain (or a neuron's) has no path through the MLP
            held = base[mlp_at]
            with gained, hooks(cmap, {mlp_at: lambda _t, held=held: held}), capture(cmap, [FINAL_NORM_IN]) as kept:
                replay_logits(cmap, part)
            hm = kept[FINAL_NORM_IN].float()
        else:
            hm = h1
        scale = frozen_norm_scale(cmap, h0)

        def read(x: torch.Tensor, scale: torch.Tensor = scale) -> torch.Tensor:
            return norm_linear(cmap, x, scale) @ unembed.T

        change = {"direct": read(hm - h0), "mlp": read(h1 - hm)}
        change["rescale"] = (logits1 - logits0) - change["direct"] - change["mlp"]
        logp0 = _answer_logp(logits0, answers)
        out["total"].append(_answer_logp(logits1, answers) - logp0)
        for path, delta in change.items():
            out[path].append(_answer_logp(logits0 + delta, answers) - logp0)
            out[f"{path}_logit"].append(delta.gather(1, answers[:, None])[:, 0])
    return {k: torch.cat(v).cpu() if v else torch.zeros(0) for k, v in out.items()}


def amplified_components(cmap: ComponentMap, inputs: BlockInputs, gains: dict[str, float], groups: Sequence[str],
                         n_boot: int, seed: int) -> list[AmplifiedComponent]:
    """Every component with a gain above 1, each alone at its gain, on `inputs` (the test split), with
    cluster-bootstrap intervals over `groups` (subjects)."""
    rows = []
    for name, gain in gains.items():
        if gain <= 1.0:
            continue
        effects = path_effects(cmap, inputs, name, gain)
        rows.append(AmplifiedComponent(
            name=name, gain=gain, total=estimate(effects["total"], groups, n_boot, seed),
            paths={p: estimate(effects[p], groups, n_boot, seed) for p in PATHS},
            answer_logit={p: estimate(effects[f"{p}_logit"], groups, n_boot, seed) for p in PATHS},
        ))
    return rows
