"""Learning gains on final-layer components by gradient descent through the real forward pass.

A gain g_c on component c multiplies its write to the residual stream, exactly as `apply_patch`
scales its weights: a head's slice of the attention output projection's input z (the projection's
bias belongs to no head and is left alone), a neuron's activation entering the MLP output
projection, or the whole MLP output (bias included). Here the gains are hooks at
`blocks.{l}.attn.hook_z`, `blocks.{l}.mlp.hook_post` and `blocks.{l}.hook_mlp_out` (`recallfix.patches.hooks`),
so gradients flow through the real final block, final norm and unembedding.

Only the final block depends on the gains, so its inputs are captured once per batch (`hooks.block_inputs`
stops the forward there) and the fit replays block -> final norm -> unembedding on them: the
same function as the full forward (tested), without re-running the layers below every step.

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from recallfix.patches.components import ComponentMap
from recallfix.patches.hooks import HookFn, add_hooks, block_inputs

from .batching import Batch


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
    """What the final block received for one batch, and where each row's tokens are."""

    args: tuple
    kwargs: dict
    batch: Batch
    targets: torch.Tensor | None = None  # [b] answer ids (facts) or None (neutral text)
    # Facts only: rows fitted on their answer (True) or guarded toward the base distribution (False).
    recalled: torch.Tensor | None = None
    base_logp: torch.Tensor | None = None  # log-probs of the base model ([b, vocab] or [b, seq, vocab])


@torch.no_grad()
def capture_final_block_inputs(model: nn.Module, cmap: ComponentMap, batch: Batch) -> BlockInputs:
    """Run the model up to its final block and keep that block's arguments (the rest is skipped)."""
    args, kwargs = block_inputs(model, cmap, cmap.shape.num_layers - 1, input_ids=batch.input_ids,
                                attention_mask=batch.attention_mask, use_cache=False)
    return BlockInputs(args, kwargs, batch)


def replay_logits(cmap: ComponentMap, inputs: BlockInputs, *, last_only: bool) -> torch.Tensor:
    """Final block -> final norm -> unembedding on captured inputs: logits at the last real position of
    each row [b, vocab] (last_only) or at every position [b, seq, vocab]."""
    out = cmap.block(cmap.shape.num_layers - 1)(*inputs.args, **inputs.kwargs)
    hidden = out[0] if isinstance(out, tuple) else out
    if last_only:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        hidden = hidden[rows, inputs.batch.last]
    return cmap.unembed()(cmap.final_norm()(hidden)).float()


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
    seed: int = 0


@dataclass
class FitResult:
    gains: dict[str, float]
    best_epoch: int  # 0 = the initial gains (all 1) were never beaten on dev
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)


# Neutral batches keep the base log-probs of every position ([b, seq, vocab]); above this many values in
# all (large vocabularies) they are recomputed with the hooks bypassed instead of stored.
MAX_STORED_BASE = 200_000_000


def set_base(cmap: ComponentMap, facts: Sequence[BlockInputs], neutral: Sequence[BlockInputs]) -> None:
    """Store the base model's log-probs on each batch (call before any gain hook is active)."""
    vocab = cmap.shape.vocab_size
    store_neutral = sum(n.batch.input_ids.numel() for n in neutral) * vocab <= MAX_STORED_BASE
    with torch.no_grad():
        for item in facts:
            item.base_logp = replay_logits(cmap, item, last_only=True).log_softmax(dim=-1)
        for item in neutral if store_neutral else ():
            item.base_logp = replay_logits(cmap, item, last_only=False).log_softmax(dim=-1)


def _kl(base_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p) over the last dim."""
    return F.kl_div(logp, base_logp, reduction="none", log_target=True).sum(dim=-1)


def fact_loss(cmap: ComponentMap, inputs: BlockInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over one batch: summed -log p(answer) of the recalled rows; summed KL to the base and summed rise of
    the top-1 probability over the other rows."""
    assert inputs.targets is not None and inputs.base_logp is not None and inputs.recalled is not None
    logp = replay_logits(cmap, inputs, last_only=True).log_softmax(dim=-1)
    nll = -logp.gather(-1, inputs.targets.unsqueeze(-1)).squeeze(-1)
    kl = _kl(inputs.base_logp, logp)
    rise = logp.max(dim=-1).values.exp() - inputs.base_logp.max(dim=-1).values.exp()
    guarded = ~inputs.recalled
    return (nll * inputs.recalled).sum(), (kl * guarded).sum(), (rise * guarded).sum()


def neutral_kl(cmap: ComponentMap, inputs: BlockInputs, hooks: GainHooks) -> tuple[torch.Tensor, int]:
    """Summed KL(p_base || p_patched) over the real positions of one neutral batch, and their number."""
    base = inputs.base_logp
    if base is None:
        with torch.no_grad(), hooks.bypassed():
            base = replay_logits(cmap, inputs, last_only=False).log_softmax(dim=-1)
    logp = replay_logits(cmap, inputs, last_only=False).log_softmax(dim=-1)
    valid = inputs.batch.attention_mask.bool()
    return (_kl(base, logp) * valid).sum(), int(valid.sum())


@dataclass
class _Totals:
    recalled: int
    unrecalled: int
    neutral_tokens: int


def _totals(facts: Sequence[BlockInputs], neutral: Sequence[BlockInputs]) -> _Totals:
    recalled = sum(int(f.recalled.sum()) for f in facts if f.recalled is not None)
    rows = sum(len(f.batch) for f in facts)
    tokens = sum(int(n.batch.attention_mask.sum()) for n in neutral)
    return _Totals(recalled, rows - recalled, tokens)


def _objective(cmap: ComponentMap, facts: Sequence[BlockInputs], neutral: Sequence[BlockInputs],
               hooks: GainHooks, config: FitConfig, guard_weight: float) -> dict[str, float]:
    """The fit objective without the prior term, over whole sets (no gradient)."""
    totals = _totals(facts, neutral)
    with torch.no_grad():
        nll = kl_facts = kl_neutral = rise = 0.0
        for f in facts:
            a, b, r = fact_loss(cmap, f)
            nll, kl_facts, rise = nll + float(a), kl_facts + float(b), rise + float(r)
        for n in neutral:
            kl_neutral += float(neutral_kl(cmap, n, hooks)[0])
    nll /= max(1, totals.recalled)
    kl_facts /= max(1, totals.unrecalled)
    rise /= max(1, totals.unrecalled)
    kl_neutral /= max(1, totals.neutral_tokens)
    objective = nll + guard_weight * kl_facts + config.kl_weight * kl_neutral
    return {"objective": objective, "nll": nll, "kl_unrecalled": kl_facts, "kl_neutral": kl_neutral,
            "confidence_rise_unrecalled": rise}


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

    `train`/`dev`: fact batches with targets and `recalled`; `neutral`: neutral-text batches. Base
    log-probs are stored on every batch first (gains 1 = the base model).
    """
    device = next(model.parameters()).device
    hooks = GainHooks(cmap, names, device)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    set_base(cmap, [*train, *dev], neutral)
    totals = _totals(train, neutral)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam([hooks.delta], lr=config.lr)
    history: list[dict[str, float]] = []
    epoch = 0
    guard = config.guard_weight
    budget = config.max_confidence_rise

    def score(metrics: dict[str, float]) -> float:
        # With a budget: the dev NLL of recalled facts, among epochs within budget (others never win).
        # Without: the dev objective.
        if budget is None:
            return metrics["objective"]
        return metrics["nll"] if metrics["confidence_rise_unrecalled"] <= budget else math.inf

    try:
        with hooks:
            dev_obj = _objective(cmap, dev, neutral, hooks, config, guard)
            train_obj = _objective(cmap, train, neutral, hooks, config, guard)["objective"]
            history.append({"epoch": 0, "guard_weight": guard, "train_objective": train_obj,
                            **{f"dev_{k}": v for k, v in dev_obj.items()}})
            best, best_gains, best_epoch, bad = score(dev_obj), hooks.as_dict(), 0, 0
            bar = tqdm(range(1, config.max_epochs + 1), desc="fit gains", disable=not progress, leave=False,
                       dynamic_ncols=True)
            for epoch in bar:
                order = torch.randperm(len(train), generator=generator).tolist()
                neutral_order = torch.randperm(len(neutral), generator=generator).tolist()
                train_objective = 0.0
                for step, i in enumerate(order):
                    # This batch's share of the epoch objective, times the number of batches: an unbiased
                    # estimate of the whole objective whatever the batch composition.
                    nll, kl, _ = fact_loss(cmap, train[i])
                    loss = len(train) * (nll / max(1, totals.recalled) + guard * kl / max(1, totals.unrecalled))
                    if neutral_order and config.kl_weight > 0:
                        kl_sum, count = neutral_kl(cmap, neutral[neutral_order[step % len(neutral_order)]], hooks)
                        loss = loss + config.kl_weight * kl_sum / max(1, count)
                    loss = loss + config.l2 * hooks.delta.pow(2).sum()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    with torch.no_grad():
                        hooks.delta.clamp_(config.min_gain - 1, config.max_gain - 1)
                    train_objective += float(loss.detach()) / len(train)
                dev_obj = _objective(cmap, dev, neutral, hooks, config, guard)
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
