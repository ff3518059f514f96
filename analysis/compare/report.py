"""What `recallfix compare` writes and prints, rendered from the typed `CompareResult`: results.json,
report.md, reliability.png, risk_coverage.png and the compact table on stdout."""

from __future__ import annotations

from pathlib import Path

from recallfix.patches.io import atomic_write_text

from ..report.format import CONFIDENCE_LABELS, METRIC_LABELS, estimate, md_table, number
from .schema import CompareResult, Comparison

LABELS = {**METRIC_LABELS, "exact_match": "exact match (greedy generation)",
          "answer_greedy": "answer greedy (all tokens top-1)", "answer_logprob": "answer log-likelihood (nats)"}
TABLE_METRICS = ("accuracy", "exact_match", "mean_p_answer", "ece_equal_width", "brier", "nll", "auroc")
RELATION_METRICS = ("accuracy", "exact_match", "mean_p_answer", "ece_equal_width")


def _name(result: CompareResult, key: str) -> str:
    return f"{key}: {result.models[key].model}"


def _rows(c: Comparison, metrics: tuple[str, ...] | list[str]) -> list[list[str]]:
    return [[LABELS[m], estimate(c.models["A"][m]), estimate(c.models["B"][m]), estimate(c.difference[m])]
            for m in metrics]


def _mcnemar_lines(c: Comparison) -> list[str]:
    return [f"- McNemar, {name}: A only right on {t.a_only}, B only right on {t.b_only}, exact p = {t.p_value:.3g}"
            for name, t in c.mcnemar.items()]


def markdown(r: CompareResult, plot: str, plot_rc: str | None = None) -> str:
    facts, a, b = r.facts, r.models["A"], r.models["B"]
    where = f"{facts.path}" + (f", run {facts.run}" if facts.run else "") + (f", split {facts.split}" if facts.split
                                                                            else "")
    out = [
        f"# recallfix compare: {a.model} (A) vs {b.model} (B)",
        "",
        f"`{r.command}`",
        "",
        f"- A: `{a.model}` at {a.base_url}; B: `{b.model}` at {b.base_url}",
        f"- facts: {where}; {facts.n_compared} of {facts.n_facts} compared, {r.overall.n_groups} subjects",
        f"- unplaced (the tokenizer cannot place the answer right after the prompt): A {facts.n_unplaced['A']}, "
        f"B {facts.n_unplaced['B']}",
        f"- intervals: 95% percentile bootstrap over subjects ({r.settings['n_boot']} resamples, paired for B - A); "
        f"top-{r.settings['top_logprobs']} logprobs per position",
        "",
        "## All facts",
        "",
        md_table(["metric", _name(r, "A"), _name(r, "B"), "B - A"], _rows(r.overall, list(r.definitions))),
        "",
        *_mcnemar_lines(r.overall),
        "",
        f"![reliability]({plot})",
        "",
        "## Per relation",
        "",
    ]
    header = ["relation", "n", *(f"{LABELS[m]}: A / B / B - A" for m in RELATION_METRICS)]
    rows = [[rel, str(c.n), *(f"{number(c.models['A'][m].value)} / {number(c.models['B'][m].value)} / "
                              f"{estimate(c.difference[m])}" for m in RELATION_METRICS)]
            for rel, c in r.by_relation.items()]
    out += [md_table(header, rows), "", *confidence_lines(r, plot_rc), "## Definitions", ""]
    out += [f"- **{LABELS[m]}**: {text}" for m, text in r.definitions.items()]
    if facts.unplaced:
        unplaced = [[u.model, u.prompt, u.answer, u.reason] for u in facts.unplaced]
        out += ["", "## Unplaced facts", "", md_table(["model", "prompt", "answer", "why"], unplaced)]
    return "\n".join(out) + "\n"


def confidence_lines(r: CompareResult, plot: str | None) -> list[str]:
    """The confidence section: raw (and calibrated) measures of A and B, B - A, and calibrated - raw."""
    c = r.confidence
    header = ["measure", "A raw", "B raw", "B - A raw"]
    sets = [("raw", c.raw)] + ([("calibrated", c.calibrated)] if c.calibrated else [])
    if c.calibrated:
        header += ["A calibrated", "B calibrated", "B - A calibrated", "A: calibrated - raw", "B: calibrated - raw"]
    rows = [[label, *(cell for _, s in sets for cell in (estimate(s.models["A"][m]), estimate(s.models["B"][m]),
                                                          estimate(s.difference[m], "+.3f"))),
             *(estimate(c.calibrated_minus_raw[key][m], "+.3f") for key in c.calibrated_minus_raw)]
            for m, label in CONFIDENCE_LABELS.items()]
    if c.ece_floor:  # after the ECE row: what a perfectly calibrated confidence would show on these facts
        floors = [number(c.ece_floor.get(f"{key} {kind}")) for kind, _ in sets for key in ("A", "B")]
        cells = [cell for i in range(len(sets)) for cell in (*floors[2 * i: 2 * i + 2], "")]
        rows.insert(1, ["ECE floor (perfectly calibrated, expected)", *cells,
                        *([""] * len(c.calibrated_minus_raw))])
    which = (f"Calibrators from `{c.calibration}`: A {c.calibrators['A']}, B {c.calibrators['B']}."
             if c.calibration else "No --calibration given: the raw top-1 probability only.")
    return ["## Confidence: calibration and abstention", "",
            "How well each model's confidence that its answer is right (its first answer token is the top-1) is "
            "calibrated, and how well it ranks right answers first: keeping only the most confident answers "
            "(abstaining on the rest), the accuracy of those kept, and the area under the risk-coverage curve. "
            + which, "", md_table(header, rows), "", *([f"![risk-coverage]({plot})", ""] if plot else [])]


def plot_risk_coverage(r: CompareResult, path: Path) -> str:
    from ..report.plots import plt, save_figure  # matplotlib only when a report is written

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, curve in r.confidence.risk_coverage.items():
        coverage = [(k + 1) / len(curve) for k in range(len(curve))]
        ax.plot(coverage, curve, color="C0" if name.startswith("A") else "C1",
                ls=":" if name.endswith("raw") else "-", label=f"{name}: {r.models[name[0]].model}")
    ax.set_xlabel("coverage (share of answers given)")
    ax.set_ylabel("risk (share of those wrong)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_reliability(r: CompareResult, path: Path) -> str:
    from ..report.plots import draw_reliability, plt, save_figure  # matplotlib only when a report is written

    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, key in zip(axes, ("A", "B"), strict=True):
        draw_reliability(ax, r.reliability[key], _name(r, key), r.overall.models[key])
    axes[0].set_ylabel("accuracy (first answer token top-1)")
    axes[1].legend(fontsize=7, loc="lower right")  # the bin counts stand along the top
    return save_figure(fig, path)


def write_report(out: Path, r: CompareResult) -> CompareResult:
    """results.json, report.md and reliability.png into `out`; the result with its `files`."""
    files = {"results": "results.json", "report": "report.md", "per_fact": "per_fact.jsonl",
             "reliability": plot_reliability(r, out / "reliability.png"),
             "risk_coverage": plot_risk_coverage(r, out / "risk_coverage.png")}
    r = r.model_copy(update={"files": files})
    atomic_write_text(out / "results.json", r.model_dump_json(indent=2) + "\n")
    atomic_write_text(out / "report.md", markdown(r, files["reliability"], files["risk_coverage"]))
    return r


def table(r: CompareResult) -> str:
    """The compact table printed at the end: headline metrics, A, B and B - A with intervals."""
    rows = [[LABELS[m], number(r.overall.models["A"][m].value), number(r.overall.models["B"][m].value),
             estimate(r.overall.difference[m])] for m in TABLE_METRICS]
    header = ["", r.models["A"].model, r.models["B"].model, "B - A [95% CI]"]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    t = r.overall.mcnemar
    lines.append(f"{r.facts.n_compared} facts ({r.overall.n_groups} subjects); unplaced A {r.facts.n_unplaced['A']}, "
                 f"B {r.facts.n_unplaced['B']}; McNemar p: accuracy {t['accuracy'].p_value:.3g}, "
                 f"exact match {t['exact_match'].p_value:.3g}")
    return "\n".join(lines)


def print_table(r: CompareResult) -> None:
    print(table(r))
