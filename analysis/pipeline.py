"""`run_analysis`: the recipe of a run, model + facts -> RUN/{analysis.json, patch.json, report.md, *.png}.

Steps (numbers in analysis.json under the same names; the module that computes them in brackets):

1. logit_lens     p(answer) and rank after every layer, per relation (all facts)            [summaries]
2. final_layer    DLA and effect on log p(answer) of every final-block component, its top
                  neurons (all facts)                                                       [summaries]
3. mechanisms     mover heads, and each MLP regressed on its block's heads (all facts)      [summaries]
4. verdict        p(answer) before vs after the final block (test split and all), top
                  suppressors                                                               [summaries]
5. patch          gains on the final-block components that suppress the answer on the *train* split,
                  fitted through the real forward pass (`fit`), early-stopped on dev; the saved patch
                  is checked against the fitted gains                                        [here]
6. evaluation     the patch applied with `apply_patch`, on the test split and unknown subjects: base,
                  patched, temperature-scaled (T fitted on train), with cluster-bootstrap intervals;
                  NLL on held-out neutral text                                               [evaluate]

Settings: `config.AnalysisConfig`. Inputs: `inputs`. Every section is a `schema` model from where it is
computed; the report (`report`, `plots`) renders the `AnalysisResult` this returns.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from recallfix.patches import ComponentMap, Patch, __version__, apply_patch, make_patch
from recallfix.patches.io import atomic_directory, atomic_write_text

from . import calibration as cal
from .attribution import select_suppressors, summarize, top_neurons
from .batching import batches, encode
from .collect import Collected, collect
from .config import AnalysisConfig
from .evaluate import evaluate, evaluate_criteria, logit_chunks, patch_metrics, run_patched
from .facts import Fact, FactsFormatError, dataset_sha256
from .fit import BlockInputs, FitConfig, GainHooks, capture_final_block_inputs, fit_gains, replay_logits
from .inputs import AnalysisError, Loaded, load_inputs
from .nonce import nonce_facts
from .schema import SCHEMA_VERSION, AnalysisResult, DataInfo, FitHistoryRow, LogitLens, ModelInfo, PatchInfo
from .summaries import component_rows, describe, neuron_names, num

GAIN_DECIMALS = 4


def choose_components(s: Loaded, c: Collected, config: AnalysisConfig) -> tuple[list[str], str]:
    """The components to give gains, decided on the train split only, and the rule in words."""
    train = s.known.rows("train")
    if config.components is not None:
        selected = [str(s.cmap.validate(name)) for name in config.components]
        if any(s.cmap.validate(name).layer != s.final for name in selected):
            raise AnalysisError(f"--components must be in the final layer (L{s.final}), got {', '.join(selected)}")
        return selected, "given explicitly: " + ", ".join(selected)
    final_stats = summarize(c.final_effect[train], c.final_names)
    order = top_neurons(c.neuron_effect[train], s.final, config.max_neurons)
    neuron_stats = summarize(c.neuron_effect[train][:, order], neuron_names(s.final, order))
    selected = select_suppressors(final_stats, neuron_stats, mlp=config.mlp, min_share=config.min_share)
    rule = (f"final-block components whose direct effect on log p(answer) is < 0 on average and on >= "
            f"{config.min_share:.0%} of train prompts (heads; MLP: {config.mlp}"
            + (f", at most {config.max_neurons} neurons" if config.mlp == "neurons" else "") + ")")
    return selected, rule


def block_inputs(model: nn.Module, cmap: ComponentMap, token_ids: Sequence[Sequence[int]], pad: int,
                 batch_size: int, device: torch.device, *, answers: torch.Tensor | None = None,
                 recalled: torch.Tensor | None = None) -> list[BlockInputs]:
    out = []
    for batch in batches(token_ids, batch_size, pad, device):
        item = capture_final_block_inputs(model, cmap, batch)
        if answers is not None and recalled is not None:
            item.targets = answers[batch.index].to(device)
            item.recalled = recalled[batch.index].to(device)
        out.append(item)
    return out


@torch.no_grad()
def verify_patch(model: nn.Module, cmap: ComponentMap, patch: Patch, gains: dict[str, float],
                 probe: BlockInputs) -> float:
    """Max |logit difference| between the fit's hooks at `gains` and the saved patch applied to the weights."""
    hooks = GainHooks(cmap, list(gains), probe.args[0].device)
    hooks.set(gains)
    with hooks:
        hooked = replay_logits(cmap, probe, last_only=True)
    with apply_patch(model, patch):
        out = model(input_ids=probe.batch.input_ids, attention_mask=probe.batch.attention_mask, use_cache=False)
        rows = torch.arange(len(probe.batch), device=out.logits.device)
        applied = out.logits[rows, probe.batch.last].float()
    return float((hooked - applied).abs().max())


def learn_patch(s: Loaded, c: Collected, selected: list[str], rule: str, config: AnalysisConfig, command: str,
                facts_sha: str) -> tuple[Patch, PatchInfo]:
    """Step 5: fit the gains (train; early stopping on dev), fit the temperature baseline, check the patch."""
    known, cmap, dev = s.known, s.cmap, s.device
    train_rows, dev_rows = known.rows("train"), known.rows("dev")
    recalled = c.before.rank <= config.recall_rank
    fit_config = FitConfig(**{**asdict(config.fit), "seed": config.seed})

    def facts_in(rows: torch.Tensor) -> list[BlockInputs]:
        return block_inputs(s.lm, cmap, [known.token_ids[i] for i in rows], s.pad, config.batch_size, dev,
                            answers=known.answers[rows], recalled=recalled[rows])

    def nonce_in(split: str, seed: int) -> tuple[list[BlockInputs], list[Fact]]:
        made_up = nonce_facts([known.facts[i] for i in known.rows(split)], config.nonce_per_template, seed)
        if not made_up:
            return [], []
        n = len(made_up)  # no answer: guarded only (recalled False), the target is never read
        batches_in = block_inputs(s.lm, cmap, encode(s.tokenizer, [f.prompt for f in made_up]), s.pad,
                                  config.batch_size, dev, answers=torch.zeros(n, dtype=torch.long),
                                  recalled=torch.zeros(n, dtype=torch.bool))
        return batches_in, made_up

    nonce_train, made_up_train = nonce_in("train", config.seed)
    nonce_dev, made_up_dev = nonce_in("dev", config.seed + 1)
    train_in, dev_in = facts_in(train_rows) + nonce_train, facts_in(dev_rows) + nonce_dev
    neutral_in = block_inputs(s.lm, cmap, encode(s.tokenizer, s.neutral_fit), s.pad, config.batch_size, dev)
    fit = fit_gains(s.lm, cmap, selected, train_in, dev_in, neutral_in, fit_config, progress=config.progress)
    # 4 decimals: far below the fit's own noise, and the patch then does not depend on float summation order
    # (thread count, device), so the same seed gives the same patch file.
    gains = {name: round(g, GAIN_DECIMALS) for name, g in fit.gains.items()}
    temperature = cal.fit_temperature(logit_chunks(cmap, c.x_final[train_rows], known.answers[train_rows],
                                                   config.batch_size, dev))
    _log(config.progress, f"gains {', '.join(f'{k}={v:.3f}' for k, v in gains.items())} (best epoch "
                          f"{fit.best_epoch}/{fit.epochs_run}); temperature baseline T={temperature:.3f}")
    patch = make_patch(s.lm, gains, command=command, dataset_sha256=facts_sha)
    max_error = verify_patch(s.lm, cmap, patch, gains, dev_in[0])
    tolerance = 1e-3 if s.dtype == torch.float32 else 0.25
    if max_error > tolerance:
        raise AnalysisError(f"the saved patch does not reproduce the fitted gains (max logit error {max_error:.3g})")
    effects = torch.stack([c.final_effect[train_rows, c.final_names.index(n)] if n in c.final_names
                           else c.neuron_effect[train_rows, cmap.validate(n).index] for n in selected], dim=1)
    info = PatchInfo(
        file="patch.json", id=patch.id, selection_rule=rule,
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


class Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = round(time.perf_counter() - start, 2)


def _log(progress: bool, message: str) -> None:
    if progress:
        tqdm.write(f"[analyze] {message}")


def model_info(s: Loaded, model: str | Path) -> ModelInfo:
    shape = s.cmap.shape
    return ModelInfo(path=str(model), architecture=shape.architecture, num_layers=shape.num_layers,
                     num_heads=shape.num_heads, head_dim=shape.head_dim, hidden_size=shape.hidden_size,
                     intermediate_size=shape.intermediate_size, vocab_size=shape.vocab_size,
                     dtype=str(s.dtype).removeprefix("torch."), device=f"{s.device} ({platform.machine()})")


def data_info(s: Loaded, facts: str | Path, facts_sha: str, splits: dict[str, int], lens: LogitLens,
              seed: int) -> DataInfo:
    return DataInfo(facts_path=str(facts), facts_sha256=facts_sha, n_facts=len(s.known.facts),
                    n_dropped=s.known.dropped, splits=splits,
                    relations={r: curve.n for r, curve in lens.by_relation.items()},
                    unknown_path=str(s.unknown_path) if s.unknown_path else None,
                    n_unknown=len(s.unknown.facts) if s.unknown else 0, neutral_source=s.neutral_source,
                    n_neutral_fit=len(s.neutral_fit), n_neutral_eval=len(s.neutral_eval), seed=seed)


def run_analysis(
    model: str | Path,
    facts: str | Path,
    out: str | Path,
    *,
    unknown: str | Path | None = None,
    neutral: str | Path | None = None,
    config: AnalysisConfig | None = None,
    command: str = "",
    force: bool = False,
) -> AnalysisResult:
    """Analyse `model` on `facts`, learn the patch, and write RUN/{analysis.json, patch.json, report.md, *.png}.

    `unknown`/`neutral` default to MODEL/unknown_facts.jsonl and MODEL/neutral.txt when present. Returns the
    analysis. The run directory appears only when everything succeeded. `config`: `AnalysisConfig()` if None.
    """
    from .plots import write_plots  # matplotlib is imported only when a report is written
    from .report import write_markdown

    config = config or AnalysisConfig()
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists (pass --force to replace it)")
    timer = Timer()
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    with timer("load"):
        s = load_inputs(model, facts, unknown, neutral, config)
    shape, known = s.cmap.shape, s.known
    facts_sha = dataset_sha256(known.facts)
    splits = {split: int(len(known.rows(split))) for split in ("train", "dev", "test")}
    _log(config.progress, f"{shape.architecture}, {shape.num_layers} layers x {shape.num_heads} heads on "
                          f"{s.device} ({s.dtype}); {len(known.facts)} facts {splits}, "
                          f"{len(s.unknown.facts) if s.unknown else 0} unknown")

    with timer("analysis pass"):
        c = collect(s.lm, s.cmap, known.token_ids, known.answers, pad=s.pad, batch_size=config.batch_size,
                    subjects=known.subjects, mechanisms=True, progress=config.progress, desc="facts")
    described = describe(s, c, config)
    _log(config.progress, described.verdict.text)

    selected, rule = choose_components(s, c, config)
    patch, patch_info, evaluation = None, None, None
    if selected:
        with timer("fit"):
            patch, patch_info = learn_patch(s, c, selected, rule, config, command, facts_sha)
        with timer("evaluation"):
            runs = run_patched(s, patch, config)
        with timer("bootstrap"):
            evaluation = evaluate(s, c, runs, patch_info.temperature, config)
        patch = patch.model_copy(update={"metrics": patch_metrics(evaluation, patch_info.temperature)})
    else:
        _log(config.progress, "no final-layer component suppresses the answer on the train split: no patch")

    result = AnalysisResult(
        schema_version=SCHEMA_VERSION, tool_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=command,
        model=model_info(s, model), data=data_info(s, facts, facts_sha, splits, described.logit_lens, config.seed),
        logit_lens=described.logit_lens, final_layer=described.final_layer, mechanisms=described.mechanisms,
        verdict=described.verdict, patch=patch_info, evaluation=evaluation,
        criteria=evaluate_criteria(described.verdict, evaluation), runtime_s={}, files={},
    )
    with atomic_directory(out, overwrite=force) as scratch:
        with timer("plots"):
            plots = write_plots(scratch, result)
        timer.times["total"] = round(time.perf_counter() - started, 2)
        files = {"analysis": "analysis.json", "report": "report.md", **({"patch": "patch.json"} if patch else {}),
                 **plots}
        result = result.model_copy(update={"runtime_s": dict(timer.times), "files": files})
        if patch is not None:
            patch.save(scratch / "patch.json")
        atomic_write_text(scratch / "analysis.json", result.model_dump_json(indent=2) + "\n")
        write_markdown(scratch, result)
    _log(config.progress, f"wrote {out / 'report.md'}")
    return result


__all__ = ["AnalysisConfig", "AnalysisError", "FactsFormatError", "run_analysis"]
