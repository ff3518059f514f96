"""RUN/report.md, rendered from the typed `AnalysisResult` (the numbers of analysis.json; plots: `plots`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from recallfix.patches.io import atomic_write_text

from .schema import AnalysisResult, ComponentRow, Criterion, EstimateModel, SetEvaluation, Suppression

MODELS = ("base", "patched", "temperature")


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _est(e: EstimateModel | Criterion, fmt: str = ".3f") -> str:
    if e.value is None:
        return "n/a"
    if e.ci_low is None:
        return format(e.value, fmt)
    return f"{format(e.value, fmt)} [{format(e.ci_low, fmt)}, {format(e.ci_high, fmt)}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


METRIC_LABELS = {
    "accuracy": "accuracy", "mean_p_answer": "mean p(answer)", "mean_confidence": "mean top-1 probability",
    "ece_equal_width": "ECE (15 equal-width bins)", "ece_equal_mass": "ECE (15 equal-mass bins)",
    "brier": "Brier (multi-class)", "nll": "NLL (nats)", "auroc": "AUROC (confidence vs correct)",
}


def _component_table(rows: Sequence[ComponentRow]) -> str:
    return _table(["component", "mean DLA", "DLA < 0", "mean Δ log p", "Δ log p < 0"],
                  [[r.name, _f(r.mean_dla), _pct(r.share_dla_negative), _f(r.mean_effect),
                    _pct(r.share_effect_negative)] for r in rows])


def _suppression_rows(s: Suppression, label: str) -> list[str]:
    lo, hi = s.share_suppressed_ci
    return [label, str(s.n), _f(s.mean_p_before), _f(s.mean_p_after),
            f"{_pct(s.share_suppressed)} [{_pct(lo)}, {_pct(hi)}]",
            _pct(s.accuracy_before), _pct(s.accuracy_after),
            f"{_pct(s.share_suppressed_recalled)} of {s.n_recalled}"]


def _set_section(title: str, s: SetEvaluation) -> str:
    rows = []
    for metric, label in METRIC_LABELS.items():
        dpb = s.differences["patched_minus_base"][metric]
        dpt = s.differences["patched_minus_temperature"][metric]
        rows.append([label, *(_est(s.models[k][metric]) for k in MODELS), _est(dpb, "+.3f"), _est(dpt, "+.3f")])
    return (f"#### {title} ({s.n} prompts, {s.n_groups} subjects)\n\n"
            + _table(["metric", "base", "patched", "temperature-scaled", "patched − base", "patched − temperature"],
                     rows))


def _image(files: dict[str, str], key: str, alt: str) -> str:
    return f"![{alt}]({files[key]})\n" if key in files else ""


CAVEATS = """
## Caveats

* "Held out" means held out from everything the patch learned from (component selection, gains, early
  stopping, the temperature): splits are by subject, so no wording of a test fact is seen in training. It does
  not mean the model never saw the fact (the demo model is trained on every shipped fact).
* The component numbers are *direct* effects at the last position: a write's path through the final norm and
  unembedding. Inside the final block the MLP also reads the heads' writes; that indirect path is not in a
  head's number, but it is in the fit, which runs the real block.
* DLA freezes the final norm's scale. A final layer can lower p(answer) mostly by raising that scale (a
  temperature); the "rescale" term above measures exactly that part, and Δ log p includes it.
* Attention patterns come from a second pass with eager attention (the fused kernels do not return them).
"""


def _criteria(d: AnalysisResult) -> list[str]:
    def value(c: Criterion) -> str:
        return _est(c, "+.4f" if c.threshold == 0 else ".4f")

    out = ["## Acceptance checks (held-out numbers)\n"]
    out.append(_table(["check", "value [95% interval]", "result"],
                      [[c.description, value(c), {True: "PASS", False: "**FAIL**", None: "n/a"}[c.passed]]
                       for c in d.criteria]))
    failed = [c.name for c in d.criteria if c.passed is False]
    out.append("\n" + (f"**Not met:** {', '.join(failed)}. These are the measured numbers; nothing was tuned "
                       "on the test split or the unknown subjects to change them.\n" if failed
                       else "All checks pass on the point estimates (intervals below).\n"))
    return out


def _setup(d: AnalysisResult) -> list[str]:
    m, data = d.model, d.data
    out = ["## Setup\n"]
    out.append(_table(["", ""], [
        ["model", f"`{m.path}` ({m.architecture}, {m.num_layers} layers x {m.num_heads} heads of "
                  f"{m.head_dim}, d_model {m.hidden_size}, d_mlp {m.intermediate_size}, vocab {m.vocab_size})"],
        ["run on", f"{m.device}, {m.dtype}"],
        ["facts", f"`{data.facts_path}`: {data.n_facts} prompts ({data.n_dropped} dropped: no answer token); "
                  f"splits {data.splits} by subject, seed {data.seed}; sha256 `{data.facts_sha256[:16]}…`"],
        ["relations", ", ".join(f"{k} ({v})" for k, v in data.relations.items())],
        ["unknown subjects", f"`{data.unknown_path}` ({data.n_unknown} prompts)" if data.unknown_path else "none"],
        ["neutral text", f"{data.neutral_source}: {data.n_neutral_fit} lines for the KL guard, "
                         f"{data.n_neutral_eval} held out for the NLL check"],
        ["runtime", ", ".join(f"{k} {v:.1f}s" for k, v in d.runtime_s.items())],
    ]))
    out.append("\nAnswer token: the first token of \" answer\" after the prompt. \"Before the final block\" is the "
               "logit lens of the stream entering the last block (the model's own final norm and unembedding).\n")
    return out


def _logit_lens(d: AnalysisResult) -> list[str]:
    out = ["## 1. Logit lens\n", _image(d.files, "plot_logit_lens", "logit lens")]
    curve = d.logit_lens.all
    out.append(_table(["after block"] + ["emb" if i == 0 else str(i) for i in range(len(curve.mean_p_answer))],
                      [["mean p(answer)"] + [_f(v) for v in curve.mean_p_answer],
                       ["median rank"] + [_f(v, ".0f") for v in curve.median_rank],
                       ["accuracy"] + [_pct(v) for v in curve.accuracy]]))
    out.append("\nPer relation: mean p(answer) before → after the final block\n")
    out.append(_table(["relation", "n", "before", "after"],
                      [[r, str(c.n), _f(c.mean_p_answer[-2]), _f(c.mean_p_answer[-1])]
                       for r, c in d.logit_lens.by_relation.items() if c.n]))
    return out


def _final_layer(d: AnalysisResult) -> list[str]:
    fl = d.final_layer
    out = [f"\n## 2. The final block (L{fl.layer}) at the last position ({fl.n_prompts} prompts)\n"]
    out.append("DLA: the write's push on the answer's logit against the mean logit, final norm frozen "
               "(`recallfix.patches.decompose`). Δ log p: log p(answer) minus log p(answer) without the write, "
               "through the real final norm. Shares: prompts where the value is < 0 (the component pushes the "
               "answer down).\n")
    out.append(_image(d.files, "plot_final_layer", "final-layer components"))
    out.append(_component_table(fl.components))
    out.append(f"\nExact split of the change of z_answer − mean z across the block (mean "
               f"{_f(fl.mean_change_logit)}): the DLAs above plus the rescaling of the stream already there by "
               f"the norm's new scale, **{_f(fl.rescale.mean_dla)}** (negative on "
               f"{_pct(fl.rescale.share_dla_negative)} of prompts). Mean change of log p(answer): "
               f"{_f(fl.mean_change_logp)} nats.\n")
    out.append("\nMost suppressing neurons (first-order effect on log p(answer)):\n")
    out.append(_component_table(fl.neurons_suppressing))
    out.append("\nMost promoting neurons:\n")
    out.append(_component_table(fl.neurons_promoting))
    return out


def _mechanisms(d: AnalysisResult) -> list[str]:
    mech = d.mechanisms
    out = ["\n## 3. Mechanisms\n"]
    movers = mech.movers
    if movers:
        out.append(f"### Mover heads ({movers.n_prompts} prompts with a located subject)\n")
        out.append("Attention from the last position to the subject's tokens against the head's DLA to the "
                   f"subject's first token. Mover: mean attention ≥ {movers.min_attention}, positive correlation "
                   "and positive mean attribution.\n")
        out.append(_image(d.files, "plot_movers", "mover heads"))
        out.append(_table(["head", "mean attention", "mean subject DLA", "r", "mover"],
                          [[h.name, _f(h.mean_attention), _f(h.mean_subject_attribution), _f(h.correlation, ".2f"),
                            "yes" if h.is_mover else ""] for h in movers.heads[:10]]))
        out.append(f"\nMover heads: {', '.join(movers.movers) or 'none'}.\n")
    else:
        out.append("### Mover heads\n\nNo prompt has a subject that could be located in its tokens.\n")
    out.append("### MLPs regressed on their block's heads\n")
    out.append("Per prompt, m = Σ β_h h_h + e by least squares over the d_model coordinates (β > 1 amplifies what "
               "head h wrote, β < 0 erases it); e, the intercept, is read through the logit lens.\n")
    out.append(_image(d.files, "plot_mlp_regression", "MLP regression"))
    out.append(_table(["MLP", "mean R²", "MLP DLA", "intercept DLA", "answer rank in intercept (median)",
                       "answer in intercept's top 10", "amplified heads (β>1 on most prompts)",
                       "erased heads (β<0 on most prompts)"],
                      [[r.name, _f(r.mean_r2), _f(r.mean_mlp_dla), _f(r.intercept.mean_dla),
                        _f(r.intercept.median_answer_rank, ".0f"), _pct(r.intercept.share_answer_top10),
                        ", ".join(h.name for h in r.heads if (h.share_amplify or 0) > 0.5) or "–",
                        ", ".join(h.name for h in r.heads if (h.share_erase or 0) > 0.5) or "–"]
                       for r in mech.mlp_regression]))
    out.append(f"\nThe MLP whose intercept points at the answer most: {mech.answer_mlp or 'none'}.\n")
    return out


def _verdict(d: AnalysisResult) -> list[str]:
    verdict = d.verdict
    return ["\n## 4. Verdict\n",
            _table(["prompts", "n", "p before", "p after", "suppressed", "acc before", "acc after",
                    "suppressed among recalled"],
                   [_suppression_rows(verdict.test, "test"), _suppression_rows(verdict.all, "all")]),
            f"\n{verdict.text}\n"]


def _patch(d: AnalysisResult) -> list[str]:
    patch = d.patch
    out = ["\n## 5. The patch\n"]
    if not patch:
        out.append("No final-block component suppresses the answer on the train split, so no patch was made.\n")
        return out
    out.append(f"Selected on the train split: {patch.selection_rule}.\n")
    out.append(_table(["component", "train mean Δ log p", "train Δ log p < 0", "learned gain"],
                      [[c.name, _f(c.mean_effect), _pct(c.share_effect_negative), _f(patch.gains[c.name])]
                       for c in patch.candidates]))
    cfg = patch.fit_config
    hist = {h.epoch: h for h in patch.history}
    best = hist[patch.best_epoch]
    guards = sorted({h.guard_weight for h in patch.history})
    budget = cfg["max_confidence_rise"]
    example = patch.nonce_examples[0] if patch.nonce_examples else ""
    out.append(
        f"\nFit: Adam (lr {cfg['lr']}) on the gains through the real final block, final norm and unembedding. "
        f"Objective: NLL of the answer on the {patch.n_train_recalled} of {patch.n_train} train prompts whose "
        f"answer is top-1 before the final block; + λ x KL(base‖patched) on the other train prompts and on "
        f"{patch.n_nonce_train} prompts that fill the train templates with nonce subjects (invented names such "
        f"as \"{example}\", and names borrowed from other relations: no model can know these, so the patch must "
        f"leave them alone); + {cfg['kl_weight']} x KL(base‖patched) on neutral text; + {cfg['l2']} x Σ(g−1)²; gains "
        f"kept in [{cfg['min_gain']}, {cfg['max_gain']}].\n")
    if budget is not None:
        out.append(
            f"No new overconfidence, as a constraint checked on dev ({patch.n_nonce_dev} nonce prompts from the "
            f"dev templates and the dev prompts not recalled): the mean top-1 probability may rise by at most "
            f"{budget}; an epoch over budget multiplies λ by {cfg['guard_growth']} (λ took the values "
            f"{', '.join(f'{g:g}' for g in guards)}) and cannot be kept. Kept: epoch {patch.best_epoch} of "
            f"{patch.epochs_run}{' (early stop)' if patch.stopped_early else ''}, the within-budget epoch "
            f"with the lowest dev NLL (dev top-1 rise on guarded prompts {_f(best.dev_confidence_rise_unrecalled)}, "
            f"dev NLL {_f(best.dev_nll)} vs {_f(hist[0].dev_nll)} unpatched).\n")
    else:
        out.append(f"Kept: epoch {patch.best_epoch} of {patch.epochs_run}, the lowest dev objective.\n")
    out.append(
        f"The saved patch `{patch.file}` (id {patch.id}), applied with `apply_patch`, reproduces the fitted "
        f"logits to {patch.max_verify_error:.1e}; every number below is measured on the model with the patch "
        f"applied. Temperature baseline: T = {patch.temperature:.3f}, fitted (NLL) on the same train split.\n")
    out.append(_image(d.files, "plot_fit", "fit"))
    return out


def _evaluation(d: AnalysisResult) -> list[str]:
    ev = d.evaluation
    if ev is None:
        return []
    out = ["\n### Evaluation\n"]
    out.append(f"Brackets: 95% percentile bootstrap intervals, {ev.n_boot} resamples of subjects "
               "(each draws subjects with replacement, all prompts of a subject together; differences are paired: "
               "the same resamples for every model). ECE is biased upward in small resamples, so its point estimate "
               "can sit at the low end of its interval; the paired differences are the fair comparison.\n")
    out.append(_set_section("Held-out test split", ev.test))
    if ev.unknown:
        out.append("\n" + _set_section("Unknown subjects", ev.unknown))
    if ev.neutral:
        n = ev.neutral
        ci = n.relative_change_ci
        out.append(f"\n#### Neutral text\n\nNLL per token on {n.n_lines} held-out lines ({n.n_tokens} tokens): "
                   f"base {n.base_nll:.4f}, patched {n.patched_nll:.4f}, relative change "
                   f"{n.relative_change:+.2%} [{_pct(ci[0])}, {_pct(ci[1])}].\n")
    out.append("\n" + _comparison(d))
    s = ev.suppression_after_patch
    out.append(f"\nAfter the patch the final block lowers p(answer) on {_pct(s.share_suppressed)} of test prompts "
               f"(before the patch: {_pct(d.verdict.test.share_suppressed)}).\n")
    out.append(_image(d.files, "plot_reliability", "reliability diagrams"))
    out.append(CAVEATS)
    return out


def _comparison(d: AnalysisResult) -> str:
    """One paragraph: what the patch buys against the base model and against temperature scaling."""
    assert d.evaluation is not None
    t, unknown = d.evaluation.test.models, d.evaluation.unknown
    v = {m: {k: t[m][k].value for k in ("accuracy", "ece_equal_width", "mean_confidence")} for m in t}
    text = (f"**Reading.** On held-out facts the patch moves accuracy {_f(v['base']['accuracy'])} → "
            f"{_f(v['patched']['accuracy'])} and ECE {_f(v['base']['ece_equal_width'])} → "
            f"{_f(v['patched']['ece_equal_width'])}; temperature scaling cannot change the top-1 token (accuracy "
            f"stays {_f(v['temperature']['accuracy'])}) but reaches ECE {_f(v['temperature']['ece_equal_width'])} "
            f"by rescaling every prompt alike.")
    if unknown:
        u = unknown.models
        text += (f" That global rescaling is also what it does on unknown subjects: mean top-1 probability "
                 f"{_f(u['base']['mean_confidence'].value)} → {_f(u['temperature']['mean_confidence'].value)} "
                 f"with temperature, {_f(u['patched']['mean_confidence'].value)} with the patch.")
    return text + "\n"


def render_markdown(d: AnalysisResult) -> str:
    out = [f"# recallfix analysis: {Path(d.model.path).name}\n", f"**Verdict.** {d.verdict.text}\n"]
    if d.criteria:
        out += _criteria(d)
    for section in (_setup, _logit_lens, _final_layer, _mechanisms, _verdict, _patch, _evaluation):
        out += section(d)
    return "\n".join(out) + "\n"


def write_markdown(out: Path, d: AnalysisResult) -> Path:
    return atomic_write_text(out / "report.md", render_markdown(d))
