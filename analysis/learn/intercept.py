"""The paper's own mitigation (Lv et al.'s released notebooks): remove the final MLP's intercept.

At the last position of each prompt n, the final MLP's output is regressed on the final layer's head
writes and on the residual stream entering the MLP:

    mlp_out[n] ~ sum_h a_h head_writes[n, h] + a_r resid_mid[n] + b

one scalar per head, one for the residual, one vector intercept b shared by all prompts. The fix is
`resid_post = resid_mid + mlp_out - b`: a bias edit of -b on the final MLP (`intercept_patch`).

The notebook fits this by SGD on the mean squared error; `fit_intercept` solves the same least squares
in closed form: with everything centred over prompts, the coefficients solve the (H+1) x (H+1) normal
equations, and b is the mean of what they leave unexplained.

    from recallfix.analysis.learn.intercept import InterceptFit, fit_intercept, intercept_patch
    fit = fit_intercept(resid_mid, head_writes, mlp_out)     # [N, d], [N, H, d], [N, d] (train split only)
    patch = intercept_patch(model, layer, fit.b, command=..., metrics=...)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recallfix.patches import Patch, make_patch
from recallfix.patches.components import Component


@dataclass(frozen=True)
class InterceptFit:
    b: torch.Tensor  # [d] the intercept shared by all prompts (float32)
    head_coef: torch.Tensor  # [H] one scalar per head
    resid_coef: float  # the residual stream's scalar
    r2: float  # share of mlp_out's variance around its mean that the regression explains

    def predict(self, resid_mid: torch.Tensor, head_writes: torch.Tensor) -> torch.Tensor:
        """The regression's mlp_out for each prompt: [N, d]."""
        heads = torch.einsum("nhd,h->nd", head_writes.float(), self.head_coef)
        return heads + self.resid_coef * resid_mid.float() + self.b


def fit_intercept(resid_mid: torch.Tensor, head_writes: torch.Tensor, mlp_out: torch.Tensor) -> InterceptFit:
    """Least squares of mlp_out[n] on the head writes and resid_mid with a shared vector intercept.

    resid_mid [N, d], head_writes [N, H, d], mlp_out [N, d]. Computed in float64; where the normal
    equations are singular (e.g. one prompt, or a head that writes nothing) the minimum-norm
    coefficients are taken, which still minimise the error."""
    n, h, d = head_writes.shape
    if resid_mid.shape != (n, d) or mlp_out.shape != (n, d):
        raise ValueError(f"expected resid_mid and mlp_out of shape {(n, d)} to match head_writes {(n, h, d)}, "
                         f"got {tuple(resid_mid.shape)} and {tuple(mlp_out.shape)}")
    x = torch.cat([head_writes, resid_mid.unsqueeze(1)], dim=1).double()  # [N, H+1, d]
    y = mlp_out.double()
    x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)
    xc, yc = x - x_mean, y - y_mean
    gram = torch.einsum("njd,nkd->jk", xc, xc)
    rhs = torch.einsum("njd,nd->j", xc, yc)
    coef = torch.linalg.pinv(gram, hermitian=True) @ rhs
    b = y_mean - torch.einsum("k,kd->d", coef, x_mean)
    sse = (yc - torch.einsum("k,nkd->nd", coef, xc)).pow(2).sum()
    sst = yc.pow(2).sum()
    r2 = float(1.0 - sse / sst) if sst > 0 else 1.0
    return InterceptFit(b=b.float(), head_coef=coef[:h].float(), resid_coef=float(coef[h]), r2=r2)


def intercept_patch(model: nn.Module, layer: int, b: torch.Tensor, *, command: str = "",
                    dataset_sha256: str | None = None, metrics: dict | None = None) -> Patch:
    """The paper's fix as a patch: a bias of -b on layer `layer`'s MLP output."""
    return make_patch(model, {}, biases={str(Component(layer, "mlp")): -b}, command=command,
                      dataset_sha256=dataset_sha256, metrics=metrics)
