"""Mover heads: heads that carry the subject to the last position (Lv et al. 2024, section 3).

For every head, at the last position of each prompt:

    attention_to_subject = sum_{j in subject tokens} A[last, j]
    subject_attribution  = DLA of the head's write to the subject's first token (against the mean logit)

A mover head attends to the subject and writes the subject's identity in proportion to how much it
attends (as the name mover heads of Wang et al. 2022): high mean attention and a positive
correlation between the two across prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recallfix.patches.components import Component, ComponentMap
from recallfix.patches.decompose import Decomposition, direct_logit_attribution


def attention_to_subject(attention: torch.Tensor, subject_mask: torch.Tensor) -> torch.Tensor:
    """Attention of the position to the subject tokens, per layer and head. [batch, L, H]

    attention: the position's row of every map [batch, L, H, seq] (`Decomposition.attention`); subject_mask
    [batch, seq] (bool).
    """
    return torch.einsum("blhk,bk->blh", attention.float(), subject_mask.float())


def head_token_attribution(dec: Decomposition, cmap: ComponentMap, token_ids: torch.Tensor) -> torch.Tensor:
    """Each head's DLA to token_ids[b], shaped [batch, L, H]."""
    dla = direct_logit_attribution(dec, cmap, token_ids)
    shape = cmap.shape
    columns = [dec.index(name) for layer in range(shape.num_layers) for name in cmap.heads(layer)]
    return dla[:, columns].view(-1, shape.num_layers, shape.num_heads)


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of matching columns of x and y [n, ...] over dim 0 (float64); NaN where undefined."""
    columns = zip(x.reshape(len(x), -1).double().T, y.reshape(len(y), -1).double().T, strict=True)
    r = [torch.corrcoef(torch.stack(pair))[0, 1] for pair in columns]
    return torch.stack(r).view(x.shape[1:]) if r else torch.zeros(x.shape[1:], dtype=torch.float64)


@dataclass
class HeadMover:
    name: str
    mean_attention: float
    mean_attribution: float
    correlation: float | None
    is_mover: bool


def summarize_movers(attention: torch.Tensor, attribution: torch.Tensor, *,
                     min_attention: float = 0.3) -> list[HeadMover]:
    """Per head, sorted by mean attention to the subject (highest first). Inputs [prompts, L, H]."""
    if attention.shape[0] == 0:
        return []
    mean_att = attention.mean(dim=0)
    mean_attr = attribution.mean(dim=0)
    r = pearson(attention, attribution) if attention.shape[0] > 2 else torch.full_like(mean_att, float("nan"))
    out = []
    num_layers, num_heads = mean_att.shape
    for layer in range(num_layers):
        for head in range(num_heads):
            corr = float(r[layer, head])
            corr_or_none = None if corr != corr else corr  # NaN -> None
            out.append(HeadMover(
                name=str(Component(layer, "head", head)),
                mean_attention=float(mean_att[layer, head]),
                mean_attribution=float(mean_attr[layer, head]),
                correlation=corr_or_none,
                is_mover=bool(mean_att[layer, head] >= min_attention and corr_or_none is not None and corr > 0
                              and mean_attr[layer, head] > 0),
            ))
    return sorted(out, key=lambda h: -h.mean_attention)
