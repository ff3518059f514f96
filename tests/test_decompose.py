"""The exact decomposition adds up to the model's own logits, for every architecture."""

from __future__ import annotations

import pytest
import torch
from tiny import ARCHITECTURES, PROMPTS, build_model

from recallfix.patches import ComponentMap, decompose, direct_logit_attribution, neuron_attribution
from recallfix.patches.decompose import component_logits


@pytest.fixture(params=ARCHITECTURES, scope="module")
def decomposed(request: pytest.FixtureRequest):
    model, tokenizer = build_model(request.param)
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    cmap = ComponentMap(model)
    return model, batch, cmap, decompose(model, batch.input_ids, batch.attention_mask, cmap)


def test_components_sum_to_residual_and_logits(decomposed) -> None:
    model, batch, cmap, dec = decomposed
    with torch.no_grad():
        logits = model(**batch).logits[:, -1].float()
    # the unembedding runs on the last position alone (logits_to_keep): equal to float rounding
    assert torch.allclose(dec.logits, logits, atol=1e-5)
    assert (dec.resid.sum(dim=1) - dec.final_resid).abs().max() < 1e-4
    assert (component_logits(dec, cmap).sum(dim=1) - logits).abs().max() < 1e-4


def test_names_cover_every_head_and_mlp(decomposed) -> None:
    _, _, cmap, dec = decomposed
    shape = cmap.shape
    assert dec.names[0] == "embed"
    for layer in range(shape.num_layers):
        assert all(f"L{layer}H{h}" in dec.names for h in range(shape.num_heads))
        assert f"L{layer}MLP" in dec.names
    assert len(dec.names) == len(set(dec.names)) == dec.resid.shape[1]


def test_neurons_sum_to_mlp_minus_bias(decomposed) -> None:
    _, _, cmap, dec = decomposed
    layer = cmap.shape.num_layers - 1
    target = dec.logits.argmax(dim=-1)
    per_component = direct_logit_attribution(dec, cmap, target)
    neurons = neuron_attribution(dec, cmap, layer, target)
    mlp = per_component[:, dec.index(f"L{layer}MLP")]
    bias = cmap.mlp_out(layer).bias
    if bias is not None:  # the bias is the MLP's, not any neuron's
        single = type(dec)(names=["b"], resid=bias.float().expand(len(target), 1, -1), neuron_acts={},
                           final_resid=dec.final_resid, norm_scale=dec.norm_scale, logits=dec.logits)
        mlp = mlp - direct_logit_attribution(single, cmap, target)[:, 0]
    assert torch.allclose(neurons.sum(dim=-1), mlp, atol=1e-4)


def test_attribution_matches_logit_difference(decomposed) -> None:
    """DLA against the mean logit, summed over components, is the logit minus the mean logit
    (up to the constant term, which no component owns)."""
    _, _, cmap, dec = decomposed
    target = dec.logits.argmax(dim=-1)
    total = direct_logit_attribution(dec, cmap, target).sum(dim=-1)
    parts = component_logits(dec, cmap)
    constant = parts[:, -1]
    expected = (dec.logits - constant).gather(1, target[:, None])[:, 0] - (dec.logits - constant).mean(dim=-1)
    assert torch.allclose(total, expected, atol=1e-4)


def test_mean_readout_follows_a_changed_unembedding() -> None:
    """The mean unembedding row is kept between calls, and recomputed once the weight is written to."""
    from recallfix.patches.decompose import mean_readout

    model, _ = build_model("llama")
    cmap = ComponentMap(model)
    scale = torch.ones(1)
    before = mean_readout(cmap, scale)
    assert torch.equal(mean_readout(cmap, scale), before)
    with torch.no_grad():
        cmap.unembed().weight.add_(1.0)
    after = mean_readout(cmap, scale)
    expected = cmap.unembed().weight.float().mean(dim=0) * cmap.final_norm().weight.float()
    assert torch.allclose(after, expected.unsqueeze(0)) and not torch.allclose(after, before)


def test_soft_capped_logits_are_refused_and_patches_still_apply() -> None:
    """A final logit soft-cap (cap * tanh(logits / cap)) is not linear: the decomposition refuses it by name,
    while a patch, a weight edit, still applies."""
    import transformers
    from tiny import build_tokenizer, tiny_config

    from recallfix.patches import UnsupportedModelError, apply_patch, make_patch

    config = tiny_config("gemma3_text", len(build_tokenizer()))
    config.final_logit_softcapping = 30.0
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(UnsupportedModelError, match=r"final logit soft-capping \(final_logit_softcapping=30\)"):
        decompose(model, ids)
    with torch.no_grad():
        base = model(ids).logits
        with apply_patch(model, make_patch(model, {"L1H0": 0.5})):
            assert not torch.allclose(model(ids).logits, base)


# The real models of models.json checked here (their architecture) and the prompts: facts both know something of.
REAL_DECOMPOSED = {"gemma3-270m": "gemma3_text", "qwen2.5-coder-0.5b": "qwen2"}
REAL_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "Tokyo is the capital of",
                "The Eiffel Tower is located in the city of"]


@pytest.mark.real_model
@pytest.mark.parametrize("name", REAL_DECOMPOSED)
def test_real_model_components_sum_to_what_each_block_wrote(name: str) -> None:
    """A real model (float32, from models.json): every block's heads and MLP add up to what the block wrote to the
    stream, and all components through the final norm to the model's logits (no soft-cap on either). Gemma 3 270M
    writes each head and MLP through its post-attention or post-feedforward norm, frozen at the forward pass's scale,
    and normalises with (1 + weight) RMSNorms; Qwen2.5-Coder-0.5B adds its writes as they are (its q, k and v biases
    are inside the heads' writes).

    Measured (left-padded batch of 4, the tokenizers as loaded: Gemma's with <bos>): on Gemma 3 the stream grows to
    3.4e4 and a block writes up to 9.2e3; the largest |sum of a block's writes - what it wrote| was 2.2e-3, at most
    3.5e-7 of the stream (float32 rounding of the stream itself; without <bos>, 1.7e-3 on 3.0e4); |component logits
    summed - logits| 1.9e-5 on logits up to 26. On Qwen2.5-Coder the last position's stream stays under 63 and a
    block writes up to 13: 4.1e-6 at most, 1.2e-7 of the stream; the logits 1.0e-5 on logits up to 22. The bound,
    1e-6 of the stream, is about ten float32 ulps."""
    from real_model import named_model_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = named_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    batch = tokenizer(REAL_PROMPTS, return_tensors="pt", padding=True)
    cmap = ComponentMap(model)
    assert cmap.architecture == REAL_DECOMPOSED[name] and cmap.readout_refusal() is None
    dec = decompose(model, batch.input_ids, batch.attention_mask, cmap)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    # hidden_states[l]: the stream entering block l (0: the scaled embedding); the last is after the final norm
    streams = torch.stack([h[:, -1].float() for h in out.hidden_states[:-1]] + [dec.final_resid], dim=1)
    layers = torch.tensor(dec.layers)
    worst, worst_ratio, largest_write = 0.0, 0.0, 0.0
    for layer in range(-1, cmap.shape.num_layers):
        before = streams[:, layer] if layer >= 0 else torch.zeros_like(streams[:, 0])
        wrote = streams[:, layer + 1] - before
        error = float((dec.resid[:, layers == layer].sum(dim=1) - wrote).abs().max())
        stream = max(float(before.abs().max()), float(streams[:, layer + 1].abs().max()))
        assert error <= 1e-6 * stream, (layer, error, stream)
        worst, worst_ratio = max(worst, error), max(worst_ratio, error / stream)
        largest_write = max(largest_write, float(wrote.abs().max()))
    logits = out.logits[:, -1].float()
    with torch.no_grad():
        logit_error = float((component_logits(dec, cmap).sum(dim=1) - logits).abs().max())
    assert logit_error < 1e-3 and float((dec.logits - logits).abs().max()) < 1e-3
    print(f"{name}: largest |a block's writes summed - what it wrote| {worst:.1e} (at most {worst_ratio:.1e} of the "
          f"stream, which reaches {float(streams.abs().max()):.1e}; a block writes up to {largest_write:.1e}), "
          f"|component logits summed - logits| {logit_error:.1e} on logits up to {float(logits.abs().max()):.0f}")
