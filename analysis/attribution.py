"""Attribution of the answer to final-layer components, and which of them push it down.

With the final norm's scale frozen at its value in the real forward pass, the logits are a sum of
per-component terms (`recallfix.patches.decompose`). A component c's DLA to the answer a is

    DLA_c = c · (r_a - r_mean),    r_t = W_U[t] ⊙ w_norm / scale   (LayerNorm: centred first)

i.e. how much c raises the answer's logit against the mean logit. A component "pushes the answer
down" on a prompt when DLA_c < 0. Neuron n of the final MLP writes act_n · W_out[:, n], so its DLA
is act_n · (W_out[:, n] · (r_a - r_mean)); the neurons sum to the MLP's DLA minus its bias's.

DLA freezes the final norm, so it misses one way a last layer lowers p(answer): writing a large
vector that raises the norm's scale and shrinks every logit already in the stream (a temperature).
Across the final block the change of the answer's logit against the mean is exactly

    Δ(z_a - mean z) = sum_{c in final block} DLA_c  +  rescale,
    rescale = x_in · (d(s_out) - d(s_in)),   d(s) = r_a(s) - r_mean(s)

(x_in: the stream entering the block, s_in/s_out: the norm's scale before/after the block). And two
measures on log p(answer) itself, through the real final norm and softmax:

    effect_c   = log p_a(x_out) - log p_a(x_out - c)      (heads, MLP: remove the direct write)
    gradient_n = ∇_x log p_a(x_out) · act_n W_out[:, n]   (neurons: first order of the same)

A component *suppresses* the answer on a prompt when its effect on log p(answer) is negative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recallfix.patches.components import Component, ComponentMap
from recallfix.patches.decompose import constant_logits, frozen_norm_scale, mean_readout, norm_linear, readout

from .gemm import matmul_t
from .lens import lens_answer


def _answer_logp(cmap: ComponentMap, x: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    return lens_answer(cmap, x, answer_ids)[0]


def ablation_effect(cmap: ComponentMap, x_out: torch.Tensor, writes: torch.Tensor,
                    answer_ids: torch.Tensor) -> torch.Tensor:
    """log p_a(x_out) - log p_a(x_out - c) for each write c [batch, C, d] (real final norm). [batch, C]"""
    logp = _answer_logp(cmap, torch.cat([x_out.unsqueeze(1), x_out.unsqueeze(1) - writes], dim=1), answer_ids)
    return logp[:, :1] - logp[:, 1:]


def logprob_gradient(cmap: ComponentMap, x_out: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """∇_x log p_a(x) at x_out, through the real final norm and softmax. [batch, d]

    With n = norm(x) and logits W_U n + const: ∇_n log p_a = W_U[a] - p · W_U, in closed form (two products
    with W_U, no autograd graph over the vocabulary), then back through the norm (d-dimensional) by autograd."""
    weight = cmap.unembed().weight
    with torch.enable_grad():
        x = x_out.detach().float().requires_grad_(True)
        normed = norm_linear(cmap, x, frozen_norm_scale(cmap, x))
    with torch.no_grad():
        p = (matmul_t(normed.detach(), weight) + constant_logits(cmap)).softmax(dim=-1)
        toward = weight[answer_ids].float() - matmul_t(p, weight.T)
    (grad,) = torch.autograd.grad(normed, x, grad_outputs=toward)
    return grad


def neuron_logprob_attribution(cmap: ComponentMap, grad: torch.Tensor, acts: torch.Tensor,
                               layer: int) -> torch.Tensor:
    """First-order effect of each neuron's write on log p(answer): act_n (W_out[:, n] · grad). [batch, d_mlp]"""
    w_out = cmap.output_weight(cmap.mlp_out(layer))
    return acts.float() * (grad.to(w_out.dtype) @ w_out).float()


def rescale_term(cmap: ComponentMap, x_in: torch.Tensor, x_out: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """How much the change of the final norm's scale alone moves the answer's logit against the mean. [batch]"""
    def direction(scale: torch.Tensor) -> torch.Tensor:
        return readout(cmap, scale, answer_ids.view(-1, 1))[:, 0] - mean_readout(cmap, scale)

    s_in, s_out = frozen_norm_scale(cmap, x_in), frozen_norm_scale(cmap, x_out)
    return (x_in * (direction(s_out) - direction(s_in))).sum(dim=-1)


@dataclass
class ColumnStats:
    name: str
    mean: float
    std: float
    share_negative: float  # share of prompts where the value is < 0 (the component pushes the answer down)


def summarize(values: torch.Tensor, names: list[str]) -> list[ColumnStats]:
    """Mean, std and share-negative of each column of values [prompts, columns]."""
    if values.shape[0] == 0:
        return [ColumnStats(n, float("nan"), float("nan"), float("nan")) for n in names]
    mean = values.mean(dim=0)
    std = values.std(dim=0) if values.shape[0] > 1 else torch.zeros_like(mean)
    neg = (values < 0).float().mean(dim=0)
    return [ColumnStats(n, float(m), float(s), float(q)) for n, m, s, q in zip(names, mean, std, neg, strict=True)]


def top_neurons(values: torch.Tensor, layer: int, k: int, *, most_negative: bool = True) -> list[int]:
    """Indices of the k neurons with the most negative (or most positive) mean value. values [prompts, d_mlp]."""
    if values.shape[0] == 0:
        return []
    mean = values.mean(dim=0)
    return [int(n) for n in torch.argsort(mean, descending=not most_negative, stable=True)[:k]]


def select_suppressors(
    final: list[ColumnStats], neurons: list[ColumnStats], *, mlp: str = "whole", min_share: float = 0.5,
) -> list[str]:
    """Final-layer components to give a gain: those whose effect on log p(answer) is negative on average
    and on at least `min_share` of the (training) prompts. Heads always; the MLP as a whole
    (mlp="whole"), or the given neurons (mlp="neurons"), or not at all (mlp="none")."""
    def suppresses(s: ColumnStats) -> bool:
        return s.mean < 0 and s.share_negative >= min_share

    def kind(s: ColumnStats) -> str | None:  # None: not a component (the attention bias)
        component = Component.try_parse(s.name)
        return component.kind if component else None

    chosen = [s.name for s in final if kind(s) == "head" and suppresses(s)]
    if mlp == "whole":
        chosen += [s.name for s in final if kind(s) == "mlp" and suppresses(s)]
    elif mlp == "neurons":
        chosen += [s.name for s in neurons if suppresses(s)]
    elif mlp != "none":
        raise ValueError(f"mlp must be 'whole', 'neurons' or 'none', got {mlp!r}")
    return chosen
