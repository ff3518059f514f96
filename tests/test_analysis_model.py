"""The analysis against real forward passes of a tiny random model of every architecture."""

from __future__ import annotations

import pytest
import torch
from tiny import ARCHITECTURES, PROMPTS, build_model

from recallfix.analysis.config import FitConfig
from recallfix.analysis.data.batching import batches, encode, pad_id, subject_spans
from recallfix.analysis.learn import fit as fit_module
from recallfix.analysis.learn.fit import fit_gains
from recallfix.analysis.learn.gain_hooks import GainHooks
from recallfix.analysis.learn.replay import capture_final_block_inputs, replay_logits
from recallfix.analysis.mechanism.attribution import ablation_effect, logprob_gradient, neuron_logprob_attribution
from recallfix.analysis.mechanism.collect import collect, eager_attention
from recallfix.analysis.mechanism.lens import layer_residuals, lens_logits
from recallfix.patches import ComponentMap, apply_patch, decompose, make_patch

SUBJECTS = ["France", "Gold", "Brazil"]
ANSWERS = [" Paris", " Au", " Portuguese"]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny(request: pytest.FixtureRequest) -> tuple:
    model, tokenizer = build_model(request.param)
    answers = torch.tensor([tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in ANSWERS])
    return model, tokenizer, ComponentMap(model), answers


def _single_logits(model: torch.nn.Module, tokenizer, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].float()


def test_right_padded_batches_give_the_unpadded_numbers(tiny: tuple) -> None:
    model, tokenizer, cmap, answers = tiny
    c = collect(model, cmap, encode(tokenizer, PROMPTS), answers, pad=pad_id(tokenizer), batch_size=2)
    for i, prompt in enumerate(PROMPTS):
        p = _single_logits(model, tokenizer, prompt).softmax(-1)
        assert c.output.p_answer[i] == pytest.approx(float(p[answers[i]]), rel=1e-4, abs=1e-7)
        assert c.output.confidence[i] == pytest.approx(float(p.max()), rel=1e-4)


def test_logit_lens_ends_at_the_model_output_and_starts_at_the_embedding(tiny: tuple) -> None:
    model, tokenizer, cmap, answers = tiny
    batch = next(batches(encode(tokenizer, PROMPTS), 8, pad_id(tokenizer)))
    dec = decompose(model, batch.input_ids, batch.attention_mask, cmap)
    residuals = layer_residuals(dec, cmap.shape.num_layers)
    assert torch.allclose(residuals[:, -1], dec.final_resid, atol=1e-4)
    assert torch.allclose(residuals[:, 0], dec.resid[:, dec.index("embed")])
    assert torch.allclose(lens_logits(cmap, residuals[:, -1]), dec.logits, atol=1e-3)
    # the stream after block 0, through the real final norm module, is what the lens reads
    captured = {}
    handle = cmap.block(0).register_forward_hook(lambda _m, _a, out: captured.__setitem__("h", out))
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    handle.remove()
    h = captured["h"][0] if isinstance(captured["h"], tuple) else captured["h"]
    h = h[torch.arange(len(batch)), batch.last]
    with torch.no_grad():
        expected = cmap.unembed()(cmap.final_norm()(h)).float()
    assert torch.allclose(lens_logits(cmap, residuals[:, 1]), expected, atol=1e-3)
    # collect's lens: every column is the lens of that residual (the last two reuse `before` and the output)
    c = collect(model, cmap, encode(tokenizer, PROMPTS), answers, pad=pad_id(tokenizer), batch_size=8)
    rows = batch.index
    for layer in range(cmap.shape.num_layers + 1):
        p = lens_logits(cmap, residuals[:, layer]).softmax(-1)[torch.arange(len(batch)), answers[rows]]
        assert torch.allclose(c.lens_p[rows, layer], p, rtol=1e-3, atol=1e-6)


def test_block_change_splits_exactly_into_dla_plus_rescale(tiny: tuple) -> None:
    model, tokenizer, cmap, answers = tiny
    c = collect(model, cmap, encode(tokenizer, PROMPTS), answers, pad=pad_id(tokenizer), batch_size=3)
    final = cmap.shape.num_layers - 1
    columns = [c.names.index(n) for n in c.final_names]
    batch = next(batches(encode(tokenizer, PROMPTS), 8, pad_id(tokenizer)))
    dec = decompose(model, batch.input_ids, batch.attention_mask, cmap)
    res = layer_residuals(dec, cmap.shape.num_layers)
    before, after = lens_logits(cmap, res[:, final]), lens_logits(cmap, res[:, final + 1])
    a = answers[batch.index]
    rows = torch.arange(len(a))
    change = (after[rows, a] - after.mean(-1)) - (before[rows, a] - before.mean(-1))
    explained = c.dla[batch.index][:, columns].sum(1) + c.rescale[batch.index]
    assert torch.allclose(change, explained, atol=1e-4)


def test_ablation_effect_is_log_p_without_the_write_and_gradient_matches_it(tiny: tuple) -> None:
    model, tokenizer, cmap, answers = tiny
    batch = next(batches(encode(tokenizer, PROMPTS), 8, pad_id(tokenizer)))
    dec = decompose(model, batch.input_ids, batch.attention_mask, cmap)
    a = answers[batch.index]
    name = f"L{cmap.shape.num_layers - 1}MLP"
    write = dec.resid[:, dec.index(name)]
    effect = ablation_effect(cmap, dec.final_resid, write[:, None], a)[:, 0]
    rows = torch.arange(len(a))
    full = lens_logits(cmap, dec.final_resid).log_softmax(-1)[rows, a]
    without = lens_logits(cmap, dec.final_resid - write).log_softmax(-1)[rows, a]
    assert torch.allclose(effect, full - without, atol=1e-5)
    # first order: a tiny write's effect is its gradient attribution
    grad = logprob_gradient(cmap, dec.final_resid, a)
    small = 1e-3 * write
    tiny_effect = ablation_effect(cmap, dec.final_resid, small[:, None], a)[:, 0]
    assert torch.allclose(tiny_effect, (grad * small).sum(-1), atol=1e-5)
    final = cmap.shape.num_layers - 1
    neurons = neuron_logprob_attribution(cmap, grad, dec.neuron_acts[final], final, dec.mlp_scale.get(final))
    bias = cmap.mlp_out(final).bias  # the MLP's, no neuron's
    by_neurons = write - (0.0 if bias is None else bias.float())  # Gemma 3: through the frozen post-MLP norm
    assert torch.allclose(neurons.sum(-1), (grad * by_neurons).sum(-1), atol=1e-4)


def test_replaying_the_final_block_is_the_full_forward(tiny: tuple) -> None:
    model, tokenizer, cmap, _ = tiny
    batch = next(batches(encode(tokenizer, PROMPTS), 8, pad_id(tokenizer)))
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        replayed = replay_logits(cmap, capture_final_block_inputs(model, cmap, batch, last_only=False))
        last = replay_logits(cmap, capture_final_block_inputs(model, cmap, batch))
    valid = batch.attention_mask.bool()
    assert torch.allclose(replayed, full[valid], atol=1e-4)
    assert torch.allclose(last, full[torch.arange(len(batch)), batch.last], atol=1e-4)


def test_gain_hooks_equal_the_applied_patch_and_carry_gradients(tiny: tuple) -> None:
    model, tokenizer, cmap, answers = tiny
    final = cmap.shape.num_layers - 1
    gains = {f"L{final}H0": 0.3, f"L{final}H1": 1.7, f"L{final}N5": 0.0, f"L{final}N9": 2.0}
    batch = next(batches(encode(tokenizer, PROMPTS), 8, pad_id(tokenizer)))
    inputs = capture_final_block_inputs(model, cmap, batch, last_only=False)
    hooks = GainHooks(cmap, list(gains))
    hooks.set(gains)
    with hooks:
        hooked = replay_logits(cmap, inputs)
        loss = hooked[:, answers[0]].sum()
        loss.backward()
    assert hooks.delta.grad is not None and torch.isfinite(hooks.delta.grad).all()
    assert hooks.delta.grad.abs().sum() > 0
    with torch.no_grad(), apply_patch(model, make_patch(model, gains)):
        patched = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    valid = batch.attention_mask.bool()
    assert torch.allclose(hooked.detach(), patched[valid], atol=1e-4)
    # whole-MLP gains scale the bias too, as the patch does
    whole = {f"L{final}MLP": 0.5}
    hooks = GainHooks(cmap, list(whole))
    hooks.set(whole)
    with torch.no_grad(), hooks:
        hooked = replay_logits(cmap, capture_final_block_inputs(model, cmap, batch))
    with torch.no_grad(), apply_patch(model, make_patch(model, whole)):
        patched = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    assert torch.allclose(hooked, patched[torch.arange(len(batch)), batch.last], atol=1e-4)


def test_mover_attention_comes_from_the_analysis_pass_and_eager_is_restored(tiny: tuple) -> None:
    model, tokenizer, cmap, _ = tiny
    before = model.config._attn_implementation
    spans = subject_spans(tokenizer, PROMPTS, SUBJECTS, [None] * 3)
    assert all(spans)
    ids = encode(tokenizer, PROMPTS)
    answers = torch.zeros(len(ids), dtype=torch.long)
    c = collect(model, cmap, ids, answers, pad=pad_id(tokenizer), batch_size=2, subjects=spans, mechanisms=True)
    assert model.config._attn_implementation == before
    assert c.attention is not None and c.attention.shape == (3, cmap.shape.num_layers, cmap.shape.num_heads)
    assert ((c.attention >= 0) & (c.attention <= 1 + 1e-5)).all()
    with eager_attention(model), torch.no_grad():
        out = model(**tokenizer(PROMPTS[0], return_tensors="pt"), output_attentions=True)
    for layer in range(cmap.shape.num_layers):
        expected = out.attentions[layer][0, :, -1, spans[0]].sum(-1)
        assert torch.allclose(c.attention[0, layer], expected, atol=1e-5)
    # Eager attention in the analysis pass gives the same outputs as the default implementation.
    plain = collect(model, cmap, ids, answers, pad=pad_id(tokenizer), batch_size=2)
    assert torch.allclose(c.x_final, plain.x_final, atol=1e-5)
    assert plain.attention is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fit_lowers_the_objective_and_restores_the_model(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = build_model(arch)
    cmap = ComponentMap(model)
    answers = torch.tensor([tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in ANSWERS])
    batch = next(batches(encode(tokenizer, PROMPTS), 8, pad_id(tokenizer)))
    facts = capture_final_block_inputs(model, cmap, batch)
    facts.targets, facts.recalled = answers[batch.index], torch.tensor([True, True, False])
    neutral = capture_final_block_inputs(model, cmap, next(batches(encode(tokenizer, ["The weather is mild."]), 8, 0)),
                                         last_only=False)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = fit_gains(model, cmap, ["L1H0", "L1H1", "L1MLP"], [facts], [facts], [neutral],
                       FitConfig(lr=0.05, max_epochs=15, patience=15))
    assert result.best_epoch >= 1
    history = {h["epoch"]: h for h in result.history}
    assert history[result.best_epoch]["dev_objective"] < history[0]["dev_objective"]
    assert history[result.best_epoch]["dev_nll"] < history[0]["dev_nll"]
    assert all(0.0 <= g <= 2.0 for g in result.gains.values()) and result.gains != dict.fromkeys(result.gains, 1.0)
    for name, p in model.named_parameters():  # weights untouched, no hook left, grads back as they were
        assert torch.equal(p, weights[name]) and p.requires_grad
    assert not cmap.attn_out(1)._forward_pre_hooks and not cmap.mlp_out(1)._forward_pre_hooks
    # large vocabularies recompute the neutral base log-probs instead of storing them: same fit
    monkeypatch.setattr(fit_module, "MAX_STORED_BASE", 0)
    neutral.base_logp = None
    again = fit_gains(model, cmap, ["L1H0", "L1H1", "L1MLP"], [facts], [facts], [neutral],
                      FitConfig(lr=0.05, max_epochs=15, patience=15))
    assert neutral.base_logp is None
    assert again.gains == pytest.approx(result.gains, abs=1e-6)


def test_fit_keeps_no_epoch_over_the_confidence_budget() -> None:
    """With a zero budget on the guarded prompts' top-1 rise, no epoch that raises it can be kept, and every
    epoch over budget triples the guard weight for the next one."""
    model, tokenizer = build_model("llama")
    cmap = ComponentMap(model)
    answers = torch.tensor([tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in ANSWERS])
    batch = next(batches(encode(tokenizer, PROMPTS), 8, pad_id(tokenizer)))
    facts = capture_final_block_inputs(model, cmap, batch)
    facts.targets, facts.recalled = answers[batch.index], torch.tensor([True, False, False])
    neutral = capture_final_block_inputs(model, cmap, next(batches(encode(tokenizer, ["The sky is clear."]), 8, 0)),
                                         last_only=False)
    config = FitConfig(lr=0.1, max_epochs=6, patience=6, max_confidence_rise=0.0, guard_growth=3.0)
    result = fit_gains(model, cmap, ["L1H0", "L1H1", "L1MLP"], [facts], [facts], [neutral], config)
    history = result.history
    kept = history[result.best_epoch]
    assert kept["dev_confidence_rise_unrecalled"] <= 0.0
    for before, after in zip(history[1:], history[2:], strict=False):
        over = before["dev_confidence_rise_unrecalled"] > 0.0
        assert after["guard_weight"] == pytest.approx(before["guard_weight"] * (3.0 if over else 1.0))
    assert any(h["dev_confidence_rise_unrecalled"] > 0 for h in history[1:]), "the test needs an epoch over budget"


def test_evaluation_replay_equals_the_patched_forward_pass(tiny: tuple) -> None:
    """The evaluation runs the blocks below the final one once and replays the final block per patch: the same
    numbers as a forward pass of the patched model, at the last position and at every neutral position."""
    from recallfix.analysis.evaluate.passes import replay_dist

    model, tokenizer, cmap, answers = tiny
    final = cmap.shape.num_layers - 1
    torch.manual_seed(0)
    bias = {f"L{final}MLP": 0.1 * torch.randn(cmap.shape.hidden_size)}
    patch = make_patch(model, {f"L{final}H0": 0.3, f"L{final}H1": 1.4},
                       biases=bias if cmap.bias_edit_refusal() is None else None)  # Gemma 3 refuses bias edits
    ids = encode(tokenizer, PROMPTS)
    batch = next(batches(ids, len(ids), pad_id(tokenizer), "cpu"))
    last = capture_final_block_inputs(model, cmap, batch)
    last.targets = answers[batch.index]
    every = batch.attention_mask.bool()
    everywhere = capture_final_block_inputs(model, cmap, batch, positions=every)
    everywhere.targets = torch.roll(batch.input_ids, -1, dims=1)[every]
    replayed = replay_dist(model, cmap, last, patch)
    replayed_all = replay_dist(model, cmap, everywhere, patch, temperature=2.0)
    with torch.no_grad(), apply_patch(model, patch):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    rows = torch.arange(len(batch))
    expected = logits[rows, batch.last].log_softmax(-1)[rows, last.targets]
    assert torch.allclose(-replayed.nll, expected, atol=1e-4)
    expected_all = (logits[every] / 2.0).log_softmax(-1)[torch.arange(int(every.sum())), everywhere.targets]
    assert torch.allclose(-replayed_all.nll, expected_all, atol=1e-4)
    base = replay_dist(model, cmap, last, None)
    assert not torch.allclose(base.nll, replayed.nll, atol=1e-3)  # the patch does change the numbers


def test_a_mechanism_sample_gives_the_full_pass_numbers_of_its_rows(tiny: tuple) -> None:
    """`sample` restricts the lens through the layers and the mechanisms to some rows; each of those rows gets
    what the pass over everyone gives it, and the final block's numbers still cover every row."""
    model, tokenizer, cmap, answers = tiny
    spans = subject_spans(tokenizer, PROMPTS, SUBJECTS, [None] * 3)
    ids = encode(tokenizer, PROMPTS)
    everyone = collect(model, cmap, ids, answers, pad=pad_id(tokenizer), batch_size=2, subjects=spans,
                       mechanisms=True)
    sample = torch.tensor([0, 2])
    some = collect(model, cmap, ids, answers, pad=pad_id(tokenizer), batch_size=2, subjects=spans, mechanisms=True,
                   sample=sample)
    assert torch.equal(some.sample, sample) and torch.equal(everyone.sample, torch.arange(3))
    assert some.lens_p.shape == (2, cmap.shape.num_layers + 1)
    for name in ("lens_p", "beta", "r2", "intercept_dla", "subject_attribution", "attention"):
        assert torch.allclose(getattr(some, name), getattr(everyone, name)[sample], atol=1e-5, equal_nan=True), name
    assert torch.equal(some.lens_rank, everyone.lens_rank[sample])
    assert torch.equal(some.intercept_rank, everyone.intercept_rank[sample])
    for name in ("x_final", "dla", "final_effect", "neuron_effect", "rescale"):
        assert torch.allclose(getattr(some, name), getattr(everyone, name), atol=1e-5), name
    assert torch.equal(some.output.rank, everyone.output.rank) and torch.equal(some.before.rank, everyone.before.rank)
