"""Named hook points read what their names say, and a hook's return value replaces the activation."""

from __future__ import annotations

import pytest
import torch
from tiny import ARCHITECTURES, PROMPTS, build_model

from recallfix.patches import ComponentMap, apply_patch, decompose, make_patch
from recallfix.patches.hooks import FINAL_NORM_IN, capture, hook_point, hooks


@pytest.fixture(params=ARCHITECTURES, scope="module")
def tiny(request: pytest.FixtureRequest):
    model, tokenizer = build_model(request.param)
    return model, ComponentMap(model), tokenizer(PROMPTS[:1], return_tensors="pt")


def test_resid_pre_is_the_sum_of_the_writes_before_the_block(tiny) -> None:
    model, cmap, batch = tiny
    num_layers = cmap.shape.num_layers
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(num_layers)] + [FINAL_NORM_IN]
    with torch.no_grad(), capture(cmap, names, keep=lambda t: t[0, -1].float()) as cache:
        model(**batch)
    dec = decompose(model, batch.input_ids, batch.attention_mask, cmap)
    layers = torch.tensor(dec.layers)
    for layer in range(num_layers):
        written_before = dec.resid[0, layers < layer].sum(dim=0)
        assert torch.allclose(cache[f"blocks.{layer}.hook_resid_pre"], written_before, atol=1e-4), layer
    assert torch.allclose(cache[FINAL_NORM_IN], dec.final_resid[0])
    assert dec.written_by(num_layers - 1)[-1] == f"L{num_layers - 1}MLP"


def test_a_hook_that_returns_a_value_replaces_the_activation(tiny) -> None:
    """Doubling head 0's z at the last block is the patch that gives that head gain 2. (One head: doubling every
    head's z would change almost nothing on Gemma 3, whose norm after the attention renormalises their sum.)"""
    model, cmap, batch = tiny
    last = cmap.shape.num_layers - 1
    scale = torch.ones(cmap.shape.num_heads * cmap.shape.head_dim)
    scale[: cmap.shape.head_dim] = 2.0
    with torch.no_grad():
        base = model(**batch).logits
        with hooks(cmap, {f"blocks.{last}.attn.hook_z": lambda z: z * scale}):
            hooked = model(**batch).logits
        after = model(**batch).logits
        with apply_patch(model, make_patch(model, {f"L{last}H0": 2.0})):
            patched = model(**batch).logits
    assert torch.allclose(hooked, patched, atol=1e-5)
    assert not torch.allclose(hooked, base, atol=1e-3)
    assert torch.equal(after, base), "leaving the block removes the hook"


def test_unknown_hook_points_are_refused(tiny) -> None:
    _, cmap, _ = tiny
    with pytest.raises(ValueError, match=r"unknown hook point 'blocks\.0\.attn\.hook_q'.*hook_resid_pre"):
        hook_point(cmap, "blocks.0.attn.hook_q")
