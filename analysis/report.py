"""RUN/report.md and its PNG plots, rendered from the analysis dict (the same numbers as analysis.json)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from recallfix.patches.io import atomic_write_text  # noqa: E402

NEG, POS, GREY = "#c0392b", "#2471a3", "#7f8c8d"
MODEL_LABELS = {"base": "base", "patched": "patched", "temperature": "temperature-scaled"}


def _save(fig: plt.Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _layer_axis(num_layers: int) -> tuple[list[int], list[str]]:
    ticks = list(range(num_layers + 1))
    step = max(1, (num_layers + 1) // 12)
    labels = ["emb" if t == 0 else str(t) if t % step == 0 or t == num_layers else "" for t in ticks]
    return ticks, labels


def plot_logit_lens(d: dict, path: Path) -> str:
    lens = d["logit_lens"]
    ticks, labels = _layer_axis(lens["num_layers"])
    fig, (ax_p, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in lens["by_relation"].items():
        if curve["n"]:
            ax_p.plot(ticks, curve["mean_p_answer"], lw=1, alpha=0.8, label=f"{name} ({curve['n']})")
            ax_r.plot(ticks, curve["median_rank"], lw=1, alpha=0.8)
    ax_p.plot(ticks, lens["all"]["mean_p_answer"], color="black", lw=2.5, label="all")
    ax_r.plot(ticks, lens["all"]["median_rank"], color="black", lw=2.5)
    for ax in (ax_p, ax_r):
        ax.axvspan(lens["num_layers"] - 1, lens["num_layers"], color=NEG, alpha=0.08)
        ax.set_xticks(ticks, labels)
        ax.set_xlabel("after block (emb = embeddings; shaded: the final block)")
    ax_p.set_ylabel("mean p(answer)")
    ax_r.set_ylabel("median rank of the answer")
    ax_r.set_yscale("log")
    ax_p.set_title("Logit lens: p(answer) per relation")
    ax_r.set_title("Logit lens: rank of the answer")
    ax_p.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def _bars(ax: plt.Axes, names: Sequence[str], values: Sequence[float | None], shares: Sequence[float | None],
          title: str, ylabel: str) -> None:
    vals = [v if v is not None else 0.0 for v in values]
    ax.bar(range(len(vals)), vals, color=[NEG if v < 0 else POS for v in vals])
    for i, (v, s) in enumerate(zip(vals, shares, strict=True)):
        if s is not None:
            ax.annotate(f"{s:.0%}", (i, v), ha="center", va="bottom" if v >= 0 else "top", fontsize=7)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(vals)), names, rotation=60, ha="right", fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)


def plot_final_layer(d: dict, path: Path) -> str:
    fl = d["final_layer"]
    comps = fl["components"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), gridspec_kw={"width_ratios": [1.2, 1, 1.2]})
    names = [c["name"] for c in comps] + ["rescale"]
    _bars(axes[0], names, [c["mean_dla"] for c in comps] + [fl["rescale"]["mean_dla"]],
          [c["share_dla_negative"] for c in comps] + [fl["rescale"]["share_dla_negative"]],
          f"L{fl['layer']}: direct logit attribution\n(labels: share of prompts < 0)", "mean DLA (logit vs mean)")
    _bars(axes[1], [c["name"] for c in comps], [c["mean_effect"] for c in comps],
          [c["share_effect_negative"] for c in comps],
          f"L{fl['layer']}: effect on log p(answer)\n(removing the write, real final norm)", "mean Δ log p (nats)")
    neurons = fl["neurons_suppressing"]
    _bars(axes[2], [n["name"] for n in neurons], [n["mean_effect"] for n in neurons],
          [n["share_effect_negative"] for n in neurons], "most suppressing neurons\n(first-order effect on log p)",
          "mean Δ log p (nats)")
    return _save(fig, path)


def plot_movers(d: dict, path: Path) -> str | None:
    movers = d["mechanisms"]["movers"]
    if not movers or not movers["scatter"]:
        return None
    rows = {h["name"]: h for h in movers["heads"]}
    names = list(movers["scatter"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        pts = movers["scatter"][name]
        h = rows[name]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=6, alpha=0.5, color=POS if h["is_mover"] else GREY)
        r = h["correlation"]
        ax.set_title(f"{name}{' (mover)' if h['is_mover'] else ''}\nr = {r:.2f}" if r is not None else name,
                     fontsize=9)
        ax.set_xlabel("attention to subject tokens")
        ax.axhline(0, color="black", lw=0.5)
    axes[0][0].set_ylabel("DLA to the subject token")
    return _save(fig, path)


def plot_regression(d: dict, path: Path) -> str | None:
    reg = d["mechanisms"]["mlp_regression"]
    if not reg:
        return None
    beta = [[h["mean_beta"] if h["mean_beta"] is not None else math.nan for h in r["heads"]] for r in reg]
    fig, (ax_b, ax_i) = plt.subplots(1, 2, figsize=(11, 0.5 * len(reg) + 2.5),
                                     gridspec_kw={"width_ratios": [max(2, len(beta[0])) / 3, 1]})
    limit = max(1.5, max((abs(b) for row in beta for b in row if not math.isnan(b)), default=1.5))
    im = ax_b.imshow(beta, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    if len(beta) * len(beta[0]) <= 400:
        for i, row in enumerate(beta):
            for j, b in enumerate(row):
                ax_b.text(j, i, f"{b:.2f}", ha="center", va="center", fontsize=6)
    ax_b.set_xticks(range(len(beta[0])))
    ax_b.set_yticks(range(len(beta)), [r["name"] for r in reg])
    ax_b.set_xlabel("head of the same block")
    ax_b.set_ylabel("MLP regressed on its block's heads")
    ax_b.set_title("mean beta (>1 amplify, <0 erase)", fontsize=10)
    fig.colorbar(im, ax=ax_b, fraction=0.04)
    vals = [r["intercept"]["mean_dla"] or 0.0 for r in reg]
    ax_i.barh(range(len(vals)), vals, color=[POS if v > 0 else NEG for v in vals])
    ax_i.set_yticks(range(len(vals)), [r["name"] for r in reg])
    ax_i.invert_yaxis()
    ax_i.axvline(0, color="black", lw=0.8)
    ax_i.set_title("intercept through the logit lens\n(mean DLA to the answer)", fontsize=10)
    return _save(fig, path)


def plot_fit(d: dict, path: Path) -> str | None:
    patch = d["patch"]
    if not patch or not patch["history"]:
        return None
    hist = patch["history"]
    epochs = [h["epoch"] for h in hist]

    def series(key: str) -> list[float]:
        return [h[key] if h[key] is not None else math.nan for h in hist]

    fig, (ax_n, ax_r) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_n.plot(epochs, series("dev_nll"), marker=".", color=POS, label="dev NLL, recalled facts")
    ax_n.plot(epochs, series("dev_kl_neutral"), marker=".", color=GREY, label="dev KL, neutral text")
    ax_n.set_ylabel("nats")
    ax_n.set_title("what the fit lowers", fontsize=10)
    ax_r.plot(epochs, series("dev_confidence_rise_unrecalled"), marker=".", color=NEG,
              label="top-1 rise, guarded dev prompts")
    budget = patch["fit_config"].get("max_confidence_rise")
    if budget is not None:
        ax_r.axhline(budget, color=NEG, ls="--", lw=0.8, label=f"budget {budget:g}")
    ax_r.set_ylabel("mean rise of top-1 probability")
    ax_r.set_title("what it must not raise", fontsize=10)
    ax_g = ax_r.twinx()
    ax_g.step(epochs, series("guard_weight"), where="post", color="black", lw=0.8, label="guard weight λ")
    ax_g.set_yscale("log")
    ax_g.set_ylabel("λ")
    for ax in (ax_n, ax_r):
        ax.axvline(patch["best_epoch"], color="black", lw=0.8, ls=":")
        ax.set_xlabel("epoch (dotted: kept)")
    ax_n.legend(fontsize=7)
    lines, labels = ax_r.get_legend_handles_labels()
    lines2, labels2 = ax_g.get_legend_handles_labels()
    ax_r.legend(lines + lines2, labels + labels2, fontsize=7)
    return _save(fig, path)


def plot_reliability(d: dict, path: Path) -> str | None:
    ev = d["evaluation"]
    if not ev:
        return None
    sets = [("test", ev["test"])] + ([("unknown subjects", ev["unknown"])] if ev["unknown"] else [])
    fig, axes = plt.subplots(len(sets), 3, figsize=(12, 3.8 * len(sets)), squeeze=False)
    for row, (set_name, s) in zip(axes, sets, strict=True):
        for ax, model in zip(row, ("base", "patched", "temperature"), strict=True):
            bins = [b for b in s["reliability"][model] if b["count"]]
            width = s["reliability"][model][0]["hi"] - s["reliability"][model][0]["lo"]
            centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
            acc = [b["accuracy"] for b in bins]
            conf = [b["confidence"] for b in bins]
            ax.bar(centres, acc, width=width * 0.9, color=POS, alpha=0.85, label="accuracy")
            ax.scatter(centres, conf, marker="_", s=180, color=NEG, linewidths=2, label="mean confidence", zorder=3)
            ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--")
            for x, b in zip(centres, bins, strict=True):
                ax.text(x, 0.99, str(b["count"]), ha="center", va="top", fontsize=6, rotation=90, color=GREY)
            m = s["models"][model]
            ax.set_title(f"{set_name}: {MODEL_LABELS[model]}\nECE {m['ece_equal_width']['value']:.3f}, "
                         f"acc {m['accuracy']['value']:.3f}", fontsize=9)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xlabel("confidence (top-1 probability)")
        row[0].set_ylabel("accuracy")
        row[0].legend(fontsize=7, loc="upper left")
    return _save(fig, path)


PLOTS = {
    "plot_logit_lens": ("logit_lens.png", plot_logit_lens),
    "plot_final_layer": ("final_layer.png", plot_final_layer),
    "plot_movers": ("mover_heads.png", plot_movers),
    "plot_mlp_regression": ("mlp_regression.png", plot_regression),
    "plot_fit": ("fit.png", plot_fit),
    "plot_reliability": ("reliability.png", plot_reliability),
}


def write_plots(out: Path, d: dict[str, Any]) -> dict[str, str]:
    """Render every plot that has data into `out`; returns {key: file name}."""
    files = {}
    for key, (name, fn) in PLOTS.items():
        written = fn(d, out / name)
        if written:
            files[key] = written
    return files


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _est(e: dict, fmt: str = ".3f") -> str:
    if e["value"] is None:
        return "n/a"
    if e["ci_low"] is None:
        return format(e["value"], fmt)
    return f"{format(e['value'], fmt)} [{format(e['ci_low'], fmt)}, {format(e['ci_high'], fmt)}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


METRIC_LABELS = {
    "accuracy": "accuracy", "mean_p_answer": "mean p(answer)", "mean_confidence": "mean top-1 probability",
    "ece_equal_width": "ECE (15 equal-width bins)", "ece_equal_mass": "ECE (15 equal-mass bins)",
    "brier": "Brier (multi-class)", "nll": "NLL (nats)", "auroc": "AUROC (confidence vs correct)",
}


def _component_table(rows: Sequence[dict]) -> str:
    return _table(["component", "mean DLA", "DLA < 0", "mean Δ log p", "Δ log p < 0"],
                  [[r["name"], _f(r["mean_dla"]), _pct(r["share_dla_negative"]), _f(r["mean_effect"]),
                    _pct(r["share_effect_negative"])] for r in rows])


def _suppression_rows(s: dict, label: str) -> list[str]:
    lo, hi = s["share_suppressed_ci"]
    return [label, str(s["n"]), _f(s["mean_p_before"]), _f(s["mean_p_after"]),
            f"{_pct(s['share_suppressed'])} [{_pct(lo)}, {_pct(hi)}]",
            _pct(s["accuracy_before"]), _pct(s["accuracy_after"]),
            f"{_pct(s['share_suppressed_recalled'])} of {s['n_recalled']}"]


def _set_section(title: str, s: dict) -> str:
    rows = []
    for metric, label in METRIC_LABELS.items():
        m = {k: s["models"][k][metric] for k in ("base", "patched", "temperature")}
        dpb = s["differences"]["patched_minus_base"][metric]
        dpt = s["differences"]["patched_minus_temperature"][metric]
        rows.append([label, _est(m["base"]), _est(m["patched"]), _est(m["temperature"]), _est(dpb, "+.3f"),
                     _est(dpt, "+.3f")])
    return (f"#### {title} ({s['n']} prompts, {s['n_groups']} subjects)\n\n"
            + _table(["metric", "base", "patched", "temperature-scaled", "patched − base", "patched − temperature"],
                     rows))


def _image(files: dict, key: str, alt: str) -> str:
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


def render_markdown(d: dict[str, Any]) -> str:
    m, data, files = d["model"], d["data"], d["files"]
    fl, mech, verdict, patch, ev = d["final_layer"], d["mechanisms"], d["verdict"], d["patch"], d["evaluation"]
    L = fl["layer"]
    out = [f"# recallfix analysis: {Path(m['path']).name}\n"]
    out.append(f"**Verdict.** {verdict['text']}\n")
    if d["criteria"]:
        out.append("## Acceptance checks (held-out numbers)\n")
        def value(c: dict) -> str:
            fmt = "+.4f" if c["threshold"] == 0 else ".4f"
            return _est({"value": c["value"], "ci_low": c["ci_low"], "ci_high": c["ci_high"]}, fmt)

        out.append(_table(["check", "value [95% interval]", "result"],
                          [[c["description"], value(c), {True: "PASS", False: "**FAIL**", None: "n/a"}[c["passed"]]]
                           for c in d["criteria"]]))
        failed = [c["name"] for c in d["criteria"] if c["passed"] is False]
        out.append("\n" + (f"**Not met:** {', '.join(failed)}. These are the measured numbers; nothing was tuned "
                           "on the test split or the unknown subjects to change them.\n" if failed
                           else "All checks pass on the point estimates (intervals below).\n"))

    out.append("## Setup\n")
    out.append(_table(["", ""], [
        ["model", f"`{m['path']}` ({m['architecture']}, {m['num_layers']} layers x {m['num_heads']} heads of "
                  f"{m['head_dim']}, d_model {m['hidden_size']}, d_mlp {m['intermediate_size']}, "
                  f"vocab {m['vocab_size']})"],
        ["run on", f"{m['device']}, {m['dtype']}"],
        ["facts", f"`{data['facts_path']}`: {data['n_facts']} prompts ({data['n_dropped']} dropped: no answer token); "
                  f"splits {data['splits']} by subject, seed {data['seed']}; sha256 `{data['facts_sha256'][:16]}…`"],
        ["relations", ", ".join(f"{k} ({v})" for k, v in data["relations"].items())],
        ["unknown subjects",
         f"`{data['unknown_path']}` ({data['n_unknown']} prompts)" if data["unknown_path"] else "none"],
        ["neutral text", f"{data['neutral_source']}: {data['n_neutral_fit']} lines for the KL guard, "
                         f"{data['n_neutral_eval']} held out for the NLL check"],
        ["runtime", ", ".join(f"{k} {v:.1f}s" for k, v in d["runtime_s"].items())],
    ]))
    out.append("\nAnswer token: the first token of \" answer\" after the prompt. \"Before the final block\" is the "
               "logit lens of the stream entering the last block (the model's own final norm and unembedding).\n")

    out.append("## 1. Logit lens\n")
    out.append(_image(files, "plot_logit_lens", "logit lens"))
    curve = d["logit_lens"]["all"]
    out.append(_table(["after block"] + ["emb" if i == 0 else str(i) for i in range(len(curve["mean_p_answer"]))],
                      [["mean p(answer)"] + [_f(v) for v in curve["mean_p_answer"]],
                       ["median rank"] + [_f(v, ".0f") for v in curve["median_rank"]],
                       ["accuracy"] + [_pct(v) for v in curve["accuracy"]]]))
    out.append("\nPer relation: mean p(answer) before → after the final block\n")
    out.append(_table(["relation", "n", "before", "after"],
                      [[r, str(c["n"]), _f(c["mean_p_answer"][-2]), _f(c["mean_p_answer"][-1])]
                       for r, c in d["logit_lens"]["by_relation"].items() if c["n"]]))

    out.append(f"\n## 2. The final block (L{L}) at the last position ({fl['n_prompts']} prompts)\n")
    out.append("DLA: the write's push on the answer's logit against the mean logit, final norm frozen "
               "(`recallfix.patches.decompose`). Δ log p: log p(answer) minus log p(answer) without the write, "
               "through the real final norm. Shares: prompts where the value is < 0 (the component pushes the "
               "answer down).\n")
    out.append(_image(files, "plot_final_layer", "final-layer components"))
    out.append(_component_table(fl["components"]))
    out.append(f"\nExact split of the change of z_answer − mean z across the block (mean "
               f"{_f(fl['mean_change_logit'])}): the DLAs above plus the rescaling of the stream already there by "
               f"the norm's new scale, **{_f(fl['rescale']['mean_dla'])}** (negative on "
               f"{_pct(fl['rescale']['share_dla_negative'])} of prompts). Mean change of log p(answer): "
               f"{_f(fl['mean_change_logp'])} nats.\n")
    out.append("\nMost suppressing neurons (first-order effect on log p(answer)):\n")
    out.append(_component_table(fl["neurons_suppressing"]))
    out.append("\nMost promoting neurons:\n")
    out.append(_component_table(fl["neurons_promoting"]))

    out.append("\n## 3. Mechanisms\n")
    movers = mech["movers"]
    if movers:
        out.append(f"### Mover heads ({movers['n_prompts']} prompts with a located subject)\n")
        out.append("Attention from the last position to the subject's tokens against the head's DLA to the "
                   f"subject's first token. Mover: mean attention ≥ {movers['min_attention']}, positive correlation "
                   "and positive mean attribution.\n")
        out.append(_image(files, "plot_movers", "mover heads"))
        out.append(_table(["head", "mean attention", "mean subject DLA", "r", "mover"],
                          [[h["name"], _f(h["mean_attention"]), _f(h["mean_subject_attribution"]),
                            _f(h["correlation"], ".2f"), "yes" if h["is_mover"] else ""]
                           for h in movers["heads"][:10]]))
        out.append(f"\nMover heads: {', '.join(movers['movers']) or 'none'}.\n")
    else:
        out.append("### Mover heads\n\nNo prompt has a subject that could be located in its tokens.\n")
    out.append("### MLPs regressed on their block's heads\n")
    out.append("Per prompt, m = Σ β_h h_h + e by least squares over the d_model coordinates (β > 1 amplifies what "
               "head h wrote, β < 0 erases it); e, the intercept, is read through the logit lens.\n")
    out.append(_image(files, "plot_mlp_regression", "MLP regression"))
    out.append(_table(["MLP", "mean R²", "MLP DLA", "intercept DLA", "answer rank in intercept (median)",
                       "answer in intercept's top 10", "amplified heads (β>1 on most prompts)",
                       "erased heads (β<0 on most prompts)"],
                      [[r["name"], _f(r["mean_r2"]), _f(r["mean_mlp_dla"]), _f(r["intercept"]["mean_dla"]),
                        _f(r["intercept"]["median_answer_rank"], ".0f"), _pct(r["intercept"]["share_answer_top10"]),
                        ", ".join(h["name"] for h in r["heads"] if (h["share_amplify"] or 0) > 0.5) or "–",
                        ", ".join(h["name"] for h in r["heads"] if (h["share_erase"] or 0) > 0.5) or "–"]
                       for r in mech["mlp_regression"]]))
    out.append(f"\nThe MLP whose intercept points at the answer most: {mech['answer_mlp'] or 'none'}.\n")

    out.append("\n## 4. Verdict\n")
    out.append(_table(["prompts", "n", "p before", "p after", "suppressed", "acc before", "acc after",
                       "suppressed among recalled"],
                      [_suppression_rows(verdict["test"], "test"), _suppression_rows(verdict["all"], "all")]))
    out.append(f"\n{verdict['text']}\n")

    out.append("\n## 5. The patch\n")
    if not patch:
        out.append("No final-block component suppresses the answer on the train split, so no patch was made.\n")
        return "\n".join(out) + "\n"
    out.append(f"Selected on the train split: {patch['selection_rule']}.\n")
    out.append(_table(["component", "train mean Δ log p", "train Δ log p < 0", "learned gain"],
                      [[c["name"], _f(c["mean_effect"]), _pct(c["share_effect_negative"]),
                        _f(patch["gains"][c["name"]])] for c in patch["candidates"]]))
    cfg = patch["fit_config"]
    hist = {h["epoch"]: h for h in patch["history"]}
    best = hist[patch["best_epoch"]]
    guards = sorted({h["guard_weight"] for h in patch["history"]})
    budget = cfg["max_confidence_rise"]
    example = patch["nonce_examples"][0] if patch["nonce_examples"] else ""
    out.append(
        f"\nFit: Adam (lr {cfg['lr']}) on the gains through the real final block, final norm and unembedding. "
        f"Objective: NLL of the answer on the {patch['n_train_recalled']} of {patch['n_train']} train prompts whose "
        f"answer is top-1 before the final block; + λ x KL(base‖patched) on the other train prompts and on "
        f"{patch['n_nonce_train']} prompts that fill the train templates with nonce subjects (invented names such "
        f"as \"{example}\", and names borrowed from other relations: no model can know these, so the patch must "
        f"leave them alone); + {cfg['kl_weight']} x KL(base‖patched) on neutral text; + {cfg['l2']} x Σ(g−1)²; gains "
        f"kept in [{cfg['min_gain']}, {cfg['max_gain']}].\n")
    if budget is not None:
        out.append(
            f"No new overconfidence, as a constraint checked on dev ({patch['n_nonce_dev']} nonce prompts from the "
            f"dev templates and the dev prompts not recalled): the mean top-1 probability may rise by at most "
            f"{budget}; an epoch over budget multiplies λ by {cfg['guard_growth']} (λ took the values "
            f"{', '.join(f'{g:g}' for g in guards)}) and cannot be kept. Kept: epoch {patch['best_epoch']} of "
            f"{patch['epochs_run']}{' (early stop)' if patch['stopped_early'] else ''}, the within-budget epoch "
            f"with the lowest dev NLL (dev top-1 rise on guarded prompts {_f(best['dev_confidence_rise_unrecalled'])}, "
            f"dev NLL {_f(best['dev_nll'])} vs {_f(hist[0]['dev_nll'])} unpatched).\n")
    else:
        out.append(f"Kept: epoch {patch['best_epoch']} of {patch['epochs_run']}, the lowest dev objective.\n")
    out.append(
        f"The saved patch `{patch['file']}` (id {patch['id']}), applied with `apply_patch`, reproduces the fitted "
        f"logits to {patch['max_verify_error']:.1e}; every number below is measured on the model with the patch "
        f"applied. Temperature baseline: T = {patch['temperature']:.3f}, fitted (NLL) on the same train split.\n")
    out.append(_image(files, "plot_fit", "fit"))
    out.append("\n### Evaluation\n")
    out.append(f"Brackets: 95% percentile bootstrap intervals, {d['evaluation']['n_boot']} resamples of subjects "
               "(each draws subjects with replacement, all prompts of a subject together; differences are paired: "
               "the same resamples for every model). ECE is biased upward in small resamples, so its point estimate "
               "can sit at the low end of its interval; the paired differences are the fair comparison.\n")
    out.append(_set_section("Held-out test split", ev["test"]))
    if ev["unknown"]:
        out.append("\n" + _set_section("Unknown subjects", ev["unknown"]))
    if ev["neutral"]:
        n = ev["neutral"]
        ci = n["relative_change_ci"]
        out.append(f"\n#### Neutral text\n\nNLL per token on {n['n_lines']} held-out lines ({n['n_tokens']} tokens): "
                   f"base {n['base_nll']:.4f}, patched {n['patched_nll']:.4f}, relative change "
                   f"{n['relative_change']:+.2%} [{_pct(ci[0])}, {_pct(ci[1])}].\n")
    out.append("\n" + _comparison(ev))
    s = ev["suppression_after_patch"]
    out.append(f"\nAfter the patch the final block lowers p(answer) on {_pct(s['share_suppressed'])} of test prompts "
               f"(before the patch: {_pct(verdict['test']['share_suppressed'])}).\n")
    out.append(_image(files, "plot_reliability", "reliability diagrams"))
    out.append(CAVEATS)
    return "\n".join(out) + "\n"


def _comparison(ev: dict) -> str:
    """One paragraph: what the patch buys against the base model and against temperature scaling."""
    t = ev["test"]["models"]
    v = {m: {k: t[m][k]["value"] for k in ("accuracy", "ece_equal_width", "mean_confidence")} for m in t}
    text = (f"**Reading.** On held-out facts the patch moves accuracy {_f(v['base']['accuracy'])} → "
            f"{_f(v['patched']['accuracy'])} and ECE {_f(v['base']['ece_equal_width'])} → "
            f"{_f(v['patched']['ece_equal_width'])}; temperature scaling cannot change the top-1 token (accuracy "
            f"stays {_f(v['temperature']['accuracy'])}) but reaches ECE {_f(v['temperature']['ece_equal_width'])} "
            f"by rescaling every prompt alike.")
    if ev["unknown"]:
        u = ev["unknown"]["models"]
        text += (f" That global rescaling is also what it does on unknown subjects: mean top-1 probability "
                 f"{_f(u['base']['mean_confidence']['value'])} → {_f(u['temperature']['mean_confidence']['value'])} "
                 f"with temperature, {_f(u['patched']['mean_confidence']['value'])} with the patch.")
    return text + "\n"


def write_markdown(out: Path, d: dict[str, Any]) -> Path:
    return atomic_write_text(out / "report.md", render_markdown(d))
