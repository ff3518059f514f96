"""The paper's fix: the closed-form intercept fit equals least squares on the explicit design matrix, and
its patch removes the intercept from the final MLP's output exactly."""

from __future__ import annotations

import pytest
import torch
from tiny import PROMPTS, build_model

from recallfix.analysis.learn.intercept import fit_intercept, intercept_patch
from recallfix.patches import ComponentMap, apply_patch
from recallfix.patches.hooks import hooks


def lstsq_reference(resid_mid: torch.Tensor, head_writes: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
    """Solve the regression as written: one row per (prompt, coordinate); columns: a scalar per head, one for
    the residual, and one indicator per coordinate (the vector intercept). Returns [H + 1 + d] coefficients."""
    n, h, d = head_writes.shape
    x = torch.cat([head_writes, resid_mid.unsqueeze(1)], dim=1).double()  # [N, H+1, d]
    scalars = x.permute(0, 2, 1).reshape(n * d, h + 1)
    intercept = torch.eye(d, dtype=torch.float64).repeat(n, 1)
    design = torch.cat([scalars, intercept], dim=1)
    return torch.linalg.lstsq(design, mlp_out.double().reshape(n * d, 1), driver="gelsd").solution[:, 0]


def synthetic(n: int, h: int, d: int, noise: float, seed: int = 0):  # noqa: ANN201
    g = torch.Generator().manual_seed(seed)
    head_writes = torch.randn(n, h, d, generator=g)
    resid_mid = 3.0 * torch.randn(n, d, generator=g)
    coef = torch.randn(h, generator=g)
    b = torch.randn(d, generator=g)
    mlp_out = (torch.einsum("nhd,h->nd", head_writes, coef) + 0.4 * resid_mid + b
               + noise * torch.randn(n, d, generator=g))
    return resid_mid, head_writes, mlp_out, coef, b


@pytest.mark.parametrize(("n", "h", "d"), [(40, 4, 16), (7, 9, 5), (200, 3, 64)])
def test_closed_form_equals_lstsq_on_the_design_matrix(n: int, h: int, d: int) -> None:
    resid_mid, head_writes, mlp_out, _, _ = synthetic(n, h, d, noise=0.7, seed=n)
    fit = fit_intercept(resid_mid, head_writes, mlp_out)
    ref = lstsq_reference(resid_mid, head_writes, mlp_out)
    assert torch.allclose(fit.head_coef.double(), ref[:h], atol=1e-5)
    assert fit.resid_coef == pytest.approx(float(ref[h]), abs=1e-5)
    assert torch.allclose(fit.b.double(), ref[h + 1:], atol=1e-4)
    residual = mlp_out - fit.predict(resid_mid, head_writes)
    r2 = 1 - residual.pow(2).sum() / (mlp_out - mlp_out.mean(0)).pow(2).sum()
    assert fit.r2 == pytest.approx(float(r2), abs=1e-5) and 0.0 < fit.r2 < 1.0


def test_recovers_planted_coefficients_without_noise() -> None:
    resid_mid, head_writes, mlp_out, coef, b = synthetic(30, 5, 12, noise=0.0)
    fit = fit_intercept(resid_mid, head_writes, mlp_out)
    assert torch.allclose(fit.head_coef, coef, atol=1e-5) and fit.resid_coef == pytest.approx(0.4, abs=1e-5)
    assert torch.allclose(fit.b, b, atol=1e-5) and fit.r2 == pytest.approx(1.0, abs=1e-9)


def test_singular_design_still_minimises_the_error() -> None:
    resid_mid, head_writes, mlp_out, _, _ = synthetic(20, 3, 8, noise=0.5)
    head_writes[:, 2] = head_writes[:, 1]  # two identical heads: the normal equations are singular
    fit = fit_intercept(resid_mid, head_writes, mlp_out)
    ref = lstsq_reference(resid_mid, head_writes, mlp_out)
    ref_pred = (torch.einsum("nhd,h->nd", head_writes.double(), ref[:3]) + ref[3] * resid_mid.double() + ref[4:])
    sse = (mlp_out - fit.predict(resid_mid, head_writes)).double().pow(2).sum()
    assert float(sse) == pytest.approx(float((mlp_out.double() - ref_pred).pow(2).sum()), rel=1e-5)


def test_shape_mismatch_is_a_clear_error() -> None:
    resid_mid, head_writes, mlp_out, _, _ = synthetic(10, 2, 4, noise=0.1)
    with pytest.raises(ValueError, match=r"expected resid_mid and mlp_out of shape \(10, 4\)"):
        fit_intercept(resid_mid[:, :3], head_writes, mlp_out)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_intercept_patch_removes_b_from_the_final_mlp_output(arch: str) -> None:
    model, tokenizer = build_model(arch)
    cmap = ComponentMap(model)
    last = cmap.shape.num_layers - 1
    b = torch.randn(cmap.shape.hidden_size, generator=torch.Generator().manual_seed(1))
    patch = intercept_patch(model, last, b, command="test")
    assert patch.biases == {patch.components[0]: (-b).tolist()} and str(patch.components[0]) == f"L{last}MLP"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        with hooks(cmap, {f"blocks.{last}.hook_mlp_out": lambda out: out - b}):
            hooked = model(**batch).logits
        with apply_patch(model, patch):
            patched = model(**batch).logits
    assert (patched - hooked).abs().max() <= 1e-5
