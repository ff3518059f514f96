"""The evaluation's forward passes: each model (the base, each patch, the temperature baseline) on the held-out
test split, the unknown subjects and the held-out neutral lines.

Every patch here edits the final block only, so the blocks below compute the same for the base model and for
every patch: they run once (the analysis pass for the facts, `capture_inputs` for the unknown subjects and the
neutral text), and each model is the final block -> final norm -> unembedding replayed on what entered it
(`learn.replay.replay_logits`, the real modules with the patch applied to their weights by `apply_patch`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from recallfix.patches import ComponentMap, Patch, apply_patch

from ..config import AnalysisConfig
from ..data.batching import batches, encode
from ..data.inputs import Loaded
from ..learn.replay import BlockInputs, capture_final_block_inputs, replay_chunks, replay_logits
from ..mechanism.collect import Collected
from ..mechanism.lens import answer_stats
from ..records import Dist


@dataclass
class Inputs:
    """What enters the final block, per prompt set, once for every model evaluated."""

    dev: BlockInputs  # last position of each dev fact
    test: BlockInputs  # last position of each test fact
    unknown: BlockInputs | None  # last position of each unknown-subject prompt
    neutral: BlockInputs  # every position of the held-out neutral lines but the last, target: the next token
    neutral_line: torch.Tensor  # [positions] the line of each neutral position


def _fact_inputs(c: Collected, rows: torch.Tensor, answers: torch.Tensor, s: Loaded) -> BlockInputs:
    return BlockInputs(c.final_block_in[rows].to(s.device, s.dtype), c.final_z[rows].to(s.device, s.dtype),
                       targets=answers.to(s.device))


@torch.no_grad()
def capture_inputs(s: Loaded, c: Collected, config: AnalysisConfig) -> Inputs:
    """The final block's inputs for every evaluation set, from the analysis pass and one partial pass each."""
    known, bs = s.known, config.batch_size
    unknown = None
    if s.unknown is not None:
        parts, order = [], []
        for batch in batches(s.unknown.token_ids, bs, s.pad, s.device):
            parts.append(capture_final_block_inputs(s.lm, s.cmap, batch))
            order.append(batch.index)
        unknown = BlockInputs.cat(parts).rows(torch.argsort(torch.cat(order)).to(s.device))
        unknown.targets = s.unknown.answers.to(s.device)
    lines = encode(s.tokenizer, s.neutral_eval)
    neutral, line_of = [], []
    for batch in batches(lines, bs, s.pad, s.device):
        predicting = batch.attention_mask.clone()
        predicting[torch.arange(len(batch), device=s.device), batch.last] = 0  # the last token predicts nothing
        inputs = capture_final_block_inputs(s.lm, s.cmap, batch, positions=predicting.bool())
        next_ids = torch.roll(batch.input_ids, -1, dims=1)[predicting.bool()]
        neutral.append(BlockInputs(inputs.x, inputs.z, targets=next_ids))
        line_of.append(batch.index.to(s.device)[:, None].expand_as(predicting)[predicting.bool()])
    return Inputs(
        dev=_fact_inputs(c, known.rows("dev"), known.answers[known.rows("dev")], s),
        test=_fact_inputs(c, known.rows("test"), known.answers[known.rows("test")], s),
        unknown=unknown,
        neutral=BlockInputs.cat(neutral),
        neutral_line=torch.cat(line_of),
    )


def _final_layer_only(cmap: ComponentMap, patch: Patch) -> None:
    final = cmap.shape.num_layers - 1
    layers = {cmap.validate(str(e.component)).layer for e in patch.edits}
    if layers - {final}:
        raise ValueError(f"patch {patch.id} edits layers {sorted(layers)}; the evaluation replays only the final "
                         f"block (L{final})")


@torch.no_grad()
def replay_dist(model: nn.Module, cmap: ComponentMap, inputs: BlockInputs, patch: Patch | None,
                temperature: float = 1.0) -> Dist:
    """The next-token numbers of each row of `inputs` (targets: the answers) with `patch` applied (None: the base
    model), the logits divided by `temperature`."""
    if patch is not None:
        _final_layer_only(cmap, patch)
    out = Dist.empty(len(inputs))
    with apply_patch(model, patch) if patch is not None else nullcontext():
        for rows, part in replay_chunks(inputs):
            assert part.targets is not None
            out.put(rows.cpu(), answer_stats(replay_logits(cmap, part), part.targets, temperature))
    return out


def split_nll(s: Loaded, inputs: BlockInputs, patch: Patch | None) -> float:
    """Mean NLL of the answer over `inputs` (e.g. the dev split) with `patch` applied (None: the base model)."""
    return float(replay_dist(s.lm, s.cmap, inputs, patch).nll.double().mean()) if len(inputs) else float("nan")


@dataclass
class Runs:
    """One model's numbers on the evaluation sets."""

    test: Dist
    unknown: Dist | None
    neutral: tuple[torch.Tensor, torch.Tensor]  # per-line NLL sums and token counts


def run_model(s: Loaded, inputs: Inputs, patch: Patch | None) -> Runs:
    """Test split, unknown subjects and neutral text, with `patch` applied (None: base)."""
    neutral = replay_dist(s.lm, s.cmap, inputs.neutral, patch)
    lines = len(s.neutral_eval)
    sums = torch.zeros(lines, dtype=torch.float64).index_add_(0, inputs.neutral_line.cpu(), neutral.nll.double())
    counts = torch.bincount(inputs.neutral_line.cpu(), minlength=lines)
    return Runs(test=replay_dist(s.lm, s.cmap, inputs.test, patch),
                unknown=replay_dist(s.lm, s.cmap, inputs.unknown, patch) if inputs.unknown is not None else None,
                neutral=(sums, counts))
