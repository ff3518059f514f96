"""`run_analysis`: the recipe of a run, model + facts -> RUN/{analysis.json, patch.json, report.md, *.png}.

Steps (numbers in analysis.json under the same names; where they are computed in brackets, folders of
analysis/ in the order a run flows: data -> mechanism -> learn -> evaluate -> report):

0. inputs         the model, the facts and their splits, unknown subjects, neutral text  [data.inputs]
   one pass       every fact through the model once, kept per prompt as a few numbers    [mechanism.collect]
1. logit_lens     p(answer) and rank after every layer, per relation (all facts)         [mechanism.summaries]
2. final_layer    DLA and effect on log p(answer) of every final-block component, its top
                  neurons (all facts)                                                    [mechanism.summaries]
3. mechanisms     mover heads, and each MLP regressed on its block's heads (all facts)   [mechanism.summaries]
4. findings       the headline at two levels on the test split, with intervals: the share of prompts where
                  the final block lowers p(answer) and its rescale term; each final-block component's
                  share of prompts where it lowers p(answer) and its mean effect         [mechanism.summaries]
5. patch          --method gains: gains on the final-block components that suppress the answer on the
                  *train* split, fitted through the real forward pass, early-stopped on dev, the saved
                  patch checked against the fitted gains                                 [learn.gains]
   intercept      --method intercept: the paper's fix, the final MLP's intercept fitted on train and
                  removed (a bias edit); `both` (default): both, patch.json the lower dev NLL  [learn.methods]
   temperature    the baseline every patch is measured against (T fitted on train)       [learn.temperature]
6. evaluation     each patch applied with `apply_patch`, on the test split (and per relation), the unknown
                  subjects and held-out neutral text, in one table with the base model and temperature
                  scaling, with cluster-bootstrap intervals; the patches edit the final block only, so the
                  blocks below run once and each model replays the final block  [evaluate.passes, .evaluation]
   calibration    per variant (base, each patch): a confidence calibrator, its family chosen on dev prompts held
                  out by relation, fitted on dev, measured on test -> calibration.json  [learn.calibrators,
                  evaluate.confidence]
7. checks         only those asked for (--require): findings against thresholds          [evaluate.require]
8. report         report.md and its plots, rendered from the typed result   [report.markdown, report.plots]

Settings: `config.AnalysisConfig`. Every section is a `schema` model from where it is computed; the report
renders the `AnalysisResult` this returns.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from recallfix.patches import ComponentMap, Patch, __version__
from recallfix.patches.calibrator import CalibrationFile
from recallfix.patches.io import atomic_directory, atomic_write_text
from recallfix.patches.registry.models import resolve_model

from .config import AnalysisConfig
from .data.facts import FactsFormatError, dataset_sha256
from .data.inputs import AnalysisError, Loaded, load_inputs
from .data.sets import resolve_facts
from .evaluate.amplified import amplified_components
from .evaluate.confidence import calibrate
from .evaluate.evaluation import evaluate, patch_metrics
from .evaluate.passes import capture_inputs, replay_dist, run_model
from .evaluate.require import finding_values, load_checks, run_checks
from .learn.gains import fit_inputs, learn_patch
from .learn.methods import choose, file_names, intercept_method, intercept_refusal, method_info
from .learn.temperature import fit_baseline_temperature
from .mechanism.attribution import select_suppressors, summarize, top_neurons
from .mechanism.collect import Collected, collect
from .mechanism.summaries import describe, neuron_names
from .progress import log
from .records import Dist
from .schema import (
    SCHEMA_VERSION,
    AnalysisResult,
    CalibrationSummary,
    DataInfo,
    FactsCleaning,
    LogitLens,
    ModelInfo,
    PatchInfo,
)

# The gain fits and the upper bound of their gains (None: `FitConfig.max_gain`). "suppress" is the paper's and
# PEAR's form: the suppressors can only be scaled down.
GAIN_FITS: dict[str, float | None] = {"gains": None, "suppress": 1.0}


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
    selected, left_out = without_normalised_mlp(s.cmap, selected)
    return selected, rule + left_out


def without_normalised_mlp(cmap: ComponentMap, selected: list[str]) -> tuple[list[str], str]:
    """`selected` without a whole MLP that a norm follows (Gemma 3): that norm divides out any scale of the MLP's
    whole output, so a gain there would change nothing. The second item says so for the rule ("" if kept)."""
    dropped = [n for n in selected if cmap.validate(n).kind == "mlp" and cmap.post_mlp_norm(cmap.validate(n).layer)]
    if not dropped:
        return selected, ""
    return [n for n in selected if n not in dropped], (
        f"; {', '.join(dropped)} left out: a norm follows it, so a gain on its whole output changes nothing "
        "(--mlp neurons gives its neurons gains)")


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


def model_info(s: Loaded, model: str | Path) -> ModelInfo:
    shape = s.cmap.shape
    return ModelInfo(path=str(model), architecture=shape.architecture, num_layers=shape.num_layers,
                     num_heads=shape.num_heads, head_dim=shape.head_dim, hidden_size=shape.hidden_size,
                     intermediate_size=shape.intermediate_size, vocab_size=shape.vocab_size,
                     dtype=str(s.dtype).removeprefix("torch."), device=f"{s.device} ({platform.machine()})")


def data_info(s: Loaded, facts: str | Path, facts_sha: str, splits: dict[str, int], lens: LogitLens,
              config: AnalysisConfig) -> DataInfo:
    return DataInfo(facts_path=str(facts), facts_sha256=facts_sha, n_facts=len(s.known.facts),
                    n_dropped=s.known.dropped, splits=splits,
                    relations={r: curve.n for r, curve in lens.by_relation.items()},
                    unknown_path=str(s.unknown_path) if s.unknown_path else None,
                    unknown_source=s.unknown_source, n_unknown=len(s.unknown.facts) if s.unknown else 0,
                    neutral_source=s.neutral_source,
                    n_neutral_fit=len(s.neutral_fit), n_neutral_eval=len(s.neutral_eval), seed=config.seed,
                    templates=config.templates, split_by=config.split_by,
                    selected_relations=list(config.relations) if config.relations else None,
                    split_relations={split: sorted({f.relation or "(none)" for f in s.known.facts if f.split == split})
                                     for split in splits},
                    cleaning=[FactsCleaning(**c.as_dict()) for c in s.cleaning])


def calibrate_variants(s: Loaded, dev: dict[str, Dist], test: dict[str, Dist], patches: dict[str, Patch],
                       facts: str | Path, config: AnalysisConfig, command: str, recommended: str | None,
                       ) -> tuple[CalibrationFile, CalibrationSummary]:
    """calibration.json's calibrators (base and each patch), fitted on dev, and what they do on test."""
    known, groups = s.known, s.known.groups
    relation_of = [f.relation or "(none)" for f in known.facts]
    dev_rows, test_rows = known.rows("dev").tolist(), known.rows("test").tolist()
    dev_relations = [relation_of[i] for i in dev_rows]
    fitted_on = (f"the dev split of {facts} ({len(dev_rows)} prompts, {len(set(dev_relations))} relations; "
                 f"--split-by {config.split_by}, seed {config.seed})")
    return calibrate(s.lm, dev, test, patches, dev_relations, [groups[i] for i in dev_rows],
                     [relation_of[i] for i in test_rows], [groups[i] for i in test_rows], fitted_on, config.n_boot,
                     config.seed, command, recommended)


def inputs_key(model: str | Path, facts: str | Path, unknown: str | Path | None, neutral: str | Path | None,
               config: AnalysisConfig) -> str:
    """sha256 of what a run's files depend on: the recallfix version, the model's files (name, size, mtime), the
    bytes of the facts, unknown and neutral files, and every setting (progress aside)."""
    h = hashlib.sha256(f"recallfix {__version__}\n".encode())
    model_dir = resolve_model(model)
    for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
        stat = path.stat()
        h.update(f"model {path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    for label, given in (("facts", resolve_facts(facts)), ("unknown", unknown), ("neutral", neutral)):
        root = Path(given) if given is not None else None
        files = sorted(root.rglob("*")) if root is not None and root.is_dir() else [root] if root else []
        for path in (f for f in files if f is not None and f.is_file()):
            h.update(f"{label} {path.name} ".encode() + hashlib.sha256(path.read_bytes()).digest())
    settings = {k: v for k, v in asdict(config).items() if k != "progress"}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def mechanism_sample(n: int, size: int, seed: int) -> torch.Tensor | None:
    """The rows (sorted) of a seeded sample of `size` of `n` prompts; None (all of them) when size is 0 or >= n."""
    if size <= 0 or size >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


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
    from .report.markdown import write_markdown
    from .report.plots import write_plots  # matplotlib is imported only when a report is written

    config = config or AnalysisConfig()
    checks = load_checks(config.require or ())  # a malformed check fails before the long run
    key = inputs_key(model, facts, unknown, neutral, config)
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
    log(config.progress, f"{shape.architecture}, {shape.num_layers} layers x {shape.num_heads} heads on "
                          f"{s.device} ({s.dtype}); {len(known.facts)} facts {splits}, "
                          f"{len(s.unknown.facts) if s.unknown else 0} unknown")

    with timer("analysis pass"):
        c = collect(s.lm, s.cmap, known.token_ids, known.answers, pad=s.pad, batch_size=config.batch_size,
                    subjects=known.subjects, mechanisms=True, progress=config.progress, desc="facts",
                    sample=mechanism_sample(len(known.facts), config.mechanism_prompts, config.seed))
    described = describe(s, c, config)
    log(config.progress, described.findings.text)

    patches: dict[str, Patch] = {}
    fitted: dict[str, PatchInfo] = {}  # the gain fits: free ("gains") and bounded to [0, 1] ("suppress")
    intercept_info = None
    with timer("temperature fit"):
        temperature = fit_baseline_temperature(s, c, config)
    gain_fits = [m for m in config.methods if m in GAIN_FITS]
    if gain_fits:
        selected, rule = choose_components(s, c, config)
        if selected:
            fit_in = fit_inputs(s, c, config)
            for name in gain_fits:
                with timer("fit" if name == "gains" else f"{name} fit"):
                    patches[name], fitted[name] = learn_patch(s, c, fit_in, selected, rule, config, command,
                                                              facts_sha, temperature, max_gain=GAIN_FITS[name])
        else:
            log(config.progress, "no final-layer component suppresses the answer on the train split: no gains")
    if "intercept" in config.methods and (not_applicable := intercept_refusal(s)) is not None:
        log(config.progress, not_applicable)  # e.g. Gemma 3: no intercept candidate, the other methods go on
    elif "intercept" in config.methods:
        with timer("intercept fit"):
            patches["intercept"], intercept_info = intercept_method(s, c, command, facts_sha)
    evaluation, files_of, calibration = None, {}, None
    if patches:
        with timer("evaluation"):
            inputs = capture_inputs(s, c, config)
            base_dev = replay_dist(s.lm, s.cmap, inputs.dev, None)
            dev = {"base": base_dev, **{name: replay_dist(s.lm, s.cmap, inputs.dev, p) for name, p in patches.items()}}
            groups = known.groups
            dev_groups = [groups[i] for i in known.rows("dev")]
            methods = [method_info(s, name, patch, dev[name], base_dev, dev_groups, config.n_boot, config.seed)
                       for name, patch in patches.items()]
            chosen, choice = choose(methods)
            files_of = file_names(methods, chosen)
            methods = [m.model_copy(update={"file": files_of[m.name]}) for m in methods]
            log(config.progress, f"patch.json: {choice}" if chosen else choice)
            base_runs = run_model(s, inputs, None)
            runs = {name: run_model(s, inputs, patch) for name, patch in patches.items()}
        with timer("bootstrap"):
            evaluation = evaluate(s, c, inputs, base_runs, runs, temperature, methods, chosen, choice,
                                  float(base_dev.nll.double().mean()), config)
        with timer("amplified paths"):
            test_groups = [groups[i] for i in known.rows("test")]
            evaluation = evaluation.model_copy(update={"amplified": {
                name: amplified_components(s.cmap, inputs.test, info.gains, test_groups, config.n_boot, config.seed)
                for name, info in fitted.items()}})
        with timer("confidence calibration"):
            test = {"base": base_runs.test, **{name: r.test for name, r in runs.items()}}
            calibration, summary = calibrate_variants(s, dev, test, patches, facts, config, command, chosen)
            evaluation = evaluation.model_copy(update={"calibration": summary})
        patches = {name: p.model_copy(update={"metrics": patch_metrics(evaluation, name)})
                   for name, p in patches.items()}
        fitted = {name: info.model_copy(update={"file": files_of[name]}) for name, info in fitted.items()}
        if intercept_info is not None:
            intercept_info = intercept_info.model_copy(update={"file": files_of["intercept"]})

    values = finding_values(described.findings, evaluation)
    result = AnalysisResult(
        schema_version=SCHEMA_VERSION, tool_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=command, inputs_key=key,
        model=model_info(s, model), data=data_info(s, facts, facts_sha, splits, described.logit_lens, config),
        logit_lens=described.logit_lens, final_layer=described.final_layer, mechanisms=described.mechanisms,
        findings=described.findings, patch=fitted.get("gains"), suppress=fitted.get("suppress"),
        intercept=intercept_info, evaluation=evaluation,
        values=values, checks=run_checks(checks, values), runtime_s={}, files={},
    )
    with atomic_directory(out, overwrite=force) as scratch:
        with timer("plots"):
            plots = write_plots(scratch, result)
        timer.times["total"] = round(time.perf_counter() - started, 2)
        files = {"analysis": "analysis.json", "report": "report.md",
                 **{("patch" if f == "patch.json" else f"patch_{name}"): f for name, f in files_of.items()},
                 **({"calibration": "calibration.json"} if calibration is not None else {}), **plots}
        result = result.model_copy(update={"runtime_s": dict(timer.times), "files": files})
        for name, patch in patches.items():
            patch.save(scratch / files_of[name])
        if calibration is not None:
            calibration.save(scratch / "calibration.json")
        atomic_write_text(scratch / "analysis.json", result.model_dump_json(indent=2) + "\n")
        write_markdown(scratch, result)
    log(config.progress, f"wrote {out / 'report.md'}")
    return result


__all__ = ["AnalysisConfig", "AnalysisError", "FactsFormatError", "inputs_key", "run_analysis"]
