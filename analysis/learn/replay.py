"""The final block replayed on what entered it: the same function as the full forward pass, without re-running
the layers below it or the attention.

Only the final block depends on a final-layer patch or gain, and at a position only through the stream entering
it and the heads' z there (`BlockInputs`): these are captured once per prompt (`capture_final_block_inputs`, or
from the analysis pass), and `replay_logits` runs block -> final norm -> unembedding on them, one position at a
time. The fit (`fit`) takes its gradients through it; the evaluation (`evaluate.passes`) replays every patch on
the same captured inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from recallfix.patches.components import ComponentMap
from recallfix.patches.hooks import run_until

from ..data.batching import Batch
from ..mechanism.gemm import matmul_t

CHUNK = 256  # positions per replay where no gradient is taken


@dataclass
class BlockInputs:
    """What the final block needs to be replayed at some positions, one row per position.

    The gains act on the heads' z (the attention output projection's input) or later, so the block's
    attention up to z, which reads the other positions, does not depend on them: z and the stream entering
    the block at the position are all the replay needs.
    """

    x: torch.Tensor  # [n, d_model] the stream entering the final block
    z: torch.Tensor  # [n, heads * d_head] the input of its attention output projection
    targets: torch.Tensor | None = None  # [n] answer ids (facts) or None (neutral text)
    # Facts only: rows fitted on their answer (True) or guarded toward the base distribution (False).
    recalled: torch.Tensor | None = None
    base_logp: torch.Tensor | None = None  # [n, vocab] log-probs of the base model

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def rows(self, index: torch.Tensor) -> BlockInputs:
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        return BlockInputs(self.x[index], self.z[index], pick(self.targets), pick(self.recalled),
                           pick(self.base_logp))

    @staticmethod
    def cat(parts: Sequence[BlockInputs]) -> BlockInputs:
        def join(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if any(t is None for t in ts) else torch.cat(ts)  # type: ignore[arg-type]

        return BlockInputs(torch.cat([p.x for p in parts]), torch.cat([p.z for p in parts]),
                           join([p.targets for p in parts]), join([p.recalled for p in parts]),
                           join([p.base_logp for p in parts]))


@torch.no_grad()
def capture_final_block_inputs(model: nn.Module, cmap: ComponentMap, batch: Batch, *, last_only: bool = True,
                               positions: torch.Tensor | None = None) -> BlockInputs:
    """Run the model into its final block, up to the attention output projection (the rest is skipped), and keep
    the block's inputs at the last real position of each row (last_only), at every real position, or where the
    [batch, seq] bool mask `positions` is set (rows in row-major order)."""
    final = cmap.shape.num_layers - 1
    x_at, z_at = f"blocks.{final}.hook_resid_pre", f"blocks.{final}.attn.hook_z"
    seen = run_until(model, cmap, [x_at, z_at], input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     use_cache=False)
    size, seq = batch.input_ids.shape
    x, z = seen[x_at].reshape(size, seq, -1), seen[z_at].reshape(size, seq, -1)
    if positions is None and last_only:
        rows = torch.arange(size, device=x.device)
        return BlockInputs(x[rows, batch.last], z[rows, batch.last])
    where = batch.attention_mask.bool() if positions is None else positions
    return BlockInputs(x[where], z[where])


@contextmanager
def _attention_returns(attention: nn.Module, output: Callable[[], torch.Tensor]) -> Iterator[None]:
    """The attention module returns output() (and no weights) whatever it is called with."""
    had = "forward" in attention.__dict__
    previous = attention.__dict__.get("forward")
    attention.forward = lambda *_args, **_kwargs: (output(), None)
    try:
        yield
    finally:
        if had:
            attention.forward = previous
        else:
            del attention.forward


def replay_logits(cmap: ComponentMap, inputs: BlockInputs) -> torch.Tensor:
    """Final block -> final norm -> unembedding at the captured positions. [n, vocab]

    Each position is replayed as a sequence of one: the block's own modules run (norms, MLP, the attention
    output projection, and any gain hook on them), with its attention module answering the projection of the
    captured z, so no architecture code is needed here.
    """
    final = cmap.shape.num_layers - 1
    block = cmap.block(final)
    attention = block.get_submodule(cmap.spec.attn_out.rpartition(".")[0])
    project = cmap.attn_out(final)
    with _attention_returns(attention, lambda: project(inputs.z.unsqueeze(1))):
        out = block(inputs.x.unsqueeze(1))
    hidden = (out[0] if isinstance(out, tuple) else out)[:, 0]
    unembed = cmap.unembed()
    logits = matmul_t(cmap.final_norm()(hidden), unembed.weight)  # the module's own product under autograd
    return logits if getattr(unembed, "bias", None) is None else logits + unembed.bias.float()


def replay_chunks(inputs: BlockInputs) -> Iterator[tuple[torch.Tensor, BlockInputs]]:
    """`inputs` in parts of at most `CHUNK` rows: (the rows, that part)."""
    for start in range(0, len(inputs), CHUNK):
        rows = torch.arange(start, min(start + CHUNK, len(inputs)), device=inputs.x.device)
        yield rows, inputs.rows(rows)
