"""Step 5 of the analysis: learn gains on the suppressing components and check the saved patch reproduces them.

The fit (`fit`) runs on what the final block receives at the last position of each prompt; train and dev facts
take it from the analysis pass (`collect`), made-up subjects and neutral text from a forward pass that stops
inside the final block (`replay.capture_final_block_inputs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from recallfix.patches import ComponentMap, Patch, apply_patch, make_patch

from ..config import AnalysisConfig, FitConfig
from ..data.batching import Batch, batch_rows, batches, encode
from ..data.facts import Fact
from ..data.inputs import AnalysisError, Loaded
from ..data.nonce import nonce_facts
from ..mechanism.collect import Collected
from ..mechanism.summaries import component_rows, num
from ..progress import log
from ..schema import FitHistoryRow, PatchInfo
from .fit import fit_gains
from .gain_hooks import GainHooks
from .replay import BlockInputs, capture_final_block_inputs, replay_logits

GAIN_DECIMALS = 4


def fact_inputs(c: Collected, token_ids: Sequence[Sequence[int]], rows: torch.Tensor, answers: torch.Tensor,
                recalled: torch.Tensor, batch_size: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> list[BlockInputs]:
    """The fit's batches of fact prompts `rows`, from what the analysis pass kept (no forward pass; float32 there,
    back to the model's dtype exactly). Grouped as `batches` groups the prompts, so the fit sees the same
    batches as from a forward pass per batch."""
    out = []
    for group in batch_rows([token_ids[int(i)] for i in rows], batch_size):
        picked = rows[torch.tensor(group, dtype=torch.long)]
        out.append(BlockInputs(c.final_block_in[picked].to(device, dtype), c.final_z[picked].to(device, dtype),
                               targets=answers[picked].to(device), recalled=recalled[picked].to(device)))
    return out


def captured_inputs(model: nn.Module, cmap: ComponentMap, token_ids: Sequence[Sequence[int]], pad: int,
                    batch_size: int, device: torch.device, *, last_only: bool = True) -> list[BlockInputs]:
    """The fit's inputs from a forward pass that stops inside the final block (prompts not in the analysis pass)."""
    return [capture_final_block_inputs(model, cmap, batch, last_only=last_only)
            for batch in batches(token_ids, batch_size, pad, device)]


@torch.no_grad()
def verify_patch(model: nn.Module, cmap: ComponentMap, patch: Patch, gains: dict[str, float], probe: Batch) -> float:
    """Max |logit difference| between the fit's hooks at `gains` and the saved patch applied to the weights."""
    inputs = capture_final_block_inputs(model, cmap, probe)
    hooks = GainHooks(cmap, list(gains), probe.input_ids.device)
    hooks.set(gains)
    with hooks:
        hooked = replay_logits(cmap, inputs)
    with apply_patch(model, patch):
        out = model(input_ids=probe.input_ids, attention_mask=probe.attention_mask, use_cache=False)
        rows = torch.arange(len(probe), device=out.logits.device)
        applied = out.logits[rows, probe.last].float()
    return float((hooked - applied).abs().max())


@dataclass
class FitInputs:
    """What every gain fit of a run learns from, captured once: the batches of train and dev prompts (facts and
    made-up subjects) and of neutral positions, and which facts the model recalls before its final block."""

    train: list[BlockInputs]
    dev: list[BlockInputs]
    neutral: list[BlockInputs]
    recalled: torch.Tensor  # [facts] bool
    made_up_train: list[Fact]
    made_up_dev: list[Fact]


def fit_inputs(s: Loaded, c: Collected, config: AnalysisConfig) -> FitInputs:
    known, cmap, dev = s.known, s.cmap, s.device
    recalled = c.before.rank <= config.recall_rank

    def facts_in(rows: torch.Tensor) -> list[BlockInputs]:
        return fact_inputs(c, known.token_ids, rows, known.answers, recalled, config.batch_size, dev, s.dtype)

    def nonce_in(split: str, seed: int) -> tuple[list[BlockInputs], list[Fact]]:
        made_up = nonce_facts([known.facts[i] for i in known.rows(split)], config.nonce_per_template, seed)
        if not made_up:
            return [], []
        batches_in = captured_inputs(s.lm, cmap, encode(s.tokenizer, [f.prompt for f in made_up]), s.pad,
                                     config.batch_size, dev)
        for item in batches_in:  # no answer: guarded only (recalled False), the target is never read
            item.targets = torch.zeros(len(item), dtype=torch.long, device=dev)
            item.recalled = torch.zeros(len(item), dtype=torch.bool, device=dev)
        return batches_in, made_up

    nonce_train, made_up_train = nonce_in("train", config.seed)
    nonce_dev, made_up_dev = nonce_in("dev", config.seed + 1)
    neutral_in = captured_inputs(s.lm, cmap, encode(s.tokenizer, s.neutral_fit), s.pad, config.batch_size, dev,
                                 last_only=False)
    return FitInputs(facts_in(known.rows("train")) + nonce_train, facts_in(known.rows("dev")) + nonce_dev,
                     neutral_in, recalled, made_up_train, made_up_dev)


def learn_patch(s: Loaded, c: Collected, inputs: FitInputs, selected: list[str], rule: str, config: AnalysisConfig,
                command: str, facts_sha: str, temperature: float, *, max_gain: float | None = None
                ) -> tuple[Patch, PatchInfo]:
    """Step 5: fit the gains (train; early stopping on dev), check the patch. `temperature`: the baseline's T,
    recorded beside the gains. `max_gain`: the fit's upper bound instead of `FitConfig.max_gain` (1: the
    suppressors can only be scaled down)."""
    known, cmap, dev = s.known, s.cmap, s.device
    train_rows, dev_rows = known.rows("train"), known.rows("dev")
    recalled = inputs.recalled
    bound = {} if max_gain is None else {"max_gain": max_gain}
    fit_config = FitConfig(**{**asdict(config.fit), "seed": config.seed, **bound})
    made_up_train, made_up_dev = inputs.made_up_train, inputs.made_up_dev
    fit = fit_gains(s.lm, cmap, selected, inputs.train, inputs.dev, inputs.neutral, fit_config,
                    progress=config.progress)
    # 4 decimals: far below the fit's own noise, and the patch then does not depend on float summation order
    # (thread count, device), so the same seed gives the same patch file.
    gains = {name: round(g, GAIN_DECIMALS) for name, g in fit.gains.items()}
    method = "gains" if max_gain is None else f"suppress (gains <= {max_gain:g})"
    log(config.progress, f"{method}: {', '.join(f'{k}={v:.3f}' for k, v in gains.items())} (best epoch "
                          f"{fit.best_epoch}/{fit.epochs_run}); temperature baseline T={temperature:.3f}")
    patch = make_patch(s.lm, gains, command=command, dataset_sha256=facts_sha)
    probe_rows = (dev_rows if len(dev_rows) else train_rows)[: config.batch_size]
    probe = next(batches([known.token_ids[i] for i in probe_rows], config.batch_size, s.pad, dev))
    max_error = verify_patch(s.lm, cmap, patch, gains, probe)
    tolerance = 1e-3 if s.dtype == torch.float32 else 0.25
    if max_error > tolerance:
        raise AnalysisError(f"the saved patch does not reproduce the fitted gains (max logit error {max_error:.3g})")
    effects = torch.stack([c.final_effect[train_rows, c.final_names.index(n)] if n in c.final_names
                           else c.neuron_effect[train_rows, cmap.validate(n).index] for n in selected], dim=1)
    info = PatchInfo(
        # the file is named once every candidate is fitted (`methods.file_names`)
        file="", id=patch.id, selection_rule=rule,
        candidates=component_rows(selected, None, effects),
        gains=gains, fit_config=asdict(fit_config),
        n_train=int(len(train_rows)), n_train_recalled=int(recalled[train_rows].sum()),
        n_dev=int(len(dev_rows)),
        n_nonce_train=len(made_up_train), n_nonce_dev=len(made_up_dev),
        nonce_examples=[f.prompt for f in made_up_train[:: max(1, len(made_up_train) // 5)]][:5],
        best_epoch=fit.best_epoch, epochs_run=fit.epochs_run, stopped_early=fit.stopped_early,
        history=[FitHistoryRow(**{k: (int(v) if k == "epoch" else num(v)) for k, v in h.items()})
                 for h in fit.history],
        temperature=temperature, verified=True, max_verify_error=max_error,
    )
    return patch, info
