"""Forward passes over the prompts: everything the analysis needs at the last position, reduced per batch.

One pass per batch through `recallfix.patches.decompose` (activations captured at named hook points
of `recallfix.patches.hooks`, only the last position kept) gives the exact per-component writes;
everything else (logit lens, DLA, neurons, the MLP regressions) is computed from them and reduced
to a few numbers per prompt (`records.Dist` for each distribution) before the next batch. The
mover heads also need the attention patterns: with `mechanisms` the same pass runs with eager attention (the
only implementation that returns the weights) and keeps the last position's row of each map.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from recallfix.patches.components import Component, ComponentMap
from recallfix.patches.decompose import Decomposition, decompose, direct_logit_attribution, neuron_attribution

from ..data.batching import Batch, batches, num_batches
from ..progress import progress_bar
from ..records import Dist
from .attribution import ablation_effect_heads, head_readout, logprob_gradient, neuron_logprob_attribution, rescale_term
from .lens import answer_stats, layer_residuals, lens_logits, logit_lens
from .movers import attention_to_subject, head_token_attribution
from .regression import intercept_readout, regress_mlps_on_heads

__all__ = ["Collected", "Dist", "collect", "eager_attention", "final_block_parts", "token_nll"]


@dataclass
class Collected:
    """What one pass over N prompts leaves behind (CPU, float32, input row order)."""

    names: list[str]  # decomposition components (columns of dla)
    output: Dist  # the model's own next-token distribution
    before: Dist  # logit lens of the stream entering the final block
    # The logit lens through the layers and the mechanisms cover the rows of `sample` ([M], sorted), in its order:
    sample: torch.Tensor  # [M] rows of the prompts they cover
    lens_p: torch.Tensor  # [M, L+1] p(answer) after each layer (0 = embeddings)
    lens_rank: torch.Tensor  # [M, L+1]
    x_final: torch.Tensor  # [N, d] residual stream entering the final norm
    dla: torch.Tensor  # [N, components] DLA of every component to the answer
    final_names: list[str]  # the final block's components (heads, attention bias, MLP)
    final_effect: torch.Tensor  # [N, len(final_names)] effect on log p(answer) of removing each one's write
    rescale: torch.Tensor  # [N] the final norm's change of scale, on the answer's logit against the mean
    neuron_dla: torch.Tensor  # [N, d_mlp] DLA of the final MLP's neurons
    neuron_effect: torch.Tensor  # [N, d_mlp] first-order effect of each final neuron on log p(answer)
    # The final block's parts (the paper's intercept fix regresses the MLP's output on the other two):
    final_head_writes: torch.Tensor  # [N, H, d] each final-layer head's write
    final_resid_mid: torch.Tensor  # [N, d] the stream after the final block's attention (bias included)
    final_mlp_out: torch.Tensor  # [N, d] the final MLP's write; final_resid_mid + final_mlp_out = x_final
    # What the fit replays the final block from (`learn.replay.BlockInputs`), as the real forward pass computed them:
    final_block_in: torch.Tensor  # [N, d] the stream entering the final block
    final_z: torch.Tensor  # [N, heads * d_head] the input of its attention output projection
    # Mechanisms (only when asked for):
    beta: torch.Tensor | None = None  # [M, L, H] MLP-on-heads regression coefficients
    r2: torch.Tensor | None = None  # [M, L]
    intercept_dla: torch.Tensor | None = None  # [M, L]
    intercept_rank: torch.Tensor | None = None  # [M, L]
    subject_attribution: torch.Tensor | None = None  # [M, L, H]; NaN where the subject is unknown
    attention: torch.Tensor | None = None  # [M, L, H]; NaN where the subject is unknown


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Temporarily use the eager attention implementation (the only one that returns the weights)."""
    previous = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if previous == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def final_block_parts(dec: Decomposition, cmap: ComponentMap,
                      x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The final block split at its MLP, from the exact decomposition: (stream after attention [b, d],
    head writes [b, H, d], MLP write [b, d]). x_in: the stream entering the block (`layer_residuals`).

    The stream after attention is x_in plus every attention write (heads and the projection's bias); on a
    sequential block it is what the MLP reads, on a parallel one (GPT-NeoX) the MLP reads x_in instead.
    """
    final = cmap.shape.num_layers - 1
    mlp_name = str(Component(final, "mlp"))
    heads = torch.stack([dec.resid[:, dec.index(name)] for name in cmap.heads(final)], dim=1)
    attention = [dec.index(name) for name in dec.written_by(final) if name != mlp_name]
    mid = x_in + dec.resid[:, attention].sum(dim=1)
    return mid, heads, dec.resid[:, dec.index(mlp_name)]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def collect(
    model: nn.Module,
    cmap: ComponentMap,
    token_ids: Sequence[Sequence[int]],
    answer_ids: torch.Tensor,
    *,
    pad: int,
    batch_size: int,
    subjects: Sequence[list[int] | None] | None = None,
    mechanisms: bool = False,
    sample: torch.Tensor | None = None,
    outputs_only: bool = False,
    progress: bool = False,
    desc: str = "forward",
) -> Collected:
    """Run every prompt once and keep the per-prompt numbers of the analysis.

    outputs_only: keep only `output`, `before`, `x_final` and the final block's parts (what an evaluation of a
    patched model reads); the logit lens, attributions and effects, which cost a full-vocabulary readout each,
    stay zero. mechanisms (with `subjects`): also the MLP regressions and the mover heads' attention, from the
    same pass. sample: the rows (sorted) that get the logit lens through the layers and the mechanisms, about 60
    full-vocabulary readouts per prompt (None: every row); the final block's numbers cover every row.
    """
    shape = cmap.shape
    n, num_layers, final = len(token_ids), shape.num_layers, shape.num_layers - 1
    device = _device(model)
    answer_ids = answer_ids.to(torch.long)
    everyone = torch.arange(n)
    sample = torch.zeros(0, dtype=torch.long) if outputs_only else everyone if sample is None else sample
    m = len(sample)
    slot = torch.full((n,), -1, dtype=torch.long)
    slot[sample] = torch.arange(m)
    output, before = Dist.empty(n), Dist.empty(n)
    lens_p = torch.zeros(m, num_layers + 1)
    lens_rank = torch.zeros(m, num_layers + 1, dtype=torch.long)
    x_final = torch.zeros(n, shape.hidden_size)
    neuron_dla = torch.zeros(n, shape.intermediate_size)
    neuron_effect = torch.zeros(n, shape.intermediate_size)
    rescale = torch.zeros(n)
    final_head_writes = torch.zeros(n, shape.num_heads, shape.hidden_size)
    final_resid_mid = torch.zeros(n, shape.hidden_size)
    final_mlp_out = torch.zeros(n, shape.hidden_size)
    final_block_in = torch.zeros(n, shape.hidden_size)
    final_z = torch.zeros(n, shape.num_heads * shape.head_dim)
    dla: torch.Tensor | None = None
    final_effect: torch.Tensor | None = None
    heads_readout: torch.Tensor | None = None  # the final heads' z to logits, made at the first batch
    names: list[str] = []
    final_names: list[str] = []
    mechanisms = mechanisms and not outputs_only
    if mechanisms:
        nan = float("nan")
        beta = torch.zeros(m, num_layers, shape.num_heads)
        r2 = torch.zeros(m, num_layers)
        intercept_dla = torch.zeros(m, num_layers)
        intercept_rank = torch.zeros(m, num_layers, dtype=torch.long)
        subject_attribution = torch.full((m, num_layers, shape.num_heads), nan)
        attention = torch.full((m, num_layers, shape.num_heads), nan)
    with_attention = mechanisms and subjects is not None and _has_eager_attention(model)

    # The sampled rows first, with eager attention when the mover heads need the maps; then the rest (sdpa).
    in_sample = torch.zeros(n, dtype=torch.bool)
    in_sample[sample] = True
    groups = [(rows, deep) for rows, deep in ((sample, True), (everyone[~in_sample], False)) if len(rows)]

    def passes() -> Iterator[tuple[torch.Tensor, Batch, bool]]:
        for group, deep in groups:
            with eager_attention(model) if deep and with_attention else nullcontext():
                for batch in batches([token_ids[int(i)] for i in group], batch_size, pad, device):
                    yield group[batch.index], batch, deep

    total = sum(num_batches(len(group), batch_size) for group, _ in groups)
    for rows, batch, deep in progress_bar(passes(), total=total, desc=desc, progress=progress):
        answers = answer_ids[rows].to(device)
        dec = decompose(model, batch.input_ids, batch.attention_mask, cmap, attentions=deep and with_attention)
        names = dec.names
        residuals = layer_residuals(dec, num_layers)
        out_stats = answer_stats(dec.logits, answers)
        before_stats = answer_stats(lens_logits(cmap, residuals[:, final]), answers)
        output.put(rows, out_stats)
        before.put(rows, before_stats)
        x_final[rows] = dec.final_resid.cpu()
        final_names = dec.written_by(final)
        mid, heads, mlp = final_block_parts(dec, cmap, residuals[:, final])
        final_resid_mid[rows], final_head_writes[rows], final_mlp_out[rows] = mid.cpu(), heads.cpu(), mlp.cpu()
        final_block_in[rows], final_z[rows] = dec.final_block_in.cpu(), dec.z[final].cpu()
        if outputs_only:
            continue
        batch_dla = direct_logit_attribution(dec, cmap, answers).cpu()
        if dla is None:
            dla = torch.zeros(n, batch_dla.shape[1])
        dla[rows] = batch_dla
        neuron_dla[rows] = neuron_attribution(dec, cmap, final, answers).cpu()
        writes = torch.stack([dec.resid[:, dec.index(c)] for c in final_names], dim=1)
        if heads_readout is None:
            heads_readout = head_readout(cmap, final)
        batch_effect = ablation_effect_heads(cmap, dec.final_resid, writes, final_names, final, dec.z[final],
                                             heads_readout, answers, dec.attn_scale.get(final)).cpu()
        if final_effect is None:
            final_effect = torch.zeros(n, len(final_names))
        final_effect[rows] = batch_effect
        grad = logprob_gradient(cmap, dec.final_resid, answers)
        neuron_effect[rows] = neuron_logprob_attribution(cmap, grad, dec.neuron_acts[final], final,
                                                         dec.mlp_scale.get(final)).cpu()
        rescale[rows] = rescale_term(cmap, residuals[:, final], dec.final_resid, answers).cpu()
        if not deep:
            continue
        at = slot[rows]
        # The lens after the last two blocks is what entered the final block and the model's own output.
        p, rank = logit_lens(cmap, residuals[:, :final], answers)
        lens_p[at] = torch.cat([p, before_stats.p_answer[:, None], out_stats.p_answer[:, None]], dim=1).cpu()
        lens_rank[at] = torch.cat([rank, before_stats.rank[:, None], out_stats.rank[:, None]], dim=1).cpu()
        if not mechanisms:
            continue
        reg = regress_mlps_on_heads(dec, cmap)
        beta[at], r2[at] = reg.beta.cpu(), reg.r2.cpu()
        i_dla, i_rank = intercept_readout(cmap, dec, reg.intercept, answers)
        intercept_dla[at], intercept_rank[at] = i_dla.cpu(), i_rank.cpu()
        if subjects is None:
            continue
        first = [subjects[int(r)][0] if subjects[int(r)] else None for r in rows]
        has = torch.tensor([f is not None for f in first])
        if not has.any():
            continue
        positions = torch.tensor([f or 0 for f in first], device=device)
        tokens = batch.input_ids[torch.arange(len(rows), device=device), positions]
        subject_attribution[at[has]] = head_token_attribution(dec, cmap, tokens).cpu()[has]
        if dec.attention is not None:
            mask = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
            for r, i in enumerate(rows.tolist()):
                mask[r, subjects[i] or []] = True
            attention[at[has]] = attention_to_subject(dec.attention, mask.to(device)).cpu()[has]
    empty = torch.zeros(n, 0)
    result = Collected(names=names, output=output, before=before, sample=sample, lens_p=lens_p, lens_rank=lens_rank,
                       x_final=x_final, dla=dla if dla is not None else empty, final_names=final_names,
                       final_effect=final_effect if final_effect is not None else empty, rescale=rescale,
                       neuron_dla=neuron_dla, neuron_effect=neuron_effect, final_head_writes=final_head_writes,
                       final_resid_mid=final_resid_mid, final_mlp_out=final_mlp_out, final_block_in=final_block_in,
                       final_z=final_z)
    if mechanisms:
        result.beta, result.r2 = beta, r2
        result.intercept_dla, result.intercept_rank = intercept_dla, intercept_rank
        result.subject_attribution = subject_attribution
        result.attention = attention if with_attention else None
    return result


def _has_eager_attention(model: nn.Module) -> bool:
    """Whether the model can switch to eager attention (which returns the weights the mover heads read)."""
    try:
        with eager_attention(model):
            return True
    except (ValueError, NotImplementedError) as err:
        warnings.warn(f"no attention patterns ({err}); mover heads are skipped", stacklevel=3)
        return False


@torch.no_grad()
def token_nll(
    model: nn.Module, token_ids: Sequence[Sequence[int]], *, pad: int, batch_size: int,
    progress: bool = False, desc: str = "neutral NLL",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL (nats) and number of predicted tokens of each text. Two [N]."""
    n = len(token_ids)
    sums, counts = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.long)
    device = _device(model)
    bar = progress_bar(batches(token_ids, batch_size, pad, device), total=num_batches(n, batch_size), desc=desc,
                       progress=progress)
    for batch in bar:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logp = logits[:, :-1].float().log_softmax(dim=-1)
        targets = batch.input_ids[:, 1:]
        nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        valid = batch.attention_mask[:, 1:].bool()
        sums[batch.index] = (nll * valid).sum(dim=1).double().cpu()
        counts[batch.index] = valid.sum(dim=1).cpu()
    return sums, counts
