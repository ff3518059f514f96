"""Attribution of the answer to final-layer components, and which of them push it down.

With the final norm's scale frozen at its value in the real forward pass, the logits are a sum of
per-component terms (`recallfix.patches.decompose`). A component c's DLA to the answer a is

    DLA_c = c · (r_a - r_mean),    r_t = W_U[t] ⊙ w_norm / scale   (LayerNorm: centred first)

i.e. how much c raises the answer's logit against the mean logit. A component "pushes the answer
down" on a prompt when DLA_c < 0. Neuron n of the final MLP writes act_n · W_out[:, n], so its DLA
is act_n · (W_out[:, n] · (r_a - r_mean)); the neurons sum to the MLP's DLA minus its bias's.

On Gemma 3 a head's or neuron's write passes a norm before the residual add; its scale is frozen too
(`recallfix.patches.decompose`), so the writes, their DLA and their effects are those through it.

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
from recallfix.patches.decompose import (
    constant_logits,
    frozen_norm_scale,
    mean_readout,
    norm_linear,
    readout,
    through_post_mlp_norm,
)

from .gemm import matmul_t
from .lens import lens_answer


def _answer_logp(cmap: ComponentMap, x: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    return lens_answer(cmap, x, answer_ids)[0]


def ablation_effect(cmap: ComponentMap, x_out: torch.Tensor, writes: torch.Tensor,
                    answer_ids: torch.Tensor) -> torch.Tensor:
    """log p_a(x_out) - log p_a(x_out - c) for each write c [batch, C, d] (real final norm). [batch, C]"""
    logp = _answer_logp(cmap, torch.cat([x_out.unsqueeze(1), x_out.unsqueeze(1) - writes], dim=1), answer_ids)
    return logp[:, :1] - logp[:, 1:]


def head_readout(cmap: ComponentMap, layer: int) -> torch.Tensor:
    """Every head's z straight to unscaled logits: row h*d_head + i is W_U P(W_O[:, h*d_head + i]), where
    P(v) = w_norm ⊙ v (LayerNorm: v centred first) is the final norm without its scale. [heads * d_head, vocab]

    Where a norm follows the attention output projection (Gemma 3), the columns are taken through its gain g
    (g ⊙ W_O[:, i]); its frozen scale, which differs per prompt, divides z instead (`ablation_effect_heads`)."""
    w_o = cmap.output_weight(cmap.attn_out(layer)).float()  # [d_model, heads * d_head]
    if (norm := cmap.post_attn_norm(layer)) is not None:
        w_o = w_o * cmap.norm_gain(norm).unsqueeze(-1)
    columns = norm_linear(cmap, w_o.T, torch.ones(w_o.shape[1], device=w_o.device))
    return matmul_t(columns, cmap.unembed().weight)


def ablation_effect_heads(cmap: ComponentMap, x_out: torch.Tensor, writes: torch.Tensor, names: list[str],
                          layer: int, z: torch.Tensor, heads_readout: torch.Tensor,
                          answer_ids: torch.Tensor, attn_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`ablation_effect` of the writes [batch, C, d] named `names` (of block `layer`: heads, attention bias, MLP),
    with the heads' logits read from their z [batch, heads * d_head] through `head_readout(cmap, layer)` instead
    of one full readout per head. attn_scale [batch]: the frozen scale of the norm after the attention output
    projection (`Decomposition.attn_scale[layer]`), needed where there is one.

    P (the norm without its scale) is linear, so with U(v) = W_U P(v) the logits after removing a write c are
    (U(x) - U(c)) / s(x - c) + const; a head's U(c) is its z through its rows of `head_readout`: the heads of a
    prompt together cost one readout instead of one each. [batch, C]"""
    batch, d_head = x_out.shape[0], cmap.shape.head_dim
    if (norm := cmap.post_attn_norm(layer)) is not None:
        if attn_scale is None:
            raise ValueError(f"layer {layer}'s attention writes through {type(norm).__name__} ({cmap.architecture}): "
                             "its frozen scale (Decomposition.attn_scale) is needed")
        z = z.float() / attn_scale.unsqueeze(-1)
    weight = cmap.unembed().weight
    unit = torch.ones(batch, device=x_out.device)
    u_x = matmul_t(norm_linear(cmap, x_out, unit), weight)
    head_names = cmap.heads(layer)
    heads = [i for i, n in enumerate(names) if n in head_names]
    others = [i for i in range(len(names)) if i not in heads]
    u = torch.empty(batch, len(names), u_x.shape[1], device=u_x.device)
    index = [head_names.index(names[i]) for i in heads]
    per_head = heads_readout.view(-1, d_head, u_x.shape[1])[index]  # [heads, d_head, vocab]
    u[:, heads] = torch.einsum("bhd,hdv->bhv", z.view(batch, -1, d_head)[:, index].float(), per_head)
    if others:
        flat = norm_linear(cmap, writes[:, others].reshape(-1, writes.shape[-1]), unit.repeat_interleave(len(others)))
        u[:, others] = matmul_t(flat, weight).view(batch, len(others), -1)
    constant = constant_logits(cmap)
    ablated = x_out.unsqueeze(1) - writes
    logits = (u_x.unsqueeze(1) - u) / frozen_norm_scale(cmap, ablated).unsqueeze(-1) + constant
    logp_without = logits.gather(-1, answer_ids.view(-1, 1, 1).expand(-1, len(names), 1))[..., 0] - logits.logsumexp(-1)
    own = u_x / frozen_norm_scale(cmap, x_out).unsqueeze(-1) + constant
    logp = own.gather(-1, answer_ids.view(-1, 1))[:, 0] - own.logsumexp(-1)  # log p only: no rank needed here
    return logp.unsqueeze(1) - logp_without


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


def neuron_logprob_attribution(cmap: ComponentMap, grad: torch.Tensor, acts: torch.Tensor, layer: int,
                               mlp_scale: torch.Tensor | None = None) -> torch.Tensor:
    """First-order effect of each neuron's write on log p(answer): act_n (W_out[:, n] · grad). [batch, d_mlp]

    mlp_scale [batch]: the frozen scale of the norm after the MLP output projection (`Decomposition.mlp_scale
    [layer]`), needed where there is one: the write is then (act_n / s) (g ⊙ W_out[:, n])."""
    acts, grad = through_post_mlp_norm(cmap, layer, acts.float(), grad, mlp_scale)
    w_out = cmap.output_weight(cmap.mlp_out(layer))
    return acts * (grad.to(w_out.dtype) @ w_out).float()


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
