"""Logit lens: read the residual stream after any layer through the model's own final norm and unembedding.

    lens_l(x) = W_U · norm(x_l) + b_U,    x_l = embed + sum_{l' < l} (heads + attn bias + MLP of block l')

x_0 is the embedding and x_L (after the last block) gives the model's own logits. The norm is applied
with its own scale for each x_l (the real norm, not the frozen one of the decomposition), in float32,
through `recallfix.patches.decompose`'s generic LayerNorm/RMSNorm formula, so there is no architecture
code here.
"""

from __future__ import annotations

import math

import torch

from recallfix.patches.calibrator import CALIBRATION_TOP_K
from recallfix.patches.components import ComponentMap
from recallfix.patches.decompose import Decomposition, constant_logits, frozen_norm_scale, norm_linear

from ..records import Dist
from .gemm import matmul_t


def layer_residuals(dec: Decomposition, num_layers: int) -> torch.Tensor:
    """Residual stream at the position after each block, from the exact decomposition. [batch, L+1, d]

    Index 0 is the embedding, index l the stream after block l-1, index L what enters the final norm.
    """
    layers = torch.tensor(dec.layers, dtype=torch.long, device=dec.resid.device)
    per_layer = torch.zeros(dec.resid.shape[0], num_layers + 1, dec.resid.shape[2],
                            dtype=dec.resid.dtype, device=dec.resid.device)
    per_layer.index_add_(1, layers + 1, dec.resid)
    return per_layer.cumsum(dim=1)


# Residual vectors per unembedding matmul: enough rows for an efficient matmul, few enough that the
# [rows, vocab] logits stay small while each is reduced to a couple of numbers.
ROWS = 512


def lens_logits(cmap: ComponentMap, x: torch.Tensor) -> torch.Tensor:
    """Logits of residual vectors x [..., d] through the final norm (own scale) and unembedding. [..., vocab]"""
    flat = x.reshape(-1, x.shape[-1]).float()
    normed = norm_linear(cmap, flat, frozen_norm_scale(cmap, flat))
    logits = matmul_t(normed, cmap.unembed().weight) + constant_logits(cmap)
    return logits.reshape(*x.shape[:-1], -1)


def answer_logp_rank(logits: torch.Tensor, answer_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(answer) and the answer's rank (1 = top) under logits [n, vocab]. Two [n]."""
    answer = logits.gather(-1, answer_ids.view(-1, 1))
    return answer[:, 0] - logits.logsumexp(dim=-1), (logits > answer).sum(dim=-1, dtype=torch.int32).long() + 1


def lens_answer(cmap: ComponentMap, x: torch.Tensor,
                answer_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(answer) and its rank through the logit lens for every vector of x [batch, ..., d], answer_ids [batch]:
    one matmul per `ROWS` vectors, reduced at once (the full logits are never kept). Two [batch, ...]."""
    flat = x.reshape(-1, x.shape[-1])
    answers = answer_ids.repeat_interleave(flat.shape[0] // max(1, x.shape[0]))
    parts = [answer_logp_rank(lens_logits(cmap, flat[i : i + ROWS]), answers[i : i + ROWS])
             for i in range(0, flat.shape[0], ROWS)]
    logp = torch.cat([p for p, _ in parts]) if parts else flat.new_zeros(0)
    rank = torch.cat([r for _, r in parts]) if parts else torch.zeros(0, dtype=torch.long)
    return logp.view(x.shape[:-1]), rank.view(x.shape[:-1])


def answer_stats(logits: torch.Tensor, answer_ids: torch.Tensor, temperature: float = 1.0) -> Dist:
    """p(answer), its rank, top-1 confidence and prediction, NLL, Brier and the top-K log-probabilities of logits
    [batch, vocab] / T."""
    logits = logits.float() / temperature
    logp = logits.log_softmax(dim=-1)
    p = logp.exp()
    rows = torch.arange(logits.shape[0], device=logits.device)
    answer_logit = logits[rows, answer_ids]
    logp_answer = logp[rows, answer_ids]
    confidence, prediction = p.max(dim=-1)
    p_answer = logp_answer.exp()
    top = logp.topk(min(CALIBRATION_TOP_K, logp.shape[-1]), dim=-1).values
    if top.shape[-1] < CALIBRATION_TOP_K:  # a vocabulary smaller than K (tiny test models): -inf pads it
        top = torch.nn.functional.pad(top, (0, CALIBRATION_TOP_K - top.shape[-1]), value=-math.inf)
    return Dist(
        p_answer=p_answer,
        rank=(logits > answer_logit[:, None]).sum(dim=-1) + 1,
        confidence=confidence,
        prediction=prediction,
        nll=-logp_answer,
        brier=p.pow(2).sum(dim=-1) - 2 * p_answer + 1,
        top_logprobs=top,
    )


def logit_lens(cmap: ComponentMap, residuals: torch.Tensor,
               answer_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p(answer) and rank of the answer after every layer. residuals [batch, L+1, d] -> two [batch, L+1]."""
    logp, rank = lens_answer(cmap, residuals, answer_ids)
    return logp.exp(), rank
