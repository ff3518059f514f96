"""The paper's own fix as a method beside the learned gains, and which of the two becomes patch.json.

Lv et al.'s released notebooks regress, at the last position and across prompts, the final MLP's output on
the final layer's head writes and the stream after attention (one scalar per head, one for the stream, one
vector intercept b shared by all prompts), and remove the intercept: resid_post = resid_mid + mlp_out - b.
Here b is fitted on the train split only (`intercept.fit_intercept`, closed form) and carried as a bias edit
of -b on the final MLP's output.

Which candidate becomes patch.json is decided on the dev split only (never the test split). A candidate
qualifies when it lowers the mean NLL of the answer beyond its interval (the paired cluster-bootstrap interval of
candidate - base lies below 0) and does not lower accuracy beyond its interval. Of those, the lowest dev NLL
wins; within `NEAR_EQUAL_NATS` of it, one a merged checkpoint can carry (what vLLM serves) is preferred. When
none qualifies, no patch is recommended and there is no patch.json: "no patch" is an answer. Every candidate is
written beside it as patch.<method>.json.
"""

from __future__ import annotations

from recallfix.patches import Patch
from recallfix.patches.export import export_refusals

from .. import calibration as cal
from ..data.inputs import Loaded
from ..mechanism.collect import Collected
from ..mechanism.summaries import num
from ..records import Dist
from ..schema import InterceptInfo, MethodInfo
from .intercept import fit_intercept, intercept_patch

# Mean dev NLLs closer than this count as equal: a few hundred dev prompts cannot separate them (the fit's own
# dev NLL moves by more than this between neighbouring epochs).
NEAR_EQUAL_NATS = 0.01


def intercept_refusal(s: Loaded) -> str | None:
    """Why the paper's fix does not apply to this model, or None: it is a bias edit on the final MLP's output,
    which no weight edit carries where a norm follows that output (Gemma 3)."""
    reason = s.cmap.bias_edit_refusal()
    return None if reason is None else f"intercept: not applicable, {reason}"


def intercept_method(s: Loaded, c: Collected, command: str, facts_sha: str) -> tuple[Patch, InterceptInfo]:
    """Fit the intercept on the train split and make the patch that removes it."""
    train = s.known.rows("train")
    mlp_out = c.final_mlp_out[train]
    fit = fit_intercept(c.final_resid_mid[train], c.final_head_writes[train], mlp_out)
    patch = intercept_patch(s.lm, s.final, fit.b, command=command, dataset_sha256=facts_sha)
    component = patch.edits[0].component
    return patch, InterceptInfo(
        file="", id=patch.id, component=component, n_train=int(len(train)),
        head_coef={name: round(float(a), 6) for name, a in zip(s.cmap.heads(s.final), fit.head_coef.tolist(),
                                                                strict=True)},
        resid_coef=float(fit.resid_coef), r2=num(fit.r2), b_norm=float(fit.b.norm()),
        mean_mlp_out_norm=float(mlp_out.norm(dim=1).mean()) if len(train) else 0.0,
    )


def method_info(s: Loaded, name: str, patch: Patch, dev: Dist, base_dev: Dist, groups: list[str], n_boot: int,
                seed: int) -> MethodInfo:
    """A candidate's dev numbers against the base model (paired, subjects resampled) and where it can be served."""
    resamples = cal.group_resamples(groups, n_boot, seed)
    change = cal.differences(dev, base_dev, cal.bootstrap_samples(dev, resamples),
                             cal.bootstrap_samples(base_dev, resamples))
    refusals = export_refusals(s.lm, patch)
    return MethodInfo(name=name, file="", patch_id=patch.id, dev_nll=float(dev.nll.double().mean()),
                      dev_nll_change=change["nll"], dev_accuracy_change=change["accuracy"],
                      merged=refusals["merged"], lora=refusals["lora"])


def qualifies(m: MethodInfo) -> str | None:
    """Why the candidate cannot be recommended (None: it can): its dev NLL must fall beyond its interval, and its
    dev accuracy must not fall beyond its interval."""
    nll, acc = m.dev_nll_change, m.dev_accuracy_change
    if nll.ci_low is not None and nll.ci_low > 0:
        return f"dev NLL {_estimate(nll)}: higher, beyond its interval"
    if nll.ci_high is None or nll.ci_high >= 0:
        return f"dev NLL {_estimate(nll)}: the interval reaches 0"
    if acc.ci_high is not None and acc.ci_high < 0:
        return f"dev accuracy {_estimate(acc)}: lower beyond its interval"
    return None


def _estimate(e: object) -> str:
    value, lo, hi = (getattr(e, k) for k in ("value", "ci_low", "ci_high"))
    interval = f" [{lo:+.4f}, {hi:+.4f}]" if lo is not None and hi is not None else ""
    return f"{value:+.4f}{interval}" if value is not None else "n/a"


def choose(methods: list[MethodInfo]) -> tuple[str | None, str]:
    """The candidate recommended as patch.json (None: no patch), and why, from the dev split only."""
    why_not = {m.name: qualifies(m) for m in methods}
    fit = [m for m in methods if why_not[m.name] is None]
    summary = "; ".join(f"{m.name} dev NLL {_estimate(m.dev_nll_change)}" for m in methods)
    if not fit:
        return None, ("no patch: no candidate lowers the dev NLL beyond its interval without lowering dev accuracy "
                      "(" + "; ".join(f"{name}: {reason}" for name, reason in why_not.items()) + ")")
    best = min(fit, key=lambda m: m.dev_nll)
    near = [m for m in fit if m.dev_nll - best.dev_nll < NEAR_EQUAL_NATS]
    servable = [m for m in near if m.merged is None]
    if best.merged is not None and servable:
        pick = min(servable, key=lambda m: m.dev_nll)
        return pick.name, (f"{pick.name}: within {NEAR_EQUAL_NATS} nats of the lowest dev NLL ({summary}), and a "
                           f"merged checkpoint (vLLM) can carry it, while {best.name} cannot ({best.merged})")
    return best.name, (f"{best.name}: the lowest mean NLL of the answer on the dev split, change against base "
                       f"({summary})")


def file_names(methods: list[MethodInfo], chosen: str | None) -> dict[str, str]:
    """The recommended candidate is patch.json; the others (all of them when none is) patch.<method>.json."""
    return {m.name: "patch.json" if m.name == chosen else f"patch.{m.name}.json" for m in methods}
