"""The PNG plots of RUN/report.md, drawn from the typed `AnalysisResult` (the numbers of analysis.json)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..schema import AnalysisResult, EstimateModel, ReliabilityBin  # noqa: E402
from .format import MODEL_LABELS, number  # noqa: E402

NEG, POS, GREY = "#c0392b", "#2471a3", "#7f8c8d"


def save_figure(fig: plt.Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _layer_axis(num_layers: int) -> tuple[list[int], list[str]]:
    ticks = list(range(num_layers + 1))
    step = max(1, (num_layers + 1) // 12)
    labels = ["emb" if t == 0 else str(t) if t % step == 0 or t == num_layers else "" for t in ticks]
    return ticks, labels


def plot_logit_lens(d: AnalysisResult, path: Path) -> str:
    lens = d.logit_lens
    ticks, labels = _layer_axis(lens.num_layers)
    fig, (ax_p, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in lens.by_relation.items():
        if curve.n:
            ax_p.plot(ticks, curve.mean_p_answer, lw=1, alpha=0.8, label=f"{name} ({curve.n})")
            ax_r.plot(ticks, curve.median_rank, lw=1, alpha=0.8)
    ax_p.plot(ticks, lens.all.mean_p_answer, color="black", lw=2.5, label="all")
    ax_r.plot(ticks, lens.all.median_rank, color="black", lw=2.5)
    for ax in (ax_p, ax_r):
        ax.axvspan(lens.num_layers - 1, lens.num_layers, color=NEG, alpha=0.08)
        ax.set_xticks(ticks, labels)
        ax.set_xlabel("after block (emb = embeddings; shaded: the final block)")
    ax_p.set_ylabel("mean p(answer)")
    ax_r.set_ylabel("median rank of the answer")
    ax_r.set_yscale("log")
    ax_p.set_title("Logit lens: p(answer) per relation")
    ax_r.set_title("Logit lens: rank of the answer")
    ax_p.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)


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


def plot_final_layer(d: AnalysisResult, path: Path) -> str:
    fl = d.final_layer
    comps = fl.components
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), gridspec_kw={"width_ratios": [1.2, 1, 1.2]})
    _bars(axes[0], [c.name for c in comps] + ["rescale"], [c.mean_dla for c in comps] + [fl.rescale.mean_dla],
          [c.share_dla_negative for c in comps] + [fl.rescale.share_dla_negative],
          f"L{fl.layer}: direct logit attribution\n(labels: share of prompts < 0)", "mean DLA (logit vs mean)")
    _bars(axes[1], [c.name for c in comps], [c.mean_effect for c in comps], [c.share_effect_negative for c in comps],
          f"L{fl.layer}: effect on log p(answer)\n(removing the write, real final norm)", "mean Δ log p (nats)")
    neurons = fl.neurons_suppressing
    _bars(axes[2], [n.name for n in neurons], [n.mean_effect for n in neurons],
          [n.share_effect_negative for n in neurons], "most suppressing neurons\n(first-order effect on log p)",
          "mean Δ log p (nats)")
    return save_figure(fig, path)


def plot_movers(d: AnalysisResult, path: Path) -> str | None:
    movers = d.mechanisms.movers
    if not movers or not movers.scatter:
        return None
    rows = {h.name: h for h in movers.heads}
    names = list(movers.scatter)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        pts = movers.scatter[name]
        h = rows[name]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=6, alpha=0.5, color=POS if h.is_mover else GREY)
        r = h.correlation
        ax.set_title(f"{name}{' (mover)' if h.is_mover else ''}\nr = {r:.2f}" if r is not None else name, fontsize=9)
        ax.set_xlabel("attention to subject tokens")
        ax.axhline(0, color="black", lw=0.5)
    axes[0][0].set_ylabel("DLA to the subject token")
    return save_figure(fig, path)


def plot_regression(d: AnalysisResult, path: Path) -> str | None:
    reg = d.mechanisms.mlp_regression
    if not reg:
        return None
    beta = [[h.mean_beta if h.mean_beta is not None else math.nan for h in r.heads] for r in reg]
    fig, (ax_b, ax_i) = plt.subplots(1, 2, figsize=(11, 0.5 * len(reg) + 2.5),
                                     gridspec_kw={"width_ratios": [max(2, len(beta[0])) / 3, 1]})
    limit = max(1.5, max((abs(b) for row in beta for b in row if not math.isnan(b)), default=1.5))
    im = ax_b.imshow(beta, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    if len(beta) * len(beta[0]) <= 400:
        for i, row in enumerate(beta):
            for j, b in enumerate(row):
                ax_b.text(j, i, f"{b:.2f}", ha="center", va="center", fontsize=6)
    ax_b.set_xticks(range(len(beta[0])))
    ax_b.set_yticks(range(len(beta)), [r.name for r in reg])
    ax_b.set_xlabel("head of the same block")
    ax_b.set_ylabel("MLP regressed on its block's heads")
    ax_b.set_title("mean beta (>1 amplify, <0 erase)", fontsize=10)
    fig.colorbar(im, ax=ax_b, fraction=0.04)
    vals = [r.intercept.mean_dla or 0.0 for r in reg]
    ax_i.barh(range(len(vals)), vals, color=[POS if v > 0 else NEG for v in vals])
    ax_i.set_yticks(range(len(vals)), [r.name for r in reg])
    ax_i.invert_yaxis()
    ax_i.axvline(0, color="black", lw=0.8)
    ax_i.set_title("intercept through the logit lens\n(mean DLA to the answer)", fontsize=10)
    return save_figure(fig, path)


def plot_fit(d: AnalysisResult, path: Path) -> str | None:
    patch = d.patch
    if not patch or not patch.history:
        return None
    hist = patch.history
    epochs = [h.epoch for h in hist]

    def series(key: str) -> list[float]:
        return [v if (v := getattr(h, key)) is not None else math.nan for h in hist]

    fig, (ax_n, ax_r) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_n.plot(epochs, series("dev_nll"), marker=".", color=POS, label="dev NLL, recalled facts")
    ax_n.plot(epochs, series("dev_kl_neutral"), marker=".", color=GREY, label="dev KL, neutral text")
    ax_n.set_ylabel("nats")
    ax_n.set_title("what the fit lowers", fontsize=10)
    ax_r.plot(epochs, series("dev_confidence_rise_unrecalled"), marker=".", color=NEG,
              label="top-1 rise, guarded dev prompts")
    budget = patch.fit_config.get("max_confidence_rise")
    if budget is not None:
        ax_r.axhline(budget, color=NEG, ls="--", lw=0.8, label=f"budget {budget:g}")
    ax_r.set_ylabel("mean rise of top-1 probability")
    ax_r.set_title("what it must not raise", fontsize=10)
    ax_g = ax_r.twinx()
    ax_g.step(epochs, series("guard_weight"), where="post", color="black", lw=0.8, label="guard weight λ")
    ax_g.set_yscale("log")
    ax_g.set_ylabel("λ")
    for ax in (ax_n, ax_r):
        ax.axvline(patch.best_epoch, color="black", lw=0.8, ls=":")
        ax.set_xlabel("epoch (dotted: kept)")
    ax_n.legend(fontsize=7)
    lines, labels = ax_r.get_legend_handles_labels()
    lines2, labels2 = ax_g.get_legend_handles_labels()
    ax_r.legend(lines + lines2, labels + labels2, fontsize=7)
    return save_figure(fig, path)


def plot_reliability(d: AnalysisResult, path: Path) -> str | None:
    ev = d.evaluation
    if not ev:
        return None
    sets = [("test", ev.test)] + ([("unknown subjects", ev.unknown)] if ev.unknown else [])
    models = ["base", *(m.name for m in ev.methods), "temperature"]
    fig, axes = plt.subplots(len(sets), len(models), figsize=(4 * len(models), 3.8 * len(sets)), squeeze=False)
    for row, (set_name, s) in zip(axes, sets, strict=True):
        for ax, model in zip(row, models, strict=True):
            draw_reliability(ax, s.reliability[model], f"{set_name}: {MODEL_LABELS[model]}", s.models[model])
        row[0].set_ylabel("accuracy")
        row[0].legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)


def draw_reliability(ax: plt.Axes, reliability: Sequence[ReliabilityBin], title: str,
                     m: dict[str, EstimateModel]) -> None:
    """One reliability diagram of a model's top-1 confidence, its ECE and accuracy in the title."""
    ece, acc = (m[name].value for name in ("ece_equal_width", "accuracy"))
    draw_bins(ax, reliability, f"{title}\nECE {number(ece)}, acc {number(acc)}")


def draw_bins(ax: plt.Axes, reliability: Sequence[ReliabilityBin], title: str) -> None:
    """One reliability diagram: accuracy bars and mean confidence per bin, each bin's count on top."""
    bins = [b for b in reliability if b.count]
    width = reliability[0].hi - reliability[0].lo
    centres = [(b.lo + b.hi) / 2 for b in bins]
    ax.bar(centres, [b.accuracy for b in bins], width=width * 0.9, color=POS, alpha=0.85, label="accuracy")
    ax.scatter(centres, [b.confidence for b in bins], marker="_", s=180, color=NEG, linewidths=2,
               label="mean confidence", zorder=3)
    ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--")
    for x, b in zip(centres, bins, strict=True):
        ax.text(x, 0.99, str(b.count), ha="center", va="top", fontsize=6, rotation=90, color=GREY)
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")


def plot_calibration(d: AnalysisResult, path: Path) -> str | None:
    """Per variant, the test split's reliability of the raw top-1 probability and of the calibrated confidence."""
    c = d.evaluation.calibration if d.evaluation else None
    if c is None:
        return None
    fig, axes = plt.subplots(2, len(c.variants), figsize=(4 * len(c.variants), 7.6), squeeze=False)
    for col, (name, v) in enumerate(c.variants.items()):
        for row, (label, bins, m) in enumerate((("raw", v.reliability_raw, v.raw),
                                                (f"calibrated ({v.family})", v.reliability_calibrated, v.calibrated))):
            draw_bins(axes[row][col], bins, f"{MODEL_LABELS[name]}: {label}\nECE {number(m['ece'].value)}, "
                                            f"Brier {number(m['brier'].value)}")
            axes[row][col].set_xlabel("confidence that the answer is right")
    axes[0][0].set_ylabel("accuracy")
    axes[1][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)


def plot_risk_coverage(d: AnalysisResult, path: Path) -> str | None:
    """Risk (error rate of the answers kept) against coverage, abstaining on the least confident first."""
    c = d.evaluation.calibration if d.evaluation else None
    if c is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (name, v) in enumerate(c.variants.items()):
        points = len(v.risk_coverage_raw)
        coverage = [(k + 1) / points for k in range(points)]
        colour = f"C{i}"
        ax.plot(coverage, v.risk_coverage_raw, color=colour, ls=":", label=f"{MODEL_LABELS[name]}: raw")
        ax.plot(coverage, v.risk_coverage_calibrated, color=colour, label=f"{MODEL_LABELS[name]}: {v.family}")
    ax.set_xlabel("coverage (share of answers given)")
    ax.set_ylabel("risk (share of those wrong)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("Abstaining on the least confident answers (test split)", fontsize=9)
    return save_figure(fig, path)


PLOTS = {
    "plot_logit_lens": ("logit_lens.png", plot_logit_lens),
    "plot_final_layer": ("final_layer.png", plot_final_layer),
    "plot_movers": ("mover_heads.png", plot_movers),
    "plot_mlp_regression": ("mlp_regression.png", plot_regression),
    "plot_fit": ("fit.png", plot_fit),
    "plot_reliability": ("reliability.png", plot_reliability),
    "plot_calibration": ("calibration.png", plot_calibration),
    "plot_risk_coverage": ("risk_coverage.png", plot_risk_coverage),
}


def write_plots(out: Path, d: AnalysisResult) -> dict[str, str]:
    """Render every plot that has data into `out`; returns {key: file name}."""
    files = {}
    for key, (name, fn) in PLOTS.items():
        written = fn(d, out / name)
        if written:
            files[key] = written
    return files
