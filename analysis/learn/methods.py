"""The paper's own fix as a method beside the learned gains, and which of the two becomes patch.json.

Lv et al.'s released notebooks regress, at the last position and across prompts, the final MLP's output on
the final layer's head writes and the stream after attention (one scalar per head, one for the stream, one
vector intercept b shared by all prompts), and remove the intercept: resid_post = resid_mid + mlp_out - b.
Here b is fitted on the train split only (`intercept.fit_intercept`, closed form) and carried as a bias edit
of -b on the final MLP's output.

With `--method both`, patch.json is the method with the lower mean NLL of the answer on the dev split (never
the test split); within `NEAR_EQUAL_NATS` of each other, the one a merged checkpoint can carry (what vLLM
serves) is preferred. The other is written beside it as patch.<method>.json.
"""

from __future__ import annotations

from recallfix.patches import Patch
from recallfix.patches.export import export_refusals

from ..data.inputs import Loaded
from ..mechanism.collect import Collected
from ..mechanism.summaries import num
from ..schema import InterceptInfo, MethodInfo
from .intercept import fit_intercept, intercept_patch

# Mean dev NLLs closer than this count as equal: a few hundred dev prompts cannot separate them (the fit's own
# dev NLL moves by more than this between neighbouring epochs).
NEAR_EQUAL_NATS = 0.01


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


def method_info(s: Loaded, name: str, patch: Patch, dev_nll: float) -> MethodInfo:
    refusals = export_refusals(s.lm, patch)
    return MethodInfo(name=name, file="", patch_id=patch.id, dev_nll=dev_nll, merged=refusals["merged"],
                      lora=refusals["lora"])


def choose(methods: list[MethodInfo]) -> tuple[str, str]:
    """The method written as patch.json, and why (lowest dev NLL; between near-equals, one vLLM can serve)."""
    best = min(methods, key=lambda m: m.dev_nll)
    if len(methods) == 1:
        return best.name, f"{best.name} is the only method asked for"
    near = [m for m in methods if m.dev_nll - best.dev_nll < NEAR_EQUAL_NATS]
    servable = [m for m in near if m.merged is None]
    others = ", ".join(f"{m.name} {m.dev_nll:.4f}" for m in methods)
    if best.merged is not None and servable:
        pick = min(servable, key=lambda m: m.dev_nll)
        return pick.name, (f"{pick.name}: within {NEAR_EQUAL_NATS} nats of the lowest dev NLL ({others}), and a "
                           f"merged checkpoint (vLLM) can carry it, while {best.name} cannot ({best.merged})")
    return best.name, f"{best.name}: the lowest mean NLL of the answer on the dev split ({others})"


def file_names(methods: list[MethodInfo], chosen: str) -> dict[str, str]:
    return {m.name: "patch.json" if m.name == chosen else f"patch.{m.name}.json" for m in methods}
