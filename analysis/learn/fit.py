"""Learning gains on final-layer components by gradient descent through the real forward pass.

The gains are hooks (`gain_hooks.GainHooks`) on the real final block, and the fit replays that block on what
entered it at each prompt's last position (`replay`), so each step costs the final block alone.

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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from recallfix.patches.components import ComponentMap

from ..config import FitConfig
from ..progress import progress_bar
from .gain_hooks import GainHooks
from .replay import BlockInputs, replay_chunks, replay_logits


@dataclass
class FitResult:
    gains: dict[str, float]
    best_epoch: int  # 0 = the initial gains (all 1) were never beaten on dev
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)


# vocabularies, long neutral sets) they are recomputed with the hooks bypassed instead of stored.
MAX_STORED_BASE = 200_000_000


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


def _rechunk(parts: Sequence[BlockInputs]) -> list[BlockInputs]:
    """The rows of `parts` in parts of `CHUNK`: the per-epoch objective and the base log-probs then take a few
    large readout products instead of one per prompt batch."""
    return list(_chunks(BlockInputs.cat(parts))) if parts else []


def sample_rows(total: int, size: int, generator: torch.Generator) -> torch.Tensor:
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
    facts = [part for part in (recalled, guarded) if part is not None]
    if facts:  # one replay of both samples: fact_loss sums each term over its own rows
        nll, kl, _ = fact_loss(cmap, BlockInputs.cat(facts))
        loss = loss + (nll / len(recalled) if recalled is not None else 0)
        loss = loss + (guard * kl / len(guarded) if guarded is not None else 0)
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
    config: FitConfig | None = None,
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
    dev prompt and neutral position. `config`: `FitConfig()` if None.
    """
    config = config or FitConfig()
    device = next(model.parameters()).device
    hooks = GainHooks(cmap, names, device)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    neutral_all = BlockInputs.cat(neutral) if neutral else None
    train, dev = _rechunk(train), _rechunk(dev)
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
                    guard_rows = sample_rows(len(guarded), config.guarded_per_step, generator) if guarded else None
                    neutral_rows = (sample_rows(len(neutral_all), config.neutral_per_step, generator)
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
