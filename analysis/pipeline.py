"""`run_analysis`: model + facts -> analysis.json, patch.json and report.md (the orchestration; the
math lives in lens, attribution, movers, regression, fit and calibration).

Steps (numbers in analysis.json under the same names):

1. logit_lens     p(answer) and rank after every layer, per relation (all facts).
2. final_layer    DLA and effect on log p(answer) of every final-block component, its top neurons (all facts).
3. mechanisms     mover heads, and each MLP regressed on its block's heads (all facts).
4. verdict        p(answer) before vs after the final block (test split and all), top suppressors.
5. patch          gains on the final-block components that suppress the answer on the *train* split,
                  fitted through the real forward pass, early-stopped on dev; then the saved patch is
                  applied with `apply_patch` and everything below is measured on the patched model.
6. evaluation     test split and unknown subjects: base, patched, temperature-scaled (T fitted on train),
                  with cluster-bootstrap intervals; NLL on held-out neutral text.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from recallfix.patches import ComponentMap, Patch, __version__, apply_patch, make_patch
from recallfix.patches.io import atomic_directory, atomic_write_text, load_causal_lm, resolve_model_dir

from . import calibration as cal
from .attribution import select_suppressors, summarize, top_neurons
from .batching import batches, encode, pad_id, subject_spans
from .collect import Collected, Dist, collect, token_nll
from .facts import (
    AnswerTokenError,
    Fact,
    FactsFormatError,
    answer_token_id,
    answer_token_ids,
    assign_splits,
    dataset_sha256,
    load_facts,
)
from .fit import BlockInputs, FitConfig, GainHooks, capture_final_block_inputs, fit_gains, replay_logits
from .lens import answer_stats, lens_logits
from .movers import summarize_movers
from .neutral_text import DEFAULT_NEUTRAL
from .nonce import nonce_facts
from .schema import SCHEMA_VERSION, AnalysisResult

GAIN_DECIMALS = 4
UNKNOWN_FILE = "unknown_facts.jsonl"  # looked for next to the model when --unknown is not given
NEUTRAL_FILE = "neutral.txt"


@dataclass(frozen=True)
class AnalysisConfig:
    seed: int = 0
    batch_size: int = 32
    device: str = "auto"  # auto: cuda when available
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA when supported
    max_facts: int | None = None  # subsample whole subjects, deterministically, for quick runs
    n_boot: int = 1000
    mlp: str = "whole"  # how the final MLP enters the patch: whole | neurons | none
    max_neurons: int = 32  # with mlp="neurons"
    min_share: float = 0.5  # a component suppresses when its effect is < 0 on average and on this share
    recall_rank: int = 1  # train facts with the answer at rank <= this before the final block are fitted
    nonce_per_template: int = 8  # made-up subjects per training template, guarded (0: no nonce guard)
    components: tuple[str, ...] | None = None  # fit gains on exactly these final-layer components instead
    report_neurons: int = 10
    min_attention: float = 0.3  # mover heads: mean attention to the subject at least this
    fit: FitConfig = field(default_factory=FitConfig)
    progress: bool = True


class AnalysisError(ValueError):
    """The analysis cannot run on these inputs (the message says which file and why)."""


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise AnalysisError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(table)}")
    return table[dtype]


def _group(f: Fact) -> str:
    return json.dumps([f.relation, f.subject if f.subject is not None else f.prompt])


def subsample(facts: Sequence[Fact], max_facts: int | None, seed: int) -> list[Fact]:
    """Whole subjects in a seeded order until max_facts prompts (input order kept)."""
    if max_facts is None or len(facts) <= max_facts:
        return list(facts)
    groups = sorted({_group(f) for f in facts}, key=lambda g: hashlib.sha256(f"{seed}\0{g}".encode()).hexdigest())
    size = {g: 0 for g in groups}
    for f in facts:
        size[_group(f)] += 1
    keep, total = set(), 0
    for g in groups:
        if total >= max_facts:
            break
        keep.add(g)
        total += size[g]
    return [f for f in facts if _group(f) in keep]


@dataclass
class Prompts:
    facts: list[Fact]
    token_ids: list[list[int]]
    answers: torch.Tensor
    subjects: list[list[int] | None]
    dropped: int

    @property
    def groups(self) -> list[str]:
        return [_group(f) for f in self.facts]

    def rows(self, split: str) -> torch.Tensor:
        return torch.tensor([i for i, f in enumerate(self.facts) if f.split == split], dtype=torch.long)


def prepare(tokenizer: Any, facts: Sequence[Fact], source: str) -> Prompts:
    """Token ids, answer token and subject positions of each fact; facts without an answer token are dropped."""
    try:
        kept, answers = list(facts), answer_token_ids(tokenizer, facts)
    except AnswerTokenError:  # find the culprits one by one
        kept, answers = [], []
        for f in facts:
            try:
                answers.append(answer_token_id(tokenizer, f.prompt, f.answer))
            except AnswerTokenError:
                continue
            kept.append(f)
    if not kept:
        raise AnalysisError(f"{source}: no fact has an answer token with this tokenizer")
    return Prompts(
        facts=kept,
        token_ids=encode(tokenizer, [f.prompt for f in kept]),
        answers=torch.tensor(answers, dtype=torch.long),
        subjects=subject_spans(tokenizer, [f.prompt for f in kept], [f.subject for f in kept],
                               [f.template for f in kept]),
        dropped=len(facts) - len(kept),
    )


def read_neutral(path: Path | None, model_dir: Path) -> tuple[list[str], str]:
    """Neutral lines and where they came from: the given file, the model's neutral.txt, or the built-in set."""
    if path is None and (model_dir / NEUTRAL_FILE).is_file():
        path = model_dir / NEUTRAL_FILE
    if path is None:
        return list(DEFAULT_NEUTRAL), "built-in (recallfix.analysis.neutral_text)"
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise AnalysisError(f"{path}: cannot read neutral text: {err}") from None
    if len(lines) < 2:
        raise AnalysisError(f"{path}: neutral text needs at least 2 non-empty lines, found {len(lines)}")
    return lines, str(path)


def split_neutral(lines: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
    """Half for the KL guard of the fit, half held out for the NLL check (seeded, by content)."""
    order = sorted(range(len(lines)), key=lambda i: hashlib.sha256(f"{seed}\0{i}\0{lines[i]}".encode()).hexdigest())
    half = len(order) // 2
    fit_rows, eval_rows = sorted(order[:half]), sorted(order[half:])
    return [lines[i] for i in fit_rows], [lines[i] for i in eval_rows]


# ------------------------------------------------------------------------------------------------
# Summaries (pure: tensors in, plain dicts out)
# ------------------------------------------------------------------------------------------------


def _num(x: float | torch.Tensor | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def lens_curve(p: torch.Tensor, rank: torch.Tensor) -> dict[str, Any]:
    if p.shape[0] == 0:
        return {"n": 0, "mean_p_answer": [], "median_rank": [], "accuracy": []}
    return {
        "n": int(p.shape[0]),
        "mean_p_answer": [_num(v) for v in p.mean(dim=0)],
        "median_rank": [_num(v) for v in rank.float().median(dim=0).values],
        "accuracy": [_num(v) for v in (rank == 1).float().mean(dim=0)],
    }


def component_rows(names: Sequence[str], dla: torch.Tensor | None, effect: torch.Tensor | None) -> list[dict]:
    n = len(names)
    dla_stats = summarize(dla, list(names)) if dla is not None else [None] * n
    eff_stats = summarize(effect, list(names)) if effect is not None else [None] * n
    rows = []
    for name, d, e in zip(names, dla_stats, eff_stats, strict=True):
        rows.append({
            "name": name,
            "mean_dla": _num(d.mean) if d else None, "std_dla": _num(d.std) if d else None,
            "share_dla_negative": _num(d.share_negative) if d else None,
            "mean_effect": _num(e.mean) if e else None,
            "share_effect_negative": _num(e.share_negative) if e else None,
        })
    return rows


def final_layer_summary(c: Collected, rows: torch.Tensor, layer: int, k: int) -> dict[str, Any]:
    idx = [c.names.index(n) for n in c.final_names]
    dla = c.dla[rows][:, idx]
    effect = c.final_effect[rows]
    suppressing = top_neurons(c.neuron_effect[rows], layer, k, most_negative=True)
    promoting = top_neurons(c.neuron_effect[rows], layer, k, most_negative=False)

    def neuron_rows(order: list[int]) -> list[dict]:
        return component_rows([f"L{layer}N{n}" for n in order], c.neuron_dla[rows][:, order],
                              c.neuron_effect[rows][:, order])

    return {
        "layer": layer,
        "n_prompts": int(len(rows)),
        "components": component_rows(c.final_names, dla, effect),
        "rescale": component_rows(["rescale"], c.rescale[rows][:, None], None)[0],
        "mean_change_logit": _num((dla.sum(dim=1) + c.rescale[rows]).mean()) if len(rows) else None,
        "mean_change_logp": _num((c.before.nll[rows] - c.output.nll[rows]).mean()) if len(rows) else None,
        "neurons_suppressing": neuron_rows(suppressing),
        "neurons_promoting": neuron_rows(promoting),
    }


def suppression(output: Dist, before: Dist, groups: Sequence[str], n_boot: int, seed: int) -> dict[str, Any]:
    """How the final block moves p(answer): before (lens of the stream entering it) vs after (the output)."""
    n = len(output.p_answer)
    suppressed = output.p_answer < before.p_answer
    recalled = before.correct
    shares = suppressed.double().numpy()
    boot = np.asarray([shares[rows].mean() for rows in cal.group_resamples(groups, n_boot, seed) if len(rows)])
    return {
        "n": n,
        "mean_p_before": _num(before.p_answer.mean()) if n else None,
        "mean_p_after": _num(output.p_answer.mean()) if n else None,
        "share_suppressed": _num(suppressed.float().mean()) if n else None,
        "share_suppressed_ci": list(cal.percentile_interval(boot)) if len(boot) else [None, None],
        "accuracy_before": _num(before.correct.float().mean()) if n else None,
        "accuracy_after": _num(output.correct.float().mean()) if n else None,
        "n_recalled": int(recalled.sum()),
        "share_suppressed_recalled": _num(suppressed[recalled].float().mean()) if recalled.any() else None,
    }


def mover_summary(c: Collected, min_attention: float, seed: int) -> dict[str, Any] | None:
    if c.attention is None or c.subject_attribution is None:
        return None
    has = ~torch.isnan(c.attention[:, 0, 0])
    attention, attribution = c.attention[has], c.subject_attribution[has]
    if attention.shape[0] == 0:
        return None
    heads = summarize_movers(attention, attribution, min_attention=min_attention)
    plotted = ([h for h in heads if h.is_mover] + [h for h in heads if not h.is_mover])[:4]  # movers first
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randperm(attention.shape[0], generator=generator)[:500]
    scatter = {}
    for h in plotted:
        layer, head = (int(x) for x in h.name[1:].split("H"))
        points = torch.stack([attention[sample, layer, head], attribution[sample, layer, head]], dim=1)
        scatter[h.name] = [[round(float(a), 5), round(float(b), 5)] for a, b in points]
    return {
        "n_prompts": int(attention.shape[0]),
        "min_attention": min_attention,
        "heads": [{"name": h.name, "mean_attention": _num(h.mean_attention),
                   "mean_subject_attribution": _num(h.mean_attribution), "correlation": _num(h.correlation),
                   "is_mover": h.is_mover} for h in heads],
        "movers": [h.name for h in heads if h.is_mover],
        "scatter": scatter,
    }


def regression_summary(c: Collected, cmap: ComponentMap) -> tuple[list[dict], str | None]:
    assert c.beta is not None and c.r2 is not None and c.intercept_dla is not None and c.intercept_rank is not None
    out = []
    for layer in range(cmap.shape.num_layers):
        beta = c.beta[:, layer]
        heads = []
        for h, name in enumerate(cmap.heads(layer)):
            b = beta[:, h]
            heads.append({"name": name, "mean_beta": _num(b.mean()), "median_beta": _num(b.median()),
                          "share_amplify": _num((b > 1).float().mean()), "share_erase": _num((b < 0).float().mean())})
        i_dla, i_rank = c.intercept_dla[:, layer], c.intercept_rank[:, layer]
        mlp = f"L{layer}MLP"
        out.append({
            "layer": layer, "name": mlp, "mean_r2": _num(c.r2[:, layer].mean()),
            "mean_mlp_dla": _num(c.dla[:, c.names.index(mlp)].mean()),
            "heads": heads,
            "intercept": {"mean_dla": _num(i_dla.mean()), "share_dla_positive": _num((i_dla > 0).float().mean()),
                          "median_answer_rank": _num(i_rank.float().median()),
                          "share_answer_top10": _num((i_rank <= 10).float().mean())},
        })
    best = max(out, key=lambda r: r["intercept"]["mean_dla"] if r["intercept"]["mean_dla"] is not None else -math.inf)
    answer_mlp = best["name"] if (best["intercept"]["mean_dla"] or 0) > 0 else None
    return out, answer_mlp


def verdict_text(test: dict[str, Any], top: Sequence[dict], final_layer: dict[str, Any]) -> tuple[bool, str]:
    share = test["share_suppressed"] or 0.0
    layer = final_layer["layer"]
    found = share > 0.5 and any((r["mean_effect"] or 0) < 0 for r in top)
    names = ", ".join(f"{r['name']} ({r['mean_effect']:+.3f} nats)" for r in top[:3]) or "none"
    if found:
        text = (f"The final block (layer {layer}) lowers p(answer) on {share:.0%} of held-out prompts "
                f"(mean {test['mean_p_before']:.3f} -> {test['mean_p_after']:.3f}; accuracy "
                f"{test['accuracy_before']:.1%} -> {test['accuracy_after']:.1%}). Top suppressing components "
                f"(mean effect on log p(answer)): {names}.")
        change, rescale = final_layer["mean_change_logit"], final_layer["rescale"]["mean_dla"]
        if change is not None and rescale is not None and change < 0 and rescale < 0:
            direct = change - rescale
            how = ("mostly by enlarging the residual stream, so that the final norm shrinks every logit already "
                   "there (a higher temperature)" if rescale < min(direct, 0) else
                   "mostly by writing against the answer")
            text += (f" It does so {how}: of the {change:+.2f} change of the answer's logit against the mean, the "
                     f"norm's rescaling accounts for {rescale:+.2f} and the components' direct writes for "
                     f"{direct:+.2f}.")
    else:
        text = (f"No final-layer suppression: the final block lowers p(answer) on only {share:.0%} of held-out "
                f"prompts. Most suppressing components: {names}.")
    return found, text


def outcomes(d: Dist) -> cal.Outcomes:
    return cal.Outcomes(
        confidence=d.confidence.double().numpy(), correct=d.correct.numpy(), p_answer=d.p_answer.double().numpy(),
        nll=d.nll.double().numpy(), brier=d.brier.double().numpy(),
    )


def _estimates(e: dict[str, cal.Estimate]) -> dict[str, dict[str, float | None]]:
    return {k: asdict(v) for k, v in e.items()}


def evaluate_set(models: dict[str, cal.Outcomes], groups: Sequence[str], n_boot: int, seed: int) -> dict[str, Any]:
    """Metrics with paired cluster-bootstrap intervals for base, patched and temperature on one prompt set."""
    resamples = cal.group_resamples(groups, n_boot, seed)
    samples = {name: cal.bootstrap_samples(o, resamples) for name, o in models.items()}
    return {
        "n": len(groups),
        "n_groups": len(set(groups)),
        "models": {name: _estimates(cal.estimates(o, samples[name])) for name, o in models.items()},
        "differences": {
            "patched_minus_base": _estimates(cal.differences(models["patched"], models["base"],
                                                             samples["patched"], samples["base"])),
            "patched_minus_temperature": _estimates(cal.differences(models["patched"], models["temperature"],
                                                                    samples["patched"], samples["temperature"])),
        },
        "reliability": {name: cal.reliability_bins(o.confidence, o.correct) for name, o in models.items()},
    }


# ------------------------------------------------------------------------------------------------
# Model-facing helpers
# ------------------------------------------------------------------------------------------------


def temperature_dist(cmap: ComponentMap, x_final: torch.Tensor, answers: torch.Tensor, temperature: float,
                     batch_size: int, device: torch.device) -> Dist:
    """The next-token numbers of softmax(logits / T), logits recomputed from the stored final residuals."""
    out = Dist.empty(len(answers))
    for start in range(0, len(answers), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(answers)))
        logits = lens_logits(cmap, x_final[rows].to(device))
        out.put(rows, answer_stats(logits, answers[rows].to(device), temperature))
    return out


def logit_chunks(cmap: ComponentMap, x_final: torch.Tensor, answers: torch.Tensor, batch_size: int,
                 device: torch.device) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    def chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad():
            for start in range(0, len(answers), batch_size):
                rows = slice(start, start + batch_size)
                yield lens_logits(cmap, x_final[rows].to(device)), answers[rows].to(device)
    return chunks


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


# ------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """The model and every prompt set, tokenised."""

    model_dir: Path
    lm: nn.Module
    tokenizer: Any
    cmap: ComponentMap
    device: torch.device
    dtype: torch.dtype
    pad: int
    known: Prompts
    unknown: Prompts | None
    unknown_path: Path | None
    neutral_fit: list[str]
    neutral_eval: list[str]
    neutral_source: str

    @property
    def final(self) -> int:
        return self.cmap.shape.num_layers - 1


def load_inputs(model: str | Path, facts: str | Path, unknown: str | Path | None, neutral: str | Path | None,
                config: AnalysisConfig) -> Loaded:
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model_dir = resolve_model_dir(model)
    lm, tokenizer = load_causal_lm(model_dir, dtype=dtype, device=device)
    known = prepare(tokenizer, subsample(assign_splits(load_facts(facts), seed=config.seed), config.max_facts,
                                         config.seed), str(facts))
    for split in ("train", "dev", "test"):
        if len(known.rows(split)) == 0:
            raise AnalysisError(f"{facts}: the {split} split is empty ({len(known.facts)} usable facts); "
                                "give more facts or explicit splits")
    unknown_path = Path(unknown) if unknown is not None else None
    if unknown_path is None and (model_dir / UNKNOWN_FILE).is_file():
        unknown_path = model_dir / UNKNOWN_FILE
    neutral_lines, neutral_source = read_neutral(Path(neutral) if neutral else None, model_dir)
    neutral_fit, neutral_eval = split_neutral(neutral_lines, config.seed)
    return Loaded(
        model_dir=model_dir, lm=lm, tokenizer=tokenizer, cmap=ComponentMap(lm), device=torch.device(device),
        dtype=dtype, pad=pad_id(tokenizer), known=known,
        unknown=prepare(tokenizer, load_facts(unknown_path), str(unknown_path)) if unknown_path else None,
        unknown_path=unknown_path, neutral_fit=neutral_fit, neutral_eval=neutral_eval,
        neutral_source=neutral_source,
    )


def describe(s: Loaded, c: Collected, config: AnalysisConfig) -> dict[str, Any]:
    """Steps 1-4 from the pass over every fact: logit lens, final block, mechanisms, verdict."""
    known, shape = s.known, s.cmap.shape
    by_relation: dict[str, list[int]] = {}
    for i, f in enumerate(known.facts):
        by_relation.setdefault(f.relation or "(none)", []).append(i)
    logit_lens = {
        "num_layers": shape.num_layers,
        "all": lens_curve(c.lens_p, c.lens_rank),
        "by_relation": {r: lens_curve(c.lens_p[rows], c.lens_rank[rows]) for r, rows in sorted(by_relation.items())},
    }
    final_layer = final_layer_summary(c, torch.arange(len(known.facts)), s.final, config.report_neurons)
    regression, answer_mlp = regression_summary(c, s.cmap)
    test_rows = known.rows("test")
    groups = known.groups
    test = suppression(c.output.take(test_rows), c.before.take(test_rows), [groups[i] for i in test_rows],
                       config.n_boot, config.seed)
    ranked = sorted((r for r in final_layer["components"] if r["mean_effect"] is not None),
                    key=lambda r: r["mean_effect"])
    top = [r for r in ranked if r["mean_effect"] < 0][:5]
    found, text = verdict_text(test, top, final_layer)
    return {
        "logit_lens": logit_lens,
        "final_layer": final_layer,
        "mechanisms": {"movers": mover_summary(c, config.min_attention, config.seed), "mlp_regression": regression,
                       "answer_mlp": answer_mlp},
        "verdict": {"test": test, "all": suppression(c.output, c.before, groups, config.n_boot, config.seed),
                    "top_suppressors": top,
                    "suppression_found": found, "text": text},
    }


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
    neuron_stats = summarize(c.neuron_effect[train][:, order], [f"L{s.final}N{n}" for n in order])
    selected = select_suppressors(final_stats, neuron_stats, mlp=config.mlp, min_share=config.min_share)
    rule = (f"final-block components whose direct effect on log p(answer) is < 0 on average and on >= "
            f"{config.min_share:.0%} of train prompts (heads; MLP: {config.mlp}"
            + (f", at most {config.max_neurons} neurons" if config.mlp == "neurons" else "") + ")")
    return selected, rule


def learn_patch(s: Loaded, c: Collected, selected: list[str], rule: str, config: AnalysisConfig, command: str,
                facts_sha: str) -> tuple[Patch, dict[str, Any]]:
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
    info = {
        "file": "patch.json", "id": patch.id, "selection_rule": rule,
        "candidates": component_rows(selected, None, effects),
        "gains": gains, "fit_config": asdict(fit_config),
        "n_train": int(len(train_rows)), "n_train_recalled": int(recalled[train_rows].sum()),
        "n_dev": int(len(dev_rows)),
        "n_nonce_train": len(made_up_train), "n_nonce_dev": len(made_up_dev),
        "nonce_examples": [f.prompt for f in made_up_train[:: max(1, len(made_up_train) // 5)]][:5],
        "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run, "stopped_early": fit.stopped_early,
        "history": [{k: (int(v) if k == "epoch" else _num(v)) for k, v in h.items()} for h in fit.history],
        "temperature": temperature, "verified": True, "max_verify_error": max_error,
    }
    return patch, info


def evaluate_patch(s: Loaded, c: Collected, patch: Patch, temperature: float, config: AnalysisConfig,
                   timer: Timer) -> dict[str, Any]:
    """Step 6: the patch applied to the weights (apply_patch) against the base model and the temperature
    baseline, on the test split, the unknown subjects and the held-out neutral lines."""
    known, cmap, dev = s.known, s.cmap, s.device
    test_rows = known.rows("test")
    bs, progress = config.batch_size, config.progress

    def run(prompts: Prompts, rows: torch.Tensor | None, desc: str) -> Collected:
        tokens = prompts.token_ids if rows is None else [prompts.token_ids[i] for i in rows]
        answers = prompts.answers if rows is None else prompts.answers[rows]
        return collect(s.lm, cmap, tokens, answers, pad=s.pad, batch_size=bs, progress=progress, desc=desc)

    neutral_tokens = encode(s.tokenizer, s.neutral_eval)
    with timer("evaluation"):
        with apply_patch(s.lm, patch):
            patched = run(known, test_rows, "test (patched)")
            patched_unknown = run(s.unknown, None, "unknown (patched)") if s.unknown else None
            patched_nll = token_nll(s.lm, neutral_tokens, pad=s.pad, batch_size=bs, progress=progress)
        base_unknown = run(s.unknown, None, "unknown") if s.unknown else None
        base_nll = token_nll(s.lm, neutral_tokens, pad=s.pad, batch_size=bs, progress=progress)
    with timer("bootstrap"):
        test = evaluate_set({
            "base": outcomes(c.output.take(test_rows)),
            "patched": outcomes(patched.output),
            "temperature": outcomes(temperature_dist(cmap, c.x_final[test_rows], known.answers[test_rows],
                                                     temperature, bs, dev)),
        }, [known.groups[i] for i in test_rows], config.n_boot, config.seed)
        unknown = None
        if s.unknown is not None and base_unknown is not None and patched_unknown is not None:
            unknown = evaluate_set({
                "base": outcomes(base_unknown.output),
                "patched": outcomes(patched_unknown.output),
                "temperature": outcomes(temperature_dist(cmap, base_unknown.x_final, s.unknown.answers,
                                                         temperature, bs, dev)),
            }, s.unknown.groups, config.n_boot, config.seed)
        neutral = neutral_summary(base_nll, patched_nll, config.n_boot, config.seed)
    return {"n_boot": config.n_boot, "test": test, "unknown": unknown, "neutral": neutral,
            "suppression_after_patch": suppression(patched.output, patched.before,
                                                   [known.groups[i] for i in test_rows], config.n_boot, config.seed)}


def run_analysis(
    model: str | Path,
    facts: str | Path,
    out: str | Path,
    *,
    unknown: str | Path | None = None,
    neutral: str | Path | None = None,
    config: AnalysisConfig = AnalysisConfig(),
    command: str = "",
    force: bool = False,
) -> AnalysisResult:
    """Analyse `model` on `facts`, learn the patch, and write RUN/{analysis.json, patch.json, report.md, *.png}.

    `unknown`/`neutral` default to MODEL/unknown_facts.jsonl and MODEL/neutral.txt when present. Returns the
    validated analysis. The run directory appears only when everything succeeded.
    """
    from .report import write_markdown, write_plots  # matplotlib is imported only when a report is written

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
    _log(config.progress, described["verdict"]["text"])

    selected, rule = choose_components(s, c, config)
    patch: Patch | None = None
    patch_info: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    if selected:
        with timer("fit"):
            patch, patch_info = learn_patch(s, c, selected, rule, config, command, facts_sha)
        evaluation = evaluate_patch(s, c, patch, patch_info["temperature"], config, timer)
        patch = patch.model_copy(update={"metrics": patch_metrics(evaluation, patch_info["temperature"])})
    else:
        _log(config.progress, "no final-layer component suppresses the answer on the train split: no patch")

    result_dict: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "model": {"path": str(model), "architecture": shape.architecture, "num_layers": shape.num_layers,
                  "num_heads": shape.num_heads, "head_dim": shape.head_dim, "hidden_size": shape.hidden_size,
                  "intermediate_size": shape.intermediate_size, "vocab_size": shape.vocab_size,
                  "dtype": str(s.dtype).removeprefix("torch."), "device": f"{s.device} ({platform.machine()})"},
        "data": {"facts_path": str(facts), "facts_sha256": facts_sha, "n_facts": len(known.facts),
                 "n_dropped": known.dropped, "splits": splits,
                 "relations": {r: c["n"] for r, c in described["logit_lens"]["by_relation"].items()},
                 "unknown_path": str(s.unknown_path) if s.unknown_path else None,
                 "n_unknown": len(s.unknown.facts) if s.unknown else 0,
                 "neutral_source": s.neutral_source, "n_neutral_fit": len(s.neutral_fit),
                 "n_neutral_eval": len(s.neutral_eval), "seed": config.seed},
        **described,
        "patch": patch_info,
        "evaluation": evaluation,
        "criteria": evaluate_criteria(described["verdict"], evaluation),
        "runtime_s": {},
        "files": {},
    }
    with atomic_directory(out, overwrite=force) as scratch:
        with timer("plots"):
            plots = write_plots(scratch, result_dict)
        timer.times["total"] = round(time.perf_counter() - started, 2)
        result_dict["runtime_s"] = dict(timer.times)
        result_dict["files"] = {"analysis": "analysis.json", "report": "report.md",
                                **({"patch": "patch.json"} if patch else {}), **plots}
        result = AnalysisResult.model_validate(result_dict)
        if patch is not None:
            patch.save(scratch / "patch.json")
        atomic_write_text(scratch / "analysis.json", result.model_dump_json(indent=2) + "\n")
        write_markdown(scratch, result.model_dump())
    _log(config.progress, f"wrote {out / 'report.md'}")
    return result


def neutral_summary(base: tuple[torch.Tensor, torch.Tensor], patched: tuple[torch.Tensor, torch.Tensor],
                    n_boot: int, seed: int) -> dict[str, Any]:
    """Per-token NLL on the held-out neutral lines, base vs patched, with a bootstrap over lines."""
    base_sum, counts = base[0].numpy(), base[1].numpy().astype(np.float64)
    patched_sum = patched[0].numpy()
    base_nll, patched_nll = base_sum.sum() / counts.sum(), patched_sum.sum() / counts.sum()
    rng = np.random.default_rng(seed)
    changes = []
    for _ in range(n_boot):
        rows = rng.integers(0, len(counts), size=len(counts))
        b, p = base_sum[rows].sum(), patched_sum[rows].sum()
        changes.append(p / b - 1)
    lo, hi = cal.percentile_interval(np.asarray(changes))
    return {"n_lines": int(len(counts)), "n_tokens": int(counts.sum()), "base_nll": float(base_nll),
            "patched_nll": float(patched_nll), "relative_change": float(patched_nll / base_nll - 1),
            "relative_change_ci": [_num(lo), _num(hi)]}


def patch_metrics(evaluation: dict, temperature: float) -> dict[str, float | None]:
    """The headline numbers stored in the patch file itself."""
    test, unknown, neutral = evaluation["test"], evaluation["unknown"], evaluation["neutral"]
    out: dict[str, float | None] = {"temperature_baseline": temperature}
    for model in ("base", "patched", "temperature"):
        for metric in ("accuracy", "mean_p_answer", "ece_equal_width", "nll"):
            out[f"test_{metric}_{model}"] = test["models"][model][metric]["value"]
    if unknown is not None:
        for model in ("base", "patched"):
            out[f"unknown_mean_confidence_{model}"] = unknown["models"][model]["mean_confidence"]["value"]
    out["neutral_nll_relative_change"] = neutral["relative_change"]
    return out


def evaluate_criteria(verdict: dict, evaluation: dict | None) -> list[dict[str, Any]]:
    """The issue's acceptance checks, passed or failed on the point estimates (with their 95% intervals)."""
    def row(name: str, description: str, estimate: dict | tuple, threshold: float,
            ok: Callable[[float], bool]) -> dict:
        value, lo, hi = (estimate["value"], estimate["ci_low"], estimate["ci_high"]) if isinstance(estimate, dict) \
            else estimate
        return {"name": name, "description": description, "value": value, "ci_low": lo, "ci_high": hi,
                "threshold": threshold, "passed": None if value is None else bool(ok(value))}

    test = verdict["test"]
    rows = [row("final_layer_suppresses", "share of test prompts where the final block lowers p(answer) >= 0.80",
                (test["share_suppressed"], *test["share_suppressed_ci"]), 0.8, lambda v: v >= 0.8)]
    if evaluation is None:
        return rows
    base, temp = evaluation["test"]["differences"]["patched_minus_base"], \
        evaluation["test"]["differences"]["patched_minus_temperature"]
    rows += [
        row("patch_raises_accuracy", "test accuracy: patched - base > 0", base["accuracy"], 0.0, lambda v: v > 0),
        row("patch_raises_p_answer", "test mean p(answer): patched - base > 0", base["mean_p_answer"], 0.0,
            lambda v: v > 0),
        row("patch_lowers_ece", "test ECE (15 equal-width bins): patched - base < 0", base["ece_equal_width"], 0.0,
            lambda v: v < 0),
        row("patch_beats_temperature_accuracy", "test accuracy: patched - temperature-scaled > 0",
            temp["accuracy"], 0.0, lambda v: v > 0),
    ]
    if evaluation["unknown"] is not None:
        rows.append(row("unknown_confidence", "unknown subjects: mean top-1 probability, patched - base <= 0.05",
                        evaluation["unknown"]["differences"]["patched_minus_base"]["mean_confidence"], 0.05,
                        lambda v: v <= 0.05))
    if evaluation["neutral"] is not None:
        neutral = evaluation["neutral"]
        rows.append(row("neutral_nll", "neutral text NLL per token: relative rise <= 2%",
                        (neutral["relative_change"], *neutral["relative_change_ci"]), 0.02, lambda v: v <= 0.02))
    return rows


__all__ = ["AnalysisConfig", "AnalysisError", "FactsFormatError", "run_analysis"]
