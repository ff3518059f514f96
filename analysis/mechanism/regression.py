"""Regression decomposition of an MLP's write onto the writes of the heads upstream of it.

At the last position of one prompt, with m the MLP's output and h_1..h_k the outputs of the heads of
the same block (what the MLP reads, on top of the stream), least squares over the d coordinates:

    m = sum_i beta_i h_i + e,        beta = pinv([h_1 .. h_k]) m

beta_i > 1: the MLP amplifies what head i wrote; 0 < beta_i < 1: passes part of it; beta_i < 0: erases
it. e (orthogonal to every h_i) is the regression's intercept: what the MLP adds on its own. Read
through the logit lens (frozen final-norm scale, as the DLA) it shows whether the MLP adds a
component pointing at the answer. R^2 = 1 - |e|^2 / |m|^2 (no constant term, so uncentred).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recallfix.patches.components import Component, ComponentMap
from recallfix.patches.decompose import Decomposition, mean_readout, norm_linear, readout

from .gemm import matmul_t
from .lens import ROWS, answer_logp_rank


@dataclass
class Regression:
    beta: torch.Tensor  # [batch, k]
    intercept: torch.Tensor  # [batch, d]
    r2: torch.Tensor  # [batch]


def regress(target: torch.Tensor, regressors: torch.Tensor) -> Regression:
    """Per-row least squares of target [..., d] on regressors [..., k, d] (float64, rank-safe).

    Through the k x k Gram matrix: pinv(X^T X) X^T y = pinv(X^T) y, the minimum-norm solution, at the cost
    of k x k eigenproblems instead of d x k SVDs."""
    x, y = regressors.double(), target.double()  # x: [..., k, d] (rows are the regressors)
    gram = x @ x.transpose(-1, -2)
    beta = (torch.linalg.pinv(gram, hermitian=True) @ (x @ y.unsqueeze(-1))).squeeze(-1)
    intercept = y - (beta.unsqueeze(-2) @ x).squeeze(-2)
    total = y.pow(2).sum(dim=-1)
    r2 = torch.where(total > 0, 1 - intercept.pow(2).sum(dim=-1) / total, torch.zeros_like(total))
    return Regression(beta.float(), intercept.float(), r2.float())


def regress_mlps_on_heads(dec: Decomposition, cmap: ComponentMap) -> Regression:
    """Regress every layer's MLP write on the writes of that block's heads, at the decomposed position.
    beta [batch, L, H], intercept [batch, L, d], r2 [batch, L]."""
    layers = range(cmap.shape.num_layers)
    heads = torch.stack([torch.stack([dec.resid[:, dec.index(name)] for name in cmap.heads(layer)], dim=1)
                         for layer in layers], dim=1)
    mlps = torch.stack([dec.resid[:, dec.index(str(Component(layer, "mlp")))] for layer in layers], dim=1)
    return regress(mlps, heads)


def intercept_readout(cmap: ComponentMap, dec: Decomposition, intercept: torch.Tensor,
                      answer_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intercepts through the logit lens: their DLA to the answer and the answer's rank among their logits.

    intercept: [batch, ..., d] (e.g. one per layer). Uses the frozen final-norm scale of the decomposition, as
    DLA does. Returns two [batch, ...] tensors.
    """
    direction = readout(cmap, dec.norm_scale, answer_ids.view(-1, 1))[:, 0] - mean_readout(cmap, dec.norm_scale)
    dla = torch.einsum("b...d,bd->b...", intercept, direction)
    normed = norm_linear(cmap, intercept, dec.norm_scale).reshape(-1, intercept.shape[-1])
    answers = answer_ids.repeat_interleave(normed.shape[0] // max(1, intercept.shape[0]))
    weight = cmap.unembed().weight
    ranks = []
    for i in range(0, normed.shape[0], ROWS):
        logits = matmul_t(normed[i : i + ROWS], weight)
        ranks.append(answer_logp_rank(logits, answers[i : i + ROWS])[1])
    rank = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)
    return dla, rank.view(intercept.shape[:-1])
