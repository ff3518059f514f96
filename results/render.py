"""docs/results.md from the runs `make_results` made: every number read from their analysis.json, run.json and
served.json files (typed: `AnalysisResult`, `RunRecord`, `ServedCheck`), nothing typed in by hand."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from recallfix.analysis.calibration import ece_floor
from recallfix.analysis.learn.methods import choose
from recallfix.analysis.report.format import MODEL_LABELS, estimate, md_table, number, percent
from recallfix.analysis.schema import AnalysisResult, EstimateModel, Evaluation
from recallfix.patches.calibrator import FAMILIES
from recallfix.patches.io import atomic_write_text
from recallfix.patches.registry.models import load_registry

ROOT = Path(__file__).resolve().parents[1]
PLAN = Path(__file__).with_name("plan.json")
PAGE = ROOT / "docs" / "results.md"
MEASURES = (("accuracy", "accuracy"), ("mean_p_answer", "mean p(answer)"), ("nll", "NLL"),
            ("ece_equal_width", "ECE"), ("brier", "Brier"))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Protocol(Strict):
    facts: str
    split_by: str
    title: str
    options: list[str] = Field(default_factory=list, description="further `recallfix analyze` options")


class ModelPlan(Strict):
    protocols: list[str] | None = Field(default=None, description="the protocols run on it (null: all)")
    max_facts: dict[str, int] = Field(default_factory=dict, description="protocol -> cap on the prompts")
    served: str | None = Field(description="the protocol whose run is served and compared, or null")
    serve_dtype: str = Field(default="float32", pattern="^(float32|bfloat16)$",
                             description="the served engines' dtype: bfloat16 where two float32 engines (base and "
                                         "merged patch) do not fit the machine's memory")


class Goal(Strict):
    protocol: str
    max_unknown_top1_rise: float
    max_neutral_nll_rise: float


class Plan(Strict):
    about: str
    analyze_options: list[str]
    protocols: dict[str, Protocol]
    models: dict[str, ModelPlan]
    goal: Goal

    @classmethod
    def load(cls, path: Path) -> Plan:
        try:
            plan = cls.model_validate_json(path.read_text())
        except ValidationError as err:
            first = err.errors()[0]
            raise SystemExit(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        for name, model in plan.models.items():
            for protocol in [*(model.protocols or []), *model.max_facts, *([model.served] if model.served else [])]:
                if protocol not in plan.protocols:
                    raise SystemExit(f"{path}: models.{name}: unknown protocol {protocol!r} "
                                     f"({', '.join(plan.protocols)})")
        return plan

    def runs(self, model: str, protocols: list[str]) -> list[str]:
        """The protocols of `protocols` that `model` is run on."""
        mine = self.models[model].protocols
        return [p for p in protocols if mine is None or p in mine]


class RunRecord(Strict):
    model: str
    protocol: str
    run: str
    wall_s: float
    peak_gib: float
    commit: str | None = Field(None, description="the code that made the run (records of older runs have none)")


class ServedCheck(Strict):
    run_key: str = Field(description="the inputs key of the run it served: a newer run is served again")
    model: str
    run: str
    method: str = Field(description="the candidate served as the patched variant")
    dtype: str = Field(default="float32", description="the served engines' dtype (the analysis ran in float32)")
    n: int
    wall_s: float
    max_abs_difference: dict[str, float] = Field(description="'variant metric' -> |served - analysis|")


def _why(ev: Evaluation) -> str:
    """Why this candidate or none, in the words of today's `choose` from the run's own dev numbers (a cached run
    keeps the words of its time in ev.choice)."""
    return choose(ev.methods)[1]


def _goal(ev: Evaluation, goal: Goal) -> tuple[bool, str]:
    """Whether the recommended patch meets the goal on this run's test split, and why (not)."""
    if ev.chosen is None:
        return False, f"no patch recommended ({_why(ev)})"
    diff = ev.test.differences[f"{ev.chosen}_minus_base"]
    nll, acc = diff["nll"], diff["accuracy"]
    misses = []
    if nll.ci_high is None or nll.ci_high >= 0:
        misses.append(f"NLL {estimate(nll, '+.3f')} does not lie below 0")
    if acc.ci_high is not None and acc.ci_high < 0:
        misses.append(f"accuracy {estimate(acc, '+.3f')} falls")
    if ev.unknown is not None:
        rise = ev.unknown.differences[f"{ev.chosen}_minus_base"]["mean_confidence"].value or 0.0
        if rise > goal.max_unknown_top1_rise:
            misses.append(f"unknown-subject top-1 rises by {rise:+.3f}")
    neutral = ev.neutral[ev.chosen].relative_change
    if neutral > goal.max_neutral_nll_rise:
        misses.append(f"neutral-text NLL rises by {neutral:+.2%}")
    return not misses, "; ".join(misses) or (f"{ev.chosen}: NLL {estimate(nll, '+.3f')}, accuracy "
                                             f"{estimate(acc, '+.3f')}, neutral NLL {neutral:+.2%}")


def _table(ev: Evaluation) -> str:
    models = ["base", *(m.name for m in ev.methods), "temperature"]
    rows = [[label, *(estimate(ev.test.models[k][metric]) for k in models),
             *(estimate(ev.test.differences[f"{m.name}_minus_base"][metric], "+.3f") for m in ev.methods)]
            for metric, label in MEASURES]
    if ev.unknown is not None:
        rows.append(["unknown subjects: top-1 probability",
                     *(estimate(ev.unknown.models[k]["mean_confidence"]) for k in models),
                     *(estimate(ev.unknown.differences[f"{m.name}_minus_base"]["mean_confidence"], "+.3f")
                       for m in ev.methods)])
    neutral = [ev.neutral[m.name] for m in ev.methods]
    if neutral:
        rows.append(["neutral text: NLL per token", f"{neutral[0].base_nll:.4f}",
                     *(f"{n.patched_nll:.4f}" for n in neutral), "",
                     *(f"{n.relative_change:+.2%} [{percent(n.relative_change_ci[0])}, "
                       f"{percent(n.relative_change_ci[1])}]" for n in neutral)])
    header = ["test split", *(MODEL_LABELS[k] + (" (recommended)" if k == ev.chosen else "") for k in models),
              *(f"{m.name} − base" for m in ev.methods)]
    return md_table(header, rows)


def _relations(ev: Evaluation) -> str:
    chosen = ev.chosen or min(ev.methods, key=lambda m: m.dev_nll).name
    rows = []
    for relation, r in ev.by_relation.items():
        diff = r.differences[f"{chosen}_minus_base"]
        rows.append([relation, str(r.n), *(estimate(r.models["base"][m]) for m in ("accuracy", "mean_p_answer")),
                     *(estimate(diff[m], "+.3f") for m in diff)])
    first = next(iter(ev.by_relation.values()), None)
    metrics = list(first.differences[f"{chosen}_minus_base"]) if first else []
    return md_table(["test relation", "prompts", "base accuracy", "base mean p(answer)",
                     *(f"{chosen} − base: {m}" for m in metrics)], rows)


def _section(plan: Plan, model: str, protocol: str, d: AnalysisResult, record: RunRecord) -> list[str]:
    p, cap = plan.protocols[protocol], plan.models[model].max_facts.get(protocol)
    out = [f"\n### {model}: {p.title}\n",
           f"{d.data.n_facts} prompts ({', '.join(f'{k} {v}' for k, v in d.data.splits.items())})"
           + (f", capped at {cap} (`--max-facts`, whole subjects)" if cap else "")
           + f". Run: {record.wall_s / 60:.1f} min, peak {record.peak_gib:.1f} GiB"
           + (f", commit {record.commit}" if record.commit else "") + f", made {d.created[:16].replace('T', ' ')}.\n",
           f"**Findings.** {d.findings.text}\n"]
    ev = d.evaluation
    if ev is None:
        return [*out, "No candidate patch was fitted: no final-block component suppresses the answer.\n"]
    fits = [f for f in (d.patch, d.suppress) if f is not None]
    if fits:
        out.append(f"The gain fits learned from {fits[0].n_train_recalled} of {fits[0].n_train} train prompts: those "
                   "whose answer ranks within `--recall-rank` (default 1) before the final block; the other train "
                   "prompts only guard the fit (KL to the base model).\n")
    out += [_table(ev) + "\n", f"**Recommended:** {_why(ev) if ev.chosen else 'none. ' + _why(ev)}.\n"]
    for method, rows in ev.amplified.items():
        if rows:
            out.append(f"Amplified by {method}, each alone (change of log p(answer), test): " + "; ".join(
                f"{r.name} ×{r.gain:.2f} {_est(r.total)} (direct {_est(r.paths['direct'])}, via the final MLP "
                f"{_est(r.paths['mlp'])}, via the norm's rescale {_est(r.paths['rescale'])})" for r in rows) + ".\n")
    if p.split_by == "relation":
        out.append("Transfer to the unseen test relations:\n\n" + _relations(ev) + "\n")
    if ev.calibration is not None:
        out.append(_confidence(ev))
    return out


CALIBRATED_ECE_GOAL = 0.03  # issue 20: the calibrated confidence's ECE on the LRE test split


def _confidence_table(plan: Plan, runs: dict[tuple[str, str], tuple[AnalysisResult, RunRecord]]) -> list[str]:
    """The base model's calibrator on every run that has one: the family chosen on dev and what it does on test."""
    rows = []
    for (model, protocol), (d, _) in runs.items():
        c = d.evaluation.calibration if d.evaluation else None
        if c is None:
            continue
        v = c.variants["base"]
        ece, aurc = v.calibrated["ece"], v.difference["aurc"]
        floor = ece_floor(v.reliability_calibrated)
        met = (ece.value is not None and ece.value <= CALIBRATED_ECE_GOAL
               and aurc.ci_high is not None and aurc.ci_high < 0)
        below_floor = " (the floor is above the goal)" if floor > CALIBRATED_ECE_GOAL else ""
        verdict = "met" if met else "not met" + below_floor
        chosen = v.family if len(v.families) == len(FAMILIES) else f"{v.family} (of {len(v.families)} families)"
        rows.append([model, protocol, chosen, estimate(v.raw["ece"]), estimate(ece), number(floor), _est(aurc),
                     _est(v.difference["selective_accuracy_80"]),
                     verdict if plan.protocols[protocol].facts == "lre" else "(LRE only)"])
    if not rows:
        return []
    return ["\n### Calibrated confidence (calibration.json), base model, test split\n",
            f"Goal (on the LRE test splits): calibrated ECE at most {CALIBRATED_ECE_GOAL} and a risk-coverage area "
            "lower than the raw top-1 probability's, with its interval below 0. The family is chosen on dev by its "
            "log loss on relations held out of its fit; identity means no fitted family held there (a run made "
            f"before the {len(FAMILIES)}th family, {FAMILIES[-1]}, says of how many it chose). The floor is "
            "the ECE that a perfectly calibrated confidence would show in expectation on the same test prompts "
            "(`calibration.ece_floor`: each bin's right answers drawn Binomial(count, confidence)); ECE is biased "
            "upward at a few hundred prompts, and a goal below the floor cannot be shown met at this size.\n",
            md_table(["model", "protocol", "chosen", "ECE raw", "ECE calibrated", "floor", "risk-coverage area change",
                      "accuracy of the 80% most confident: change", "goal"], rows) + "\n"]


def _confidence(ev: Evaluation) -> str:
    """The calibrators of calibration.json on the test split: base, and the recommended patch where there is one."""
    c = ev.calibration
    assert c is not None
    parts = []
    for name in ["base", *([ev.chosen] if ev.chosen else [])]:
        v = c.variants[name]
        parts.append(f"{MODEL_LABELS[name]}: {v.family}, ECE {estimate(v.raw['ece'])} → "
                     f"{estimate(v.calibrated['ece'])}, risk-coverage area {_est(v.difference['aurc'])}, accuracy of "
                     f"the 80% most confident {_est(v.difference['selective_accuracy_80'])}")
    return (f"**Calibrated confidence** (calibration.json, the family chosen on dev by {c.folds}; test split, "
            "calibrated − raw): " + "; ".join(parts) + ".\n")


SMALL_NATS = 0.05  # a change of mean NLL below this is called small in words: under 5% on p(answer)


def _plain_words(plan: Plan, runs: dict[tuple[str, str], tuple[AnalysisResult, RunRecord]]) -> list[str]:
    """What holds and what does not, per model, in words generated from the numbers."""
    lines = []
    for (model, protocol), (d, _) in runs.items():
        if protocol != plan.goal.protocol and not plan.protocols[protocol].options:
            continue
        ev, suppressors = d.evaluation, d.findings.suppressors
        model = f"{model} ({protocol})"  # noqa: PLW2901 - the label of this line
        found = (f"{len(suppressors)} consistent suppressor(s) in the final block ({', '.join(suppressors)})"
                 if suppressors else "no consistent suppressor in the final block")
        if ev is None:
            lines.append(f"**{model}**: {found}; no candidate patch was fitted.")
            continue
        met, why = _goal(ev, plan.goal)
        if ev.chosen is None:
            lines.append(f"**{model}**: {found}; no patch is recommended on held-out relations ({why}).")
            continue
        nll = ev.test.differences[f"{ev.chosen}_minus_base"]["nll"]
        size = ("small" if abs(nll.value or 0.0) < SMALL_NATS else "clear")
        fit = d.suppress if ev.chosen == "suppress" else d.patch
        learned = (f"; the fit learned from {fit.n_train_recalled} of {fit.n_train} train prompts" if fit else "")
        lines.append(f"**{model}**: {found}; the recommended patch ({ev.chosen}) changes the held-out relations' NLL "
                     f"by {_est(nll)}, a {size} change: the goal is {'met' if met else 'not met (' + why + ')'}"
                     f"{learned}.")
    return lines


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores"


def git_commit() -> str:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return head.stdout.strip() or "unknown"


def _est(e: EstimateModel) -> str:
    return estimate(e, "+.3f")


def render(plan: Plan, root: Path, models: list[str], protocols: list[str]) -> Path:
    entries = load_registry()
    runs: dict[tuple[str, str], tuple[AnalysisResult, RunRecord]] = {}
    for model in models:
        for protocol in protocols:
            run = root / model / protocol
            if (run / "analysis.json").exists() and (run / "run.json").exists():
                runs[model, protocol] = (AnalysisResult.model_validate_json((run / "analysis.json").read_text()),
                                         RunRecord.model_validate_json((run / "run.json").read_text()))
    total = sum(r.wall_s for _, r in runs.values())
    planned = sum(len(plan.runs(m, protocols)) for m in models)
    made = sorted(d.created for d, _ in runs.values())
    out = ["# Results: does recallfix's patch improve factual recall?\n",
           f"Every number on this page comes from `make results` (results/make_results.py, plan "
           f"results/plan.json), rendered at commit {git_commit()}, on {_machine()}: {len(runs)} of the {planned} "
           "planned analysis runs" + (" (the others say \"Not run yet\")" if len(runs) < planned else "") + ", "
           f"{total / 3600:.1f} h of run time in all (each run's own wall time; a cached run keeps the time it "
           "took)" + (f", made from {made[0][:16].replace('T', ' ')} to {made[-1][:16].replace('T', ' ')} UTC by the "
                      "code of their time (a run is cached by recallfix's version, the model, the data and the "
                      "settings; each section names its run's date)" if made else "")
           + ". Brackets: 95% cluster-bootstrap intervals over subjects.\n",
           f"Goal, on `{plan.goal.protocol}` (held-out relations), for the patch recommended on dev: NLL lower "
           f"with its interval below 0; accuracy not lower beyond its interval; unknown-subject top-1 probability "
           f"up by at most {plan.goal.max_unknown_top1_rise}; neutral-text NLL up by at most "
           f"{plan.goal.max_neutral_nll_rise:.0%}.\n",
           "\n## Across the models\n"]
    summary = []
    for (model, protocol), (d, _) in runs.items():
        ev = d.evaluation
        suppressors = ", ".join(d.findings.suppressors) or "none"
        met, why = _goal(ev, plan.goal) if ev is not None else (False, "no candidate fitted")
        summary.append([model, protocol, f"{percent(d.findings.test.share_suppressed)}", suppressors,
                        ev.chosen or "none" if ev else "none",
                        _est(ev.test.differences[f"{ev.chosen}_minus_base"]["nll"]) if ev and ev.chosen else "",
                        ("met" if met else "not met: " + why) if protocol == plan.goal.protocol else why])
    out.append(md_table(["model", "protocol", "final block lowers p(answer) on (test)", "consistent suppressors",
                         "recommended", "test NLL change", "goal"], summary) + "\n")
    out.append("What holds and what does not, in words, ends the page.\n")
    out += _confidence_table(plan, runs)
    for model in models:
        entry = entries.get(model)
        out.append(f"\n## {model}\n\n{entry.description if entry else ''} (licence: "
                   f"{entry.licence if entry else 'see the model card'}).\n")
        for protocol in plan.runs(model, protocols):
            if (model, protocol) in runs:
                out += _section(plan, model, protocol, *runs[model, protocol])
            else:
                out.append(f"\n### {model}: {plan.protocols[protocol].title}\n\nNot run yet.\n")
        served = root / model / "served.json"
        if served.exists():
            check = ServedCheck.model_validate_json(served.read_text())
            worst = max(check.max_abs_difference.items(), key=lambda kv: kv[1])
            dtype = "" if check.dtype == "float32" else (
                f", in {check.dtype}: two float32 engines of this model do not fit the machine's memory, so the "
                "differences include rounding to it")
            out.append(f"\n**Served.** `recallfix serve` (vLLM, merged patch `{check.method}`{dtype}) and "
                       f"`recallfix compare` on the {check.n} test prompts of {Path(check.run).name}: the largest "
                       f"difference from the analysis' own numbers (float32) is {worst[1]:.1e} ({worst[0]}).\n")
    out += ["\n## What holds and what does not\n", *(f"- {line}" for line in _plain_words(plan, runs))]
    atomic_write_text(PAGE, "\n".join(out) + "\n")
    return PAGE
