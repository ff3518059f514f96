"""Learning gains on final-layer components by gradient descent through the real forward pass.

A gain g_c on component c multiplies its write to the residual stream, exactly as `apply_patch`
scales its weights: a head's slice of the attention output projection's input z (the projection's
bias belongs to no head and is left alone), a neuron's activation entering the MLP output
projection, or the whole MLP output (bias included). Here the gains are hooks at
`blocks.{l}.attn.hook_z`, `blocks.{l}.mlp.hook_post` and `blocks.{l}.hook_mlp_out` (`recallfix.patches.hooks`),
so gradients flow through the real final block, final norm and unembedding.

Only the final block depends on the gains, and at a position only through the stream entering it and the
heads' z there (`BlockInputs`): these are kept once per prompt and the fit replays block -> final norm ->
unembedding on them, one position at a time: the same function as the full forward (tested), without
re-running the layers below or the attention every step.

Objective (g = 1 + delta, projected onto [min_gain, max_gain] after every step):

    L(g) =  mean_{recalled train facts} -log p_g(answer)
          + guard_weight * mean_{other train prompts} KL(p_base || p_g)   (last position)
          + kl_weight    * mean_{neutral tokens}    KL(p_base || p_g)     (every position)
          + l2 * sum_c (g_c - 1)^2

"Recalled": the answer ranks first (`recall_rank`) in the logit lens of the stream entering the final
block, i.e. the model had the answer before its last layer. Only there is raising p(answer) the goal;
on the facts it does not know (and on made-up-subject prompts, see `nonce`) the fit must not change
the prediction (no new overconfidence), and on neutral text not at all.

"No new overconfidence" is a constraint, checked on dev after every epoch: the mean rise of the top-1
probability on the guarded dev prompts must stay within `max_confidence_rise`. An epoch over budget
multiplies the guard weight by `guard_growth` for the next ones (a dual-ascent step) and cannot be kept.
Early stopping keeps the gains of the within-budget epoch with the lowest dev NLL on recalled facts
(epoch 0, the base model, always qualifies) and stops after `patience` epochs without a better one.
Without a budget it keeps the epoch with the lowest dev objective (the objective above minus the prior).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from recallfix.patches.components import ComponentMap
from recallfix.patches.hooks import HookFn, add_hooks, run_until

from .batching import Batch, progress_bar
from .gemm import matmul_t


class GainHooks:
    """Learnable gains on components of one layer, applied by hooks (a context manager)."""

    def __init__(self, cmap: ComponentMap, names: Sequence[str], device: torch.device | str = "cpu") -> None:
        if not names:
            raise ValueError("no components to give a gain")
        self.cmap, self.names = cmap, list(names)
        components = [cmap.validate(n) for n in self.names]
        layers = {c.layer for c in components}
        if len(layers) != 1:
            raise ValueError(f"gains must all be on one layer, got layers {sorted(layers)}")
        self.layer = layers.pop()
        self.heads = [i for i, c in enumerate(components) if c.kind == "head"]
        self.neurons = [i for i, c in enumerate(components) if c.kind == "neuron"]
        self.whole_mlp = [i for i, c in enumerate(components) if c.kind == "mlp"]
        if self.whole_mlp and self.neurons:
            raise ValueError(f"L{self.layer}MLP and its neurons cannot both get a gain")
        self._head_index = torch.tensor([components[i].index for i in self.heads], dtype=torch.long, device=device)
        self._neuron_index = torch.tensor([components[i].index for i in self.neurons], dtype=torch.long, device=device)
        self.delta = nn.Parameter(torch.zeros(len(components), device=device))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._active = True

    @property
    def gains(self) -> torch.Tensor:
        return 1 + self.delta

    def as_dict(self) -> dict[str, float]:
        return {n: float(g) for n, g in zip(self.names, self.gains.detach().cpu(), strict=True)}

    def set(self, gains: dict[str, float]) -> None:
        with torch.no_grad():
            for i, name in enumerate(self.names):
                self.delta[i] = gains[name] - 1.0

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        """The base model while the hooks stay registered (gains treated as 1)."""
        self._active = False
        try:
            yield
        finally:
            self._active = True

    def _scale_heads(self, z: torch.Tensor) -> torch.Tensor | None:
        if not self._active:
            return None
        shape = self.cmap.shape
        per_head = torch.ones(shape.num_heads, device=z.device, dtype=self.delta.dtype)
        per_head = per_head.index_put((self._head_index,), self.gains[self.heads])
        scale = per_head.repeat_interleave(shape.head_dim).to(z.dtype)
        return z * scale

    def _scale_neurons(self, acts: torch.Tensor) -> torch.Tensor | None:
        if not self._active:
            return None
        per_neuron = torch.ones(acts.shape[-1], device=acts.device, dtype=self.delta.dtype)
        per_neuron = per_neuron.index_put((self._neuron_index,), self.gains[self.neurons])
        return acts * per_neuron.to(acts.dtype)

    def _scale_mlp(self, output: torch.Tensor) -> torch.Tensor | None:
        if not self._active:
            return None
        return output * self.gains[self.whole_mlp[0]].to(output.dtype)

    def __enter__(self) -> GainHooks:
        points: dict[str, HookFn] = {}
        if self.heads:
            points[f"blocks.{self.layer}.attn.hook_z"] = self._scale_heads
        if self.neurons:
            points[f"blocks.{self.layer}.mlp.hook_post"] = self._scale_neurons
        if self.whole_mlp:
            points[f"blocks.{self.layer}.hook_mlp_out"] = self._scale_mlp
        self._handles = add_hooks(self.cmap, points)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ------------------------------------------------------------------------------------------------
# Replaying the final block
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# The fit
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitConfig:
    lr: float = 0.05
    max_epochs: int = 40
    patience: int = 5
    l2: float = 0.01  # weight of sum (g - 1)^2, the pull toward the base model
    kl_weight: float = 1.0  # weight of the KL guard on neutral text
    guard_weight: float = 1.0  # initial weight of the KL guard on prompts the model does not recall
    max_confidence_rise: float | None = 0.05  # budget on the guarded dev prompts' mean top-1 rise (None: off)
    guard_growth: float = 3.0  # the guard weight is multiplied by this after an epoch over budget
    min_gain: float = 0.0
    max_gain: float = 2.0
    recalled_per_step: int = 32  # recalled train facts in each training step (an epoch is one pass over them)
    guarded_per_step: int = 64  # other train prompts in each training step's KL guard (0: all of them)
    neutral_per_step: int = 64  # neutral positions in each training step's KL guard (0: all of them)
    seed: int = 0


@dataclass
class FitResult:
    gains: dict[str, float]
    best_epoch: int  # 0 = the initial gains (all 1) were never beaten on dev
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)


# The neutral positions keep their base log-probs ([positions, vocab]); above this many values in all (large
# vocabularies, long neutral sets) they are recomputed with the hooks bypassed instead of stored.
MAX_STORED_BASE = 200_000_000
CHUNK = 256  # positions per replay where no gradient is taken


def replay_chunks(inputs: BlockInputs) -> Iterator[tuple[torch.Tensor, BlockInputs]]:
    """`inputs` in parts of at most `CHUNK` rows: (the rows, that part)."""
    for start in range(0, len(inputs), CHUNK):
        rows = torch.arange(start, min(start + CHUNK, len(inputs)), device=inputs.x.device)
        yield rows, inputs.rows(rows)


def _chunks(inputs: BlockInputs) -> Iterator[BlockInputs]:
    for _, part in replay_chunks(inputs):
        yield part


def set_base(cmap: ComponentMap, facts: Sequence[BlockInputs], neutral: BlockInputs | None) -> None:
    """Store the base model's log-probs on each batch (call before any gain hook is active)."""
    with torch.no_grad():
        for item in facts:
            item.base_logp = replay_logits(cmap, item).log_softmax(dim=-1)
        if neutral is not None and len(neutral) * cmap.shape.vocab_size <= MAX_STORED_BASE:
            neutral.base_logp = torch.cat([replay_logits(cmap, part).log_softmax(dim=-1) for part in _chunks(neutral)])


def _kl(base_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p) over the last dim."""
    return F.kl_div(logp, base_logp, reduction="none", log_target=True).sum(dim=-1)


def fact_loss(cmap: ComponentMap, inputs: BlockInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over one batch: summed -log p(answer) of the recalled rows; summed KL to the base and summed rise of
    the top-1 probability over the other rows."""
    assert inputs.targets is not None and inputs.base_logp is not None and inputs.recalled is not None
    logp = replay_logits(cmap, inputs).log_softmax(dim=-1)
    nll = -logp.gather(-1, inputs.targets.unsqueeze(-1)).squeeze(-1)
    kl = _kl(inputs.base_logp, logp)
    rise = logp.max(dim=-1).values.exp() - inputs.base_logp.max(dim=-1).values.exp()
    guarded = ~inputs.recalled
    return (nll * inputs.recalled).sum(), (kl * guarded).sum(), (rise * guarded).sum()


def neutral_kl(cmap: ComponentMap, inputs: BlockInputs, hooks: GainHooks) -> torch.Tensor:
    """Summed KL(p_base || p_patched) over the neutral positions of `inputs`."""
    base = inputs.base_logp
    if base is None:
        with torch.no_grad(), hooks.bypassed():
            base = replay_logits(cmap, inputs).log_softmax(dim=-1)
    return _kl(base, replay_logits(cmap, inputs).log_softmax(dim=-1)).sum()


@dataclass
class _Totals:
    recalled: int
    unrecalled: int
    neutral_tokens: int


def _totals(facts: Sequence[BlockInputs], neutral: BlockInputs | None) -> _Totals:
    recalled = sum(int(f.recalled.sum()) for f in facts if f.recalled is not None)
    rows = sum(len(f) for f in facts)
    return _Totals(recalled, rows - recalled, len(neutral) if neutral is not None else 0)


def _objective(cmap: ComponentMap, facts: Sequence[BlockInputs], neutral: BlockInputs | None,
               hooks: GainHooks, config: FitConfig, guard_weight: float) -> dict[str, float]:
    """The fit objective without the prior term, over whole sets, every neutral position included (no gradient)."""
    totals = _totals(facts, neutral)
    with torch.no_grad():
        nll = kl_facts = kl_neutral = rise = 0.0
        for f in facts:
            a, b, r = fact_loss(cmap, f)
            nll, kl_facts, rise = nll + float(a), kl_facts + float(b), rise + float(r)
        for part in _chunks(neutral) if neutral is not None else ():
            kl_neutral += float(neutral_kl(cmap, part, hooks))
    nll /= max(1, totals.recalled)
    kl_facts /= max(1, totals.unrecalled)
    rise /= max(1, totals.unrecalled)
    kl_neutral /= max(1, totals.neutral_tokens)
    objective = nll + guard_weight * kl_facts + config.kl_weight * kl_neutral
    return {"objective": objective, "nll": nll, "kl_unrecalled": kl_facts, "kl_neutral": kl_neutral,
            "confidence_rise_unrecalled": rise}


def _sample(total: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """`size` of `total` rows drawn without replacement (all of them when size is 0 or not smaller)."""
    if size <= 0 or size >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=generator)[:size]


def _split_recalled(facts: Sequence[BlockInputs]) -> tuple[BlockInputs | None, BlockInputs | None]:
    """All fact rows joined, split into (recalled, guarded); None for an empty part."""
    if not facts:
        return None, None
    joined = BlockInputs.cat(facts)
    assert joined.recalled is not None
    recalled = joined.recalled.nonzero().flatten()
    guarded = (~joined.recalled).nonzero().flatten()
    return (joined.rows(recalled) if len(recalled) else None), (joined.rows(guarded) if len(guarded) else None)


def _step_loss(cmap: ComponentMap, recalled: BlockInputs | None, guarded: BlockInputs | None,
               neutral: BlockInputs | None, hooks: GainHooks, config: FitConfig, guard: float) -> torch.Tensor:
    """One training step's estimate of the objective: each term the mean over its own sample of rows."""
    loss = config.l2 * hooks.delta.pow(2).sum()
    if recalled is not None:
        loss = loss + fact_loss(cmap, recalled)[0] / len(recalled)
    if guarded is not None:
        loss = loss + guard * fact_loss(cmap, guarded)[1] / len(guarded)
    if neutral is not None and config.kl_weight > 0:
        loss = loss + config.kl_weight * neutral_kl(cmap, neutral, hooks) / len(neutral)
    return loss


def fit_gains(
    model: nn.Module,
    cmap: ComponentMap,
    names: Sequence[str],
    train: Sequence[BlockInputs],
    dev: Sequence[BlockInputs],
    neutral: Sequence[BlockInputs],
    config: FitConfig = FitConfig(),
    *,
    progress: bool = False,
) -> FitResult:
    """Fit gains on `names` (final-layer components) as described in the module docstring.

    `train`/`dev`: fact batches with targets and `recalled`; `neutral`: neutral-text positions (the parts are
    joined). Base log-probs are stored first (gains 1 = the base model). Each training step takes the three
    terms of the objective on their own samples: `recalled_per_step` recalled train facts (an epoch is one pass
    over them), `guarded_per_step` of the other train prompts and `neutral_per_step` neutral positions drawn at
    random, so each term is an unbiased estimate of its mean over the whole set (only the recalled facts carry
    the signal the fit follows; the guards only need to be estimated). The per-epoch dev objective takes every
    dev prompt and neutral position.
    """
    device = next(model.parameters()).device
    hooks = GainHooks(cmap, names, device)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    neutral_all = BlockInputs.cat(neutral) if neutral else None
    set_base(cmap, [*train, *dev], neutral_all)
    recalled, guarded = _split_recalled(train)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam([hooks.delta], lr=config.lr)
    history: list[dict[str, float]] = []
    epoch = 0
    guard = config.guard_weight
    budget = config.max_confidence_rise

    def rows(inputs: BlockInputs | None, index: torch.Tensor) -> BlockInputs | None:
        return None if inputs is None else inputs.rows(index.to(inputs.x.device))

    def score(metrics: dict[str, float]) -> float:
        # With a budget: the dev NLL of recalled facts, among epochs within budget (others never win).
        # Without: the dev objective.
        if budget is None:
            return metrics["objective"]
        return metrics["nll"] if metrics["confidence_rise_unrecalled"] <= budget else math.inf

    try:
        with hooks:
            dev_obj = _objective(cmap, dev, neutral_all, hooks, config, guard)
            train_obj = _objective(cmap, train, neutral_all, hooks, config, guard)["objective"]
            history.append({"epoch": 0, "guard_weight": guard, "train_objective": train_obj,
                            **{f"dev_{k}": v for k, v in dev_obj.items()}})
            best, best_gains, best_epoch, bad = score(dev_obj), hooks.as_dict(), 0, 0
            bar = progress_bar(range(1, config.max_epochs + 1), progress=progress, desc="fit gains")
            for epoch in bar:
                n_recalled = len(recalled) if recalled is not None else 0
                order = torch.randperm(n_recalled, generator=generator)
                per_step = max(1, config.recalled_per_step)
                steps = [order[i : i + per_step] for i in range(0, n_recalled, per_step)] or [order]
                train_objective = 0.0
                for step in steps:
                    guard_rows = _sample(len(guarded), config.guarded_per_step, generator) if guarded else None
                    neutral_rows = (_sample(len(neutral_all), config.neutral_per_step, generator)
                                    if neutral_all is not None else None)
                    loss = _step_loss(cmap, rows(recalled, step) if len(step) else None,
                                      rows(guarded, guard_rows) if guard_rows is not None else None,
                                      rows(neutral_all, neutral_rows) if neutral_rows is not None else None,
                                      hooks, config, guard)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    with torch.no_grad():
                        hooks.delta.clamp_(config.min_gain - 1, config.max_gain - 1)
                    train_objective += float(loss.detach()) / len(steps)
                dev_obj = _objective(cmap, dev, neutral_all, hooks, config, guard)
                history.append({"epoch": epoch, "guard_weight": guard, "train_objective": train_objective,
                                **{f"dev_{k}": v for k, v in dev_obj.items()}})
                bar.set_postfix(dev=f"{dev_obj['objective']:.4f}", guard=f"{guard:g}")
                if score(dev_obj) < best - 1e-6:
                    best, best_gains, best_epoch, bad = score(dev_obj), hooks.as_dict(), epoch, 0
                else:
                    bad += 1
                    if bad >= config.patience:
                        break
                if budget is not None and dev_obj["confidence_rise_unrecalled"] > budget:
                    guard *= config.guard_growth  # over budget: weigh the guard more from the next epoch on
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
    return FitResult(gains=best_gains, best_epoch=best_epoch, epochs_run=epoch,
                     stopped_early=epoch < config.max_epochs, history=history)
