"""Exact decomposition of the last position's residual stream and logits into components.

The residual stream entering the final norm is a sum of writes:

    x = embed + sum_l [ sum_h head_lh + attn_bias_l + mlp_l ]

With the final norm's scale frozen at its value in the real forward pass, the norm is linear in x,
so the logits split the same way, plus one constant term (norm bias and unembedding bias):

    logits = sum_c  norm_lin(c) @ W_U.T  +  (b_norm @ W_U.T + b_U)

`norm_lin` centres c (LayerNorm only), divides by the frozen scale and multiplies by the norm
weight (Gemma: 1 + weight). The parts add up to the model's own logits to float rounding.

Where a norm sits between a projection and the residual add (Gemma 3's post-attention and
post-feedforward RMSNorms, `ComponentMap.post_attn_norm` / `post_mlp_norm`), the block writes
norm(a) for the projection's output a = sum of its components' outputs. That norm's scale is frozen
the same way, per prompt at the position (`Decomposition.attn_scale`, `mlp_scale`), so each head's
and neuron's write a_c / scale * gain is still linear and the writes add up to what the block wrote.
A model whose logits are soft-capped is refused (`ComponentMap.readout_refusal`): tanh is not linear.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .components import Component, ComponentMap, UnsupportedModelError
from .hooks import FINAL_NORM_IN, capture


@dataclass
class Decomposition:
    """Per-component writes at one position of each prompt (float32).

    names[i] labels resid[:, i]: "embed", "L{l}H{h}", "L{l}attn_bias" (when the projection has a
    bias), "L{l}MLP" (the MLP's whole output, bias included); layers[i] is the block that wrote it
    (-1: the embedding).
    """

    names: list[str]
    resid: torch.Tensor  # [batch, components, d_model]
    neuron_acts: dict[int, torch.Tensor]  # layer -> [batch, d_mlp], inputs to the MLP output projection
    final_resid: torch.Tensor  # [batch, d_model], what enters the final norm
    norm_scale: torch.Tensor  # [batch], the final norm's divisor, frozen
    logits: torch.Tensor  # [batch, vocab], the model's own logits at the position
    layers: list[int] = field(default_factory=list)
    z: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [batch, heads*d_head], attention out input
    final_block_in: torch.Tensor | None = None  # [batch, d_model], the stream entering the final block
    # [batch, layers, heads, seq]: each head's attention from the position to every key (`attentions=True`)
    attention: torch.Tensor | None = None
    # layer -> [batch]: the divisor of the norm after the attention / MLP output projection, frozen at the forward
    # pass's value (`rms_scale` of the projection's output); empty where the family has no such norm.
    attn_scale: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp_scale: dict[int, torch.Tensor] = field(default_factory=dict)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def written_by(self, layer: int) -> list[str]:
        """The components block `layer` writes: its heads, attention bias, MLP."""
        return [name for name, at in zip(self.names, self.layers, strict=True) if at == layer]


def last_positions(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (works for left and right padding)."""
    if attention_mask is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)


def _norm_eps(norm: nn.Module) -> float:
    for name in ("eps", "variance_epsilon", "epsilon"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise ValueError(f"cannot find the epsilon of {type(norm).__name__}")


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """An RMSNorm's divisor of x [..., d]: sqrt(mean(x^2) + eps), in float32. [...]"""
    return torch.sqrt(x.float().pow(2).mean(dim=-1) + eps)


def frozen_norm_scale(cmap: ComponentMap, x: torch.Tensor) -> torch.Tensor:
    """The divisor the final norm applies to x: std (LayerNorm) or RMS (RMSNorm)."""
    eps = _norm_eps(cmap.final_norm())
    if cmap.spec.norm == "layernorm":
        return torch.sqrt(x.var(dim=-1, unbiased=False) + eps)
    return rms_scale(x, eps)


def through_frozen_norm(parts: torch.Tensor, scale: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Parts of an RMSNorm's input through the norm with its scale frozen: parts / scale * gain, linear in the
    parts, so they add up to the norm's output. parts [batch, ..., d]; scale [batch]; gain [d]."""
    return parts / scale.view((-1,) + (1,) * (parts.dim() - 1)) * gain


def final_norm_gain(cmap: ComponentMap) -> torch.Tensor:
    """What the final norm multiplies the normalised stream by (float32, [d_model])."""
    return cmap.norm_gain(cmap.final_norm())


def norm_linear(cmap: ComponentMap, contributions: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The final norm applied to parts of x with its scale frozen: linear, so parts still add up.

    contributions: [batch, ..., d_model]; scale: [batch].
    """
    if cmap.spec.norm == "layernorm":
        contributions = contributions - contributions.mean(dim=-1, keepdim=True)
    return through_frozen_norm(contributions, scale, final_norm_gain(cmap))


def constant_logits(cmap: ComponentMap) -> torch.Tensor:
    """Logits no component owns: the final norm's bias through the unembedding, plus its bias. [vocab]"""
    unembed = cmap.unembed()
    out = torch.zeros(unembed.weight.shape[0], dtype=torch.float32, device=unembed.weight.device)
    norm_bias = getattr(cmap.final_norm(), "bias", None)
    if norm_bias is not None:
        out = out + unembed.weight.float() @ norm_bias.float()
    if getattr(unembed, "bias", None) is not None:
        out = out + unembed.bias.float()
    return out


def readout(cmap: ComponentMap, scale: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Directions r such that a write c adds c @ r[b, k] to the logit of token_ids[b, k]. [batch, k, d]"""
    rows = cmap.unembed().weight.float()[token_ids] * final_norm_gain(cmap)
    if cmap.spec.norm == "layernorm":
        rows = rows - rows.mean(dim=-1, keepdim=True)
    return rows / scale.view(-1, *([1] * (rows.dim() - 1)))


_mean_rows: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def _mean_unembedding_row(weight: torch.Tensor) -> torch.Tensor:
    """W_U's mean row, kept per weight tensor until it is written to (`_version`): the analysis asks for it on
    every batch, and it is a reduction over the whole vocabulary."""
    hit = _mean_rows.get(id(weight))
    if hit is None or hit[0]() is not weight or hit[1] != weight._version:
        hit = (weakref.ref(weight), weight._version, weight.detach().float().mean(dim=0))
        _mean_rows[id(weight)] = hit
    return hit[2]


def mean_readout(cmap: ComponentMap, scale: torch.Tensor) -> torch.Tensor:
    """The readout of the mean logit over the vocabulary. [batch, d]"""
    mean_row = _mean_unembedding_row(cmap.unembed().weight) * final_norm_gain(cmap)
    if cmap.spec.norm == "layernorm":
        mean_row = mean_row - mean_row.mean()
    return mean_row.unsqueeze(0) / scale.unsqueeze(1)


@torch.no_grad()
def decompose(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cmap: ComponentMap | None = None,
    *,
    attentions: bool = False,
) -> Decomposition:
    """Run the model once and split the last real position's residual stream into components.

    attentions: also keep the position's row of every attention map (`Decomposition.attention`); the model
    must run an attention implementation that returns the weights (eager).
    """
    cmap = cmap or ComponentMap(model)
    if (reason := cmap.readout_refusal()) is not None:
        raise UnsupportedModelError(reason)
    shape = cmap.shape
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    pos = last_positions(attention_mask, input_ids).to(input_ids.device)
    batch, seq = input_ids.shape

    def at_pos(t: torch.Tensor) -> torch.Tensor:
        # Some blocks (OPT's MLP) flatten batch and sequence; restore them before picking positions.
        return t.reshape(batch, seq, -1)[rows, pos].float()

    final_in = f"blocks.{shape.num_layers - 1}.hook_resid_pre"
    points = ["blocks.0.hook_resid_pre", final_in, FINAL_NORM_IN]
    sandwich = cmap.spec.post_attn_norm is not None
    for layer in range(shape.num_layers):
        points += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_mlp_out"]
        if sandwich:  # the post-attention norm's input, for its frozen scale
            points.append(f"blocks.{layer}.hook_attn_out")
    # Only the positions' logits are needed: unembed those columns alone (transformers' logits_to_keep).
    kwargs: dict[str, object] = {"output_attentions": True} if attentions else {}
    columns = pos
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        keep = pos.unique()
        kwargs["logits_to_keep"], columns = keep, torch.searchsorted(keep, pos)
    with capture(cmap, list(dict.fromkeys(points)), keep=at_pos) as captured:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)

    names, layers, parts = ["embed"], [-1], [captured["blocks.0.hook_resid_pre"]]
    attn_scale, mlp_scale = {}, {}
    d = shape.head_dim
    for layer in range(shape.num_layers):
        proj = cmap.attn_out(layer)
        w_o = cmap.output_weight(proj).float()  # [d_model, heads * d]
        z = captured[f"blocks.{layer}.attn.hook_z"].view(-1, shape.num_heads, d)
        heads = torch.einsum("bhd,mhd->bhm", z, w_o.view(w_o.shape[0], shape.num_heads, d))
        attn_bias = None if getattr(proj, "bias", None) is None else proj.bias.float().expand_as(parts[0])
        if (norm := cmap.post_attn_norm(layer)) is not None:
            attn_scale[layer] = rms_scale(captured[f"blocks.{layer}.hook_attn_out"], _norm_eps(norm))
            heads = through_frozen_norm(heads, attn_scale[layer], cmap.norm_gain(norm))
            if attn_bias is not None:
                attn_bias = through_frozen_norm(attn_bias, attn_scale[layer], cmap.norm_gain(norm))
        names += cmap.heads(layer)
        parts += list(heads.unbind(dim=1))
        if attn_bias is not None:
            names.append(f"L{layer}attn_bias")
            parts.append(attn_bias)
        mlp = captured[f"blocks.{layer}.hook_mlp_out"]
        if (norm := cmap.post_mlp_norm(layer)) is not None:
            mlp_scale[layer] = rms_scale(mlp, _norm_eps(norm))
            mlp = through_frozen_norm(mlp, mlp_scale[layer], cmap.norm_gain(norm))
        names.append(str(Component(layer, "mlp")))
        parts.append(mlp)
        layers += [layer] * (len(names) - len(layers))

    final = captured[FINAL_NORM_IN]
    attention = None
    if attentions:
        maps = getattr(out, "attentions", None)
        if not maps or any(m is None for m in maps):
            raise ValueError(f"{type(model).__name__} returned no attention weights (needs eager attention)")
        attention = torch.stack([m[rows, :, pos].float() for m in maps], dim=1)
    return Decomposition(
        names=names,
        resid=torch.stack(parts, dim=1),
        neuron_acts={layer: captured[f"blocks.{layer}.mlp.hook_post"] for layer in range(shape.num_layers)},
        final_resid=final,
        norm_scale=frozen_norm_scale(cmap, final),
        logits=out.logits[rows, columns].float(),
        layers=layers,
        z={layer: captured[f"blocks.{layer}.attn.hook_z"] for layer in range(shape.num_layers)},
        final_block_in=captured[final_in],
        attention=attention,
        attn_scale=attn_scale,
        mlp_scale=mlp_scale,
    )


def through_post_mlp_norm(cmap: ComponentMap, layer: int, acts: torch.Tensor, direction: torch.Tensor,
                          mlp_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Neuron n's write read along a direction is acts[:, n] * (W_out[:, n] · direction). Where a norm follows
    the MLP output projection, frozen at scale s with gain g, it is (acts[:, n] / s) * (W_out[:, n] · (g ⊙
    direction)): returns those acts and direction (unchanged without such a norm).

    acts [batch, d_mlp]; direction [batch, d_model]; mlp_scale [batch] (`Decomposition.mlp_scale[layer]`)."""
    norm = cmap.post_mlp_norm(layer)
    if norm is None:
        return acts, direction
    if mlp_scale is None:
        raise ValueError(f"layer {layer}'s MLP writes through {type(norm).__name__} ({cmap.architecture}): its "
                         "frozen scale (Decomposition.mlp_scale) is needed")
    return acts / mlp_scale.unsqueeze(-1), direction * cmap.norm_gain(norm)


def component_logits(dec: Decomposition, cmap: ComponentMap) -> torch.Tensor:
    """Every component's logits plus the constant term last. [batch, components + 1, vocab]

    Summing over dim 1 gives the model's logits. Memory is components x vocab per prompt: for large
    models use `direct_logit_attribution` on the tokens of interest instead.
    """
    w_u = cmap.unembed().weight.float()
    per_component = norm_linear(cmap, dec.resid, dec.norm_scale) @ w_u.T
    constant = constant_logits(cmap).expand(per_component.shape[0], 1, -1)
    return torch.cat([per_component, constant], dim=1)


def direct_logit_attribution(dec: Decomposition, cmap: ComponentMap, token_ids: torch.Tensor) -> torch.Tensor:
    """Each component's push on token_ids[b] against the mean logit. [batch, components]"""
    direction = readout(cmap, dec.norm_scale, token_ids.view(-1, 1))[:, 0] - mean_readout(cmap, dec.norm_scale)
    return torch.einsum("bcd,bd->bc", dec.resid, direction)


def neuron_attribution(
    dec: Decomposition, cmap: ComponentMap, layer: int, token_ids: torch.Tensor
) -> torch.Tensor:
    """Each neuron of layer's MLP: its push on token_ids[b] against the mean logit. [batch, d_mlp]

    Neuron n writes act_n * W_out[:, n] (through the frozen post-MLP norm where there is one,
    `through_post_mlp_norm`); its logit effect is that write read out through the frozen final norm. The MLP's bias
    is not a neuron's, so neurons sum to the MLP's output minus its bias.
    """
    direction = readout(cmap, dec.norm_scale, token_ids.view(-1, 1))[:, 0] - mean_readout(cmap, dec.norm_scale)
    acts, direction = through_post_mlp_norm(cmap, layer, dec.neuron_acts[layer], direction, dec.mlp_scale.get(layer))
    w_out = cmap.output_weight(cmap.mlp_out(layer)).float()  # [d_model, d_mlp]
    return acts * (direction @ w_out)
