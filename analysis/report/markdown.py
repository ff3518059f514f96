"""RUN/report.md, rendered from the typed `AnalysisResult` (the numbers of analysis.json; plots: `plots`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from recallfix.patches.io import atomic_write_text

from ..schema import (
    AmplifiedComponent,
    AnalysisResult,
    ComponentRow,
    EstimateModel,
    Evaluation,
    PatchInfo,
    SetEvaluation,
    Suppression,
)
from .confidence import confidence_section
from .format import METRIC_LABELS, estimate, md_table, number, percent
from .format import MODEL_LABELS as LABELS


def _component_table(rows: Sequence[ComponentRow]) -> str:
    return md_table(["component", "mean DLA", "DLA < 0", "mean Δ log p", "Δ log p < 0"],
                    [[r.name, number(r.mean_dla), percent(r.share_dla_negative), number(r.mean_effect),
                      percent(r.share_effect_negative)] for r in rows])


def _suppression_rows(s: Suppression, label: str) -> list[str]:
    lo, hi = s.share_suppressed_ci
    return [label, str(s.n), number(s.mean_p_before), number(s.mean_p_after),
            f"{percent(s.share_suppressed)} [{percent(lo)}, {percent(hi)}]",
            percent(s.accuracy_before), percent(s.accuracy_after),
            f"{percent(s.share_suppressed_recalled)} of {s.n_recalled}"]


def _models(ev: Evaluation) -> list[str]:
    return ["base", *(m.name for m in ev.methods), "temperature"]


def _set_section(title: str, s: SetEvaluation, ev: Evaluation) -> str:
    models, methods = _models(ev), [m.name for m in ev.methods]
    rows = []
    for metric, label in METRIC_LABELS.items():
        rows.append([label, *(estimate(s.models[k][metric]) for k in models),
                     *(estimate(s.differences[f"{m}_minus_{o}"][metric], "+.3f") for m in methods
                       for o in ("base", "temperature"))])
    header = ["metric", *(LABELS[k] for k in models), *(f"{m} − {o}" for m in methods for o in ("base", "temperature"))]
    return f"#### {title} ({s.n} prompts, {s.n_groups} subjects)\n\n" + md_table(header, rows)


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


def _checks(d: AnalysisResult) -> list[str]:
    out = ["## Checks asked for (--require)\n"]
    out.append(md_table(["check", "finding", "value [95% interval]", "result"],
                        [[c.description or c.name, f"`{c.expression}` ({c.source})", estimate(c, ".4f"),
                          "PASS" if c.passed else "**FAIL**"] for c in d.checks]))
    failed = [c.name for c in d.checks if not c.passed]
    out.append("\n" + (f"**Not met:** {', '.join(failed)}. These are the measured numbers; nothing was tuned on "
                       "the test split or the unknown subjects to change them.\n" if failed
                       else "Every check passes on the point estimates.\n"))
    return out


def _setup(d: AnalysisResult) -> list[str]:
    m, data = d.model, d.data
    out = ["## Setup\n"]
    out.append(md_table(["", ""], [
        ["model", f"`{m.path}` ({m.architecture}, {m.num_layers} layers x {m.num_heads} heads of "
                  f"{m.head_dim}, d_model {m.hidden_size}, d_mlp {m.intermediate_size}, vocab {m.vocab_size})"],
        ["run on", f"{m.device}, {m.dtype}"],
        ["facts", f"`{data.facts_path}`: {data.n_facts} prompts ({data.n_dropped} dropped: no answer token); "
                  f"splits {data.splits} by {data.split_by}, seed {data.seed}; templates: {data.templates}"
                  + (f"; relations asked for: {', '.join(data.selected_relations)}" if data.selected_relations else "")
                  + f"; sha256 `{data.facts_sha256[:16]}…`"],
        ["relations", ", ".join(f"{k} ({v})" for k, v in data.relations.items())],
        *([["relations per split", "; ".join(f"{split}: {', '.join(names)}"
                                             for split, names in data.split_relations.items())]]
          if data.split_by == "relation" else []),
        ["unknown subjects", f"{data.unknown_source} ({data.n_unknown} prompts)"],
        ["neutral text", f"{data.neutral_source}: {data.n_neutral_fit} lines for the KL guard, "
                           f"{data.n_neutral_eval} held out for the NLL check"],
        ["runtime", ", ".join(f"{k} {v:.1f}s" for k, v in d.runtime_s.items())],
    ]))
    out.append("\n" + _cleaning(d))
    out.append("\nAnswer token: the first token of \" answer\" after the prompt. \"Before the final block\" is the "
               "logit lens of the stream entering the last block (the model's own final norm and unembedding).\n")
    return out


def _cleaning(d: AnalysisResult) -> str:
    """The one line on what the facts reader repaired and dropped (`data.clean`'s policy)."""
    data = d.data
    if not data.cleaning:
        return "Facts read as they are: no value repaired, no sample dropped."
    kinds = {"whitespace": "value(s) stripped of surrounding whitespace",
             "escapes": "value(s) with literal \\u escapes decoded", "duplicates": "exact duplicate(s) dropped",
             "ambiguous": "sample(s) dropped for a question with several answers"}
    files = [f"`{c.file}`: {', '.join(f'{getattr(c, k)} {words}' for k, words in kinds.items() if getattr(c, k))} "
             f"({c.kept} of {c.samples} samples kept)" for c in data.cleaning]
    return "Facts normalised on reading: " + "; ".join(files) + "."


def _sample_note(n: int, n_facts: int) -> str:
    if n >= n_facts:
        return f"Over all {n_facts} prompts.\n"
    return (f"Over a seeded sample of {n} of the {n_facts} prompts (`--mechanism-prompts`: each costs a "
            f"full-vocabulary readout per layer); the final block's numbers (sections 2 and 4) are not sampled.\n")


def _logit_lens(d: AnalysisResult) -> list[str]:
    curve = d.logit_lens.all
    out = ["## 1. Logit lens\n", _sample_note(curve.n, d.data.n_facts),
           _image(d.files, "plot_logit_lens", "logit lens")]
    out.append(md_table(["after block"] + ["emb" if i == 0 else str(i) for i in range(len(curve.mean_p_answer))],
                        [["mean p(answer)"] + [number(v) for v in curve.mean_p_answer],
                         ["median rank"] + [number(v, ".0f") for v in curve.median_rank],
                         ["accuracy"] + [percent(v) for v in curve.accuracy]]))
    out.append("\nPer relation: mean p(answer) before → after the final block\n")
    out.append(md_table(["relation", "n", "before", "after"],
                        [[r, str(c.n), number(c.mean_p_answer[-2]), number(c.mean_p_answer[-1])]
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
               f"{number(fl.mean_change_logit)}): the DLAs above plus the rescaling of the stream already there by "
               f"the norm's new scale, **{number(fl.rescale.mean_dla)}** (negative on "
               f"{percent(fl.rescale.share_dla_negative)} of prompts). Mean change of log p(answer): "
               f"{number(fl.mean_change_logp)} nats.\n")
    out.append("\nMost suppressing neurons (first-order effect on log p(answer)):\n")
    out.append(_component_table(fl.neurons_suppressing))
    out.append("\nMost promoting neurons:\n")
    out.append(_component_table(fl.neurons_promoting))
    return out


def _mechanisms(d: AnalysisResult) -> list[str]:
    mech = d.mechanisms
    out = ["\n## 3. Mechanisms\n", _sample_note(mech.n_prompts, d.data.n_facts)]
    movers = mech.movers
    if movers:
        out.append(f"### Mover heads ({movers.n_prompts} prompts with a located subject)\n")
        out.append("Attention from the last position to the subject's tokens against the head's DLA to the "
                   f"subject's first token. Mover: mean attention ≥ {movers.min_attention}, positive correlation "
                   "and positive mean attribution.\n")
        out.append(_image(d.files, "plot_movers", "mover heads"))
        out.append(md_table(["head", "mean attention", "mean subject DLA", "r", "mover"],
                            [[h.name, number(h.mean_attention), number(h.mean_subject_attribution),
                              number(h.correlation, ".2f"), "yes" if h.is_mover else ""] for h in movers.heads[:10]]))
        out.append(f"\nMover heads: {', '.join(movers.movers) or 'none'}.\n")
    else:
        out.append("### Mover heads\n\nNo prompt has a subject that could be located in its tokens.\n")
    out.append("### MLPs regressed on their block's heads\n")
    out.append("Per prompt, m = Σ β_h h_h + e by least squares over the d_model coordinates (β > 1 amplifies what "
               "head h wrote, β < 0 erases it); e, the intercept, is read through the logit lens.\n")
    out.append(_image(d.files, "plot_mlp_regression", "MLP regression"))
    out.append(md_table(["MLP", "mean R²", "MLP DLA", "intercept DLA", "answer rank in intercept (median)",
                         "answer in intercept's top 10", "amplified heads (β>1 on most prompts)",
                         "erased heads (β<0 on most prompts)"],
                        [[r.name, number(r.mean_r2), number(r.mean_mlp_dla), number(r.intercept.mean_dla),
                          number(r.intercept.median_answer_rank, ".0f"), percent(r.intercept.share_answer_top10),
                          ", ".join(h.name for h in r.heads if (h.share_amplify or 0) > 0.5) or "–",
                          ", ".join(h.name for h in r.heads if (h.share_erase or 0) > 0.5) or "–"]
                         for r in mech.mlp_regression]))
    out.append(f"\nThe MLP whose intercept points at the answer most: {mech.answer_mlp or 'none'}.\n")
    return out


def _findings(d: AnalysisResult) -> list[str]:
    f = d.findings
    return ["\n## 4. Findings: the whole block and each component\n",
            md_table(["prompts", "n", "p before", "p after", "block lowers p(answer) on", "acc before", "acc after",
                      "lowers it, among recalled"],
                     [_suppression_rows(f.test, "test"), _suppression_rows(f.all, "all")]),
            f"\nRescale term (test): {estimate(f.rescale, '+.3f')} on the answer's logit against the mean.\n",
            "\nEach final-block component on the test split: the share of prompts where its write lowers "
            "p(answer) and its mean effect on log p(answer), with 95% bootstrap intervals over subjects. A "
            "consistent suppressor lowers p(answer) on at least the selection share (--min-share) of prompts, and "
            "the interval of its mean effect lies below 0.\n",
            md_table(["component", "lowers p(answer) on", "mean effect (nats)", "consistent suppressor"],
                     [[c.name, f"{percent(c.share_lowers)} [{percent(c.share_lowers_ci[0])}, "
                               f"{percent(c.share_lowers_ci[1])}]",
                       estimate(EstimateModel(value=c.mean_effect, ci_low=c.mean_effect_ci[0],
                                              ci_high=c.mean_effect_ci[1]), "+.3f"),
                       "yes" if c.consistent else ""] for c in f.components])]


def _patch(d: AnalysisResult) -> list[str]:
    out = ["\n## 5. The patches\n",
           f"Every candidate edits the final block (L{d.model.num_layers - 1}) only.\n"]
    for title, patch in (("Learned gains", d.patch), ("Suppress-only gains: suppressors scaled down, gains in [0, 1]",
                                                      d.suppress)):
        out += _gain_fit(title, patch)
    out.append(_image(d.files, "plot_fit", "fit"))
    return out + _intercept(d)


def _gain_fit(title: str, patch: PatchInfo | None) -> list[str]:
    out = [f"### {title}\n"]
    if not patch:
        out.append("Not fitted: not asked for (--method), or no final-block component suppresses the answer on the "
                   "train split.\n")
        return out
    out.append(f"Selected on the train split: {patch.selection_rule}.\n")
    out.append(md_table(["component", "train mean Δ log p", "train Δ log p < 0", "learned gain"],
                        [[c.name, number(c.mean_effect), percent(c.share_effect_negative), number(patch.gains[c.name])]
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
            f"with the lowest dev NLL (dev top-1 rise on guarded prompts "
            f"{number(best.dev_confidence_rise_unrecalled)}, "
            f"dev NLL {number(best.dev_nll)} vs {number(hist[0].dev_nll)} unpatched).\n")
    else:
        out.append(f"Kept: epoch {patch.best_epoch} of {patch.epochs_run}, the lowest dev objective.\n")
    out.append(
        f"The saved patch `{patch.file}` (id {patch.id}), applied with `apply_patch`, reproduces the fitted "
        f"logits to {patch.max_verify_error:.1e}; every number below is measured on the model with the patch "
        f"applied.\n")
    if patch.best_epoch == 0:
        out.append("The fit kept epoch 0: no epoch beat the base model on dev, so these gains are all 1 (the base "
                   "model).\n")
    return out


def _intercept(d: AnalysisResult) -> list[str]:
    i = d.intercept
    if i is None:
        return []
    heads = ", ".join(f"{k} {v:+.2f}" for k, v in i.head_coef.items())
    return ["\n### The paper's fix: remove the final MLP's intercept\n",
            f"At the last position of {i.n_train} train prompts, {i.component}'s output regressed on the final "
            f"heads' writes and the stream after attention (least squares; R² {number(i.r2)}): one coefficient per "
            f"head ({heads}), {i.resid_coef:+.3f} for the stream, and an intercept b shared by every prompt (norm "
            f"{i.b_norm:.3f}; the MLP's output has mean norm {i.mean_mlp_out_norm:.3f}). The patch `{i.file}` "
            f"(id {i.id}) adds −b to the MLP's output: resid_post = resid_mid + mlp_out − b.\n"]


def _at_a_glance(ev: Evaluation) -> str:
    """The one comparison table: every method beside the base model and temperature scaling."""
    models, methods = _models(ev), [m.name for m in ev.methods]
    test, unknown = ev.test, ev.unknown
    rows = []
    for metric in ("accuracy", "mean_p_answer", "ece_equal_width", "nll"):
        rows.append([f"test {METRIC_LABELS[metric]}", *(estimate(test.models[k][metric]) for k in models),
                     *(estimate(test.differences[f"{m}_minus_base"][metric], "+.3f") for m in methods)])
    if unknown is not None:
        rows.append(["unknown subjects: mean top-1 probability",
                     *(estimate(unknown.models[k]["mean_confidence"]) for k in models),
                     *(estimate(unknown.differences[f"{m}_minus_base"]["mean_confidence"], "+.3f") for m in methods)])
    neutral = [ev.neutral[m] for m in methods]
    if neutral:
        rows.append(["neutral text: NLL per token", f"{neutral[0].base_nll:.4f}",
                     *(f"{n.patched_nll:.4f}" for n in neutral), "(unchanged)",
                     *(f"{n.relative_change:+.2%} [{percent(n.relative_change_ci[0])}, "
                       f"{percent(n.relative_change_ci[1])}]" for n in neutral)])
    dev = {m.name: m for m in ev.methods}
    rows.append(["dev NLL (chooses patch.json)", f"{ev.base_dev_nll:.4f}", *(f"{dev[m].dev_nll:.4f}" for m in methods),
                 "", *(estimate(dev[m].dev_nll_change, "+.4f") for m in methods)])
    header = ["", *(LABELS[k] + (" (patch.json)" if k == ev.chosen else "") for k in models),
              *(f"{m} − base" for m in methods)]
    return md_table(header, rows)


PATH_WORDS = {"direct": "its own write", "mlp": "the final MLP reading its write",
              "rescale": "the final norm's rescale"}


def _reading(r: AmplifiedComponent) -> str:
    """The amplification in words, from the measured paths only."""
    lifts = [p for p, e in r.paths.items() if e.ci_low is not None and e.ci_low > 0]
    if r.total.ci_high is not None and r.total.ci_high < 0:
        return "alone, it lowers p(answer): it helps only together with the other gains"
    if lifts:
        return "p(answer) rises through " + " and ".join(PATH_WORDS[p] for p in lifts)
    return "alone, no path changes p(answer) beyond its interval"


def _amplified(ev: Evaluation) -> list[str]:
    """Where a fit amplified a component: what that does to the answer, path by path (`evaluate.amplified`)."""
    out = []
    for method, rows in ev.amplified.items():
        if not rows:
            continue
        out.append(f"\n#### What the {LABELS[method]} amplify (gain > 1), test split\n\n"
                   "Each component alone at its gain. Change of log p(answer) in total, and along each path alone: "
                   "direct (its extra write, read through the final norm at its base scale), through the final MLP "
                   "(which reads what a head wrote), and through the final norm's rescale (the norm divides the "
                   "new stream by a new scale). After each, the change of the answer's logit along that path; the "
                   "three sum to the real change.\n")
        out.append(md_table(
            ["component", "gain", "Δ log p(answer)", "direct", "via the final MLP", "via the norm's rescale",
             "reading"],
            [[r.name, f"{r.gain:.3f}", estimate(r.total, "+.4f"),
              *(f"{estimate(r.paths[p], '+.4f')} (logit {number(r.answer_logit[p].value, '+.4f')})"
                for p in ("direct", "mlp", "rescale")), _reading(r)] for r in rows]))
    return out


def _servable(ev: Evaluation) -> list[str]:
    return [f"* `{m.file}` ({m.name}): merged checkpoint {'yes' if m.merged is None else 'no (' + m.merged + ')'}; "
            f"LoRA {'yes' if m.lora is None else 'no (' + m.lora + ')'}." for m in ev.methods]


def _relations(ev: Evaluation) -> str:
    models = ["base", *(m.name for m in ev.methods)]
    rows = []
    for relation, r in ev.by_relation.items():
        for metric in ("accuracy", "mean_p_answer", "ece_equal_width"):
            rows.append([relation if metric == "accuracy" else "", f"{r.n} / {r.n_groups}", METRIC_LABELS[metric],
                         *(estimate(r.models[k][metric]) for k in models),
                         *(estimate(r.differences[f"{m}_minus_base"][metric], "+.3f") for m in models[1:])])
    return md_table(["relation", "prompts / subjects", "metric", *(LABELS[k] for k in models),
                     *(f"{m} − base" for m in models[1:])], rows)


def _transfer(d: AnalysisResult, ev: Evaluation) -> str:
    """Each test relation: its size, the base model's accuracy and NLL, and the chosen patch's change of both (every
    candidate's when none is chosen), with whether the fit saw the relation at all."""
    methods = [ev.chosen] if ev.chosen else [m.name for m in ev.methods]
    fitted_on = set(d.data.split_relations.get("train", [])) | set(d.data.split_relations.get("dev", []))
    rows = []
    for relation, r in ev.by_relation.items():
        changes = [estimate(r.differences[f"{m}_minus_base"][metric], "+.3f") for m in methods
                   for metric in ("accuracy", "nll")]
        rows.append([relation, ("yes" if relation in fitted_on else "**no**") if d.data.split_relations else "n/a",
                     str(r.n), str(r.n_groups), estimate(r.models["base"]["accuracy"]),
                     estimate(r.models["base"]["nll"]), *changes])
    header = ["relation", "in train/dev", "prompts", "subjects", "base accuracy", "base NLL (nats)",
              *(f"{LABELS[m]}: Δ {metric}" for m in methods for metric in ("accuracy", "NLL"))]
    return (f"\n#### Transfer per relation (test split, split by {d.data.split_by})\n\n"
            "Does the patch carry over to each relation? Split by relation, the test relations are ones the fit and "
            "the dev split never saw (\"in train/dev: no\"). Changes are patched − base with paired 95% bootstrap "
            "intervals over the relation's subjects.\n\n" + md_table(header, rows) + "\n")


def _evaluation(d: AnalysisResult) -> list[str]:
    ev = d.evaluation
    if ev is None:
        return []
    out = ["\n## 6. Evaluation on held-out data\n"]
    out.append(f"Brackets: 95% percentile bootstrap intervals, {ev.n_boot} resamples of subjects "
               "(each draws subjects with replacement, all prompts of a subject together; differences are paired: "
               "the same resamples for every model). ECE is biased upward in small resamples, so its point estimate "
               "can sit at the low end of its interval; the paired differences are the fair comparison. "
               f"Temperature baseline: T = {ev.temperature:.3f}, fitted (NLL) on the train split.\n")
    out.append("The comparison of every method is the table at the top of this report.\n")
    out.append(f"**patch.json**: {ev.choice}.\n" if ev.chosen else f"**No patch is recommended**: {ev.choice}. "
               "The candidates are written beside the report; no patch.json.\n")
    out += _servable(ev)
    out.append("\n" + _set_section("Held-out test split", ev.test, ev))
    out += _amplified(ev)
    out.append("\n#### Per relation (test split)\n\n" + _relations(ev))
    out.append(_transfer(d, ev))
    if ev.unknown:
        out.append(f"\n{_set_section('Unknown subjects', ev.unknown, ev)}\n\n({d.data.unknown_source}; where "
                   "the answers are invented too, accuracy is ~0 by construction and the confidence is what counts.)")
    for name, n in ev.neutral.items():
        ci = n.relative_change_ci
        out.append(f"\nNeutral text, {name}: NLL per token on {n.n_lines} held-out lines ({n.n_tokens} tokens): "
                   f"base {n.base_nll:.4f}, patched {n.patched_nll:.4f}, relative change "
                   f"{n.relative_change:+.2%} [{percent(ci[0])}, {percent(ci[1])}].\n")
    for name, s in ev.suppression_after_patch.items():
        out.append(f"\nWith {name} the final block lowers p(answer) on {percent(s.share_suppressed)} of test prompts "
                   f"(base: {percent(d.findings.test.share_suppressed)}).\n")
    out.append(_image(d.files, "plot_reliability", "reliability diagrams"))
    out.append(CAVEATS)
    return out


def render_markdown(d: AnalysisResult) -> str:
    out = [f"# recallfix analysis: {Path(d.model.path).name}\n", f"**Findings.** {d.findings.text}\n"]
    if d.evaluation is not None:
        out.append(_at_a_glance(d.evaluation) + "\n")
    if d.checks:
        out += _checks(d)
    for section in (_setup, _logit_lens, _final_layer, _mechanisms, _findings, _patch, _evaluation,
                    confidence_section):
        out += section(d)
    return "\n".join(out) + "\n"


def write_markdown(out: Path, d: AnalysisResult) -> Path:
    return atomic_write_text(out / "report.md", render_markdown(d))
